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

from procs.lab.bench import QUICK
from procs.lab.report import format_report

DESIGNS = ["legacy", "fixed", "no-stock", "mp-value"]


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
    # drains and kills for the three cgroup designs; the peer has neither
    assert set(results["drain_ms"]) == set(results["kill_ms"]) == {"legacy", "fixed", "no-stock"}
    assert {k: v["samples"] for k, v in results["kill_ms"].items()} == {
        "legacy": 2, "fixed": 2, "no-stock": 2}
    assert results["kill_ms"]["no-stock"]["pages_reclaimed"] == 0
    assert [g["goal"] for g in results["goals"]] == [
        "32 cgroups: fixed >= 2x legacy throughput (2 CPUs)",
        "stock hits: 2 CPUs >= 1.7x 1 CPU (fixed, 1 cgroup)",
        "fixed on 2 CPUs >= 8x mp-value on 2 processes (1 cgroup)"]
    assert all(g["met"] == (g["ratio"] >= g["target"]) for g in results["goals"])


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
            assert cells["fixed", p, g]["walks_per_op"] == 3 / 129
            assert cells["fixed", p, g]["evictions_per_op"] == 0.0
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
        "stddev", "delta", "%", "mp-value", "stddev", "delta", "%"]
    assert lines[-5] == ("Goals (throughput ratios measured side by side, median of "
                         "per-trial ratios):")
    assert lines[-1].startswith("Ceiling: a pure-Python loop that shares nothing, on the "
                                "same CPU processes, gives ")


@pytest.mark.parametrize("args, message", [
    (["--cpus", "0"], "argument --cpus: CPU counts must be distinct comma-separated ints "
                      "in [1, 64], got '0'"),
    (["--cgroups", "4,4"], "argument --cgroups: cgroup counts must be distinct "
                           "comma-separated ints in [1, 512], got '4,4'"),
    (["--designs", "fixed,cheap"], "argument --designs: designs must be distinct names "
                                   "among legacy, fixed, no-stock, mp-value, got "
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
        while sum(n.startswith(prefix) for n in os.listdir("/dev/shm")) < 4:  # 4 designs
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
    assert len(cpus) == 8                                  # 4 designs x 2 CPUs
    assert [p for p in cpus if os.path.exists(f"/proc/{p}")] == []
    assert [n for n in os.listdir("/dev/shm") if n.startswith(prefix)] == []
