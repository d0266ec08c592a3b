"""Hotplug torture in the suite: random SIGKILLs of CPU processes running random
charge, uncharge and drain loops over a limited tree with a shadow ledger; every
invariant is checked after every kill (procs/lab/torture.py). The long version is
scripts/hotplug_torture.py."""
from __future__ import annotations

import pytest

from procs.lab.torture import AT_RANDOM, IN_FLIGHT, INSIDE_OP, torture


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


def test_the_legacy_torture_keeps_the_7_slots_evicting_and_draining():
    report = torture(40, seed=1, design="legacy")
    stats = report.stats
    assert stats["evictions"] > 1000                 # 10 leaf cgroups, 7 slots per CPU
    assert stats["overflows"] > 0                    # kmem uncharges past 64 drain a slot
    assert stats["flushes"] > 0                      # drain_all_stock work served
    assert stats["max events"] > 0                   # refused charges: drain, retry


def test_an_unknown_design_is_refused():
    with pytest.raises(ValueError, match=r"design must be one of \('page_counter', "
                                         r"'legacy'\), got 'rfc'"):
        torture(1, design="rfc")


def test_an_unknown_aim_is_refused():
    with pytest.raises(ValueError, match=r"aim must be one of \('flight', 'op', "
                                         r"'alternate'\), got 'anywhere'"):
        torture(1, aim="anywhere")
