"""Corruption fuzzing: one hostile word in a live arena, then the public API from a
fresh process.

The world, built once and snapshotted (the whole segment):
  - a page counter tree of 4 levels, r > a > a1, a2 and r > b > b1 > b2, with
    per-CPU stock on a, a1, a2 and b2;
  - a legacy memcg tree, root > g1, g2, g3, with pages cached in the CPUs' 7 slots;
  - CPUs 0 and 1: live processes holding stock of every stocked counter and of
    the legacy slots, serving drains; CPU 2: killed inside a charge op (its intent
    record names its stock slot of a1); CPU 3: never used (the driver registers
    as it);
  - a non-CPU writer killed inside an uncharge op, one level up its path;
  - a bystander process that counts the drain signals it gets; its pid, the
    fuzzer's and the dead CPU's are among the hostile values.

A try restores the snapshot, writes one hostile value into one live word (header,
writer rows with their intent records, counter records, stock owners and slots,
contributions, drain requests and their summary, name bytes, memcg header, cgroup
records, legacy per-CPU blocks), then runs the driver in a fresh process with a
hard timeout. The driver is forked by a zygote that imported the library but
never opened an arena.
Its steps: attach; look every counter up; charge and uncharge as a plain writer;
register as CPU 3 and charge from its stock, drain it; hotplug_cpu_dead(2);
drain_stock; the memcg tree (charge, kmem uncharge, drain_all_stock,
wait_flushed); check_invariants; unregister and close. A step that raises is
classified and the driver goes on with the next.

The outcome of a try: a crash (the driver or a live CPU killed by a signal), a
hang (the driver at the hard timeout, or a live CPU that stopped answering; the
world is then rebuilt), or a foreign exception
(any step, or a live CPU serving the driver's drains), worst first; else an
ArenaCorrupt anywhere (a live CPU's refusal shows up in the driver as the
timeout of its drain: the refusal is what happened); else a timeout (WaitTimeout,
DrainTimeout, wait_flushed's TimeoutError); else another error of ours (other
ArenaErrors, check_invariants' InvariantError); else "no effect / operation
succeeded". A drain signal that reaches the bystander or the fuzzer is counted
apart.

    from procs.lab.corruption import fuzz
    report = fuzz(iterations=200, seed=1)
    print(report.table())
"""
from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection
import os
import random
import signal
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

import shmcounter
from shmcounter import Arena, errors, hooks, segment
from shmcounter.drain import SIGDRAIN
from shmcounter.invariants import InvariantError, check_invariants
from shmcounter.memcg import Cgroups
from shmcounter.memcg.legacy import (
    MC_DRAIN_IDX,
    MC_EVICTIONS,
    MC_FLUSHES,
    MC_FLUSHING,
    MC_LOCK,
    MC_OVERFLOWS,
    MC_SLOTS,
    NR_MEMCG_STOCK,
)
from shmcounter.memcg.section import (
    CG_EVENTS_MAX,
    CG_EVENTS_MAX_LOCAL,
    CG_MEMSW,
    CG_STATE,
    CG_WORDS,
    M_BATCH,
    M_EVICTION,
    M_FIRST_CHILD_DRAIN,
    M_MEMSW,
    M_ROOT,
    M_STATE,
    M_STOCK_CAP,
    M_VARIANT,
)
from shmcounter.segment import (
    H_DRAIN_LOCK,
    H_NCOUNTERS,
    H_REGISTRY_LOCK,
    H_STOP,
    H_UNDERFLOWS,
    MAX_DEPTH,
    NAME_BYTES,
    PC_WORDS,
    R_BASE,
    R_COUNTER,
    R_DEPTH,
    R_DONE_SEQ,
    R_FWD_DELTA,
    R_FWD_LEVELS,
    R_IN_OP,
    R_OP,
    R_PID,
    R_REQ_SEQ,
    R_START,
    R_STOCK_AFTER,
    R_STOCK_BEFORE,
    R_STOCK_BLOCK,
    R_STOCK_SLOT,
    R_WALKS,
    STOCK_LOCK,
    STOCK_NR,
)

CRASH = "crash (signal)"
HANG = "hang"
FOREIGN = "foreign exception"
TIMEOUT = "timeout error"
CORRUPT = "clean error ArenaCorrupt"
OURS = "clean error, another of ours"
NO_EFFECT = "no effect / operation succeeded"
OUTCOMES = (CORRUPT, OURS, TIMEOUT, NO_EFFECT, FOREIGN, CRASH, HANG)
_FAILURES = (CRASH, HANG, FOREIGN)            # worst first

# the world
NCPUS, LIVE_CPUS, DEAD_CPU, FREE_CPU = 4, (0, 1), 2, 3
TREE = (("r", None), ("a", "r"), ("a1", "a"), ("a2", "a"), ("b", "r"), ("b1", "b"),
        ("b2", "b1"))
STOCKED = ("a", "a1", "a2", "b2")
BATCH = 16
CGROUPS = ("g1", "g2", "g3")
INT64_MIN, INT64_MAX = -2**63, 2**63 - 1

_COUNTER_FIELDS = {getattr(segment, n): n[3:].lower() for n in dir(segment)
                   if n.startswith("PC_") and n != "PC_WORDS" and not n.startswith("PC_FLAG_")}
_ROW_FIELDS = {R_PID: "pid", R_DONE_SEQ: "done_seq", R_STOCK_BLOCK: "stock_block",
               R_START: "start", R_WALKS: "walks", R_REQ_SEQ: "req_seq", R_IN_OP: "in_op",
               R_OP: "op", R_COUNTER: "counter", R_STOCK_SLOT: "stock_slot",
               R_STOCK_BEFORE: "stock_before", R_DEPTH: "depth", R_FWD_LEVELS: "fwd_levels",
               R_FWD_DELTA: "fwd_delta", R_STOCK_AFTER: "stock_after",
               **{R_BASE + d: f"base[{d}]" for d in range(MAX_DEPTH)}}
_HEADER_FIELDS = {0: "magic", 1: "version", 2: "ncpus", 3: "max_counters",
                  4: "max_stocked", 5: "creator_pid", 6: "creator_start", 7: "size",
                  H_NCOUNTERS: "ncounters", H_REGISTRY_LOCK: "registry_lock",
                  H_UNDERFLOWS: "underflows", 11: "max_writers", H_DRAIN_LOCK: "drain_lock",
                  H_STOP: "stop"}
_MEMCG_FIELDS = {M_STATE: "state", M_VARIANT: "variant", M_MEMSW: "memsw",
                 M_EVICTION: "eviction", M_BATCH: "batch", M_ROOT: "root",
                 M_FIRST_CHILD_DRAIN: "first_child_drain", M_STOCK_CAP: "stock_cap"}
_CGROUP_FIELDS = {CG_STATE: "state", CG_MEMSW: "memsw", CG_EVENTS_MAX: "events_max",
                  CG_EVENTS_MAX_LOCAL: "events_max_local"}
_MC_FIELDS = {MC_FLUSHING: "flushing", MC_LOCK: "lock", MC_DRAIN_IDX: "drain_idx",
              MC_EVICTIONS: "evictions", MC_OVERFLOWS: "overflows", MC_FLUSHES: "flushes",
              **{MC_SLOTS + i: f"slot[{i}]" for i in range(NR_MEMCG_STOCK)}}


def classify(exc: BaseException) -> str:
    """The outcome class of an exception raised by the public API."""
    corrupt = getattr(errors, "ArenaCorrupt", None)
    wait = getattr(errors, "WaitTimeout", None)
    if corrupt is not None and isinstance(exc, corrupt):
        return CORRUPT
    if isinstance(exc, (errors.DrainTimeout, TimeoutError)) or (
            wait is not None and isinstance(exc, wait)):
        return TIMEOUT
    if isinstance(exc, (errors.ArenaError, InvariantError)) or (
            isinstance(exc, OverflowError) and str(exc).startswith("charging ")):
        return OURS                 # the latter: the documented error of a usage at 2**63
    return FOREIGN


# ---- what a try writes -----------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """One live word (or name byte) of the segment and the hostile values for it."""
    label: str                      # e.g. "row 2.depth", "counter 3 (a1).parent"
    offset: int                     # byte offset in the segment
    values: tuple[Any, ...]         # ints for words; bytes for name bytes

    def write(self, buf: np.ndarray, value: Any) -> None:
        """Write `value` into `buf`, the segment's bytes."""
        raw = value if isinstance(value, bytes) else value.to_bytes(8, "little", signed=True)
        buf[self.offset:self.offset + len(raw)] = np.frombuffer(raw, np.uint8)


def targets(arena: Arena, pids: dict[str, int]) -> list[Target]:
    """Every live word of the world, each with its hostile values: 0, -1, 1, a huge
    value, INT64_MIN/MAX, small out-of-range indexes, a self-reference (the
    entity's own index, the word's own slot), and live or dead pids (the bystander,
    the fuzzer, the dead CPU, CPU 0). A row's pid word, which drains signal, gets
    no small number: it could be the pid of a process that is not ours. Name
    bytes get bytes that make the name invalid (not UTF-8, NUL first or inside),
    and each name the next one's (a duplicate)."""
    n = arena._published()
    geometry = (n, arena.max_counters, arena.ncpus, arena.nrows, arena.max_stocked)
    out: list[Target] = []

    def add(label: str, slot: int, own: int, pid_word: bool = False) -> None:
        values = {0, -1, 2**40, INT64_MIN, INT64_MAX, *pids.values()}
        if not pid_word:            # small numbers may be pids of processes not ours
            values |= {1, own, slot, *geometry}
        out.append(Target(label, slot * 8, tuple(sorted(values))))

    for word, name in _HEADER_FIELDS.items():
        add(f"header.{name}", word, 0)
    rows = [r for r in range(arena.nrows) if r < arena.ncpus or arena.rows[r, R_PID]]
    for row in rows:
        for word, name in _ROW_FIELDS.items():
            add(f"row {row}.{name}", arena._row_slot(row) + word, row, word == R_PID)
    names = [c.name for c in arena.counters()]
    for index in range(n):
        for word, name in _COUNTER_FIELDS.items():
            add(f"counter {index} ({names[index]}).{name}",
                arena._counters_slot + index * PC_WORDS + word, index)
    owners = (arena.stock_owner.ctypes.data - arena._bytes.ctypes.data) // 8
    for sid in range(arena.max_stocked):
        add(f"stock_owner[{sid}]", owners + sid, sid)
    sids = sorted(int(s) for s in arena.records[:n, segment.PC_STOCK_ID] if s >= 0)
    for cpu in range(arena.ncpus):
        for sid in sids:
            slot = arena._stock_slot(cpu, sid)
            add(f"stock[{cpu}][{sid}].nr", slot + STOCK_NR, sid)
            add(f"stock[{cpu}][{sid}].lock", slot + STOCK_LOCK, sid)
    for row in rows:
        for index in range(n):
            add(f"contrib[{row}][{index}]", arena._contrib_slot(row, index), index)
    for cpu in range(arena.ncpus):
        for index in range(n):
            add(f"requests[{cpu}][{index}]", arena._request_slot(cpu, index), index)
        for word in range(arena.request_summary.shape[1]):
            add(f"request_summary[{cpu}][{word}]", arena._summary_slot(cpu, word), word)
    names_offset = arena.names.ctypes.data - arena._bytes.ctypes.data
    for index, name in enumerate(names):
        size = len(name.encode())
        for at in range(min(size + 1, NAME_BYTES)):
            # A NUL at the last byte would leave a shorter valid name: a rename,
            # which no check can tell from a real name. NUL first or inside cannot.
            nul = (b"\0",) if at < size - 1 else ()
            out.append(Target(f"names[{index}] ({name}) byte {at}",
                              names_offset + index * NAME_BYTES + at,
                              (*nul, b"\xff", b"\x80")))
        other = names[(index + 1) % n].encode()           # a duplicate name
        out.append(Target(f"names[{index}] ({name}) := {names[(index + 1) % n]!r}",
                          names_offset + index * NAME_BYTES,
                          (other + bytes(NAME_BYTES - len(other)),)))
    for word, name in _MEMCG_FIELDS.items():
        add(f"memcg.{name}", arena._memcg.slot + word, 0)
    for index in range(n):
        if arena._memcg.cgroups[index, CG_STATE]:
            for word, name in _CGROUP_FIELDS.items():
                add(f"cgroup {index} ({names[index]}).{name}",
                    arena._memcg.cgroups_slot + index * CG_WORDS + word, index)
    for cpu in range(arena.ncpus):
        for word, name in _MC_FIELDS.items():
            add(f"memcg_cpu {cpu}.{name}", arena._memcg.cpu_slot(cpu) + word, cpu)
    return out


# ---- the processes of the world ------------------------------------------------------

def _watch_owner(owner: int) -> None:
    """Exit when the fuzzer dies, whatever kills it."""
    try:
        fd = os.pidfd_open(owner)
    except ProcessLookupError:
        os._exit(1)

    def watch() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {SIGDRAIN})
        multiprocessing.connection.wait([fd])
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=watch, daemon=True).start()


def _fill_stock(arena: Arena) -> None:
    """Charge a page to every stocked counter and every cgroup: batch - 1 pages stay
    in this CPU's stock of each, 63 in its legacy slot of each cgroup."""
    for name in STOCKED:
        arena.counter(name).try_charge(1)
    cg = Cgroups.open(arena)
    for name in CGROUPS:
        cg.cgroup(name).try_charge(1)


def _cpu_main(name: str, cpu: int, owner: int, timeout: float, conn: Any) -> None:
    """A live CPU of the world: fill its stocks, then serve drains until told to stop.
    What its drain handler raises is kept and reported at the next ping."""
    _watch_owner(owner)
    warnings.simplefilter("ignore")
    arena = Arena.attach(name)
    arena.drain_timeout = arena.wait_timeout = timeout
    shmcounter.register_cpu(arena, cpu)
    arena.counters()                                  # every handle, built once
    _fill_stock(arena)
    raised: list[tuple[str, str]] = []
    conn.send(("ready", os.getpid()))
    while True:
        try:
            if not conn.poll(0.05):
                continue
            # no drain handler inside a half-read message
            signal.pthread_sigmask(signal.SIG_BLOCK, {SIGDRAIN})
            try:
                msg = conn.recv()
                if msg == "ping":
                    conn.send(raised)
                    raised = []
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {SIGDRAIN})
        except BaseException as exc:                  # raised by the drain handler
            raised.append((classify(exc), f"{type(exc).__name__}: {exc}"[:300]))


def _victim_cpu_main(name: str, cpu: int, owner: int) -> None:
    """CPU `cpu`: fill its stocks, drain a1's, then stop inside a1's next charge,
    after the greedy batch is charged and before the surplus is deposited."""
    _watch_owner(owner)
    arena = Arena.attach(name)
    shmcounter.register_cpu(arena, cpu)
    _fill_stock(arena)
    a1 = arena.counter("a1")
    a1.drain_stock_local()
    hooks.install("charge:deposit", lambda point: os.kill(os.getpid(), signal.SIGSTOP))
    a1.try_charge(1)


def _victim_writer_main(name: str, owner: int) -> None:
    """A plain writer: charge b2, then stop inside the uncharge, b2 done, b1 next."""
    _watch_owner(owner)
    arena = Arena.attach(name)
    b2 = arena.counter("b2")
    b2.charge(10)
    hooks.install("uncharge:level", lambda point: os.kill(os.getpid(), signal.SIGSTOP))
    b2.uncharge(10)


def _bystander_main(owner: int, conn: Any) -> None:
    """Counts the drain signals it gets; answers each ping with the count."""
    _watch_owner(owner)
    got = [0]
    signal.signal(SIGDRAIN, lambda signum, frame: got.__setitem__(0, got[0] + 1))
    while True:
        if conn.poll(0.05):
            conn.recv()
            conn.send(got[0])


# ---- the driver: the public API from a fresh process ---------------------------

def _drive(name: str, timeout: float, out: Any) -> None:
    """Drive the public API on arena `name`; send (step, outcome, error) per step."""
    warnings.simplefilter("ignore")
    state: dict[str, Any] = {}

    def step(label: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except BaseException as exc:
            out.send((label, classify(exc), f"{type(exc).__name__}: {exc}"[:300]))
        else:
            out.send((label, NO_EFFECT, ""))

    def attach() -> None:
        arena = state["arena"] = Arena.attach(name)
        arena.drain_timeout = arena.wait_timeout = timeout

    def lookup() -> None:
        arena = state["arena"]
        arena.counters()
        for node, _ in TREE:
            arena.counter(node)

    def plain_writer() -> None:
        arena = state["arena"]
        a1, b2 = arena.counter("a1"), arena.counter("b2")
        a1.try_charge(5)
        a1.uncharge(5)
        b2.charge(2)
        b2.uncharge(2)

    def register() -> None:
        shmcounter.register_cpu(state["arena"], FREE_CPU)
        state["cpu"] = True

    def stock() -> None:
        a1 = state["arena"].counter("a1")
        a1.try_charge(1)                              # a miss: BATCH charged, 15 kept
        a1.try_charge(1)                              # a hit
        a1.drain_stock_local()
        a1.uncharge(2)

    def hotplug() -> None:
        state["arena"].hotplug_cpu_dead(DEAD_CPU)

    def drain() -> None:
        arena = state["arena"]
        arena.counter("a1").drain_stock()
        arena.counter("b2").drain_stock(trylock=True)

    def memcg() -> None:
        cg = Cgroups.open(state["arena"])
        g1 = cg.cgroup("g1")
        g1.try_charge(3)
        g1.uncharge(1, kmem=True)
        g1.uncharge(2)
        cg.drain_all_stock(cg.root)
        cg.wait_flushed(timeout)

    def invariants() -> None:
        check_invariants(state["arena"])

    def close() -> None:
        shmcounter.unregister_cpu()
        state["arena"].close()

    step("attach", attach)
    if "arena" not in state:
        return
    for label, fn in (("lookup", lookup), ("plain writer", plain_writer),
                      ("register", register), ("stock", stock), ("hotplug", hotplug),
                      ("drain", drain), ("memcg", memcg), ("invariants", invariants),
                      ("close", close)):
        if label == "stock" and "cpu" not in state:
            continue
        step(label, fn)


def _zygote_main(owner: int, conn: Any) -> None:
    """Fork a driver per request (arena name, timeouts); reply (status, steps) with
    status "exit", "signal N" or "hang" (killed at the hard timeout)."""
    _watch_owner(owner)
    while True:
        msg = conn.recv()
        if msg is None:
            return
        name, timeout, hard_timeout = msg
        reader, writer = mp.Pipe(duplex=False)
        pid = os.fork()
        if pid == 0:
            try:
                reader.close()
                _watch_owner(os.getppid())
                _drive(name, timeout, writer)
            finally:
                os._exit(0)
        writer.close()
        steps: list[tuple[str, str, str]] = []
        deadline = time.monotonic() + hard_timeout
        status = "hang"
        while time.monotonic() < deadline:
            _collect(reader, steps, 0.01)
            done, code = os.waitpid(pid, os.WNOHANG)
            if done:
                status = f"signal {-os.waitstatus_to_exitcode(code)}" \
                    if os.WIFSIGNALED(code) else "exit"
                break
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        _collect(reader, steps, 0)
        reader.close()
        conn.send((status, steps))


def _collect(reader: Any, steps: list, wait: float) -> None:
    try:
        while reader.poll(wait):
            steps.append(reader.recv())
            wait = 0
    except (EOFError, OSError):
        pass


# ---- the fuzzer ---------------------------------------------------------------------

@dataclass
class Try:
    target: str
    value: Any
    outcome: str
    detail: str                     # the step and error that decided it

    def __str__(self) -> str:
        value = self.value.rstrip(b"\0") if isinstance(self.value, bytes) else self.value
        return f"{self.outcome}: {self.target} = {value!r}" + (
            f": {self.detail}" if self.detail else "")


@dataclass
class Report:
    tries: list[Try] = field(default_factory=list)
    signalled: int = 0              # tries after which a bystander got a drain signal
    rebuilds: int = 0
    seconds: float = 0.0

    @property
    def counts(self) -> Counter:
        return Counter(t.outcome for t in self.tries)

    def table(self) -> str:
        counts = self.counts
        lines = [f"{len(self.tries)} corruptions tried in {self.seconds:.1f} s "
                 f"({self.rebuilds} rebuilds of the world)", ""]
        width = max(len(o) for o in OUTCOMES)
        for outcome in OUTCOMES:
            lines.append(f"  {outcome:<{width}}  {counts[outcome]:6d}")
        lines.append(f"  {'signal to a bystander':<{width}}  {self.signalled:6d}")
        bad = [t for t in self.tries if t.outcome in _FAILURES]
        if bad:
            lines += ["", "failures (first 30):"]
            lines += [f"  {t}" for t in bad[:30]]
        return "\n".join(lines)


class World:
    """The arena and its processes (see the module docstring)."""

    def __init__(self, timeout: float) -> None:
        self.ctx = mp.get_context("forkserver")
        self.timeout = timeout
        self.procs: list[Any] = []
        me = os.getpid()
        self.arena = arena = Arena.create(ncpus=NCPUS, max_counters=16, max_stocked=8,
                                          max_writers=4)
        try:
            for node, parent in TREE:
                arena.new_counter(node, None if parent is None else arena.counter(parent),
                                  max=100_000)
            for node in STOCKED:
                arena.counter(node).enable_stock(BATCH)
            cg = Cgroups(arena, variant="legacy")
            for node in CGROUPS:
                cg.create(node, max=50_000)
            self.bystander, bystander = self._start(_bystander_main, me)
            self.cpus = {cpu: self._start(_cpu_main, arena.name, cpu, me, timeout)
                         for cpu in LIVE_CPUS}
            dead_cpu = self._kill_parked(_victim_cpu_main, arena.name, DEAD_CPU, me)
            self._kill_parked(_victim_writer_main, arena.name, me)
            self.zygote = self._start(_zygote_main, me)[0]
            self.pids = {"bystander": bystander.pid, "fuzzer": me, "dead": dead_cpu,
                         "cpu 0": self.cpus[0][1].pid}
            self.targets = targets(arena, self.pids)
            self.snapshot = arena._bytes.copy()
        except BaseException:
            self.close()
            raise

    def _start(self, fn: Callable, *args: Any) -> tuple[Any, Any]:
        """Start fn(*args, conn) in a process; (our end of conn, the process)."""
        here, there = self.ctx.Pipe()
        p = self.ctx.Process(target=fn, args=(*args, there), daemon=True)
        p.start()
        self.procs.append(p)
        there.close()
        if fn is _cpu_main:
            if not here.poll(60):
                raise RuntimeError(f"CPU {args[1]} did not start")
            assert here.recv()[0] == "ready"
        return here, p

    def _kill_parked(self, fn: Callable, *args: Any) -> int:
        """Start a victim, wait until it has stopped itself inside its op, kill it."""
        p = self.ctx.Process(target=fn, args=args, daemon=True)
        p.start()
        pid = p.pid
        assert pid is not None                    # started
        deadline = time.monotonic() + 60
        while _state(pid) not in ("T", "t"):
            if time.monotonic() > deadline or not p.is_alive():
                raise RuntimeError(f"{fn.__name__} did not park (exit {p.exitcode})")
            time.sleep(0.001)
        os.kill(pid, signal.SIGKILL)
        p.join()
        return pid

    def restore(self) -> None:
        self.arena._bytes[:] = self.snapshot

    def drive(self, hard_timeout: float) -> tuple[str, list[tuple[str, str, str]]]:
        self.zygote.send((self.arena.name, self.timeout, hard_timeout))
        if not self.zygote.poll(hard_timeout + 30):
            raise RuntimeError("the zygote did not answer")
        return self.zygote.recv()

    def ping(self) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
        """What the live CPUs raised since the last ping, and the CPUs that are lost:
        (CRASH, what) for one a signal killed, (HANG, what) for one that did not
        answer within 3 s."""
        raised, lost = [], []
        for cpu, (conn, p) in self.cpus.items():
            try:
                conn.send("ping")
                if conn.poll(3):
                    raised += [(outcome, f"CPU {cpu}: {what}") for outcome, what in conn.recv()]
                    continue
            except (OSError, EOFError):
                pass
            p.join(0.1)
            if p.exitcode is not None and p.exitcode < 0:
                lost.append((CRASH, f"CPU {cpu} killed by signal {-p.exitcode}"))
            else:
                lost.append((HANG, f"CPU {cpu} did not answer a ping (exit {p.exitcode})"))
        return raised, lost

    def signals(self) -> int:
        self.bystander.send("count")
        return self.bystander.recv() if self.bystander.poll(3) else -1

    def close(self) -> None:
        for p in self.procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(10)
        self.arena.close()
        self.arena.unlink()


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return "X"
    return chr(stat[stat.rindex(b")") + 2])


def _decide(status: str, steps: list[tuple[str, str, str]],
            cpu_raised: list[tuple[str, str]], lost: list[tuple[str, str]]) -> tuple[str, str]:
    """(outcome, detail) of one try; see the module docstring."""
    if status.startswith("signal"):
        last = steps[-1][0] if steps else "attach"
        return CRASH, f"driver killed by {status} after step {last!r}"
    for outcome, what in sorted(lost):              # "crash (signal)" < "hang"
        return outcome, what
    if status == "hang":
        return HANG, f"driver at the hard timeout after {[s[0] for s in steps]}"
    found = [(outcome, f"{label}: {error}") for label, outcome, error in steps] + [
        (outcome, what) for outcome, what in cpu_raised]
    for first in (FOREIGN, CORRUPT, TIMEOUT, OURS):
        for outcome, detail in found:
            if outcome == first:
                return outcome, detail
    return NO_EFFECT, ""


def fuzz(iterations: int, seed: int = 0, *, timeout: float = 0.5,
         hard_timeout: float = 15.0, progress: bool = False) -> Report:
    """Corrupt one word `iterations` times (random target and value, from `seed`)
    and classify each outcome. `timeout`: the drain and wait timeouts of the driver
    and of the live CPUs (seconds); `hard_timeout`: when the driver is a hang."""
    rng = random.Random(seed)
    report = Report()
    start = time.monotonic()
    old = signal.signal(SIGDRAIN, _count_own_signal)
    world = World(timeout)
    seen = 0
    try:
        for i in range(iterations):
            target = rng.choice(world.targets)
            value = rng.choice(target.values)
            world.restore()
            _own_signals[0] = 0
            target.write(world.arena._bytes, value)
            status, steps = world.drive(hard_timeout)
            cpu_raised, lost = world.ping()
            if not os.path.exists(f"/dev/shm/{world.arena.name}"):
                raise RuntimeError(f"the segment is gone after {target.label} = {value!r}")
            outcome, detail = _decide(status, steps, cpu_raised, lost)
            report.tries.append(Try(target.label, value, outcome, detail))
            got = world.signals()
            if got != seen or _own_signals[0]:
                report.signalled += 1
                seen = got
            if progress:
                print(f"{i + 1:5d} {report.tries[-1]}", flush=True)
            if lost or got < 0:
                world.close()
                world = World(timeout)
                seen = 0
                report.rebuilds += 1
    finally:
        world.close()
        signal.signal(SIGDRAIN, old)
    report.seconds = time.monotonic() - start
    return report


_own_signals = [0]


def _count_own_signal(signum: int, frame: object) -> None:
    _own_signals[0] += 1
