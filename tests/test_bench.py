"""shmcounter bench: a --quick run prints the report, writes the JSON results and
the PNG plot; what it counts follows from the workload. No timing is asserted:
times and ratios depend on the machine."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from procs.lab.bench import QUICK, goals
from procs.lab.report import format_report

DESIGNS = ["legacy", "fixed", "no-stock", "mp-value", "v4", "v4-cap"]


def bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "shmcounter.cli", "bench", *args],
                          check=False, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path_factory.mktemp("bench")
    args = [sys.executable, "-m", "shmcounter.cli", "bench", "--quick",
            "--json", str(out / "r.json"), "--png", str(out / "r.png")]
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as run:
        stdout, stderr = run.communicate(timeout=120)
    done = subprocess.CompletedProcess(args, run.returncode, stdout, stderr)
    assert done.returncode == 0, done.stderr
    assert [n for n in os.listdir("/dev/shm") if n.startswith(f"shmcounter_{run.pid}_")] == []
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return done, json.loads((out / "r.json").read_text())


def test_quick_run_writes_the_results_document(quick):
    _, results = quick
    assert set(results) == {"machine", "config", "elapsed_s", "cells", "drain_ms",
                            "kill_ms", "goals", "ceiling"}
    assert {n: len(w) for n, w in results["ceiling"]["wall_s"].items()} == {"1": 2, "2": 2}
    assert set(results["ceiling"]["speedup"]) == {"1", "2"}
    assert results["config"] == json.loads(json.dumps(asdict(QUICK)))
    assert {(c["design"], c["cpus"], c["cgroups"]) for c in results["cells"]} == {
        (d, p, g) for d in DESIGNS for p in (1, 2) for g in (1, 4, 32)}
    for c in results["cells"]:
        assert len(c["trials"]) == QUICK.trials
        assert set(c["ms_per_iteration"]) == set(c["throughput"]) == {
            "mean", "stdev", "min", "p25", "median", "p75", "max"}
    # drains and kills for the five cgroup designs; the peer has neither
    assert set(results["drain_ms"]) == set(results["kill_ms"]) == {
        "legacy", "fixed", "no-stock", "v4", "v4-cap"}
    assert {k: v["samples"] for k, v in results["kill_ms"].items()} == {
        "legacy": 2, "fixed": 2, "no-stock": 2, "v4": 2, "v4-cap": 2}
    assert results["kill_ms"]["no-stock"]["pages_reclaimed"] == 0
    assert [g["goal"] for g in results["goals"]] == [
        "32 cgroups: fixed >= 2x legacy throughput (2 CPUs)",
        "stock hits: 2 CPUs >= 1.7x 1 CPU (fixed, 1 cgroup)",
        "fixed on 2 CPUs >= 8x mp-value on 2 processes (1 cgroup)",
        "no-stock >= 2x mp-value throughput (1 CPU, 1 cgroup)",
        "32 cgroups: a legacy charge costs <= 2.5x a no-stock walk (1 CPU)"]
    # the last goal is a cost: met at or below its target
    *gains, cost = results["goals"]
    assert all(g["met"] == (g["ratio"] >= g["target"]) for g in gains)
    assert cost["met"] == (cost["ratio"] <= cost["target"])


def test_walks_and_evictions_follow_from_the_workload(quick):
    """An op is a try_charge(1) or an uncharge(128) (QUICK.pages): 128 + 1 ops per
    cgroup per iteration."""
    _, results = quick
    cells = {(c["design"], c["cpus"], c["cgroups"]): c for c in results["cells"]}
    for p in (1, 2):
        for g in (1, 4, 32):
            # no stock: every op walks the hierarchy once
            assert cells["no-stock", p, g]["walks_per_op"] == 1.0
            assert cells["no-stock", p, g]["evictions_per_op"] == 0.0
            # per-counter stock, batch 64: of each cgroup's 128 charges per iteration
            # exactly 2 miss (each refills 63; the stock ends as it began), and the
            # uncharge walks
            # the lockless stock the same; with one context per CPU the cap
            # (v4-cap) never finds more than batch in a word
            for design in ("fixed", "v4", "v4-cap"):
                assert cells[design, p, g]["walks_per_op"] == 3 / 129
                assert cells[design, p, g]["evictions_per_op"] == 0.0
            assert cells["mp-value", p, g]["walks_per_op"] is None
        # 32 cgroups interleaved page by page through 7 slots: every charge misses
        # (a walk) and evicts a slot (a walk for the victim), and the uncharge
        # walks; only a slot left empty by a drain or a kill spares an eviction
        legacy = cells["legacy", p, 32]
        assert 1.9 < legacy["walks_per_op"] <= (2 * 128 + 1) / 129
        assert 0.9 < legacy["evictions_per_op"] <= 128 / 129
        # 4 cgroups fit in the 7 slots: evictions only of the slots that cached
        # the 32-cgroup cell's cgroups
        assert cells["legacy", p, 4]["evictions_per_op"] < 0.01


def test_quick_run_prints_the_report_of_its_json(quick):
    done, results = quick
    report = format_report(results)
    assert done.stdout.startswith(report + "\n")
    lines = report.splitlines()
    assert "Time per iteration in ms, 2 CPUs (mean of 2 trials; lower is better)" in lines
    assert lines[lines.index("Time per iteration in ms, 2 CPUs (mean of 2 trials; lower is "
                             "better)") + 1].split() == [
        "#cgroups", "legacy", "stddev", "fixed", "stddev", "delta", "%", "no-stock",
        "stddev", "delta", "%", "mp-value", "stddev", "delta", "%", "v4", "stddev", "delta",
        "%", "v4-cap", "stddev", "delta", "%"]
    assert lines[-7] == ("Goals (throughput ratios measured side by side, median of "
                         "per-trial ratios):")
    assert lines[-1].startswith("Ceiling: a pure-Python loop that shares nothing, on the "
                                "same CPU processes, gives ")


def synthetic_cell(design: str, cpus: int, cgroups: int, walls: list[float]) -> dict:
    """A cell as summarise() makes it, with what paired_ratio reads: 1000 pages
    per trial, in walls[i] seconds in trial i."""
    return {"design": design, "cpus": cpus, "cgroups": cgroups, "pages": 1000,
            "trials": [{"wall_s": w} for w in walls]}


@pytest.mark.parametrize("mp_value_walls, no_stock_gain, legacy_walls, legacy_cost, met", [
    # per-trial ratios 2, 4, 1 and 2.5, 3, 2: medians on the targets, both met
    ([2.0, 2.0, 0.25], 2.0, [2.5, 3.0, 2.0], 2.5, True),
    # per-trial ratios 2, 1.5, 1 and 3, 3, 2: neither met
    ([2.0, 0.75, 0.25], 1.5, [3.0, 3.0, 2.0], 3.0, False),
])
def test_goals_are_medians_of_per_trial_ratios_and_a_cost_is_met_at_most(
        mp_value_walls, no_stock_gain, legacy_walls, legacy_cost, met):
    """No-stock's throughput over mp-value's (1 CPU, 1 cgroup) must reach 2; at
    32 cgroups, legacy's cost per page over no-stock's (no-stock's throughput over
    legacy's, 1 CPU) must not pass 2.5. Goals whose cells the run lacks are not
    measured."""
    results = {"cells": [
        synthetic_cell("no-stock", 1, 1, [1.0, 0.5, 0.25]),
        synthetic_cell("mp-value", 1, 1, mp_value_walls),
        synthetic_cell("no-stock", 1, 32, [1.0, 1.0, 1.0]),
        synthetic_cell("legacy", 1, 32, legacy_walls),
    ]}
    assert goals(results) == [
        {"goal": "32 cgroups: fixed >= 2x legacy throughput (2 CPUs)", "target": 2.0,
         "ratio": None, "met": None},
        {"goal": "stock hits: 2 CPUs >= 1.7x 1 CPU (fixed, 1 cgroup)", "target": 1.7,
         "ratio": None, "met": None},
        {"goal": "fixed on 2 CPUs >= 8x mp-value on 2 processes (1 cgroup)", "target": 8.0,
         "ratio": None, "met": None},
        {"goal": "no-stock >= 2x mp-value throughput (1 CPU, 1 cgroup)", "target": 2.0,
         "ratio": no_stock_gain, "met": met},
        {"goal": "32 cgroups: a legacy charge costs <= 2.5x a no-stock walk (1 CPU)",
         "target": 2.5, "ratio": legacy_cost, "met": met},
    ]


RATIOS_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "ratios.py"


def per_call_run(ns: dict[str, tuple[float, float]]) -> dict:
    """A pytest-benchmark JSON document with what scripts/ratios.py reads: each
    row's median and min, given in ns, stored in seconds."""
    return {"datetime": "2026-01-02T03:04:05", "benchmarks": [
        {"name": name, "stats": {"median": med * 1e-9, "min": lo * 1e-9}}
        for name, (med, lo) in ns.items()]}


def test_ratios_script_prints_the_per_call_goals_of_one_run(tmp_path):
    """scripts/ratios.py on a saved run: hit / empty call, bare C / empty call,
    the depth-3 pair less its frame (wrapped - empty: 20 ns) / hit, and the pair's
    slope over depths 1 to 5, each from the medians and from the minima."""
    run = tmp_path / "run.json"
    run.write_text(json.dumps(per_call_run({
        "test_empty_call": (50, 40),
        "test_wrapped_empty_call": (70, 60),
        "test_stock_consume_bare": (45, 36),
        "test_try_charge_stock_hit": (95, 84),
        "test_slow_path_pair[depth1]": (400, 300),
        "test_slow_path_pair[depth3]": (520, 420),
        "test_slow_path_pair[depth5]": (640, 400),
        "test_uncharge": (1000, 900),
    })))
    done = subprocess.run([sys.executable, str(RATIOS_SCRIPT), "--load", str(run)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.splitlines()[-6:] == [
        "| ratio | goal | median | min | met (median / min) |",
        "|---|---|---:|---:|---|",
        "| `try_charge(1)` stock hit / empty call | <= 2x | 1.90x | 2.10x | yes / no |",
        "| bare C call of the hit (`stock_consume`) / empty call |  | 0.90x | 0.90x |  |",
        # (520 - 20) / 95 and (420 - 20) / 84
        "| slow-path pair at depth 3, less its frame / stock hit | <= 5x | 5.26x | 4.76x "
        "| no / yes |",
        # (640 - 400) / 4 and (400 - 300) / 4
        "| slow-path pair: cost per level, depth 1 to 5 | <= 30 ns | 60 ns | 25 ns "
        "| no / yes |"]
    assert "| the pair's frame: wrapped - empty | 20.0 | 20.0 |" in done.stdout.splitlines()


def test_ratios_script_names_the_rows_a_run_lacks(tmp_path):
    run = tmp_path / "run.json"
    run.write_text(json.dumps(per_call_run({"test_empty_call": (50, 40),
                                            "test_try_charge_stock_hit": (95, 84)})))
    done = subprocess.run([sys.executable, str(RATIOS_SCRIPT), "--load", str(run)],
                          check=False, capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == ("ratios: the run has no row test_wrapped_empty_call, "
                           "test_stock_consume_bare, test_slow_path_pair[depth1], "
                           "test_slow_path_pair[depth3], test_slow_path_pair[depth5]\n")


@pytest.mark.parametrize("args, message", [
    (["--cpus", "0"], "argument --cpus: CPU counts must be distinct comma-separated ints "
                      "in [1, 64], got '0'"),
    (["--cgroups", "4,4"], "argument --cgroups: cgroup counts must be distinct "
                           "comma-separated ints in [1, 512], got '4,4'"),
    (["--designs", "fixed,cheap"], "argument --designs: designs must be distinct names "
                                   "among legacy, fixed, no-stock, mp-value, v4, "
                                   "v4-cap, got "
                                   "'fixed,cheap'"),
    (["--trials", "ten"], "argument --trials: trials must be an int in [1, 1000], got 'ten'"),
    (["--json", "/nonexistent/r.json"], "argument --json: cannot write '/nonexistent/r.json': "
                                        "/nonexistent is not a writable folder"),
])
def test_bad_arguments_exit_2_with_a_clear_message(args, message):
    done = bench(*args)
    assert done.returncode == 2
    assert done.stderr.splitlines()[-1] == f"shmcounter bench: error: {message}"


def test_ctrl_c_stops_every_cpu_and_unlinks_every_arena(tmp_path):
    """SIGINT to the process group, as a terminal's Ctrl-C sends it: the CPU
    processes ignore it, the bench stops them in order and exits with 130."""
    run = subprocess.Popen([sys.executable, "-m", "shmcounter.cli", "bench", "--quick",
                            "--trials", "1000", "--json", str(tmp_path / "r.json"),
                            "--png", str(tmp_path / "r.png")],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           start_new_session=True)
    prefix = f"shmcounter_{run.pid}_"
    assert run.stderr is not None
    try:
        deadline = time.monotonic() + 60
        while sum(n.startswith(prefix) for n in os.listdir("/dev/shm")) < 6:  # 6 designs
            assert run.poll() is None and time.monotonic() < deadline, run.stderr.read()
            time.sleep(0.05)
        time.sleep(0.5)                                   # the cells are under way
        children = Path(f"/proc/{run.pid}/task/{run.pid}/children").read_text().split()
        cpus = [int(p) for p in children
                if b"resource_tracker" not in Path(f"/proc/{p}/cmdline").read_bytes()]
        os.killpg(run.pid, signal.SIGINT)
        out, err = run.communicate(timeout=60)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    assert run.returncode == 130
    assert err.splitlines() == ["shmcounter bench: interrupted; every CPU process was "
                                "stopped and every arena unlinked"]
    assert out == ""
    assert len(cpus) == 12                                 # 6 designs x 2 CPUs
    assert [p for p in cpus if os.path.exists(f"/proc/{p}")] == []
    assert [n for n in os.listdir("/dev/shm") if n.startswith(prefix)] == []
