"""The read view of a cgroup tree, in the kernel's terms: one line per cgroup with
memory.current, memory.max, memory.peak (bytes, "max" when unlimited), memory.events
max (hierarchical) and the pages each CPU holds in stock for it."""
from __future__ import annotations

from .cgroups import Cgroups


def format_cgroups(cg: Cgroups) -> str:
    ncpus = cg._arena.ncpus
    header = ("cgroup", "state", "memory.current", "memory.max", "memory.peak",
              "events.max", *(f"stock.cpu{k}" for k in range(ncpus)))
    rows = [header]
    for g in cg.cgroups():
        stat = g.stat()
        depth = 0
        p = g.parent
        while p is not None:
            depth, p = depth + 1, p.parent
        rows.append(("  " * depth + g.name, g.state, str(stat["memory.current"]),
                     str(stat["memory.max"]), str(stat["memory.peak"]),
                     str(g.events["max"]), *(str(n) for n in stat["stock"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    cap = " with the stock cap (E14)" if cg.options["stock_cap"] else ""
    lines = [f"cgroups: design {cg.variant}{cap}, memsw {'on' if cg.memsw else 'off'}, "
             f"batch {cg.batch}; {cg.stats()}"]
    for r in rows:
        lines.append("  ".join(v.ljust(w) if i < 2 else v.rjust(w)
                               for i, (v, w) in enumerate(zip(r, widths, strict=True))))
    return "\n".join(lines)
