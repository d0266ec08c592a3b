"""shmcounter command line: demo | stat."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .errors import ArenaError
from .layout import Arena
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
                               for i, (v, w) in enumerate(zip(r, widths))))
    return "\n".join(lines)


def _charge_pages(arena: Arena, name: str, n: int) -> int:
    """This runs in a CPU process: n single-page charges; returns how many succeeded."""
    counter = arena.counter(name)
    return [counter.try_charge(1)[0] for _ in range(n)].count(True)


def demo(_: argparse.Namespace) -> int:
    """A short story: CPUs charge, the stock grows, a limit hit drains, a CPU dies."""
    from procs import Machine                 # the runtime uses the library, not back
    with Arena.create(ncpus=2, max_counters=8) as arena, Machine(arena) as m:
        root = arena.new_counter("root")
        job = arena.new_counter("job", parent=root, max=200)
        job.enable_stock(64)

        def step(cpu: int, n: int, what: str) -> None:
            ok = m.run_on(cpu, _charge_pages, arena, "job", n)
            print(f"\n== CPU {cpu}: {what}: {ok} of {n} charges succeeded")
            print(format_stat(arena))

        print("A counter 'job' (max 200) under 'root'; stock batch 64; 2 CPU processes, "
              "one per core.")
        step(0, 1, "charge 1 page; the slow path takes 64 and keeps 63 in CPU 0's stock")
        step(0, 10, "10 more pages come from the stock: usage does not move")
        step(1, 100, "CPU 1 charges 100 pages: two refills of its own stock")
        step(1, 60, "CPU 1 asks for 60 more: the greedy refill hits max, then exact "
                    "charges fail once the limit is reached (failcnt counts both)")
        print("\n== the limit is stranded in the stocks: drain_stock sends every CPU a "
              "work message")
        job.drain_stock()
        print(format_stat(arena))
        step(1, 40, "now CPU 1 finds room again")
        job.set_max(400)
        step(1, 5, "max raised to 400: CPU 1's next miss refills its stock")
        print(f"\n== SIGKILL CPU 1 (pid {m.pid(1)}); Machine.kill returns once the "
              "hotplug-dead path has run")
        reclaimed = m.kill(1)
        print(f"reclaimed {reclaimed}; online CPUs {sorted(m.online)}; usage is real "
              "charges plus live stocks")
        print(format_stat(arena))
    return 0


def stat(args: argparse.Namespace) -> int:
    try:
        arena = Arena.attach(args.arena)
    except ArenaError as exc:
        print(f"shmcounter stat: {exc}", file=sys.stderr)
        return 2
    try:
        print(format_stat(arena))
    finally:
        arena.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="shmcounter",
        description="Hierarchical page counters with per-CPU charge stock in shared memory.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("demo", help="a short scenario: charges, stock, a limit, a kill",
                       description=demo.__doc__)
    p.set_defaults(func=demo)
    p = sub.add_parser("stat", help="counters and per-CPU stocks of a running arena",
                       description="Print the counters and per-CPU stocks of a running arena.")
    p.add_argument("arena", help="the arena's name (Arena.name), e.g. shmcounter_1234_ab12cd34")
    p.set_defaults(func=stat)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
