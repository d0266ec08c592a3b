"""shmcounter command line: bench | demo | stat.

Exit codes: 0 done; 1 the command failed; 2 bad arguments (argparse's usage
error, or an arena that cannot be opened); 130 bench interrupted by Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

from .errors import ArenaError
from .layout import Arena
from .memcg import Cgroups
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
    """This runs in a CPU process: n single-page charges to cgroup `name`
    (try_charge_memcg); returns how many succeeded."""
    g = Cgroups(arena).cgroup(name)
    return [g.try_charge(1) for _ in range(n)].count(True)


def demo(_: argparse.Namespace) -> int:
    """A short story on a cgroup: two CPUs charge it, their stocks grow, a limit
    hit drains every CPU's stock, a CPU is killed and its stock reclaimed."""
    from procs import Machine                 # the runtime uses the library, not back
    from .memcg.stat import format_cgroups
    with Arena.create(ncpus=2, max_counters=8) as arena:
        cg = Cgroups(arena)                   # the per-counter stock design, batch 64
        job = cg.create("job", max=200)
        with Machine(arena) as m:

            def state() -> str:
                mem = job.memory
                return (f"   memory.current {mem.usage} pages, stock {job.stock(0)} + "
                        f"{job.stock(1)} (CPU 0 + CPU 1), failcnt {mem.failcnt}, "
                        f"events.max {job.events['max']}")

            def step(cpu: int, n: int, what: str) -> None:
                ok = m.run_on(cpu, _charge_pages, arena, "job", n)
                print(f"\n== CPU {cpu} charges {n} page{'s' if n > 1 else ''}, one at a "
                      f"time: {ok} succeed{'s' if ok == 1 else ''}. {what}\n{state()}")

            print("A cgroup 'job' with memory.max = 200 pages; per-counter stock, batch "
                  "64; CPUs 0 and 1 are processes, one per core.")
            step(0, 1, "The slow path charges a batch of 64 and keeps 63 in CPU 0's "
                       "stock.")
            step(0, 10, "All 10 come from CPU 0's stock: memory.current does not move.")
            step(1, 100, "CPU 1 has its own stock: two batches, 28 pages left over.")
            step(1, 60, "Its stock runs dry; batches no longer fit under memory.max "
                        "(failcnt counts each), single pages do until 200. Then a page "
                        "is refused: try_charge drains every CPU's stock (a work message "
                        "to each; events.max counts the refusal) and retries: CPU 0's 53 "
                        "pages were stranded there.")
            step(1, 40, "They fit until 200; then the limit is real charges only: each "
                        "refused page drains and retries in vain (two events each).")
            job.memory.set_max(400)
            step(1, 5, "memory.max raised to 400: a miss refills CPU 1's stock again.")
            print(f"\n== SIGKILL CPU 1 (pid {m.pid(1)}); Machine.kill returns once the "
                  f"hotplug-dead path has run")
            reclaimed = m.kill(1)
            print(f"   reclaimed {reclaimed}; online CPUs {sorted(m.online)}\n{state()}")
            print(f"\n== shmcounter stat {arena.name}\n{format_stat(arena)}\n\n"
                  f"{format_cgroups(cg)}")
    return 0


def view(arena: Arena) -> str:
    """What stat prints: the counters, then the cgroup tree if the arena holds one."""
    from .memcg.stat import format_cgroups
    text = format_stat(arena)
    try:
        cg = Cgroups.open(arena)
    except ArenaError:
        return text                             # no cgroup tree
    return text + "\n\n" + format_cgroups(cg)


def stat(args: argparse.Namespace) -> int:
    try:
        arena = Arena.attach(args.arena)
    except ArenaError as exc:
        print(f"shmcounter stat: {exc}", file=sys.stderr)
        return 2
    try:
        if not args.watch:
            print(view(arena))
            return 0
        return watch(arena, 1.0 if args.interval is None else args.interval, args.count)
    finally:
        arena.close()


def watch(arena: Arena, interval: float, count: int | None) -> int:
    """Print view(arena) every `interval` seconds, `count` times (None: until
    Ctrl-C, which exits cleanly with 0). On a terminal each view replaces the
    last one; otherwise they follow each other, separated by a blank line. Stops
    when the creator has unlinked the arena: the numbers would never change."""
    clear = "\x1b[H\x1b[2J" if sys.stdout.isatty() else "\n"
    shown = 0
    try:
        while True:
            screen = view(arena)
            print(("" if shown == 0 and clear == "\n" else clear)
                  + f"{time.strftime('%H:%M:%S')}, every {interval:g} s (Ctrl-C stops)\n"
                  + screen, flush=True)
            shown += 1
            if count is not None and shown >= count:
                return 0
            if not os.path.exists(f"/dev/shm/{arena.name}"):
                print(f"arena {arena.name} was unlinked by its creator; stopping")
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:
        print()
        return 0


def bench(args: argparse.Namespace) -> int:
    """Run the benchmark (procs/bench.py), print the report, write JSON and PNG."""
    from dataclasses import replace

    from procs import bench as harness
    from procs.plot import plot
    from procs.report import format_report
    from tqdm import tqdm

    base = harness.QUICK if args.quick else harness.Config()
    given = {k: getattr(args, k) for k in ("cpus", "cgroups", "designs", "trials", "work",
                                           "pages", "drains", "kills")}
    config = replace(base, **{k: v for k, v in given.items() if v is not None})
    tqdm.monitor_interval = 0                  # no monitor thread: the bench forks CPUs
    # A bar on a terminal only (disable=None); the report goes to stdout.
    bar = tqdm(total=config.steps, desc="shmcounter bench", unit="run", disable=None,
               file=sys.stderr, leave=False)

    def progress(label: str) -> None:
        bar.set_postfix_str(label, refresh=False)
        bar.update()

    try:
        results = harness.run(config, progress)
    except KeyboardInterrupt:
        bar.close()
        print("shmcounter bench: interrupted; every CPU process was stopped and every "
              "arena unlinked", file=sys.stderr)
        return 130
    bar.close()
    print(format_report(results))
    args.json.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.png)
    print(f"\nresults: {args.json}\nplot: {args.png}")
    return 0


# ---- arguments ------------------------------------------------------------------

def _ints(what: str, lo: int, hi: int) -> Callable[[str], tuple[int, ...]]:
    """An argparse type: comma-separated ints in [lo, hi], sorted, no repeats."""
    def parse(text: str) -> tuple[int, ...]:
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            values = []
        if not values or not all(lo <= v <= hi for v in values) or len(set(values)) < len(values):
            raise argparse.ArgumentTypeError(
                f"{what} must be distinct comma-separated ints in [{lo}, {hi}], got {text!r}")
        return tuple(sorted(values))
    return parse


def _int(what: str, lo: int, hi: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = lo - 1
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{what} must be an int in [{lo}, {hi}], "
                                             f"got {text!r}")
        return value
    return parse


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.01 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"the interval must be a number of seconds in "
                                         f"[0.01, 3600], got {text!r}")
    return value


def _designs(text: str) -> tuple[str, ...]:
    from procs.bench import DESIGNS
    names = tuple(text.split(","))
    unknown = [n for n in names if n not in DESIGNS]
    if unknown or len(set(names)) < len(names):
        raise argparse.ArgumentTypeError(
            f"designs must be distinct names among {', '.join(DESIGNS)}, got {text!r}")
    return tuple(d for d in DESIGNS if d in names)       # legacy first: the baseline


def _output(text: str) -> Path:
    path = Path(text)
    folder = path.parent.resolve()
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {folder} is not a "
                                         f"writable folder")
    return path


BENCH_HELP = """\
The series' benchmark (cover letter: page faults, then MADV_DONTNEED, in 1, 4
and 32 cgroups) on real processes: P CPU processes each charge pages one by one
to their cgroups, interleaved page by page, then uncharge them per cgroup. Every
design runs side by side in one run, in turns within each trial:

  legacy    the old memcg_stock_pcp: 7 cached cgroups per CPU
  fixed     per-counter stock (the series, U0/v4 order)
  no-stock  fixed with batch 0: every charge walks the hierarchy
  mp-value  the peer: a multiprocessing.Value with its lock per cgroup

Prints the time per iteration as the cover letter does (delta against legacy),
throughput ratios, hierarchy walks and evictions per op, drain latency and
kill-to-reclaimed time, and whether the goals are met; writes the results as
JSON and a PNG plot of throughput against CPU and cgroup counts. The defaults
take about 2 minutes on 2 cores; --quick is a smoke run of a few seconds."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="shmcounter",
        description="Hierarchical page counters with per-CPU charge stock in shared memory.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("bench", help="the multi-core benchmark: every design side by side",
                       description=BENCH_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpus", type=_ints("CPU counts", 1, 64), metavar="N,N",
                   help="CPU process counts (default 1,2)")
    p.add_argument("--cgroups", type=_ints("cgroup counts", 1, 512), metavar="N,N",
                   help="cgroup counts (default 1,4,32)")
    p.add_argument("--designs", type=_designs, metavar="NAME,NAME",
                   help="designs to run (default all: legacy,fixed,no-stock,mp-value)")
    p.add_argument("--trials", type=_int("trials", 1, 1000), metavar="N",
                   help="trials; each runs every cell once (default 20)")
    p.add_argument("--work", type=_int("work", 1, 10**8), metavar="PAGES",
                   help="pages each CPU charges per cell, rounded up to whole "
                        "iterations (default 60000)")
    p.add_argument("--pages", type=_int("pages", 1, 10**6), metavar="N",
                   help="pages per cgroup per iteration (default 128)")
    p.add_argument("--drains", type=_int("drains", 0, 10**4), metavar="N",
                   help="timed drains per design per trial (default 20)")
    p.add_argument("--kills", type=_int("kills", 0, 1000), metavar="N",
                   help="timed kills per design per trial (default 1)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run of a few seconds (2 trials, little work); "
                        "options given still apply")
    p.add_argument("--json", type=_output, default=Path("shmcounter-bench.json"),
                   metavar="PATH", help="results file (default shmcounter-bench.json)")
    p.add_argument("--png", type=_output, default=Path("shmcounter-bench.png"),
                   metavar="PATH", help="plot file (default shmcounter-bench.png)")
    p.set_defaults(func=bench)

    p = sub.add_parser("demo", help="a short scenario: charges, stock, a limit, a kill",
                       description=demo.__doc__)
    p.set_defaults(func=demo)

    p = sub.add_parser("stat", help="counters, cgroups and per-CPU stocks of a running arena",
                       description="Print the counters and per-CPU stocks of a running "
                                   "arena, and its cgroups if it holds a cgroup tree.")
    p.add_argument("arena", help="the arena's name (Arena.name), e.g. shmcounter_1234_ab12cd34")
    p.add_argument("--watch", action="store_true",
                   help="refresh the view until Ctrl-C (exit code 0)")
    p.add_argument("--interval", type=_interval, metavar="S",
                   help="seconds between refreshes with --watch (default 1)")
    p.add_argument("--count", type=_int("count", 1, 10**9), metavar="N",
                   help="with --watch: stop after N views")
    p.set_defaults(func=stat, error=p.error)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.func is stat and not args.watch and (args.interval, args.count) != (None, None):
        args.error("--interval and --count go with --watch")
    try:
        return args.func(args)
    except BrokenPipeError:              # e.g. `shmcounter stat NAME | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
