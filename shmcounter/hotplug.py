"""CPU hotplug, the "dead" path: stop_machine, repair of dead writers, reclaim.

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

    rollback[c] = residue[c] + sum over dead rows d of (contrib[d][c] - base_d[c])

is exactly what the dead ops applied to usage[c]; we subtract it, set each dead
contrib back to its base, and put each dead op's stock slot back to its value at
begin. The op counts not at all, at every level. Two CPUs killed at once need no
attribution of a shared residue: only the sum matters. Repair is restartable: it
changes usage, then contrib, then the stock, and clears the intent last, and each
step is computed from what is in the segment; a repairer killed halfway leaves a
state the next repair (of the same dead rows) finishes.

Then drain_cpu takes each stock of the dead CPU without its lock, clears the lock
word, and uncharges the pages, as an op in the dead CPU's own row (so that a
repairer killed there is repaired the same way); if the arena's cgroup tree uses
the legacy 7-slot stock, its slots are drained the same way (memcg/legacy.py);
and the CPU is free again.

The repair reads the intent record of each dead row, which the dead writer
wrote, and trusts none of its words: the counter must be a counter, the depth
the length of its path (each parent an earlier counter), the stock slot -1 or a
slot of the stocks section (or, for a CPU's row, of its own legacy block). A dead
row whose intent record is impossible makes the repair refuse: ArenaCorrupt
naming the word, and nothing changed, for a rollback computed from wrong words
would write wrong words (once, over the header). The dead CPU stays registered
until someone puts the segment right.

Not covered: watermark and failcnt may keep the effect of a rolled-back op (they
are statistics). A live writer stopped (SIGSTOP) inside an op stalls stop_machine
for arena.wait_timeout seconds, then WaitTimeout names its pid (wait.py).
"""
from __future__ import annotations

import os
import threading
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from .layout import (
    H_STOP, MAX_DEPTH, PC_CHILDREN_LOW_USAGE,
    PC_CHILDREN_MIN_USAGE, PC_LOW, PC_LOW_USAGE, PC_MIN, PC_MIN_USAGE, PC_USAGE, PC_WORDS,
    R_BASE, R_COUNTER, R_DEPTH, R_DONE_SEQ, R_IN_OP, R_OP, R_PID, R_REQ_SEQ,
    R_STOCK_BEFORE, R_STOCK_SLOT, STOCK_LOCK, STOCK_NR, STOCK_WORDS, pid_alive,
)
from .wait import bounded_wait

if TYPE_CHECKING:
    from .layout import Arena
    from .page_counter import PageCounter


# One stopper per process at a time: stop is held by a pid, so two threads of one
# process must not both think they hold it.
_stopper = threading.Lock()


def _after_fork_in_child() -> None:
    global _stopper
    _stopper = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


@contextmanager
def stop_machine(arena: Arena) -> Iterator[None]:
    """Quiesce every live writer of `arena`: inside the block no op is in progress
    in any live process and none starts (fast-path stock hits go on: they change no
    usage). One stopper at a time; a dead stopper's hold is taken over. Drain
    requests that reach this process meanwhile are served when it ends.

    Handshake (Dekker, seq_cst): we store stop, then read each row's in_op; a
    writer stores in_op, then reads stop (op_begin in _atomic.c).
    """
    slots, me = arena._slots, os.getpid()

    def take() -> int:
        # Our own pid in stop is stale: _stopper keeps every other thread of ours out.
        holder = slots.cas(H_STOP, 0, me)
        if holder and (holder == me or not pid_alive(holder)) \
                and slots.cas(H_STOP, holder, me) == holder:
            return 0
        return holder
    with _stopper:
        bounded_wait(arena, "stop_machine", take, futex=H_STOP)
        try:
            _wait_quiescent(arena)
            yield
        finally:
            slots.store(H_STOP, 0)
            slots.futex_wake(H_STOP)
    writer = arena._writer
    if writer.drain_pending and writer.serve_drains is not None:
        writer.serve_drains()


def _wait_quiescent(arena: Arena) -> None:
    """Wait until no live row is inside an op. An op lasts microseconds; a row whose
    live owner stays inside one (stopped, or its in_op word corrupt) gets
    WaitTimeout after arena.wait_timeout seconds, naming the row and its pid."""
    for row in range(arena.nrows):
        if arena._slots.load(arena._row_slot(row) + R_IN_OP):
            what = f"{'CPU' if row < arena.ncpus else 'writer row'} {row} to end its op"
            bounded_wait(arena, what, lambda: _live_in_op(arena, row))


def _live_in_op(arena: Arena, row: int) -> int:
    """The pid of row `row`'s owner while it is alive and inside an op, else 0."""
    base = arena._row_slot(row)
    pid = arena._slots.load(base + R_PID)
    return pid if arena._slots.load(base + R_IN_OP) and arena.row_owner_alive(row) else 0


def repair_dead_rows(arena: Arena) -> list[int]:
    """stop_machine, then repair every row whose owner died. Returns those rows."""
    with stop_machine(arena):
        return _repair(arena)


def _dead_rows(arena: Arena) -> list[int]:
    pids = arena.rows[:, R_PID].copy()            # rows change while we look
    return [row for row in np.flatnonzero(pids).tolist() if not arena.row_owner_alive(row)]


def _repair(arena: Arena) -> list[int]:
    """Roll back the ops of dead writers (see the module docstring). Under stop_machine.
    Raises ArenaCorrupt, changing nothing, if a dead row's intent record is impossible."""
    slots, rows = arena._slots, arena.rows
    dead = _dead_rows(arena)
    n = arena._published()
    parents = arena._parents(n)
    ops = {row: _intent(arena, row, parents) for row in dead if rows[row, R_OP]}
    residue = arena.records[:n, PC_USAGE] - arena.contrib[:, :n].sum(axis=0)
    rollback = [int(r) for r in residue]
    covered = np.zeros(n, bool)
    resets: list[tuple[int, int, int]] = []             # (row, counter, base)
    for row, (index, depth, _) in ops.items():
        for level in range(depth):
            base = int(rows[row, R_BASE + level])
            rollback[index] = _int64(rollback[index] + int(arena.contrib[row, index]) - base)
            covered[index] = True
            resets.append((row, index, base))
            index = int(parents[index])
    stray = np.flatnonzero(~covered & (residue != 0))
    if len(stray):
        warnings.warn(f"repair: usage differs from the writers' contributions at counters "
                      f"{stray.tolist()} outside any dead op; left as is", RuntimeWarning)
    for index in np.flatnonzero(covered).tolist():
        if rollback[index]:
            slots.fetch_add(arena._counters_slot + index * PC_WORDS + PC_USAGE,
                            _int64(-rollback[index]))
    for row, index, base in resets:
        slots.store(arena._contrib_slot(row, index), base)
    for row in dead:
        base_slot = arena._row_slot(row)
        if row in ops:
            stock_slot = ops[row][2]
            if stock_slot >= 0:
                slots.store(stock_slot + STOCK_NR, int(rows[row, R_STOCK_BEFORE]))
            slots.store(base_slot + R_OP, 0)
        slots.store(base_slot + R_IN_OP, 0)
        if row >= arena.ncpus:                          # a non-CPU row: free again
            arena._set_row_owner(row, 0)
            slots.store(base_slot + R_PID, 0)
    if resets:
        _propagate_all(arena, parents)
    return dead


def _int64(x: int) -> int:
    """x modulo 2**64, as an int64: the usage words wrap like that, so a rollback
    of wrapped words is exact in the same arithmetic."""
    return (x + 2**63) % 2**64 - 2**63


def _intent(arena: Arena, row: int, parents: np.ndarray) -> tuple[int, int, int]:
    """(counter, depth, stock slot) of dead row `row`'s op, each word checked: the
    counter published, the depth the length of its path, the stock slot -1 or the
    first word of a stock slot, or for a CPU's row, one of its legacy slot words."""
    words = arena.rows[row]
    index, depth, stock_slot = (int(words[R_COUNTER]), int(words[R_DEPTH]),
                                int(words[R_STOCK_SLOT]))
    if not 0 <= index < len(parents):
        raise arena._corrupt(f"row {row}'s op counter", index,
                             f"not a counter index below ncounters = {len(parents)}")
    length, i = 0, index
    while i >= 0 and length <= MAX_DEPTH:
        length, i = length + 1, int(parents[i])
    if depth != length or depth > MAX_DEPTH:
        raise arena._corrupt(f"row {row}'s op depth", depth,
                             f"not {length}, the number of levels of counter {index}'s path")
    from .memcg.legacy import MC_SLOTS, NR_MEMCG_STOCK
    stock = stock_slot - arena._stocks_slot
    legacy = stock_slot - arena._memcg_cpu_slot(row) - MC_SLOTS if row < arena.ncpus else -1
    if not (stock_slot == -1
            or 0 <= stock < arena.ncpus * arena._stock_block_words
            and stock % arena._stock_block_words % STOCK_WORDS == 0
            and stock % arena._stock_block_words // STOCK_WORDS < arena.max_stocked
            or 0 <= legacy < NR_MEMCG_STOCK):
        raise arena._corrupt(f"row {row}'s op stock_slot", stock_slot,
                             "not -1 or a stock slot" + (" or one of its CPU's legacy slot words"
                                                         if row < arena.ncpus else ""))
    return index, depth, stock_slot


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


def _drain_stopped(counter: PageCounter, cpu: int) -> int:
    """page_counter_drain_stock_cpu under stop_machine: take dead CPU `cpu`'s slot of
    `counter` without its lock, clear the lock word, uncharge the pages, as an op
    in the dead CPU's row."""
    arena, slots = counter._arena, counter._slots
    sid = counter._stock_id()
    if sid < 0:
        return 0
    slot = arena._stock_slot(cpu, sid)
    slots.store(slot + STOCK_LOCK, 0)
    if slots.load(slot + STOCK_NR) == 0:
        return 0
    row_slot, kbase = arena._row_slot(cpu), arena._contrib_slot(cpu, 0)
    slots.op_begin(row_slot, -1, arena._counters_slot, kbase, counter._index, slot)
    taken = slots.exchange(slot + STOCK_NR, 0)
    counter._cancel_path(taken, kbase)
    slots.op_end(row_slot)
    return taken


def drain_dead_cpu(arena: Arena, cpu: int,
                   counters: Iterable[PageCounter]) -> dict[str, int]:
    """Repair dead writers, then drain dead CPU `cpu`'s stock of each counter.
    Raises ValueError if a live process is registered as `cpu`."""
    slot = arena._cpu_slot(cpu)
    with stop_machine(arena):
        _check_dead(arena, cpu, slot)
        _repair(arena)
        return {c.name: _drain_stopped(c, cpu) for c in counters}


def cpu_dead(arena: Arena, cpu: int) -> dict[str, int]:
    """memcg_hotplug_cpu_dead: repair, drain every stock of dead CPU `cpu`, forget
    its drain requests and free the CPU for a new process. Returns the pages
    reclaimed by counter name (counters with none left out)."""
    slots = arena._slots
    slot = arena._cpu_slot(cpu)
    row = arena._row_slot(cpu)
    with stop_machine(arena):
        pid = _check_dead(arena, cpu, slot)
        # Every word the drains below index by is checked before anything changes.
        arena._stock_ids(arena._published())
        if arena.memcg_legacy:
            from .memcg import legacy
            legacy.check_slots(arena, cpu)
        _repair(arena)
        reclaimed = {c.name: _drain_stopped(c, cpu) for c in arena.stocked_counters()}
        if arena.memcg_legacy:
            for name, n in legacy.drain_dead(arena, cpu).items():
                reclaimed[name] = reclaimed.get(name, 0) + n
        # No slot of the dead CPU may stay locked, with stock or not: a stock id
        # freed since and reused would be busy forever on this CPU.
        arena.stocks[cpu, :, STOCK_LOCK] = 0
        arena.requests[cpu, :] = 0
        slots.store(row + R_DONE_SEQ, slots.load(row + R_REQ_SEQ))
        arena._set_row_owner(cpu, 0)
        slots.cas(slot, pid, 0)
    slots.futex_wake(row + R_DONE_SEQ)                 # drains waiting on it: skip it
    return {name: n for name, n in reclaimed.items() if n}


def _check_dead(arena: Arena, cpu: int, slot: int) -> int:
    pid = arena._slots.load(slot)
    if arena.row_owner_alive(cpu):
        raise ValueError(f"CPU {cpu} is online (pid {pid}); drain_cpu is for dead "
                         f"CPUs, use drain_stock on a live one")
    return pid
