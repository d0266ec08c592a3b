"""MemCgroup: a handle on one cgroup of a tree (cgroups.py), with the per-counter
stock's charge, uncharge and stock; a design with another per-CPU stock gives its
own subclass (Design.cgroup_class, legacy_design.py).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..page_counter import PAGE_COUNTER_MAX, PageCounter, check_nr
from .section import CG_EVENTS_MAX, CG_EVENTS_MAX_LOCAL, CG_MEMSW, CG_STATE, CG_WORDS

if TYPE_CHECKING:
    from ..arena import Arena
    from .cgroups import Cgroups

PAGE_SIZE = 4096
STATES = ("none", "online", "offline", "freed")
ONLINE, OFFLINE, FREED = 1, 2, 3


class MemCgroup:
    """A handle on one cgroup of a tree. memory and memsw are its counters.

    try_charge(n) -> bool: try_charge_memcg for n pages. A live CPU that does not
    serve the drain in time raises DrainTimeout (drain_stock). Its first attempt,
    the stock hit or the walk of one op, is one C call from the caller's frame
    (_fast_try_charge); what follows a refusal (memory.events, the repair of dead
    writers, drain_all_stock, the retry) is Python (cgroups.py).
    """

    try_charge: Callable[[int], bool]

    def __init__(self, tree: Cgroups, index: int, parent: MemCgroup | None) -> None:
        self._tree = tree
        self._index = index
        self._record = tree._arena._memcg.cgroups_slot + index * CG_WORDS
        self.memory: PageCounter = tree._arena._handle(index)
        memsw = int(tree._arena._memcg.cgroups[index, CG_MEMSW])
        self.memsw: PageCounter | None = tree._arena._handle(
            memsw, f"cgroup {index}'s memsw counter") if memsw != -1 else None
        self.parent = parent
        self.name = self.memory.name
        self.try_charge = self._fast_try_charge()

    # ---- charging -------------------------------------------------------------

    def _fast_try_charge(self) -> Callable[[int], bool]:
        """The per-counter stock's try_charge: with memory alone, the C charge of
        the memory counter (Counter._charge_or: the stock hit, else one op of
        page_counter_try_charge, the walk refused for a freed cgroup), then
        _after_refusal; with memsw, Python throughout."""
        if self.memsw is not None:
            return self._try_charge
        return self.memory._charge_or(self._after_refusal, self._record + CG_STATE, FREED)

    def _after_refusal(self, nr_pages: int, refused: PageCounter | None) -> bool:
        """try_charge_memcg after its first attempt in C was refused by counter
        `refused`, or did not run (None: hooks armed, a freed cgroup, or the op
        must wait in Python)."""
        if refused is None:
            return self._try_charge(nr_pages)
        ok, refused = self.memory._refused(nr_pages, refused)   # PageCounter's repair
        return ok or self._tree._try_charge(self, nr_pages, refused)

    def _try_charge(self, n: int) -> bool:
        """try_charge_memcg, all of it in Python."""
        nr_pages = check_nr(n)
        self._check_alive()
        return self._tree._try_charge(self, nr_pages)

    def uncharge(self, n: int, *, kmem: bool = False) -> None:
        """Uncharge n pages from memory (and memsw). kmem=True is the kmem and
        socket style (obj_cgroup_uncharge_pages, mem_cgroup_sk_uncharge): the old
        design returns the pages to the CPU's stock (refill_stock); the series
        uncharges them through the hierarchy like any folio (E16), except the
        RFC, where every uncharge returns pages to the stock."""
        nr_pages = check_nr(n)
        if not isinstance(kmem, bool):
            raise TypeError(f"kmem must be a bool, got {kmem!r}")
        self._check_alive()
        self.memory.uncharge(nr_pages)
        if self.memsw is not None:
            self.memsw.uncharge(nr_pages)

    # ---- lifecycle ------------------------------------------------------------

    def offline(self) -> None:
        """css_offline, in the tree's design's order (fixed: disable_stock, then
        drain_all_stock). The cgroup still takes charges and uncharges."""
        tree = self._tree
        if self.parent is None:
            raise ValueError("the root cgroup cannot go offline")
        if self.state != "online":
            raise ValueError(f"cgroup {self.name!r} is {self.state}, not online")
        online_children = [g.name for g in tree._children(self) if g.state == "online"]
        if online_children:
            raise ValueError(f"cgroup {self.name!r} has online children {online_children}")
        tree._design.offline(self.counters, lambda: tree.drain_all_stock(self))
        tree._arena._slots.store(self._record + CG_STATE, OFFLINE)

    def free(self) -> None:
        """css_free: free_stock on each counter (in the fixed design, drains what
        is left on every CPU without the lock). Call it once nobody charges or
        uncharges the cgroup any more, as the kernel runs css_free after the last
        reference is gone: a charge still in flight could land in a freed stock."""
        if self.state != "offline":
            raise ValueError(f"cgroup {self.name!r} is {self.state}; offline() it first")
        for counter in self.counters:               # legacy: Busy while a slot caches it
            self._tree._design.free(counter)
        self._tree._arena._slots.store(self._record + CG_STATE, FREED)

    # ---- reading --------------------------------------------------------------

    @property
    def counters(self) -> list[PageCounter]:
        self._tree._arena._check_open()
        return [self.memory] + ([self.memsw] if self.memsw is not None else [])

    @property
    def state(self) -> str:
        return decode(self._tree._arena, f"cgroup {self._index}'s state",
                       self._tree._arena._slots.load(self._record + CG_STATE), STATES)

    @property
    def events(self) -> dict[str, int]:
        """memory.events: max events of this cgroup and its descendants."""
        return {"max": int(self._tree._arena._memcg.cgroups[self._index, CG_EVENTS_MAX])}

    @property
    def events_local(self) -> dict[str, int]:
        """memory.events.local: max events of this cgroup alone."""
        return {"max": int(self._tree._arena._memcg.cgroups[self._index, CG_EVENTS_MAX_LOCAL])}

    def stock(self, cpu: int) -> int:
        """Pages CPU `cpu` holds in stock for this cgroup's memory counter."""
        return self.memory.stock(cpu)

    def stat(self) -> dict[str, Any]:
        """The cgroup's files as the kernel shows them (bytes; "max" unlimited),
        plus the per-CPU stock in pages."""
        memory = self.memory
        out: dict[str, Any] = {
            "memory.current": memory.usage * PAGE_SIZE,
            "memory.max": _bytes_or_max(memory.max),
            "memory.peak": memory.watermark * PAGE_SIZE,
            "memory.events": self.events,
            "memory.events.local": self.events_local,
            "memory.failcnt": memory.failcnt,
        }
        if self.memsw is not None:
            out["memory.memsw.usage_in_bytes"] = self.memsw.usage * PAGE_SIZE
            out["memory.memsw.limit_in_bytes"] = _bytes_or_max(self.memsw.max)
        out["stock"] = [self.stock(cpu) for cpu in range(self._tree._arena.ncpus)]
        return out

    def _check_alive(self) -> None:
        if self._tree._arena._slots.load(self._record + CG_STATE) == FREED:
            raise ValueError(f"cgroup {self.name!r} is freed")

    def __repr__(self) -> str:
        if self._tree._arena.closed:
            return f"<MemCgroup {self.name!r} (arena closed)>"
        return (f"<MemCgroup {self.name!r} {self.state} current={self.memory.usage} "
                f"events.max={self.events['max']}>")


def decode(arena: Arena, field: str, word: int, names: tuple[str, ...], first: int = 0) -> str:
    """names[word - first]; ArenaCorrupt if the word `field` names none of them."""
    if not first <= word < first + len(names):
        raise arena._corrupt(field, word, f"not {first} + an index of {names}" if first
                             else f"not an index of {names}")
    return names[word - first]


def _bytes_or_max(pages: int) -> int | str:
    return "max" if pages == PAGE_COUNTER_MAX else pages * PAGE_SIZE
