"""What an exploration reports: counts, violations, the first violating schedule as
a readable trace, and its replay token.

A token is `scenario:design:schedule`, the schedule run-length encoded: the
process of each step, `1*5` for five steps of P1, steps separated by dots, e.g.
`disable-hit:v2:0*3.1*40.0*2`. Replaying it runs exactly those steps.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from . import points
from .controller import Controller, Step

_TOKEN = re.compile(r"^([a-z0-9-]+):([a-z0-9-]+):((?:\d+\*\d+)(?:\.\d+\*\d+)*)?$")


def encode(scenario: str, design: str, chosen: list[int]) -> str:
    runs: list[list[int]] = []
    for proc in chosen:
        if runs and runs[-1][0] == proc:
            runs[-1][1] += 1
        else:
            runs.append([proc, 1])
    return f"{scenario}:{design}:" + ".".join(f"{p}*{n}" for p, n in runs)


def decode(token: str) -> tuple[str, str, list[int]]:
    """(scenario, design, schedule); ValueError for anything else."""
    m = _TOKEN.match(token) if isinstance(token, str) else None
    if m is None:
        raise ValueError(f"not a replay token: {token!r} (expected scenario:design:P*N.P*N...)")
    chosen: list[int] = []
    for run in (m.group(3) or "").split(".") if m.group(3) else []:
        proc, n = run.split("*")
        if int(n) == 0 or int(n) > 1_000_000:
            raise ValueError(f"not a replay token: {token!r} (a run of {n} steps)")
        chosen += [int(proc)] * int(n)
    return m.group(1), m.group(2), chosen


_ATOMICS = ("load", "store", "fetch_add", "exchange", "cas", "futex_wait")


def trace_lines(ctl: Controller, steps: list[Step]) -> list[str]:
    """One line a step: process, point, words read (value) and written (old -> new).
    The writer's own bookkeeping (its row's intent record, its contrib words) is
    left out of the words shown."""
    arena, lines = ctl.arena, []

    def shown(w: int) -> str | None:
        name = points.word_name(arena, w)
        return None if name.startswith(("row", "contrib")) else name

    for k, s in enumerate(steps):
        name = points.STEPS[s.code]
        what = points.word_name(arena, s.args[0]) if s.args else ""
        if name in _ATOMICS:
            args = ", ".join([what] + [str(a) for a in s.args[1:]])
        else:
            args = what.rsplit(".", 1)[0]
        read = [f"{n}={v}" for w, v in s.read.items() if w not in s.wrote and (n := shown(w))]
        wrote = [f"{n}: {a} -> {b}" for w, (a, b) in s.wrote.items() if (n := shown(w))]
        lines.append(f"{k:4d} {ctl.procs[s.proc].name:10s} {name}({args})"
                     + (f"  read {' '.join(read)}" if read else "")
                     + (f"  wrote {', '.join(wrote)}" if wrote else ""))
    return lines


@dataclass
class Report:
    scenario: str
    design: str
    strategy: str
    schedules: int = 0
    states: int = 0
    seconds: float = 0.0
    passes: list[int] = field(default_factory=list)
    complete: bool = True
    violations: dict[str, int] = field(default_factory=dict)    # "invariant: detail": count
    violating: int = 0                                          # schedules with one
    first_seconds: float | None = None
    token: str | None = None
    trace: list[str] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)      # seconds, by part
    steps: int = 0                                              # steps run in all

    @property
    def found(self) -> bool:
        return bool(self.violations)

    def as_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in (
            "scenario", "design", "strategy", "schedules", "states", "seconds", "passes",
            "complete", "violations", "violating", "first_seconds", "token", "trace",
            "timing", "steps")}

    def text(self) -> str:
        rate = self.schedules / self.seconds if self.seconds else 0.0
        passes = f"passes {'+'.join(map(str, self.passes))}, " if len(self.passes) > 1 else ""
        out = [f"{self.scenario} under {self.design}, {self.strategy}: "
               f"{self.schedules} schedules ({passes}"
               f"{'complete' if self.complete else 'stopped early'}), "
               f"{self.states} distinct final states, {self.seconds:.2f} s ({rate:.0f}/s)"]
        if not self.violations:
            out.append("no violation")
            return "\n".join(out)
        out.append(f"{self.violating} schedules violate (first after {self.first_seconds:.2f} s):")
        for what, n in sorted(self.violations.items()):
            out.append(f"  {n:6d} x {what}")
        out.append("first violating schedule:")
        out += ["  " + line for line in self.trace]
        out.append(f"replay: shmcounter explore {self.scenario} --design {self.design} "
                   f"--replay {self.token}")
        return "\n".join(out)
