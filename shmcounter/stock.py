"""Per-CPU charge stock of a page_counter: enable/disable/free, drain_local,
drain_cpu, drain_stock. (Consume and deposit are steps of try_charge, in
page_counter.py; their slot operations are fused C steps in _atomic.c.)

Each (CPU, counter) pair has one slot in the arena, [nr_pages, lock]. Pages in a
slot are already charged to the counter and every ancestor (they are in usage);
the slot only says which CPU may hand them out without walking the hierarchy.

Ownership (the locked stock; the lockless one below): only CPU k's process (any
thread of it) consumes, refills or locally drains stock[k]. Other processes read
it, and touch it only when CPU k is dead (drain_cpu, the hotplug path) or when
nobody charges the counter any more (free_stock). Every step that changes a live
slot does trylock, change, unlock in one C call (_atomic.c), so the lock is held
for a few instructions.

The lock word holds the holder's pid. A lock held by a dead process means its CPU
is dead, since no other process ever takes that slot's lock; nobody waits for
it, and drain_cpu takes the slot without the lock and clears the word. A new
process for that CPU can register only after that.

Every step that changes a slot and a usage together (refill, drain, free) runs
inside an op (writer.py) whose intent record names the slot and its value before
the op: a process killed inside it is rolled back, slot included.

The lockless stock (v4, enable_stock(lockless=True)): each slot is [word, last],
word = seq << 34 | pages, changed by CAS only: the CPU's hit and deposit, and a
drain from any process, which needs no work message and no lock of the CPU: the
drain holds the arena's drain lock (drain.drain_lock) and runs an op of its own
row on the counter's path that CASes the word to (seq + 1) << 34 and uncharges
what it took. _op.h ("The lockless stock") gives the words each side records and
how a repair decides a dead op from the word; docs/design.md the argument.

Bound (I5): with one context per CPU, stock[k][C] < batch after each deposit, so
pages held in stocks <= (counters with stock) x ncpus x batch. A second context on
one CPU (a thread) can interleave between the fast-path check and the deposit
and push one slot towards 2 x batch: series E14, no cap in v2. The lockless stock
offers the cap the reviewer proposed (enable_stock(cap=True)): a deposit that
would leave more than batch pages takes the word instead and uncharges it, the
old refill_stock's rule, so that no slot ever holds more than batch.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from . import cpuhp, hooks
from ._atomic import CONSUME_HIT, STOCK_BUSY
from .drain import drain_lock, drain_stock, take_requests
from .errors import ArenaError
from .hotplug import check_dead
from .segment import (
    PC_BATCH,
    PC_FLAG_CAP,
    PC_FLAG_LOCKLESS,
    PC_FLAG_UNCHARGE_TO_STOCK,
    PC_FLAGS,
    PC_STOCK_ID,
    R_FWD_DELTA,
    R_STOCK_AFTER,
    R_STOCK_BEFORE,
    STOCK_LAST,
    STOCK_LOCK,
    STOCK_NR,
    V4_PAGES_BITS,
    V4_PAGES_MASK,
    V4_SEQ_MOD,
)
from .stop_machine import _repair, stop_machine
from .wait import wait_own_lock

if TYPE_CHECKING:
    from ._atomic import Slots
    from .segment import Segment as Arena

# MEMCG_CHARGE_BATCH. Larger means fewer walks up the hierarchy but more pages
# stranded in stocks (< batch per CPU per counter).
DEFAULT_BATCH = 64
BATCH_LIMIT = 2**32        # batch is an unsigned int in the kernel


class PageCounterStock:
    """The stock half of PageCounter (mixed in; see page_counter.py)."""

    _arena: Arena
    _slots: Slots
    _c: int
    _path: tuple[tuple[int, int, int], ...]
    _index: int
    name: str
    _cancel_path: Callable[[int, int], None]      # PageCounter's
    _drain_v4: Callable[[int, int], tuple[int, int]]     # Counter's (_counter.c)

    # ---- lifecycle ----------------------------------------------------------

    def enable_stock(self, batch: int = DEFAULT_BATCH, *,
                     uncharge_to_stock: bool = False, lockless: bool = False,
                     cap: bool = False) -> bool:
        """Give this counter a per-CPU stock refilled `batch` pages at a time.

        Returns False, changing nothing, when no stock could be set up (the arena's
        max_stocked are all in use): like the kernel's -ENOMEM, which memcg ignores,
        the counter then simply charges through the hierarchy. Calling it on a
        counter that has stock sets the batch again (re-enables after disable).
        uncharge_to_stock: the RFC's stock-returning uncharge (docs/stock-design.md §Uncharge), for
        studying the series; v2 and later uncharge through the hierarchy.
        lockless: the v4 stock: one atomic word per (counter, CPU), no lock, drained
        remotely by any process (drain_stock, drain_stock_local: no work message).
        Named for what it drops, the slot lock, and with it the CPU's part in a
        drain. Not with uncharge_to_stock (ValueError). A counter that has stock
        keeps its kind until free_stock: ValueError, nothing changed.
        cap: lockless only (ValueError otherwise): the E14 cap. A deposit that
        would leave more than batch pages in the word (a second context of the CPU
        deposited since the first missed) takes the word's pages instead and
        uncharges them with the surplus, in the same op: no word holds more than
        batch pages after a deposit, whatever the contexts.
        """
        if type(batch) is not int or not 0 <= batch < BATCH_LIMIT:
            raise (TypeError if type(batch) is not int else ValueError)(
                f"batch must be an int in [0, 2**32), got {batch!r} ({type(batch).__name__})")
        if not isinstance(uncharge_to_stock, bool):
            raise TypeError(f"uncharge_to_stock must be a bool, got {uncharge_to_stock!r}")
        if not isinstance(lockless, bool):
            raise TypeError(f"lockless must be a bool, got {lockless!r}")
        if not isinstance(cap, bool):
            raise TypeError(f"cap must be a bool, got {cap!r}")
        if cap and not lockless:
            raise ValueError("cap is the lockless stock's (the E14 cap); the locked "
                             "stock has none")
        if lockless and uncharge_to_stock:
            raise ValueError("a lockless stock has no uncharge_to_stock (the RFC's, "
                             "under the slot lock)")
        arena, slots = self._arena, self._slots
        arena._check_open()
        flags = ((PC_FLAG_UNCHARGE_TO_STOCK if uncharge_to_stock else 0)
                 | (PC_FLAG_LOCKLESS if lockless else 0) | (PC_FLAG_CAP if cap else 0))
        arena._registry_lock()
        try:
            if self._stock_id() >= 0 and self._lockless() != lockless:
                raise ValueError(f"counter {self.name!r} has a "
                                 f"{'lockless' if self._lockless() else 'locked'} stock; "
                                 f"free_stock it before enabling the other kind")
            if self._stock_id() < 0:
                free = (arena.stock_owner < 0).nonzero()[0]
                if len(free) == 0:
                    return False
                sid = int(free[0])
                arena.stock_owner[sid] = self._index
                # a new stock id's slots are all 0: free_stock drained them
                slots.store(self._c + PC_STOCK_ID, sid)          # publish
            slots.store(self._c + PC_FLAGS, flags)
            slots.store(self._c + PC_BATCH, batch)
        finally:
            arena._registry_unlock()
        return True

    def disable_stock(self) -> None:
        """No new deposits from now on (batch = 0). Stock hits may still consume
        what is left; drain_stock or free_stock returns it (the U0/v4 order)."""
        self._arena._check_open()
        self._slots.store(self._c + PC_BATCH, 0)

    def free_stock(self) -> int:
        """Drain whatever is left on every CPU, without locks, then drop the stock.

        The caller guarantees that nobody charges or uncharges this counter any
        more (kernel: css_free, after the last reference). Returns the pages
        drained. A no-op without stock. Each CPU's slot is drained in an op of its
        own, and the stock id is dropped last: killed halfway, the counter keeps
        its stock (what is left is still counted in usage), and free_stock can
        simply be called again.
        """
        return self._free_stock(drain=True)

    def _free_stock(self, drain: bool) -> int:
        """free_stock; drain=False is the RFC's free_percpu without a drain (series
        E4): pages left in the stocks vanish from them but stay in usage."""
        arena, slots = self._arena, self._slots
        arena._check_open()
        sid = self._stock_id()
        if sid < 0:
            return 0
        slots.store(self._c + PC_BATCH, 0)
        drained = 0
        lockless = self._lockless()
        if lockless and drain:
            with drain_lock(arena):
                drained = sum(self._drain_remote(cpu) for cpu in range(arena.ncpus))
        for cpu in range(arena.ncpus):
            slot = arena._stock_slot(cpu, sid)
            if lockless:                # seq and last too: the id's next owner starts at 0
                slots.store(slot + STOCK_NR, 0)
                slots.store(slot + STOCK_LAST, 0)
            elif drain:
                drained += self._drain_slot(slot)
            else:
                slots.store(slot + STOCK_NR, 0)
        arena._registry_lock()
        try:
            slots.store(self._c + PC_STOCK_ID, -1)
            slots.store(self._c + PC_FLAGS, 0)
            arena.stock_owner[sid] = -1
        finally:
            arena._registry_unlock()
        return drained

    def _drain_slot(self, slot: int) -> int:
        """Take stock slot `slot` without its lock and uncharge it, in one op."""
        if self._slots.load(slot + STOCK_NR) == 0:
            return 0
        writer = self._arena._writer
        with writer.op(self, slot) as kbase:
            taken = self._slots.exchange(slot + STOCK_NR, 0)
            writer.forward(-taken, len(self._path))
            self._cancel_path(taken, kbase)
        return taken

    # ---- reading ------------------------------------------------------------

    def _stock_id(self) -> int:
        """This counter's stock id, or -1 without stock. The word is checked: the
        slot index derived from it must lie in the stocks section. (The fast path
        and the ops check it in C: _atomic.c.)"""
        sid = self._slots.load(self._c + PC_STOCK_ID)
        if not -1 <= sid < self._arena.max_stocked:
            raise self._arena._corrupt(
                f"counter {self._index}'s stock_id", sid,
                f"not -1 or a stock id below max_stocked = {self._arena.max_stocked}")
        return sid

    def _lockless(self) -> bool:
        """Is this counter's stock the lockless (v4) one?"""
        return bool(self._slots.load(self._c + PC_FLAGS) & PC_FLAG_LOCKLESS)

    @property
    def lockless(self) -> bool:
        """True when the stock is the lockless (v4) one (enable_stock)."""
        return self._lockless()

    @property
    def has_stock(self) -> bool:
        return self._stock_id() >= 0

    @property
    def batch(self) -> int:
        """Refill size; 0 when disabled or without stock."""
        return self._slots.load(self._c + PC_BATCH)

    def stock(self, cpu: int) -> int:
        """Pages held in CPU `cpu`'s stock of this counter (0 without stock)."""
        arena = self._arena
        arena._cpu_slot(cpu)              # validates cpu
        sid = self._stock_id()
        if sid < 0:
            return 0
        word = self._slots.load(arena._stock_slot(cpu, sid) + STOCK_NR)
        return word & V4_PAGES_MASK if self._lockless() else word

    def _local_slot(self) -> int:
        """This CPU's slot of this counter, or -1 (not a CPU, or no stock); the
        stock id is checked (local_slot, one C call)."""
        return self._slots.local_slot(self._c, self._arena._stock_block)

    def _return_to_stock(self, slot: int, nr_pages: int) -> int:
        """RFC uncharge, inside the uncharge op: return nr_pages to this CPU's stock,
        keeping at most batch there. Returns what must still be uncharged
        hierarchically (all of it when the slot is busy)."""
        excess = self._slots.stock_return(slot, self._c + PC_BATCH, nr_pages,
                                          self._arena._stock_owner)
        return nr_pages if excess == STOCK_BUSY else excess

    def _deposit(self, slot: int, charge: int, surplus: int) -> int:
        """Step 4 of try_charge, inside its op, the walk of `charge` pages done:
        put `surplus` pages in this CPU's slot. Returns the pages the caller must
        still uncharge: 0; `surplus` when it cannot deposit (the lock is busy; a
        lockless word's pages would reach 2**34); with the E14 cap (PC_FLAG_CAP),
        surplus + the word's pages when it took the word instead (its pages would
        exceed batch). Lockless: the CAS loop and the forward mark in one C call
        (stock_deposit_v4), with the named points "stock:cas" (the intent
        recorded, no CAS yet) and "stock:deposited" (done and marked)."""
        arena, slots = self._arena, self._slots
        if not self._lockless():
            return 0 if slots.stock_deposit(slot, surplus, arena._stock_owner) else surplus
        row = arena._writer.row_slot
        capped = bool(slots.load(self._c + PC_FLAGS) & PC_FLAG_CAP)
        if hooks.ARMED:
            word = slots.load(slot + STOCK_NR)
            pages = word & V4_PAGES_MASK
            take = capped and pages + surplus > charge
            slots.store(row + R_FWD_DELTA, charge - surplus - pages if take else charge)
            slots.store(row + R_STOCK_BEFORE, word)
            slots.store(row + R_STOCK_AFTER, word - pages if take else word + surplus)
            hooks.at("stock:cas")
        left = slots.stock_deposit_v4(row, slot, surplus, charge, capped)
        if left != surplus and hooks.ARMED:
            hooks.at("stock:deposited")
        return left

    def _consume_stepwise(self, nr_pages: int) -> bool:
        """The fast path of try_charge (stock_consume) as separate steps, with the
        named point "stock:consume" between the read and the write of the slot:
        the kernel's `stock->nr_pages -= n` under the local lock is such a plain
        read-modify-write, and a remote writer that ignores the lock (v2's nolock
        drain, series E5) can land in between. Used by memcg while hooks are armed;
        same result as stock_consume otherwise. A CPU process only. A lockless
        word has no read-modify-write to land in: its CAS, one step."""
        arena, slots = self._arena, self._slots
        slot = self._local_slot()
        if slot < 0:
            return False
        if self._lockless():
            return slots.stock_consume(self._c, arena._stock_row, nr_pages) == CONSUME_HIT
        with arena._writer.held():
            if not slots.stock_trylock(slot, arena._stock_owner):
                return False
            try:
                have = slots.load(slot + STOCK_NR)
                if have < nr_pages:
                    return False
                hooks.at("stock:consume")
                slots.store(slot + STOCK_NR, have - nr_pages)
                return True
            finally:
                slots.stock_unlock(slot)

    # ---- drains -------------------------------------------------------------

    def drain_stock_local(self) -> int:
        """Drain the calling CPU's stock of this counter, under its slot lock, and
        uncharge those pages up the hierarchy. Returns the pages drained.

        Runs in a CPU process only. The lock is blocking, as the kernel's
        local_lock: if another context of this CPU holds it, we yield until it lets
        go (the library holds it for one C call at a time). A lockless stock: the
        remote drain of this CPU's own word, under the drain lock.
        """
        arena = self._arena
        if arena._stock_block < 0:
            arena._check_open()             # closed: that is the error to report
            raise ArenaError("drain_stock_local runs in a CPU process only; this "
                             "process is not a CPU of this arena (see register_cpu)")
        slot = self._local_slot()
        if slot < 0:
            return 0
        if self._lockless():                    # the remote drain, of our own word
            cpu = cpuhp.this_cpu_of(arena)
            assert cpu is not None              # _stock_block >= 0: registered here
            with drain_lock(arena):
                return self._drain_remote(cpu)
        with arena._writer.op(self, slot) as kbase:
            return self._drain_local_in_op(slot, kbase)

    def _drain_local_in_op(self, slot: int, kbase: int) -> int:
        arena, slots = self._arena, self._slots
        taken = slots.stock_take(slot, arena._stock_owner)
        if taken == STOCK_BUSY:          # another context of this CPU holds the lock
            took = [0]

            def take() -> bool:
                took[0] = slots.stock_take(slot, arena._stock_owner)
                return took[0] != STOCK_BUSY
            wait_own_lock(arena, slot + STOCK_LOCK,
                          f"this CPU's stock lock of counter {self._index}", take)
            taken = took[0]
        arena._writer.forward(-taken, len(self._path))
        if hooks.ARMED:
            hooks.at("drain:taken")
        self._cancel_path(taken, kbase)
        return taken

    def drain_cpu(self, cpu: int) -> int:
        """Drain a dead CPU's stock of this counter: take it without the lock, clear
        the lock word, and uncharge the pages up the hierarchy (the hotplug "dead"
        path, page_counter_drain_stock_cpu). Returns the pages drained.

        Runs under stop_machine, after the dead CPU's unfinished op (if any) is
        rolled back (stop_machine.py). Raises ValueError if a live process is
        registered as `cpu`: its stock is drained with drain_stock, through that CPU.
        """
        arena = self._arena
        arena._cpu_slot(cpu)                              # validates cpu
        with stop_machine(arena):
            check_dead(arena, cpu)
            _repair(arena)
            return _drain_stopped(self, cpu)

    def _drain_remote(self, cpu: int) -> int:
        """page_counter_drain_stock(counter, cpu) of the lockless stock: take CPU
        `cpu`'s word (alive, dead or absent, busy charging or not: it is never
        waited for) and uncharge what it held, in an op of this process's row.
        The caller holds the drain lock (drain.drain_lock). Returns the pages.
        One C call (Counter._drain_v4) unless Python must take over (a hook
        armed, no writer row yet, a stop_machine): then the same op in steps."""
        taken, done = self._drain_v4(cpu, cpu + 1)
        return taken if done > cpu else self._drain_remote_stepwise(cpu)

    def _drain_remote_stepwise(self, cpu: int) -> int:
        """_drain_remote in Python steps (_drain_word), with the hooks' points."""
        sid = self._stock_id()
        if sid < 0:
            return 0
        slot = self._arena._stock_slot(cpu, sid)
        if self._slots.load(slot + STOCK_NR) & V4_PAGES_MASK == 0:
            return 0
        writer = self._arena._writer
        with writer.op(self, slot) as kbase:
            return _drain_word(self, slot, writer.row_slot, kbase)

    def _drain_lockless(self) -> int:
        """The lockless drain_stock: every CPU's word, remotely (drain.py, drain
        lock held). Returns the pages drained. One C call for every CPU
        (Counter._drain_v4), unless Python must take over at some CPU."""
        ncpus, cpu, drained = self._arena.ncpus, 0, 0
        while cpu < ncpus:
            taken, cpu = self._drain_v4(cpu, ncpus)
            drained += taken
            if cpu < ncpus:
                drained += self._drain_remote_stepwise(cpu)
                cpu += 1
        return drained

    def drain_stock(self, timeout: float | None = None, *, trylock: bool = False) -> bool:
        """Every online CPU drains its own stock of this counter: a work message to
        each CPU process, then wait for all (drain.py). A lockless counter's stock
        is drained by the caller itself, every CPU's word, synchronously, holding
        the drain lock (waiting for it at most `timeout` seconds). Any attached process may
        call it; a CPU does its own part inline. A CPU that dies meanwhile is left
        to the hotplug path; a live one that does not answer within `timeout`
        (default arena.drain_timeout) raises DrainTimeout naming it.

        trylock=True: skip (return False) if another trylock drain of this arena
        is running, like memcg's percpu_charge_mutex. Otherwise returns True.
        """
        return drain_stock(self._arena, [self], timeout, trylock)


def _drain_word(counter: Any, slot: int, row_slot: int, kbase: int) -> int:
    """Inside an op of writer row `row_slot` on `counter`'s path naming lockless
    word `slot` (the drain lock held, or under stop_machine): take the word's
    pages by CAS to (seq + 1) << 34, store the word taken in `last`, mark the op
    forward (one C call: stock_drain_v4), then uncharge the pages (_op.h). While
    hooks are armed, the same steps one by one, with the named points "drain:cas"
    (the word recorded, before its CAS), "drain:swapped" (after the CAS, before
    last and the mark), "drain:taken" (marked, before the uncharge), then
    "uncharge:level"."""
    slots = counter._slots
    if not hooks.ARMED:
        taken = slots.stock_drain_v4(row_slot, slot)
        counter._cancel_path(taken, kbase)
        return taken
    word, after = slots.load(slot + STOCK_NR), 0
    while word & V4_PAGES_MASK:
        after = ((word >> V4_PAGES_BITS) + 1) % V4_SEQ_MOD << V4_PAGES_BITS
        slots.store(row_slot + R_STOCK_AFTER, after)
        slots.store(row_slot + R_STOCK_BEFORE, word)
        if hooks.ARMED:
            hooks.at("drain:cas")
        seen = slots.cas(slot + STOCK_NR, word, after)
        if seen == word:
            break
        word = seen                     # the CPU took or added pages meanwhile
    else:
        return 0
    if hooks.ARMED:
        hooks.at("drain:swapped")
    slots.store(slot + STOCK_LAST, word)
    taken = word & V4_PAGES_MASK
    slots.op_forward(row_slot, -taken, len(counter._path), after)
    if hooks.ARMED:
        hooks.at("drain:taken")
    counter._cancel_path(taken, kbase)
    return taken


# ---- the per-counter stock on the CPU paths (cpuhp.py) ------------------------------

def _drain_stopped(counter: Any, cpu: int) -> int:
    """page_counter_drain_stock_cpu under stop_machine: take dead CPU `cpu`'s slot of
    `counter` without its lock, clear the lock word, uncharge the pages, as an op
    in the dead CPU's row (a repairer killed inside it is repaired the same way)."""
    arena, slots = counter._arena, counter._slots
    sid = counter._stock_id()
    if sid < 0:
        return 0
    slot = arena._stock_slot(cpu, sid)
    row_slot, kbase = arena._row_slot(cpu), arena._contrib_slot(cpu, 0)
    if counter._lockless():             # the remote drain, as an op of the dead row
        taken = 0
        if slots.load(slot + STOCK_NR) & V4_PAGES_MASK:
            slots.op_begin(row_slot, -1, arena._counters_slot, kbase, counter._index, slot)
            taken = _drain_word(counter, slot, row_slot, kbase)
            slots.op_end(row_slot)
        slots.store(slot + STOCK_NR, 0)         # a fresh word for the CPU's next process
        slots.store(slot + STOCK_LAST, 0)
        return int(taken)
    slots.store(slot + STOCK_LOCK, 0)
    if slots.load(slot + STOCK_NR) == 0:
        return 0
    slots.op_begin(row_slot, -1, arena._counters_slot, kbase, counter._index, slot)
    taken = slots.exchange(slot + STOCK_NR, 0)
    slots.op_forward(row_slot, -taken, len(counter._path), 0)
    counter._cancel_path(taken, kbase)
    slots.op_end(row_slot)
    return int(taken)


def _stocked(arena: Arena) -> list[Any]:
    """The handles of the counters that have stock now."""
    n = arena._published()
    return [arena._handle(i) for i in np.flatnonzero(arena._stock_ids(n) >= 0).tolist()]


def _offline(arena: Arena, cpu: int) -> None:
    """unregister_cpu: this CPU returns every stock it holds."""
    for counter in _stocked(arena):
        counter.drain_stock_local()


def _check_dead(arena: Arena, cpu: int) -> None:
    arena._stock_ids(arena._published())                 # ArenaCorrupt, or all good


def _dead(arena: Arena, cpu: int) -> dict[str, int]:
    """The hotplug-dead path: drain_cpu on every counter with stock."""
    return {c.name: _drain_stopped(c, cpu) for c in _stocked(arena)}


def _serve(arena: Arena, cpu: int) -> None:
    """The drain work item on this CPU (drain.serve, op lock held): drain the
    stock of each counter asked (drain.take_requests), in an op of its own."""
    writer = arena._writer

    def drain(index: int) -> None:
        counter = arena._handle(index)
        slot = counter._local_slot()
        if slot >= 0 and not counter._lockless():   # its drainer drains it (drain.py)
            with writer.op(counter, slot, locked=True) as kbase:
                counter._drain_local_in_op(slot, kbase)
    take_requests(arena, cpu, drain)


def _stock_pages(arena: Arena, n: int) -> np.ndarray:
    """Pages in every CPU's per-counter stock, as an (ncpus, n) array."""
    sid = arena._stock_ids(n)
    pages = np.zeros((arena.ncpus, n), np.int64)
    has = sid >= 0
    pages[:, has] = arena.stocks[:, sid[has], STOCK_NR]
    lockless = has & (arena.records[:n, PC_FLAGS] & PC_FLAG_LOCKLESS != 0)
    pages[:, lockless] &= V4_PAGES_MASK
    return pages


cpuhp.setup_state(cpuhp.CpuSubsystem(
    "page_counter stock", offline=_offline, check_dead=_check_dead, dead=_dead,
    work=_serve, stock_pages=_stock_pages))
