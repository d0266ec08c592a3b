"""stop_machine and the repair of dead writers.

A writer process can be SIGKILLed between any two instructions. What it leaves:

  - an op in progress (writer.py): its intent record in its row says which
    counters and which stock slot the op may have touched, and what contrib[row]
    and the slot held when it began;
  - at most one usage change per counter not yet in contrib[row] (the kill landed
    between the two stores of one fused step): a residue
        usage[c] - contrib[:, c].sum() != 0.

Repair runs under stop_machine, the analogue of the kernel taking a CPU down under
stop_machine: no live writer is inside an op, so every residue belongs to a dead
one. For each counter c on the path of a dead row's op,

    rollback[c] = residue[c] + sum over dead rows d of (contrib[d][c] - base_d[c]
                                                        - target_d[c])

is what the dead ops applied to usage[c] beyond their targets; we subtract it, set
each dead contrib to its base plus its target, and put each dead op's stock slot
to its value at begin, or at the end of its plan; a lockless (v4) stock word is
never put back: whether the op's CAS on it happened decides its plan, read from
the word (_op.h, v4_outcome; docs/design.md "The lockless stock"). The target of an op is 0 at
every level, so that it counts not at all, unless the op marked itself forward
(op_forward, _op.h: an op that uncharges, once its plan is final): then it is the
plan's delta at the plan's levels, and the op counts wholly. (Putting back pages
an uncharge took out could take a usage above max: another CPU may have charged
into the room.) Two CPUs killed at once need no attribution of a shared residue:
only the sum matters. A completed uncharge that would take a usage below 0 is
clamped, as a live one is, and counts in arena.underflows. Repair is restartable:
it changes usage, then contrib, then the stock, and clears the intent last, and
each step is computed from what is in the segment; a repairer killed halfway
leaves a state the next repair (of the same dead rows) finishes.

The hotplug-dead path of a CPU (hotplug.py) runs the repair first, then lets
each subsystem reclaim the dead CPU's state.

The repair reads the intent record of each dead row, which the dead writer
wrote, and trusts none of its words: the counter must be a counter, the depth
the length of its path (each parent an earlier counter), the stock slot -1 or a
slot of the stocks section (or, for a CPU's row, a word a subsystem owns:
cpuhp.CpuSubsystem.owns_slot). A dead
row whose intent record is impossible makes the repair refuse: ArenaCorrupt
naming the word, and nothing changed, for a rollback computed from wrong words
would write wrong words (once, over the header). The dead CPU stays registered
until someone puts the segment right.

Who repairs, and when (any process may; stop_machine serialises them):
  - Arena.repair(): every dead writer, on demand; returns a Repair;
  - a charge about to be refused (page_counter.py) repairs first when some dead
    writer's op is in progress, then retries once (repair_before_refusal);
  - a process that finds no free writer row (writer.py);
  - the hotplug-dead path of a CPU (cpu_dead), and procs.Machine, whose monitor
    runs Arena.repair() when any writer of the arena dies.

Not covered: watermark and failcnt may keep the effect of a rolled-back op (they
are statistics). A live writer stopped (SIGSTOP) inside an op stalls stop_machine
for arena.wait_timeout seconds, then WaitTimeout names its pid (wait.py).
"""
from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import numpy as np

from . import pidlock, segment
from ._atomic import V4_DRAINED
from .errors import WaitTimeout
from .segment import (
    H_STOP,
    H_UNDERFLOWS,
    MAX_DEPTH,
    PC_CHILDREN_LOW_USAGE,
    PC_CHILDREN_MIN_USAGE,
    PC_LOW,
    PC_LOW_USAGE,
    PC_MIN,
    PC_MIN_USAGE,
    PC_USAGE,
    PC_WORDS,
    R_BASE,
    R_COUNTER,
    R_DEPTH,
    R_FWD_DELTA,
    R_FWD_LEVELS,
    R_IN_OP,
    R_OP,
    R_PID,
    R_STOCK_AFTER,
    R_STOCK_BEFORE,
    R_STOCK_SLOT,
    STOCK_LAST,
    STOCK_NR,
    STOCK_WORDS,
)
from .wait import bounded_wait

if TYPE_CHECKING:
    from collections.abc import Callable

    from .segment import Segment as Arena

# Does CPU row `row` own stock word `slot`, besides its per-counter stock slots?
# Set by the CPU layer (cpuhp subsystems' owns_slot), which sits above this one.
owns_slot: list[Callable[[Arena, int, int], bool]] = []


# One stopper per process at a time: stop is held by a pid, so two threads of one
# process must not both think they hold it.
_stopper = threading.Lock()
# The thread of this process inside a stop_machine (its ident), or 0. Written by
# that thread only; an op that cannot start reads it (stopper_is_this_thread).
_stopper_thread = 0


def _after_fork_in_child() -> None:
    global _stopper, _stopper_thread
    _stopper = threading.Lock()
    _stopper_thread = 0


segment.register_at_fork(_after_fork_in_child)


def stopper_is_this_thread() -> bool:
    """Does the calling thread hold a stop_machine? Its ops could never start.
    Another thread of the same process (stop holds only the pid) waits instead."""
    return _stopper_thread == threading.get_ident()

# A refused charge waits at most this long (seconds) to repair a dead writer: only
# a live writer stopped inside an op (SIGSTOP) or a stuck stopper makes it wait.
REFUSAL_REPAIR_TIMEOUT = 1.0


@contextmanager
def stop_machine(arena: Arena, timeout: float | None = None) -> Iterator[None]:
    """Quiesce every live writer of `arena`: inside the block no op is in progress
    in any live process and none starts (fast-path stock hits go on: they change no
    usage). One stopper at a time; a dead stopper's hold is taken over. Drain
    requests that reach this process meanwhile are served when it ends.

    Handshake (Dekker, seq_cst): we store stop, then read each row's in_op; a
    writer stores in_op, then reads stop (op_begin in _atomic.c).

    Raises WaitTimeout (a TimeoutError), having changed nothing, if another
    stopper keeps stop, or a live writer stays inside an op (stopped with SIGSTOP,
    say), for `timeout` seconds (default arena.wait_timeout): it names the pid.
    """
    global _stopper_thread
    slots, me = arena._slots, os.getpid()

    timeout = arena.wait_timeout if timeout is None else timeout
    if not _stopper.acquire(timeout=timeout):
        raise WaitTimeout(arena.name, "stop_machine, held by another thread of this "
                          "process", me, timeout)
    try:
        # Our own pid in stop is stale: _stopper keeps every other thread of ours out.
        pidlock.lock(arena, H_STOP, me, "stop_machine", stale_self=True, futex=True,
                     timeout=timeout)
        _stopper_thread = threading.get_ident()
        try:
            _wait_quiescent(arena, timeout)
            yield
        finally:
            _stopper_thread = 0
            slots.store(H_STOP, 0)
            slots.futex_wake(H_STOP)
    finally:
        _stopper.release()
    writer = arena._writer
    if writer.drain_pending and writer.serve_drains is not None:
        writer.serve_drains()


def _wait_quiescent(arena: Arena, timeout: float) -> None:
    """Wait until no live row is inside an op. An op lasts microseconds; a row whose
    live owner stays inside one (stopped, or its in_op word corrupt) gets
    WaitTimeout after `timeout` seconds, naming the row and its pid."""
    for row in range(arena.nrows):
        if arena._slots.load(arena._row_slot(row) + R_IN_OP):
            what = f"{'CPU' if row < arena.ncpus else 'writer row'} {row} to end its op"
            bounded_wait(arena, what, partial(_live_in_op, arena, row), timeout=timeout)


def _live_in_op(arena: Arena, row: int) -> int:
    """The pid of row `row`'s owner while it is alive and inside an op, else 0."""
    base = arena._row_slot(row)
    pid = arena._slots.load(base + R_PID)
    return pid if arena._slots.load(base + R_IN_OP) and arena.row_owner_alive(row) else 0


@dataclass(frozen=True)
class Repair:
    """What one repair of dead writers did (Arena.repair, repair_dead_rows).

    rows   every writer row whose owner was found dead, ascending. Non-CPU rows
           are free again afterwards; a dead CPU's row stays its own until the
           hotplug-dead path (Arena.hotplug_cpu_dead) drains its stock and frees it.
    pids   the owner of each of those rows, in the same order.
    ops    the rows among them whose op was in progress: it was rolled back, so it
           counts not at all, at every level (and its stock slot, a CPU's, holds
           what it held when the op began); or, for the rows also in `forward`,
           completed: it counts wholly (an uncharge or a drain, see above).
    pages  by counter name, the net pages the repair took out of usage: a charge
           undone, or the rest of an uncharge completed (negative: pages put
           back); counters left unchanged are left out.
    forward  the rows among `ops` whose op was completed rather than rolled back.

    A Repair is true when it found a dead writer. Example:
        Repair(rows=(3,), pids=(4711,), ops=(3,), pages={'leaf': 10}, forward=())
    """
    rows: tuple[int, ...] = ()
    pids: tuple[int, ...] = ()
    ops: tuple[int, ...] = ()
    pages: dict[str, int] = field(default_factory=dict)
    forward: tuple[int, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.rows)


_NOTHING = Repair()


def repair_dead_rows(arena: Arena, timeout: float | None = None) -> Repair:
    """stop_machine, then repair every row whose owner died (see Repair). Raises
    WaitTimeout when stop_machine cannot quiesce within `timeout` (stop_machine)."""
    with stop_machine(arena, timeout):
        return _repair(arena)


def repair_before_refusal(arena: Arena) -> Repair:
    """For a charge about to be refused, after its op has ended: if the op of some
    dead writer is in progress, repair every dead writer. Returns the Repair (empty
    if there was nothing to do, or if stop_machine could not quiesce within
    REFUSAL_REPAIR_TIMEOUT: the refusal then stands, and the next one tries again).

    Cheap when there is nothing to repair, as refusals can be frequent: only rows
    other than this process's own whose in_op word is set are candidates,
    and only their owners' liveness is read (/proc/<pid>/stat, with the row's start
    time). A dead writer outside any op left no usage change: it is not a reason."""
    # op is set only while in_op is (op_begin sets in_op first; op_end, op_abort
    # and the repair clear op first), so in_op alone says who is inside an op.
    in_op = arena.rows[:, R_IN_OP]
    if not np.count_nonzero(in_op):                       # the usual case: 0.4 us
        return _NOTHING
    own = arena._writer.row
    for row in np.flatnonzero(in_op).tolist():
        if row != own and not arena.row_owner_alive(row):
            break
    else:
        return _NOTHING
    try:
        return repair_dead_rows(arena, min(arena.wait_timeout, REFUSAL_REPAIR_TIMEOUT))
    except TimeoutError:
        return _NOTHING



def _dead_rows(arena: Arena) -> list[tuple[int, int]]:
    """(row, pid) of every claimed row whose owner is dead."""
    pids = arena.rows[:, R_PID].copy()            # rows change while we look
    return [(row, int(pids[row])) for row in np.flatnonzero(pids).tolist()
            if not arena.row_owner_alive(row)]


def _repair(arena: Arena) -> Repair:
    """Roll back the ops of dead writers (see the module docstring). Under stop_machine.
    Raises ArenaCorrupt, changing nothing, if a dead row's intent record is impossible."""
    slots, rows = arena._slots, arena.rows
    found = _dead_rows(arena)
    dead = [row for row, _ in found]
    n = arena._published()
    parents = arena._parents(n)
    ops = {row: _intent(arena, row, parents) for row in dead if rows[row, R_OP]}
    plans = _lockless_plans(arena, ops)
    for row, (levels, _) in plans.items():
        ops[row] = (*ops[row][:3], levels)
    residue = arena.records[:n, PC_USAGE] - arena.contrib[:, :n].sum(axis=0)
    rollback = [int(r) for r in residue]
    covered = np.zeros(n, bool)
    resets: dict[tuple[int, int], int] = {}             # (row, counter): contrib after
    for row, (counter, depth, _, levels) in ops.items():
        delta = plans[row][1] if row in plans else int(rows[row, R_FWD_DELTA]) if levels else 0
        index = counter                                 # walks up to the root
        for level in range(depth):
            target = _int64(int(rows[row, R_BASE + level]) + (delta if level < levels else 0))
            rollback[index] = _int64(rollback[index] + int(arena.contrib[row, index]) - target)
            covered[index] = True
            resets[row, index] = target
            index = int(parents[index])
    forward = tuple(row for row, (_, _, _, levels) in ops.items() if levels)
    for index in np.flatnonzero(covered).tolist():      # a completed uncharge below 0
        deficit = -_int64(int(arena.records[index, PC_USAGE]) - rollback[index])
        if deficit > 0:
            completer = next((r for r in forward if (r, index) in resets), None)
            if completer is not None:                   # clamped at 0, as a live one is
                rollback[index] = _int64(rollback[index] - deficit)
                resets[completer, index] = _int64(resets[completer, index] + deficit)
                slots.fetch_add(H_UNDERFLOWS, 1)
    stray = np.flatnonzero(~covered & (residue != 0))
    if len(stray):
        warnings.warn(f"repair: usage differs from the writers' contributions at counters "
                      f"{stray.tolist()} outside any dead op; left as is", RuntimeWarning,
                      stacklevel=1)
    pages: dict[str, int] = {}
    for index in np.flatnonzero(covered).tolist():
        if rollback[index]:
            slots.fetch_add(arena._counters_slot + index * PC_WORDS + PC_USAGE,
                            _int64(-rollback[index]))
            pages[arena._name(index)] = rollback[index]
    for (row, index), contrib in resets.items():
        slots.store(arena._contrib_slot(row, index), contrib)
    for row in dead:
        base_slot = arena._row_slot(row)
        if row in ops:
            stock_slot = ops[row][2]
            if stock_slot >= 0 and row not in plans:      # a lockless word: left as is
                end = R_STOCK_AFTER if row in forward else R_STOCK_BEFORE
                slots.store(stock_slot + STOCK_NR, int(rows[row, end]))
            slots.store(base_slot + R_OP, 0)
        slots.store(base_slot + R_IN_OP, 0)
        if row >= arena.ncpus:                          # a non-CPU row: free again
            arena._set_row_owner(row, 0)
            slots.store(base_slot + R_PID, 0)
    if resets:
        _propagate_all(arena, parents)
    return Repair(tuple(dead), tuple(pid for _, pid in found), tuple(ops), pages, forward)


def _lockless_plans(arena: Arena, ops: dict[int, tuple[int, int, int, int]]
                    ) -> dict[int, tuple[int, int]]:
    """(levels, delta) of each dead op on a lockless (v4) stock word: what its CAS,
    if it happened, commits it to (_op.h, v4_outcome; stock_v4_plan). The word
    itself is never written back: its live CPU may have changed it since. A dead
    drain whose CAS happened gets its `last` word first (it may have died before
    storing it), since a dead deposit on the same word is decided by it."""
    slots, rows = arena._slots, arena.rows
    plan = {row: slots.stock_v4_plan(arena._row_slot(row), arena._counters_slot)
            for row in ops}
    for row, found in plan.items():
        if found is not None and found[0] == V4_DRAINED:
            slots.store(ops[row][2] + STOCK_LAST, int(rows[row, R_STOCK_BEFORE]))
    plans = {}
    for row in ops:
        found = slots.stock_v4_plan(arena._row_slot(row), arena._counters_slot)
        if found is not None:
            plans[row] = found[1], found[2]
    return plans


def _int64(x: int) -> int:
    """x modulo 2**64, as an int64: the usage words wrap like that, so a rollback
    of wrapped words is exact in the same arithmetic."""
    return (x + 2**63) % 2**64 - 2**63


def _intent(arena: Arena, row: int, parents: np.ndarray) -> tuple[int, int, int, int]:
    """(counter, depth, stock slot, forward levels) of dead row `row`'s op, each
    word checked: the counter published, the depth the length of its path, the
    stock slot -1 or the first word of a stock slot, or for a CPU's row, a word a
    subsystem owns (such as memcg's legacy slot words: owns_slot), the forward
    levels in [0, depth]."""
    words = arena.rows[row]
    index, depth, stock_slot, levels = (int(words[R_COUNTER]), int(words[R_DEPTH]),
                                        int(words[R_STOCK_SLOT]), int(words[R_FWD_LEVELS]))
    if not 0 <= index < len(parents):
        raise arena._corrupt(f"row {row}'s op counter", index,
                             f"not a counter index below ncounters = {len(parents)}")
    length, i = 0, index
    while i >= 0 and length <= MAX_DEPTH:
        length, i = length + 1, int(parents[i])
    if depth != length or depth > MAX_DEPTH:
        raise arena._corrupt(f"row {row}'s op depth", depth,
                             f"not {length}, the number of levels of counter {index}'s path")
    stock = stock_slot - arena._stocks_slot
    if not (stock_slot == -1
            or (0 <= stock < arena.ncpus * arena._stock_block_words
                and stock % arena._stock_block_words % STOCK_WORDS == 0
                and stock % arena._stock_block_words // STOCK_WORDS < arena.max_stocked)
            or (row < arena.ncpus and any(owns(arena, row, stock_slot) for owns in owns_slot))):
        raise arena._corrupt(f"row {row}'s op stock_slot", stock_slot,
                             "not -1 or a stock slot" + (" or a stock word its CPU owns"
                                                         if row < arena.ncpus else ""))
    if not 0 <= levels <= depth:
        raise arena._corrupt(f"row {row}'s op fwd_levels", levels,
                             f"not a level count in [0, {depth}], its op's depth")
    return index, depth, stock_slot, levels


def _propagate_all(arena: Arena, parents: np.ndarray) -> None:
    """Recompute protected usage exactly (propagate_protected_usage for every
    counter), since a rolled-back op may have propagated a usage that is gone.
    parents: every counter's, checked (Arena._parents)."""
    slots, records = arena._slots, arena.records
    n = len(parents)
    children_min = np.zeros(n, np.int64)
    children_low = np.zeros(n, np.int64)
    for index in range(n):
        parent = int(parents[index])
        if parent < 0:
            continue
        usage = int(records[index, PC_USAGE])
        c = arena._counters_slot + index * PC_WORDS
        min_usage = min(usage, int(records[index, PC_MIN]))
        low_usage = min(usage, int(records[index, PC_LOW]))
        slots.store(c + PC_MIN_USAGE, min_usage)
        slots.store(c + PC_LOW_USAGE, low_usage)
        children_min[parent] += min_usage
        children_low[parent] += low_usage
    for index in range(n):
        c = arena._counters_slot + index * PC_WORDS
        slots.store(c + PC_CHILDREN_MIN_USAGE, int(children_min[index]))
        slots.store(c + PC_CHILDREN_LOW_USAGE, int(children_low[index]))
