"""Per-CPU stock: docs/stock-design.md §Scenarios scenarios 1, 2, 3, 4, 13, 14, 18 and
docs/kernel-semantics.md MT-02, MT-03, MT-04, MT-10, with exact numbers. Unless a test
says otherwise this test process is CPU 0 of the arena (the `cpu0` fixture) and the
batch is 64."""
from __future__ import annotations

import os

import pytest

import shmcounter
from shmcounter import Arena, ArenaError, Busy
from shmcounter.invariants import check_invariants

import cpuproc


@pytest.fixture
def leaf(arena, cpu0):
    """root -> mid -> leaf, stock enabled on leaf."""
    root = arena.new_counter("root")
    mid = arena.new_counter("mid", parent=root)
    leaf = arena.new_counter("leaf", parent=mid)
    assert leaf.enable_stock(64) is True
    return leaf


def state(counter, cpu=0):
    return counter.usage, counter.stock(cpu), counter.watermark


def test_scenario1_fast_path(leaf, arena):
    root, mid = arena.counter("root"), arena.counter("mid")
    # step, usage (leaf and every ancestor), stock[cpu0], watermark
    assert leaf.try_charge(1) == (True, None)
    assert state(leaf) == (64, 63, 64) and root.usage == mid.usage == 64
    for _ in range(63):
        assert leaf.try_charge(1) == (True, None)
    assert state(leaf) == (64, 0, 64) and root.usage == 64
    assert leaf.try_charge(1) == (True, None)
    assert state(leaf) == (128, 63, 128) and root.usage == mid.usage == 128
    check_invariants(arena, {"leaf": 65}, batch=64)
    leaf.uncharge(65)


def test_stock_hit_changes_nothing_but_the_stock(leaf, arena):
    leaf.try_charge(1)
    before = bytearray(arena._shm.buf)
    assert leaf.try_charge(5) == (True, None)
    after = bytearray(arena._shm.buf)
    changed = [i // 8 for i in range(0, len(before), 8) if before[i:i + 8] != after[i:i + 8]]
    slot = arena._stock_slot(0, 0)
    assert changed == [slot]                                 # nr_pages of stock[0][leaf]
    assert leaf.stock(0) == 58
    leaf.uncharge(6)


def test_scenario2_large_request_has_no_surplus(leaf, arena):
    assert leaf.try_charge(512) == (True, None)              # charge = max(64, 512)
    assert state(leaf) == (512, 0, 512)
    leaf.uncharge(512)
    # v2 serves n > 64 from stock when the stock holds it; the old design refused
    leaf.enable_stock(1024)
    leaf.try_charge(1)
    assert state(leaf) == (1024, 1023, 1024)
    assert leaf.try_charge(512) == (True, None)
    assert state(leaf) == (1024, 511, 1024)
    check_invariants(arena, {"leaf": 513})
    leaf.uncharge(513)


def test_scenario3_own_limit_greedy_fails_then_exact(arena, cpu0):
    leaf = arena.new_counter("leaf", max=10)
    leaf.enable_stock(64)
    # charge, ok, usage, stock, failcnt
    steps = []
    for _ in range(11):
        ok, fail = leaf.try_charge(1)
        steps.append((ok, leaf.usage, leaf.stock(0), leaf.failcnt))
    assert steps == [(True, k, 0, k) for k in range(1, 11)] + [(False, 10, 0, 12)]
    assert fail is leaf                       # type: ignore[possibly-undefined]  # 11 rounds
    check_invariants(arena, {"leaf": 10})
    leaf.uncharge(10)


def test_scenario4_ancestor_limit(arena, cpu0):
    parent = arena.new_counter("parent", max=100)
    child = arena.new_counter("child", parent=parent)
    child.enable_stock(64)
    assert child.try_charge(1) == (True, None)
    assert (parent.usage, child.usage, child.stock(0)) == (64, 64, 63)
    for _ in range(63):
        child.try_charge(1)
    assert child.stock(0) == 0
    assert child.try_charge(1) == (True, None)               # greedy 64 fails at parent
    assert (parent.usage, child.usage, child.stock(0)) == (65, 65, 0)
    assert (parent.failcnt, child.failcnt) == (1, 0)
    assert child.watermark == 128                            # the cancelled batch shows
    check_invariants(arena, {"child": 65})
    child.uncharge(65)


@pytest.mark.parametrize("batch, stock_after, cancelled", [(64, 64, 6), (0, 0, 70)])
def test_scenario13_rfc_stock_returning_uncharge(arena, cpu0, batch, stock_after, cancelled):
    root = arena.new_counter("root")
    leaf = arena.new_counter("leaf", parent=root)
    leaf.enable_stock(64, uncharge_to_stock=True)
    leaf.try_charge(4)                                       # usage 64, stock 60
    leaf.charge(20)                                          # forced, no stock: real 24
    assert (leaf.usage, leaf.stock(0)) == (84, 60)
    if batch == 0:
        leaf.disable_stock()
    leaf.uncharge(10)
    assert (leaf.stock(0), root.usage, leaf.usage) == (stock_after, 84 - cancelled, 84 - cancelled)
    check_invariants(arena, {"leaf": 14})
    leaf.free_stock()
    leaf.uncharge(14)


def test_rfc_uncharge_from_a_process_that_is_not_a_cpu_walks(arena):
    leaf = arena.new_counter("leaf")
    leaf.enable_stock(64, uncharge_to_stock=True)
    leaf.charge(10)
    leaf.uncharge(10)
    assert (leaf.usage, leaf.stock(0), leaf.stock(1)) == (0, 0, 0)


def test_scenario14_busy_slot_at_deposit_uncharges_the_surplus(leaf, arena):
    leaf.try_charge(1)                                       # usage 64, stock 63
    slot = leaf._local_slot()
    assert arena._slots.stock_trylock(slot, os.getpid())     # a nested context holds it
    try:
        assert leaf.try_charge(1) == (True, None)            # fast path busy: slow path
    finally:
        arena._slots.stock_unlock(slot)
    # greedy 64, deposit refused, surplus 63 uncharged: usage = real 2 + stock 63
    assert (leaf.usage, leaf.stock(0), arena.counter("root").usage) == (65, 63, 65)
    check_invariants(arena, {"leaf": 2})
    leaf.uncharge(2)


def test_scenario18_enable_failure_runs_without_stock(make_arena):
    arena = make_arena(max_stocked=1)
    shmcounter.register_cpu(arena, 0)
    first, second = arena.new_counter("first"), arena.new_counter("second")
    assert first.enable_stock(64) is True
    assert second.enable_stock(64) is False                   # no stock left: nonfatal
    assert (second.has_stock, second.batch) == (False, 0)
    assert second.try_charge(1) == (True, None)
    assert (second.usage, second.stock(0)) == (1, 0)         # exact, hierarchical
    second.disable_stock()
    assert second.drain_stock_local() == 0 and second.drain_cpu(1) == 0
    assert second.free_stock() == 0
    second.uncharge(1)
    assert second.usage == 0
    first.free_stock()
    assert second.enable_stock(64) is True                    # the freed stock id is reused
    second.try_charge(1)
    assert (second.usage, second.stock(0), first.stock(0)) == (64, 63, 0)
    check_invariants(arena, {"second": 1})
    second.free_stock()
    second.uncharge(1)


def test_mt02_batch_precharge_one_cpu(leaf, arena):
    table = [("new A", 0, 0, 0)]
    leaf.try_charge(1)
    table.append(("charge 1", *state(leaf)))
    for _ in range(63):
        leaf.try_charge(1)
    table.append(("63 more", *state(leaf)))
    leaf.try_charge(1)
    table.append(("charge 1", *state(leaf)))
    leaf.uncharge(65)
    table.append(("direct-free all 65", *state(leaf)))
    assert leaf.drain_stock_local() == 63
    table.append(("drain", *state(leaf)))
    assert table == [
        # step, usage, stock(cpu0), peak
        ("new A", 0, 0, 0),
        ("charge 1", 64, 63, 64),
        ("63 more", 64, 0, 64),
        ("charge 1", 128, 63, 128),
        ("direct-free all 65", 63, 63, 128),
        ("drain", 0, 0, 128),
    ]


@pytest.mark.parametrize("k, usage, stock", [(1, 64, 63), (64, 64, 0), (100, 128, 28)])
def test_mt03_k_single_page_charges(leaf, k, usage, stock):
    for _ in range(k):
        leaf.try_charge(1)
    assert (leaf.usage, leaf.stock(0)) == (usage, stock)    # 64*ceil(k/64), minus k
    leaf.uncharge(k)
    assert leaf.usage == leaf.stock(0) == stock


def test_mt03_repeated_ten_page_charges(leaf):
    seen = []
    for _ in range(7):
        leaf.try_charge(10)
        seen.append((leaf.usage, leaf.stock(0)))
    assert seen == [(64, 54), (64, 44), (64, 34), (64, 24), (64, 14), (64, 4), (128, 58)]
    leaf.uncharge(70)


@pytest.mark.parametrize("n", [100, 64])
def test_mt04_large_charges_make_no_refill(leaf, n):
    leaf.try_charge(n)
    assert (leaf.usage, leaf.stock(0)) == (n, 0)
    leaf.uncharge(n)


def test_mt10_set_max_fails_until_the_stock_is_drained(leaf, arena):
    for _ in range(40):
        leaf.try_charge(1)
    assert (leaf.usage, leaf.stock(0)) == (64, 24)           # alloc 40, stock 24
    with pytest.raises(Busy):
        leaf.set_max(50)
    assert leaf.drain_stock_local() == 24 and leaf.usage == 40
    leaf.set_max(50)
    assert leaf.max == 50
    with pytest.raises(Busy):                                 # nothing left to drain
        leaf.set_max(30)
    assert leaf.max == 50
    leaf.set_max(1000)                                        # raising always succeeds
    check_invariants(arena, {"leaf": 40})
    leaf.uncharge(40)


def _charge_many(name: str, count: int) -> int:
    counter = cpuproc.arena().counter(name)
    return sum(counter.try_charge(1)[0] for _ in range(count))


def test_mt10_racing_charger_never_ends_above_a_limit_that_was_set(arena, cpus):
    leaf = arena.new_counter("leaf", max=4000)
    leaf.enable_stock(64)
    cpu1 = cpus(1)
    cpu1.start(_charge_many, "leaf", 20000)
    last_set = leaf.max
    for limit in range(3000, 0, -25):
        try:
            leaf.set_max(limit)
            last_set = limit
        except Busy:
            assert leaf.max == last_set                       # a refusal changes nothing
    charged = cpu1.result()
    assert leaf.usage <= last_set == leaf.max
    check_invariants(arena, {"leaf": charged})
    cpu1.call(cpuproc.drain_local, "leaf")
    leaf.uncharge(charged)


def test_disable_stops_deposits_but_leftovers_still_serve(leaf, arena):
    leaf.try_charge(1)                                        # usage 64, stock 63
    leaf.disable_stock()
    assert leaf.batch == 0
    assert leaf.try_charge(60) == (True, None)                # hit on the leftover
    assert (leaf.usage, leaf.stock(0)) == (64, 3)
    assert leaf.try_charge(5) == (True, None)                 # miss: exact, no deposit
    assert (leaf.usage, leaf.stock(0)) == (69, 3)
    assert leaf.free_stock() == 3
    assert (leaf.has_stock, leaf.usage) == (False, 66)
    check_invariants(arena, {"leaf": 66})
    leaf.uncharge(66)


# ---- CPUs: registration, drain_cpu -----------------------------------------

def _whoami() -> int | None:
    return shmcounter.this_cpu()


def _fork_child_cpu() -> str:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(w, b"none" if shmcounter.this_cpu() is None else b"cpu")
        os._exit(0)
    os.waitpid(pid, 0)
    return os.read(r, 8).decode()


def test_this_cpu_is_per_process(arena, cpus):
    assert shmcounter.this_cpu() is None
    cpu1 = cpus(1)
    assert cpu1.call(_whoami) == 1
    assert cpu1.call(_fork_child_cpu) == "none"               # a forked child is no CPU
    assert arena.cpu_pid(1) == cpu1.pid and arena.cpu_pid(0) == 0


def test_register_refuses_a_taken_or_dead_cpu(arena, cpus):
    cpu1 = cpus(1)
    with pytest.raises(ArenaError, match=rf"^CPU 1 is already registered by pid {cpu1.pid}$"):
        shmcounter.register_cpu(arena, 1)
    with pytest.raises(ValueError, match=r"^cpu must be an int in \[0, 2\), got 2$"):
        shmcounter.register_cpu(arena, 2)
    shmcounter.register_cpu(arena, 0)
    with pytest.raises(ArenaError, match=r"is already CPU 0; call unregister_cpu\(\) first$"):
        shmcounter.register_cpu(arena, 0)
    shmcounter.unregister_cpu()
    cpu1.kill()
    with pytest.raises(ArenaError, match=rf"^CPU 1's previous process \(pid {cpu1.pid}\) died"
                                         r".*run arena.hotplug_cpu_dead\(1\) first$"):
        shmcounter.register_cpu(arena, 1)
    assert arena.hotplug_cpu_dead(1) == {}
    shmcounter.register_cpu(arena, 1)


def test_drain_cpu_reclaims_exactly_a_killed_cpus_stock(arena, cpus):
    root = arena.new_counter("root")
    x = arena.new_counter("x", parent=root)
    y = arena.new_counter("y", parent=root)
    x.enable_stock(64)
    y.enable_stock(64)
    cpu1 = cpus(1)
    assert cpu1.call(cpuproc.run_ops, [("charge", "x", 1), ("charge", "y", 10)]) == [True, True]
    assert (x.stock(1), y.stock(1), root.usage) == (63, 54, 128)
    with pytest.raises(ValueError, match=r"^CPU 1 is online \(pid \d+\); drain_cpu is for dead"):
        x.drain_cpu(1)
    cpu1.kill()
    assert (x.drain_cpu(1), x.usage, root.usage) == (63, 1, 65)
    assert arena.hotplug_cpu_dead(1) == {"y": 54}
    assert (y.usage, root.usage, x.stock(1), y.stock(1)) == (10, 11, 0, 0)
    check_invariants(arena, {"x": 1, "y": 10})
    x.uncharge(1)
    y.uncharge(10)


def test_drain_stock_drains_every_online_cpu_and_this_one_inline(leaf, arena, cpus):
    cpu1 = cpus(1)
    leaf.try_charge(1)                                        # CPU 0: this process
    assert cpu1.call(cpuproc.try_charge, "leaf", 10) == (True, None)
    assert (leaf.usage, leaf.stock(0), leaf.stock(1)) == (128, 63, 54)
    leaf.drain_stock()
    assert (leaf.usage, leaf.stock(0), leaf.stock(1)) == (11, 0, 0)
    check_invariants(arena, {"leaf": 11})
    cpu1.call(cpuproc.uncharge, "leaf", 10)
    leaf.uncharge(1)


def test_unregister_drains_own_stocks(leaf, arena):
    leaf.try_charge(1)
    shmcounter.unregister_cpu()
    assert (leaf.usage, leaf.stock(0), arena.cpu_pid(0)) == (1, 0, 0)
    assert shmcounter.this_cpu() is None
    leaf.uncharge(1)


def test_repr_shows_live_numbers(leaf, arena):
    leaf.set_max(1000)
    leaf.try_charge(1)
    assert repr(leaf) == "<PageCounter 'leaf' usage=64/1000 stock=[63, 0] failcnt=0>"
    assert repr(arena.counter("root")) == "<PageCounter 'root' usage=64/max stock=[0, 0] failcnt=0>"
    leaf.uncharge(1)


def test_closing_the_handle_a_cpu_runs_on_takes_it_offline(make_arena):
    arena = make_arena()
    leaf = arena.new_counter("leaf")
    leaf.enable_stock(64)
    shmcounter.register_cpu(arena, 0)
    leaf.try_charge(1)
    arena.close()
    assert shmcounter.this_cpu() is None
    other = Arena.attach(arena.name)                # a new handle: the old one is closed
    try:
        assert (other.cpu_pid(0), other.counter("leaf").stock(0), other.counter("leaf").usage) \
            == (0, 0, 1)
        other.counter("leaf").uncharge(1)
    finally:
        other.close()
