"""shmcounter explore: systematic schedule exploration over real processes.

    explore("disable-hit", "v2", bound=2)      # every schedule, <= 2 preemptions
    explore("offline-drain", "rfc", pct=500)   # 500 PCT schedules
    explore("disable-hit", "v2", replay=token) # exactly one schedule again

The scenario's processes (real CPU processes, and a plain attached process where
it needs one) stop before every step they take on the arena's words (points.py)
and run one at a time as the controller says (controller.py); the strategies
decide which schedules (strategies.py); after each schedule the invariants are
checked at quiescence against the scenario's ledger, and the per-step properties
after every step that wrote a word (scenarios.py, controller.py).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from .controller import Controller, Step, Violation
from .planted import register
from .report import Report, decode, encode, trace_lines
from .scenarios import SCENARIOS, Run, Scenario
from .strategies import dfs, pct, replay

__all__ = ["SCENARIOS", "Report", "Scenario", "explore", "scenarios"]


def scenarios() -> list[Scenario]:
    return list(SCENARIOS.values())


def _check(scenario: object, design: object) -> Scenario:
    if isinstance(scenario, Scenario):
        s = scenario
    elif isinstance(scenario, str) and scenario in SCENARIOS:
        s = SCENARIOS[scenario]
    else:
        raise ValueError(f"unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}")
    if design not in s.designs:
        raise ValueError(f"scenario {s.name!r} runs under {', '.join(s.designs)}, "
                         f"not {design!r}")
    return s


def explore(scenario: str | Scenario, design: str, *, bound: int | None = None,
            pct_runs: int | None = None, replay_token: str | None = None, seed: int = 0,
            stop_at_first: bool = False, prune: bool = True) -> Report:
    """Explore `scenario` (a built-in's name, or a Scenario of one's own) under
    `design`: exhaustively with at most `bound` preemptions (default 2), or
    `pct_runs` PCT schedules, or the one schedule of `replay_token`. Returns the
    Report (violations, first trace, token). Exploring stops early at a schedule
    that leaves a process stuck (deadlock, livelock): its processes cannot start
    another. prune=False tries a preemption before every step, not only before
    visible ones (strategies.py): to check the pruning, at a much higher cost."""
    s = _check(scenario, design)
    chosen_token: list[int] | None = None
    if sum(x is not None for x in (bound, pct_runs, replay_token)) > 1:
        raise ValueError("give one of bound, pct_runs, replay_token")
    if replay_token is not None:
        t_scenario, t_design, chosen_token = decode(replay_token)
        if (t_scenario, t_design) != (s.name, design):
            raise ValueError(f"the token is for {t_scenario} under {t_design}, "
                             f"not {s.name} under {design}")
    for name, value in (("bound", bound), ("pct_runs", pct_runs)):
        if value is not None and (type(value) is not int or not 0 <= value <= 1_000_000):
            raise ValueError(f"{name} must be an int in [0, 10**6], got {value!r}")
    if bound is None and pct_runs is None and replay_token is None:
        bound = 2
    strategy = ("replay" if chosen_token is not None
                else f"PCT {pct_runs} runs (seed {seed})" if pct_runs is not None
                else f"exhaustive, <= {bound} preemptions")
    report = Report(s.name, design, strategy)
    with register(design):
        first = _controlled(s, design, prune, lambda ctl: _explore(
            ctl, report, bound, pct_runs, chosen_token, seed, stop_at_first))
        if first is not None:               # the trace, by a replay on fresh processes
            schedule = first

            def traced(ctl: Controller) -> list[str]:
                steps: list[Step] = []
                ctl.run(replay(schedule), steps)
                return trace_lines(ctl, steps)
            report.trace = _controlled(s, design, prune, traced)
            report.token = encode(s.name, design, first)
    return report


T = TypeVar("T")


def _controlled(s: Scenario, design: str, prune: bool, body: Callable[[Controller], T]) -> T:
    """body(controller) over a fresh arena and fresh processes, always closed."""
    run = Run(s, design)
    try:
        ctl = Controller(run)
        ctl.prune = prune
        try:
            return body(ctl)
        finally:
            ctl.close()
    finally:
        run.close()


def _explore(ctl: Controller, report: Report, bound: int | None, pct_runs: int | None,
             chosen_token: list[int] | None, seed: int,
             stop_at_first: bool) -> list[int] | None:
    """Run the strategy; fill the report; return the first violating schedule."""
    states: set[bytes] = set()
    first: list[int] | None = None
    start = time.perf_counter()

    def visit(chosen: list[int], violations: list[Violation], state: bytes) -> bool:
        nonlocal first
        report.schedules += 1
        states.add(state)
        if violations:
            report.violating += 1
            for v in violations:
                report.violations[v.key] = report.violations.get(v.key, 0) + 1
            if first is None:
                first = chosen
                report.first_seconds = time.perf_counter() - start
                if stop_at_first:
                    report.complete = False
        return report.complete and not ctl.stuck

    if chosen_token is not None:
        chosen, violations, state = ctl.run(replay(chosen_token))
        if chosen != chosen_token:
            raise ValueError("the scenario ended before the token's schedule did: the "
                             "token does not belong to this scenario and design")
        visit(chosen, violations, state)
    elif pct_runs is not None:
        pct(ctl, pct_runs, visit, seed)
    else:
        assert bound is not None
        passes = dfs(ctl, bound, visit)
        report.passes = passes.schedules
        report.complete = report.complete and passes.complete
    report.complete = report.complete and not ctl.stuck
    report.seconds = time.perf_counter() - start
    report.states = len(states)
    report.timing = dict(ctl.timing)
    report.steps = ctl.steps
    return first
