"""Hotplug torture in the suite: random SIGKILLs of CPU processes running random
charge, uncharge and drain loops over a limited 3-level tree with a shadow ledger;
every invariant is checked after every kill (procs/torture.py). The long version is
scripts/hotplug_torture.py."""
from __future__ import annotations

import pytest

from procs.torture import torture


@pytest.mark.parametrize("method, kills", [("fork", 600), ("forkserver", 100)])
def test_hotplug_torture(method, kills):
    report = torture(kills, seed=kills, start_method=method)
    assert report.kills == kills
    assert report.checks == kills + 1                # after every kill, and at the end
    assert report.ops > 50 * kills                   # the CPUs really worked between kills
    # some kills landed inside an operation, and it counted wholly or not at all
    assert report.in_flight["rolled back"] + report.in_flight["counted wholly"] > 0
