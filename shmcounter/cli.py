"""shmcounter command line: bench | demo | explore | stat | cluster reap.

Exit codes: 0 done; 1 the command failed (explore: a violation found); 2 bad
arguments (argparse's usage error, or an arena that cannot be opened, or an
unknown scenario, design or token); 130 bench interrupted by Ctrl-C.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .arena import Arena
from .errors import ArenaError
from .stat import view

if TYPE_CHECKING:
    from .cluster import Cluster


def stat(args: argparse.Namespace) -> int:
    if args.cluster is not None:
        return cluster_stat(args)
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


def _connect(args: argparse.Namespace) -> Cluster | None:
    from .cluster import Cluster, ClusterError
    try:
        return Cluster.connect(args.cluster, args.namespace)
    except (ClusterError, ValueError) as exc:
        print(f"shmcounter: {exc}", file=sys.stderr)
        return None


def cluster_stat(args: argparse.Namespace) -> int:
    """The cluster tree at URL: counters, live hosts' leases, hosts reaped."""
    from .cluster.stat import view as cluster_view
    cl = _connect(args)
    if cl is None:
        return 2
    try:
        print(cluster_view(cl))
    finally:
        cl.close()
    return 0


def cluster_reap(args: argparse.Namespace) -> int:
    """Reap every host whose lease expired (each exactly once)."""
    cl = _connect(args)
    if cl is None:
        return 2
    try:
        reaped = cl.reap()
    finally:
        cl.close()
    for host, pages in reaped.items():
        print(f"reaped {host}: {pages} pages uncharged")
    if not reaped:
        print("no expired host")
    return 0


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


def demo(args: argparse.Namespace) -> int:
    """A short story on a cgroup: two CPUs charge it, their stocks grow, a limit
    hit drains every CPU's stock, a CPU is killed and its stock reclaimed.
    --cluster: the same one level up, two hosts on an embedded redis-server."""
    if args.cluster:
        from .cluster.demo import demo as run_cluster_demo
        run_cluster_demo()
        return 0
    from procs.lab.demo import demo as run_demo
    run_demo()
    return 0


def bench(args: argparse.Namespace) -> int:
    """Run the benchmark (procs/lab/bench.py), print the report, write JSON and PNG."""
    from dataclasses import replace

    from tqdm import tqdm

    from procs.lab import bench as harness
    from procs.lab.plot import plot
    from procs.lab.report import format_report

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


def explore(args: argparse.Namespace) -> int:
    from . import explore as ex
    if args.list:
        for s in ex.scenarios():
            print(f"{s.name:16s} {s.title}\n{'':16s} designs: {', '.join(s.designs)}; "
                  f"processes: {', '.join(p.does for p in s.procs)}"
                  + (f"\n{'':16s} {s.note}" if s.note else ""))
        return 0
    if args.scenario is None or args.design is None:
        args.error("give a SCENARIO and --design NAME (or --list)")
    try:
        report = ex.explore(args.scenario, args.design, bound=args.bound, pct_runs=args.pct,
                            replay_token=args.replay, seed=args.seed,
                            stop_at_first=args.first)
    except ValueError as exc:
        print(f"shmcounter explore: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.as_dict(), indent=1) if args.json else report.text())
    return 1 if report.found else 0


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
    from procs.lab.bench import DESIGNS
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
  v4        the series' v4: a lockless stock word per counter and CPU, drained
            by the caller itself (no work message)
  v4-cap    v4 with the E14 cap: a deposit above batch drains the word

Prints the time per iteration as the cover letter does (delta against legacy),
throughput ratios, hierarchy walks and evictions per op, drain latency and
kill-to-reclaimed time, and whether the goals are met; writes the results as
JSON and a PNG plot of throughput against CPU and cgroup counts. The defaults
take about 2 minutes on 2 cores; --quick is a smoke run of a few seconds."""


EXPLORE_HELP = """\
Run a scenario's processes (real CPU processes, and a plain attached process
where it needs one) one step at a time under a controller: every step on the
arena's words is a scheduling point. Explores every schedule with at most K
preemptions (--bound), or random PCT schedules (--pct), and checks the
invariants after each schedule against the scenario's ledger, and usage and
stock >= 0 after every step. Prints the schedules run, the distinct final
states, each violation with its numbers, the first violating schedule as a
trace and its replay token. Exit code 1 when a violation is found."""


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
                   help="designs to run (default all: legacy,fixed,no-stock,mp-value,v4,"
                        "v4-cap)")
    p.add_argument("--trials", type=_int("trials", 1, 1000), metavar="N",
                   help="trials; each runs every cell once (default 20)")
    p.add_argument("--work", type=_int("work", 1, 10**8), metavar="PAGES",
                   help="pages each CPU charges per cell, rounded up to whole "
                        "iterations (default 300000)")
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
    p.add_argument("--cluster", action="store_true",
                   help="hosts sharing a cluster tree on an embedded redis-server")
    p.set_defaults(func=demo)

    p = sub.add_parser("explore", help="explore the schedules of a race scenario",
                       description=EXPLORE_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scenario", nargs="?", metavar="SCENARIO", help="a built-in scenario (--list)")
    p.add_argument("--list", action="store_true", help="list the built-in scenarios")
    p.add_argument("--design", metavar="NAME", help="the design to run it under")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--bound", type=_int("bound", 0, 10), metavar="K",
                     help="every schedule with at most K preemptions (default 2)")
    how.add_argument("--pct", type=_int("runs", 1, 10**6), metavar="RUNS",
                     help="RUNS random schedules (PCT, depth 3)")
    how.add_argument("--replay", metavar="TOKEN", help="run exactly this schedule again")
    p.add_argument("--first", action="store_true",
                   help="stop at the first violating schedule")
    p.add_argument("--seed", type=_int("seed", 0, 2**31), default=0, metavar="N",
                   help="PCT's seed (default 0)")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(func=explore, error=p.error)

    p = sub.add_parser("stat", help="counters, cgroups and per-CPU stocks of a running arena",
                       description="Print the counters and per-CPU stocks of a running "
                                   "arena, and its cgroups if it holds a cgroup tree.")
    p.add_argument("arena", nargs="?",
                   help="the arena's name (Arena.name), e.g. shmcounter_1234_ab12cd34")
    p.add_argument("--cluster", metavar="URL",
                   help="show the cluster tree on the Redis server at URL instead "
                        "(e.g. redis://127.0.0.1:6379/0)")
    p.add_argument("--namespace", default="shmcounter",
                   help="the cluster's namespace, with --cluster (default shmcounter)")
    p.add_argument("--watch", action="store_true",
                   help="refresh the view until Ctrl-C (exit code 0)")
    p.add_argument("--interval", type=_interval, metavar="S",
                   help="seconds between refreshes with --watch (default 1)")
    p.add_argument("--count", type=_int("count", 1, 10**9), metavar="N",
                   help="with --watch: stop after N views")
    p.set_defaults(func=stat, error=p.error)

    p = sub.add_parser("cluster", help="cluster operations: reap",
                       description="Operations on a cluster tree held in Redis.")
    csub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = csub.add_parser("reap", help="reap every host whose lease expired",
                        description=cluster_reap.__doc__)
    c.add_argument("cluster", metavar="URL", help="the Redis server, e.g. "
                                                  "redis://127.0.0.1:6379/0")
    c.add_argument("--namespace", default="shmcounter",
                   help="the cluster's namespace (default shmcounter)")
    c.set_defaults(func=cluster_reap)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.func is stat and not args.watch and (args.interval, args.count) != (None, None):
        args.error("--interval and --count go with --watch")
    if args.func is stat and (args.arena is None) == (args.cluster is None):
        args.error("give an arena's name, or --cluster URL")
    if args.func is stat and args.cluster is not None and args.watch:
        args.error("--watch goes with an arena")
    try:
        return args.func(args)
    except BrokenPipeError:              # e.g. `shmcounter stat NAME | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
