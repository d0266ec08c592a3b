"""The text report of a `shmcounter bench` run: the cover letter's table (docs/stock-design.md
§4) per CPU count, throughput ratios to legacy, walks and evictions, drains and
kills, and the goals. Everything is read from the results document (bench.py),
so a saved JSON file prints the same report."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .bench import BASELINE, cell, measured, paired_ratio


def format_report(results: dict[str, Any]) -> str:
    config = results["config"]
    sections = [_header(results)]
    for ncpus in config["cpus"]:
        sections.append(_cover_letter_table(results, ncpus))
        sections.append(_throughput_table(results, ncpus))
    sections.append(_walks_table(results))
    sections.append(_drain_kill_table(results))
    sections.append(_goals(results))
    return "\n\n".join(s for s in sections if s)


def _header(results: dict[str, Any]) -> str:
    m, c = results["machine"], results["config"]
    return (f"shmcounter bench: {m['cores']} cores ({m['cpu_model']}), Linux {m['kernel']}, "
            f"Python {m['python']}; {c['trials']} trials in {results['elapsed_s']} s; 1-min "
            f"load average {m['loadavg_1min'][0]} before, {m['loadavg_1min'][1]} after.\n"
            f"An iteration: each CPU charges {c['pages']} pages one by one in each cgroup, "
            f"interleaving its cgroups page by page, then uncharges them (one uncharge "
            f"per cgroup).")


def _cover_letter_table(results: dict[str, Any], ncpus: int) -> str:
    """Time per iteration, mean and stddev over trials, and the delta of each
    design's mean from legacy's, as the cover letter prints before/after."""
    config = results["config"]
    designs = config["designs"]
    header = ["#cgroups"]
    for d in designs:
        header += [d, "stddev"] + (["delta %"] if d != BASELINE and BASELINE in designs else [])
    rows = []
    for ncg in config["cgroups"]:
        base = cell(results, BASELINE, ncpus, ncg)
        row = [str(ncg)]
        for d in designs:
            t = measured(results, d, ncpus, ncg)["ms_per_iteration"]
            row += [f"{t['mean']:.3f}", f"{t['stdev']:.3f}"]
            if d != BASELINE and base is not None:
                before = base["ms_per_iteration"]["mean"]
                row.append(f"{(t['mean'] - before) / before * 100:+.1f}")
        rows.append(row)
    return (f"Time per iteration in ms, {_cpus(ncpus)} (mean of {config['trials']} trials; "
            f"lower is better)\n" + _table(header, rows))


def _throughput_table(results: dict[str, Any], ncpus: int) -> str:
    config = results["config"]
    designs = config["designs"]
    rows = []
    for ncg in config["cgroups"]:
        base = cell(results, BASELINE, ncpus, ncg)
        row = [str(ncg)]
        for d in designs:
            c = measured(results, d, ncpus, ncg)
            value = f"{c['throughput']['median'] / 1e6:.3f}"
            if d != BASELINE and base is not None:
                value += f" ({paired_ratio(c, base):.2f}x)"
            row.append(value)
        rows.append(row)
    ratio = " and ratio to legacy (median of per-trial ratios)" if BASELINE in designs else ""
    return (f"Throughput in M pages/s charged and released, {_cpus(ncpus)} (median)"
            f"{ratio}\n" + _table(["#cgroups", *designs], rows))


def _walks_table(results: dict[str, Any]) -> str:
    """Walks and evictions per op (a try_charge or an uncharge call), at the
    largest CPU count."""
    config = results["config"]
    ncpus = max(config["cpus"])
    groups = config["cgroups"]
    rows = []
    for d in config["designs"]:
        cells = [measured(results, d, ncpus, ncg) for ncg in groups]
        if cells[0]["walks_per_op"] is None:
            rows.append([d] + ["-"] * (2 * len(groups)))
            continue
        rows.append([d] + [f"{c['walks_per_op']:.3f}" for c in cells]
                    + [f"{c['evictions_per_op']:.3f}" for c in cells])
    header = (["design"] + [f"walks@{n}" for n in groups] + [f"evict@{n}" for n in groups])
    return (f"Hierarchy walks and legacy evictions per op (try_charge or uncharge), "
            f"{_cpus(ncpus)}, by cgroup count\n" + _table(header, rows))


def _drain_kill_table(results: dict[str, Any]) -> str:
    config = results["config"]
    rows = []
    for d in config["designs"]:
        drain, kill = results["drain_ms"].get(d), results["kill_ms"].get(d)
        if drain is None:
            rows.append([d, "-", "-", "0", "-", "-", "-", "0"])
            continue
        rows.append([d, _ms(drain["p50"]), _ms(drain["p99"]), str(drain["samples"]),
                     _ms(kill["p50"]), _ms(kill["p99"]),
                     "-" if kill["pages_reclaimed"] is None else f"{kill['pages_reclaimed']:.0f}",
                     str(kill["samples"])])
    header = ["design", "drain p50", "p99", "n", "kill p50", "p99", "pages", "n"]
    note = ("mp-value has neither: no stock to drain, and a lock held by a killed "
            "process is never released (docs/alternatives.md).")
    return (f"drain_all_stock(root) while every CPU churns on {max(config['cgroups'])} "
            f"cgroups, and SIGKILL of a CPU holding stock until Machine.kill returns "
            f"(ms; {_cpus(max(config['cpus']))})\n" + _table(header, rows)
            + ("\n" + note if "mp-value" in config["designs"] else ""))


def _goals(results: dict[str, Any]) -> str:
    lines = ["Goals (throughput ratios measured side by side, median of per-trial ratios):"]
    for g in results["goals"]:
        if g["met"] is None:
            lines.append(f"  [not measured] {g['goal']}")
        else:
            verdict = "met" if g["met"] else "NOT MET"
            lines.append(f"  [{verdict}] {g['goal']}: {g['ratio']:.2f}x")
    speedup = {int(n): r for n, r in results["ceiling"]["speedup"].items() if int(n) > 1}
    if speedup:
        lines.append("Ceiling: a pure-Python loop that shares nothing, on the same CPU "
                     "processes, gives " + ", ".join(f"{r:.2f}x on {_cpus(n)}"
                                                     for n, r in sorted(speedup.items()))
                     + " of its 1-CPU throughput.")
    return "\n".join(lines)


def _cpus(n: int) -> str:
    return "1 CPU" if n == 1 else f"{n} CPUs"


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns right-aligned to their widest cell, the first one left-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                               for i, (v, w) in enumerate(zip(r, widths, strict=True)))
                     for r in [header, *rows])
