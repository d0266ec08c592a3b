"""drain_stock through work messages, and the hotplug-dead path under SIGKILL at
named instants: docs/stock-design.md §Scenarios scenarios 5, 6, 9, 15;
docs/kernel-semantics.md MT-12, MT-15."""
from __future__ import annotations

import os
import signal
import threading

import pytest

from procs import DrainTimeout
from shmcounter.invariants import check_invariants

import tasks


@pytest.fixture
def arena(make_arena):
    return make_arena(ncpus=3)


@pytest.fixture
def tree(arena):
    """root -> mid -> {x, y}, stock on x and y."""
    root = arena.new_counter("root")
    mid = arena.new_counter("mid", parent=root)
    x = arena.new_counter("x", parent=mid)
    y = arena.new_counter("y", parent=mid)
    x.enable_stock(64)
    y.enable_stock(64)
    return root, mid, x, y


def stocks(counter, ncpus=3):
    return [counter.stock(cpu) for cpu in range(ncpus)]


# ---- drain_stock: one work message per online CPU --------------------------

def test_drain_stock_is_served_inside_a_long_task(make_machine, tree, arena):
    root, mid, x, y = tree
    m = make_machine()
    for cpu in range(3):
        m.run_on(cpu, tasks.try_charge, arena, "x", 1)
    long_tasks = [m.submit(cpu, tasks.busy, 60) for cpu in range(3)]
    x.drain_stock()
    assert (stocks(x), x.usage, root.usage) == ([0, 0, 0], 3, 3)
    assert not any(f.done() for f in long_tasks)             # served mid-task
    for cpu in range(3):
        m.kill(cpu)
    check_invariants(arena, {"x": 3})
    x.uncharge(3)


def test_drain_stock_while_every_cpu_charges_in_a_tight_loop(make_machine, tree, arena):
    root, mid, x, y = tree
    m = make_machine()
    loops = [m.submit(cpu, tasks.charge_loop, arena, "x", 2.0) for cpu in range(3)]
    for _ in range(20):
        x.drain_stock()
    assert all(f.result() > 0 for f in loops)
    x.drain_stock()
    assert (stocks(x), x.usage) == ([0, 0, 0], 0)
    check_invariants(arena, {})


def test_a_cpu_drains_itself_inline_and_two_cpus_drain_each_other(make_machine, tree, arena):
    root, mid, x, y = tree
    m = make_machine(2)
    for _ in range(30):
        for cpu in range(2):
            m.run_on(cpu, tasks.try_charge, arena, "x", 1)
        both = [m.submit(cpu, tasks.drain, arena, "x") for cpu in range(2)]
        assert [f.result(timeout=30) for f in both] == [True, True]
        assert (stocks(x, 2), x.usage) == ([0, 0], 2)
        for cpu in range(2):
            m.run_on(cpu, tasks.uncharge, arena, "x", 1)
    check_invariants(arena, {})


def test_a_stopped_cpu_makes_the_drain_time_out_naming_it(make_machine, tree, arena):
    root, mid, x, y = tree
    m = make_machine(2)
    m.run_on(1, tasks.try_charge, arena, "x", 1)
    pid = m.pid(1)
    os.kill(pid, signal.SIGSTOP)
    try:
        with pytest.raises(DrainTimeout, match=rf"^CPU 1 \(pid {pid}\) did not answer the "
                                               r"drain of 'x' within 0.3 s; it is alive, so "
                                               r"its stock \(63 pages\) stays charged$") as info:
            x.drain_stock(timeout=0.3)
        assert (info.value.cpu, info.value.pid) == (1, pid)
    finally:
        os.kill(pid, signal.SIGCONT)
    x.drain_stock()
    assert (stocks(x), x.usage) == ([0, 0, 0], 1)
    m.run_on(1, tasks.uncharge, arena, "x", 1)


def test_a_cpu_that_dies_before_answering_is_left_to_hotplug(make_machine, tree, arena):
    root, mid, x, y = tree
    m = make_machine(2)
    for cpu in range(2):
        m.run_on(cpu, tasks.try_charge, arena, "x", 1)
    os.kill(m.pid(1), signal.SIGSTOP)
    result: list = []
    drainer = threading.Thread(target=lambda: result.append(x.drain_stock(timeout=60)))
    drainer.start()
    while x.stock(0):                      # CPU 0 answered; CPU 1 cannot
        threading.Event().wait(0.001)
    m.kill(1)
    drainer.join(30)
    assert result == [True]
    assert (stocks(x), x.usage) == ([0, 0, 0], 2)
    check_invariants(arena, {"x": 2})
    x.uncharge(2)


# ---- scenario 5: stranded stock at the limit --------------------------------

def test_scenario5_stranded_stock_at_the_limit_is_drained(make_machine, arena):
    leaf = arena.new_counter("leaf", max=3 * 64)
    leaf.enable_stock(64)
    m = make_machine()
    for cpu in range(3):
        assert m.run_on(cpu, tasks.try_charge, arena, "leaf", 1) == (True, None)
    assert (leaf.usage, stocks(leaf)) == (192, [63, 63, 63])   # P x 64, P real
    assert m.run_on(0, tasks.try_charge, arena, "leaf", 64) == (False, "leaf")
    leaf.drain_stock()                                           # synchronous
    assert (leaf.usage, stocks(leaf)) == (3, [0, 0, 0])
    assert m.run_on(0, tasks.try_charge, arena, "leaf", 64) == (True, None)
    assert (leaf.usage, stocks(leaf)) == (67, [0, 0, 0])
    check_invariants(arena, {"leaf": 67})
    leaf.uncharge(67)


# ---- scenario 6 / MT-15: concurrent drains ----------------------------------

def test_scenario6_mt15_second_trylock_drain_skips(make_machine, tree, arena):
    root, mid, x, y = tree
    m = make_machine(2)
    for cpu in range(2):
        m.run_on(cpu, tasks.try_charge, arena, "x", 1)
    os.kill(m.pid(1), signal.SIGSTOP)                 # the first drain waits for CPU 1
    first = m.submit(0, tasks.drain, arena, "x", True)
    while x.stock(0):
        threading.Event().wait(0.001)                 # the first drain holds the lock
    assert x.drain_stock(trylock=True) is False       # the second skips at once
    assert stocks(x) == [0, 63, 0]                     # and drained nothing
    os.kill(m.pid(1), signal.SIGCONT)
    assert first.result(timeout=30) is True
    assert (stocks(x), x.usage) == ([0, 0, 0], 2)     # no double uncharge
    assert x.drain_stock(trylock=True) is True
    check_invariants(arena, {"x": 2})
    x.uncharge(2)


# ---- scenario 9 / MT-12: CPU hotplug dead -----------------------------------

def test_scenario9_mt12_dead_cpu_frees_exactly_its_stocks(make_machine, tree, arena):
    root, mid, x, y = tree
    m = make_machine()
    for cpu in range(3):
        m.run_on(cpu, tasks.charge_each, arena, ["x", "y"], 1 + cpu)
    before = [(c.usage, stocks(c)) for c in (x, y)]
    assert before == [(192, [63, 62, 61]), (192, [63, 62, 61])]
    assert m.kill(1) == {"x": 62, "y": 62}
    assert [(c.usage, stocks(c)) for c in (x, y)] == [(130, [63, 0, 61]), (130, [63, 0, 61])]
    assert (mid.usage, root.usage) == (260, 260)
    row = arena._stock_slot(1, 0)
    assert arena.stocks[1, :2].tolist() == [[0, 0], [0, 0]]   # no slot refers to anything
    check_invariants(arena, {"x": 6, "y": 6})
    del row


def test_scenario9_variant_kill_during_a_drain(make_machine, tree, arena):
    root, mid, x, y = tree
    m = make_machine(2)
    for cpu in range(2):
        m.run_on(cpu, tasks.try_charge, arena, "x", 1)
    m.run_on(1, tasks.park_at, "drain:taken")          # CPU 1 stops mid-drain
    result: list = []
    drainer = threading.Thread(target=lambda: result.append(x.drain_stock(timeout=60)))
    drainer.start()
    tasks.wait_stopped(m.pid(1))
    while x.usage != 65:                   # CPU 0 serves its part concurrently
        threading.Event().wait(0.001)
    assert (x.stock(0), x.stock(1)) == (0, 0)   # CPU 1 took its 63, did not uncharge
    assert m.kill(1) == {}                # the drain completed by the repair: nothing left
    drainer.join(30)
    assert result == [True]
    assert (stocks(x), x.usage, root.usage, arena.underflows) == ([0, 0, 0], 2, 2, 0)
    check_invariants(arena, {"x": 2})
    x.uncharge(2)


# ---- SIGKILL at named instants: the op counts not at all (a charge) or wholly (an
# uncharge), at every level ----

@pytest.mark.parametrize("point, skip, task, args, real_after", [
    # mid try_charge slow path: after level 0 (x) and after level 1 (mid) of 3
    ("charge:level", 0, tasks.try_charge, ("x", 1), 0),
    ("charge:level", 1, tasks.try_charge, ("x", 1), 0),
    # the greedy charge is complete at every level, the surplus not yet deposited
    ("charge:deposit", 0, tasks.try_charge, ("x", 1), 0),
    # mid uncharge walk: x done, mid and root not; the repair completes it
    ("uncharge:level", 0, tasks.uncharge, ("x", 5), 0),
])
def test_sigkill_mid_op_counts_it_wholly_or_not_at_all(make_machine, tree, arena,
                                                       point, skip, task, args, real_after):
    root, mid, x, y = tree
    m = make_machine(2)
    m.run_on(1, tasks.try_charge, arena, "y", 5)        # CPU 1 also holds y's stock
    if task is tasks.uncharge:
        x.charge(5)                                     # the pages CPU 1 will uncharge
    m.run_on(1, tasks.park_at, point, skip)
    m.submit(1, task, arena, *args)
    tasks.wait_stopped(m.pid(1))
    assert m.kill(1) == {"y": 59}
    real = {"x": real_after, "y": 5}
    assert (x.usage, mid.usage, root.usage) == (real_after, real_after + 5, real_after + 5)
    check_invariants(arena, real)
    x.uncharge(real_after)
    y.uncharge(5)


def test_sigkill_while_holding_the_slot_lock(make_machine, tree, arena):
    root, mid, x, y = tree
    m = make_machine(2)
    m.run_on(1, tasks.try_charge, arena, "x", 1)
    m.submit(1, tasks.hold_slot_lock_and_stop, arena, "x")
    tasks.wait_stopped(m.pid(1))
    slot = arena._stock_slot(1, 0)
    assert arena._slots.load(slot + 1) == m.pid(1)     # the lock word: the holder's pid
    assert m.kill(1) == {"x": 63}
    assert (arena._slots.load(slot + 1), x.stock(1), x.usage) == (0, 0, 1)
    m.start_cpu(1)
    assert m.run_on(1, tasks.try_charge, arena, "x", 1) == (True, None)
    assert x.stock(1) == 63                           # the new process's slot works
    check_invariants(arena, {"x": 2})
    m.run_on(1, tasks.uncharge, arena, "x", 2)


# ---- scenario 15: two contexts on one CPU -----------------------------------

def test_scenario15_two_contexts_both_deposit(make_machine, tree, arena):
    root, mid, x, y = tree
    m = make_machine(1)
    # both threads miss the empty stock; both charge 64 and deposit 63
    assert m.run_on(0, tasks.two_contexts_both_miss, arena, "x") == 126
    assert (x.usage, x.stock(0)) == (128, 126)       # the stock exceeds batch (E14)
    check_invariants(arena, {"x": 2})
    m.run_on(0, tasks.uncharge, arena, "x", 2)


def test_a_drain_arriving_in_an_op_that_raises_is_still_served(make_machine, tree, arena):
    root, mid, x, y = tree
    m = make_machine(2)
    m.run_on(1, tasks.try_charge, arena, "y", 1)            # CPU 1 holds 63 of y
    m.run_on(1, tasks.park_then_raise_at, "charge:level")
    charge = m.submit(1, tasks.try_charge, arena, "x", 1)
    tasks.wait_stopped(m.pid(1))                             # inside the op on x
    result: list = []
    drainer = threading.Thread(target=lambda: result.append(y.drain_stock(timeout=30)))
    drainer.start()
    while not arena.requests[1, y._index]:                   # the request is posted
        threading.Event().wait(0.001)
    os.kill(m.pid(1), signal.SIGCONT)                        # it defers, then the op raises
    with pytest.raises(KeyboardInterrupt):
        charge.result(timeout=30)
    drainer.join(30)
    assert result == [True]                                  # served at the abort
    assert (y.stock(1), y.usage, x.usage) == (0, 1, 0)       # and the op rolled back
    check_invariants(arena, {"y": 1})
    m.run_on(1, tasks.uncharge, arena, "y", 1)


def test_a_pid_reused_by_another_process_does_not_keep_a_dead_row_alive(arena, tree):
    """A dead CPU's row names pid P; P now belongs to an unrelated live process
    (here: a sleeping child) that started later. The row is dead all the same:
    stop_machine does not wait for its in_op, and hotplug reclaims it."""
    import subprocess
    import sys

    from shmcounter.segment import R_IN_OP, R_PID, R_START
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        row = arena._row_slot(1)
        arena._slots.store(row + R_PID, sleeper.pid)        # the "reused" pid
        arena._slots.store(row + R_START, 1)                # its owner started at tick 1
        arena._slots.store(row + R_IN_OP, 1)                # and died inside an op
        assert arena.online_cpus() == []
        assert arena.hotplug_cpu_dead(1) == {}              # no wait, no "online" error
        assert (arena.cpu_pid(1), arena.rows[1, R_START], arena.rows[1, R_IN_OP]) == (0, 0, 0)
    finally:
        sleeper.kill()
        sleeper.wait()
