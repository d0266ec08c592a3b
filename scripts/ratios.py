#!/usr/bin/env python3
"""The per-call goals as ratios of one run of bench/test_ops.py (group "charge"),
printed as markdown tables: the rows used, in ns, then each ratio from the medians
and from the minima.

    python scripts/ratios.py                     # runs the benchmarks (about 20 s)
    python scripts/ratios.py --save run.json     # ... and keeps pytest-benchmark's JSON
    python scripts/ratios.py --load run.json     # reads a saved run instead

Run it from a tree with the C extensions built in place (`python -m pytest` puts
the tree first on the path, so it measures this tree's code).

The slow-path pair (try_charge(1); uncharge(1)) is timed as one Python function,
so it pays one frame more than the two calls issued by hand: the wrapped empty
call minus the empty call, which the ratios subtract.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = "bench/test_ops.py"
EMPTY = "test_empty_call"
WRAPPED = "test_wrapped_empty_call"
HIT = "test_try_charge_stock_hit"
BARE = "test_stock_consume_bare"
DEPTHS = (1, 3, 5)
GOAL_DEPTH = 3


def pair(depth: int) -> str:
    return f"test_slow_path_pair[depth{depth}]"


ROWS = (EMPTY, WRAPPED, BARE, HIT, *(pair(d) for d in DEPTHS))
STATS = ("median", "min")


def run_bench(json_path: Path) -> None:
    """pytest-benchmark on bench/test_ops.py, its results written to json_path."""
    subprocess.run([sys.executable, "-m", "pytest", BENCH, "-q", "-p", "no:cacheprovider",
                    "--benchmark-only", f"--benchmark-json={json_path}"],
                   cwd=ROOT, check=True, stdout=sys.stderr)


def times_ns(doc: dict[str, Any]) -> dict[str, dict[str, float]]:
    """{row: {"median": ns, "min": ns}} for every row the ratios need."""
    found = {b["name"]: b["stats"] for b in doc["benchmarks"]}
    missing = [r for r in ROWS if r not in found]
    if missing:
        raise SystemExit(f"ratios: the run has no row {', '.join(missing)}")
    return {r: {s: found[r][s] * 1e9 for s in STATS} for r in ROWS}


# (key of values(), what it is, goal: at most this, or None, unit)
RATIOS = (
    ("hit", "`try_charge(1)` stock hit / empty call", 2.0, "x"),
    ("bare", "bare C call of the hit (`stock_consume`) / empty call", None, "x"),
    ("pair", f"slow-path pair at depth {GOAL_DEPTH}, less its frame / stock hit", 5.0, "x"),
    ("slope", "slow-path pair: cost per level, depth 1 to 5", 30.0, " ns"),
)


def values(t: dict[str, dict[str, float]], stat: str) -> dict[str, float]:
    """The ratios of RATIOS from one statistic ("median" or "min") of every row.

    The pair as issued is the pair less its frame: pair - (wrapped - empty). The
    cost per level is the least-squares slope of the pair over depths 1, 3, 5,
    (pair5 - pair1) / 4, in which the frame cancels."""
    frame = t[WRAPPED][stat] - t[EMPTY][stat]
    first, last = DEPTHS[0], DEPTHS[-1]
    return {"hit": t[HIT][stat] / t[EMPTY][stat],
            "bare": t[BARE][stat] / t[EMPTY][stat],
            "pair": (t[pair(GOAL_DEPTH)][stat] - frame) / t[HIT][stat],
            "slope": (t[pair(last)][stat] - t[pair(first)][stat]) / (last - first)}


def _fmt(value: float, unit: str) -> str:
    return f"{value:.0f}{unit}" if unit == " ns" else f"{value:.2f}{unit}"


def report(doc: dict[str, Any]) -> str:
    t = times_ns(doc)
    frame = {s: t[WRAPPED][s] - t[EMPTY][s] for s in STATS}
    lines = [f"bench/test_ops.py, group \"charge\", {doc['datetime']} (one run; ns per call)",
             "", "| row | median ns | min ns |", "|---|---:|---:|"]
    lines += [f"| `{r}` | {t[r]['median']:.1f} | {t[r]['min']:.1f} |" for r in ROWS]
    lines += [f"| the pair's frame: wrapped - empty | {frame['median']:.1f} | "
              f"{frame['min']:.1f} |",
              "", "| ratio | goal | median | min | met (median / min) |",
              "|---|---|---:|---:|---|"]
    v = {s: values(t, s) for s in STATS}
    for key, what, limit, unit in RATIOS:
        goal = met = ""
        if limit is not None:
            goal = f"<= {limit:g}{unit}"
            met = " / ".join("yes" if v[s][key] <= limit else "no" for s in STATS)
        lines.append(f"| {what} | {goal} | {_fmt(v['median'][key], unit)} | "
                     f"{_fmt(v['min'][key], unit)} | {met} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--load", type=Path, metavar="JSON",
                        help="read this pytest-benchmark JSON instead of running")
    source.add_argument("--save", type=Path, metavar="JSON",
                        help="keep the run's pytest-benchmark JSON here")
    args = parser.parse_args()
    if args.load is not None:
        doc = json.loads(args.load.read_text())
    else:
        with tempfile.TemporaryDirectory() as tmp:
            path = args.save.resolve() if args.save else Path(tmp) / "run.json"
            run_bench(path)
            doc = json.loads(path.read_text())
    print(report(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
