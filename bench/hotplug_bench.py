#!/usr/bin/env python3
"""Multi-process benchmark of the two slow events of the design, every design side
by side in one run (the designs of `shmcounter bench`, procs/lab/bench.py DESIGNS,
and the other Cgroups variants, v2 and rfc):

  - drain_all_stock latency, p50 / p99 / max, of a cgroup on which every CPU
    process charges and uncharges in a tight loop (the bench's churn: 128 page
    faults, then one uncharge), at each CPU count; the designs take turns in
    rounds, in an order rotated each round, so that the noise of a shared machine
    hits them alike. legacy's drain is asynchronous: timed until every CPU has
    served it (wait_flushed). v4's is the caller taking every CPU's word;
  - the time from a SIGKILL of a CPU process that holds stock to its stock being
    reclaimed (Machine.kill returns once the hotplug-dead path has run).

    python bench/hotplug_bench.py [--cpus 2,4,8,16] [--designs legacy,fixed,v4,v4-cap]
        [--rounds 10] [--drains 20] [--kills 20] [--fifo] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import numpy as np

from procs import Machine
from procs.lab import workload
from procs.lab.bench import DESIGNS
from shmcounter import Arena
from shmcounter.memcg import VARIANTS, Cgroups

CGROUP = "g"
STOP = "stop"                    # a plain counter: usage 1 ends the churn
PAGES = 128                      # page faults per churn iteration
WARMUP_S = 0.03                  # churn before the first drain of a round
DRAIN_GAP_S = 0.002              # between two drains: the CPUs refill their stocks


def churn(arena: Arena) -> int:
    """In a CPU process: iterations of PAGES faults on CGROUP, then one uncharge,
    until counter STOP holds a page. Returns the iterations done."""
    g, stop = Cgroups(arena).cgroup(CGROUP), arena.counter(STOP)
    faults = [g.try_charge] * PAGES
    done = 0
    while stop.usage == 0:
        for charge in faults:
            if not charge(1):
                raise RuntimeError("a charge was refused; the benchmark sets no limit")
        g.uncharge(PAGES)
        done += 1
    return done


class Bed:
    """One design's arena with ncpus CPUs, its tree with the cgroup CGROUP, and a
    Machine of ncpus CPU processes."""

    def __init__(self, design: str, ncpus: int, stack: ExitStack) -> None:
        options = DESIGNS.get(design, {"variant": design} if design in VARIANTS else None)
        if options is None:
            raise SystemExit(f"{design!r}: not a design of shmcounter bench with a stock, "
                             f"nor a Cgroups variant ({', '.join(VARIANTS)})")
        self.arena = stack.enter_context(Arena.create(ncpus=ncpus, max_counters=4))
        self.cg = Cgroups(self.arena, **options)
        self.g = self.cg.create(CGROUP)
        self.stop = self.arena.new_counter(STOP)
        self.machine = stack.enter_context(Machine(self.arena, start_method="fork"))

    def drains(self, n: int) -> list[float]:
        """n timed drain_all_stock(g) while every CPU churns on g, in ms."""
        m, cg = self.machine, self.cg
        loops = [m.submit(cpu, churn, self.arena) for cpu in sorted(m.online)]
        time.sleep(WARMUP_S)
        samples: list[float] = []
        try:
            while len(samples) < n:
                t = time.perf_counter()
                if cg.drain_all_stock(self.g):
                    cg.wait_flushed()
                    samples.append((time.perf_counter() - t) * 1e3)
                time.sleep(DRAIN_GAP_S)
        finally:
            self.stop.charge(1)
            for f in loops:
                f.result()
            self.stop.uncharge(1)
        return samples

    def kills(self, n: int) -> list[float]:
        """n times: a CPU charges a page (its stock then holds batch - 1), SIGKILL,
        timed until Machine.kill returns; the CPU is restarted, the page
        uncharged. In ms."""
        m, out = self.machine, []
        for k in range(n):
            cpu = k % self.arena.ncpus
            m.run_on(cpu, workload.hold_stock, self.arena, [CGROUP])
            t = time.perf_counter()
            m.kill(cpu)
            out.append((time.perf_counter() - t) * 1e3)
            m.start_cpu(cpu)
            self.g.uncharge(1)
        return out


@contextmanager
def requester_policy(fifo: bool) -> Iterator[None]:
    """With fifo, this process (the requester) runs SCHED_FIFO at priority 1 for
    the block, reset on fork (a CPU process restarted meanwhile stays normal):
    no normal process preempts a drain, so the time is the drain's own and
    that of the CPUs it waits for. The CPU processes stay SCHED_OTHER."""
    if not fifo:
        yield
        return
    os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(1))
    try:
        yield
    finally:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def percentiles(samples: list[float]) -> dict[str, float]:
    a = np.array(samples)
    return {"samples": len(samples), "p50_ms": float(np.percentile(a, 50)),
            "p99_ms": float(np.percentile(a, 99)), "max_ms": float(a.max())}


def run(cpus: list[int], designs: list[str], rounds: int, drains: int, kills: int,
        fifo: bool = False) -> dict[str, list[dict[str, object]]]:
    results: dict[str, list[dict[str, object]]] = {"drain": [], "kill": []}
    for ncpus in cpus:
        samples: dict[str, list[float]] = {d: [] for d in designs}
        with ExitStack() as stack:
            beds = {d: Bed(d, ncpus, stack) for d in designs}
            with requester_policy(fifo):
                for r in range(rounds):
                    k = r % len(designs)
                    for design in designs[k:] + designs[:k]:
                        samples[design].extend(beds[design].drains(drains))
            killed = {d: beds[d].kills(kills) for d in designs} if kills else {}
        for design in designs:
            results["drain"].append({"design": design, "cpus": ncpus,
                                     **percentiles(samples[design])})
            if killed:
                results["kill"].append({"design": design, "cpus": ncpus,
                                        **percentiles(killed[design]),
                                        "mean_ms": statistics.mean(killed[design])})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", default="2,4,8,16")
    parser.add_argument("--designs", default="fixed,v4,v4-cap")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--drains", type=int, default=20, help="per design per round")
    parser.add_argument("--kills", type=int, default=20, help="per design per CPU count")
    parser.add_argument("--fifo", action="store_true",
                        help="the requester runs SCHED_FIFO during the drains (the CPU "
                             "processes do not): preemption of the drain itself is out")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    cpus = [int(n) for n in args.cpus.split(",")]
    designs = args.designs.split(",")
    print(f"machine: {os.cpu_count()} cores; CPU k runs on core k mod {os.cpu_count()}; "
          f"load {os.getloadavg()[0]:.2f}")
    results = run(cpus, designs, args.rounds, args.drains, args.kills, args.fifo)
    print(f"drain_all_stock of a cgroup every CPU churns on ({args.rounds} rounds x "
          f"{args.drains} drains per design; requester "
          f"{'SCHED_FIFO' if args.fifo else 'SCHED_OTHER'})")
    print(f"  {'design':>8}  {'CPUs':>4}  {'p50 ms':>8}  {'p99 ms':>8}  {'max ms':>8}")
    for r in results["drain"]:
        print(f"  {r['design']:>8}  {r['cpus']:>4}  {r['p50_ms']:>8.3f}  {r['p99_ms']:>8.3f}"
              f"  {r['max_ms']:>8.3f}")
    if results["kill"]:
        print("SIGKILL of a CPU to its stock reclaimed (Machine.kill)")
        print(f"  {'design':>8}  {'CPUs':>4}  {'p50 ms':>8}  {'p99 ms':>8}  {'mean ms':>8}")
        for r in results["kill"]:
            print(f"  {r['design']:>8}  {r['cpus']:>4}  {r['p50_ms']:>8.2f}  "
                  f"{r['p99_ms']:>8.2f}  {r['mean_ms']:>8.2f}")
    print(f"load after: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
