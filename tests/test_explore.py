"""shmcounter explore: the built-in scenarios over real processes, under a controller.

Each scenario runs with a small preemption bound and the exact violations are
asserted: E5 under v2 (disable_stock's lock-free drain resurrects a stock hit's
read), E4 under rfc (disable cancels stock it leaves in place), the planted
deposit without its lock, free_stock ignoring its precondition; none under fixed,
v4 and legacy. One stored replay token per race runs exactly its schedule again
and must give exactly its violation: a regression test for each race."""
from __future__ import annotations

import json
import os

import pytest

from shmcounter._atomic import Slots
from shmcounter.cli import main
from shmcounter.drain import drain_lock
from shmcounter.explore import SCENARIOS, Scenario, explore
from shmcounter.explore.points import LOCAL, STEPS, footprint
from shmcounter.explore.scenarios import Context, Proc, drainer_busy

pytestmark = pytest.mark.timeout(120)

E5_V2 = {"I1 broken at 'g': usage 0 != real 1 + stock 62": 1,
         "I1 broken at 'root': usage 0 != real 1 + stock 62": 1}


def _no_processes_left() -> None:
    import multiprocessing
    assert multiprocessing.active_children() == []


def test_e5_is_found_under_v2_with_one_preemption_and_its_token_reproduces_it():
    report = explore("disable-hit", "v2", bound=1)
    assert (report.schedules, report.violating, report.violations) == (24, 1, E5_V2)
    assert report.complete
    # the trace: the hit read 63 and holds the slot lock, the lock-free drain took
    # the 63 and uncharged them, then the hit wrote back 63 - 1
    assert report.token == "disable-hit:v2:0*5.1*15.0*10"
    assert "P0(cpu0)   load(stock[0][g].nr)  read stock[0][g].nr=63" in report.trace[4]
    assert "exchange(stock[0][g].nr, 0)  wrote stock[0][g].nr: 63 -> 0" in report.trace[12]
    assert report.trace[20].endswith("store(stock[0][g].nr, 62)  wrote stock[0][g].nr: 0 -> 62")
    again = explore("disable-hit", "v2", replay_token=report.token)
    assert (again.schedules, again.violations) == (1, E5_V2)
    _no_processes_left()


def test_e5_needs_a_preemption_and_does_not_happen_under_fixed_or_v4():
    assert explore("disable-hit", "v2", bound=0).violations == {}
    fixed = explore("disable-hit", "fixed", bound=2)
    assert (fixed.violations, fixed.complete, fixed.schedules) == ({}, True, 10)
    v4 = explore("disable-hit", "v4", bound=2)
    assert (v4.violations, v4.complete) == ({}, True)


def test_e4_is_found_under_rfc_without_a_preemption():
    """css offline while another drain_all_stock holds the single-drainer lock:
    the RFC's disable cancels the stock's pages and leaves them in the stock."""
    report = explore("offline-drain", "rfc", bound=0)
    assert report.violating == 14
    assert set(report.violations) == {
        "I1 broken at 'g': usage 1 != real 2 + stock 62",
        "I1 broken at 'root': usage 1 != real 2 + stock 62",
        "I1 broken at 'g': usage 2 != real 2 + stock 62",
        "I1 broken at 'root': usage 2 != real 2 + stock 62",
        "I1 broken at 'g': usage 2 != real 2 + stock 63",
        "I1 broken at 'root': usage 2 != real 2 + stock 63"}
    assert report.token == "offline-drain:rfc:0*7.1*22.0*15.2*14.1*3"
    # the trace: P2's drain_all_stock lost the trylock to P1's, and its disable
    # cancelled the 62 pages of CPU 0's stock without taking them
    assert "P2(plain)  cas(drain_lock, 0, " in report.trace[45]
    assert report.trace[52].endswith("wrote g.usage: 64 -> 2")


def test_disable_under_rfc_leaves_stale_stock_and_the_next_uncharge_underflows():
    """E4's other face: the RFC's disable cancels the stock's 63 pages without
    taking them; a stock-returning uncharge, with batch 0, then flushes the stale
    stock: an uncharge below 0, seen at the step that makes it."""
    report = explore("disable-hit", "rfc", bound=1)
    assert (report.schedules, report.violating) == (17, 17)
    assert report.violations == {
        "I1 broken at 'g': usage 1 != real 1 + stock 63": 8,
        "I1 broken at 'root': usage 1 != real 1 + stock 63": 8,
        "I1 broken at 'g': usage 0 != real 1 + stock 0": 9,
        "I1 broken at 'root': usage 0 != real 1 + stock 0": 9,
        "underflow: an uncharge went below 0 (arena.underflows = 1)": 9,
        "underflow: an uncharge went below 0 (arena.underflows = 2)": 9,
        "I2 broken: arena.underflows is 2, expected 0": 9}


@pytest.mark.parametrize("design", ["fixed", "v2", "v4"])
def test_offline_racing_drain_all_without_preemption_breaks_nothing_but_rfc(design):
    assert explore("offline-drain", design, bound=0).violations == {}


# the stored tokens: one schedule per race, and what it breaks
TOKENS = {
    "disable-hit:v2:0*5.1*15.0*10": E5_V2,
    "offline-drain:rfc:0*7.1*22.0*15.2*14.1*3": {
        "I1 broken at 'g': usage 2 != real 2 + stock 62": 1,
        "I1 broken at 'root': usage 2 != real 2 + stock 62": 1},
    "free-charge:fixed:0*5.1*16.0*2": {
        "I1 broken at 'g': usage 1 != real 2 + stock 0": 1,
        "I1 broken at 'root': usage 1 != real 2 + stock 0": 1},
    "planted:planted:0*13.1*20.0*2": {
        "I1 broken at 'g': usage 127 != real 65 + stock 63": 1,
        "I1 broken at 'root': usage 127 != real 65 + stock 63": 1},
}


@pytest.mark.parametrize("token", sorted(TOKENS))
def test_a_stored_token_replays_its_race_exactly(token):
    scenario, design, _ = token.split(":")
    report = explore(scenario, design, replay_token=token)
    assert (report.schedules, report.violations, report.token) == (1, TOKENS[token], token)


def test_the_planted_deposit_without_its_lock_is_caught_and_the_locked_one_is_not():
    """The planted design's deposit reads the slot and writes it back without the
    slot lock; a remote drain takes the slot in between: its pages, uncharged,
    come back in the stock (counted twice)."""
    report = explore("planted", "planted", bound=1)
    assert report.violations == TOKENS["planted:planted:0*13.1*20.0*2"]
    assert report.token == "planted:planted:0*13.1*20.0*2"
    assert explore("planted", "planted-fixed", bound=2).violations == {}


def test_free_stock_while_the_counter_still_charges_loses_pages():
    """fixed's free_stock drains without the slot lock: its precondition is that
    nobody charges any more. Ignored, a stock hit's write-back lands after the
    drain: the hit's page is lost from the books (usage 1, real 2)."""
    for design in ("fixed", "v2"):
        assert explore("free-charge", design, bound=1).violations == \
            TOKENS["free-charge:fixed:0*5.1*16.0*2"]
    assert explore("free-charge", "v4", bound=2).violations == {}     # one CAS each


@pytest.mark.parametrize("scenario, design", [
    (s.name, design) for s in SCENARIOS.values() for design in s.designs])
def test_every_built_in_scenario_finds_exactly_what_it_expects(scenario, design):
    """Bound 1 (offline-drain under fixed, three processes: bound 0); stopped at
    the first violating schedule."""
    bound = 0 if (scenario, design) == ("offline-drain", "fixed") else 1
    report = explore(scenario, design, bound=bound, stop_at_first=True)
    assert report.found is SCENARIOS[scenario].expect[design]
    assert report.complete is not report.found and report.schedules >= 1


def test_every_step_on_shared_memory_is_a_point():
    """Every public method of Slots is a point, unless it touches only this
    process's own state; one without a listed footprint claims every word."""
    public = {n for n in dir(Slots) if not n.startswith("_")}
    assert public - LOCAL <= set(STEPS)
    assert footprint(None, STEPS.index("op_abort"), (), None) == ((-1,), (-1,))  # type: ignore[arg-type]


def test_every_scenario_says_what_it_expects_under_each_design():
    for s in SCENARIOS.values():
        assert set(s.expect) == set(s.designs), s.name


def test_pct_finds_e5_and_its_token_replays():
    report = explore("disable-hit", "v2", pct_runs=200, seed=1)
    assert report.schedules == 200 and report.violations
    assert set(report.violations) == set(E5_V2)
    assert explore("disable-hit", "v2", replay_token=report.token).violations == E5_V2


@pytest.mark.parametrize("args, message", [
    (("nope", "v2"), "unknown scenario 'nope'"),
    (("v4-drain", "fixed"), "runs under v4, not 'fixed'"),
])
def test_bad_scenario_or_design_is_our_error(args, message):
    with pytest.raises(ValueError, match=message):
        explore(*args)


@pytest.mark.parametrize("token, message", [
    ("garbage", "not a replay token"),
    ("disable-hit:fixed:0*5", "the token is for disable-hit under fixed"),
    ("disable-hit:v2:0*5.1*15.1*2", "P1 at a step where it cannot run"),
    ("disable-hit:v2:0*3", "ends before the scenario does"),
])
def test_a_token_that_does_not_fit_is_our_error_and_leaves_nothing(token, message):
    with pytest.raises(ValueError, match=message):
        explore("disable-hit", "v2", replay_token=token)
    _no_processes_left()
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"shmcounter_{os.getpid()}_")]


def test_cli(capsys):
    assert main(["explore", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in SCENARIOS)
    assert main(["explore", "disable-hit", "--design", "v2", "--replay",
                 "disable-hit:v2:0*5.1*15.0*10"]) == 1
    out = capsys.readouterr().out
    assert "1 x I1 broken at 'g': usage 0 != real 1 + stock 62" in out
    assert "replay: shmcounter explore disable-hit --design v2 --replay " \
           "disable-hit:v2:0*5.1*15.0*10" in out
    assert main(["explore", "disable-hit", "--design", "fixed", "--bound", "1"]) == 0
    assert "no violation" in capsys.readouterr().out
    assert main(["explore", "disable-hit", "--design", "rfc", "--first", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert (out["schedules"], out["violating"], out["complete"]) == (1, 1, False)
    assert out["token"] == "disable-hit:rfc:0*15.1*14"
    assert main(["explore", "nope", "--design", "v2"]) == 2
    assert "unknown scenario" in capsys.readouterr().err


# ---- scenarios of one's own: a script that raises, a wait that never ends ------------------

def _raises(ctx: Context) -> dict[str, int]:
    raise RuntimeError("no such page")


def _waits_for_the_drain_lock(ctx: Context) -> dict[str, int]:
    with drain_lock(ctx.arena):
        return {}


def test_a_script_that_raises_is_a_violation_with_its_error():
    s = Scenario("raises", "a script that raises", (Proc(None, _raises),), ("fixed",))
    report = explore(s, "fixed", bound=1)
    assert report.violations == {"error: P0(plain) raised RuntimeError: no such page": 1}
    assert (report.schedules, report.complete) == (1, True)


def test_a_wait_for_a_lock_nobody_lets_go_is_a_livelock_and_exploring_stops():
    """The drain lock is held by a live process that never lets go (the
    controller): the waiter spins, attempt after attempt, while nobody else can
    run; after 4000 steps the schedule is a livelock, and the waiter is left
    parked: exploring stops there."""
    s = Scenario("stuck", "a wait that never ends", (Proc(None, _waits_for_the_drain_lock),),
                 ("fixed",), prepare=drainer_busy)
    report = explore(s, "fixed", bound=2)
    assert (report.schedules, report.complete) == (1, False)
    assert report.violations == {"progress: no end after 4000 steps (a livelock)": 1,
                                 "deadlock: P0(plain) waits forever at sleep()": 1}
    # is it ours (an outer frame)? no: take it (a CAS); a live holder: pause; again
    assert report.trace[0].startswith("   0 P0(plain)  load(drain_lock)")
    assert report.trace[1].startswith("   1 P0(plain)  cas(drain_lock, 0, ")
    assert report.trace[2] == "   2 P0(plain)  sleep()"
    assert report.trace[3].startswith("   3 P0(plain)  cas(drain_lock, 0, ")
    assert len(report.trace) == 4000
    _no_processes_left()
