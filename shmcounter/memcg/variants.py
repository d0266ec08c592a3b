"""The designs a Cgroups tree can run: where the charge stock lives and how a
cgroup's death returns it (docs/stock-design.md §Disable and free, §2 E4-E6, §3).

    fixed   the U0/v4 order: css_offline disables (batch = 0 only), then
            drain_all_stock; css_free drains what is left (free_stock).
    v2      the v2 code (V1, V4): css_offline runs drain_all_stock, then disable,
            which sets batch = 0 and drains every CPU's stock without the lock
            (drain_stock_nolock); free drains again. Race E5.
    rfc     the RFC (R1, R3-R5): uncharges return pages to the stock; drain_all
            drains each counter on each CPU in turn; disable cancels the sum of
            the stocks without zeroing them; free drops the stocks undrained.
            Race E4.
    legacy  the old memcg_stock_pcp, 7 slots per CPU (legacy_design.py).
    v4      the series' v4, the lockless stock (v4_design.py).

A design is one object: it owns what css_online, css_offline and css_free do
with a cgroup's counters, one charge attempt of try_charge_memcg, drain_all_stock,
and the class of its cgroup handles (charge, uncharge and stock of one cgroup).
It never decides when to call (cgroups.py). Designs register here
(register_design); the segment records a tree's design as 1 + its index in
DESIGNS, so every process registers the same designs in the same order (the
import of shmcounter.memcg).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..drain import drain_stock
from ..segment import STOCK_NR
from ..stock import BATCH_LIMIT
from .cgroup import MemCgroup
from .section import EVICTIONS

if TYPE_CHECKING:
    from ..arena import Arena
    from ..page_counter import PageCounter
    from .cgroups import Cgroups



class Design:
    """What every design provides (cgroups.py calls these)."""

    name: str
    cgroup_class: type[MemCgroup] = MemCgroup
    has_stock_cap = False                  # runs with the tree option stock_cap

    def check_options(self, asked: dict[str, Any]) -> None:
        """ValueError for tree options this design cannot run with."""

    def online(self, counter: PageCounter, batch: int) -> None:
        """css_online for one of a new cgroup's counters."""
        raise NotImplementedError

    def offline(self, counters: Sequence[PageCounter], drain_all: Callable[[], object]) -> None:
        """css_offline. drain_all() is the tree's drain_all_stock of the cgroup."""
        raise NotImplementedError

    def free(self, counter: PageCounter) -> None:
        """css_free for one of the cgroup's counters."""
        raise NotImplementedError

    def charge_once(self, tree: Cgroups, g: MemCgroup, nr_pages: int,
                    greedy: bool) -> PageCounter | None:
        """One attempt of try_charge_memcg: None, or the counter that refused.
        greedy=False after a first refusal (the old design then stops batching)."""
        raise NotImplementedError

    def drain_all_stock(self, tree: Cgroups, g: MemCgroup) -> bool:
        """drain_all_stock(g): False if another drain runs (the trylock)."""
        raise NotImplementedError

    def wait_flushed(self, arena: Arena, timeout: float) -> None:
        """Wait for the drain work an asynchronous drain_all_stock sent."""


class PerCounter(Design):
    """The per-counter stock of the series, in the U0/v4 order (fixed; a base for
    v2 and rfc)."""

    name = "fixed"
    uncharge_to_stock = False

    def online(self, counter: PageCounter, batch: int) -> None:
        """css_online: the counter gets a per-CPU stock. If the arena has no stock
        left, the counter runs without one (memcg ignores -ENOMEM)."""
        if batch:
            counter.enable_stock(batch, uncharge_to_stock=self.uncharge_to_stock)

    def offline(self, counters: Sequence[PageCounter], drain_all: Callable[[], object]) -> None:
        """css_offline. drain_all() is the tree's drain_all_stock of the cgroup."""
        for counter in counters:
            counter.disable_stock()
        drain_all()

    def free(self, counter: PageCounter) -> None:
        """css_free."""
        counter.free_stock()

    def charge_once(self, tree: Cgroups, g: MemCgroup, nr_pages: int,
                    greedy: bool) -> PageCounter | None:
        return tree._charge_counters(g, nr_pages)

    def drain_all_stock(self, tree: Cgroups, g: MemCgroup) -> bool:
        return tree._drain_all_counters(g, self.drain_all)

    def drain_all(self, arena: Arena, counters: Sequence[PageCounter]) -> None:
        """The draining part of drain_all_stock, single-drainer lock held: one work
        message per online CPU drains every counter (v2, V4)."""
        drain_stock(arena, counters)


class V2(PerCounter):
    name = "v2"

    def offline(self, counters: Sequence[PageCounter], drain_all: Callable[[], object]) -> None:
        drain_all()                                   # V4 order: drain, then disable
        for counter in counters:
            counter.disable_stock()
            _drain_stock_nolock(counter)


class RFC(PerCounter):
    name = "rfc"
    uncharge_to_stock = True

    def offline(self, counters: Sequence[PageCounter], drain_all: Callable[[], object]) -> None:
        drain_all()
        for counter in counters:
            _disable_rfc(counter)

    def free(self, counter: PageCounter) -> None:
        counter._free_stock(drain=False)             # free_percpu, no drain

    def drain_all(self, arena: Arena, counters: Sequence[PageCounter]) -> None:
        for counter in counters:                      # page_counter_drain_stock each
            drain_stock(arena, [counter])


DESIGNS: dict[str, Design] = {}


def register_design(design: Design) -> None:
    """Make `design` available as Cgroups(arena, variant=design.name)."""
    if design.name in DESIGNS:
        raise ValueError(f"a design named {design.name!r} is registered already")
    DESIGNS[design.name] = design


def check_options(asked: dict[str, Any]) -> None:
    """ValueError unless the options given to Cgroups are well formed and the
    chosen design can run with them."""
    checks: dict[str, Callable[[object], bool]] = {
        "memsw": lambda v: isinstance(v, bool),
        "variant": lambda v: v in DESIGNS,
        "eviction": lambda v: v in EVICTIONS,
        "batch": lambda v: type(v) is int and 0 <= v < BATCH_LIMIT,
        "first_child_drain": lambda v: isinstance(v, bool),
        "stock_cap": lambda v: isinstance(v, bool),
    }
    for key, ok in checks.items():
        value = asked[key]
        if value is not None and not ok(value):
            raise ValueError(f"bad {key}: {value!r}")
    design = DESIGNS[str(asked["variant"] or "fixed")]
    if asked["stock_cap"] and not design.has_stock_cap:
        raise ValueError(f"stock_cap is v4's (the E14 cap of its lockless stock); "
                         f"the {design.name} design has none")
    design.check_options(asked)


for _design in (PerCounter(), V2(), RFC()):
    register_design(_design)


def _drain_stock_nolock(counter: PageCounter) -> int:
    """v2's drain_stock_nolock: take every CPU's stock without its lock and uncharge
    it. Safe only if nobody charges the counter any more (free); v2 also calls it
    from disable, while CPUs may still be charging (E5)."""
    arena = counter._arena
    sid = counter._stock_id()
    if sid < 0:
        return 0
    return sum(counter._drain_slot(arena._stock_slot(cpu, sid)) for cpu in range(arena.ncpus))


def _disable_rfc(counter: PageCounter) -> None:
    """The RFC's disable_stock: sum the stocks without the lock and without zeroing
    them, cancel the sum up the hierarchy, then batch = 0. The pages stay in the
    stocks although they are uncharged (E4)."""
    arena, slots = counter._arena, counter._slots
    sid = counter._stock_id()
    if sid < 0:
        return
    total = sum(slots.load(arena._stock_slot(cpu, sid) + STOCK_NR) for cpu in range(arena.ncpus))
    if total:
        counter._uncharge_hierarchy(total)
    counter.disable_stock()

