"""Hotplug torture: random SIGKILLs of CPU processes charging a limited tree.

Three designs of the per-CPU charge stock (`design`):

  page_counter  counters with the series' per-counter stock: a 3-level tree of 7
                counters; CPUs try_charge, uncharge and drain_stock on 4 leaves.
  v4            the same tree with the lockless stock (enable_stock(lockless=True)):
                a CPU's hit and deposit are CASes on its word; drain_stock, by a CPU
                or by the requester (a plain process attached to the arena, not a
                CPU, looping drain_stock), takes every CPU's word remotely under
                the drain lock. The requester is a victim too, like a CPU.
  legacy        a shmcounter.memcg Cgroups tree of the old design, 7 slots per CPU:
                a 3-level tree of 14 cgroups, 10 leaves (more than 7, so that every
                CPU evicts constantly); CPUs try_charge (try_charge_memcg: a refused
                charge drains and retries), uncharge, uncharge to the stock (kmem)
                and drain_all_stock (asynchronous).

Each CPU process runs random operations on the leaves and keeps a shadow ledger of
the pages it holds. For each kill the controller picks a victim, waits until it runs
its loop, stops it (SIGSTOP) at a random instant, reads its writer row (its op word:
is it inside an op, between op_begin and op_end?) and SIGKILLs it there. Every
`aim_every`-th kill is aimed: the CPUs are stopped at random instants, and continued,
until one is caught where the aim says (`aim`); that one is the victim:

  flight     an operation in flight: written to its ledger, its count not yet
             updated (anywhere from before the call to its return);
  op         that, and inside the op itself: its row's op word set, where the
             counters change (a C op of ~100 ns: tens to hundreds of stops);
  drain      (v4) a CPU inside the op of its drain: its ledger says it drains,
             its row's op word is set (taking or uncharging some CPU's word);
  requester  (v4) the requester inside the op of its drain (its own, non-CPU,
             writer row's op word set);
  deposit    (v4) a CPU inside its charge op, between its deposit's CAS intent and
             its forward mark (a window of a few instructions in one C call: some
             ten thousand stops);
  alternate  aimed kills alternate: op, flight, op, ...; v4: op, drain, deposit,
             flight, requester, op, ...

v4 counts the kills by side, as read from the victim's row while it was stopped:
a CPU in its charge op (at its deposit: the CAS intent recorded, or marked once
deposited) or its uncharge op, a CPU in its drain op, the requester in its drain
op (the CAS intent recorded, or marked once the word is taken). A hit has no op:
a kill there leaves the word's CAS done or not, and the ledger resolves it. A
drain, whoever makes it and whichever CPU's word it takes, moves pages from a
stock out of usage: usage - stock is unchanged, so no ledger records drains, and
I1 with the ledger holds after a dead drain only if the repair completed it
exactly when its CAS took the word (else rolled it back). A killed requester is
repaired (Arena.repair), its row must be free, and the invariants are checked as
after a CPU's death; then a new requester is started.

Once the hotplug-dead path has run, every other CPU (and the v4 requester) pauses
at a safe point (legacy: and has served the drain work sent to it), and:

  - the killed CPU's operation in flight (written to its ledger before the call)
    counts wholly or not at all: the leaf's unexplained usage (usage - stock -
    ledger) is 0 or the op's delta. For legacy a try_charge may make several ops
    on the leaf (a refused pass, which changes nothing; the drain, which moves
    stock pages only; the retry) and an eviction is an op on another cgroup, whose
    pages are stock pages in either half of the slot: the leaf still shows 0 or
    delta, and every other counter nothing (I1 is exact with the resolved ledger);
  - series I1, I2 (no underflow), I5 (no slot above 64), I6 (no usage above max)
    and I7 (usage == writers' contributions) at every counter;
  - the dead CPU's stock holds nothing and no lock (legacy: no drain flag either).

Then the CPU is restarted and resumes its ledger. At the end every CPU returns its
pages, and every usage must be exactly 0.

    from procs.lab.torture import torture
    report = torture(kills=200, seed=1, design="legacy", aim="op")
    report = torture(kills=200, seed=1, design="v4", aim="requester")
"""
from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from multiprocessing import shared_memory

import numpy as np

from procs import Machine
from shmcounter import Arena
from shmcounter._atomic import Slots
from shmcounter.invariants import check_invariants
from shmcounter.memcg import Cgroups, legacy
from shmcounter.memcg.cgroups import ROOT
from shmcounter.memcg.legacy import MC_FLUSHING, MC_LOCK, MC_SLOTS, NR_MEMCG_STOCK
from shmcounter.segment import R_FWD_LEVELS, R_OP, R_PID, R_STOCK_AFTER, R_STOCK_BEFORE

BATCH = 64                      # the per-counter stock's batch; the legacy slot's max


# ledger segment, int64 words: [pause, stop] then per CPU a line of
# [ack, ops, inflight, leaf, delta, before, 0, 0] and MAX_LEAVES held counts; v4:
# then the requester's line (index ncpus: ack, drains done, inflight)
_PAUSE, _STOP = 0, 1
_ACK, _OPS, _INFLIGHT, _LEAF, _DELTA, _BEFORE = range(6)
_HELD = 8
MAX_LEAVES = 16
_CPU_WORDS = _HELD + MAX_LEAVES
# inflight: what the CPU is doing; _OP is a charge or an uncharge of leaf by delta
_NONE, _OP, _DRAIN = 0, 1, 2


@dataclass(frozen=True)
class Tree:
    """A design's tree: (name, parent, max) with parents first and the root first,
    and the leaves the CPUs charge."""
    nodes: tuple[tuple[str, str | None, int], ...]
    leaves: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.leaves) > MAX_LEAVES:
            raise ValueError(f"a tree has at most {MAX_LEAVES} leaves (the ledger's line)")


TREES: dict[str, Tree] = {
    "page_counter": Tree(
        (("root", None, 40_000), ("a", "root", 9_000), ("b", "root", 7_000),
         ("a1", "a", 2_500), ("a2", "a", 8_000), ("b1", "b", 3_000), ("b2", "b", 3_000)),
        ("a1", "a2", "b1", "b2")),
    "legacy": Tree(
        ((ROOT, None, 8_000), ("a", ROOT, 3_000), ("b", ROOT, 2_500), ("c", ROOT, 2_000),
         ("a1", "a", 1_000), ("a2", "a", 1_500), ("a3", "a", 750), ("a4", "a", 1_250),
         ("b1", "b", 1_000), ("b2", "b", 1_000), ("b3", "b", 1_500),
         ("c1", "c", 750), ("c2", "c", 1_000), ("c3", "c", 1_250)),
        ("a1", "a2", "a3", "a4", "b1", "b2", "b3", "c1", "c2", "c3")),
}
TREES["v4"] = TREES["page_counter"]
DESIGNS = tuple(TREES)

CHARGES = (1, 1, 1, 2, 8, 33, 64, 100)   # try_charge sizes; kmem uncharges too
P_UNCHARGE = 0.45                        # an uncharge (when the leaf holds pages)
P_KMEM = 0.5                             # legacy: of those, to the stock
AIMS = ("flight", "op", "drain", "requester", "deposit", "alternate")   # aimed kills
AIM_TIMEOUT = 60.0                       # seconds to catch a victim where aimed
AIM_DELAY = 50e-6                        # at most this long running between two stops
STOP_TIMEOUT = 10.0                      # seconds for a SIGSTOP to stop its process
# Waiting for a stop sleeps this long between two looks at first, twice as long each
# time after (up to 1 ms): a CPU process on the SCHED_FIFO controller's core runs only
# while it sleeps (_realtime), and polls of 2 us left it no time to stop in at all.
STOP_POLL = 50e-6
RUN_TIMEOUT = 60.0                       # seconds for a victim to run its loop
# v4: the requester sleeps up to this long between two drains, or it holds the drain
# lock nearly all the time and the CPUs' drains wait for it (1 ms polls)
REQUESTER_SLEEP = 0.002


def _cpu_base(cpu: int) -> int:
    return 8 + cpu * _CPU_WORDS


# How a kill is made: at a random instant, or aimed (AIMS) at an operation in
# flight or inside its op; v4: at a CPU or the requester inside its drain op.
AT_RANDOM, IN_FLIGHT, INSIDE_OP = "at random", "in flight", "inside the op"
IN_DRAIN, REQUESTER_DRAIN = "inside a CPU's drain", "inside the requester's drain"
IN_DEPOSIT = "inside a deposit"
_AIMED = {"flight": IN_FLIGHT, "op": INSIDE_OP, "drain": IN_DRAIN,
          "requester": REQUESTER_DRAIN, "deposit": IN_DEPOSIT}
_V4_AIMS = ("drain", "requester", "deposit")
# aim "alternate": the aims in turn, from the first aimed kill
_ALTERNATE = {"page_counter": ("op", "flight"), "legacy": ("op", "flight"),
              "v4": ("op", "drain", "deposit", "flight", "requester")}

# v4: the sides a victim inside an op is on (read from its row while stopped), and
# where in its op: before any CAS intent or mark, its CAS intent recorded (about
# to CAS, or done but not yet marked), marked forward (deposited, taken, or an
# uncharge: the repair completes it)
SIDES = ("CPU, in its charge op", "CPU, in its uncharge op", "CPU, in its drain op",
         "requester (not a CPU), in its drain op")
PHASES = ("unmarked", "CAS intent", "marked")


def _hows(design: str) -> tuple[str, ...]:
    return ((AT_RANDOM, IN_FLIGHT, INSIDE_OP, IN_DRAIN, REQUESTER_DRAIN, IN_DEPOSIT)
            if design == "v4"
            else (AT_RANDOM, IN_FLIGHT, INSIDE_OP))


@dataclass
class Report:
    design: str = "page_counter"
    kills: int = 0
    made: dict[str, int] = field(default_factory=dict)   # kills by how they were made
    # Of those, the kills at which the victim's writer row had its op word set (read
    # while the victim was stopped, just before the SIGKILL).
    in_op: dict[str, int] = field(default_factory=dict)
    # v4: the kills inside an op by side and phase (SIDES, PHASES), read likewise;
    # and the kills of the requester (of `made`'s)
    sides: dict[str, dict[str, int]] = field(default_factory=dict)
    requester_kills: int = 0
    # v4: the kills aimed inside a deposit by outcome: counted wholly iff its CAS
    # happened (the repair decides it from the word; I1 with the ledger checks it)
    deposits: dict[str, int] = field(default_factory=dict)
    stops: int = 0                 # SIGSTOPs: one per kill at random, more to aim one
    ops: int = 0
    drains: int = 0                # v4: the requester's drain_stock calls
    checks: int = 0
    in_flight: dict[str, int] = field(default_factory=lambda: {
        "none": 0, "in a drain": 0, "acknowledged": 0, "rolled back": 0,
        "counted wholly": 0})
    stats: dict[str, int] = field(default_factory=dict)   # legacy: Cgroups.stats() + events
    seconds: float = 0.0

    def __post_init__(self) -> None:
        for counts in (self.made, self.in_op):
            counts.update({how: 0 for how in _hows(self.design)} | counts)
        if self.design == "v4" and not self.sides:
            self.sides = {side: dict.fromkeys(PHASES, 0) for side in SIDES}

    @property
    def aimed(self) -> int:
        return self.kills - self.made[AT_RANDOM]

    @property
    def caught_in_op(self) -> int:
        """Kills made with the victim inside an op (its row's op word set)."""
        return sum(self.in_op.values())

    @property
    def resolved(self) -> int:
        """Kills whose operation in flight had to be resolved: rolled back or wholly."""
        return self.in_flight["rolled back"] + self.in_flight["counted wholly"]

    def __str__(self) -> str:
        f, made, in_op = self.in_flight, self.made, self.in_op
        lines = [
            f"{self.design}: {self.kills} SIGKILLs ({self.aimed} aimed: {made[IN_FLIGHT]} at "
            f"an operation in flight, {made[INSIDE_OP]} inside its op), {self.ops} "
            f"operations, {self.checks} invariant checks (I1 I2 I5 I6 I7 + dead slots), "
            f"all passed in {self.seconds:.1f} s.",
            f"Victim inside an op (its row's op word set) at {self.caught_in_op} kills: "
            f"{in_op[AT_RANDOM]} of {made[AT_RANDOM]} at random, {in_op[IN_FLIGHT]} of "
            f"{made[IN_FLIGHT]} aimed in flight, {in_op[INSIDE_OP]} of {made[INSIDE_OP]} "
            f"aimed inside the op ({self.stops} SIGSTOPs).",
            f"Operation in flight at the kill: none {f['none']}, in a drain "
            f"{f['in a drain']}, already acknowledged {f['acknowledged']}, rolled back "
            f"(counted not at all) {f['rolled back']}, counted wholly {f['counted wholly']}."]
        if self.sides:
            sides = "; ".join(
                f"{side} {sum(phases.values())} ("
                + ", ".join(f"{phase} {n}" for phase, n in phases.items()) + ")"
                for side, phases in self.sides.items())
            lines[0:1] = [
                f"{self.design}: {self.kills} SIGKILLs ({self.requester_kills} of the "
                f"requester; {self.aimed} aimed: {made[IN_FLIGHT]} at an operation in "
                f"flight, {made[INSIDE_OP]} inside its op, {made[IN_DEPOSIT]} inside its "
                f"deposit, {made[IN_DRAIN]} inside a CPU's drain op, "
                f"{made[REQUESTER_DRAIN]} inside the requester's), {self.ops} "
                f"operations and {self.drains} requester drains, {self.checks} invariant "
                f"checks (I1 I2 I5 I6 I7 + dead slots), all passed in {self.seconds:.1f} s."]
            lines[1] += (f" Aimed inside a deposit: {in_op[IN_DEPOSIT]} of "
                         f"{made[IN_DEPOSIT]}; inside a drain: {in_op[IN_DRAIN]} of "
                         f"{made[IN_DRAIN]} CPUs, {in_op[REQUESTER_DRAIN]} of "
                         f"{made[REQUESTER_DRAIN]} requesters.")
            lines.append(f"Sides, read while the victim was stopped inside an op: {sides}.")
            d = self.deposits
            lines.append(f"Kills aimed inside a deposit: its CAS done, counted wholly "
                         f"{d.get('counted wholly', 0)}; not done, rolled back "
                         f"{d.get('rolled back', 0)}.")
        if self.stats:
            s = self.stats
            lines.append(f"Legacy slots: {s['evictions']} evictions, {s['overflows']} overflow "
                         f"drains, {s['flushes']} drain works served; {s['max events']} "
                         f"max events (refused charges).")
        return "\n".join(lines)


_ledgers: dict[str, tuple[shared_memory.SharedMemory, Slots, np.ndarray]] = {}


def _ledger(name: str) -> tuple[Slots, np.ndarray]:
    if name not in _ledgers:
        shm = shared_memory.SharedMemory(name)
        buf = shm.buf
        assert buf is not None                    # an open SharedMemory is mapped
        _ledgers[name] = (shm, Slots(buf), np.ndarray((shm.size // 8,), np.int64, buf))
    return _ledgers[name][1:]


# ---- the CPU side -------------------------------------------------------------------

class _CounterOps:
    """The page_counter design's operations on the leaves, in a CPU process. A drain
    is a round trip to every CPU (1-3 ms with 4 CPUs on 2 cores): one in 1000, or
    the kills land in a drain's wait instead of in an operation (one in 50 kept
    the CPUs waiting 75% of the time)."""
    p_drain = 0.001
    kmem = False

    def __init__(self, arena: Arena, leaves: tuple[str, ...]) -> None:
        self._leaves = [arena.counter(name) for name in leaves]

    def charge(self, leaf: int, n: int) -> bool:
        return self._leaves[leaf].try_charge(n)[0]

    def uncharge(self, leaf: int, n: int, kmem: bool) -> None:
        self._leaves[leaf].uncharge(n)

    def drain(self, leaf: int) -> None:
        self._leaves[leaf].drain_stock(timeout=30)


class _CgroupOps:
    """The legacy design's operations on the leaf cgroups, in a CPU process.
    drain_all_stock does not wait for the other CPUs."""
    p_drain = 0.01
    kmem = True

    def __init__(self, arena: Arena, leaves: tuple[str, ...]) -> None:
        self._tree = Cgroups(arena)
        self._leaves = [self._tree.cgroup(name) for name in leaves]

    def charge(self, leaf: int, n: int) -> bool:
        return self._leaves[leaf].try_charge(n)

    def uncharge(self, leaf: int, n: int, kmem: bool) -> None:
        self._leaves[leaf].uncharge(n, kmem=kmem)

    def drain(self, leaf: int) -> None:
        self._tree.drain_all_stock(self._leaves[leaf])


class _LocklessOps(_CounterOps):
    """The v4 design's operations: those of page_counter, on lockless stocks. A
    drain takes every CPU's word itself, under the drain lock, with no round trip
    to the CPUs: one in 50, so that kills aimed at a CPU inside one find it."""
    p_drain = 0.005


_OPERATIONS: dict[str, type[_CounterOps | _CgroupOps]] = {
    "page_counter": _CounterOps, "legacy": _CgroupOps, "v4": _LocklessOps}


def torture_loop(arena: Arena, ledger: str, cpu: int, seed: int, design: str) -> int:
    """This runs in CPU process `cpu`: random operations on `design`'s leaves until
    told to stop, pausing at a safe point (nothing in flight) when asked. Before an
    operation its leaf, delta and the ledger's count go to the ledger and inflight
    is set; the count is updated once the call returned. Returns operations done."""
    slots, words = _ledger(ledger)
    base = _cpu_base(cpu)
    held = base + _HELD
    leaves = TREES[design].leaves
    ops = _OPERATIONS[design](arena, leaves)
    rng = random.Random(seed)
    done = 0
    while not slots.load(_STOP):
        if slots.load(_PAUSE):
            _paused(slots, base)
            continue
        leaf = rng.randrange(len(leaves))
        have = int(words[held + leaf])
        roll = rng.random()
        if roll < ops.p_drain:
            slots.store(base + _INFLIGHT, _DRAIN)          # a drain may be killed too
            ops.drain(leaf)
            slots.store(base + _INFLIGHT, _NONE)
            continue
        kmem = False
        if have and roll < P_UNCHARGE:
            kmem = ops.kmem and rng.random() < P_KMEM
            delta = -min(have, rng.choice(CHARGES)) if kmem else -rng.randint(1, have)
        else:
            delta = rng.choice(CHARGES)
        words[base + _LEAF], words[base + _DELTA], words[base + _BEFORE] = leaf, delta, have
        slots.store(base + _INFLIGHT, _OP)
        if delta > 0:
            ok = ops.charge(leaf, delta)
        else:
            ops.uncharge(leaf, -delta, kmem)
            ok = True
        if ok:
            words[held + leaf] = have + delta
        slots.store(base + _INFLIGHT, _NONE)
        done += 1
        words[base + _OPS] += 1
    return done


def _paused(slots: Slots, base: int) -> None:
    """Stay at this safe point while the controller checks: say so (ack), sleep on
    the pause word until it is cleared or the run stops. A drain sent to this CPU
    meanwhile is served by its signal handler, which interrupts the sleep."""
    slots.store(base + _ACK, 1)
    while slots.load(_PAUSE) and not slots.load(_STOP):
        slots.futex_wait(_PAUSE, 1, 10_000)
    slots.store(base + _ACK, 0)


def requester_loop(arena_name: str, ledger: str, line: int, seed: int) -> None:
    """This runs in the v4 requester, a plain process (not a CPU): attach the arena,
    drain_stock a random leaf (every CPU's word of it, remotely) until told to
    stop, pausing at a safe point as a CPU does. Its ledger line `line`: inflight
    says _DRAIN during a drain, ops counts the drains done."""
    arena = Arena.attach(arena_name)
    try:
        slots, words = _ledger(ledger)
        base = _cpu_base(line)
        leaves = [arena.counter(name) for name in TREES["v4"].leaves]
        rng = random.Random(seed)
        while not slots.load(_STOP):
            if slots.load(_PAUSE):
                _paused(slots, base)
                continue
            leaf = rng.choice(leaves)
            slots.store(base + _INFLIGHT, _DRAIN)
            leaf.drain_stock(timeout=30)
            slots.store(base + _INFLIGHT, _NONE)
            words[base + _OPS] += 1
            time.sleep(rng.uniform(0, REQUESTER_SLEEP))
    finally:
        arena.close()


def release_all(arena: Arena, ledger: str, cpu: int, design: str) -> None:
    """This runs in CPU process `cpu`: uncharge every page its ledger holds."""
    _, words = _ledger(ledger)
    held = _cpu_base(cpu) + _HELD
    ops = _OPERATIONS[design](arena, TREES[design].leaves)
    for leaf in range(len(TREES[design].leaves)):
        if words[held + leaf]:
            ops.uncharge(leaf, int(words[held + leaf]), kmem=False)
            words[held + leaf] = 0


# ---- the controller -------------------------------------------------------------------

class _Requester:
    """The v4 requester's process, started by the controller (`start_method`), as
    a loop: done() once it has exited, result() raising why (it exits only when
    told to stop, or killed)."""

    def __init__(self, start_method: str, arena: Arena, ledger: str, line: int,
                 seed: int) -> None:
        ctx = mp.get_context(start_method)
        self.process = ctx.Process(  # type: ignore[attr-defined]
            target=requester_loop, args=(arena.name, ledger, line, seed),
            name="torture-requester", daemon=True)
        self.process.start()
        assert self.process.pid is not None             # started
        self.pid: int = self.process.pid

    def done(self) -> bool:
        return not self.process.is_alive()

    def result(self) -> None:
        raise AssertionError(f"the requester (pid {self.pid}) exited with code "
                             f"{self.process.exitcode} while running")

    def kill(self) -> None:
        """SIGKILL it, unless it has been reaped (its pid may be another's now), and
        reap it."""
        if self.process.exitcode is None:
            os.kill(self.pid, signal.SIGKILL)
        self.process.join()


_Loop = Future | _Requester

def torture(kills: int, seed: int = 0, ncpus: int = 4, start_method: str = "fork",
            design: str = "page_counter", aim_every: int = 4, aim: str = "alternate",
            progress: bool = False) -> Report:
    """Run `kills` SIGKILLs on `design`'s tree, every `aim_every`-th one aimed where
    `aim` says (AIMS; aim_every 0: none aimed); raise AssertionError (InvariantError)
    at the first broken invariant. Returns what was checked."""
    if design not in TREES:
        raise ValueError(f"design must be one of {DESIGNS}, got {design!r}")
    if type(aim_every) is not int or aim_every < 0:
        raise ValueError(f"aim_every must be an int >= 0, got {aim_every!r}")
    if aim not in AIMS:
        raise ValueError(f"aim must be one of {AIMS}, got {aim!r}")
    if aim in _V4_AIMS and design != "v4":
        raise ValueError(f"aim {aim!r} needs design 'v4' (the lockless stock's remote "
                         f"drains), got {design!r}")
    rng = random.Random(seed)
    report = Report(design=design)
    started = time.monotonic()
    lines = ncpus + (design == "v4")                # the CPUs, and the v4 requester
    ledger_shm = shared_memory.SharedMemory(create=True, size=8 * (8 + lines * _CPU_WORDS))
    try:
        buf = ledger_shm.buf
        assert buf is not None                    # an open SharedMemory is mapped
        buf[:] = bytes(ledger_shm.size)
        with Arena.create(ncpus=ncpus, max_counters=len(TREES[design].nodes)) as arena:
            cgroups = _build(arena, design)
            with Machine(arena, start_method=start_method) as m:
                try:
                    _run(arena, m, cgroups, ledger_shm.name, design, kills, aim_every, aim,
                         start_method, rng, report, progress)
                finally:
                    _stop(_ledger(ledger_shm.name)[0])      # loops end, CPUs stop
    finally:
        for name in list(_ledgers):
            shm, slots, words = _ledgers.pop(name)
            slots.release()
            del words
            shm.close()
        ledger_shm.close()
        ledger_shm.unlink()
    report.seconds = time.monotonic() - started
    return report


def _build(arena: Arena, design: str) -> Cgroups | None:
    """Create `design`'s tree in `arena`. Returns the legacy design's Cgroups."""
    tree = TREES[design]
    if design in ("page_counter", "v4"):
        for name, parent, limit in tree.nodes:
            arena.new_counter(name, None if parent is None else arena.counter(parent), limit)
        for name in tree.leaves:
            arena.counter(name).enable_stock(BATCH, lockless=design == "v4")
        return None
    cgroups = Cgroups(arena, variant="legacy")
    (_, _, root_max), *children = tree.nodes
    cgroups.root.memory.set_max(root_max)
    for name, parent, limit in children:
        assert parent is not None                 # only the first node is a root
        cgroups.create(name, cgroups.cgroup(parent), max=limit)
    return cgroups


def _run(arena: Arena, m: Machine, cgroups: Cgroups | None, ledger: str, design: str,
         kills: int, aim_every: int, aim: str, start_method: str, rng: random.Random,
         report: Report, progress: bool) -> None:
    slots, words = _ledger(ledger)
    ncpus = arena.ncpus
    leaves = TREES[design].leaves
    requester = ncpus                   # v4: the requester's ledger line, as an actor
    actors = ncpus + (design == "v4")   # the CPUs, then the requester

    def start_loop(actor: int) -> _Loop:
        if actor == requester:
            return _Requester(start_method, arena, ledger, requester, rng.randrange(2**32))
        return m.submit(actor, torture_loop, arena, ledger, actor, rng.randrange(2**32),
                        design)

    def pid(actor: int) -> int:
        loop = loops[actor]
        return loop.pid if isinstance(loop, _Requester) else m.pid(actor)

    loops = {actor: start_loop(actor) for actor in range(actors)}
    try:
        resumed_at = _ops_done(words, actors)
        for k in range(1, kills + 1):
            how = _how(k, aim_every, aim, design)
            if how == AT_RANDOM:
                victim = rng.randrange(actors)
                _wait_running(words, victim, resumed_at[victim], loops[victim])
                time.sleep(rng.uniform(0, 0.015))
                _sigstop({victim: pid(victim)})
                report.stops += 1
            else:
                for actor in range(actors):
                    _wait_running(words, actor, resumed_at[actor], loops[actor])
                victim, stops = _catch(arena, words, {a: pid(a) for a in range(actors)},
                                       how, rng)
                report.stops += stops
            victim_pid = pid(victim)
            row = _row(arena, victim, victim_pid)
            in_op = row >= 0 and bool(arena.rows[row, R_OP])     # read while it is stopped
            if in_op and report.sides:
                report.sides[_side(words, victim, requester)][_phase(arena, row)] += 1
            loop = loops[victim]
            if isinstance(loop, _Requester):
                loop.kill()
            else:
                m.kill(victim)
            report.kills += 1
            report.made[how] += 1
            report.in_op[how] += in_op
            report.requester_kills += victim == requester
            _pause(slots, m.online | ({requester} if actors > ncpus and victim != requester
                                      else set()), loops)
            if victim == requester:
                # its drain in progress completed (the word taken) or rolled back,
                # its row free; the Machine's monitor, a CPU taking the drain lock
                # over or a refused charge may have done it first
                arena.repair()
                assert row < 0 or arena.rows[row, R_PID] != victim_pid, (
                    f"kill {k}: the dead requester's row {row} is not free after repair")
            if cgroups is not None:
                cgroups.wait_flushed(timeout=30)           # asynchronous drains served
            outcome = _check_after_kill(arena, words, leaves, victim)
            expected = (("in a drain",) if how in (IN_DRAIN, REQUESTER_DRAIN)
                        else ("rolled back", "counted wholly"))
            assert how == AT_RANDOM or outcome in expected, (
                f"kill {k} was aimed {how} of actor {victim}, yet: {outcome}")
            report.in_flight[outcome] += 1
            if how == IN_DEPOSIT:
                report.deposits[outcome] = report.deposits.get(outcome, 0) + 1
            report.checks += 1
            # The dead process may have died paused (ack = 1): its successor is not
            # paused until it says so itself.
            slots.store(_cpu_base(victim) + _ACK, 0)
            if victim != requester:
                m.start_cpu(victim)
            loops[victim] = start_loop(victim)
            resumed_at = _ops_done(words, actors)
            slots.store(_PAUSE, 0)
            slots.futex_wake(_PAUSE)
            if progress and k % 100 == 0:
                print(f"{k} kills, {sum(_ops_done(words, ncpus))} operations, all "
                      f"invariants held", flush=True)
        _stop(slots)
        for loop in loops.values():
            if isinstance(loop, _Requester):
                loop.process.join(RUN_TIMEOUT)
                if loop.process.exitcode != 0:
                    loop.result()                       # raises: it failed
            else:
                loop.result()
    finally:
        for loop in loops.values():
            if isinstance(loop, _Requester):       # none left behind, even on failure
                _stop(slots)
                loop.process.join(STOP_TIMEOUT)
                loop.kill()
    report.ops = sum(_ops_done(words, ncpus))
    report.drains = sum(_ops_done(words, actors)) - report.ops
    if cgroups is not None:
        report.stats = cgroups.stats() | {
            "max events": sum(g.events_local["max"] for g in cgroups.cgroups())}
    for cpu in range(ncpus):
        m.run_on(cpu, release_all, arena, ledger, cpu, design)
    m.close()                                       # clean stops drain every stock
    usage = [c.usage for c in arena.counters()]
    assert usage == [0] * len(usage), f"pages left after every CPU returned its own: {usage}"
    check_invariants(arena, {})
    report.checks += 1


def _stop(slots: Slots) -> None:
    slots.store(_STOP, 1)
    slots.futex_wake(_PAUSE)


def _ops_done(words: np.ndarray, actors: int) -> list[int]:
    """Operations each CPU (each v4 requester: drains) has done since the start (its
    processes summed)."""
    return [int(words[_cpu_base(actor) + _OPS]) for actor in range(actors)]


def _wait_running(words: np.ndarray, actor: int, ops_before: int, loop: _Loop) -> None:
    """Wait until CPU (or requester) `actor` has done an operation since it was
    resumed (or started), so that the kill lands in its loop, not in its pause or
    its start-up."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while int(words[_cpu_base(actor) + _OPS]) == ops_before:
        if loop.done():
            loop.result()                               # raises what the loop raised
            raise AssertionError(f"CPU {actor}'s loop returned while running")
        if time.monotonic() > deadline:
            raise AssertionError(f"actor {actor} did no operation in {RUN_TIMEOUT} s")
        time.sleep(0.0001)


def _how(k: int, aim_every: int, aim: str, design: str) -> str:
    """How kill number `k` (from 1) is made: AT_RANDOM, or aimed (_AIMED)."""
    if aim_every == 0 or k % aim_every:
        return AT_RANDOM
    if aim == "alternate":
        turn = _ALTERNATE[design]
        aim = turn[(k // aim_every - 1) % len(turn)]
    return _AIMED[aim]


def _row(arena: Arena, actor: int, pid: int) -> int:
    """The writer row of `actor` (process `pid`): CPU k's is k; the requester's is
    the non-CPU row it claimed at its first op, or -1 before."""
    if actor < arena.ncpus:
        return actor
    rows = np.flatnonzero(arena.rows[arena.ncpus:, R_PID] == pid)
    return int(rows[0]) + arena.ncpus if len(rows) else -1


def _caught(arena: Arena, words: np.ndarray, actor: int, pid: int, how: str) -> bool:
    """Is stopped `actor` (process `pid`) where `how` aims? IN_FLIGHT: a CPU with an
    operation in flight, its ledger not yet updated; INSIDE_OP: that and its row's
    op word set; IN_DRAIN: a CPU draining (its ledger), its op word set;
    REQUESTER_DRAIN: the requester with its op word set (it only drains);
    IN_DEPOSIT: a CPU inside its charge op, between its deposit's intent and its
    mark (_phase: about to CAS, or CASed)."""
    row = _row(arena, actor, pid)
    in_op = row >= 0 and bool(arena.rows[row, R_OP])
    if actor == arena.ncpus:
        return how == REQUESTER_DRAIN and in_op
    if how == IN_DRAIN:
        return in_op and int(words[_cpu_base(actor) + _INFLIGHT]) == _DRAIN
    if how == IN_DEPOSIT:
        return (in_op and _in_flight(words, actor) and words[_cpu_base(actor) + _DELTA] > 0
                and _phase(arena, row) == PHASES[1])
    return how in (IN_FLIGHT, INSIDE_OP) and _in_flight(words, actor) and (
        how == IN_FLIGHT or in_op)


def _side(words: np.ndarray, actor: int, requester: int) -> str:
    """v4: the side (SIDES) of `actor`, stopped inside an op: its ledger says what."""
    if actor == requester:
        return SIDES[3]
    base = _cpu_base(actor)
    inflight = int(words[base + _INFLIGHT])
    if inflight == _DRAIN:
        return SIDES[2]
    if inflight != _OP:
        raise AssertionError(f"CPU {actor} is inside an op with nothing in flight")
    return SIDES[0] if words[base + _DELTA] > 0 else SIDES[1]


def _phase(arena: Arena, row: int) -> str:
    """v4: where the op of stopped writer `row` is (PHASES): marked forward, its
    lockless CAS intent recorded (stock_after != stock_before), or neither."""
    r = arena.rows[row]
    if r[R_FWD_LEVELS]:
        return PHASES[2]
    return PHASES[1] if r[R_STOCK_AFTER] != r[R_STOCK_BEFORE] else PHASES[0]


def _catch(arena: Arena, words: np.ndarray, pids: dict[int, int], how: str,
           rng: random.Random) -> tuple[int, int]:
    """SIGSTOP every CPU's loop (and the v4 requester's: `pids` by actor) at random
    instants, continuing them each time (after at most AIM_DELAY s of running),
    until one or more is caught where `how` says (_caught). Continue the others;
    return the victim (one of those caught), still stopped there (a SIGKILL now
    kills it at that instant), and the number of SIGSTOPs made. AssertionError if
    none is caught within AIM_TIMEOUT s.

    All at once, because a CPU waiting for its core (2 CPU processes a core) stops
    only when it gets it: stopped alone, it costs a time slice (~1 ms); stopped with
    the one running on its core, it stops at once, where it was preempted. And the
    controller runs SCHED_FIFO meanwhile (_realtime)."""
    actors = list(pids)
    deadline = time.monotonic() + AIM_TIMEOUT
    stops = 0
    with _realtime(), _continued_if_raised(pids.values()):
        while True:
            rng.shuffle(actors)
            _sigstop({actor: pids[actor] for actor in actors})
            stops += len(actors)
            caught = [a for a in actors if _caught(arena, words, a, pids[a], how)]
            for actor in actors:
                if not caught or actor != caught[0]:
                    os.kill(pids[actor], signal.SIGCONT)
            if caught:
                return caught[0], stops
            if time.monotonic() > deadline:
                raise AssertionError(f"the CPUs were stopped {stops // len(actors)} times "
                                     f"in {AIM_TIMEOUT} s, none {how}")
            time.sleep(rng.uniform(0, AIM_DELAY))


def _in_flight(words: np.ndarray, cpu: int) -> bool:
    """CPU `cpu`'s ledger: an operation in flight, its count not yet updated."""
    base = _cpu_base(cpu)
    leaf = int(words[base + _LEAF])
    return bool(words[base + _INFLIGHT] == _OP
                and words[base + _HELD + leaf] == words[base + _BEFORE])


@contextmanager
def _realtime() -> Iterator[None]:
    """Run this thread SCHED_FIFO in the block, where allowed (root): woken from a
    sleep of the stop loop, it preempts a CPU process at once, instead of waiting
    for one's time slice to end (a stop round of 4 CPUs then costs ~0.3 ms, not
    ~1.5 ms). It never spins there: every wait in the block sleeps (STOP_POLL).
    Processes forked by this thread would inherit the policy: the CPUs are
    restarted after the block."""
    policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        realtime = True
    except PermissionError:
        realtime = False
    try:
        yield
    finally:
        if realtime:
            os.sched_setscheduler(0, policy, param)


@contextmanager
def _continued_if_raised(pids: Iterable[int]) -> Iterator[None]:
    """SIGCONT the processes `pids` if the block raises: none is left stopped."""
    try:
        yield
    except BaseException:
        for pid in pids:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        raise


def _sigstop(pids: dict[int, int]) -> None:
    """SIGSTOP the processes `pids` (by CPU) in this order, and wait until each is
    stopped (state T in /proc/<pid>/stat). AssertionError if one is not within
    STOP_TIMEOUT s."""
    for pid in pids.values():
        os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + STOP_TIMEOUT
    poll = STOP_POLL
    for cpu, pid in pids.items():
        stat = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
        try:
            while (line := os.pread(stat, 512, 0))[line.rindex(b")") + 2] != ord("T"):
                if time.monotonic() > deadline:
                    raise AssertionError(f"CPU {cpu} (pid {pid}) did not stop: "
                                         f"{_kernel_state(pid)}")
                time.sleep(poll)
                poll = min(2 * poll, 1e-3)
        finally:
            os.close(stat)


def _kernel_state(pid: int) -> str:
    """What the kernel says process `pid` is doing: its state, where it sleeps, and
    its kernel stack (root only), for the error of a process that does not stop."""
    seen = []
    for name in ("stat", "wchan", "stack"):
        try:
            with open(f"/proc/{pid}/{name}") as f:
                text = f.read().strip()
        except OSError as exc:
            text = f"({exc.strerror})"
        if name == "stat":
            text = "state " + text[text.rindex(")") + 2:].split()[0]
        seen.append(f"{name}: {text}" if name != "stat" else text)
    return "; ".join(seen)


def _pause(slots: Slots, online: Iterable[int], loops: dict[int, _Loop]) -> None:
    """Ask every running loop to stop at a safe point, and wait until all have
    (`online`: the CPUs and the v4 requester, when alive). A loop that ended (it
    raised) is reported instead of waited for."""
    slots.store(_PAUSE, 1)
    for cpu in online:
        while not slots.load(_cpu_base(cpu) + _ACK):
            if loops[cpu].done():
                loops[cpu].result()                    # raises what the loop raised
                raise AssertionError(f"CPU {cpu}'s loop returned while running")
            time.sleep(0.0001)


def _check_after_kill(arena: Arena, words: np.ndarray, leaves: tuple[str, ...],
                      victim: int) -> str:
    """At quiescence after `victim`'s death: resolve its operation in flight in the
    ledger, then check every invariant with the ledger and that the dead CPU's
    stock is empty (the v4 requester, line ncpus, has none). Returns what was in
    flight ("none", "in a drain", "acknowledged", "rolled back" or "counted
    wholly")."""
    ncpus = arena.ncpus
    held = np.array([words[_cpu_base(cpu) + _HELD:_cpu_base(cpu) + _HELD + len(leaves)]
                     for cpu in range(ncpus)])
    outcome = _resolve_in_flight(arena, words, held, leaves, victim)
    real = {name: int(held[:, i].sum()) for i, name in enumerate(leaves)}
    check_invariants(arena, real, batch=BATCH)
    if victim < ncpus:
        _check_dead_stock(arena, victim)
    return outcome


def _resolve_in_flight(arena: Arena, words: np.ndarray, held: np.ndarray,
                       leaves: tuple[str, ...], victim: int) -> str:
    """The victim's op in flight counted wholly or not at all at its leaf: the
    leaf's unexplained usage is delta or 0. Wholly: the pages go to the victim's
    ledger (its tasks hold them), in `words` and in `held`."""
    base = _cpu_base(victim)
    inflight = int(words[base + _INFLIGHT])
    words[base + _INFLIGHT] = _NONE
    if inflight != _OP:
        return "in a drain" if inflight == _DRAIN else "none"
    leaf, delta, before = (int(words[base + i]) for i in (_LEAF, _DELTA, _BEFORE))
    name = leaves[leaf]
    unexplained = arena.counter(name).usage - _stocked(arena, name) - int(held[:, leaf].sum())
    if held[victim, leaf] == before + delta:
        assert unexplained == 0, f"acknowledged op not accounted: {unexplained}"
        return "acknowledged"
    if unexplained == 0:
        return "rolled back"
    assert unexplained == delta, (
        f"the op in flight ({name} {delta:+d}) counts {unexplained}: "
        f"neither wholly nor not at all")
    words[base + _HELD + leaf] = before + delta
    held[victim, leaf] = before + delta
    return "counted wholly"


def _stocked(arena: Arena, name: str) -> int:
    """Pages of counter `name` in any CPU's stock: its per-counter slots and the
    legacy slots, both halves (what check_invariants counts as stock)."""
    counters = arena.counters()
    index = [c.name for c in counters].index(name)
    in_slots = legacy.stock_pages(arena, len(counters))[:, index].sum()
    return sum(counters[index].stock(cpu) for cpu in range(arena.ncpus)) + int(in_slots)


def _check_dead_stock(arena: Arena, cpu: int) -> None:
    """Dead CPU `cpu`'s stock after hotplug: no page and no lock in its per-counter
    slots; no page, lock or drain flag in its legacy block."""
    assert arena.stocks[cpu].tolist() == [[0, 0]] * arena.max_stocked, \
        f"CPU {cpu}'s slots after hotplug: {arena.stocks[cpu].tolist()}"
    block = arena._memcg.cpus[cpu]
    left = {"lock": int(block[MC_LOCK]), "flushing": int(block[MC_FLUSHING]),
            "slots": block[MC_SLOTS:MC_SLOTS + NR_MEMCG_STOCK].tolist()}
    assert left == {"lock": 0, "flushing": 0, "slots": [0] * NR_MEMCG_STOCK}, \
        f"CPU {cpu}'s legacy block after hotplug: {left}"
