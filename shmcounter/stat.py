"""The read view of a running arena: its counters and each CPU's stock, then its
cgroup tree if it holds one (what `shmcounter stat` prints)."""
from __future__ import annotations

from .arena import Arena
from .errors import ArenaError
from .memcg import Cgroups
from .memcg.stat import format_cgroups
from .page_counter import PAGE_COUNTER_MAX


def format_stat(arena: Arena) -> str:
    """The counters of `arena` and each CPU's stock, one line per counter."""
    cpus = range(arena.ncpus)
    rows = [("counter", "usage", "max", "peak", "failcnt", "batch",
             *(f"cpu{k}" for k in cpus))]
    for c in arena.counters():
        depth = len(c._path) - 1
        rows.append(("  " * depth + c.name, str(c.usage),
                     "max" if c.max == PAGE_COUNTER_MAX else str(c.max),
                     str(c.watermark), str(c.failcnt), str(c.batch),
                     *(str(c.stock(k)) for k in cpus)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"arena {arena.name}: {arena.ncpus} CPUs, "
             f"online {arena.online_cpus()}, "
             f"underflows {arena.underflows}"]
    for r in rows:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w)
                               for i, (v, w) in enumerate(zip(r, widths, strict=True))))
    return "\n".join(lines)


def view(arena: Arena) -> str:
    """What stat prints: the counters, then the cgroup tree if the arena holds one."""
    text = format_stat(arena)
    try:
        cg = Cgroups.open(arena)
    except ArenaError:
        return text                             # no cgroup tree
    return text + "\n\n" + format_cgroups(cg)
