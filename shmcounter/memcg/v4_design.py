"""The v4 design: the series' v4 (W0, W1), the lockless stock.

One word per (counter, CPU), changed by CAS only (enable_stock(lockless=True),
shmcounter/stock.py). The lifecycle is the fixed order: css_offline disables
(batch = 0), then drain_all_stock; css_free drains what is left (free_stock).
drain_all_stock takes every CPU's word of each counter from the calling
process, synchronously, under the single-drainer trylock: no work message, so
no CPU has to run for it (E13 does not arise). With the tree option
stock_cap=True, the E14 cap the reviewer proposed (W0r): a deposit that would
leave more than batch pages in a word takes the word instead and uncharges it.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .. import hooks
from ..drain import drain_lock, drain_lockless_at_once, single_drainer
from .section import M_STOCK_CAP
from .variants import PerCounter, register_design

if TYPE_CHECKING:
    from ..arena import Arena
    from ..page_counter import PageCounter
    from .cgroup import MemCgroup
    from .cgroups import Cgroups


class V4(PerCounter):
    """The lockless stock in the fixed order (offline, free: PerCounter's)."""

    name = "v4"
    has_stock_cap = True

    def online(self, counter: PageCounter, batch: int) -> None:
        """css_online: a lockless stock, capped if the tree says so (stock_cap).
        If the arena has no stock left, the counter runs without one."""
        if batch:
            cap = bool(counter._arena._memcg.header[M_STOCK_CAP])
            counter.enable_stock(batch, lockless=True, cap=cap)

    def drain_all_stock(self, tree: Cgroups, g: MemCgroup) -> bool:
        """drain_all_stock(g): the single-drainer trylock (the drain lock itself),
        then every CPU's word of each counter of g's subtree (a counter without
        stock: nothing to take). With the lock free, all of it is one C call
        (drain_lockless_at_once); else single_drainer decides (a live holder:
        False; a dead one: taken over, repaired), then one C call per counter.
        The subtree's counters come from a cache kept until a counter is
        published. Both keep a drain's tail short (README, "Drains and hotplug")."""
        counters = tree._subtree_counters(g)
        if drain_lockless_at_once(counters):
            return True
        with single_drainer(tree._arena) as got:
            if got:
                if hooks.ARMED:
                    hooks.at("drain_all:locked")
                for counter in counters:
                    counter._drain_lockless()
        return got

    def drain_all(self, arena: Arena, counters: Sequence[PageCounter]) -> None:
        """The draining part of drain_all_stock, the single-drainer lock held
        (which is the drain lock: drain_lock nests in it): each counter's word on
        each CPU, taken remotely in an op of this process's row, whatever the
        CPUs are doing; synchronous."""
        with drain_lock(arena):
            for counter in counters:
                counter._drain_lockless()


register_design(V4())
