"""Hotplug torture: random SIGKILLs of CPU processes charging a limited tree.

CPU processes run random try_charge / uncharge / drain loops over a 3-level tree
with limits, each keeping a shadow ledger of the pages it holds. The controller
kills a random CPU at a random instant, lets the hotplug-dead path run, pauses
every other CPU at a safe point, and checks:

  - the killed CPU's operation in flight (written to its ledger before the call)
    counts wholly or not at all: the leaf's unexplained usage is 0 or its delta,
    and every ancestor agrees (I1 is exact with the resolved ledger);
  - series I1, I2 (no underflow), I5 (no slot above batch), I6 (no usage above
    max) and I7 (usage == writers' contributions) at every counter;
  - the dead CPU's slots hold nothing and no lock.

Then the CPU is restarted and resumes its ledger. At the end every CPU returns its
pages, and every usage must be exactly 0.

    from procs.torture import torture
    report = torture(kills=200, seed=1)
"""
from __future__ import annotations

import random
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from multiprocessing import shared_memory

import numpy as np

from shmcounter import Arena
from shmcounter._atomic import Slots
from shmcounter.invariants import check_invariants

from .machine import Machine

LEAVES = ["a1", "a2", "b1", "b2"]
TREE = [("root", None, 40_000), ("a", "root", 9_000), ("b", "root", 7_000),
        ("a1", "a", 2_500), ("a2", "a", 8_000), ("b1", "b", 3_000), ("b2", "b", 3_000)]
BATCH = 64

# ledger segment, int64 words: [pause, stop] then per CPU a line of
# [ack, ops, inflight, leaf, delta, before, 0, 0] and len(LEAVES) held counts
_PAUSE, _STOP = 0, 1
_ACK, _OPS, _INFLIGHT, _LEAF, _DELTA, _BEFORE = range(6)
_CPU_WORDS = 8 + 8


def _cpu_base(cpu: int) -> int:
    return 8 + cpu * _CPU_WORDS


@dataclass
class Report:
    kills: int = 0
    ops: int = 0
    checks: int = 0
    in_flight: dict[str, int] = field(default_factory=lambda: {
        "none": 0, "acknowledged": 0, "rolled back": 0, "counted wholly": 0})
    seconds: float = 0.0

    def __str__(self) -> str:
        f = self.in_flight
        return (f"{self.kills} SIGKILLs, {self.ops} operations, {self.checks} invariant "
                f"checks (I1 I2 I5 I6 I7 + dead slots), all passed in {self.seconds:.1f} s.\n"
                f"Operation in flight at the kill: none {f['none']}, already acknowledged "
                f"{f['acknowledged']}, rolled back (counted not at all) {f['rolled back']}, "
                f"counted wholly {f['counted wholly']}.")


_ledgers: dict[str, tuple[shared_memory.SharedMemory, Slots, np.ndarray]] = {}


def _ledger(name: str) -> tuple[Slots, np.ndarray]:
    if name not in _ledgers:
        shm = shared_memory.SharedMemory(name)
        _ledgers[name] = (shm, Slots(shm.buf), np.ndarray((shm.size // 8,), np.int64, shm.buf))
    return _ledgers[name][1:]


def torture_loop(arena: Arena, ledger: str, cpu: int, seed: int) -> int:
    """This runs in CPU process `cpu`: random operations until told to stop, pausing
    at a safe point (no operation in flight) when asked. Returns operations done."""
    slots, words = _ledger(ledger)
    base = _cpu_base(cpu)
    held = base + 8
    leaves = [arena.counter(name) for name in LEAVES]
    rng = random.Random(seed)
    ops = 0
    while not slots.load(_STOP):
        if slots.load(_PAUSE):
            slots.store(base + _ACK, 1)
            while slots.load(_PAUSE) and not slots.load(_STOP):
                time.sleep(0)
            slots.store(base + _ACK, 0)
            continue
        leaf = rng.randrange(len(LEAVES))
        have = int(words[held + leaf])
        roll = rng.random()
        if roll < 0.02:
            leaves[leaf].drain_stock(timeout=30)            # a drain may be killed too
            continue
        delta = -rng.randint(1, have) if have and roll < 0.47 else \
            rng.choice([1, 1, 1, 2, 8, 33, 64, 100])
        words[base + _LEAF], words[base + _DELTA], words[base + _BEFORE] = leaf, delta, have
        slots.store(base + _INFLIGHT, 1)
        if delta > 0:
            ok = leaves[leaf].try_charge(delta)[0]
        else:
            leaves[leaf].uncharge(-delta)
            ok = True
        if ok:
            words[held + leaf] = have + delta
        slots.store(base + _INFLIGHT, 0)
        ops += 1
        words[base + _OPS] += 1
    return ops


def release_all(arena: Arena, ledger: str, cpu: int) -> None:
    """This runs in CPU process `cpu`: uncharge every page its ledger holds."""
    slots, words = _ledger(ledger)
    held = _cpu_base(cpu) + 8
    for leaf, name in enumerate(LEAVES):
        if words[held + leaf]:
            arena.counter(name).uncharge(int(words[held + leaf]))
            words[held + leaf] = 0


def torture(kills: int, seed: int = 0, ncpus: int = 4, start_method: str = "fork",
            progress: bool = False) -> Report:
    """Run `kills` random SIGKILLs; raise AssertionError (InvariantError) at the
    first broken invariant. Returns what was checked."""
    rng = random.Random(seed)
    report = Report()
    started = time.monotonic()
    ledger_shm = shared_memory.SharedMemory(create=True, size=8 * (8 + ncpus * _CPU_WORDS))
    try:
        ledger_shm.buf[:] = bytes(ledger_shm.size)
        with Arena.create(ncpus=ncpus, max_counters=len(TREE)) as arena:
            for name, parent, limit in TREE:
                arena.new_counter(name, None if parent is None else arena.counter(parent), limit)
            for name in LEAVES:
                arena.counter(name).enable_stock(BATCH)
            with Machine(arena, start_method=start_method) as m:
                try:
                    _run(arena, m, ledger_shm.name, kills, rng, report, progress)
                finally:
                    _ledger(ledger_shm.name)[0].store(_STOP, 1)   # loops end, CPUs stop
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


def _run(arena: Arena, m: Machine, ledger: str, kills: int, rng: random.Random,
         report: Report, progress: bool) -> None:
    slots, words = _ledger(ledger)
    ncpus = arena.ncpus
    loops = {cpu: m.submit(cpu, torture_loop, arena, ledger, cpu, rng.randrange(2**32))
             for cpu in range(ncpus)}
    for k in range(kills):
        time.sleep(rng.uniform(0, 0.015))
        victim = rng.randrange(ncpus)
        m.kill(victim)
        report.kills += 1
        _pause(slots, m.online, loops)
        _check_after_kill(arena, words, victim, report)
        # The dead process may have died paused (ack = 1): its successor is not
        # paused until it says so itself.
        slots.store(_cpu_base(victim) + _ACK, 0)
        m.start_cpu(victim)
        loops[victim] = m.submit(victim, torture_loop, arena, ledger, victim,
                                 rng.randrange(2**32))
        slots.store(_PAUSE, 0)
        if progress and (k + 1) % 100 == 0:
            print(f"{k + 1} kills, {int(sum(words[_cpu_base(c) + _OPS] for c in range(ncpus)))} "
                  f"operations, all invariants held", flush=True)
    slots.store(_STOP, 1)
    for future in loops.values():
        future.result()
    report.ops = int(sum(words[_cpu_base(cpu) + _OPS] for cpu in range(ncpus)))
    for cpu in range(ncpus):
        m.run_on(cpu, release_all, arena, ledger, cpu)
    m.close()                                       # clean stops drain every stock
    usage = [c.usage for c in arena.counters()]
    assert usage == [0] * len(TREE), f"pages left after every CPU returned its own: {usage}"
    check_invariants(arena, {})
    report.checks += 1


def _pause(slots: Slots, online: frozenset[int], loops: dict[int, Future]) -> None:
    """Ask every running loop to stop at a safe point, and wait until all have.
    A loop that ended (it raised) is reported instead of waited for."""
    slots.store(_PAUSE, 1)
    for cpu in online:
        while not slots.load(_cpu_base(cpu) + _ACK):
            if loops[cpu].done():
                loops[cpu].result()                    # raises what the loop raised
                raise AssertionError(f"CPU {cpu}'s loop returned while running")
            time.sleep(0)


def _check_after_kill(arena: Arena, words: np.ndarray, victim: int, report: Report) -> None:
    ncpus = arena.ncpus
    held = np.array([words[_cpu_base(cpu) + 8:_cpu_base(cpu) + 8 + len(LEAVES)]
                     for cpu in range(ncpus)])
    base = _cpu_base(victim)
    outcome = "none"
    if words[base + _INFLIGHT]:
        leaf, delta, before = (int(words[base + i]) for i in (_LEAF, _DELTA, _BEFORE))
        counter = arena.counter(LEAVES[leaf])
        stock = sum(counter.stock(cpu) for cpu in range(ncpus))
        unexplained = counter.usage - stock - int(held[:, leaf].sum())
        if held[victim, leaf] == before + delta:
            outcome = "acknowledged"
            assert unexplained == 0, f"acknowledged op not accounted: {unexplained}"
        elif unexplained == 0:
            outcome = "rolled back"
        else:
            assert unexplained == delta, (
                f"the op in flight ({LEAVES[leaf]} {delta:+d}) counts {unexplained}: "
                f"neither wholly nor not at all")
            outcome = "counted wholly"
            words[base + 8 + leaf] = before + delta    # the dead CPU's tasks hold them
            held[victim, leaf] = before + delta
        words[base + _INFLIGHT] = 0
    report.in_flight[outcome] += 1
    real = {name: int(held[:, i].sum()) for i, name in enumerate(LEAVES)}
    check_invariants(arena, real, batch=BATCH)
    assert arena.stocks[victim].tolist() == [[0, 0]] * arena.max_stocked, \
        f"CPU {victim}'s slots after hotplug: {arena.stocks[victim].tolist()}"
    report.checks += 1
