"""The series' reviewers' races, reproduced on purpose (docs/stock-design.md §Races E4, E5; §5
scenarios 11 and 12), and kills inside a legacy eviction.

Deterministic interleavings, no sleeps: a CPU parks itself (SIGSTOP) at a named
hook point (shmcounter.hooks), the test runs the other side, then lets it go.
  - CPU 1 parks inside a drain_all_stock, holding the single-drainer lock, so
    the drain_all_stock of the cgroup going offline loses its trylock (E8);
  - for E5, CPU 0 parks in a stock hit between reading the slot and writing it
    back, as the kernel's `stock->nr_pages -= n` under the local lock can be
    interleaved by a writer that ignores that lock.
Every race shows under its design and not under "fixed", whose disable only sets
batch = 0 and whose free does the only lock-free drain, once nobody charges."""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading

import pytest

from shmcounter.drain import drain_stock
from shmcounter.invariants import InvariantError, check_invariants
from shmcounter.memcg import Cgroups
from shmcounter.memcg.legacy import MC_FLUSHING

import memcg_tasks as t
import tasks


@pytest.fixture
def machine(make_machine):
    return make_machine(2)


def park(machine, cpu, point, fn, *args):
    """Run fn on `cpu`, which stops at hook `point`; returns its future."""
    machine.run_on(cpu, tasks.park_at, point)
    future = machine.submit(cpu, fn, *args)
    tasks.wait_stopped(machine.pid(cpu))
    return future


def resume(machine, cpu, future):
    os.kill(machine.pid(cpu), signal.SIGCONT)
    result = future.result(30)
    machine.run_on(cpu, t.disarm)
    return result


def start(arena, machine, variant):
    """g and h under root; CPU 0 charged g once (usage 64, stock 63); CPU 1 parked
    in drain_all_stock(h), holding the drain lock."""
    cg = Cgroups(arena, variant=variant)
    g = cg.create("g")
    cg.create("h")
    assert machine.run_on(0, t.charge, arena, "g") == [True]
    assert (g.memory.usage, g.stock(0)) == (64, 63)
    drainer = park(machine, 1, "drain_all:locked", t.drain_all, arena, "h")
    return cg, g, drainer


# ---- E5: v2's lock-free drain in disable ---------------------------------------------

@pytest.mark.underflow_expected(4)
def test_e5_v2_disable_races_a_stock_hit_and_pages_are_uncharged_twice(arena, machine):
    cg, g, drainer = start(arena, machine, "v2")
    charger = park(machine, 0, "stock:consume", t.charge, arena, "g")   # read 63, parked
    g.offline()              # drain_all_stock skips (trylock); disable drains the 63, no lock
    assert (g.memory.usage, g.stock(0)) == (1, 0)
    assert resume(machine, 0, charger) == [True]                        # writes back 63 - 1
    assert (g.memory.usage, g.stock(0)) == (1, 62)                      # resurrected
    with pytest.raises(InvariantError, match=r"I1 broken at 'g': usage 1 != real 2 \+ stock 62"):
        check_invariants(arena, {"g": 2})
    assert resume(machine, 1, drainer) is True
    machine.run_on(0, t.uncharge, arena, "g", 2)     # the two real pages: below 0 at g and root
    assert (g.memory.usage, arena.underflows) == (0, 2)
    with pytest.warns(RuntimeWarning, match="page_counter underflow on '(g|root)'"):
        g.free()                                     # the 62 resurrected pages, uncharged again
    assert (g.memory.usage, cg.root.memory.usage, arena.underflows) == (0, 0, 4)


def test_e5_does_not_happen_under_fixed(arena, machine):
    cg, g, drainer = start(arena, machine, "fixed")
    charger = park(machine, 0, "stock:consume", t.charge, arena, "g")
    g.offline()              # disable only sets batch = 0; drain_all_stock skips
    assert (g.memory.usage, g.stock(0), g.memory.batch) == (64, 63, 0)
    assert resume(machine, 0, charger) == [True]
    assert (g.memory.usage, g.stock(0)) == (64, 62)
    check_invariants(arena, {"g": 2})
    assert resume(machine, 1, drainer) is True
    machine.run_on(0, t.uncharge, arena, "g", 2)
    g.free()                                         # the only lock-free drain: nobody charges
    assert (g.memory.usage, g.stock(0), arena.underflows) == (0, 0, 0)


# ---- E4: the RFC's teardown when drain_all_stock loses its trylock ---------------------

@pytest.mark.underflow_expected(4)
def test_e4_rfc_disable_leaves_cancelled_pages_in_stock(arena, machine):
    cg, g, drainer = start(arena, machine, "rfc")
    g.offline()              # drain_all_stock skips; disable cancels the 63 without zeroing
    assert (g.memory.usage, g.stock(0), g.memory.batch) == (1, 63, 0)
    # undercount: a stock hit hands out a page that is no longer charged
    assert machine.run_on(0, t.charge, arena, "g") == [True]
    assert (g.memory.usage, g.stock(0)) == (1, 62)
    with pytest.raises(InvariantError, match=r"I1 broken at 'g': usage 1 != real 2 \+ stock 62"):
        check_invariants(arena, {"g": 2})
    # double uncharge: with batch 0 the stock-returning uncharge flushes the stale
    # stock plus the page, 63 pages, from a usage of 1
    machine.run_on(0, t.uncharge, arena, "g", 1)
    assert (g.memory.usage, g.stock(0), arena.underflows) == (0, 0, 2)
    assert resume(machine, 1, drainer) is True
    machine.run_on(0, t.uncharge, arena, "g", 1)     # the last real page: below 0 again
    g.free()
    assert (g.memory.usage, cg.root.memory.usage, arena.underflows) == (0, 0, 4)


@pytest.mark.parametrize("variant", ["fixed", "v4"])
def test_e4_does_not_happen_under_fixed_or_v4(arena, machine, variant):
    cg, g, drainer = start(arena, machine, variant)
    g.offline()
    assert (g.memory.usage, g.stock(0), g.memory.batch) == (64, 63, 0)
    assert machine.run_on(0, t.charge, arena, "g") == [True]          # a stock hit: fine
    machine.run_on(0, t.uncharge, arena, "g", 1)                      # plain uncharge
    assert (g.memory.usage, g.stock(0)) == (63, 62)
    check_invariants(arena, {"g": 1})
    assert resume(machine, 1, drainer) is True
    machine.run_on(0, t.uncharge, arena, "g", 1)
    g.free()
    assert (g.memory.usage, cg.root.memory.usage, arena.underflows) == (0, 0, 0)


# ---- kills inside a legacy eviction ------------------------------------------------------

@pytest.mark.parametrize("point, a8_real, reclaimed", [
    # killed in the charge op of A8 after its level was charged: rolled back,
    # slot 0 still caches A1
    ("charge:level", 0, {f"A{i}": 63 for i in range(1, 8)}),
    # killed between the two ops: A1's 63 pages wait in slot 0's pending half
    ("legacy:evicted", 1, {f"A{i}": 63 for i in range(1, 9)}),
    # killed inside the op that uncharges them: completed by the repair (an
    # uncharge is rolled forward), so A1's pages are gone before the reclaim
    ("uncharge:level", 1, {f"A{i}": 63 for i in range(2, 9)}),
])
def test_a_kill_inside_an_eviction_loses_no_page(arena, machine, point, a8_real, reclaimed):
    cg = Cgroups(arena, variant="legacy")
    groups = [cg.create(f"A{i}") for i in range(1, 9)]
    assert machine.run_on(0, t.charge_each, arena, [g.name for g in groups[:7]]) == 7
    park(machine, 0, point, t.charge, arena, "A8")
    assert machine.kill(0) == reclaimed
    assert [g.memory.usage for g in groups] == [1] * 7 + [a8_real]
    check_invariants(arena, {**{g.name: 1 for g in groups[:7]}, "A8": a8_real})
    for g in groups:
        g.uncharge(g.memory.usage)


# ---- the legacy drain paths against each other ----------------------------------------

def test_a_drain_served_between_the_two_ops_of_an_eviction_uncharges_once(arena, machine):
    cg = Cgroups(arena, variant="legacy")
    groups = [cg.create(f"A{i}") for i in range(1, 9)]
    machine.run_on(0, t.charge_each, arena, [g.name for g in groups[:7]])
    charger = park(machine, 0, "legacy:evicted", t.charge, arena, "A8")  # A1 pending
    assert cg.drain_all_stock(groups[0])          # flags CPU 0, which is stopped
    assert resume(machine, 0, charger) == [True]  # serves the drain, then its second op
    cg.wait_flushed()
    assert [g.memory.usage for g in groups] == [1] * 8
    check_invariants(arena, {g.name: 1 for g in groups})
    for g in groups:
        g.uncharge(1)


def test_a_drain_request_during_an_inline_drain_all_is_served_after_it(arena, machine):
    """Lock order: the op lock, then the CPU's lock. CPU 0 drains its own slots
    inline (holding both) and a work message arrives: served after, no deadlock."""
    cg = Cgroups(arena, variant="legacy")
    cg.create("A")
    machine.run_on(0, t.charge, arena, "A")
    drainer = park(machine, 0, "uncharge:level", t.drain_all, arena, "A")
    done = []
    waiter = threading.Thread(target=lambda: done.append(drain_stock(arena, [cg.root.memory], 30)))
    waiter.start()                                # a work message to every CPU
    assert resume(machine, 0, drainer) is True
    waiter.join(30)
    assert done == [True] and cg.cgroup("A").memory.usage == 1
    cg.cgroup("A").uncharge(1)


def test_a_flag_left_by_a_requester_that_died_before_sending_is_taken_over(arena, machine):
    cg = Cgroups(arena, variant="legacy")
    a = cg.create("A")
    machine.run_on(1, t.charge, arena, "A")
    dead = multiprocessing.get_context("fork").Process(target=int)
    dead.start()
    dead.join()
    # a drain_all_stock that flagged CPU 1 and was killed before its signal
    arena._slots.store(arena._memcg.cpu_slot(1) + MC_FLUSHING, dead.pid)
    assert cg.drain_all_stock(a)
    cg.wait_flushed()
    assert (a.memory.usage, a.stock(1)) == (1, 0)
    a.uncharge(1)
