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

Not covered: watermark and failcnt may keep the effect of a rolled-back op (they
are statistics). A live writer stopped (SIGSTOP) inside an op stalls stop_machine
until it continues.
"""
from __future__ import annotations

import os
import threading
import time
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from .layout import (
    H_STOP, PC_CHILDREN_LOW_USAGE, PC_CHILDREN_MIN_USAGE, PC_LOW, PC_LOW_USAGE, PC_MIN,
    PC_MIN_USAGE, PC_PARENT, PC_STOCK_ID, PC_USAGE, PC_WORDS, R_BASE, R_COUNTER, R_DEPTH, R_DONE_SEQ, R_IN_OP,
    R_OP, R_PID, R_REQ_SEQ, R_STOCK_BEFORE, R_STOCK_SLOT, STOCK_LOCK, STOCK_NR,
)

from .writer import wait_for_stopper

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
    with _stopper:
        while (holder := slots.cas(H_STOP, 0, me)) != 0:
            wait_for_stopper(arena, holder)
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
    """Wait until no live row is inside an op. An op lasts microseconds."""
    slots = arena._slots
    for row in range(arena.nrows):
        base = arena._row_slot(row)
        pause = 0.0
        while slots.load(base + R_IN_OP):
            if not arena.row_owner_alive(row):
                break
            time.sleep(pause)
            pause = min(pause * 2 or 1e-5, 1e-3)


def repair_dead_rows(arena: Arena) -> list[int]:
    """stop_machine, then repair every row whose owner died. Returns those rows."""
    with stop_machine(arena):
        return _repair(arena)


def _dead_rows(arena: Arena) -> list[int]:
    pids = arena.rows[:, R_PID].copy()            # rows change while we look
    return [row for row in np.flatnonzero(pids).tolist() if not arena.row_owner_alive(row)]


def _repair(arena: Arena) -> list[int]:
    """Roll back the ops of dead writers (see the module docstring). Under stop_machine."""
    slots, rows, records = arena._slots, arena.rows, arena.records
    dead = _dead_rows(arena)
    n = arena._published()
    residue = records[:n, PC_USAGE] - arena.contrib[:, :n].sum(axis=0)
    rollback = residue.copy()
    covered = np.zeros(n, bool)
    resets: list[tuple[int, int, int]] = []             # (row, counter, base)
    for row in dead:
        if not rows[row, R_OP]:
            continue
        index = int(rows[row, R_COUNTER])
        for level in range(int(rows[row, R_DEPTH])):
            base = int(rows[row, R_BASE + level])
            rollback[index] += arena.contrib[row, index] - base
            covered[index] = True
            resets.append((row, index, base))
            index = int(records[index, PC_PARENT])
    stray = np.flatnonzero(~covered & (residue != 0))
    if len(stray):
        warnings.warn(f"repair: usage differs from the writers' contributions at counters "
                      f"{stray.tolist()} outside any dead op; left as is", RuntimeWarning)
    for index in np.flatnonzero(covered & (rollback != 0)).tolist():
        slots.fetch_add(arena._counters_slot + index * PC_WORDS + PC_USAGE, -int(rollback[index]))
    for row, index, base in resets:
        slots.store(arena._contrib_slot(row, index), base)
    for row in dead:
        base_slot = arena._row_slot(row)
        if rows[row, R_OP]:
            stock_slot = int(rows[row, R_STOCK_SLOT])
            if stock_slot >= 0:
                slots.store(stock_slot + STOCK_NR, int(rows[row, R_STOCK_BEFORE]))
            slots.store(base_slot + R_OP, 0)
        slots.store(base_slot + R_IN_OP, 0)
        if row >= arena.ncpus:                          # a non-CPU row: free again
            arena._set_row_owner(row, 0)
            slots.store(base_slot + R_PID, 0)
    if resets:
        _propagate_all(arena, n)
    return dead


def _propagate_all(arena: Arena, n: int) -> None:
    """Recompute protected usage exactly (propagate_protected_usage for every
    counter), since a rolled-back op may have propagated a usage that is gone."""
    slots, records = arena._slots, arena.records
    children_min = np.zeros(n, np.int64)
    children_low = np.zeros(n, np.int64)
    for index in range(n):
        parent = int(records[index, PC_PARENT])
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
    sid = slots.load(counter._c + PC_STOCK_ID)
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
        _repair(arena)
        reclaimed = {c.name: _drain_stopped(c, cpu) for c in arena.stocked_counters()}
        if arena.memcg_legacy:
            from .memcg import legacy
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
