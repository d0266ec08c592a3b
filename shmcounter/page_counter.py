"""Lockless hierarchical page accounting and limiting, with per-CPU charge stock.

A Python model of Linux mm/page_counter.c plus the per-page_counter stock of the
2026 series "mm/memcontrol, page_counter: move stock from mem_cgroup to
page_counter" (v2 semantics unless noted). Every number lives in the arena
(segment.py); a PageCounter is only a handle, and any number of processes may hold
handles on one counter.

Verbs, as in the kernel: `cancel` changes one level, `uncharge` walks to the root;
`try_charge` may fail, `charge` is forced. A number of pages is `nr_pages` inside,
`n` in the public signatures (the API contract).

Invariant (quiescent), for every counter C:
    usage(C) == real charges in subtree(C) + sum of stock[cpu][D], D in subtree(C)
"""
from __future__ import annotations

import os
import sys
import warnings
from types import FrameType
from typing import TYPE_CHECKING

from . import hooks, segment
from ._atomic import CONSUME_HIT, Counter
from .errors import Busy
from .segment import (
    H_UNDERFLOWS,
    MAX_DEPTH,
    PC_BATCH,
    PC_CHILDREN_LOW_USAGE,
    PC_CHILDREN_MIN_USAGE,
    PC_ELOW,
    PC_EMIN,
    PC_FAILCNT,
    PC_FLAG_UNCHARGE_TO_STOCK,
    PC_FLAGS,
    PC_HIGH,
    PC_LOW,
    PC_MAX,
    PC_MIN,
    PC_USAGE,
    PC_WATERMARK,
    PC_WORDS,
    R_WALKS,
    STOCK_NR,
)
from .stock import PageCounterStock
from .stop_machine import Repair, repair_before_refusal

if TYPE_CHECKING:
    from .segment import Segment as Arena

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep

# LONG_MAX / PAGE_SIZE, so that a limit in bytes never overflows (kernel, 64-bit).
PAGE_COUNTER_MAX = (2**63 - 1) // 4096
# Exclusive bound on any page amount passed in (the public API contract).
NR_PAGES_LIMIT = 2**62

_SUCCESS = (True, None)


def bad_nr(n: object, what: str = "n", limit: int = NR_PAGES_LIMIT) -> Exception:
    """The error for an amount that is not an int in [0, limit)."""
    bound = "2**62" if limit == NR_PAGES_LIMIT else str(limit)
    msg = f"{what} must be an int in [0, {bound}), got {n!r} ({type(n).__name__})"
    return TypeError(msg) if type(n) is not int else ValueError(msg)


def check_nr(n: object, what: str = "n") -> int:
    if type(n) is not int or not 0 <= n < NR_PAGES_LIMIT:
        raise bad_nr(n, what)
    return n


def check_limit(n: object, what: str) -> int:
    """A limit or protection setting: an int in [0, PAGE_COUNTER_MAX]."""
    if type(n) is not int or not 0 <= n <= PAGE_COUNTER_MAX:
        raise bad_nr(n, what, PAGE_COUNTER_MAX + 1)
    return n


class PageCounter(Counter, PageCounterStock):
    """A handle on one page_counter record of an arena.

    Fields read live from shared memory: usage, max, min, low, high, watermark,
    failcnt, emin, elow, batch. The parent never changes after creation, so the
    handle caches the path to the root as record indexes (here, and in its Counter
    base, whose C methods are the ops below).

    try_charge(n) -> (True, None), or (False, C) with C the first counter whose
    max refused the charge; the levels below C are cancelled before it returns, so
    no level keeps a partial charge. A refusal counts in C.failcnt. Runs in any
    process; only a CPU process (register_cpu) takes the stock:
      1. fast path: take n from this CPU's stock of this counter, if the slot's
         trylock succeeds and it holds n. Nothing else changes: usage, watermark,
         failcnt and protection stay as they are.
      2. greedy: charge max(batch, n) up the hierarchy;
      3. on failure, retry once with exactly n;
      4. deposit the surplus in this CPU's stock, or uncharge it if the slot is
         busy (docs/stock-design.md §Try-charge with stock).
    A greedy failure still counts in failcnt, so one successful request can bump
    failcnt (as the memcg code always has). Steps 2-4 are one op: a kill anywhere
    in them rolls all of them back (writer.py).

    Repair on refusal: a writer killed inside an op leaves its part of the op
    applied until someone repairs it, so a charge under the limit could be refused
    because of pages nobody holds. Before refusing, once this op has ended,
    try_charge repairs every dead writer if the op of one is in progress
    (Arena.repair; a cheap check when none is), and if that took pages off this
    counter's path, runs steps 2-4 once more (memcg drains its stock before
    failing a charge in the same way). The first attempt's refusal still counts in
    failcnt: the counter did refuse, as the kernel counts a page_counter_try_charge
    failure that memcg's drain-and-retry overcomes. If the retry is refused too,
    that counts as well, and C is its refuser.

    charge(n): charge n pages to this counter and every ancestor, ignoring max
    (forced, like page_counter_charge; usage may exceed max afterwards). Never
    uses the stock. OverflowError, changing nothing, past 2**63 - 1.

    uncharge(n): uncharge n pages from this counter and every ancestor. Plain
    hierarchical (v2): the stock is filled only by the surplus of greedy charges.
    With enable_stock(uncharge_to_stock=True) a CPU process returns the pages to
    its stock instead, keeping at most batch there (the RFC, docs/stock-design.md
    §Uncharge). An uncharge below 0 is a caller bug: it warns, counts in
    arena.underflows and clamps usage at 0, at each level where it happens.

    cancel(n): take n pages out of this level only (page_counter_cancel).

    Each is one C call (_counter.c) that checks n exactly (an int, not a bool, in
    [0, 2**62): TypeError or ValueError, nothing changed) and runs the whole op.
    """

    def __init__(self, arena: Arena, index: int) -> None:
        """Build the handle of counter `index` of `arena` (Arena._handle builds its
        parent's first). Every word it caches is checked once, here, so the hot
        paths need no check of their own: the parent is -1 or an earlier counter,
        the path at most MAX_DEPTH levels, the name UTF-8 (else ArenaCorrupt)."""
        self._arena = arena
        self._slots = arena._slots
        self._index = index
        self._c = arena._counters_slot + index * PC_WORDS       # record's first slot
        parent = arena._parent(index)
        self.parent: PageCounter | None = None if parent < 0 else arena._handle(parent)
        if self.parent is not None and len(self.parent._path) >= MAX_DEPTH:
            raise arena._corrupt(f"the depth of counter {index}", len(self.parent._path) + 1,
                                 f"not at most MAX_DEPTH = {MAX_DEPTH}: a parent word is wrong")
        self._p = -1 if self.parent is None else self.parent._c
        # (record, parent record, counter index) for self, parent, ..., root
        self._path: tuple[tuple[int, int, int], ...] = ((self._c, self._p, index),) + (
            self.parent._path if self.parent is not None else ())
        self._levels: tuple[PageCounter, ...] = (self,) + (
            self.parent._levels if self.parent is not None else ())
        self.name: str = arena._name(index)
        self._bind(arena._slots, tuple(i for _, _, i in self._path), self._levels[1:])

    # ---- fields -------------------------------------------------------------

    def _load(self, field: int) -> int:
        return self._slots.load(self._c + field)

    @property
    def usage(self) -> int:
        """Pages charged to the subtree, stocks included."""
        return self._load(PC_USAGE)

    @property
    def max(self) -> int:
        """Hard limit, enforced by try_charge."""
        return self._load(PC_MAX)

    @property
    def min(self) -> int:
        """Hard protection setting."""
        return self._load(PC_MIN)

    @property
    def low(self) -> int:
        """Best-effort protection setting."""
        return self._load(PC_LOW)

    @property
    def high(self) -> int:
        """Throttling limit: stored, never enforced here."""
        return self._load(PC_HIGH)

    @property
    def watermark(self) -> int:
        """Peak usage (racy, see _atomic.c)."""
        return self._load(PC_WATERMARK)

    @property
    def failcnt(self) -> int:
        """Charges this level refused."""
        return self._load(PC_FAILCNT)

    @property
    def emin(self) -> int:
        """Effective min, after calculate_protection."""
        return self._load(PC_EMIN)

    @property
    def elow(self) -> int:
        """Effective low, after calculate_protection."""
        return self._load(PC_ELOW)

    @property
    def children_min_usage(self) -> int:
        return self._load(PC_CHILDREN_MIN_USAGE)

    @property
    def children_low_usage(self) -> int:
        return self._load(PC_CHILDREN_LOW_USAGE)

    # ---- charge and uncharge: the stepwise ops ----------------------------------
    #
    # try_charge, charge, uncharge and cancel are methods of Counter (_counter.c),
    # each one C call with the whole op inside (the class docstring says what they
    # do). Python takes over through the methods below where C cannot finish
    # (_counter.c lists when): the same op in Python steps, one C call per level,
    # with the named points of hooks.py between the steps, inside the op bracket
    # of writer.py, which also waits for a stop_machine and claims a writer row.

    def _try_charge_stepwise(self, nr_pages: int) -> tuple[bool, PageCounter | None]:
        row = self._arena._stock_row
        if row >= 0 and self._slots.stock_consume(self._c, row, nr_pages) == CONSUME_HIT:
            return _SUCCESS
        return self._try_charge_slow(nr_pages)

    def _refused(self, nr_pages: int, fail: PageCounter) -> tuple[bool, PageCounter | None]:
        """The C op's steps 2-4 were refused by `fail`, a level of this counter's
        path, and the op has ended: repair on refusal (the class docstring), then at
        most one more attempt, stepwise."""
        repaired = repair_before_refusal(self._arena)
        if not self._repaired_path(repaired):
            return False, fail
        return self._try_charge_slow(nr_pages, repaired)

    def _repaired_path(self, repaired: Repair) -> bool:
        """Did a repair take pages off this counter's path?"""
        return bool(repaired) and any(repaired.pages.get(level.name, 0) > 0
                                      for level in self._levels)

    def _try_charge_slow(self, nr_pages: int,
                         repaired: Repair | None = None) -> tuple[bool, PageCounter | None]:
        """Steps 2-4 of try_charge as one op, and its repair on refusal: at most one
        more op, after a repair that took pages off this counter's path (none more
        if `repaired` says one happened already)."""
        slots, writer = self._slots, self._arena._writer
        if hooks.ARMED:
            hooks.at("charge:slow")
        while True:
            # READ_ONCE(batch): one snapshot; a concurrent disable_stock (batch = 0)
            # is seen by the next charge. Not a CPU process: exact charges only.
            slot = self._local_slot()
            batch = slots.load(self._c + PC_BATCH) if slot >= 0 else 0
            charge = batch if batch > nr_pages else nr_pages
            with writer.op(self, slot) as kbase:
                fail = self._try_charge_path(charge, kbase)
                if fail is not None and charge > nr_pages:
                    charge = nr_pages
                    fail = self._try_charge_path(charge, kbase)
                if fail is None and charge > nr_pages:
                    if hooks.ARMED:
                        hooks.at("charge:deposit")
                    left = self._deposit(slot, charge, charge - nr_pages)
                    if left:
                        self._cancel_path(left, kbase)
            if fail is None:
                return _SUCCESS
            if repaired is not None:
                return False, fail
            repaired = repair_before_refusal(self._arena)      # the op has ended
            if not self._repaired_path(repaired):
                return False, fail

    def _try_charge_path(self, nr_pages: int, kbase: int) -> PageCounter | None:
        """page_counter_try_charge without stock, inside an op: None, or the counter
        that refused (the levels below it cancelled)."""
        slots = self._slots
        path = self._path
        self._count_walk()
        for level, (c, p, i) in enumerate(path):
            if slots.pc_try_charge_level(c, p, kbase + i, nr_pages) is None:
                self._cancel_path(nr_pages, kbase, level)
                return self._levels[level]
            if hooks.ARMED:
                hooks.at("charge:level")
        return None

    def _charge_stepwise(self, nr_pages: int) -> None:
        slots = self._slots
        with self._arena._writer.op(self) as kbase:
            self._count_walk()
            for c, p, i in self._path:
                slots.pc_charge_level(c, p, kbase + i, nr_pages)
                if hooks.ARMED:
                    hooks.at("charge:level")

    def _uncharge_stepwise(self, nr_pages: int) -> None:
        slot = -1
        if self._slots.load(self._c + PC_FLAGS) & PC_FLAG_UNCHARGE_TO_STOCK:
            slot = self._local_slot()
        writer = self._arena._writer
        with writer.op(self, slot) as kbase:
            if slot >= 0:
                nr_pages = self._return_to_stock(slot, nr_pages)
            writer.forward(-nr_pages, len(self._path),
                           self._slots.load(slot + STOCK_NR) if slot >= 0 else 0)
            self._cancel_path(nr_pages, kbase)

    def _uncharge_hierarchy(self, nr_pages: int) -> None:
        """An op that uncharges nr_pages at every level, never to the stock (the
        RFC's page_counter_cancel_hierarchy, whatever the counter's flags)."""
        writer = self._arena._writer
        with writer.op(self) as kbase:
            writer.forward(-nr_pages, len(self._path))
            self._cancel_path(nr_pages, kbase)

    def _cancel_stepwise(self, nr_pages: int) -> None:
        writer = self._arena._writer
        with writer.op(self) as kbase:
            writer.forward(-nr_pages, 1)
            self._cancel_path(nr_pages, kbase, 1)

    def _propagate_path(self) -> None:
        """Recompute the protected usage of every level from its usage (after a
        rollback changed usages behind the fused steps' backs)."""
        for c, p, _ in self._path:
            self._slots.pc_propagate(c, p)

    def _cancel_path(self, nr_pages: int, kbase: int, depth: int | None = None) -> None:
        """Cancel nr_pages at the first `depth` levels (all: page_counter_uncharge),
        inside an op whose contrib row starts at kbase."""
        if nr_pages == 0:
            return
        slots = self._slots
        if depth is None:
            self._count_walk()
        for level, (c, p, i) in enumerate(self._path[:depth]):
            new = slots.pc_cancel(c, p, kbase + i, nr_pages)
            if new < 0:
                self._underflow(level, new, nr_pages)
            if hooks.ARMED:
                hooks.at("uncharge:level")

    def _count_walk(self) -> None:
        """One more walk up the hierarchy in this process's writer row (a statistic
        for the benchmarks; no row yet, as in a hotplug drain run by a reader: none)."""
        row_slot = self._arena._writer.row_slot
        if row_slot >= 0:
            self._slots.fetch_add(row_slot + R_WALKS, 1)

    def _underflow(self, level: int, new: int, nr_pages: int) -> None:
        """An uncharge of nr_pages took path level `level` to usage `new` < 0 (the
        level step clamped it): count it, and warn the caller's frame."""
        count = self._slots.fetch_add(H_UNDERFLOWS, 1) + 1
        warnings.warn(f"page_counter underflow on {self._levels[level].name!r}: usage "
                      f"{new + nr_pages}, uncharge {nr_pages}; clamped to 0 "
                      f"(arena.underflows = {count})", RuntimeWarning,
                      stacklevel=_caller_stacklevel())

    # ---- limits -------------------------------------------------------------

    def set_max(self, n: int) -> None:
        """Set the hard limit, unless usage is above it.

        Raises Busy (EBUSY) when usage > n; max is then unchanged. The caller must
        serialize set_max on one counter.
        Ordering: read usage, exchange max, re-read usage; the exchange is a full
        barrier between the reads. A racing try_charge adds before it reads max
        (see pc_try_charge_level), so either it sees the new limit, or the re-read
        here sees its add and we restore the old limit and retry. Never returns
        with usage above a newly lowered limit.
        """
        limit = check_limit(n, "max")
        slots, usage_slot, max_slot = self._slots, self._c + PC_USAGE, self._c + PC_MAX
        while True:
            usage = slots.load(usage_slot)
            if usage > limit:
                raise Busy(f"cannot set max of {self.name!r} to {limit}: usage is {usage}")
            old = slots.exchange(max_slot, limit)
            if hooks.ARMED:
                hooks.at("set_max:exchanged")
            if slots.load(usage_slot) <= usage or limit >= old:
                return
            slots.store(max_slot, old)

    def set_min(self, n: int) -> None:
        """Set min protection and propagate protected usage up to the root."""
        self._set_protection(PC_MIN, check_limit(n, "min"))

    def set_low(self, n: int) -> None:
        """Set low protection and propagate protected usage up to the root."""
        self._set_protection(PC_LOW, check_limit(n, "low"))

    def _set_protection(self, field: int, value: int) -> None:
        # Only this counter's protected usage changes: one propagation to the parent.
        self._slots.store(self._c + field, value)
        self._slots.pc_propagate(self._c, self._p)

    def set_high(self, n: int) -> None:
        """Set the high limit. Stored for callers (memcg); page_counter never enforces it."""
        self._slots.store(self._c + PC_HIGH, check_limit(n, "high"))

    def reset_watermark(self) -> None:
        """Set the watermark to the current usage."""
        self._slots.store(self._c + PC_WATERMARK, self._load(PC_USAGE))

    # ---- views --------------------------------------------------------------

    def __repr__(self) -> str:
        if self._arena.closed:
            return f"<PageCounter {self.name!r} (arena closed)>"
        limit = self.max
        shown = "max" if limit == PAGE_COUNTER_MAX else limit
        stock = [self.stock(cpu) for cpu in range(self._arena.ncpus)]
        return (f"<PageCounter {self.name!r} usage={self.usage}/{shown} "
                f"stock={stock} failcnt={self.failcnt}>")


def _caller_stacklevel() -> int:
    """The stacklevel, for a warning of _underflow, of the first frame outside this
    package: the caller of the public method (a C op has no frame of its own)."""
    frame: FrameType | None = sys._getframe(2)
    level = 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1
    return level


def calculate_protection(root: PageCounter, counter: PageCounter, *,
                         recursive: bool = False) -> None:
    """page_counter_calculate_protection: set counter.emin/elow for reclaim from root.

    Call it top-down (parents before children): a child reads its parent's emin and
    elow. Not stateless: e-values of `root` itself, and of counters with usage 0,
    are left as they were (stale), as in the kernel. The rules:
      1. a child of root gets its raw min/low, not capped by usage;
      2. deeper levels get min(usage, setting), capped by the parent's effective
         value;
      3. if the siblings claim more than the parent has, it is shared in proportion
         to each one's min(usage, setting);
      4. otherwise nobody gets more than its own setting, unless
      5. recursive (memory_recursiveprot): unclaimed parental protection is shared
         in proportion to each child's unprotected usage.
    """
    if _same(counter, root):
        return
    usage = counter.usage
    if usage == 0:
        return
    parent = counter.parent
    slots, c = counter._slots, counter._c
    if parent is not None and _same(parent, root):
        slots.store(c + PC_EMIN, counter.min)
        slots.store(c + PC_ELOW, counter.low)
        return
    if parent is None:
        raise ValueError(f"{root.name!r} is not an ancestor of {counter.name!r}")
    parent_usage = parent.usage
    slots.store(c + PC_EMIN, _effective_protection(
        usage, parent_usage, counter.min, parent.emin, parent.children_min_usage, recursive))
    slots.store(c + PC_ELOW, _effective_protection(
        usage, parent_usage, counter.low, parent.elow, parent.children_low_usage, recursive))


def _same(a: PageCounter, b: PageCounter) -> bool:
    """One counter, even through handles of two Arena objects."""
    return a._index == b._index and a._arena.name == b._arena.name


def _effective_protection(usage: int, parent_usage: int, setting: int,
                          parent_effective: int, siblings_protected: int,
                          recursive: bool) -> int:
    protected = min(usage, setting)
    if siblings_protected > parent_effective:
        return protected * parent_effective // siblings_protected
    ep = protected
    if (recursive and parent_effective > siblings_protected
            and parent_usage > siblings_protected and usage > protected):
        ep += ((parent_effective - siblings_protected) * (usage - protected)
               // (parent_usage - siblings_protected))
    return ep


segment.register_counter_type(PageCounter)
