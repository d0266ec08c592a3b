"""The lockless (v4) stock: one word per (counter, CPU), seq << 34 | pages, no lock;
a remote drain from any process, no work message; SIGKILL at named instants on
both sides (the CPU in its deposit, a requester in its drain), repaired exactly
from the word's seq and `last` (shmcounter/_op.h, docs/design.md "The lockless
stock"). Tree: root -> mid -> x, x with a lockless stock of batch 64."""
from __future__ import annotations

import os
import signal
import threading
import warnings
from typing import Any

import pytest

from shmcounter import hooks
from shmcounter._atomic import drain_all_v4
from shmcounter.drain import single_drainer
from shmcounter.invariants import check_invariants
from shmcounter.segment import (
    H_DRAIN_LOCK,
    PC_FLAG_CAP,
    PC_FLAG_LOCKLESS,
    PC_FLAGS,
    R_PID,
    R_REQ_SEQ,
    STOCK_LAST,
    STOCK_NR,
)

import cpuproc
import lockless_tasks
import tasks

SEQ = 1 << 34                           # one drain, in the word


@pytest.fixture
def arena(make_arena):
    return make_arena(ncpus=2)


@pytest.fixture
def tree(arena):
    root = arena.new_counter("root")
    mid = arena.new_counter("mid", parent=root)
    x = arena.new_counter("x", parent=mid, max=10_000)
    assert x.enable_stock(64, lockless=True)
    yield root, mid, x
    hooks.clear()


def words(arena, cpu):
    """[word, last] of CPU `cpu`'s slot of x (stock id 0)."""
    slot = arena._stock_slot(cpu, 0)
    return [arena._slots.load(slot + STOCK_NR), arena._slots.load(slot + STOCK_LAST)]


def usages(*counters):
    return [c.usage for c in counters]


def park(proc, point, skip=0):
    proc.call(tasks.park_at, point, skip)


def stopped(proc):
    tasks.wait_stopped(proc.pid)


# ---- the option ----------------------------------------------------------------

def test_enable_stock_lockless_is_checked_and_a_stock_keeps_its_kind(arena, tree):
    root, mid, x = tree
    y = arena.new_counter("y", parent=mid)
    with pytest.raises(TypeError, match="lockless must be a bool"):
        y.enable_stock(64, lockless=1)
    with pytest.raises(ValueError, match="no uncharge_to_stock"):
        y.enable_stock(64, lockless=True, uncharge_to_stock=True)
    assert not y.has_stock
    assert y.enable_stock(32)
    with pytest.raises(ValueError, match="'y' has a locked stock; free_stock"):
        y.enable_stock(64, lockless=True)
    assert (y.lockless, y.batch, x.lockless) == (False, 32, True)
    y.free_stock()
    assert y.enable_stock(64, lockless=True) and y.lockless


# ---- the word: hit, deposit, drain --------------------------------------------

def test_the_word_counts_drains_in_seq_and_invariants_count_its_pages(arena, tree, cpu0):
    root, mid, x = tree
    assert x.try_charge(1) == (True, None)
    assert (words(arena, 0), x.usage) == ([63, 0], 64)
    assert x.try_charge(3) == (True, None)                  # the hit: a CAS, 63 -> 60
    assert (words(arena, 0), x.usage) == ([60, 0], 64)
    assert x.drain_stock()                                  # our own word, remotely
    assert (words(arena, 0), usages(x, mid, root)) == ([SEQ, 60], [4, 4, 4])
    assert x.try_charge(1) == (True, None)                  # a miss: deposit 63
    assert (words(arena, 0), x.stock(0), x.usage) == ([SEQ | 63, 60], 63, 68)
    check_invariants(arena, {"x": 5})                       # pages, not the word
    assert x.drain_stock_local() == 63
    assert words(arena, 0) == [2 * SEQ, SEQ | 63]
    x.uncharge(5)


def test_a_remote_drain_takes_a_stopped_cpus_stock_without_a_message(arena, tree, cpus):
    root, mid, x = tree
    cpu1 = cpus(1)
    assert cpu1.call(cpuproc.try_charge, "x", 1) == (True, None)
    tickets = arena._slots.load(arena._row_slot(1) + R_REQ_SEQ)
    os.kill(cpu1.pid, signal.SIGSTOP)                      # it cannot answer anything
    try:
        assert x.drain_stock(timeout=0.5)                  # a locked stock: DrainTimeout
        assert (x.stock(1), usages(x, mid, root)) == (0, [1, 1, 1])
        assert arena._slots.load(arena._row_slot(1) + R_REQ_SEQ) == tickets
    finally:
        os.kill(cpu1.pid, signal.SIGCONT)
    assert cpu1.call(cpuproc.try_charge, "x", 1) == (True, None)    # a fresh deposit
    assert (words(arena, 1), x.usage) == ([SEQ | 63, 63], 65)
    cpu1.call(cpuproc.uncharge, "x", 2)


def test_remote_drains_while_both_cpus_charge_in_a_tight_loop(arena, tree, cpus):
    root, mid, x = tree
    procs = [cpus(0), cpus(1)]
    for p in procs:
        p.start(tasks.charge_loop, arena, "x", 1.5)
    drains = 0
    while procs[0].process.is_alive() and drains < 300:
        assert x.drain_stock()
        drains += 1
    assert all(p.result() > 0 for p in procs)
    assert x.drain_stock()
    assert ([x.stock(0), x.stock(1)], usages(x, mid, root)) == ([0, 0], [0, 0, 0])
    check_invariants(arena, {})


def test_a_drain_with_the_lock_free_is_one_call_that_lets_go_of_the_lock(
        arena, tree, cpus, make_arena):
    """drain_all_v4: the whole drain in one C call while nothing stands in its way;
    -2 (no writer row yet, a hook armed) and -1 (the lock held) leave every word
    as it was."""
    root, mid, x = tree
    cpu0 = cpus(0)
    assert cpu0.call(cpuproc.try_charge, "x", 1) == (True, None)
    slots = arena._slots
    assert drain_all_v4((x,), H_DRAIN_LOCK) == -2           # this process has no row
    root.charge(1)                                          # its first op claims one
    root.uncharge(1)
    slots.store(H_DRAIN_LOCK, cpu0.pid)                     # a live holder
    assert drain_all_v4((x,), H_DRAIN_LOCK) == -1
    slots.store(H_DRAIN_LOCK, 0)
    hooks.install("drain:cas", lambda name: None)
    assert drain_all_v4((x,), H_DRAIN_LOCK) == -2
    hooks.clear()
    assert (words(arena, 0), x.usage) == ([63, 0], 64)
    assert drain_all_v4((x, mid), H_DRAIN_LOCK) == 63       # mid has no stock
    assert (words(arena, 0), usages(x, mid, root), slots.load(H_DRAIN_LOCK)) == (
        [SEQ, 63], [1, 1, 1], 0)
    other = make_arena(ncpus=2).new_counter("y")
    bad: list[tuple[Any, type[Exception]]] = [
        ([x], TypeError), ((x, "x"), TypeError), ((x, other), ValueError)]
    for counters, error in bad:
        with pytest.raises(error):
            drain_all_v4(counters, H_DRAIN_LOCK)
    with pytest.raises(IndexError):
        drain_all_v4((x,), 1 << 40)
    cpu0.call(cpuproc.uncharge, "x", 1)


@pytest.mark.underflow_expected(3)
def test_a_drain_that_takes_a_level_below_zero_warns_with_the_lock_let_go(
        arena, tree, cpus):
    """CPU 0 holds 63 pages of x; someone uncharges its whole 64 (one too many of
    them real): the drain's walk takes each level to -63, clamped to 0. The
    warning, Python code that may switch threads, comes once the lock is free."""
    root, mid, x = tree
    cpu0 = cpus(0)
    assert cpu0.call(cpuproc.try_charge, "x", 1) == (True, None)
    x.uncharge(64)
    lock_seen: list[int] = []

    def show(message, category, filename, lineno, file=None, line=None):
        lock_seen.append(arena._slots.load(H_DRAIN_LOCK))
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        assert x.drain_stock()
    assert lock_seen == [0, 0, 0]
    assert (words(arena, 0), usages(x, mid, root), arena.underflows) == (
        [SEQ, 63], [0, 0, 0], 3)


# ---- a CPU killed inside its deposit -------------------------------------------

@pytest.fixture
def cpu1_with_30(arena, tree, cpus):
    """CPU 1 holds 30 pages of x: charged 1 then 33 (usage 64, real 34)."""
    cpu1 = cpus(1)
    assert cpu1.call(cpuproc.try_charge, "x", 1) == (True, None)
    assert cpu1.call(cpuproc.try_charge, "x", 33) == (True, None)
    assert (words(arena, 1), tree[2].usage) == ([30, 0], 64)
    return cpu1


@pytest.mark.parametrize("point, usage_dead, reclaimed, real", [
    ("charge:deposit", 64, {"x": 30}, 34),      # walk of 64 done, nothing recorded
    ("stock:cas", 64, {"x": 30}, 34),           # E = 30 and E + 24 recorded, no CAS
    ("stock:deposited", 128, {"x": 54}, 74),    # CAS done and marked: counts wholly
])
def test_a_cpu_killed_in_its_deposit_counts_its_charge_wholly_or_not_at_all(
        arena, tree, cpu1_with_30, point, usage_dead, reclaimed, real):
    root, mid, x = tree
    cpu1 = cpu1_with_30
    park(cpu1, point)
    cpu1.start(cpuproc.try_charge, "x", 40)                 # a miss: 64 walked, 24 surplus
    stopped(cpu1)
    assert x.usage == 128
    cpu1.kill()
    assert arena.repair().ops == (1,)
    assert usages(x, mid, root) == [usage_dead] * 3
    assert arena.hotplug_cpu_dead(1) == reclaimed
    assert (usages(x, mid, root), words(arena, 1)) == ([real] * 3, [0, 0])
    check_invariants(arena, {"x": real})
    x.uncharge(real)


@pytest.mark.parametrize("cas, drain_first, usage_after, reclaimed", [
    # killed after the CAS, before the mark: the word is E + d, seq unchanged
    (True, False, 74, {"x": 54}),
    # same, and a remote drain took E + d before the kill: seq moved on, last == E + d
    (True, True, 74, {}),
    # killed before the CAS; a remote drain took E: last == E, not E + d
    (False, True, 34, {}),
])
def test_a_cpu_killed_between_its_deposit_cas_and_its_mark_is_decided_by_the_word(
        arena, tree, cpu1_with_30, cas, drain_first, usage_after, reclaimed):
    root, mid, x = tree
    cpu1 = cpu1_with_30
    cpu1.start(lockless_tasks.deposit_then_stop, "x", 40, cas)
    stopped(cpu1)
    assert (words(arena, 1)[0], x.usage) == (54 if cas else 30, 128)
    if drain_first:
        assert x.drain_stock()                              # the CPU is stopped mid-op
        assert words(arena, 1) == [SEQ, 54 if cas else 30]
    cpu1.kill()
    repaired = arena.repair()
    assert (repaired.ops, repaired.forward) == ((1,), (1,) if cas else ())
    assert arena.hotplug_cpu_dead(1) == reclaimed
    assert usages(x, mid, root) == [usage_after] * 3
    check_invariants(arena, {"x": usage_after})
    x.uncharge(usage_after)


@pytest.mark.parametrize("cas, drain_first, usage_after, reclaimed", [
    # the cap's take done (30 -> 0, seq kept), unmarked: completed to its net -20
    (True, False, 44, {}),
    # same; a remote drain found 0 pages and took nothing: still the take's word
    (True, True, 44, {}),
    # killed before the take; a remote drain took the 30: seq moved on, rolled back
    (False, True, 34, {}),
    # killed before the take; the word still holds 30: rolled back, hotplug takes them
    (False, False, 34, {"x": 30}),
])
def test_a_cpu_killed_between_the_caps_take_and_its_mark_is_decided_by_the_word(
        arena, tree, cpu1_with_30, cas, drain_first, usage_after, reclaimed):
    root, mid, x = tree
    assert x.enable_stock(64, lockless=True, cap=True)
    cpu1 = cpu1_with_30
    cpu1.start(lockless_tasks.take_then_stop, "x", 10, cas)
    stopped(cpu1)
    assert (words(arena, 1)[0], x.usage) == (0 if cas else 30, 128)
    if drain_first:
        assert x.drain_stock()
        assert words(arena, 1) == ([0, 0] if cas else [SEQ, 30])
    cpu1.kill()
    repaired = arena.repair()
    assert (repaired.ops, repaired.forward) == ((1,), (1,) if cas else ())
    assert arena.hotplug_cpu_dead(1) == reclaimed
    assert usages(x, mid, root) == [usage_after] * 3
    check_invariants(arena, {"x": usage_after})
    x.uncharge(usage_after)


def test_the_cap_is_the_lockless_stocks_and_is_checked(arena, tree):
    root, mid, x = tree
    y = arena.new_counter("y", parent=mid)
    with pytest.raises(TypeError, match="cap must be a bool, got 1"):
        y.enable_stock(64, lockless=True, cap=1)
    with pytest.raises(ValueError, match="cap is the lockless stock's"):
        y.enable_stock(64, cap=True)
    assert not y.has_stock
    assert x.enable_stock(64, lockless=True, cap=True)
    assert arena._slots.load(x._c + PC_FLAGS) == PC_FLAG_LOCKLESS | PC_FLAG_CAP


def test_a_cpu_and_the_drainer_of_its_deposit_both_dead_are_decided_together(
        arena, tree, cpu1_with_30, cpus):
    """The CPU died after its deposit's CAS (30 -> 54), unmarked; a drain took the 54
    and died before storing last. One repair: the drain is completed and its last
    stored first, then the deposit, decided by that last, counts wholly."""
    root, mid, x = tree
    cpu1, drainer = cpu1_with_30, cpus(None)
    cpu1.start(lockless_tasks.deposit_then_stop, "x", 40, True)
    stopped(cpu1)
    park(drainer, "drain:swapped")
    drainer.start(lockless_tasks.drain, "x")
    stopped(drainer)
    assert (words(arena, 1), x.usage) == ([SEQ, 0], 128)
    drainer.kill()
    cpu1.kill()
    assert arena.hotplug_cpu_dead(1) == {}
    assert (words(arena, 1), usages(x, mid, root)) == ([0, 0], [74] * 3)
    check_invariants(arena, {"x": 74})
    x.uncharge(74)


# ---- a requester killed inside a remote drain -----------------------------------

@pytest.mark.parametrize("requester", [1, None], ids=["cpu", "not-a-cpu"])
@pytest.mark.parametrize("point, skip, taken", [
    ("drain:cas", 0, False),            # W recorded, no CAS: nothing taken
    ("drain:swapped", 0, True),         # CAS done; neither last nor the mark
    ("drain:taken", 0, True),           # marked forward, nothing uncharged
    ("uncharge:level", 0, True),        # x uncharged, mid and root not
])
def test_a_requester_killed_in_a_remote_drain_is_repaired_exactly(
        arena, tree, cpus, requester, point, skip, taken):
    root, mid, x = tree
    cpu0 = cpus(0)
    assert cpu0.call(cpuproc.try_charge, "x", 1) == (True, None)
    drainer = cpus(requester)
    park(drainer, point, skip)
    drainer.start(lockless_tasks.drain, "x")
    stopped(drainer)
    drainer.kill()
    if requester is None:
        repaired = arena.repair()
    else:
        assert arena.hotplug_cpu_dead(requester) == {}
        repaired = arena.repair()
        assert not repaired                                  # hotplug repaired it
    assert usages(x, mid, root) == ([1] * 3 if taken else [64] * 3)
    assert words(arena, 0) == ([SEQ, 63] if taken else [63, 0])
    assert cpu0.call(lockless_tasks.stock, "x", 0) == (0 if taken else 63)
    check_invariants(arena, {"x": 1})
    cpu0.call(cpuproc.uncharge, "x", 1)
    del repaired


def test_a_dead_drain_is_decided_by_seq_while_its_cpu_goes_on_charging(arena, tree, cpus):
    root, mid, x = tree
    cpu0, drainer = cpus(0), cpus(None)
    assert cpu0.call(cpuproc.try_charge, "x", 1) == (True, None)
    park(drainer, "drain:swapped")
    drainer.start(lockless_tasks.drain, "x")
    stopped(drainer)
    drainer.kill()                                          # took 63, uncharged nothing
    assert cpu0.call(cpuproc.try_charge, "x", 1) == (True, None)   # a miss: deposit 63
    assert (words(arena, 0), x.usage) == ([SEQ | 63, 0], 128)
    repaired = arena.repair()
    assert (repaired.forward, repaired.pages) == (repaired.ops, {"x": 63, "mid": 63,
                                                                 "root": 63})
    assert (words(arena, 0), usages(x, mid, root)) == ([SEQ | 63, 63], [65] * 3)
    check_invariants(arena, {"x": 2})
    cpu0.call(cpuproc.uncharge, "x", 2)


@pytest.mark.parametrize("point, usage_after", [("drain:cas", 1), ("drain:swapped", 1)])
def test_the_drain_lock_taken_over_from_a_dead_drainer_repairs_first(
        arena, tree, cpus, point, usage_after):
    root, mid, x = tree
    cpu0, drainer = cpus(0), cpus(None)
    assert cpu0.call(cpuproc.try_charge, "x", 1) == (True, None)
    park(drainer, point)
    drainer.start(lockless_tasks.drain, "x")
    stopped(drainer)
    row = next(r for r in range(arena.ncpus, arena.nrows)
               if arena._slots.load(arena._row_slot(r) + R_PID) == drainer.pid)
    drainer.kill()
    assert x.drain_stock()                  # takes the lock over: repairs, then drains
    assert arena._slots.load(arena._row_slot(row) + R_PID) != drainer.pid   # repaired
    assert not arena.repair()
    assert (x.stock(0), usages(x, mid, root)) == (0, [usage_after] * 3)
    check_invariants(arena, {"x": 1})
    cpu0.call(cpuproc.uncharge, "x", 1)


def test_the_threads_of_one_process_hold_the_drain_lock_in_turn(arena, tree, cpus):
    """The lock word holds a pid only: a second thread of the holder's process
    must wait too, or a kill of the process could leave a dead drain and a live
    one's CAS on one word, undecidable."""
    root, mid, x = tree
    cpu0 = cpus(0)
    assert cpu0.call(cpuproc.try_charge, "x", 1) == (True, None)
    holding, reached = threading.Event(), threading.Event()
    seen: list[bool] = []

    def at_cas(point):
        seen.append(holding.is_set())
        reached.set()
    hooks.install("drain:cas", at_cas)

    def hold():
        with single_drainer(arena) as got:
            assert got
            holding.set()
            reached.wait(1.0)                   # no drain of ours may get there now
            holding.clear()
    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(30)
    assert x.drain_stock()                      # waits for the holder thread
    holder.join(30)
    assert (seen, x.stock(0), usages(x, mid, root)) == ([False], 0, [1, 1, 1])
    cpu0.call(cpuproc.uncharge, "x", 1)


@pytest.mark.parametrize("point, usage, word", [
    ("drain:cas", 64, [63, 0]), ("drain:swapped", 1, [SEQ, 63])])
def test_a_drain_that_raises_is_rolled_back_or_forward_from_the_word(
        arena, tree, cpus, point, usage, word):
    root, mid, x = tree
    cpu0 = cpus(0)
    assert cpu0.call(cpuproc.try_charge, "x", 1) == (True, None)

    def interrupt(name):
        raise KeyboardInterrupt(name)
    hooks.install(point, interrupt)
    with pytest.raises(KeyboardInterrupt):
        x.drain_stock()
    hooks.clear()
    assert (words(arena, 0), usages(x, mid, root)) == (word, [usage] * 3)
    assert x.drain_stock()
    assert (x.stock(0), x.usage) == (0, 1)
    cpu0.call(cpuproc.uncharge, "x", 1)


# ---- hotplug and free_stock ------------------------------------------------------

def test_free_stock_leaves_clean_slots_for_a_locked_stock(arena, tree, cpus):
    root, mid, x = tree
    cpu1 = cpus(1)
    assert cpu1.call(cpuproc.try_charge, "x", 1) == (True, None)
    assert x.drain_stock() and cpu1.call(cpuproc.try_charge, "x", 1) == (True, None)
    assert words(arena, 1) == [SEQ | 63, 63]
    assert x.free_stock() == 63
    assert (words(arena, 1), x.has_stock, x.usage) == ([0, 0], False, 2)
    y = arena.new_counter("y", parent=mid)
    assert y.enable_stock(64)                                # stock id 0 again
    assert cpu1.call(cpuproc.try_charge, "y", 1) == (True, None)
    assert (words(arena, 1), y.stock(1)) == ([63, 0], 63)
    cpu1.call(cpuproc.uncharge, "x", 2)
    cpu1.call(cpuproc.uncharge, "y", 1)
