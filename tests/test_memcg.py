"""Cgroups as docs/reference.md describes them: a tree in the arena that any attached process
opens; css_online/offline/free in each design; try_charge_memcg's events; memsw;
the first-child drain (V6); the read view; bad input. docs/stock-design.md §Scenarios scenarios 10,
16 and 17; docs/kernel-semantics.md MT-17."""
from __future__ import annotations

import os
import signal

import pytest

from shmcounter.errors import ArenaError, Busy
from shmcounter.invariants import check_invariants
from shmcounter.memcg import VARIANTS, Cgroups
from shmcounter.memcg.stat import format_cgroups
from shmcounter.segment import PC_FLAG_CAP, PC_FLAG_LOCKLESS, PC_FLAGS, R_REQ_SEQ

import memcg_tasks as t
import tasks


@pytest.fixture
def machine(make_machine):
    return make_machine(2)


# ---- the tree in the arena --------------------------------------------------------

def test_a_tree_made_in_one_process_is_found_by_name_in_another(arena, machine):
    cg = Cgroups(arena, variant="legacy")
    a = cg.create("a", max=1000)
    cg.create("b", parent=a)
    assert machine.run_on(0, t.charge, arena, "b", 1, 2) == [True, True]
    assert [(g.name, g.memory.usage) for g in Cgroups(arena).cgroups()] == [
        ("root", 64), ("a", 64), ("b", 64)]
    parent = Cgroups(arena).cgroup("b").parent
    assert parent is not None and parent.name == "a"
    check_invariants(arena, {"b": 2})
    cg.cgroup("b").uncharge(2)


def test_css_online_gives_memory_and_memsw_a_stock_of_64(arena):
    cg = Cgroups(arena, memsw=True)
    g = cg.create("g", max=500)
    assert [(c.name, c.has_stock, c.batch, c.max) for c in g.counters] == [
        ("g", True, 64, 500), ("g:memsw", True, 64, 500)]
    assert g.memsw is not None and g.memsw.parent is not None
    assert g.memsw.parent.name == "root:memsw"


def test_batch_0_is_the_design_without_stock(arena, machine):
    cg = Cgroups(arena, batch=0)
    g = cg.create("g")
    assert not g.memory.has_stock
    assert machine.run_on(0, t.charge, arena, "g") == [True]
    assert (g.memory.usage, cg.stats()["walks"]) == (1, 1)
    g.uncharge(1)


def test_a_second_tree_with_other_options_is_refused(arena):
    Cgroups(arena, variant="legacy")
    with pytest.raises(ValueError, match=r"this arena's cgroup tree has variant='legacy' "
                                         r"\(asked 'fixed'\)"):
        Cgroups(arena, variant="fixed")
    assert Cgroups(arena).variant == "legacy"


# ---- lifecycle: scenario 10, a quiescent cgroup death, in every design -------------

@pytest.mark.parametrize("variant", VARIANTS)
def test_scenario10_quiescent_death(arena, machine, variant):
    cg = Cgroups(arena, variant=variant)
    p = cg.create("P")
    g = cg.create("g", parent=p)
    for cpu in (0, 1):
        assert machine.run_on(cpu, t.charge, arena, "g") == [True]
    assert (p.memory.usage, g.stock(0), g.stock(1)) == (128, 63, 63)
    g.offline()
    cg.wait_flushed()
    assert (g.state, g.memory.usage, g.stock(0), g.stock(1)) == ("offline", 2, 0, 0)
    g.uncharge(2)
    g.free()
    assert (g.state, g.memory.has_stock, g.memory.usage, p.memory.usage) == ("freed", False, 0, 0)
    assert arena.underflows == 0


# ---- v4: the lockless stock, drained by the caller; the E14 cap ------------------------

def test_v4_online_gives_each_counter_a_lockless_stock_capped_as_the_tree_says(arena):
    cg = Cgroups(arena, variant="v4", memsw=True, stock_cap=True)
    g = cg.create("g", max=500)
    assert [(c.name, c.lockless, c.batch) for c in g.counters] == [
        ("g", True, 64), ("g:memsw", True, 64)]
    assert {arena._slots.load(c._c + PC_FLAGS) for c in g.counters} == {
        PC_FLAG_LOCKLESS | PC_FLAG_CAP}
    assert Cgroups(arena).options["stock_cap"] is True
    with pytest.raises(ValueError, match=r"this arena's cgroup tree has stock_cap=True "
                                         r"\(asked False\)"):
        Cgroups(arena, stock_cap=False)


def test_v4_drain_all_stock_takes_a_stopped_cpus_stock_without_a_message(arena, machine):
    cg = Cgroups(arena, variant="v4")
    g = cg.create("g")
    for cpu in (0, 1):
        assert machine.run_on(cpu, t.charge, arena, "g") == [True]
    assert (g.memory.usage, g.stock(0), g.stock(1)) == (128, 63, 63)
    tickets = [arena._slots.load(arena._row_slot(cpu) + R_REQ_SEQ) for cpu in (0, 1)]
    os.kill(machine.pid(1), signal.SIGSTOP)          # it could serve no work message
    try:
        assert cg.drain_all_stock(g)
        assert (g.memory.usage, g.stock(0), g.stock(1), cg.root.memory.usage) == (2, 0, 0, 2)
        assert [arena._slots.load(arena._row_slot(cpu) + R_REQ_SEQ) for cpu in (0, 1)] == tickets
    finally:
        os.kill(machine.pid(1), signal.SIGCONT)
    check_invariants(arena, {"g": 2})
    g.uncharge(2)


def test_v4_drain_all_stock_sees_a_cgroup_created_by_another_process_since_the_last(
        arena, machine):
    """The v4 drain keeps g's subtree counters until a counter is published: a
    child created since by CPU 1 is drained too. g and g/c each hold 63 on CPU 0."""
    cg = Cgroups(arena, variant="v4")
    g = cg.create("g")
    assert machine.run_on(0, t.charge, arena, "g") == [True]
    assert cg.drain_all_stock(g) and (g.memory.usage, g.stock(0)) == (1, 0)
    machine.run_on(1, t.create, arena, [("c", "g")])
    assert machine.run_on(0, t.charge_each, arena, ["g", "c"]) == 2
    c = cg.cgroup("c")
    assert (g.memory.usage, g.stock(0), c.memory.usage, c.stock(0)) == (129, 63, 64, 63)
    assert cg.drain_all_stock(g)
    assert (g.memory.usage, g.stock(0), c.memory.usage, c.stock(0)) == (3, 0, 1, 0)
    check_invariants(arena, {"g": 2, "c": 1})
    c.uncharge(1)
    g.uncharge(2)


@pytest.mark.parametrize("stock_cap, stock, usage, walks", [
    # both threads charge 64 and deposit 63: the word holds 126 > batch (E14)
    (False, 126, 128, 2),
    # the second deposit finds 63 pages, more than the 1 it charges for: 63 + 63
    # would exceed batch, so it takes the word and uncharges 63 + 63 (a third walk)
    (True, 0, 2, 3),
])
def test_e14_the_v4_cap_drains_a_word_a_second_context_pushes_past_batch(
        arena, machine, stock_cap, stock, usage, walks):
    cg = Cgroups(arena, variant="v4", stock_cap=stock_cap)
    g = cg.create("g")
    before = cg.stats()["walks"]
    assert machine.run_on(0, tasks.two_contexts_both_miss, arena, "g") == stock
    assert (g.memory.usage, g.stock(0), cg.root.memory.usage) == (usage, stock, usage)
    assert cg.stats()["walks"] - before == walks
    check_invariants(arena, {"g": 2})
    machine.run_on(0, t.uncharge, arena, "g", 2)


def test_lifecycle_errors_change_nothing(arena):
    cg = Cgroups(arena)
    p = cg.create("P")
    c = cg.create("C", parent=p)
    with pytest.raises(ValueError, match="the root cgroup cannot go offline"):
        cg.root.offline()
    with pytest.raises(ValueError, match=r"cgroup 'P' has online children \['C'\]"):
        p.offline()
    with pytest.raises(ValueError, match="cgroup 'C' is online; offline\\(\\) it first"):
        c.free()
    c.offline()
    with pytest.raises(ValueError, match="cgroup 'C' is offline, not online"):
        c.offline()
    with pytest.raises(ValueError, match="parent 'C' is offline, not online"):
        cg.create("D", parent=c)
    c.free()
    with pytest.raises(ValueError, match="cgroup 'C' is freed"):
        c.try_charge(1)
    assert [(g.name, g.state) for g in cg.cgroups()] == [
        ("root", "online"), ("P", "online"), ("C", "freed")]


@pytest.mark.parametrize("kwargs, message", [
    ({"variant": "v3"}, "bad variant: 'v3'"),
    ({"memsw": 1}, "bad memsw: 1"),
    ({"batch": -1}, "bad batch: -1"),
    ({"eviction": "lru"}, "bad eviction: 'lru'"),
    ({"variant": "legacy", "first_child_drain": True}, "first_child_drain is v2's V6"),
    ({"variant": "legacy", "batch": 32}, "the legacy design's batch is MEMCG_CHARGE_BATCH"),
    ({"variant": "legacy", "memsw": True}, "the legacy design is modelled for memory only"),
    ({"stock_cap": 1}, "bad stock_cap: 1"),
    ({"stock_cap": True}, "stock_cap is v4's \\(the E14 cap of its lockless stock\\); the "
                          "fixed design has none"),
    ({"variant": "legacy", "stock_cap": True}, "the legacy design has none"),
])
def test_bad_options(arena, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Cgroups(arena, **kwargs)
    assert [c.name for c in arena.counters()] == []


def test_bad_input_to_a_cgroup(arena):
    cg = Cgroups(arena)
    g = cg.create("g", max=10)
    for bad, error in [("", ValueError), ("a:b", ValueError), (3, ValueError)]:
        with pytest.raises(error, match="a cgroup name is a non-empty str without ':'"):
            cg.create(bad)  # type: ignore[arg-type]  # bad input
    with pytest.raises(ValueError, match="a counter named 'g' already exists"):
        cg.create("g")
    with pytest.raises(ValueError, match=r"max must be an int in \[0, "):
        cg.create("h", max=-1)
    with pytest.raises(TypeError, match="parent must be a MemCgroup of this tree"):
        cg.create("h", parent=g.memory)  # type: ignore[arg-type]  # bad input
    with pytest.raises(ValueError, match=r"n must be an int in \[0, 2\*\*62\), got -1"):
        g.try_charge(-1)
    with pytest.raises(TypeError, match="kmem must be a bool"):
        g.uncharge(1, kmem="yes")  # type: ignore[arg-type]  # bad input
    with pytest.raises(KeyError, match="no cgroup named 'g:memsw'"):
        cg.cgroup("g:memsw")
    assert [g.name for g in cg.cgroups()] == ["root", "g"] and g.memory.usage == 0


# ---- try_charge_memcg: events (MT-17) -------------------------------------------------

def test_a_max_event_counts_at_the_refusing_cgroup_and_its_ancestors_below_root(arena):
    cg = Cgroups(arena)
    p = cg.create("P", max=10)
    c = cg.create("C", parent=p)
    d = cg.create("D", parent=c)
    assert d.try_charge(10) and not d.try_charge(1)      # a non-CPU process: exact charges
    # refused by P twice (before and after the drain), hierarchical up to P only
    assert [(g.events["max"], g.events_local["max"]) for g in (cg.root, p, c, d)] == [
        (0, 0), (2, 2), (0, 0), (0, 0)]
    assert p.memory.failcnt == 2
    d.uncharge(10)


# ---- scenario 16: memsw, cgroup v1 ------------------------------------------------------

def test_scenario16_memsw_rollback_of_a_stock_hit(arena, machine):
    cg = Cgroups(arena, memsw=True)
    g = cg.create("g")
    assert g.memsw is not None and cg.root.memsw is not None
    assert machine.run_on(0, t.charge, arena, "g") == [True]
    assert [(c.usage, c.stock(0)) for c in g.counters] == [(64, 63), (64, 63)]
    g.memory.drain_stock()
    g.memory.set_max(1)
    # memsw: a stock hit (63 -> 62); memory refuses, batch and exact; memsw is
    # uncharged through the hierarchy: usage 63 = real 1 + stock 62 (E7). Max
    # event, drain_all_stock(g), retry: memsw refills (65, 63), memory refuses
    # again, memsw uncharged again: 64 = real 1 + stock 63.
    assert machine.run_on(0, t.charge, arena, "g") == [False]
    assert [(c.usage, c.stock(0)) for c in g.counters] == [(1, 0), (64, 63)]
    assert (g.events["max"], g.memory.failcnt, g.memsw.failcnt) == (2, 4, 0)
    check_invariants(arena, {"g": 1, "g:memsw": 1})
    g.offline()
    g.uncharge(1)
    g.free()
    assert (cg.root.memory.usage, cg.root.memsw.usage) == (0, 0)


# ---- scenario 17: the cgroup v2 first-child drain (V6) ----------------------------------

def test_scenario17_first_child_drains_the_parent(arena, machine):
    cg = Cgroups(arena, variant="v2", first_child_drain=True)
    p = cg.create("P")                                   # parent root: no drain
    for cpu in (0, 1):
        machine.run_on(cpu, t.charge, arena, "P")
    assert (p.memory.usage, p.stock(0), p.stock(1)) == (128, 63, 63)
    cg.create("C1", parent=p)                            # the first child drains P's subtree
    assert (p.memory.usage, p.stock(0), p.stock(1)) == (2, 0, 0)
    machine.run_on(0, t.charge, arena, "P")
    cg.create("C2", parent=p)                            # the second: no drain
    assert (p.memory.usage, p.stock(0)) == (66, 63)
    machine.run_on(0, t.charge, arena, "root")
    cg.create("X")                                       # parent is root: no drain
    assert cg.root.stock(0) == 63
    check_invariants(arena, {"P": 3, "root": 1})
    p.uncharge(3)
    cg.root.uncharge(1)


# ---- the read view -------------------------------------------------------------------------

def test_the_read_view_in_kernel_terms(arena, machine):
    cg = Cgroups(arena)
    a = cg.create("a", max=256)
    machine.run_on(1, t.charge, arena, "a", 1, 3)
    assert a.stat() == {
        "memory.current": 64 * 4096, "memory.max": 256 * 4096, "memory.peak": 64 * 4096,
        "memory.events": {"max": 0}, "memory.events.local": {"max": 0},
        "memory.failcnt": 0, "stock": [0, 61]}
    assert cg.root.stat()["memory.max"] == "max"
    assert format_cgroups(cg).splitlines()[1:] == [
        "cgroup  state   memory.current  memory.max  memory.peak  events.max  stock.cpu0  stock.cpu1",  # noqa: E501 (whole rows)
        "root    online          262144         max       262144           0           0           0",  # noqa: E501 (whole rows)
        "  a     online          262144     1048576       262144           0           0          61",  # noqa: E501 (whole rows)
    ]
    a.uncharge(3)


def test_handles_from_another_cgroups_object_name_the_same_subtree(arena, machine):
    cg = Cgroups(arena)
    p = cg.create("P")
    cg.create("C", parent=p)
    machine.run_on(0, t.charge, arena, "C")
    assert Cgroups(arena).drain_all_stock(Cgroups.open(arena).cgroup("P"))
    assert cg.cgroup("C").stock(0) == 0
    cg.cgroup("C").uncharge(1)


def test_a_memsw_name_too_long_for_its_second_counter_creates_neither(arena):
    cg = Cgroups(arena, memsw=True)
    with pytest.raises(ValueError, match=r"counter name must be 1..63 UTF-8 bytes"):
        cg.create("x" * 60)
    assert [c.name for c in arena.counters()] == ["root", "root:memsw"]


def test_open_is_for_an_arena_that_holds_a_tree(arena):
    with pytest.raises(ArenaError, match=f"arena '{arena.name}' holds no cgroup tree"):
        Cgroups.open(arena)
    Cgroups(arena, variant="rfc")
    assert Cgroups.open(arena).variant == "rfc"


def test_a_legacy_cgroup_cached_with_0_pages_stays_pinned(arena, machine):
    """docs/kernel-semantics.md §Limit writers and cgroup death: drain_all_stock skips a
    slot with 0 pages, yet the slot holds a reference, so css_free cannot happen until
    the slot goes."""
    cg = Cgroups(arena, variant="legacy")
    a = cg.create("A")
    machine.run_on(0, t.charge, arena, "A", 1, 64)        # 1 walk, 63 hits: slot at 0
    assert (a.memory.usage, a.stock(0)) == (64, 0)
    a.offline()
    cg.wait_flushed()
    a.uncharge(64)
    with pytest.raises(Busy, match=r"cgroup 'A' is still cached by the stock of CPUs \[0\]"):
        a.free()
    assert a.state == "offline"
    machine.run_on(0, t.charge_each, arena, [cg.create(f"B{i}").name for i in range(7)])
    a.free()                                              # evicted by B6: free now
    for i in range(7):
        cg.cgroup(f"B{i}").uncharge(1)
