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
from collections.abc import Callable, Sequence
from typing import Any

from .. import hooks, pidlock
from ..arena import Arena
from ..drain import single_drainer
from ..errors import ArenaError
from ..page_counter import PAGE_COUNTER_MAX, PageCounter, check_limit
from ..segment import R_WALKS, check_counter_name
from ..stock import DEFAULT_BATCH
from ..stop_machine import repair_before_refusal
from ..wait import bounded_wait, check_timeout
from ._legacy import MC_EVICTIONS, MC_FLUSHES, MC_OVERFLOWS
from .cgroup import ONLINE, MemCgroup, decode
from .section import (
    CG_EVENTS_MAX,
    CG_EVENTS_MAX_LOCAL,
    CG_MEMSW,
    CG_STATE,
    CG_WORDS,
    EVICTIONS,
    M_BATCH,
    M_EVICTION,
    M_FIRST_CHILD_DRAIN,
    M_MEMSW,
    M_ROOT,
    M_STATE,
    M_STOCK_CAP,
    M_VARIANT,
)
from .variants import DESIGNS, Design, PerCounter, check_options

ROOT = "root"
MEMSW = ":memsw"

# memcg header state: 0 none; a pid while that process sets the tree up; READY
READY = -1


class Cgroups:
    """The cgroup tree of an arena: create it, or open the one it holds.

    Cgroups(arena, memsw=False, variant="fixed", eviction="round-robin",
    batch=64, first_child_drain=False, stock_cap=False) sets up a new tree; in a
    process where the arena holds one already, Cgroups(arena) opens it, and any
    argument given must match it (ValueError otherwise).
      memsw              cgroup v1 memory+swap accounting: a second counter tree
      variant            "fixed", "v2", "rfc", "legacy" or "v4" (variants.py)
      eviction           legacy only: "round-robin" (mm tree 2026) or "random"
      batch              css_online's enable_stock batch; 0: no stock at all
      first_child_drain  v2's V6: creating a non-root parent's first child drains
                         the parent's subtree on every CPU (not with legacy)
      stock_cap          v4 only: the E14 cap (a deposit that would leave more
                         than batch pages in a CPU's stock drains it instead)
    """

    def __init__(self, arena: Arena, memsw: bool | None = None, *,
                 variant: str | None = None, eviction: str | None = None,
                 batch: int | None = None, first_child_drain: bool | None = None,
                 stock_cap: bool | None = None) -> None:
        if not isinstance(arena, Arena):
            raise TypeError(f"arena must be an Arena, got {type(arena).__name__}")
        arena._check_open()
        asked = {"memsw": memsw, "variant": variant, "eviction": eviction,
                 "batch": batch, "first_child_drain": first_child_drain,
                 "stock_cap": stock_cap}
        check_options(asked)
        self._arena = arena
        self._handles: dict[int, MemCgroup] = {}
        self._owner: dict[int, int] = {}           # counter index -> cgroup index
        # cgroup index -> (published counters then, its subtree's counters)
        self._subtree_cache: dict[int, tuple[int, tuple[PageCounter, ...]]] = {}
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
                "variant": decode(self._arena, "memcg variant", int(h[M_VARIANT]),
                                  tuple(DESIGNS), 1),
                "eviction": decode(self._arena, "memcg eviction", int(h[M_EVICTION]),
                                   EVICTIONS),
                "batch": int(h[M_BATCH]),
                "first_child_drain": bool(h[M_FIRST_CHILD_DRAIN]),
                "stock_cap": bool(h[M_STOCK_CAP])}

    def _set_up(self, asked: dict[str, Any]) -> None:
        """Create the tree and its root cgroup, once per arena: the first process
        to claim the header does it; the others wait for it (or take over from a
        dead one: every step is redone or found done)."""
        arena, slots, me = self._arena, self._arena._slots, os.getpid()
        state = arena._memcg.slot + M_STATE
        ready = False

        def attempt() -> int:
            nonlocal ready
            taken, holder = pidlock.trylock(slots, state, me)
            ready = holder == READY
            return 0 if taken or ready else holder
        bounded_wait(arena, "the set-up of the cgroup tree", attempt)
        if ready:
            return
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
        h[M_EVICTION] = EVICTIONS.index(asked["eviction"] or "round-robin")
        h[M_BATCH] = DEFAULT_BATCH if asked["batch"] is None else asked["batch"]
        h[M_FIRST_CHILD_DRAIN] = bool(asked["first_child_drain"])
        h[M_STOCK_CAP] = bool(asked["stock_cap"])
        h[M_VARIANT] = 1 + list(DESIGNS).index(variant)
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
            design = self._design
            assert isinstance(design, PerCounter)  # check_options: only theirs has V6
            design.drain_all(self._arena, self._stocked(parent))
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
            g = self._design.cgroup_class(
                self, index, None if parent < 0 else self._cgroup_at(parent))
            self._handles[index] = g
            for counter in g.counters:
                self._owner[counter._index] = index
        return g

    def _children(self, g: MemCgroup) -> list[MemCgroup]:
        """g's child cgroups, whoever created them, in creation order: O(g's
        children), whatever the size of the rest of the tree."""
        states = self._arena._memcg.cgroups[:, CG_STATE]
        return [self._cgroup_at(i) for i in self._arena._child_counters(g._index) if states[i]]

    def _subtree(self, g: MemCgroup) -> list[MemCgroup]:
        """g and its descendants, in creation order (parents before children): a
        walk down the counter tree's index of children (Segment._child_counters)
        through the counters that are cgroups, O(the subtree) whatever the size
        of the rest of the tree. (A cgroup's children are memory counters; its
        memsw counter's children are memsw counters, which are no cgroups.)"""
        states = self._arena._memcg.cgroups[:, CG_STATE]
        inside = [g._index]
        for index in inside:                      # grows while we walk it
            inside.extend(i for i in self._arena._child_counters(index) if states[i])
        return [self._cgroup_at(i) for i in sorted(inside)]

    def _stocked(self, g: MemCgroup) -> list[PageCounter]:
        return [c for m in self._subtree(g) for c in m.counters if c.has_stock]

    def _subtree_counters(self, g: MemCgroup) -> tuple[PageCounter, ...]:
        """The counters of g's subtree (memory and memsw), stock or not: _subtree's,
        kept until a counter is published in the arena (by any process), so that
        a drain of an unchanged tree allocates nothing to find them."""
        published = self._arena._published()
        cached = self._subtree_cache.get(g._index)
        if cached is None or cached[0] != published:
            cached = (published, tuple(c for m in self._subtree(g) for c in m.counters))
            self._subtree_cache[g._index] = cached
        return cached[1]

    # ---- try_charge_memcg ---------------------------------------------------------

    def _try_charge(self, g: MemCgroup, nr_pages: int,
                    refused: PageCounter | None = None) -> bool:
        """try_charge_memcg of g, after a first attempt that `refused` refused
        (None: from the first attempt)."""
        drained = False
        greedy = True
        while True:
            if refused is None:
                refused = self._charge_once(g, nr_pages, greedy)
            if refused is None:
                return True
            over = self._cgroup_at(self._owner[refused._index])
            self._memory_event_max(over)
            if drained:
                return False
            # The page counters' own charges repair dead writers before they
            # refuse (PageCounter.try_charge); a design's own charge may not.
            repair_before_refusal(self._arena)
            self.drain_all_stock(over)
            drained, greedy, refused = True, False, None

    def _charge_once(self, g: MemCgroup, nr_pages: int, greedy: bool) -> PageCounter | None:
        """One attempt: memsw then memory. Returns the counter that refused, or None."""
        return self._design.charge_once(self, g, nr_pages, greedy)

    def _charge_counters(self, g: MemCgroup, nr_pages: int) -> PageCounter | None:
        """The per-counter stock's attempt (Design.charge_once): memsw then memory,
        each a page_counter_try_charge with its stock."""
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
        if hooks.ARMED:
            if self._arena._stock_row >= 0 and counter._consume_stepwise(nr_pages):
                return None
            return counter._try_charge_slow(nr_pages)[1]
        return counter.try_charge(nr_pages)[1]

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
        per CPU; rfc: one per counter and CPU; v4: none, the caller takes every
        CPU's word itself); legacy flags the CPUs and returns without waiting
        (wait_flushed waits)."""
        if not isinstance(g, MemCgroup) or (g._tree._arena is not self._arena
                                            and g._tree._arena.name != self._arena.name):
            raise TypeError(f"expected a MemCgroup of this tree, got {g!r}")
        return self._design.drain_all_stock(self, g)

    def _drain_all_counters(self, g: MemCgroup,
                            drain_all: Callable[[Arena, Sequence[PageCounter]], None]) -> bool:
        """The per-counter stock's drain_all_stock (Design.drain_all_stock): the
        single-drainer trylock, then the design's drain_all of g's stocked
        counters."""
        with single_drainer(self._arena) as got:
            if got:
                if hooks.ARMED:
                    hooks.at("drain_all:locked")
                drain_all(self._arena, self._stocked(g))
        return got

    def wait_flushed(self, timeout: float = 5.0) -> None:
        """Wait until every online CPU has served the drain work items sent to it
        (quiescence of an asynchronous drain_all_stock, the legacy design's).
        Returns at once for the per-counter designs, whose drains are synchronous.
        TimeoutError if a CPU does not serve its work in time."""
        check_timeout(timeout, "timeout")
        self._arena._check_open()
        self._design.wait_flushed(self._arena, timeout)

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
