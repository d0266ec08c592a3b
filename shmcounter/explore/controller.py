"""The controller: real processes run a scenario's scripts, one step at a time.

Each process of a scenario is forked once and kept for every schedule. It
registers as its CPU (or claims a writer row: a plain attached process), runs its
part of the scenario's set-up, then installs its PointSlots (points.py), whose
gate parks it before every step. After the set-up the controller copies the whole
arena; each schedule starts from that copy, written back while every process is
idle, so a schedule costs no arena and no process.

The handshake lives in a small shared block (anonymous shared memory, futexes):
per process, GO (bumped by the controller: run to your next point), REP (bumped by
the process: I am parked), KIND (the step it is parked before, or IDLE/ERROR),
its arguments, CMD (what GO means at an idle point: RUN the script of a new
schedule, SERVE a pending drain signal, EXIT), its PID, and SENT and TAKEN (drain
signals sent to it, and taken). Exactly one process runs at a time, so a
schedule is the sequence of processes the controller let run.

Blocking is modelled, never waited for for real:
  - a futex_wait point is enabled only once its word differs from the value it
    waits on (the real wait is skipped: callers loop on their condition);
  - a process at the point "sleep" (the pause of the library's waits, wait.py:
    a lock's live holder, stop_machine, an op to end) is enabled only once a
    word it read since its last write changed, or if no other process can run;
  - the drain signal (SIGDRAIN) is blocked in every process and taken at its
    next point (drain.py's handler runs there, its own steps are points too);
    an idle or blocked process with the signal pending is enabled, to serve it.
"""
from __future__ import annotations

import mmap
import multiprocessing
import os
import signal
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

from .. import drain
from .._atomic import Slots
from ..cpu import register_cpu
from ..drain import SIGDRAIN
from ..segment import H_UNDERFLOWS, PC_USAGE, PC_WORDS, STOCK_NR, STOCK_WORDS
from . import points
from .points import EVERYTHING, FUTEX_WAIT, SLEEP, Footprint

if TYPE_CHECKING:
    from .scenarios import Run, Scenario

# handshake words of one process
GO, REP, KIND, CMD, NARGS, PID, SENT, TAKEN, ARG0 = range(9)
STRIDE = 16                                      # words a process (two lines)
IDLE, ERROR = -1, -2                             # KIND besides a step code
RUN, SERVE, EXIT = 1, 2, 3                       # CMD
_WAIT_US = 1_000_000


class Gate:
    """The process side of the handshake: called before each step (points.py)."""

    def __init__(self, ctl: Slots, index: int) -> None:
        self._ctl = ctl
        self._base = index * STRIDE
        self._go = 0

    def __call__(self, code: int, args: tuple[int, ...]) -> None:
        self.take_signal()
        self.park(code, args)

    def take_signal(self) -> None:
        """Run the drain handler here if SIGDRAIN is pending (it is kept blocked)."""
        ctl, b = self._ctl, self._base
        if ctl.load(b + SENT) != ctl.load(b + TAKEN):
            ctl.store(b + TAKEN, ctl.load(b + SENT))
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {SIGDRAIN})   # the handler runs
            signal.pthread_sigmask(signal.SIG_BLOCK, {SIGDRAIN})

    def park(self, code: int, args: tuple[int, ...] = ()) -> int:
        """Report `code` (a step, IDLE or ERROR) and wait for GO; returns CMD."""
        ctl, b = self._ctl, self._base
        ctl.store(b + KIND, code)
        ctl.store(b + NARGS, len(args))
        for i, a in enumerate(args):
            ctl.store(b + ARG0 + i, a)
        ctl.fetch_add(b + REP, 1)
        ctl.futex_wake(b + REP)
        while (go := ctl.load(b + GO)) == self._go:
            ctl.futex_wait(b + GO, go, _WAIT_US)
        self._go = go
        return ctl.load(b + CMD)


class _Signals:
    """drain.py's `signal` in a process under the explorer: a SIGDRAIN sent to a
    process of the scenario is counted in its SENT word, which the controller
    reads to know that the signal is pending there (it stays blocked until the
    process takes it at its next point, Gate.take_signal)."""

    def __init__(self, ctl: Slots, nprocs: int) -> None:
        self._ctl, self._nprocs = ctl, nprocs

    def __getattr__(self, name: str) -> Any:
        return getattr(signal, name)

    def pidfd_send_signal(self, pidfd: int, sig: int, *args: Any) -> None:
        signal.pidfd_send_signal(pidfd, sig, *args)
        with open(f"/proc/self/fdinfo/{pidfd}") as f:
            pid = next(int(line.split()[1]) for line in f if line.startswith("Pid:"))
        for i in range(self._nprocs):
            if self._ctl.load(i * STRIDE + PID) == pid:
                self._ctl.fetch_add(i * STRIDE + SENT, 1)


def _process(index: int, run: Run, ctl_map: mmap.mmap, conn: Connection) -> None:
    """A process of the scenario, forked from the controller."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {SIGDRAIN})
    # an underflow is reported as a violation; its warning would only be noise
    warnings.filterwarnings("ignore", "page_counter underflow", RuntimeWarning)
    ctl = Slots(ctl_map)
    ctl.store(index * STRIDE + PID, os.getpid())
    arena = run.arena
    spec = run.scenario.procs[index]
    drain.signal = _Signals(ctl, len(run.scenario.procs))  # type: ignore[assignment]
    try:
        if spec.cpu is not None:
            register_cpu(arena, spec.cpu)
        else:
            arena._writer.claim_row()
        ctx = run.context()
        if spec.setup is not None:
            spec.setup(ctx)
        gate = Gate(ctl, index)
        points.install(arena, gate)
        conn.send(None)
    except BaseException:
        conn.send(traceback.format_exc())
        return
    cmd = gate.park(IDLE)
    while cmd != EXIT:
        if cmd == RUN:
            try:
                result = spec.script(ctx)
            except BaseException as e:
                conn.send(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
                cmd = gate.park(ERROR)
                continue
            conn.send(result)
        gate.take_signal()
        cmd = gate.park(IDLE)
    os._exit(0)


@dataclass
class Process:
    """The controller's view of one process."""

    index: int
    cpu: int | None
    pid: int
    conn: Connection
    rep: int = 0
    kind: int = IDLE
    args: tuple[int, ...] = ()
    result: Any = None
    reads: dict[int, int] = field(default_factory=dict)    # read since its last write
    spin: dict[int, int] | None = None          # at "sleep": the words it waits on
    fp: Footprint | None = None                 # its next step's, once computed

    @property
    def name(self) -> str:
        return f"P{self.index}" + (f"(cpu{self.cpu})" if self.cpu is not None else "(plain)")


@dataclass
class Step:
    """One step of a schedule as the trace shows it."""

    proc: int
    code: int
    args: tuple[int, ...]
    read: dict[int, int]                        # word: value before
    wrote: dict[int, tuple[int, int]]           # word: (before, after), changed only


class Violation(Exception):
    """A property broken at a step, or an invariant at quiescence."""

    def __init__(self, invariant: str, detail: str) -> None:
        super().__init__(f"{invariant}: {detail}")
        self.invariant = invariant
        self.detail = detail

    @property
    def key(self) -> str:
        """How a report counts it: the invariant, then the numbers."""
        return self.detail if self.detail.startswith(self.invariant + " ") \
            else f"{self.invariant}: {self.detail}"


Chooser = Callable[["Controller", list[Process], "Process | None"], Process]


class Controller:
    """Forks the scenario's processes, and runs schedules over them."""

    def __init__(self, run: Run) -> None:
        self.run_ = run
        self.arena = arena = run.arena
        scenario: Scenario = run.scenario
        self.scenario = scenario
        n = len(scenario.procs)
        self._map = mmap.mmap(-1, max(n * STRIDE * 8, mmap.PAGESIZE))
        self.ctl = Slots(self._map)
        self.procs: list[Process] = []
        ctx = multiprocessing.get_context("fork")
        self._children: list[Any] = []
        try:
            for i, spec in enumerate(scenario.procs):
                ours, theirs = ctx.Pipe()
                child = ctx.Process(target=_process, args=(i, run, self._map, theirs),
                                    daemon=True)
                child.start()
                theirs.close()
                self._children.append(child)
                proc = Process(i, spec.cpu, child.pid or 0, ours)
                self.procs.append(proc)
                error = ours.recv()                 # its set-up, in order
                if error is not None:
                    raise RuntimeError(f"{proc.name} failed in set-up:\n{error}")
                self._wait_report(proc)
        except BaseException:
            self.close()
            raise
        self.snapshot = arena._bytes.copy()
        self.readers: dict[int, int] = {}           # word: bitmask of processes
        self.writers: dict[int, int] = {}
        self.grew = False
        self.max_steps = 4000
        self.steps = 0                              # steps run, every schedule
        self.prune = True                           # False: a preemption before every step
        self.stuck = False                          # a schedule left a process mid-script
        # seconds spent, by part of a schedule (README: where the time goes)
        self.timing = dict.fromkeys(("restore", "start", "choose", "step", "footprint",
                                     "checks", "quiescent"), 0.0)

    # ---- the handshake --------------------------------------------------------

    def _release(self, proc: Process, cmd: int = 0) -> None:
        b = proc.index * STRIDE
        self.ctl.store(b + CMD, cmd)
        self.ctl.fetch_add(b + GO, 1)
        self.ctl.futex_wake(b + GO)
        self._wait_report(proc)

    def _wait_report(self, proc: Process) -> None:
        ctl, b = self.ctl, proc.index * STRIDE
        while (rep := ctl.load(b + REP)) == proc.rep:
            if not ctl.futex_wait(b + REP, rep, _WAIT_US) and not self._alive(proc):
                raise RuntimeError(f"{proc.name} (pid {proc.pid}) died")
        proc.rep = rep
        proc.kind = ctl.load(b + KIND)
        proc.args = tuple(ctl.load(b + ARG0 + i) for i in range(ctl.load(b + NARGS)))
        proc.fp = None

    def _alive(self, proc: Process) -> bool:
        return bool(self._children[proc.index].is_alive())

    def close(self) -> None:
        """Every process ends: asked to at an idle point, killed elsewhere (a
        schedule left halfway by an error)."""
        for proc, child in zip(self.procs, self._children, strict=False):
            if not child.is_alive():
                continue
            if proc.kind in (IDLE, ERROR):
                b = proc.index * STRIDE
                self.ctl.store(b + CMD, EXIT)
                self.ctl.fetch_add(b + GO, 1)
                self.ctl.futex_wake(b + GO)
            else:
                child.kill()
        for child in self._children:
            child.join(5)
            if child.is_alive():
                child.kill()
                child.join()
        for proc in self.procs:
            proc.conn.close()

    # ---- one schedule -----------------------------------------------------------

    def pending(self, proc: Process) -> bool:
        """Has SIGDRAIN been sent to this process and not taken yet?"""
        b = proc.index * STRIDE
        return self.ctl.load(b + SENT) != self.ctl.load(b + TAKEN)

    def enabled(self) -> list[Process]:
        """The processes that may take the next step (a spinner only if none other)."""
        ready: list[Process] = []
        spinning: list[Process] = []
        load = self.arena._slots.load
        for proc in self.procs:
            if proc.kind in (IDLE, ERROR):
                if proc.kind == IDLE and self.pending(proc):
                    ready.append(proc)
            elif proc.kind == FUTEX_WAIT and load(proc.args[0]) == proc.args[1]:
                if self.pending(proc):
                    ready.append(proc)
            elif proc.kind == SLEEP and proc.spin is not None and all(
                    load(w) == v for w, v in proc.spin.items()):
                (ready if self.pending(proc) else spinning).append(proc)
            else:
                ready.append(proc)
        return ready or spinning

    def footprint(self, proc: Process) -> Footprint:
        """The footprint of proc's next step (once per step: the words are read now)."""
        if proc.fp is None:
            proc.fp = points.footprint(self.arena, proc.kind, proc.args, proc.cpu)
        return proc.fp

    def visible(self, proc: Process) -> bool:
        """May proc's next step conflict with a step of another process? As far as
        every schedule run so far shows (strategies.py: the passes)."""
        if not self.prune or proc.kind < 0 or proc.kind == FUTEX_WAIT:
            return True
        reads, writes = self.footprint(proc)
        others = ~(1 << proc.index)
        if EVERYTHING in reads:
            return True
        return (any(self.writers.get(w, 0) & others for w in reads)
                or any((self.readers.get(w, 0) | self.writers.get(w, 0)) & others
                       for w in writes))

    def _learn(self, proc: Process, fp: Footprint) -> None:
        bit = 1 << proc.index
        for table, words in ((self.readers, fp[0]), (self.writers, fp[1])):
            for w in words:
                old = table.get(w, 0)
                if not old & bit:
                    table[w] = old | bit
                    touched = self.readers.get(w, 0) | self.writers.get(w, 0)
                    if touched & (touched - 1) and self.writers.get(w, 0):
                        self.grew = True

    def run(self, choose: Chooser, trace: list[Step] | None = None
            ) -> tuple[list[int], list[Violation], bytes]:
        """One schedule from the snapshot: choose(controller, enabled, current)
        picks each step's process. Returns the processes chosen, the violations
        (per-step properties, then the invariants at quiescence) and the final
        state (for counting distinct ones)."""
        arena, slots, timing, clock = self.arena, self.arena._slots, self.timing, time.perf_counter
        t0 = clock()
        arena._bytes[:] = self.snapshot
        t1 = clock()
        for proc in self.procs:
            proc.result, proc.reads, proc.spin = None, {}, None
            self._release(proc, RUN)
            self._collect(proc)
        t2 = clock()
        timing["restore"] += t1 - t0
        timing["start"] += t2 - t1
        chosen: list[int] = []
        violations: list[Violation] = []
        cur: Process | None = None
        while True:
            t0 = clock()
            ready = self.enabled()
            if not ready:
                break
            if len(chosen) >= self.max_steps:
                violations.append(Violation("progress", f"no end after {self.max_steps} "
                                            f"steps (a livelock)"))
                break
            proc = choose(self, ready, cur)
            self.steps += 1
            chosen.append(proc.index)
            cur = proc
            t1 = clock()
            timing["choose"] += t1 - t0
            if proc.kind < 0:                      # serve a pending drain signal
                self._release(proc, SERVE)
                self._collect(proc)
                timing["step"] += clock() - t1
                continue
            fp = self.footprint(proc)
            words = set(fp[0]) | set(fp[1])
            words.discard(EVERYTHING)
            before = {w: slots.load(w) for w in words}
            code, args = proc.kind, proc.args
            t2 = clock()
            self._release(proc)
            t3 = clock()
            self._learn(proc, fp)
            wrote = {w: (v, a) for w, v in before.items() if (a := slots.load(w)) != v}
            self._note_reads(proc, before, fp, wrote)
            if trace is not None:
                trace.append(Step(proc.index, code, args,
                                  {w: before[w] for w in fp[0] if w in before}, wrote))
            self._collect(proc)
            t4 = clock()
            if wrote:
                violations += self._step_properties(wrote)
            timing["footprint"] += (t2 - t1) + (t4 - t3)
            timing["step"] += t3 - t2
            timing["checks"] += clock() - t4
        t0 = clock()
        for proc in self.procs:
            if proc.kind not in (IDLE, ERROR):
                self.stuck = True
                violations.append(Violation("deadlock", f"{proc.name} waits forever at "
                                            f"{points.STEPS[proc.kind]}"
                                            f"({self._args(proc.args)})"))
        if not self.stuck:
            violations += self._quiescent()
        state = arena.records[:arena._published()].tobytes() + arena.stocks.tobytes()
        timing["quiescent"] += clock() - t0
        return chosen, violations, state

    def _collect(self, proc: Process) -> None:
        """proc just reported IDLE or ERROR after running: take what it sent."""
        if proc.kind in (IDLE, ERROR) and proc.conn.poll():
            proc.result = proc.conn.recv()

    def _note_reads(self, proc: Process, before: dict[int, int], fp: Footprint,
                    wrote: dict[int, Any]) -> None:
        """Keep the words proc read since its last write; at a "sleep" point, it
        waits until one of them changes (Process.spin)."""
        if wrote:
            proc.reads = {}
        else:
            for w in fp[0]:
                proc.reads.setdefault(w, before[w])
        proc.spin = dict(proc.reads) if proc.kind == SLEEP else None

    # ---- checks -------------------------------------------------------------------

    def _step_properties(self, wrote: dict[int, tuple[int, int]]) -> list[Violation]:
        """What must hold after every step, on the words it wrote: no usage and no
        (locked) stock below 0, no uncharge below 0 (arena.underflows)."""
        arena, found = self.arena, []
        c0, s0 = arena._counters_slot, arena._stocks_slot
        for w, (_, value) in wrote.items():
            if w == H_UNDERFLOWS:
                found.append(Violation("underflow", f"an uncharge went below 0 "
                                       f"(arena.underflows = {value})"))
            elif value >= 0:
                continue
            usage = (c0 <= w < c0 + arena.max_counters * PC_WORDS
                     and (w - c0) % PC_WORDS == PC_USAGE)
            stock = (s0 <= w < s0 + arena.ncpus * arena._stock_block_words
                     and (w - s0) % arena._stock_block_words % STOCK_WORDS == STOCK_NR)
            if usage or stock:
                found.append(Violation("I2", f"{points.word_name(arena, w)} is {value} < 0"))
        return found

    def _quiescent(self) -> list[Violation]:
        """check_invariants against the scenario's ledger, and every process ended."""
        from ..invariants import InvariantError, check_invariants
        found = []
        for proc in self.procs:
            if proc.kind == ERROR:
                first = str(proc.result).splitlines()[0]
                found.append(Violation("error", f"{proc.name} raised {first}"))
        ledger = self.run_.ledger([proc.result for proc in self.procs])
        try:
            check_invariants(self.arena, ledger, forced=self.scenario.forced,
                             batch=self.scenario.batch)
        except InvariantError as e:
            for line in str(e).splitlines():
                found.append(Violation(line.split(" ", 1)[0], line))
        return found

    def _args(self, args: tuple[int, ...]) -> str:
        return ", ".join(points.word_name(self.arena, a) if i == 0 else str(a)
                         for i, a in enumerate(args))
