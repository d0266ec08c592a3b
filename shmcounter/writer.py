"""This process's writer row on an arena: ops, intent records, deferred drains.

Every change of a usage happens inside an op, by the owner of a writer row: CPU k
writes with row k, any other process claims a free row of its own on its first
write. An op is

    begin(index, stock_slot)   in_op = 1 (unless a stop_machine runs: then wait),
                               snapshot contrib[row] along index's path and the
                               stock slot the op may touch, op = 1
    ... fused level steps, each updating usage and contrib[row] ...
    end()                      op = 0, in_op = 0

so that when the owner is killed at any instant, stop_machine.repair_dead_rows() can
roll its op back to the snapshot: the op counts not at all, at every level. The
fast path of try_charge (one C call on this CPU's own stock slot) needs no op:
it changes no usage, and a kill leaves it either done or not done.

Threads: one op at a time per process (the row's intent record is single), so
begin() takes a per-process lock. A drain request's signal handler runs between
bytecodes of the main thread, possibly in the middle of an op; it must not start
a second op there. It sets `drain_pending` and tries the lock: whoever ends the
op that holds it serves the drain right after (end() releases, then looks).
"""
from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from . import segment
from .errors import ArenaError
from .proc import pid_alive
from .segment import H_STOP, R_PID
from .stop_machine import repair_dead_rows, stopper_is_this_thread
from .wait import bounded_wait

if TYPE_CHECKING:
    from .segment import Segment as Arena


class Writer:
    """One arena's writer state in this process. Reset in a forked child: a child
    is a new writer, never its parent's row or CPU."""

    def __init__(self, arena: Arena) -> None:
        self._arena = arena
        self.row = -1                    # this process's row, -1 until claimed
        self._lock = threading.Lock()    # one op at a time in this process
        self.drain_pending = False
        self.serve_drains: Callable[[], None] | None = None   # set by drain.py

    # ---- rows ---------------------------------------------------------------

    # The row's first slot and that of its contrib words live in the Slots object
    # (set_writer), where the whole ops of _counter.c read them.
    @property
    def row_slot(self) -> int:
        return self._arena._slots.row

    @property
    def contrib_slot(self) -> int:
        return self._arena._slots.contrib

    def use_row(self, row: int) -> None:
        arena = self._arena
        self.row = row
        arena._slots.set_writer(arena._row_slot(row), arena._contrib_slot(row, 0))

    def claim_row(self) -> None:
        """Claim a free non-CPU row for this process; repair and reuse the rows of
        dead processes when none is free."""
        arena, me = self._arena, os.getpid()
        for attempt in range(2):
            for row in range(arena.ncpus, arena.nrows):
                slot = arena._row_slot(row) + R_PID
                if arena._slots.cas(slot, 0, me) == 0:
                    arena._set_row_owner(row, me)
                    self.use_row(row)
                    return
            if attempt == 0:
                repair_dead_rows(arena)
        raise ArenaError(f"arena {arena.name!r} has no free writer row: "
                         f"{arena.nrows - arena.ncpus} non-CPU processes write to it "
                         f"already (see max_writers)")

    def release_row(self) -> None:
        """Give a claimed non-CPU row back (close). CPU rows go with unregister_cpu."""
        arena = self._arena
        if self.row >= arena.ncpus and arena._slots.load(self.row_slot + R_PID) == os.getpid():
            arena._set_row_owner(self.row, 0)
            arena._slots.cas(self.row_slot + R_PID, os.getpid(), 0)
        self._forget_row()

    def _forget_row(self) -> None:
        self.row = -1
        self._arena._slots.set_writer(-1, -1)

    def after_fork(self) -> None:
        self._forget_row()
        self._lock = threading.Lock()
        self.drain_pending = False

    # ---- ops ----------------------------------------------------------------

    def op(self, counter: Any, stock_slot: int = -1, *, locked: bool = False) -> Writer:
        """The op bracket, written once: `with writer.op(counter, slot) as kbase:`
        runs the block as one op on `counter`'s path that may touch stock slot
        `slot`; kbase is this row's first contrib slot. op() begins it (taking the
        op lock, unless `locked`: the caller holds it already, as the drain server
        does), the with ends it; if the block raises, the op is rolled back to its
        snapshot (op_abort), the counter's protected usage recomputed along its
        path, and the exception goes on. The op lock is held from op() to the end
        of the block, so the bracket's own fields are safe from other threads.
        (The slow paths run here: op() and __exit__ make no call they can inline.)"""
        if not locked:
            self._lock.acquire()
        try:
            if self.row < 0:
                self.claim_row()
            arena = self._arena
            if not arena._slots.op_begin(self.row_slot, H_STOP, arena._counters_slot,
                                         self.contrib_slot, counter._index, stock_slot):
                self._begin_stopped(counter._index, stock_slot)
        except BaseException:
            if not locked:
                self._lock.release()
            raise
        self._op_counter, self._op_locked = counter, locked
        return self

    def forward(self, delta: int, levels: int, stock_after: int = 0) -> None:
        """Mark this process's op forward (op_forward, _op.h): its plan is final,
        and a kill from now on completes it: delta at each of its first `levels`
        levels, its stock word ending at stock_after. Before its first decrease."""
        self._arena._slots.op_forward(self.row_slot, delta, levels, stock_after)

    def __enter__(self) -> int:
        return self.contrib_slot

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self._arena._slots.op_end(self.row_slot)
            if not self._op_locked:
                self._lock.release()                  # _unlock_and_serve, inlined
                if self.drain_pending and self.serve_drains is not None:
                    self.serve_drains()
            return
        counter, locked = self._op_counter, self._op_locked
        try:
            self.rollback()
        finally:
            if not locked:
                self._unlock_and_serve()
        counter._propagate_path()

    def _unlock_and_serve(self) -> None:
        """Release the op lock, then serve a drain that arrived during the op."""
        self._lock.release()
        if self.drain_pending and self.serve_drains is not None:
            self.serve_drains()

    def rollback(self) -> None:
        """op_abort: put every level and the stock slot back to the op's snapshot
        and end it. The op lock is the caller's. ArenaCorrupt for an impossible
        intent record (the op lock is released all the same: __exit__)."""
        arena = self._arena
        arena._slots.op_abort(self.row_slot, arena._counters_slot, self.contrib_slot)

    def _begin_stopped(self, index: int, stock_slot: int) -> None:
        """op_begin found a stop_machine in progress: wait for it to end, then begin."""
        arena = self._arena
        while True:
            # stop names our pid: this very thread would wait for itself (another
            # thread of ours, e.g. procs.Machine's monitor, ends it: wait).
            if arena._slots.load(H_STOP) == os.getpid() and stopper_is_this_thread():
                raise RuntimeError("an op cannot start in the thread that holds "
                                   "stop_machine")
            wait_for_restart(arena)
            if arena._slots.op_begin(self.row_slot, H_STOP, arena._counters_slot,
                                     self.contrib_slot, index, stock_slot):
                return

    @contextmanager
    def held(self) -> Iterator[None]:
        """Hold the op lock without an op: a drain request that arrives meanwhile is
        served after the block, as after an op (a Python step of the stock fast
        path must not be interleaved by this CPU's own drain)."""
        self._lock.acquire()
        try:
            yield
        finally:
            self._unlock_and_serve()

    def try_lock(self) -> bool:
        """For the drain server: take the op lock without waiting."""
        return self._lock.acquire(blocking=False)

    def unlock(self) -> None:
        self._lock.release()


def wait_for_restart(arena: Arena) -> None:
    """Sleep while a stop_machine is in progress; WaitTimeout after
    arena.wait_timeout seconds of one live stopper (wait.py)."""
    bounded_wait(arena, "stop_machine", lambda: _live_stopper(arena), futex=H_STOP)


def _live_stopper(arena: Arena) -> int:
    """The pid holding stop_machine, or 0; a dead holder's hold is cleared first
    (whatever it left half-repaired, the next repair finishes: stop_machine.py)."""
    holder = arena._slots.load(H_STOP)
    if holder and not pid_alive(holder):
        arena._slots.cas(H_STOP, holder, 0)
        return 0
    return holder


def _init(arena: Arena) -> None:
    arena._writer = Writer(arena)


def _fork(arena: Arena) -> None:
    arena._writer.after_fork()


def _close(arena: Arena) -> None:
    arena._writer.release_row()


segment.register_handle_hook("init", _init)
segment.register_handle_hook("fork", _fork)
segment.register_handle_hook("close", _close)
