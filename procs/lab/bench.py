"""shmcounter bench: the series' benchmark (docs/stock-design.md §Published numbers) on
real processes, every design side by side in one run.

    for trial in 1..T:
        for cpus in (1, 2):                  a cell: every CPU of the design's Machine
            ceiling: a pure-Python loop      runs the workload (workload.py) from one
            for cgroups in (1, 4, 32):       start time; the designs take turns, in
                for design in rotated:       an order rotated each trial, so that the
                    cell                     noise of a shared machine hits them alike
        for design in rotated:
            drains: drain_all_stock(root) while every CPU churns on the most cgroups
            kills:  SIGKILL a CPU that holds stock, until Machine.kill returns

Designs: "legacy" (the old 7-slot memcg_stock_pcp), "fixed" (per-counter stock,
the series with the U0/v4 order), "no-stock" (fixed with batch 0: every charge
walks), "mp-value" (the peer: one multiprocessing.Value with its lock per
cgroup, no hierarchy; procs/lab/peer.py), "v4" (the series' v4: the lockless
stock, drained remotely by the caller, no message) and "v4-cap" (v4 with the E14
cap, stock_cap=True). Each design has its own arena and Machine
of max(cpus) CPU processes, all alive for the whole run; a 1-CPU cell uses CPU 0.

Measured per cell and trial: wall time (first start to last end over the CPUs),
hierarchy walks and legacy evictions (Cgroups.stats deltas). Per design: drain
latency and kill-to-reclaimed time. Per trial and CPU count, the machine's own
ceiling: a pure-Python loop that shares nothing, on the same CPU processes (when
other work runs, or two cores share one, 2 CPUs cannot give 2x, whatever the
design). After the run every arena must be empty and pass check_invariants, and
every peer must read 0: a benchmark that lost a page fails instead of printing
numbers.
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from procs import Machine
from shmcounter import Arena
from shmcounter.invariants import check_invariants
from shmcounter.memcg import Cgroups

from . import workload
from .peer import value_peer

# Cgroups options of each design; None: the mp.Value peer.
DESIGNS: dict[str, dict[str, Any] | None] = {
    "legacy": {"variant": "legacy"},
    "fixed": {"variant": "fixed"},
    "no-stock": {"variant": "fixed", "batch": 0},
    "mp-value": None,
    "v4": {"variant": "v4"},
    "v4-cap": {"variant": "v4", "stock_cap": True},
}
BASELINE = "legacy"
# How far ahead of now a cell's start time is set: long enough for every CPU to
# get its task (a pipe write each) and wake up; the CPUs sleep until then.
START_MARGIN_S = 0.02
# Pause between two timed drains, so that the CPUs refill their stocks.
DRAIN_GAP_S = 0.002
# Churn before the first drain of a burst, and the time allowed per drain.
CHURN_WARMUP_S = 0.03
CHURN_PER_DRAIN_S = 0.015
# Loop steps of the ceiling's pure-Python loop per page of `work`: about as long
# as a cell of fixed at 1 cgroup (a stock hit is one C call, ~35 ns; a loop step
# ~17 ns), so that both see the same kind of noise.
SPIN_PER_PAGE = 2


@dataclass(frozen=True)
class Config:
    """What one run measures. Larger `work` and `trials` shrink the spread and
    lengthen the run (the defaults take about 2 minutes on 2 cores). A cell of
    fixed at 1 cgroup lasts about 10 ms at the default work: at 60,000 pages it
    lasted 2 ms, too short to time 2 CPUs against 1 on a shared machine."""
    cpus: tuple[int, ...] = (1, 2)           # CPU counts (processes per design)
    cgroups: tuple[int, ...] = (1, 4, 32)    # cgroup counts
    designs: tuple[str, ...] = tuple(DESIGNS)
    trials: int = 20
    work: int = 300_000      # pages each CPU charges per cell (iterations rounded up)
    pages: int = 128         # pages per cgroup per iteration (one MADV_DONTNEED)
    drains: int = 20         # timed drains per design per trial
    kills: int = 1           # timed kills per design per trial

    def iterations(self, ncg: int) -> int:
        return max(1, math.ceil(self.work / (self.pages * ncg)))

    @property
    def steps(self) -> int:
        """Progress steps: one per cell, one per (design, trial) drain-and-kill burst."""
        bursts = sum(DESIGNS[d] is not None for d in self.designs)
        return self.trials * (len(self.cpus) * len(self.cgroups) * len(self.designs) + bursts)


QUICK = Config(trials=2, work=600, drains=3, kills=1)

Progress = Callable[[str], None]


def run(config: Config, progress: Progress | None = None) -> dict[str, Any]:
    """Run the benchmark; return the results (JSON-serialisable; see the module
    docstring and summarise). progress(label) is called after each step."""
    started, load = time.monotonic(), os.getloadavg()[0]
    names = {ncg: [f"g{ncg}.{i}" for i in range(ncg)] for ncg in config.cgroups}
    raw: dict[tuple[str, int, int], list[dict[str, float]]] = {}
    drains: dict[str, list[float]] = {}
    kills: dict[str, list[tuple[float, int]]] = {}
    spins: dict[int, list[float]] = {}
    with ExitStack() as stack:
        beds = {d: _make_bed(d, config, names, stack) for d in config.designs}
        for trial in range(config.trials):
            order = _rotated(config.designs, trial)
            for ncpus in config.cpus:
                spins.setdefault(ncpus, []).append(_timed_cell(
                    beds[order[0]].machine, ncpus, workload.spin, SPIN_PER_PAGE * config.work))
                for ncg in config.cgroups:
                    for design in order:
                        sample = beds[design].cell(ncpus, names[ncg], config.iterations(ncg),
                                                   config.pages)
                        raw.setdefault((design, ncpus, ncg), []).append(sample)
                        if progress:
                            progress(f"trial {trial + 1}: {design}, {ncpus} CPUs, "
                                     f"{ncg} cgroups")
            for design in order:
                bed = beds[design]
                if isinstance(bed, _PeerBed):
                    continue
                big = names[max(config.cgroups)]
                drains.setdefault(design, []).extend(
                    bed.drain_samples(config.drains, big, config.pages))
                kills.setdefault(design, []).extend(
                    bed.kill_samples(config.kills, big, first=trial * config.kills))
                if progress:
                    progress(f"trial {trial + 1}: {design}, drains and kills")
        for bed in beds.values():
            bed.close()
            bed.check()
    results = summarise(config, raw, drains, kills, time.monotonic() - started)
    results["machine"]["loadavg_1min"] = [round(load, 2), round(os.getloadavg()[0], 2)]
    results["ceiling"] = ceiling(spins)
    return results


def _rotated(designs: tuple[str, ...], trial: int) -> list[str]:
    k = trial % len(designs)
    return list(designs[k:] + designs[:k])


# ---- test beds: one design's arena, Machine and cgroups ---------------------------

class _CgroupBed:
    """A Cgroups tree of design `design` with every cell's cgroups (g<k>.<i>, the
    children of root), in its own arena, and a Machine of max(cpus) CPUs."""

    def __init__(self, design: str, config: Config, names: dict[int, list[str]],
                 stack: ExitStack) -> None:
        self.design = design
        self.ncpus = ncpus = max(config.cpus)
        ngroups = sum(len(n) for n in names.values())
        self.arena = stack.enter_context(Arena.create(ncpus=ncpus, max_counters=ngroups + 1))
        options = DESIGNS[design]
        assert options is not None                # _make_bed: a cgroup design
        self.cg = Cgroups(self.arena, **options)
        for group in names.values():
            for name in group:
                self.cg.create(name)
        self.machine = stack.enter_context(Machine(self.arena, start_method="fork"))

    def cell(self, ncpus: int, names: list[str], iterations: int,
             pages: int) -> dict[str, float]:
        before = self.cg.stats()
        wall = _timed_cell(self.machine, ncpus, workload.cgroup_cell, self.arena, names,
                           iterations, pages)
        after = self.cg.stats()
        return {"wall_s": wall,
                "walks": after["walks"] - before["walks"],
                "evictions": after["evictions"] - before["evictions"]}

    def drain_samples(self, n: int, names: list[str], pages: int) -> list[float]:
        """n timed drain_all_stock(root) while every CPU churns on `names`, in ms.
        legacy's drain is asynchronous: timed until every CPU has served it
        (wait_flushed, which polls every 0.5 ms)."""
        m, cg = self.machine, self.cg
        stop_at = time.monotonic() + CHURN_WARMUP_S + n * CHURN_PER_DRAIN_S
        churn = [m.submit(cpu, workload.cgroup_churn, self.arena, names, pages, stop_at)
                 for cpu in sorted(m.online)]
        time.sleep(CHURN_WARMUP_S)
        samples: list[float] = []
        while len(samples) < n and time.monotonic() < stop_at:
            t = time.perf_counter()
            if cg.drain_all_stock(cg.root):
                cg.wait_flushed()
                samples.append((time.perf_counter() - t) * 1e3)
            time.sleep(DRAIN_GAP_S)
        for f in churn:
            f.result()
        return samples

    def kill_samples(self, n: int, names: list[str], first: int) -> list[tuple[float, int]]:
        """n times: a CPU charges a page to each cgroup `names` (so it holds their
        stock), SIGKILL, timed until Machine.kill returns (the hotplug-dead path
        has reclaimed its stock). Returns (ms, pages reclaimed) for each. The CPU
        is restarted and the owner uncharges the pages, untimed."""
        m, out = self.machine, []
        for k in range(first, first + n):
            cpu = k % self.ncpus
            m.run_on(cpu, workload.hold_stock, self.arena, names)
            t = time.perf_counter()
            reclaimed = m.kill(cpu)
            out.append(((time.perf_counter() - t) * 1e3, sum(reclaimed.values())))
            m.start_cpu(cpu)
            for name in names:
                self.cg.cgroup(name).uncharge(1)
        return out

    def close(self) -> None:
        self.machine.close()                  # each CPU drains its stock as it stops

    def check(self) -> None:
        """Every page was released and every stock drained: all usages are 0."""
        arena = self.arena
        check_invariants(arena, {c.name: 0 for c in arena.counters()})


class _PeerBed:
    """The mp.Value peer: one ValuePeer per cgroup name, made before its Machine
    forks (a Value is shared only by inheritance), and a Machine of max(cpus)
    processes pinned like the CPUs of the other designs."""

    def __init__(self, design: str, config: Config, names: dict[int, list[str]],
                 stack: ExitStack) -> None:
        self.design = design
        for group in names.values():
            for name in group:
                workload.PEERS[name] = value_peer()
        stack.callback(workload.PEERS.clear)
        arena = stack.enter_context(Arena.create(ncpus=max(config.cpus), max_counters=1))
        self.machine = stack.enter_context(Machine(arena, start_method="fork"))

    def cell(self, ncpus: int, names: list[str], iterations: int,
             pages: int) -> dict[str, float]:
        return {"wall_s": _timed_cell(self.machine, ncpus, workload.peer_cell, names,
                                      iterations, pages)}

    def close(self) -> None:
        self.machine.close()

    def check(self) -> None:
        left = {name: p.usage() for name, p in workload.PEERS.items() if p.usage()}
        if left:
            raise AssertionError(f"mp-value peers lost updates: {left}")


def _timed_cell(machine: Machine, ncpus: int, fn: Callable[..., tuple[float, float]],
                *args: Any) -> float:
    """Run fn(*args, start_at) on CPUs 0..ncpus-1 from one start time; return the
    wall time from the first start to the last end, in seconds."""
    start_at = time.monotonic() + START_MARGIN_S
    futures = [machine.submit(cpu, fn, *args, start_at) for cpu in range(ncpus)]
    spans = [f.result() for f in futures]
    return max(end for _, end in spans) - min(start for start, _ in spans)


def _make_bed(design: str, config: Config, names: dict[int, list[str]],
              stack: ExitStack) -> _CgroupBed | _PeerBed:
    bed = _PeerBed if DESIGNS[design] is None else _CgroupBed
    return bed(design, config, names, stack)


# ---- results ----------------------------------------------------------------------

def summarise(config: Config, raw: dict[tuple[str, int, int], list[dict[str, float]]],
              drains: dict[str, list[float]], kills: dict[str, list[tuple[float, int]]],
              elapsed_s: float) -> dict[str, Any]:
    """The results document (what --json writes):
      machine, config, elapsed_s;
      cells: per (design, cpus, cgroups): iterations, per-trial samples, and
        ms_per_iteration / throughput (pages charged and released per second,
        over all CPUs) as mean, stdev, min, p25, median, p75, max over trials; walks_per_op
        and evictions_per_op (None for the peer), an op being a try_charge or an
        uncharge call;
      drain_ms, kill_ms: per design, p50, p99, max over all samples;
      goals: each of GOALS with its paired per-trial ratio (median) and verdict.
    run() adds machine.loadavg_1min and ceiling (see ceiling()).
    """
    cells = []
    for (design, ncpus, ncg), samples in raw.items():
        iterations = config.iterations(ncg)
        pages = ncpus * iterations * config.pages * ncg
        ops = ncpus * iterations * ncg * (config.pages + 1)
        walls = [s["wall_s"] for s in samples]
        cell = {"design": design, "cpus": ncpus, "cgroups": ncg, "iterations": iterations,
                "pages": pages, "ops": ops, "trials": samples,
                "ms_per_iteration": _spread([w / iterations * 1e3 for w in walls]),
                "throughput": _spread([pages / w for w in walls]),
                "walks_per_op": None, "evictions_per_op": None}
        if "walks" in samples[0]:
            cell["walks_per_op"] = sum(s["walks"] for s in samples) / (ops * len(samples))
            cell["evictions_per_op"] = sum(s["evictions"] for s in samples) / (ops * len(samples))
        cells.append(cell)
    results = {
        "machine": machine(), "config": asdict(config), "elapsed_s": round(elapsed_s, 1),
        "cells": cells,
        "drain_ms": {d: _percentiles(s) for d, s in drains.items()},
        "kill_ms": {d: {**_percentiles([ms for ms, _ in s]),
                        "pages_reclaimed": statistics.mean(p for _, p in s) if s else None}
                    for d, s in kills.items()},
    }
    results["goals"] = goals(results)
    return results


def ceiling(spins: dict[int, list[float]]) -> dict[str, Any]:
    """The pure-Python loop: wall times per CPU count, and the throughput of each
    CPU count over 1 CPU (median of per-trial ratios), e.g. {"2": 1.93}."""
    one = spins.get(1)
    return {"wall_s": {str(n): w for n, w in spins.items()},
            "speedup": {str(n): statistics.median(n * w1 / wn
                                                  for w1, wn in zip(one, w, strict=True))
                        for n, w in spins.items()} if one else {}}


def cell(results: dict[str, Any], design: str, cpus: int, cgroups: int) -> dict[str, Any] | None:
    """The cell of `design` at `cpus` CPUs and `cgroups` cgroups, or None."""
    for c in results["cells"]:
        if (c["design"], c["cpus"], c["cgroups"]) == (design, cpus, cgroups):
            return c
    return None


def measured(results: dict[str, Any], design: str, cpus: int, cgroups: int) -> dict[str, Any]:
    """The cell of `design` at `cpus` CPUs and `cgroups` cgroups, which the run
    measured (every design at every point of its config): KeyError if it has none."""
    c = cell(results, design, cpus, cgroups)
    if c is None:
        raise KeyError(f"no cell for {design} at {cpus} CPUs and {cgroups} cgroups")
    return c


def paired_ratio(a: dict[str, Any] | None, b: dict[str, Any] | None) -> float | None:
    """Throughput of cell a over cell b: the median over trials of the ratio within
    each trial (the two ran back to back, under the same noise)."""
    if a is None or b is None:
        return None
    return statistics.median(wb["wall_s"] / wa["wall_s"] * a["pages"] / b["pages"]
                             for wa, wb in zip(a["trials"], b["trials"], strict=True))


@dataclass(frozen=True)
class Goal:
    """The throughput of the numerator's cell over the denominator's (paired_ratio)
    is at least `target`, or with at_most, at most `target`. The throughput of b
    over a is a's cost per page over b's: a cost goal "a costs at most k times b"
    is Goal(k, numerator=b, denominator=a, at_most=True)."""
    text: str
    target: float
    numerator: tuple[str, int, int]        # (design, cpus, cgroups)
    denominator: tuple[str, int, int]
    at_most: bool = False


GOALS = (
    Goal("32 cgroups: fixed >= 2x legacy throughput (2 CPUs)", 2.0,
         ("fixed", 2, 32), ("legacy", 2, 32)),
    Goal("stock hits: 2 CPUs >= 1.7x 1 CPU (fixed, 1 cgroup)", 1.7,
         ("fixed", 2, 1), ("fixed", 1, 1)),
    Goal("fixed on 2 CPUs >= 8x mp-value on 2 processes (1 cgroup)", 8.0,
         ("fixed", 2, 1), ("mp-value", 2, 1)),
    Goal("no-stock >= 2x mp-value throughput (1 CPU, 1 cgroup)", 2.0,
         ("no-stock", 1, 1), ("mp-value", 1, 1)),
    Goal("32 cgroups: a legacy charge costs <= 2.5x a no-stock walk (1 CPU)", 2.5,
         ("no-stock", 1, 32), ("legacy", 1, 32), at_most=True),
)


def goals(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each goal with its measured ratio and whether it is met (None: the run did
    not measure both cells)."""
    out = []
    for g in GOALS:
        ratio = paired_ratio(cell(results, *g.numerator), cell(results, *g.denominator))
        met = None if ratio is None else (ratio <= g.target if g.at_most
                                          else ratio >= g.target)
        out.append({"goal": g.text, "target": g.target, "ratio": ratio, "met": met})
    return out


def _spread(values: list[float]) -> dict[str, float]:
    p25, median, p75 = np.percentile(values, [25, 50, 75]).tolist()
    return {"mean": statistics.mean(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "p25": p25, "median": median, "p75": p75,
            "max": max(values)}


def _percentiles(samples: list[float]) -> dict[str, float | int | None]:
    if not samples:
        return {"samples": 0, "p50": None, "p99": None, "max": None}
    a = np.array(samples)
    return {"samples": len(samples), "p50": float(np.percentile(a, 50)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max())}


def machine() -> dict[str, Any]:
    """What the numbers were measured on. run() adds loadavg_1min: the 1-minute
    load average before and after the run (after counts the bench's own CPU
    processes: on an otherwise idle machine it ends near max(cpus))."""
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f
                          if line.startswith("model name")), model)
    except OSError:
        pass
    return {"cores": len(os.sched_getaffinity(0)), "cpu_model": model,
            "kernel": platform.release(), "python": platform.python_version(),
            "numpy": np.__version__}
