"""Hotplug torture in the suite: random SIGKILLs of CPU processes running random
charge, uncharge and drain loops over a limited tree with a shadow ledger; every
invariant is checked after every kill (procs/lab/torture.py). The long version is
scripts/hotplug_torture.py."""
from __future__ import annotations

import pytest

from procs.lab.torture import (
    AT_RANDOM,
    IN_DEPOSIT,
    IN_DRAIN,
    IN_FLIGHT,
    INSIDE_OP,
    REQUESTER_DRAIN,
    SIDES,
    torture,
)


@pytest.mark.parametrize("design, method, kills", [
    ("page_counter", "fork", 600),
    ("page_counter", "forkserver", 100),
    ("legacy", "fork", 500),
])
def test_hotplug_torture(design, method, kills):
    report = torture(kills, seed=kills, start_method=method, design=design)
    assert report.kills == kills
    assert report.checks == kills + 1                # after every kill, and at the end
    assert report.ops > 50 * kills                   # the CPUs really worked between kills
    # Every 4th kill is aimed: the CPUs are stopped at random instants until one is
    # caught where aimed, and killed there; alternately inside the op (its writer
    # row's op word set, and an operation in flight in its ledger) and anywhere in
    # an operation in flight (its ledger written, its count not yet updated).
    aimed = kills // 4
    assert report.made == {AT_RANDOM: kills - aimed, INSIDE_OP: (aimed + 1) // 2,
                           IN_FLIGHT: aimed // 2}
    # Each kill aimed inside the op was made with the op word set, as read from the
    # victim's row while it was stopped.
    assert report.in_op[INSIDE_OP] == report.made[INSIDE_OP]
    # Each aimed kill's operation counted wholly or not at all (a kill at random
    # may land in one too).
    assert report.resolved >= report.aimed


def test_hotplug_torture_v4_kills_both_sides_of_the_lockless_stock():
    """The lockless stock: CPUs charge, uncharge and drain (remotely, every CPU's
    word); the requester, a plain process attached to the arena, loops drains.
    Both are victims, at random and aimed."""
    kills = 200
    report = torture(kills, seed=kills, design="v4")
    assert report.kills == kills
    assert report.checks == kills + 1                # after every kill, and at the end
    assert report.ops > 50 * kills                   # the CPUs really worked between kills
    assert report.drains > kills                     # and the requester drained
    # Every 4th kill is aimed, in turn: a CPU inside its op, a CPU inside the op of
    # its drain, a CPU inside its deposit (between the CAS intent and the forward
    # mark), a CPU with an operation in flight, the requester inside its drain.
    assert report.made == {AT_RANDOM: 150, INSIDE_OP: 10, IN_DRAIN: 10, IN_DEPOSIT: 10,
                           IN_FLIGHT: 10, REQUESTER_DRAIN: 10}
    # Read from the victim's row while it was stopped: each kill aimed inside an op,
    # a deposit or a drain was made with the op word set.
    for how in (INSIDE_OP, IN_DRAIN, IN_DEPOSIT, REQUESTER_DRAIN):
        assert report.in_op[how] == report.made[how]
    assert report.sides[SIDES[0]]["CAS intent"] >= report.made[IN_DEPOSIT]
    # Each kill inside an op is counted on its side, once.
    cpu_op, cpu_uncharge_op, cpu_drain, requester_drain = (
        sum(report.sides[side].values()) for side in SIDES)
    assert cpu_op + cpu_uncharge_op + cpu_drain + requester_drain == report.caught_in_op
    assert cpu_op + cpu_uncharge_op >= report.made[INSIDE_OP]
    assert cpu_drain >= report.made[IN_DRAIN]
    assert requester_drain >= report.made[REQUESTER_DRAIN]
    assert report.requester_kills >= report.made[REQUESTER_DRAIN]
    # The drains were killed inside their op, most after their take (marked
    # forward: completed), and every invariant held after each. (The take, from
    # the intent to the mark, is a few instructions of one C call: a stop rarely
    # lands before it; tests/test_stock_lockless.py kills there, at named points.)
    drains = [report.sides[side] for side in SIDES[2:]]
    assert sum(d["marked"] for d in drains) > 0
    assert report.in_flight["in a drain"] >= report.made[IN_DRAIN] + report.made[REQUESTER_DRAIN]
    assert report.resolved >= (report.made[INSIDE_OP] + report.made[IN_DEPOSIT]
                               + report.made[IN_FLIGHT])


def test_the_legacy_torture_keeps_the_7_slots_evicting_and_draining():
    report = torture(40, seed=1, design="legacy")
    stats = report.stats
    assert stats["evictions"] > 1000                 # 10 leaf cgroups, 7 slots per CPU
    assert stats["overflows"] > 0                    # kmem uncharges past 64 drain a slot
    assert stats["flushes"] > 0                      # drain_all_stock work served
    assert stats["max events"] > 0                   # refused charges: drain, retry


def test_an_unknown_design_is_refused():
    with pytest.raises(ValueError, match=r"design must be one of \('page_counter', "
                                         r"'legacy', 'v4'\), got 'rfc'"):
        torture(1, design="rfc")


def test_an_unknown_aim_is_refused():
    with pytest.raises(ValueError, match=r"aim must be one of \('flight', 'op', "
                                         r"'drain', 'requester', 'deposit', 'alternate'\), "
                                         r"got 'anywhere'"):
        torture(1, aim="anywhere")


@pytest.mark.parametrize("aim", ["drain", "requester", "deposit"])
def test_a_drain_aim_needs_the_lockless_stock(aim):
    with pytest.raises(ValueError, match=rf"aim '{aim}' needs design 'v4' \(the lockless "
                                         rf"stock's remote drains\), got 'legacy'"):
        torture(1, design="legacy", aim=aim)
