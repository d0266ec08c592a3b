"""Cgroups: a memcg tree on page counters, calling the stock APIs the way
mm/memcontrol.c does (docs/stock-design.md §memcg integration;
docs/kernel-semantics.md §try_charge_memcg).

The tree lives in the arena (memcg's section: section.py), so any attached process
opens it with Cgroups(arena) and finds a cgroup by name. A cgroup is a memory
page_counter (named like the cgroup) and, with memsw (cgroup v1), a memsw
counter (named "<name>:memsw") whose parent is the parent's memsw counter. Its
record (indexed by the memory counter) holds its state and memory.events.

try_charge is try_charge_memcg without reclaim:

    charge memsw, then memory; memory refuses -> uncharge memsw again
    refused by counter C -> memory.events max += 1 on C's cgroup
                          -> first time: repair dead writers' ops (if any),
                             drain_all_stock(C's cgroup), retry
                          -> second time: fail

Lifecycle per design (variants.py): create = css_online; offline = css_offline;
free = css_free. A cgroup is offlined only without online children, and freed
only once offline. Kill-safety is per page_counter op: a process killed between
the memsw and the memory charge of one try_charge leaves the memsw pages charged
(a completed op), every counter consistent.
"""
from __future__ import annotations

import os
import time
from typing import Any

from .. import hooks
from .._atomic import CONSUME_HIT  # = _legacy.CONSUME_HIT: both are _slots.h's
from ..arena import Arena
from ..drain import single_drainer
from ..errors import ArenaError
from ..page_counter import NR_PAGES_LIMIT, PAGE_COUNTER_MAX, PageCounter, check_limit, check_nr
from ..proc import pid_alive
from ..segment import R_WALKS, check_counter_name
from ..stock import BATCH_LIMIT, DEFAULT_BATCH
from ..stop_machine import repair_before_refusal
from ..wait import check_timeout
from . import legacy
from ._legacy import consume as legacy_consume  # the inlined hit: a global, no attribute
from .legacy import MC_EVICTIONS, MC_FLUSHES, MC_OVERFLOWS
from .section import (
    CG_WORDS,
    M_BATCH,
    M_EVICTION,
    M_FIRST_CHILD_DRAIN,
    M_MEMSW,
    M_ROOT,
    M_STATE,
    M_VARIANT,
    VARIANTS,
)
from .variants import DESIGNS, Design

ROOT = "root"
MEMSW = ":memsw"
PAGE_SIZE = 4096

# cgroup record words
CG_STATE, CG_MEMSW, CG_EVENTS_MAX, CG_EVENTS_MAX_LOCAL = range(4)
STATES = ("none", "online", "offline", "freed")
ONLINE, OFFLINE, FREED = 1, 2, 3
# memcg header state: 0 none; a pid while that process sets the tree up; READY
READY = -1


class MemCgroup:
    """A handle on one cgroup of a tree. memory and memsw are its counters."""

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
        self._tag = index + 1                         # its tag in legacy slots

    # ---- charging -------------------------------------------------------------

    def try_charge(self, n: int) -> bool:
        """try_charge_memcg for n pages (see the module docstring). A live CPU that
        does not serve the drain in time raises DrainTimeout (drain_stock).

        The stock hit is inlined here (one C call), as the kernel's
        consume_stock / page_counter fast path comes first: a cgroup with memsw,
        armed hooks or no CPU take the general path."""
        tree = self._tree
        arena = tree._arena
        row = arena._stock_row
        if row >= 0 and self.memsw is None and type(n) is int and 0 <= n < NR_PAGES_LIMIT \
                and not hooks.ARMED:
            slots = arena._slots
            if tree._legacy:
                if legacy_consume(slots, row, arena._memcg.block, self._tag, n) == CONSUME_HIT:
                    return True             # a freed cgroup is in no slot: never here
            elif slots.stock_consume(self.memory._c, row, n) == CONSUME_HIT:
                return True                 # a freed cgroup has no stock: never here
        nr_pages = check_nr(n)
        self._check_alive()
        return tree._try_charge(self, nr_pages)

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
        tree = self._tree
        if tree.variant == "legacy":
            if kmem:
                legacy.uncharge_to_stock(tree._arena, self.memory, nr_pages)
            else:
                self.memory._uncharge_hierarchy(nr_pages)
            return
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
        return _decode(self._tree._arena, f"cgroup {self._index}'s state",
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
        tree = self._tree
        if tree.variant == "legacy":
            tree._arena._cpu_slot(cpu)                  # validates cpu
            return sum(nr for index, nr in legacy.slots_of(tree._arena, cpu)
                       if index == self._index)
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


def _decode(arena: Arena, field: str, word: int, names: tuple[str, ...], first: int = 0) -> str:
    """names[word - first]; ArenaCorrupt if the word `field` names none of them."""
    if not first <= word < first + len(names):
        raise arena._corrupt(field, word, f"not {first} + an index of {names}" if first
                             else f"not an index of {names}")
    return names[word - first]


def _bytes_or_max(pages: int) -> int | str:
    return "max" if pages == PAGE_COUNTER_MAX else pages * PAGE_SIZE


class Cgroups:
    """The cgroup tree of an arena: create it, or open the one it holds.

    Cgroups(arena, memsw=False, variant="fixed", eviction="round-robin",
    batch=64, first_child_drain=False) sets up a new tree; in a process where the
    arena holds one already, Cgroups(arena) opens it, and any argument given must
    match it (ValueError otherwise).
      memsw              cgroup v1 memory+swap accounting: a second counter tree
      variant            "fixed", "v2", "rfc" or "legacy" (variants.py)
      eviction           legacy only: "round-robin" (mm tree 2026) or "random"
      batch              css_online's enable_stock batch; 0: no stock at all
      first_child_drain  v2's V6: creating a non-root parent's first child drains
                         the parent's subtree on every CPU (not with legacy)
    """

    def __init__(self, arena: Arena, memsw: bool | None = None, *,
                 variant: str | None = None, eviction: str | None = None,
                 batch: int | None = None, first_child_drain: bool | None = None) -> None:
        if not isinstance(arena, Arena):
            raise TypeError(f"arena must be an Arena, got {type(arena).__name__}")
        arena._check_open()
        asked: dict[str, Any] = {"memsw": memsw, "variant": variant, "eviction": eviction,
                                 "batch": batch, "first_child_drain": first_child_drain}
        _check_options(asked)
        self._arena = arena
        self._handles: dict[int, MemCgroup] = {}
        self._owner: dict[int, int] = {}           # counter index -> cgroup index
        if int(arena._memcg.header[M_STATE]) != READY:
            self._set_up(asked)
        stored = self.options
        wrong = {k: (v, stored[k]) for k, v in asked.items() if v is not None and v != stored[k]}
        if wrong:
            raise ValueError("this arena's cgroup tree has " + ", ".join(
                f"{k}={have!r} (asked {want!r})" for k, (want, have) in wrong.items()))
        self.variant: str = stored["variant"]
        self.memsw: bool = stored["memsw"]
        self.batch: int = stored["batch"]
        self._design: Design = DESIGNS[self.variant]
        self._legacy = self.variant == "legacy"
        self.root: MemCgroup = self._cgroup_at(int(arena._memcg.header[M_ROOT]), "memcg root")

    @classmethod
    def open(cls, arena: Arena) -> Cgroups:
        """The tree the arena holds, read-only as to its options: ArenaError if the
        arena has none (where Cgroups(arena) would create one)."""
        if int(arena._memcg.header[M_STATE]) != READY:
            raise ArenaError(f"arena {arena.name!r} holds no cgroup tree")
        return cls(arena)

    # ---- the tree in the arena --------------------------------------------------

    @property
    def options(self) -> dict[str, Any]:
        h = self._arena._memcg.header
        return {"memsw": bool(h[M_MEMSW]),
                "variant": _decode(self._arena, "memcg variant", int(h[M_VARIANT]), VARIANTS, 1),
                "eviction": _decode(self._arena, "memcg eviction", int(h[M_EVICTION]),
                                    legacy.EVICTIONS),
                "batch": int(h[M_BATCH]),
                "first_child_drain": bool(h[M_FIRST_CHILD_DRAIN])}

    def _set_up(self, asked: dict[str, Any]) -> None:
        """Create the tree and its root cgroup, once per arena: the first process
        to claim the header does it; the others wait for it (or take over from a
        dead one: every step is redone or found done)."""
        arena, slots, me = self._arena, self._arena._slots, os.getpid()
        state = arena._memcg.slot + M_STATE
        deadline = time.monotonic() + arena.drain_timeout
        while (holder := slots.cas(state, 0, me)) != 0:
            if holder == READY:
                return
            if not pid_alive(holder) and slots.cas(state, holder, me) == holder:
                break
            if time.monotonic() > deadline:
                raise ArenaError(f"the cgroup tree of {arena.name!r} is being set up "
                                 f"by pid {holder}, which has not finished")
            time.sleep(0.001)
        try:
            self._write_tree(asked)
        except BaseException:
            slots.cas(state, me, 0)             # let another process try
            raise
        slots.store(state, READY)

    def _write_tree(self, asked: dict[str, Any]) -> None:
        arena = self._arena
        variant = asked["variant"] or "fixed"
        h = arena._memcg.header
        h[M_MEMSW] = bool(asked["memsw"])
        h[M_EVICTION] = legacy.EVICTIONS.index(asked["eviction"] or "round-robin")
        h[M_BATCH] = DEFAULT_BATCH if asked["batch"] is None else asked["batch"]
        h[M_FIRST_CHILD_DRAIN] = bool(asked["first_child_drain"])
        h[M_VARIANT] = 1 + VARIANTS.index(variant)
        try:
            root = arena.counter(ROOT)
        except KeyError:
            root = arena.new_counter(ROOT)
        memsw = None
        if h[M_MEMSW]:
            try:
                memsw = arena.counter(ROOT + MEMSW)
            except KeyError:
                memsw = arena.new_counter(ROOT + MEMSW)
        self._design = DESIGNS[variant]
        self._online(root, memsw, int(h[M_BATCH]))
        h[M_ROOT] = root._index

    def _online(self, memory: PageCounter, memsw: PageCounter | None, batch: int) -> None:
        """css_online: stock on each counter, then the record says online."""
        arena = self._arena
        for counter in (memory, memsw):
            if counter is not None:
                self._design.online(counter, batch)
        rec = arena._memcg.cgroups_slot + memory._index * CG_WORDS
        arena._slots.store(rec + CG_MEMSW, -1 if memsw is None else memsw._index)
        arena._slots.store(rec + CG_STATE, ONLINE)

    def create(self, name: str, parent: MemCgroup | None = None,
               max: int | None = None) -> MemCgroup:
        """mkdir: a new cgroup under `parent` (default root), memory.max = `max`
        pages (default unlimited; memsw.max too), css_online."""
        if not isinstance(name, str) or not name or ":" in name:
            raise ValueError(f"a cgroup name is a non-empty str without ':', got {name!r}")
        parent = self.root if parent is None else parent
        if not isinstance(parent, MemCgroup) or parent._tree._arena.name != self._arena.name:
            raise TypeError(f"parent must be a MemCgroup of this tree, got {parent!r}")
        if parent.state != "online":
            raise ValueError(f"parent {parent.name!r} is {parent.state}, not online")
        limit = PAGE_COUNTER_MAX if max is None else check_limit(max, "max")
        if self.memsw:                        # both counters or neither
            check_counter_name(name + MEMSW)
            if self._arena._published() + 2 > self._arena.max_counters:
                raise ArenaError(f"arena {self._arena.name!r} has no room for two more counters")
            if name + MEMSW in {c.name for c in self._arena.counters()}:
                raise ValueError(f"a counter named {name + MEMSW!r} already exists in this arena")
        parent = self._cgroup_at(parent._index)   # this tree's handle, even if given another's
        memory = self._arena.new_counter(name, parent.memory, limit)
        memsw = None
        if self.memsw:
            memsw = self._arena.new_counter(name + MEMSW, parent.memsw, limit)
        first_child = (bool(self._arena._memcg.header[M_FIRST_CHILD_DRAIN])
                       and parent.parent is not None
                       and not any(g.state == "online" for g in self._children(parent)))
        self._online(memory, memsw, self.batch)
        if first_child:                       # V6: drain the parent's subtree, no mutex
            self._design.drain_all(self._arena, self._stocked(parent))
        return self._cgroup_at(memory._index)

    def cgroup(self, name: str) -> MemCgroup:
        """The cgroup named `name`, created by any process. KeyError if none."""
        if not isinstance(name, str):
            raise TypeError(f"cgroup name must be a str, got {type(name).__name__}")
        try:
            index = self._arena.counter(name)._index
        except KeyError:
            index = -1
        if index < 0 or self._arena._memcg.cgroups[index, CG_STATE] == 0:
            raise KeyError(f"no cgroup named {name!r}")
        return self._cgroup_at(index)

    def cgroups(self) -> list[MemCgroup]:
        """Every cgroup, parents before children."""
        states = self._arena._memcg.cgroups[:self._arena._published(), CG_STATE]
        return [self._cgroup_at(int(i)) for i in states.nonzero()[0]]

    def _cgroup_at(self, index: int, field: str = "a cgroup's counter index") -> MemCgroup:
        g = self._handles.get(index)
        if g is None:
            self._arena._handle(index, field)        # checks index (a word, for the root)
            parent = self._arena._parent(index)
            g = MemCgroup(self, index, None if parent < 0 else self._cgroup_at(parent))
            self._handles[index] = g
            for counter in g.counters:
                self._owner[counter._index] = index
        return g

    def _children(self, g: MemCgroup) -> list[MemCgroup]:
        return [c for c in self.cgroups() if c.parent is not None and c.parent._index == g._index]

    def _subtree(self, g: MemCgroup) -> list[MemCgroup]:
        """g and its descendants (one pass: parents come before children)."""
        inside = {g._index}
        for c in self.cgroups():
            if c.parent is not None and c.parent._index in inside:
                inside.add(c._index)
        return [self._cgroup_at(i) for i in sorted(inside)]

    def _stocked(self, g: MemCgroup) -> list[PageCounter]:
        return [c for m in self._subtree(g) for c in m.counters if c.has_stock]

    # ---- try_charge_memcg ---------------------------------------------------------

    def _try_charge(self, g: MemCgroup, nr_pages: int) -> bool:
        drained = False
        greedy = True
        while True:
            refused = self._charge_once(g, nr_pages, greedy)
            if refused is None:
                return True
            over = self._cgroup_at(self._owner[refused._index])
            self._memory_event_max(over)
            if drained:
                return False
            # The page counters' own charges repair dead writers before they
            # refuse (PageCounter.try_charge); the legacy charge runs its own op.
            repair_before_refusal(self._arena)
            self.drain_all_stock(over)
            drained, greedy = True, False

    def _charge_once(self, g: MemCgroup, nr_pages: int, greedy: bool) -> PageCounter | None:
        """One attempt: memsw then memory. Returns the counter that refused, or None."""
        if self._legacy:
            return legacy.try_charge(self._arena, g.memory, nr_pages, greedy)
        if g.memsw is not None:
            refused = self._page_counter_try_charge(g.memsw, nr_pages)
            if refused is not None:
                return refused
        refused = self._page_counter_try_charge(g.memory, nr_pages)
        if refused is not None and g.memsw is not None:
            g.memsw.uncharge(nr_pages)
        return refused

    def _page_counter_try_charge(self, counter: PageCounter, nr_pages: int) -> PageCounter | None:
        """PageCounter.try_charge; with hooks armed, the stock hit runs stepwise so
        that a test can stop it between its read and its write (stock.py)."""
        arena = self._arena
        row = arena._stock_row
        if row >= 0:
            if hooks.ARMED:
                if counter._consume_stepwise(nr_pages):
                    return None
            elif arena._slots.stock_consume(counter._c, row, nr_pages) == CONSUME_HIT:
                return None
        return counter._try_charge_slow(nr_pages)[1]

    def _memory_event_max(self, over: MemCgroup) -> None:
        """memcg_memory_event(over, MEMCG_MAX): the local count of `over`, and the
        hierarchical count of `over` and each ancestor below the root."""
        slots = self._arena._slots
        slots.fetch_add(over._record + CG_EVENTS_MAX_LOCAL, 1)
        g: MemCgroup | None = over
        while g is not None and g.parent is not None:
            slots.fetch_add(g._record + CG_EVENTS_MAX, 1)
            g = g.parent

    # ---- drains -----------------------------------------------------------------

    def drain_all_stock(self, g: MemCgroup) -> bool:
        """drain_all_stock(g): return the stock of g's subtree on every online CPU.
        Single drainer: if another drain_all_stock runs (any process), return
        False at once. Per-counter designs drain synchronously (one work message
        per CPU; rfc: one per counter and CPU); legacy flags the CPUs and returns
        without waiting (wait_flushed waits)."""
        if not isinstance(g, MemCgroup) or g._tree._arena.name != self._arena.name:
            raise TypeError(f"expected a MemCgroup of this tree, got {g!r}")
        if self.variant == "legacy":
            return legacy.drain_all(self._arena, {m._index + 1 for m in self._subtree(g)})
        with single_drainer(self._arena) as got:
            if got:
                if hooks.ARMED:
                    hooks.at("drain_all:locked")
                self._design.drain_all(self._arena, self._stocked(g))
        return got

    def wait_flushed(self, timeout: float = 5.0) -> None:
        """Wait until every online CPU has served the legacy drain work items sent
        to it (quiescence of the asynchronous drain). Returns at once for the
        per-counter designs, whose drains are synchronous. TimeoutError if a CPU
        does not serve its work in time."""
        check_timeout(timeout, "timeout")
        arena = self._arena
        arena._check_open()
        deadline = time.monotonic() + timeout
        while pending := [cpu for cpu in legacy.flushing(arena) if arena.row_owner_alive(cpu)]:
            if time.monotonic() > deadline:
                raise TimeoutError(f"CPUs {pending} did not serve their drain work "
                                   f"within {timeout} s")
            time.sleep(0.0005)

    # ---- statistics -------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """Counts since the arena was created, summed over CPUs and writers:
        hierarchy walks, and the legacy slots' evictions, overflow drains and
        served drain work items."""
        arena = self._arena
        cpus = arena._memcg.cpus
        return {"walks": int(arena.rows[:, R_WALKS].sum()),
                "evictions": int(cpus[:, MC_EVICTIONS].sum()),
                "overflows": int(cpus[:, MC_OVERFLOWS].sum()),
                "flushes": int(cpus[:, MC_FLUSHES].sum())}

    def __repr__(self) -> str:
        if self._arena.closed:
            return "<Cgroups (arena closed)>"
        return (f"<Cgroups {self.variant} memsw={self.memsw} "
                f"cgroups={len(self.cgroups())} in {self._arena.name!r}>")


def _check_options(asked: dict[str, Any]) -> None:
    checks = {
        "memsw": lambda v: isinstance(v, bool),
        "variant": lambda v: v in VARIANTS,
        "eviction": lambda v: v in legacy.EVICTIONS,
        "batch": lambda v: type(v) is int and 0 <= v < BATCH_LIMIT,
        "first_child_drain": lambda v: isinstance(v, bool),
    }
    for key, ok in checks.items():
        value = asked[key]
        if value is not None and not ok(value):
            raise ValueError(f"bad {key}: {value!r}")
    if asked["variant"] == "legacy" and asked["first_child_drain"]:
        raise ValueError("first_child_drain is v2's V6; the legacy design has no "
                         "per-counter stock to drain")
    if asked["variant"] == "legacy" and asked["memsw"]:
        raise ValueError("the legacy design is modelled for memory only (memsw=False): "
                         "its one stock per cgroup serves two counter trees")
    if asked["variant"] == "legacy" and asked["batch"] not in (None, 64):
        raise ValueError("the legacy design's batch is MEMCG_CHARGE_BATCH = 64")
