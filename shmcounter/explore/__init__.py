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
from typing import Any

from .controller import Controller, Step, Violation
from .planted import register
from .report import Report, decode, encode, trace_lines
from .scenarios import SCENARIOS, Run, Scenario
from .strategies import dfs, pct, replay

__all__ = ["SCENARIOS", "Report", "Scenario", "explore", "scenarios"]


def scenarios() -> list[Scenario]:
    return list(SCENARIOS.values())


def _check(scenario: object, design: object) -> Scenario:
    if not isinstance(scenario, str) or scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}")
    s = SCENARIOS[scenario]
    if design not in s.designs:
        raise ValueError(f"scenario {scenario!r} runs under {', '.join(s.designs)}, "
                         f"not {design!r}")
    return s


def explore(scenario: str, design: str, *, bound: int | None = None, pct_runs: int | None = None,
            replay_token: str | None = None, seed: int = 0,
            stop_at_first: bool = False, prune: bool = True) -> Report:
    """Explore `scenario` under `design`: exhaustively with at most `bound`
    preemptions (default 2), or `pct_runs` PCT schedules, or the one schedule of
    `replay_token`. Returns the Report (violations, first trace, token).
    prune=False tries a preemption before every step, not only before visible
    ones (strategies.py): to check the pruning, at a much higher cost."""
    s = _check(scenario, design)
    chosen_token: list[int] | None = None
    if sum(x is not None for x in (bound, pct_runs, replay_token)) > 1:
        raise ValueError("give one of bound, pct_runs, replay_token")
    if replay_token is not None:
        t_scenario, t_design, chosen_token = decode(replay_token)
        if (t_scenario, t_design) != (scenario, design):
            raise ValueError(f"the token is for {t_scenario} under {t_design}, "
                             f"not {scenario} under {design}")
    for name, value in (("bound", bound), ("pct_runs", pct_runs)):
        if value is not None and (type(value) is not int or not 0 <= value <= 1_000_000):
            raise ValueError(f"{name} must be an int in [0, 10**6], got {value!r}")
    if bound is None and pct_runs is None and replay_token is None:
        bound = 2
    strategy = ("replay" if chosen_token is not None
                else f"PCT {pct_runs} runs (seed {seed})" if pct_runs is not None
                else f"exhaustive, <= {bound} preemptions")
    report = Report(scenario, design, strategy)
    with register(design):
        run = Run(s, design)
        try:
            ctl = Controller(run)
            ctl.prune = prune
            try:
                _explore(ctl, report, bound, pct_runs, chosen_token, seed, stop_at_first)
            finally:
                ctl.close()
        finally:
            run.close()
    return report


def _explore(ctl: Controller, report: Report, bound: int | None, pct_runs: int | None,
             chosen_token: list[int] | None, seed: int, stop_at_first: bool) -> None:
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
                key = f"{v.invariant}: {v.detail}" if v.detail.split(" ", 1)[0] != v.invariant \
                    else v.detail
                report.violations[key] = report.violations.get(key, 0) + 1
            if first is None:
                first = chosen
                report.first_seconds = time.perf_counter() - start
                return not stop_at_first
        return True

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
        report.passes, report.complete = passes.schedules, passes.complete
        if stop_at_first and first is not None:
            report.complete = False
    report.seconds = time.perf_counter() - start
    report.states = len(states)
    report.timing = dict(ctl.timing)
    report.steps = ctl.steps
    if first is not None:
        steps: list[Step] = []
        ctl.run(replay(first), steps)
        report.token = encode(report.scenario, report.design, first)
        report.trace = trace_lines(ctl, steps)


def as_json(report: Report) -> dict[str, Any]:
    return report.as_dict()
