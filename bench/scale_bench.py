#!/usr/bin/env python3
"""Does a drain of one subtree, and a refused charge, cost the same whatever the
size of the rest of the cgroup tree? Measured side by side in one run, per design:

  - a tree with only the cgroups measured (root, job > leaf, full);
  - the same tree plus N unrelated cgroups under root (default 1024), each
    charged one page on every CPU first, so that each holds stock there.

Both trees run at once, each in its own arena with its own procs.Machine of
--cpus CPU processes (drains need live CPUs to answer), and their samples
alternate, so that the machine's noise hits them alike. Timed from the main
process, which is not a CPU:

  drain    Cgroups.drain_all_stock(leaf), after each CPU charged one page to leaf
           (so each holds 63 pages of it in stock). The per-counter designs'
           drain returns once every CPU has drained; legacy's is asynchronous
           (it flags the CPUs and returns): its wait_flushed is not timed.
  refused  full.try_charge(1) on a cgroup at its max (8 of 8 pages): the whole
           refusal path of try_charge_memcg (memory.events, the repair check,
           drain_all_stock(full), the retry), returning False.

    python bench/scale_bench.py [--unrelated 1024] [--samples 200] [--cpus 2]
                                [--designs fixed,v2,rfc,legacy] [--json out.json]
                                [--profile DESIGN]

Prints per design and measurement the median and minimum in us for each tree and
the ratio of the medians (N unrelated / none); the goal is at most 1.5x.
--profile DESIGN runs cProfile over the drains and refusals of the large tree
of that design in this process (the CPU processes' side is not profiled).
"""
from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

from procs import Machine
from shmcounter import Arena
from shmcounter.invariants import check_invariants
from shmcounter.memcg import Cgroups

DESIGNS = ("fixed", "v2", "rfc", "legacy")
FULL_MAX = 8


def charge_each(arena: Arena, names: list[str], keep: bool) -> None:
    """This runs in a CPU process: charge one page to each cgroup of `names`, so
    that this CPU holds stock of it, and uncharge the page again unless `keep`."""
    tree = Cgroups(arena)
    for name in names:
        g = tree.cgroup(name)
        assert g.try_charge(1)
        if not keep:
            g.uncharge(1)


class Tree:
    """One arena with the measured cgroups, `unrelated` others, and its Machine."""

    def __init__(self, stack: ExitStack, design: str, unrelated: int, ncpus: int) -> None:
        self.arena = stack.enter_context(Arena.create(ncpus=ncpus, max_counters=unrelated + 8))
        self.tree = Cgroups(self.arena, variant=design)
        self.others = [f"u{i}" for i in range(unrelated)]
        for name in self.others:
            self.tree.create(name)
        job = self.tree.create("job")
        self.leaf = self.tree.create("leaf", parent=job)
        self.full = self.tree.create("full", max=FULL_MAX)
        assert self.full.try_charge(FULL_MAX)
        self.machine = stack.enter_context(Machine(self.arena, ncpus, start_method="fork"))
        self.ncpus = ncpus
        for cpu in range(ncpus):
            self.machine.run_on(cpu, charge_each, self.arena, self.others, True)

    def prime_leaf(self) -> None:
        for cpu in range(self.ncpus):
            self.machine.run_on(cpu, charge_each, self.arena, ["leaf"], False)

    def drain(self) -> int:
        self.prime_leaf()
        t = time.perf_counter_ns()
        assert self.tree.drain_all_stock(self.leaf)
        elapsed = time.perf_counter_ns() - t
        self.tree.wait_flushed()                   # legacy: the CPUs drain after
        return elapsed

    def refused(self) -> int:
        t = time.perf_counter_ns()
        ok = self.full.try_charge(1)
        elapsed = time.perf_counter_ns() - t
        assert not ok
        return elapsed

    def finish(self) -> None:
        """Return every page and check the arena is empty and consistent."""
        self.machine.close()                       # hotplug reclaims the stocks
        self.full.uncharge(FULL_MAX)
        for name in self.others:
            self.tree.cgroup(name).uncharge(self.ncpus)
        for g in self.tree.cgroups():
            assert g.memory.usage == 0, (g.name, g.memory.usage)
        check_invariants(self.arena)


def measure(design: str, unrelated: int, samples: int, ncpus: int,
            profile: bool) -> dict[str, Any]:
    with ExitStack() as stack:
        small = Tree(stack, design, 0, ncpus)
        large = Tree(stack, design, unrelated, ncpus)
        out: dict[str, Any] = {"design": design, "unrelated": unrelated}
        for what in ("drain", "refused"):
            times: dict[str, list[int]] = {"none": [], "large": []}
            profiler = cProfile.Profile() if profile else None
            for k in range(samples + 10):                  # 10 warm-up rounds
                for key, t in (("none", small), ("large", large))[::1 if k % 2 else -1]:
                    fn: Callable[[], int] = getattr(t, what)
                    if profiler is not None and key == "large":
                        profiler.enable()
                        ns = fn()
                        profiler.disable()
                    else:
                        ns = fn()
                    if k >= 10:
                        times[key].append(ns)
            none, large_ = (statistics.median(times[k]) / 1e3 for k in ("none", "large"))
            out[what] = {"none_us": none, "none_min_us": min(times["none"]) / 1e3,
                         "large_us": large_, "large_min_us": min(times["large"]) / 1e3,
                         "ratio": large_ / none}
            if profiler is not None:
                print(f"---- profile: {design}, {what}, {unrelated} unrelated ----")
                pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
        small.finish()
        large.finish()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--unrelated", type=int, default=1024)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--cpus", type=int, default=2)
    ap.add_argument("--designs", default=",".join(DESIGNS))
    ap.add_argument("--json")
    ap.add_argument("--profile", choices=DESIGNS)
    args = ap.parse_args()
    rows = [measure(d, args.unrelated, args.samples, args.cpus, d == args.profile)
            for d in args.designs.split(",")]
    n = args.unrelated
    print(f"| design | what | none: median (min) us | {n} unrelated: median (min) us | ratio |")
    print("|---|---|---|---|---|")
    for row in rows:
        for what in ("drain", "refused"):
            r = row[what]
            print(f"| {row['design']} | {what} | {r['none_us']:.1f} ({r['none_min_us']:.1f}) | "
                  f"{r['large_us']:.1f} ({r['large_min_us']:.1f}) | {r['ratio']:.2f}x |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
