"""A planted bug, for the explorer to find: two test-only designs that differ by one lock.

Both drain remotely: drain_all_stock's caller takes every CPU's slot itself, under
the slot's lock (trylock; a busy slot is left to a later drain), and uncharges
it. Their try_charge deposits the surplus in the CPU's slot as a read, then a
write of nr_pages:

    planted-fixed  under the slot lock (trylock; busy: uncharge the surplus)
    planted        without it: the one lock removed from the deposit path. A
                   remote take between the read and the write is overwritten,
                   and its pages, uncharged by the drain, come back in the stock.

Registered only while the explorer runs one of them (register), never in the
library's list of designs otherwise.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from ..memcg import variants
from ..memcg.variants import PerCounter
from ..segment import PC_BATCH, STOCK_NR

if TYPE_CHECKING:
    from ..arena import Arena
    from ..memcg.cgroup import MemCgroup
    from ..memcg.cgroups import Cgroups
    from ..page_counter import PageCounter


class Planted(PerCounter):
    name = "planted"
    deposit_locked = False

    def charge_once(self, tree: Cgroups, g: MemCgroup, nr_pages: int,
                    greedy: bool) -> PageCounter | None:
        counter = g.memory
        if tree._arena._stock_row >= 0 and counter._consume_stepwise(nr_pages):
            return None
        return self._charge_slow(counter, nr_pages)

    def _charge_slow(self, counter: PageCounter, nr_pages: int) -> PageCounter | None:
        arena, slots = counter._arena, counter._slots
        slot = counter._local_slot()
        batch = slots.load(counter._c + PC_BATCH) if slot >= 0 else 0
        charge = max(batch, nr_pages)
        with arena._writer.op(counter, slot) as kbase:
            fail = counter._try_charge_path(charge, kbase)
            if fail is not None and charge > nr_pages:
                charge = nr_pages
                fail = counter._try_charge_path(charge, kbase)
            if fail is None and charge > nr_pages:
                surplus = charge - nr_pages
                owner = arena._stock_owner
                if self.deposit_locked and not slots.stock_trylock(slot, owner):
                    counter._cancel_path(surplus, kbase)
                    return None
                have = slots.load(slot + STOCK_NR)
                slots.store(slot + STOCK_NR, have + surplus)
                if self.deposit_locked:
                    slots.stock_unlock(slot)
        return fail

    def drain_all(self, arena: Arena, counters: Sequence[PageCounter]) -> None:
        """Every CPU's slot of each counter, from the caller, under the slot lock."""
        slots, me = arena._slots, os.getpid()
        for counter in counters:
            sid = counter._stock_id()
            for cpu in range(arena.ncpus):
                slot = arena._stock_slot(cpu, sid)
                with arena._writer.op(counter, slot) as kbase:
                    if not slots.stock_trylock(slot, me):
                        continue
                    taken = slots.exchange(slot + STOCK_NR, 0)
                    slots.stock_unlock(slot)
                    arena._writer.forward(-taken, len(counter._path))
                    counter._cancel_path(taken, kbase)


class PlantedFixed(Planted):
    name = "planted-fixed"
    deposit_locked = True


PLANTED = {design.name: design for design in (Planted(), PlantedFixed())}


@contextmanager
def register(name: str) -> Iterator[None]:
    """Make design `name` available while the block runs, if it is a planted one."""
    design = PLANTED.get(name)
    if design is None or name in variants.DESIGNS:
        yield
        return
    variants.register_design(design)
    try:
        yield
    finally:
        del variants.DESIGNS[name]
