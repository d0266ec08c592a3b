#!/usr/bin/env python3
"""Multi-process benchmark of the two slow events of the design, measured side by
side in one run:

  - drain_stock latency, p50 / p99 / max, while every CPU process charges and
    uncharges in a tight loop, for 2 and 4 CPUs (the goal is a p99 of 2 ms or less);
  - the time from a SIGKILL of a CPU process to its stocks being reclaimed
    (Machine.kill returns once the hotplug-dead path has run).

    python bench/hotplug_bench.py [--drains 300] [--kills 60] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from procs import Machine
from shmcounter import Arena


def charge_loop(arena: Arena, name: str, stop_at: float) -> int:
    """This runs in a CPU process: try_charge(1) then uncharge(1) until stop_at."""
    counter = arena.counter(name)
    spins = 0
    while time.monotonic() < stop_at:
        if counter.try_charge(1)[0]:
            counter.uncharge(1)
        spins += 1
    return spins


def charge_one(arena: Arena, name: str) -> None:
    arena.counter(name).try_charge(1)


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def drain_latency(ncpus: int, drains: int) -> dict[str, float]:
    with Arena.create(ncpus=ncpus, max_counters=4) as arena:
        leaf = arena.new_counter("leaf", parent=arena.new_counter("root"))
        leaf.enable_stock(64)
        with Machine(arena, start_method="fork") as m:
            stop_at = time.monotonic() + 3600
            loops = [m.submit(cpu, charge_loop, arena, "leaf", stop_at) for cpu in range(ncpus)]
            time.sleep(0.2)
            samples = []
            for _ in range(drains):
                t = time.perf_counter()
                leaf.drain_stock()
                samples.append((time.perf_counter() - t) * 1e3)
                time.sleep(0.002)
            for cpu in range(ncpus):                 # end the loops
                m.kill(cpu)
            del loops
    return {"cpus": ncpus, "drains": drains, "p50_ms": percentile(samples, 50),
            "p99_ms": percentile(samples, 99), "max_ms": max(samples)}


def kill_to_reclaim(ncpus: int, kills: int) -> dict[str, float]:
    with Arena.create(ncpus=ncpus, max_counters=4) as arena:
        leaf = arena.new_counter("leaf", parent=arena.new_counter("root"))
        leaf.enable_stock(64)
        with Machine(arena, start_method="fork") as m:
            samples = []
            for k in range(kills):
                cpu = k % ncpus
                m.run_on(cpu, charge_one, arena, "leaf")      # 63 pages in its stock
                t = time.perf_counter()
                reclaimed = m.kill(cpu)
                samples.append((time.perf_counter() - t) * 1e3)
                assert reclaimed == {"leaf": 63}, reclaimed
                m.start_cpu(cpu)
    return {"cpus": ncpus, "kills": kills, "p50_ms": percentile(samples, 50),
            "p99_ms": percentile(samples, 99), "mean_ms": statistics.mean(samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drains", type=int, default=300)
    parser.add_argument("--kills", type=int, default=60)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} cores; CPU k runs on core k mod {os.cpu_count()}")
    results = {"drain": [drain_latency(n, args.drains) for n in (2, 4)],
               "kill": [kill_to_reclaim(n, args.kills) for n in (2, 4)]}
    print("drain_stock while every CPU charges in a tight loop")
    print(f"  {'CPUs':>4}  {'p50 ms':>7}  {'p99 ms':>7}  {'max ms':>7}")
    for r in results["drain"]:
        print(f"  {r['cpus']:>4}  {r['p50_ms']:>7.2f}  {r['p99_ms']:>7.2f}  {r['max_ms']:>7.2f}")
    print("SIGKILL of a CPU to its stock reclaimed (Machine.kill)")
    print(f"  {'CPUs':>4}  {'p50 ms':>7}  {'p99 ms':>7}  {'mean ms':>7}")
    for r in results["kill"]:
        print(f"  {r['cpus']:>4}  {r['p50_ms']:>7.2f}  {r['p99_ms']:>7.2f}  {r['mean_ms']:>7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
