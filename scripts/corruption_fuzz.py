#!/usr/bin/env python3
"""Corruption fuzz, the long version: write one hostile value into one live word of
a real arena, drive the public API from a fresh process, classify what happened,
restore, repeat (procs/lab/corruption.py). Prints a table of the outcomes.

    python scripts/corruption_fuzz.py --iterations 3000 --seed 11
"""
from __future__ import annotations

import argparse
import sys

from procs.lab.corruption import CRASH, FOREIGN, HANG, fuzz


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000,
                        help="corruptions to try (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--timeout", type=float, default=0.5,
                        help="wait and drain timeouts of the driver and CPUs, s (default 0.5)")
    parser.add_argument("--hard-timeout", type=float, default=15.0,
                        help="seconds after which the driver is a hang (default 15)")
    parser.add_argument("--progress", action="store_true", help="print every try")
    args = parser.parse_args()
    if args.iterations < 1 or args.timeout <= 0 or args.hard_timeout <= args.timeout:
        parser.error("--iterations must be at least 1, --timeout > 0, --hard-timeout > --timeout")
    report = fuzz(args.iterations, seed=args.seed, timeout=args.timeout,
                  hard_timeout=args.hard_timeout, progress=args.progress)
    print(report.table())
    counts = report.counts
    return 1 if counts[CRASH] or counts[HANG] or counts[FOREIGN] or report.signalled else 0


if __name__ == "__main__":
    sys.exit(main())
