"""Which schedules to run: exhaustive with at most K preemptions, PCT, or one token.

A schedule is the process chosen at each step. Switching away from the process
that ran the last step while it could go on is a preemption; switching when it
blocked or ended is free.

Exhaustive (dfs): every schedule with at most `bound` preemptions (CHESS's
context bounding), each run from the snapshot (stateless), in rounds of 0, 1,
..., bound preemptions (iterative context bounding: the race that needs the
fewest preemptions comes first), depth-first within a round.

Pruning: a preemption is tried only before a step that is visible, i.e. that
may conflict with a step of another process: it reads a word another
process writes, or writes a word another process reads or writes. Before an
invisible step, switching is the same as switching right after it: the step
commutes with every step of the others, so both orders reach the same states
with the same number of preemptions, and only the later switch is tried.
Which words other processes touch is learnt from the schedules run
(Controller.readers, writers); a pass that learnt a new shared word is followed
by another, until a whole pass learns none: then every pruned preemption was
before a step that touches no word shared in any schedule of the last pass.

PCT (pct): Burckhardt et al.'s probabilistic concurrency testing. Each process
gets a random priority; the highest-priority enabled process runs; at d - 1
random steps the running process drops to a priority below all others. A bug of
depth d is found by one run with probability at least 1 / (n k^(d-1)).
"""
from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from .controller import Chooser, Controller, Process, Violation

Visit = Callable[[list[int], list[Violation], bytes], bool]   # False: stop


@dataclass
class _Node:
    step: int
    alts: list[tuple[int, int]]     # (process, cost) still to try


class _Follow:
    """A chooser: `prefix` first, then the current process while it can run (else
    the lowest index), recording the alternatives of each step past the prefix:
    switches that cost nothing or stay within `bound` preemptions in `nodes`,
    preemptions past `bound` (the next round's) as prefixes in `deferred`."""

    def __init__(self, prefix: list[int], bound: int) -> None:
        self.prefix, self.bound = prefix, bound
        self.i = self.used = 0
        self.nodes: list[_Node] = []
        self.deferred: list[list[int]] = []
        self.chosen: list[int] = []

    def __call__(self, ctl: Controller, ready: list[Process], cur: Process | None) -> Process:
        running = cur is not None and cur in ready
        if self.i < len(self.prefix):
            proc = _pick(ready, self.prefix[self.i])
        else:
            proc = cur if running and cur is not None else ready[0]
            if running and cur is not None:
                alts = ([(p.index, 1) for p in ready if p is not cur]
                        if ctl.visible(cur) else [])
                if self.used >= self.bound:
                    self.deferred += [[*self.chosen, q] for q, _ in alts]
                    alts = []
            else:
                alts = [(p.index, 0) for p in ready if p is not proc]
            if alts:
                self.nodes.append(_Node(self.i, alts))
        if running and proc is not cur:
            self.used += 1
        self.i += 1
        self.chosen.append(proc.index)
        return proc


def _pick(ready: list[Process], index: int) -> Process:
    for proc in ready:
        if proc.index == index:
            return proc
    raise ValueError(f"the schedule runs P{index} at a step where it cannot run "
                     f"(runnable: {', '.join(p.name for p in ready)}): the token does "
                     f"not belong to this scenario and design")


@dataclass
class Passes:
    """What dfs ran: schedules per pass (the last one learnt nothing new)."""

    schedules: list[int] = field(default_factory=list)
    complete: bool = True


def dfs(ctl: Controller, bound: int, visit: Visit, max_passes: int = 8) -> Passes:
    """Every schedule with at most `bound` preemptions, in rounds: round k runs the
    schedules with exactly k (CHESS's iterative context bounding: a race that
    needs fewer preemptions is found first), each round depth-first below the
    prefixes the previous one deferred. Passes until one learns no shared word."""
    passes = Passes()
    for _ in range(max_passes):
        ctl.grew = False
        count, queue = 0, [list[int]()]
        for k in range(bound + 1):
            deferred: list[list[int]] = []
            for start in queue:
                ran, stop = _subtree(ctl, start, k, visit, deferred)
                count += ran
                if stop:
                    passes.schedules.append(count)
                    passes.complete = False
                    return passes
            queue = deferred
        passes.schedules.append(count)
        if not ctl.grew:
            return passes
    passes.complete = False
    return passes


def _subtree(ctl: Controller, start: list[int], bound: int, visit: Visit,
             deferred: list[list[int]]) -> tuple[int, bool]:
    """Depth-first below `start`, at most `bound` preemptions; the preemptions past
    it are added to `deferred`. Returns (schedules run, visit said stop)."""
    count, prefix, stack = 0, start, list[_Node]()
    while True:
        chooser = _Follow(prefix, bound)
        chosen, violations, state = ctl.run(chooser)
        count += 1
        deferred += chooser.deferred
        if not visit(chosen, violations, state):
            return count, True
        stack += chooser.nodes
        while stack and not stack[-1].alts:
            stack.pop()
        if not stack:
            return count, False
        node = stack[-1]
        proc, _ = node.alts.pop(0)
        prefix = [*chosen[:node.step], proc]


class _Priorities:
    """PCT's chooser for one run."""

    def __init__(self, rng: random.Random, nprocs: int, depth: int, length: int) -> None:
        order = list(range(nprocs))
        rng.shuffle(order)
        self.prio = {p: depth + rank for rank, p in enumerate(order)}
        self.changes = {step: depth - 1 - k
                        for k, step in enumerate(sorted(rng.sample(range(max(length, depth)),
                                                                   depth - 1)))}
        self.i = 0

    def __call__(self, ctl: Controller, ready: list[Process], cur: Process | None) -> Process:
        if self.i in self.changes and cur is not None:
            self.prio[cur.index] = self.changes[self.i]
        self.i += 1
        return max(ready, key=lambda p: self.prio[p.index])


def pct(ctl: Controller, runs: int, visit: Visit, seed: int = 0, depth: int = 3) -> int:
    length, done = 0, 0
    for run in range(runs):
        rng = random.Random(f"{seed}:{run}")
        if not length:                          # the schedule's length, from one run
            chosen, violations, state = ctl.run(_Follow([], 0))
        else:
            chosen, violations, state = ctl.run(_Priorities(rng, len(ctl.procs), depth,
                                                            length))
        length = max(length, len(chosen))
        done += 1
        if not visit(chosen, violations, state):
            break
    return done


def replay(chosen: list[int]) -> Chooser:
    """The chooser that runs exactly `chosen` (a token's schedule)."""
    steps = iter(chosen)

    def choose(ctl: Controller, ready: list[Process], cur: Process | None) -> Process:
        index = next(steps, None)
        if index is None:
            raise ValueError("the schedule ends before the scenario does: the token does "
                             "not belong to this scenario and design")
        return _pick(ready, index)
    return choose

