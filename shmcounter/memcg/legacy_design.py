"""The legacy design: the old memcg_stock_pcp, 7 cached cgroups per CPU, that the
series replaces (docs/stock-design.md §Old design). Its stock is per CPU, not per
counter (legacy.py: the slots, their C steps and their place on the CPU paths);
this module is the design: its cgroup handle, its charge attempt and its
asynchronous drain_all_stock.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from .. import cpuhp
from ..errors import Busy
from ..page_counter import check_nr
from . import legacy
from ._legacy import MC_FLUSHING, MC_SLOTS, NR_MEMCG_STOCK, cgroup_ops
from .cgroup import FREED, MemCgroup
from .section import CG_STATE, CG_WORDS, EVICTIONS, M_EVICTION, M_VARIANT
from .variants import DESIGNS, Design, register_design

if TYPE_CHECKING:
    from ..page_counter import PageCounter
    from ..segment import Segment as Arena
    from .cgroups import Cgroups


class _Uncharge(Protocol):
    def __call__(self, n: int, *, kmem: bool = False) -> None: ...


class LegacyCgroup(MemCgroup):
    """A cgroup of the legacy design: its stock is the CPU's slot that caches it.

    try_charge(n) and uncharge(n, kmem=False) are each one C call from the
    caller's frame (_legacy.cgroup_ops): the consume_stock hit, or the op on the
    memory counter's path that charges and refills, then the eviction's second
    op; the refill_stock of a kmem uncharge likewise. Python takes over where C
    cannot finish (_after_refusal, _uncharge_stepwise; the C module says when).
    """

    uncharge: _Uncharge

    def _fast_try_charge(self) -> Callable[[int], bool]:
        """The C ops of this cgroup, built once (by MemCgroup.__init__): binds
        uncharge, returns try_charge. Its tag in the legacy slots is its memory
        counter's index + 1."""
        arena = self._tree._arena
        memcg = arena._memcg
        ops = cgroup_ops(self.memory, self._after_refusal, self._uncharge_stepwise,
                         partial(legacy._uncharge_evicted, arena), arena._handles,
                         self._record + CG_STATE, FREED, memcg.cgroups_slot + CG_STATE,
                         CG_WORDS, memcg.slot + M_EVICTION, EVICTIONS.index("random"))
        self.uncharge = ops.uncharge
        return ops.try_charge

    def _after_refusal(self, nr_pages: int, refused: PageCounter | None) -> bool:
        """try_charge_memcg after its first attempt in C was refused by counter
        `refused` (memory.events, the repair of dead writers, drain_all_stock, the
        retry: cgroups.py), or did not run (None: all of it in Python)."""
        if refused is None:
            return self._try_charge(nr_pages)
        return self._tree._try_charge(self, nr_pages, refused)

    def _uncharge_stepwise(self, n: int, kmem: bool = False) -> None:
        """uncharge in Python steps: a folio uncharge goes through the hierarchy;
        kmem=True (kmem and socket pages) returns the pages to this CPU's slot
        (refill_stock)."""
        nr_pages = check_nr(n)
        if not isinstance(kmem, bool):
            raise TypeError(f"kmem must be a bool, got {kmem!r}")
        self._check_alive()
        if kmem:
            legacy.uncharge_to_stock(self._tree._arena, self.memory, nr_pages)
        else:
            self.memory.uncharge(nr_pages)

    def stock(self, cpu: int) -> int:
        """Pages CPU `cpu`'s slot caching this cgroup holds (its cached half; pages
        of an eviction in flight, in a pending half, are not counted)."""
        arena = self._tree._arena
        arena._cpu_slot(cpu)                          # validates cpu
        return sum(nr for index, nr in legacy.slots_of(arena, cpu) if index == self._index)


class Legacy(Design):
    """The old design: no per-counter stock; the CPU's 7 slots (legacy.py)."""

    name = "legacy"
    cgroup_class = LegacyCgroup

    def check_options(self, asked: dict[str, Any]) -> None:
        if asked["first_child_drain"]:
            raise ValueError("first_child_drain is v2's V6; the legacy design has no "
                             "per-counter stock to drain")
        if asked["memsw"]:
            raise ValueError("the legacy design is modelled for memory only (memsw=False): "
                             "its one stock per cgroup serves two counter trees")
        if asked["batch"] not in (None, 64):
            raise ValueError("the legacy design's batch is MEMCG_CHARGE_BATCH = 64")

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

    def charge_once(self, tree: Cgroups, g: MemCgroup, nr_pages: int,
                    greedy: bool) -> PageCounter | None:
        return legacy.try_charge(tree._arena, g.memory, nr_pages, greedy)

    def drain_all_stock(self, tree: Cgroups, g: MemCgroup) -> bool:
        """Flag the CPUs that cache the subtree and do not wait (legacy.drain_all)."""
        return legacy.drain_all(tree._arena, {m._index + 1 for m in tree._subtree(g)})

    def wait_flushed(self, arena: Arena, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while pending := [cpu for cpu in legacy.flushing(arena) if arena.row_owner_alive(cpu)]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"CPUs {pending} did not serve their drain work "
                                   f"within {timeout} s")
            time.sleep(0.0005)


register_design(Legacy())


# ---- the legacy stock on the CPU paths (cpuhp.py) ------------------------------

def _is_legacy(arena: Arena) -> bool:
    """Does this arena's cgroup tree run the legacy design (its slots are in use)?"""
    return int(arena._memcg.header[M_VARIANT]) == 1 + list(DESIGNS).index(Legacy.name)


def _online(arena: Arena, cpu: int) -> None:
    """register_cpu: this process's block is CPU `cpu`'s; a drain request flagged
    for the CPU's dead predecessor is forgotten."""
    arena._memcg.block = arena._memcg.cpu_slot(cpu)
    arena._slots.store(arena._memcg.block + MC_FLUSHING, 0)


def _offline(arena: Arena, cpu: int) -> None:
    if _is_legacy(arena):
        legacy.cpu_offline(arena, cpu)
    arena._memcg.block = -1


def _check_dead(arena: Arena, cpu: int) -> None:
    if _is_legacy(arena):
        legacy.check_slots(arena, cpu)


def _dead(arena: Arena, cpu: int) -> dict[str, int]:
    return legacy.drain_dead(arena, cpu) if _is_legacy(arena) else {}


def _owns_slot(arena: Arena, row: int, slot: int) -> bool:
    """An intent record of CPU row `row` may name one of its 7 slot words."""
    return 0 <= slot - arena._memcg.cpu_slot(row) - MC_SLOTS < NR_MEMCG_STOCK


cpuhp.setup_state(cpuhp.CpuSubsystem(
    "memcg legacy stock", online=_online, offline=_offline, check_dead=_check_dead,
    dead=_dead, work=legacy.serve_flush, stock_pages=legacy.stock_pages,
    owns_slot=_owns_slot))
