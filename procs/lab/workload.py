"""The benchmark's workload, run in CPU processes (Machine.submit): the cover
letters' loop of page faults and MADV_DONTNEED, on cgroups or on peers.

One iteration, on one CPU, over its cgroups g[0..k):

    for each of `pages` pages:          a page fault in each cgroup's task
        for g in cgroups: g.try_charge(1)
    for g in cgroups: g.uncharge(pages) MADV_DONTNEED: one folio uncharge per cgroup

The CPU interleaves its cgroups page by page, as a CPU does that runs tasks of
many cgroups: this is what makes the old 7-slot stock thrash past 7 cgroups.
The faults run as one flat loop over a precomputed sequence of bound methods
(g0, g1, ..., g0, g1, ...): at 1 cgroup, a nested loop (an inner loop per page)
cost 0.1 to 0.17 us per page more on a quiet machine, half of a stock hit, the
same for every design; overhead that hides the differences the bench is for.
Every function here runs in a separate process (a CPU of a Machine).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from shmcounter import Arena
from shmcounter.memcg import Cgroups

from .peer import ValuePeer

# Peers by name. A Value is shared only by inheritance, so the bench fills this
# in the owner before the peer Machine forks its CPU processes (start_method
# "fork"); the CPU processes read their copy.
PEERS: dict[str, ValuePeer] = {}

Charge = Callable[[int], bool]
Uncharge = Callable[[int], None]


def cgroup_cell(arena: Arena, names: Sequence[str], iterations: int, pages: int,
                start_at: float) -> tuple[float, float]:
    """`iterations` iterations on the cgroups `names` of the arena's tree, from
    start_at (time.monotonic, shared by every process of the machine). Returns
    (start, end) in time.monotonic."""
    groups = [Cgroups(arena).cgroup(name) for name in names]
    return _timed([g.try_charge for g in groups], [g.uncharge for g in groups],
                  iterations, pages, start_at)


def peer_cell(names: Sequence[str], iterations: int, pages: int,
              start_at: float) -> tuple[float, float]:
    """cgroup_cell on the peers `names` (PEERS)."""
    peers = [PEERS[name] for name in names]
    return _timed([p.try_charge for p in peers], [p.uncharge for p in peers],
                  iterations, pages, start_at)


def cgroup_churn(arena: Arena, names: Sequence[str], pages: int, stop_at: float) -> int:
    """Iterations on the cgroups `names` until stop_at (time.monotonic): the load
    under which the drains are timed. Returns the iterations done."""
    groups = [Cgroups(arena).cgroup(name) for name in names]
    faults, uncharges = [g.try_charge for g in groups] * pages, [g.uncharge for g in groups]
    done = 0
    while time.monotonic() < stop_at:
        _iteration(faults, uncharges, pages)
        done += 1
    return done


def spin(steps: int, start_at: float) -> tuple[float, float]:
    """A pure-Python loop of `steps` additions that touches no shared memory, from
    start_at: what the machine gives any Python code on this many CPUs."""
    _wait_until(start_at)
    start = time.monotonic()
    total = 0
    for i in range(steps):
        total += i
    return start, time.monotonic()


def hold_stock(arena: Arena, names: Sequence[str]) -> None:
    """Charge one page to each cgroup `names`: this CPU then holds stock for each
    (per-counter designs: batch - 1 pages each; legacy: up to 7 slots)."""
    cg = Cgroups(arena)
    for name in names:
        if not cg.cgroup(name).try_charge(1):
            raise RuntimeError(f"cgroup {name!r} refused a page")


def _timed(charges: list[Charge], uncharges: list[Uncharge], iterations: int, pages: int,
           start_at: float) -> tuple[float, float]:
    faults = charges * pages
    _wait_until(start_at)
    start = time.monotonic()
    for _ in range(iterations):
        _iteration(faults, uncharges, pages)
    return start, time.monotonic()


def _iteration(faults: Sequence[Charge], uncharges: Sequence[Uncharge], pages: int) -> None:
    """faults: each cgroup's try_charge, `pages` times over, cgroups interleaved."""
    for charge in faults:
        if not charge(1):
            raise RuntimeError("a charge was refused; the benchmark sets no limit")
    for uncharge in uncharges:
        uncharge(pages)


def _wait_until(t: float) -> None:
    """Sleep, then spin the last millisecond, until time.monotonic() >= t."""
    if (ahead := t - time.monotonic()) > 0.002:
        time.sleep(ahead - 0.001)
    while time.monotonic() < t:
        pass
