"""The kernel's acceptance scenarios for the worker-as-CPU model
(docs/kernel-semantics.md §Acceptance scenarios MT-05 to MT-08 and MT-13), on the old
7-slot design and on the fixed per-counter stock, and docs/stock-design.md §Scenarios
scenarios 7, 8 and 21. Two CPU processes, batch 64.

Where the legacy drain is asynchronous, the remote CPU is held stopped (SIGSTOP)
while the charge that asked for it retries, so the numbers are exact: the work is
queued, not yet run, as it would be on a busy CPU."""
from __future__ import annotations

import os
import signal

import pytest

from shmcounter.invariants import check_invariants
from shmcounter.memcg import Cgroups

import memcg_tasks as t


def usages(*groups):
    return [g.memory.usage for g in groups]


@pytest.fixture
def machine(make_machine):
    return make_machine(2)


# ---- MT-05: limit edge --------------------------------------------------------

def mt05_until_the_limit(m, arena, cg):
    a = cg.create("A", max=100)
    assert m.run_on(0, t.charge, arena, "A") == [True]            # w0: 64, stock 63
    assert (a.memory.usage, a.stock(0)) == (64, 63)
    assert m.run_on(1, t.charge, arena, "A") == [True]            # batch fails, exact fits
    assert (a.memory.usage, a.stock(1), a.events["max"], a.memory.failcnt) == (65, 0, 0, 1)
    assert m.run_on(1, t.charge, arena, "A", 1, 35) == [True] * 35
    assert (a.memory.usage, a.memory.failcnt) == (100, 36)
    return a


def test_mt05_legacy_limit_edge_with_an_asynchronous_drain(arena, machine):
    cg = Cgroups(arena, variant="legacy")
    a = mt05_until_the_limit(machine, arena, cg)
    os.kill(machine.pid(0), signal.SIGSTOP)                        # w0 cannot run its drain yet
    try:
        # batch fails (37), exact fails (38): max event, drain_all(A) flags w0 and
        # returns; the retry with the exact size fails again (39): a second event.
        assert machine.run_on(1, t.charge, arena, "A") == [False]
        assert (a.memory.usage, a.events["max"], a.memory.failcnt) == (100, 2, 39)
    finally:
        os.kill(machine.pid(0), signal.SIGCONT)
    cg.wait_flushed()                                              # w0 returned its 63
    assert (a.memory.usage, a.stock(0)) == (37, 0)
    assert machine.run_on(1, t.charge, arena, "A") == [True]       # batch fails (40), exact fits
    assert (a.memory.usage, a.events["max"], a.memory.failcnt) == (38, 2, 40)
    check_invariants(arena, {"A": 38})
    a.uncharge(38)


def test_mt05_fixed_limit_edge_with_a_synchronous_drain(arena, machine):
    cg = Cgroups(arena)
    a = mt05_until_the_limit(machine, arena, cg)
    # batch fails (37), exact fails (38): one max event; drain_all(A) waits for w0,
    # so the retry sees the margin. It retries with the batch first (39): the
    # series' page_counter_try_charge is greedy on every call, where the old
    # try_charge_memcg kept batch = n after its first failure (kernel: failcnt 38).
    assert machine.run_on(1, t.charge, arena, "A") == [True]
    assert (a.memory.usage, a.stock(0), a.events["max"], a.memory.failcnt) == (38, 0, 1, 39)
    check_invariants(arena, {"A": 38})
    a.uncharge(38)


# ---- MT-06: the limit is an ancestor's -------------------------------------------

def mt06_until_the_limit(m, arena, cg):
    p = cg.create("P", max=100)
    c1, c2 = cg.create("C1", parent=p), cg.create("C2", parent=p)
    assert m.run_on(0, t.charge, arena, "C1") == [True]
    assert m.run_on(1, t.charge, arena, "C2") == [True]            # batch refused at P
    # C2 holds 1 page, yet peaked at 64: its batch was charged before P refused it
    assert (c2.memory.usage, c2.memory.watermark) == (1, 64)
    assert m.run_on(1, t.charge, arena, "C2", 1, 35) == [True] * 35
    assert usages(p, c1, c2) == [100, 64, 36]
    # and so on with each refused batch: 35 + 64
    assert (c2.memory.watermark, p.memory.failcnt, c2.memory.failcnt) == (99, 36, 0)
    return p, c1, c2


def test_mt06_legacy_ancestor_limit(arena, machine):
    cg = Cgroups(arena, variant="legacy")
    p, c1, c2 = mt06_until_the_limit(machine, arena, cg)
    os.kill(machine.pid(0), signal.SIGSTOP)
    try:
        assert machine.run_on(1, t.charge, arena, "C2") == [False]
    finally:
        os.kill(machine.pid(0), signal.SIGCONT)
    cg.wait_flushed()                                   # drain_all(P) reached C1's slot
    assert usages(p, c1, c2) == [37, 1, 36]
    assert machine.run_on(1, t.charge, arena, "C2") == [True]
    assert usages(p, c1, c2) == [38, 1, 37]
    assert [g.events["max"] for g in (p, c1, c2)] == [2, 0, 0]
    assert [g.events_local["max"] for g in (p, c1, c2)] == [2, 0, 0]
    assert (p.memory.failcnt, c2.memory.watermark) == (40, 36 + 64)
    check_invariants(arena, {"C1": 1, "C2": 37})
    c1.uncharge(1)
    c2.uncharge(37)


def test_mt06_fixed_ancestor_limit(arena, machine):
    cg = Cgroups(arena)
    p, c1, c2 = mt06_until_the_limit(machine, arena, cg)
    assert machine.run_on(1, t.charge, arena, "C2") == [True]       # one synchronous drain
    assert usages(p, c1, c2) == [38, 1, 37]
    assert [g.events["max"] for g in (p, c1, c2)] == [1, 0, 0]
    assert p.memory.failcnt == 39                                   # greedy again, see MT-05
    check_invariants(arena, {"C1": 1, "C2": 37})
    c1.uncharge(1)
    c2.uncharge(37)


# ---- MT-07: eviction --------------------------------------------------------------

def nine_cgroups(arena, machine, cg):
    groups = [cg.create(f"A{i}") for i in range(1, 10)]
    for g in groups[:7]:
        assert machine.run_on(0, t.charge, arena, g.name) == [True]
    assert usages(*groups[:7]) == [64] * 7
    for g in groups[7:]:
        assert machine.run_on(0, t.charge, arena, g.name) == [True]
    return groups


def test_mt07_legacy_round_robin_eviction(arena, machine):
    cg = Cgroups(arena, variant="legacy")
    groups = nine_cgroups(arena, machine, cg)
    # A8 evicted slot 0 (A1), A9 slot 1 (A2): each victim keeps its one real page
    assert usages(*groups) == [1, 1, 64, 64, 64, 64, 64, 64, 64]
    assert cg.stats()["evictions"] == 2
    check_invariants(arena, {g.name: 1 for g in groups})
    for g in groups:
        g.uncharge(1)


def test_mt07_legacy_random_eviction(arena, machine):
    cg = Cgroups(arena, variant="legacy", eviction="random")
    groups = [cg.create(f"A{i}") for i in range(1, 9)]
    for g in groups:
        assert machine.run_on(0, t.charge, arena, g.name) == [True]
    assert sorted(usages(*groups[:7])) == [1] + [64] * 6    # exactly one victim
    assert groups[7].memory.usage == 64
    check_invariants(arena, {g.name: 1 for g in groups})
    for g in groups:
        g.uncharge(1)


def test_mt07_fixed_evicts_nothing(arena, machine):
    cg = Cgroups(arena)
    groups = nine_cgroups(arena, machine, cg)
    assert usages(*groups) == [64] * 9                      # a stock per counter
    assert cg.stats()["evictions"] == 0
    check_invariants(arena, {g.name: 1 for g in groups})
    for g in groups:
        g.uncharge(1)


def test_mt07_a_freed_slot_is_reused_before_evicting(arena, machine):
    cg = Cgroups(arena, variant="legacy")
    groups = [cg.create(f"A{i}") for i in range(1, 9)]
    for g in groups[:7]:
        machine.run_on(0, t.charge, arena, g.name)
    machine.run_on(0, t.charge, arena, "A3", 63)            # a hit: A3's slot 63 -> 0
    machine.run_on(0, t.uncharge, arena, "A3", 2, True)     # back to the slot: 2
    machine.run_on(0, t.charge, arena, "A3", 64)            # a miss, and no surplus to refill
    assert groups[2].stock(0) == 2
    machine.run_on(0, t.uncharge, arena, "A3", 63, True)    # 2 + 63 > 64: slot drained, freed
    assert groups[2].stock(0) == 0 and cg.stats()["overflows"] == 1
    assert machine.run_on(0, t.charge, arena, "A8") == [True]
    assert cg.stats()["evictions"] == 0                     # took the freed slot
    assert usages(*groups) == [64, 64, 63, 64, 64, 64, 64, 64]
    check_invariants(arena, {**{g.name: 1 for g in groups}, "A3": 63})
    for g in groups:
        g.uncharge(63 if g.name == "A3" else 1)


# ---- MT-08: a stock-free that overflows the slot -------------------------------------

@pytest.mark.parametrize("variant, after_stock_free, stock_left", [
    ("legacy", 99, 0),       # 63 + 2 > 64: the whole slot is uncharged and freed
    ("fixed", 162, 63),      # the series uncharges kmem through the hierarchy (E16)
    ("v4", 162, 63),         # the same: a plain uncharge leaves the word alone
])
def test_mt08_stock_free(arena, machine, variant, after_stock_free, stock_left):
    cg = Cgroups(arena, variant=variant)
    a = cg.create("A")
    machine.run_on(0, t.charge, arena, "A")
    machine.run_on(0, t.charge, arena, "A", 100)            # > 64: no stock involved
    assert (a.memory.usage, a.stock(0)) == (164, 63)
    machine.run_on(0, t.uncharge, arena, "A", 2, True)
    assert (a.memory.usage, a.stock(0)) == (after_stock_free, stock_left)
    machine.run_on(0, t.uncharge, arena, "A", 65, True)     # > 64 at once: bypasses the stock
    assert (a.memory.usage, a.stock(0)) == (after_stock_free - 65, stock_left)
    check_invariants(arena, {"A": 34})
    a.uncharge(34)


def test_mt08_direct_free_leaves_the_slot(arena, machine):
    cg = Cgroups(arena, variant="legacy")
    a = cg.create("A")
    machine.run_on(0, t.charge, arena, "A")
    machine.run_on(0, t.charge, arena, "A", 100)
    machine.run_on(0, t.uncharge, arena, "A", 2)
    assert (a.memory.usage, a.stock(0)) == (162, 63)
    check_invariants(arena, {"A": 99})
    a.uncharge(99)


# ---- MT-13: cgroup removal -----------------------------------------------------------

@pytest.mark.parametrize("variant, c2_stock_left", [
    ("legacy", 0),    # a remote drain empties all 7 slots of the CPU: C2's too
    ("fixed", 63),    # drain_all(C1) drains C1's counters only
    ("v4", 63),       # the same, every CPU's word of C1 taken by the caller
])
def test_mt13_removal(arena, machine, variant, c2_stock_left):
    cg = Cgroups(arena, variant=variant)
    p = cg.create("P")
    c1, c2 = cg.create("C1", parent=p), cg.create("C2", parent=p)
    machine.run_on(0, t.charge, arena, "C1")
    machine.run_on(1, t.charge, arena, "C1")
    machine.run_on(1, t.charge, arena, "C2")
    assert (p.memory.usage, [c1.stock(0), c1.stock(1), c2.stock(1)]) == (192, [63, 63, 63])
    machine.run_on(0, t.uncharge, arena, "C1", 1)            # C1's live pages freed
    machine.run_on(1, t.uncharge, arena, "C1", 1)
    c1.offline()
    cg.wait_flushed()
    assert (c1.memory.usage, c2.stock(1)) == (0, c2_stock_left)
    assert p.memory.usage == 1 + c2_stock_left               # Σalloc(C2) + its stock
    c1.free()
    check_invariants(arena, {"C2": 1})
    c2.uncharge(1)


# ---- docs/stock-design.md §Scenarios scenario 7: overcharge bound -----------------

@pytest.mark.parametrize("variant, root_usage, evictions", [
    ("fixed", 9 * 2 * 64, 0),              # K x P x 64, of which K x P real
    ("v4", 9 * 2 * 64, 0),
    ("legacy", 18 + 2 * 7 * 63, 2 * 2),    # at most P x 7 slots stocked; 2 evictions per CPU
])
def test_scenario7_overcharge_bound(arena, machine, variant, root_usage, evictions):
    cg = Cgroups(arena, variant=variant)
    names = [cg.create(f"L{i}").name for i in range(9)]
    for cpu in (0, 1):
        assert machine.run_on(cpu, t.charge_each, arena, names) == 9
    assert cg.root.memory.usage == root_usage
    assert cg.stats()["evictions"] == evictions
    check_invariants(arena, {name: 2 for name in names})
    for name in names:
        cg.cgroup(name).uncharge(2)


# ---- scenario 8: eviction thrash -------------------------------------------------------

@pytest.mark.parametrize("variant, walks, evictions, root_usage", [
    # 8 cgroups round-robin on one CPU, 7 slots: after the first 7 charges every
    # charge misses and evicts (505), and each eviction is a walk of its own
    ("legacy", 512 + 505, 505, 512 + 7 * 63),
    ("fixed", 8, 0, 512),                  # one refill per cgroup, 63 hits each
    ("v4", 8, 0, 512),
])
def test_scenario8_eviction_thrash(arena, machine, variant, walks, evictions, root_usage):
    cg = Cgroups(arena, variant=variant)
    names = [cg.create(f"M{i}").name for i in range(8)]
    before = cg.stats()
    assert machine.run_on(0, t.charge_each, arena, names, 64) == 512
    after = cg.stats()
    assert (after["walks"] - before["walks"], after["evictions"]) == (walks, evictions)
    assert cg.root.memory.usage == root_usage
    check_invariants(arena, {name: 64 for name in names})
    for name in names:
        cg.cgroup(name).uncharge(64)


# ---- scenario 21: socket-style ping-pong -------------------------------------------------

@pytest.mark.parametrize("variant, walks, usage_and_stock", [
    # the uncharge returns the page to the slot (63 + 1 = 64, not > 64): after the
    # first charge, no walk at all
    ("legacy", 1, (64, 64)),
    # every uncharge walks; the stock runs down to 0 and refills every 64 charges
    ("fixed", 640 + 10, (0, 0)),
    ("v4", 640 + 10, (0, 0)),
])
def test_scenario21_ping_pong(arena, machine, variant, walks, usage_and_stock):
    cg = Cgroups(arena, variant=variant)
    s = cg.create("S")
    before = cg.stats()["walks"]
    machine.run_on(0, t.ping_pong, arena, "S", 640)
    assert cg.stats()["walks"] - before == walks
    assert (s.memory.usage, s.stock(0)) == usage_and_stock
    check_invariants(arena, {"S": 0})
