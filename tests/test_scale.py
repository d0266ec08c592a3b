"""A drain of a subtree and a refused charge cost what the subtree asks, whatever
the size of the rest of the tree (bench/scale_bench.py measures it; no test here
times anything). The structures that make it so, with exact numbers:

  - Cgroups walks a subtree down the arena's index of children
    (Segment._child_counters), which sees the counters any process creates, and
    builds no handle outside the subtree;
  - a drain request sets the CPU's flag of each counter and the summary bit of
    its group of 64 (drain.ask); the CPU takes the summary bits, then reads only
    the flags of those groups (drain.take_requests).
"""
from __future__ import annotations

import os
import signal

import pytest

from shmcounter import drain, segment
from shmcounter.memcg import VARIANTS, Cgroups
from shmcounter.segment import R_DONE_SEQ

import memcg_tasks as mt
import tasks

PER_COUNTER = [v for v in VARIANTS if v != "legacy"]


@pytest.fixture
def arena(make_arena):
    """Room for 4 groups of request flags and more."""
    return make_arena(max_counters=256)


@pytest.fixture
def machine(make_machine):
    return make_machine(2)


def names(groups) -> list[str]:
    return [g.name for g in groups]


# ---- the tree: an index of children, seen by every process -----------------------

def test_a_subtree_holds_the_cgroups_another_process_created_since(arena, machine):
    cg = Cgroups(arena)
    job = cg.create("job")
    cg.create("a", parent=job)
    assert names(cg._subtree(job)) == ["job", "a"]           # the index is built
    machine.run_on(0, mt.create, arena, [("b", "job"), ("u", None), ("c", "a"),
                                         ("d", "b"), ("v", "u")])
    assert names(cg._subtree(job)) == ["job", "a", "b", "c", "d"]
    assert names(cg._children(job)) == ["a", "b"]
    assert names(cg._children(cg.root)) == ["job", "u"]
    index = {g.name: g._index for g in cg.cgroups()}
    assert arena._child_counters(index["job"]) == [index["a"], index["b"]]
    assert arena._child_counters(index["d"]) == []
    assert [c.name for c in cg._stocked(cg.cgroup("b"))] == ["b", "d"]


def test_a_memsw_tree_subtree_holds_memory_and_memsw_counters_once(arena, machine):
    cg = Cgroups(arena, memsw=True)
    job = cg.create("job")
    machine.run_on(1, mt.create, arena, [("a", "job"), ("u", None)])
    assert names(cg._subtree(job)) == ["job", "a"]
    assert [c.name for c in cg._stocked(job)] == ["job", "job:memsw", "a", "a:memsw"]
    a = cg.cgroup("a")
    assert job.memsw is not None and a.memsw is not None
    assert arena._child_counters(job.memsw._index) == [a.memsw._index]


@pytest.mark.parametrize("variant", PER_COUNTER)
def test_a_drain_of_a_subtree_leaves_the_others_stock_and_handles_alone(arena, machine,
                                                                        variant):
    """Ten unrelated cgroups, created by CPU 0, hold 63 pages of stock on each CPU,
    as does job/leaf. drain_all_stock(job) from this process drains leaf alone and
    builds the handles of job's subtree and its ancestors only."""
    Cgroups(arena, variant=variant)
    others = [f"u{i}" for i in range(10)]
    made = [(u, None) for u in others] + [("job", None), ("leaf", "job")]
    machine.run_on(0, mt.create, arena, made)
    for cpu in (0, 1):
        assert machine.run_on(cpu, mt.charge_each, arena, [*others, "leaf"]) == 11
    cg = Cgroups(arena)                                  # a fresh view: no handle yet
    job = cg.cgroup("job")
    assert cg.drain_all_stock(job)
    assert sorted(g.name for g in cg._handles.values()) == ["job", "leaf", "root"]
    leaf = cg.cgroup("leaf")
    assert ([leaf.stock(0), leaf.stock(1)], leaf.memory.usage) == ([0, 0], 2)
    for u in others:
        g = cg.cgroup(u)
        assert ([g.stock(0), g.stock(1)], g.memory.usage) == ([63, 63], 128)
    for u in [*others, "leaf"]:
        cg.cgroup(u).uncharge(2)


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_refused_charge_builds_no_handle_outside_the_refusing_cgroup(arena, machine,
                                                                       variant):
    Cgroups(arena, variant=variant)
    machine.run_on(0, mt.create, arena, [(f"u{i}", None) for i in range(10)])
    cg = Cgroups(arena)
    full = cg.create("full", max=8)
    assert full.try_charge(8)
    assert full.try_charge(1) is False
    cg.wait_flushed()
    assert sorted(g.name for g in cg._handles.values()) == ["full", "root"]
    assert (full.memory.usage, full.memory.failcnt, full.events_local["max"]) == (8, 2, 2)
    full.uncharge(8)


# ---- drain requests: flags, and a summary bit per group of 64 -----------------------

@pytest.fixture
def many(arena):
    """Counters c0..c199 with stock: groups 0 to 3 of the request flags."""
    assert segment.REQUEST_GROUP == 64
    counters = [arena.new_counter(f"c{i}") for i in range(200)]
    for c in counters:
        c.enable_stock(64)
    return counters


def stocks_of(counters, cpu: int) -> list[int]:
    return [c.stock(cpu) for c in counters]


def test_a_request_sets_its_flags_then_the_bits_of_their_groups(make_machine, arena, many):
    """CPU 1 is stopped: the request waits in the segment, as posted."""
    m = make_machine(2)
    names_ = [c.name for c in many]
    assert m.run_on(1, tasks.charge_each, arena, names_, 1) == [True] * 200
    os.kill(m.pid(1), signal.SIGSTOP)
    try:
        asked = [5, 70, 71, 199]                              # groups 0, 1, 1, 3
        pid, ticket = drain.post_work(arena, 1, asked)
        assert (pid, ticket) == (m.pid(1), 1)
        assert arena.requests[1, :200].nonzero()[0].tolist() == asked
        assert arena.request_summary[1].tolist() == [0b1011]
    finally:
        os.kill(m.pid(1), signal.SIGCONT)
    done = arena._row_slot(1) + R_DONE_SEQ
    while arena._slots.load(done) < ticket:
        arena._slots.futex_wait(done, arena._slots.load(done), 20_000)
    assert (arena.requests[1].any(), arena.request_summary[1].tolist()) == (False, [0])
    assert [i for i, n in enumerate(stocks_of(many, 1)) if n == 0] == asked
    assert stocks_of(many, 1).count(63) == 196
    for c in many:
        c.drain_stock()
        c.uncharge(1)


def test_a_drain_of_many_counters_across_groups_drains_exactly_those(make_machine, arena,
                                                                      many):
    m = make_machine(2)
    names_ = [c.name for c in many]
    for cpu in (0, 1):
        assert m.run_on(cpu, tasks.charge_each, arena, names_, 1) == [True] * 200
    asked = many[::3]                                         # 67 counters, groups 0-3
    assert drain.drain_stock(arena, asked)
    for cpu in (0, 1):
        assert [i for i, n in enumerate(stocks_of(many, cpu)) if n == 0] == list(
            range(0, 200, 3))
        assert stocks_of(many, cpu).count(63) == 133
        assert (arena.requests[cpu].any(), arena.request_summary[cpu].tolist()) == (False,
                                                                                    [0])
    assert sum(c.usage for c in many) == 67 * 2 + 133 * 128
    for c in many:
        c.drain_stock()
        c.uncharge(2)


def test_hotplug_forgets_the_flags_and_bits_of_a_dead_cpu(make_machine, arena, many):
    m = make_machine(2)
    assert m.run_on(1, tasks.charge_each, arena, ["c3", "c130"], 1) == [True, True]
    os.kill(m.pid(1), signal.SIGSTOP)
    drain.post_work(arena, 1, [3, 130])
    posted = arena.request_summary[1].tolist()
    assert m.kill(1) == {"c3": 63, "c130": 63}
    assert posted == [0b101]                                   # groups 0 and 2
    assert (arena.requests[1].any(), arena.request_summary[1].tolist()) == (False, [0])
    many[3].uncharge(1)
    many[130].uncharge(1)


def test_a_drain_that_raises_leaves_its_flag_and_the_groups_not_served(arena, many):
    """take_requests run by hand on CPU 1's requests (no CPU process: the callback
    stands in for the drain): it raises at counter 70 of group 1."""
    drain.ask(arena, 1, [3, 70, 75, 130])
    seen: list[int] = []

    def failing(index: int) -> None:
        seen.append(index)
        if index == 70:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        drain.take_requests(arena, 1, failing)
    assert seen == [3, 70]
    assert arena.requests[1, :200].nonzero()[0].tolist() == [70, 75, 130]
    assert arena.request_summary[1].tolist() == [0b110]
    drain.take_requests(arena, 1, seen.append)
    assert seen == [3, 70, 70, 75, 130]
    assert (arena.requests[1].any(), arena.request_summary[1].tolist()) == (False, [0])


def test_a_summary_bit_of_no_published_counter_is_taken_and_ignored(arena, many):
    """A hostile word: bits of groups 3 to 15 (no counter beyond 199), and a flag at
    index 230, in group 3 but beyond the published counters."""
    arena._slots.store(arena._request_slot(1, 230), 1)
    arena._slots.store(arena._summary_slot(1, 0), 0xFFF8)
    seen: list[int] = []
    drain.take_requests(arena, 1, seen.append)
    assert seen == []
    assert (int(arena.requests[1, 230]), arena.request_summary[1].tolist()) == (1, [0])
    arena._slots.store(arena._request_slot(1, 230), 0)
