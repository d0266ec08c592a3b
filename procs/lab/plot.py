"""The PNG of a `shmcounter bench` run: throughput against the CPU count (at the
fewest and the most cgroups) and against the cgroup count (at the most CPUs),
one line per design; the dot is the median over trials, the bar spans the middle
half of the trials (25th to 75th percentile).

Uses matplotlib's object API with the Agg canvas (no pyplot, no display, no
global state), so it works in a CI job and in a thread."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from .bench import measured

# One colour per design, the same in every panel.
COLOURS = {"legacy": "tab:red", "fixed": "tab:blue", "no-stock": "tab:gray",
           "mp-value": "tab:green", "v4": "tab:purple", "v4-cap": "tab:orange"}


def plot(results: dict[str, Any], path: str | Path) -> None:
    """Write the PNG to `path`."""
    from matplotlib.figure import Figure  # imported here: only the plot needs it

    config = results["config"]
    cpus, groups = config["cpus"], config["cgroups"]
    panels = [("cpus", min(groups)), ("cpus", max(groups)), ("cgroups", max(cpus))]
    if len(groups) == 1:
        panels.pop(1)
    fig = Figure(figsize=(5 * len(panels), 4.4), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (x_axis, fixed) in zip(axes, panels, strict=True):
        xs = cpus if x_axis == "cpus" else groups
        for design in config["designs"]:
            cells = [measured(results, design, x, fixed) if x_axis == "cpus"
                     else measured(results, design, fixed, x) for x in xs]
            mid = [c["throughput"]["median"] / 1e6 for c in cells]
            low = [m - c["throughput"]["p25"] / 1e6 for m, c in zip(mid, cells, strict=True)]
            high = [c["throughput"]["p75"] / 1e6 - m for m, c in zip(mid, cells, strict=True)]
            ax.errorbar(xs, mid, yerr=[low, high], marker="o", capsize=3, label=design,
                        color=COLOURS.get(design))
        if x_axis == "cpus":
            ax.set_title(f"{fixed} cgroup{'s' if fixed > 1 else ''}")
            ax.set_xlabel("CPU processes")
        else:
            ax.set_title(f"{fixed} CPU{'s' if fixed > 1 else ''}")
            ax.set_xlabel("cgroups (log scale)")
            ax.set_xscale("log")
        ax.set_xticks(xs, [str(x) for x in xs])
        ax.set_ylabel("M pages/s charged and released")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0].legend()
    m = results["machine"]
    fig.suptitle(f"shmcounter bench: {m['cores']} cores ({m['cpu_model']}), Python "
                 f"{m['python']}, {config['trials']} trials")
    fig.savefig(path, dpi=100)
