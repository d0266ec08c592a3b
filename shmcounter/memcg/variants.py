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
    legacy  the old memcg_stock_pcp, 7 slots per CPU (legacy.py).

A Design gets the cgroup's counters; it never decides when to call (cgroups.py).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from ..drain import drain_stock
from ..errors import Busy
from ..segment import STOCK_NR
from . import legacy

if TYPE_CHECKING:
    from ..arena import Arena
    from ..page_counter import PageCounter


class Design:
    """The per-counter stock of the series (a base for fixed, v2 and rfc)."""

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

    def drain_all(self, arena: Arena, counters: Sequence[PageCounter]) -> None:
        """The draining part of drain_all_stock, single-drainer lock held: one work
        message per online CPU drains every counter (v2, V4)."""
        drain_stock(arena, counters)


class V2(Design):
    name = "v2"

    def offline(self, counters: Sequence[PageCounter], drain_all: Callable[[], object]) -> None:
        drain_all()                                   # V4 order: drain, then disable
        for counter in counters:
            counter.disable_stock()
            _drain_stock_nolock(counter)


class RFC(Design):
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


class Legacy(Design):
    """The old design: no per-counter stock; the CPU's 7 slots (legacy.py)."""

    name = "legacy"

    def online(self, counter: PageCounter, batch: int) -> None:
        pass

    def offline(self, counters: Sequence[PageCounter], drain_all: Callable[[], object]) -> None:
        drain_all()

    def free(self, counter: PageCounter) -> None:
        """css_free happens once the last reference is gone, and a slot that
        caches the cgroup holds one, even with 0 pages (docs/kernel-semantics.md
        §Limit writers and cgroup death)."""
        cpus = legacy.cached_on(counter._arena, counter._index + 1)
        if cpus:
            raise Busy(f"cgroup {counter.name!r} is still cached by the stock of CPUs "
                       f"{cpus}: drain_all_stock it (and wait_flushed) first")


DESIGNS: dict[str, Design] = {d.name: d for d in (Design(), V2(), RFC(), Legacy())}


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

