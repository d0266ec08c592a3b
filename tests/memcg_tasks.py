"""Tasks that memcg tests send to CPU processes (module level, so that they pickle).
Each opens the arena's cgroup tree in the CPU process: its charges use that CPU's
stock (per-counter, or the legacy slots)."""
from __future__ import annotations

import shmcounter
from shmcounter import Arena, hooks
from shmcounter.memcg import Cgroups


def charge(arena: Arena, name: str, n: int = 1, times: int = 1) -> list[bool]:
    g = Cgroups(arena).cgroup(name)
    return [g.try_charge(n) for _ in range(times)]


def charge_each(arena: Arena, names: list[str], rounds: int = 1) -> int:
    """`rounds` times, one page in each cgroup in turn; returns the successes."""
    cg = Cgroups(arena)
    groups = [cg.cgroup(name) for name in names]
    return sum(g.try_charge(1) for _ in range(rounds) for g in groups)


def uncharge(arena: Arena, name: str, n: int, kmem: bool = False) -> None:
    Cgroups(arena).cgroup(name).uncharge(n, kmem=kmem)


def ping_pong(arena: Arena, name: str, pairs: int) -> None:
    """Scenario 21: charge(1), then a socket-style uncharge(1), `pairs` times."""
    g = Cgroups(arena).cgroup(name)
    for _ in range(pairs):
        assert g.try_charge(1)
        g.uncharge(1, kmem=True)


def drain_all(arena: Arena, name: str) -> bool:
    cg = Cgroups(arena)
    return cg.drain_all_stock(cg.cgroup(name))


def stock(arena: Arena, name: str) -> int:
    cpu = shmcounter.this_cpu()
    assert cpu is not None                       # a task for CPU processes
    return Cgroups(arena).cgroup(name).stock(cpu)


def disarm() -> None:
    hooks.clear()


def create(arena: Arena, cgroups: list[tuple[str, str | None]]) -> None:
    """mkdir each (name, parent name or None for root), in order."""
    cg = Cgroups(arena)
    for name, parent in cgroups:
        cg.create(name, None if parent is None else cg.cgroup(parent))
