"""The old per-CPU charge cache, memcg_stock_pcp, that the series replaces
(docs/stock-design.md §Old design; docs/kernel-semantics.md §memcg stock): 7
slots per CPU, each caching one cgroup and up to 64 pages already charged to it.

Each CPU's block (arena._memcg.cpus[cpu], memcg/section.py) holds

    flushing     FLUSHING_CACHED_CHARGE: the pid of a drain_all_stock that asked
                 this CPU to drain (set by the requester with a CAS, cleared by
                 the CPU when it has drained, and when a process registers as it)
    lock         the local_trylock (holder's pid), at the word a stock slot's lock
                 sits at, so the slot lock of _slots.h applies (_legacy.trylock)
    drain_idx    next round-robin victim
    slots[7]     one word per slot: bits 0-7 nr_pages (the kernel's u8), bits 8-31
                 the cached cgroup's tag (its memory counter's index + 1; 0 empty);
                 bits 32-63 a second half of the same form: pages taken out of the
                 slot by an eviction and not yet uncharged ("pending")
    evictions, overflows, flushes   this CPU's event counts

Only CPU k changes its block (and hotplug once k is dead). Pages in either half of
a slot are charged to the cgroup (they are in usage): the invariant
usage == real + stock counts both halves.

Kill-safety, as for the per-counter stock (writer.py): every change of a slot word
that goes with a usage change is one op on one counter's path whose intent record
names the slot word. An eviction touches two paths (charge the new cgroup, uncharge
the victim), so it is two ops: the first charges the new cgroup and moves the
victim's pages to the pending half in the same word store; the second uncharges
them and clears the half. Killed between the two, the pending pages are still in
the dead CPU's slot, and the hotplug path uncharges them with the rest.

Cgroups of the legacy variant (cgroups.py) charge only memory (no memsw): one stock
shared by memory and memsw would need one op across two counter trees.
"""
from __future__ import annotations

import os
import random
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING

import numpy as np

from .. import hooks, pidlock
from ..cpuhp import this_cpu_of
from ..drain import post_work, single_drainer
from ..proc import pid_alive
from ..wait import wait_own_lock
from . import _legacy

# The block's words and the steps' results: defined by the C steps (_legacy.c),
# which need them; re-exported here, where the block is documented.
from ._legacy import (  # noqa: F401
    CONSUME_HIT,
    LEGACY_BYPASS,
    LEGACY_DEPOSITED,
    LEGACY_EVICTED,
    LEGACY_OVERFLOW,
    MC_DRAIN_IDX,
    MC_EVICTIONS,
    MC_FLUSHES,
    MC_FLUSHING,
    MC_LOCK,
    MC_OVERFLOWS,
    MC_SLOTS,
    MC_WORDS,
    MEMCG_CHARGE_BATCH,
    NR_MEMCG_STOCK,
)
from .section import CG_STATE, EVICTIONS, M_EVICTION

if TYPE_CHECKING:
    from ..page_counter import PageCounter
    from ..segment import Segment as Arena

HALF = 32                   # bits of one half of a slot word
NR_MASK = 0xFF              # u8 nr_pages
TAG_MASK = 0xFFFFFF
CUR_MASK = (1 << HALF) - 1



def _half(word: int, pending: bool) -> tuple[int, int]:
    """(tag, nr_pages) of one half of a slot word."""
    half = (word >> HALF if pending else word) & CUR_MASK
    return half >> 8, half & NR_MASK


def _slot_field(arena: Arena, slot: int, pending: bool) -> str:
    """The name of one half of slot word `slot`, for errors."""
    cpu, word = divmod(slot - arena._memcg.cpus_slot, MC_WORDS)
    return f"memcg_cpu {cpu}'s slot[{word - MC_SLOTS}] {'pending' if pending else 'cached'} tag"


def _cgroup_of(arena: Arena, tag: int, slot: int, pending: bool) -> PageCounter:
    """The memory counter of the cgroup tagged `tag` in one half of slot word
    `slot`: ArenaCorrupt unless the tag names a cgroup (index + 1 of a published
    counter whose cgroup record is in use)."""
    index = tag - 1
    if not (0 <= index < arena._published() and arena._memcg.cgroups[index, CG_STATE]):
        raise arena._corrupt(_slot_field(arena, slot, pending), tag,
                             "not the tag of a cgroup (its memory counter's index + 1)")
    return arena._handle(index)


def check_slots(arena: Arena, cpu: int) -> None:
    """ArenaCorrupt unless every tag in CPU `cpu`'s 7 slots, either half, names a
    cgroup: before the hotplug path drains them, so that it refuses whole."""
    slot = arena._memcg.cpu_slot(cpu) + MC_SLOTS
    for i, word in enumerate(arena._memcg.cpus[cpu, MC_SLOTS:MC_SLOTS + NR_MEMCG_STOCK].tolist()):
        for pending in (True, False):
            tag, _ = _half(word, pending)
            if tag:
                _cgroup_of(arena, tag, slot + i, pending)


# ---- charge and refill (the CPU's own steps) ---------------------------------

def try_charge(arena: Arena, memory: PageCounter, nr_pages: int,
               greedy: bool) -> PageCounter | None:
    """The stock part of the old try_charge_memcg: consume_stock; else charge
    max(64, n) (greedy) or n up the hierarchy, retry with n on failure, and
    refill_stock the surplus. Returns None, or the counter that refused.

    greedy=False is the kernel's state after a first failure (batch = n): later
    retries of the same charge never try the batch again. Not a CPU process: an
    exact charge, no stock. The second consume_stock of the kernel's exact retry
    is not modelled (an op is in progress; it could only see a refill by another
    context of this CPU).
    """
    block, slots = arena._memcg.block, arena._slots
    tag = memory._index + 1
    if block >= 0 and _legacy.consume(slots, arena._stock_row, block, tag,
                                      nr_pages) == CONSUME_HIT:
        return None
    charge = max(MEMCG_CHARGE_BATCH, nr_pages) if block >= 0 and greedy else nr_pages

    def charge_and_refill(kbase: int) -> tuple[PageCounter | None, int]:
        nonlocal charge
        fail = memory._try_charge_path(charge, kbase)
        if fail is not None and charge > nr_pages:
            charge = nr_pages
            fail = memory._try_charge_path(charge, kbase)
        if fail is None and charge > nr_pages:
            return None, _refill(arena, memory, charge - nr_pages, kbase, charge)
        return fail, -1
    return _refill_op(arena, memory, charge_and_refill)


def uncharge_to_stock(arena: Arena, memory: PageCounter, nr_pages: int) -> None:
    """refill_stock as the kmem and socket uncharges call it: the pages go back to
    this CPU's slot of the cgroup (still charged) instead of up the hierarchy.
    More than 64 pages, or not a CPU process: a plain hierarchical uncharge."""
    if arena._memcg.block < 0 or nr_pages > MEMCG_CHARGE_BATCH:
        memory.uncharge(nr_pages)
        return
    _refill_op(arena, memory, lambda kbase: (None, _refill(arena, memory, nr_pages, kbase, 0)))


def _refill_op(arena: Arena, memory: PageCounter,
               body: Callable[[int], tuple[PageCounter | None, int]]) -> PageCounter | None:
    """Run body(kbase) -> (refused counter or None, evicted slot or -1) as one op on
    memory's path, then uncharge an evicted cgroup's pages in the second op."""
    with arena._writer.op(memory) as kbase:
        refused, evicted = body(kbase)
    if evicted >= 0:
        _uncharge_evicted(arena, arena._memcg.block + MC_SLOTS + evicted)
    return refused


def _uncharge_evicted(arena: Arena, slot: int) -> None:
    """The second op of an eviction: uncharge the victim's pending pages."""
    if hooks.ARMED:
        hooks.at("legacy:evicted")
    with arena._writer.held():
        _drain_half(arena, slot, True, _locked_op)


def _refill(arena: Arena, memory: PageCounter, nr_pages: int, kbase: int,
            applied: int) -> int:
    """refill_stock(memory's cgroup, nr_pages) inside an op on memory's path, whose
    pages are charged (the slot steps are one C call, _legacy.refill); the op has
    charged `applied` pages at each level so far. Returns the slot whose old
    cgroup was evicted to the pending half (the caller uncharges it in an op of
    its own), or -1. Pages the stock does not take (an overflow past 64 empties
    the slot; a busy lock bypasses it) are uncharged here, the op marked forward
    first (the slot word holds its end value already)."""
    slots, writer, block = arena._slots, arena._writer, arena._memcg.block
    victim = -1
    if slots.load(arena._memcg.slot + M_EVICTION) == EVICTIONS.index("random"):
        victim = random.randrange(NR_MEMCG_STOCK)
    action, i, pages = _legacy.refill(slots, writer.row_slot, block, memory._index + 1,
                                      nr_pages, victim)
    if action == LEGACY_BYPASS:
        pages = nr_pages
    if action in (LEGACY_BYPASS, LEGACY_OVERFLOW):
        after = slots.load(block + MC_SLOTS + i) if i >= 0 else 0
        writer.forward(applied - pages, len(memory._path), after)
        memory._cancel_path(pages, kbase)
    return i if action == LEGACY_EVICTED else -1


# ---- drains ----------------------------------------------------------------------

# An op runner: run body(row, kbase) as an op of the writer row starting at slot
# `row` on counter's path that may change word `slot`, in the right context (this
# CPU, op lock held; or a dead CPU's row).
OpRunner = Callable[["Arena", "PageCounter", int, Callable[[int, int], None]], None]


def _locked_op(arena: Arena, counter: PageCounter, slot: int,
               body: Callable[[int, int], None]) -> None:
    """For a caller that holds the op lock (Writer.held, or the drain server)."""
    writer = arena._writer
    with writer.op(counter, slot, locked=True) as kbase:
        body(writer.row_slot, kbase)


def _dead_op(cpu: int) -> OpRunner:
    """For hotplug under stop_machine: an op in the dead CPU's own row, so that a
    repairer killed inside it is repaired the same way (hotplug._drain_stopped)."""
    def run(arena: Arena, counter: PageCounter, slot: int,
            body: Callable[[int, int], None]) -> None:
        slots, row = arena._slots, arena._row_slot(cpu)
        kbase = arena._contrib_slot(cpu, 0)
        slots.op_begin(row, -1, arena._counters_slot, kbase, counter._index, slot)
        body(row, kbase)
        slots.op_end(row)
    return run


def _drain_half(arena: Arena, slot: int, pending: bool, run: OpRunner) -> int:
    """Uncharge one half of slot word `slot` (the cached pages, or the pending ones)
    and clear it, in one op. Returns the pages uncharged.

    The word is read again inside the op: between the first look and the op, this
    CPU's drain server may have drained the half (a signal served before the op
    lock was taken); then the op changes nothing."""
    slots = arena._slots
    tag, _ = _half(slots.load(slot), pending)
    if tag == 0:
        return 0
    counter = _cgroup_of(arena, tag, slot, pending)
    mask = CUR_MASK if pending else ~CUR_MASK
    taken = [0]

    def body(row: int, kbase: int) -> None:
        word = slots.load(slot)
        now_tag, nr_pages = _half(word, pending)
        if now_tag == tag:
            slots.store(slot, word & mask)
            slots.op_forward(row, -nr_pages, len(counter._path), word & mask)
            counter._cancel_path(nr_pages, kbase)
            taken[0] = nr_pages
    run(arena, counter, slot, body)
    return taken[0]


def _drain_block(arena: Arena, block: int, run: OpRunner) -> int:
    """drain_stock_fully: both halves of all 7 slots. Returns the pages uncharged."""
    return sum(_drain_half(arena, block + MC_SLOTS + i, pending, run)
               for i in range(NR_MEMCG_STOCK) for pending in (True, False))


def _locked(arena: Arena, block: int, fn: Callable[[], int]) -> int:
    """Run fn under this CPU's lock: the blocking local_lock of the drain work (held
    by another context of this CPU, waited for; by another pid: ArenaCorrupt)."""
    slots, owner = arena._slots, arena._stock_owner
    if not _legacy.trylock(slots, block, owner):
        cpu = (block - arena._memcg.cpus_slot) // MC_WORDS
        wait_own_lock(arena, block + MC_LOCK, f"memcg_cpu {cpu}'s lock",
                      lambda: _legacy.trylock(slots, block, owner))
    try:
        return fn()
    finally:
        _legacy.unlock(slots, block)


def drain_local(arena: Arena) -> int:
    """drain_local_memcg_stock in a CPU process, outside any op: drain all 7 slots
    of this CPU. Returns the pages uncharged.

    Lock order, everywhere: the op lock, then the CPU's lock (the drain server and
    the refill inside a charge op take them in that order too). A drain request
    arriving meanwhile is served after, not inside (Writer.held)."""
    block = arena._memcg.block
    if block < 0:
        return 0
    with arena._writer.held():
        return _locked(arena, block, lambda: _drain_block(arena, block, _locked_op))


def cpu_offline(arena: Arena, cpu: int) -> None:
    """This CPU goes offline cleanly (unregister_cpu): drain its 7 slots and
    forget a drain request, so that the next process of this CPU starts clean."""
    drain_local(arena)
    arena._slots.store(arena._memcg.cpu_slot(cpu) + MC_FLUSHING, 0)


def serve_flush(arena: Arena, cpu: int) -> None:
    """The drain work item, run by drain.serve on CPU `cpu` (op lock held): if a
    drain_all_stock flagged this CPU, drain all 7 slots and clear the flag."""
    slots, block = arena._slots, arena._memcg.cpu_slot(cpu)
    if not slots.load(block + MC_FLUSHING):
        return
    _locked(arena, block, lambda: _drain_block(arena, block, _locked_op))
    slots.fetch_add(block + MC_FLUSHES, 1)
    slots.store(block + MC_FLUSHING, 0)


def drain_dead(arena: Arena, cpu: int) -> dict[str, int]:
    """memcg_hotplug_cpu_dead for the legacy stock, under stop_machine after the
    repair: drain all 7 slots of dead CPU `cpu` without its lock, then clear the
    lock and the flushing flag. Returns the pages reclaimed by counter name."""
    slots, block = arena._slots, arena._memcg.cpu_slot(cpu)
    check_slots(arena, cpu)
    reclaimed: dict[str, int] = {}
    for i in range(NR_MEMCG_STOCK):
        for pending in (True, False):
            tag, _ = _half(slots.load(block + MC_SLOTS + i), pending)
            taken = _drain_half(arena, block + MC_SLOTS + i, pending, _dead_op(cpu))
            if taken:
                name = arena._handle(tag - 1).name
                reclaimed[name] = reclaimed.get(name, 0) + taken
    slots.store(block + MC_LOCK, 0)
    slots.store(block + MC_FLUSHING, 0)
    return reclaimed


def drain_all(arena: Arena, tags: Collection[int]) -> bool:
    """The old drain_all_stock(root), tags = the subtree's cgroups: skip (False) if
    another drain runs; else flag every CPU that caches pages of the subtree,
    drain this CPU inline, and send the others their work item (drain.post_work)
    without waiting for it (asynchronous); a CPU that is not a live registered
    process is unflagged (hotplug's). A flagged CPU drains all 7 of its slots,
    other cgroups' included. Returns True.

    The flag (FLUSHING_CACHED_CHARGE) holds the requester's pid: a CPU flagged by
    a live requester has its work queued and is skipped; a flag left by a
    requester that died before sending the work is taken over."""
    slots, mypid = arena._slots, os.getpid()
    with single_drainer(arena) as got:
        if not got:
            return False
        if hooks.ARMED:
            hooks.at("drain_all:locked")
        me = this_cpu_of(arena)
        for cpu in range(arena.ncpus):
            flag = arena._memcg.cpu_slot(cpu) + MC_FLUSHING
            if not _drain_needed(arena, cpu, tags) or not pidlock.trylock(slots, flag, mypid)[0]:
                continue                            # nothing cached, or a live drain's
            if cpu == me:
                drain_local(arena)
                slots.fetch_add(flag - MC_FLUSHING + MC_FLUSHES, 1)
                slots.cas(flag, mypid, 0)
            elif not post_work(arena, cpu)[1]:
                slots.cas(flag, mypid, 0)           # offline or dead: hotplug's
    return True


def _drain_needed(arena: Arena, cpu: int, tags: Collection[int]) -> bool:
    """is_memcg_drain_needed: some slot of `cpu` holds pages of one of `tags`."""
    return any(tag in tags and nr_pages
               for word in arena._memcg.cpus[cpu, MC_SLOTS:MC_SLOTS + NR_MEMCG_STOCK].tolist()
               for tag, nr_pages in (_half(word, False), _half(word, True)))


def cached_on(arena: Arena, tag: int) -> list[int]:
    """CPUs with a slot that caches cgroup `tag`, in either half (pages or not):
    each holds a reference (css_get) that keeps the cgroup from being freed."""
    words = arena._memcg.cpus[:, MC_SLOTS:MC_SLOTS + NR_MEMCG_STOCK]
    held = (((words >> 8) & TAG_MASK) == tag) | (((words >> (HALF + 8)) & TAG_MASK) == tag)
    return np.flatnonzero(held.any(axis=1)).tolist()


def flushing(arena: Arena) -> list[int]:
    """CPUs flagged by a live requester whose drain work they have not served."""
    flags = arena._memcg.cpus[:, MC_FLUSHING].tolist()
    return [cpu for cpu, holder in enumerate(flags) if holder and pid_alive(holder)]


# ---- reading ---------------------------------------------------------------------

def stock_pages(arena: Arena, ncounters: int) -> np.ndarray:
    """Pages held in legacy slots, both halves, as an (ncpus, ncounters) array.
    ArenaCorrupt for a tag beyond the counters."""
    out = np.zeros((arena.ncpus, ncounters), np.int64)
    words = arena._memcg.cpus[:, MC_SLOTS:MC_SLOTS + NR_MEMCG_STOCK].copy()
    for shift in (0, HALF):
        half = (words >> shift) & CUR_MASK
        bad = np.argwhere(half >> 8 > ncounters)
        if len(bad):
            cpu, i = bad[0].tolist()
            slot = arena._memcg.cpu_slot(cpu) + MC_SLOTS + i
            raise arena._corrupt(_slot_field(arena, slot, shift == HALF), int(half[cpu, i] >> 8),
                                 f"not the tag of one of the {ncounters} counters")
        cpus, _ = np.nonzero(half >> 8)
        tag = half[half >> 8 != 0] >> 8
        np.add.at(out, (cpus, tag - 1), half[half >> 8 != 0] & NR_MASK)
    return out


def slots_of(arena: Arena, cpu: int) -> list[tuple[int, int]]:
    """CPU `cpu`'s 7 slots as (cached memory counter's index or -1, pages)."""
    words = arena._memcg.cpus[cpu, MC_SLOTS:MC_SLOTS + NR_MEMCG_STOCK].tolist()
    return [(tag - 1, nr_pages) for tag, nr_pages in (_half(w, False) for w in words)]
