"""The built-in scenarios: who runs what, from which state, and the ledger.

A scenario is a set-up (the cgroup tree, built by the controller; each process's
own set-up, run once, unexplored) and one script per process, run in every
schedule from the state the set-up left. A script returns the pages it really
charged (net) by cgroup; the shadow ledger is the set-up's pages plus those, and
check_invariants checks I1 against it at quiescence (no page lost or counted
twice). Processes are CPU processes (register_cpu) or plain attached processes.
"""
from __future__ import annotations

import multiprocessing
import os
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import hooks
from ..arena import Arena
from ..cpu import register_cpu
from ..errors import Busy
from ..memcg import Cgroups
from ..memcg.cgroup import MemCgroup
from ..segment import H_DRAIN_LOCK

Ledger = dict[str, int]


@dataclass
class Context:
    """What a script sees in its process: the arena and its cgroup tree."""

    arena: Arena
    tree: Cgroups

    def __getitem__(self, name: str) -> MemCgroup:
        return self.tree.cgroup(name)


@dataclass(frozen=True)
class Proc:
    """One process: CPU `cpu` (None: a plain attached process), its set-up and script."""

    cpu: int | None
    script: Callable[[Context], Ledger]
    setup: Callable[[Context], None] | None = None
    does: str = ""


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    procs: tuple[Proc, ...]
    designs: tuple[str, ...]                    # the designs it runs under
    cgroups: tuple[str, ...] = ("g",)
    batch: int = 64
    ncpus: int = 2
    forced: bool = False
    expect: dict[str, bool] = field(default_factory=dict)    # design: violations found
    prepare: Callable[[Arena, Cgroups], None] | None = None  # after the tree, unexplored
    base: dict[str, int] = field(default_factory=dict)       # pages the set-up charged
    note: str = ""


class Run:
    """A scenario under one design: its arena and tree, and its ledger."""

    def __init__(self, scenario: Scenario, design: str) -> None:
        self.scenario, self.design = scenario, design
        self.arena = arena = Arena.create(ncpus=scenario.ncpus, max_counters=16,
                                          max_writers=4)
        try:
            arena.wait_timeout = 3600.0
            arena.drain_timeout = 3600.0
            tree = Cgroups(arena, variant=design, batch=scenario.batch)
            for name in scenario.cgroups:
                tree.create(name)
            if scenario.prepare is not None:
                scenario.prepare(arena, tree)
            self.base: Ledger = dict(scenario.base)
        except BaseException:
            self.close()
            raise

    def context(self) -> Context:
        tree = Cgroups(self.arena)
        tree.cgroups()                          # every handle, before the points
        return Context(self.arena, tree)

    def ledger(self, results: Sequence[Any]) -> Ledger:
        total = dict(self.base)
        for result in results:
            if isinstance(result, dict):
                for name, pages in result.items():
                    total[name] = total.get(name, 0) + pages
        return total

    def close(self) -> None:
        self.arena.close()
        self.arena.unlink()


# ---- scripts ----------------------------------------------------------------------------

def charge(name: str, n: int = 1) -> Callable[[Context], Ledger]:
    def script(ctx: Context) -> Ledger:
        return {name: n if ctx[name].try_charge(n) else 0}
    script.__name__ = f"try_charge({name}, {n})"
    return script


def charge_uncharge(name: str) -> Callable[[Context], Ledger]:
    """One page charged, then one uncharged (if the charge succeeded)."""
    def script(ctx: Context) -> Ledger:
        g = ctx[name]
        if not g.try_charge(1):
            return {}
        g.uncharge(1)
        return {}
    return script


def charges(name: str, *ns: int) -> Callable[[Context], Ledger]:
    def script(ctx: Context) -> Ledger:
        return {name: sum(n for n in ns if ctx[name].try_charge(n))}
    return script


def offline(name: str) -> Callable[[Context], Ledger]:
    def script(ctx: Context) -> Ledger:
        ctx[name].offline()
        return {}
    return script


def drain_all(name: str) -> Callable[[Context], Ledger]:
    def script(ctx: Context) -> Ledger:
        ctx.tree.drain_all_stock(ctx[name])
        return {}
    return script


def free_stock(name: str) -> Callable[[Context], Ledger]:
    def script(ctx: Context) -> Ledger:
        for counter in ctx[name].counters:
            counter.free_stock()
        return {}
    return script


def set_max(name: str, n: int) -> Callable[[Context], Ledger]:
    def script(ctx: Context) -> Ledger:
        try:
            ctx[name].memory.set_max(n)
        except Busy:
            pass
        return {}
    return script


def hotplug_dead(cpu: int) -> Callable[[Context], Ledger]:
    def script(ctx: Context) -> Ledger:
        ctx.arena.hotplug_cpu_dead(cpu)
        return {}
    return script


def stock_one(name: str) -> Callable[[Context], None]:
    """Set-up of a CPU: one page charged, so that its stock holds batch - 1."""
    def setup(ctx: Context) -> None:
        assert ctx[name].try_charge(1)
    return setup


def charge_each(*names: str) -> Callable[[Context], None]:
    """Set-up of a CPU: one page charged to each cgroup, in turn."""
    def setup(ctx: Context) -> None:
        assert all(ctx[name].try_charge(1) for name in names)
    return setup


def stock_pages(name: str, left: int) -> Callable[[Context], None]:
    """Set-up of a CPU: pages charged until its stock holds `left` pages."""
    def setup(ctx: Context) -> None:
        g = ctx[name]
        assert g.try_charge(1) and g.try_charge(ctx.tree.options["batch"] - 1 - left)
    return setup


# ---- preparations (the controller, before the processes fork) ------------------------------

def drainer_busy(arena: Arena, tree: Cgroups) -> None:
    """Another drain_all_stock is running: the single-drainer lock is held by a
    live process (the controller), so every drain_all_stock loses its trylock."""
    arena._slots.store(H_DRAIN_LOCK, os.getpid())


def dead_cpu1_with_stock(arena: Arena, tree: Cgroups) -> None:
    """CPU 1 charged g one page (its stock holds batch - 1), then died inside its
    next charge, a miss of 64 pages, its first level (g) charged: an op for the
    hotplug path to roll back."""
    def cpu1() -> None:
        register_cpu(arena, 1)
        g = Cgroups(arena).cgroup("g")
        g.try_charge(1)
        hooks.install("charge:level", lambda point: os.kill(os.getpid(), signal.SIGKILL))
        g.try_charge(64)
        os._exit(1)                                 # not reached
    child = multiprocessing.get_context("fork").Process(target=cpu1)
    child.start()
    child.join()


PER_COUNTER = ("fixed", "v2", "rfc", "v4")

SCENARIOS: dict[str, Scenario] = {s.name: s for s in (
    Scenario(
        "offline-drain", "css offline racing drain_all_stock (E4 under rfc)",
        (Proc(0, charge("g"), stock_one("g"), "a stock hit on g"),
         Proc(1, drain_all("h"), None, "drain_all_stock(h)"),
         Proc(None, offline("g"), None, "g goes offline")),
        PER_COUNTER, cgroups=("g", "h"),
        base={"g": 1}, expect={"rfc": True, "v2": True, "fixed": False, "v4": False}),
    Scenario(
        "disable-hit", "disable_stock racing a stock hit (E5 under v2)",
        (Proc(0, charge_uncharge("g"), stock_one("g"), "a stock hit on g, then an uncharge"),
         Proc(1, offline("g"), None, "g goes offline; another drain runs")),
        PER_COUNTER, prepare=drainer_busy,
        base={"g": 1}, expect={"v2": True, "rfc": True, "fixed": False, "v4": False}),
    Scenario(
        "set-max", "set_max racing try_charge",
        (Proc(0, charges("g", 1, 2), None, "two charges on g"),
         Proc(1, set_max("g", 1), None, "g's max set to 1")),
        PER_COUNTER,
        expect={"fixed": False, "v2": False, "rfc": False, "v4": False}),
    Scenario(
        "hotplug-deposit", "hotplug of a dead CPU racing a deposit",
        (Proc(0, charge("g"), None, "a charge on g that deposits its surplus"),
         Proc(2, hotplug_dead(1), None,
              "CPU 1 (died inside a charge, stock 63) repaired and reclaimed")),
        PER_COUNTER, prepare=dead_cpu1_with_stock, ncpus=3,
        base={"g": 1}, expect={"fixed": False, "v2": False, "rfc": False, "v4": False},
        note="the dead CPU 1's first page is in the ledger; its second charge is "
             "rolled back"),
    Scenario(
        "free-charge", "free_stock racing a charge (fixed's precondition ignored)",
        (Proc(0, charge("g"), stock_one("g"), "a stock hit on g"),
         Proc(1, free_stock("g"), None, "free_stock(g) while g still charges")),
        ("fixed", "v2", "v4"),
        base={"g": 1}, expect={"fixed": True, "v2": True, "v4": False},
        note="free_stock's contract: nobody charges the counter any more"),
    Scenario(
        "v4-drain", "v4 remote drain racing a consume and a deposit",
        (Proc(0, charges("g", 1, 63), stock_one("g"), "a hit, then a miss that deposits"),
         Proc(1, drain_all("g"), None, "drain_all_stock(g), remotely")),
        ("v4",), base={"g": 1}, expect={"v4": False}),
    Scenario(
        "legacy-evict", "a legacy eviction racing drain_all_stock",
        (Proc(0, charge("A8"), charge_each("A1", "A2", "A3", "A4", "A5", "A6", "A7"),
              "a charge on A8 evicts A1 from CPU 0's 7 slots"),
         Proc(1, drain_all("A1"), None, "drain_all_stock(A1)")),
        ("legacy",), cgroups=tuple(f"A{i}" for i in range(1, 9)),
        base={f"A{i}": 1 for i in range(1, 8)}, expect={"legacy": False}),
    Scenario(
        "planted", "a design whose deposit skips the slot lock, racing a remote drain",
        (Proc(0, charge("g", 2), stock_pages("g", 1), "a miss on g that deposits its surplus"),
         Proc(1, drain_all("g"), None, "drain_all_stock(g), remotely, under the lock")),
        ("planted", "planted-fixed"), base={"g": 63},
        expect={"planted": True, "planted-fixed": False}),
)}
