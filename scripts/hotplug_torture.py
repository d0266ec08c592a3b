#!/usr/bin/env python3
"""Hotplug torture, the long version: random SIGKILLs of CPU processes charging a
limited tree, with every invariant checked after every kill (procs/lab/torture.py).

    python scripts/hotplug_torture.py --kills 10000
    python scripts/hotplug_torture.py --kills 3000 --design legacy --aim op
    python scripts/hotplug_torture.py --kills 2000 --design v4
"""
from __future__ import annotations

import argparse
import sys

from procs.lab.torture import AIMS, DESIGNS, torture


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=1000, help="SIGKILLs to make (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--cpus", type=int, default=4, help="CPU processes (default 4)")
    parser.add_argument("--start-method", choices=["fork", "forkserver"], default="fork")
    parser.add_argument("--design", choices=DESIGNS, default="page_counter",
                        help="the per-counter stock (page_counter, default), the old "
                             "7-slot memcg stock (legacy), or the lockless per-counter "
                             "stock with a requester process that is not a CPU (v4)")
    parser.add_argument("--aim-every", type=int, default=4, metavar="N",
                        help="aim every N-th kill (default 4; 0: never)")
    parser.add_argument("--aim", choices=AIMS, default="alternate",
                        help="where aimed kills land: at an operation in flight (flight: its "
                             "ledger written, not yet updated), inside its op (op: that, and "
                             "the victim's writer row has its op word set), v4: a CPU inside "
                             "its drain op (drain), the requester inside its drain op "
                             "(requester), a CPU between its deposit's CAS intent and its "
                             "mark (deposit), or these in turn (alternate, default)")
    args = parser.parse_args()
    if args.kills < 1 or args.cpus < 1 or args.aim_every < 0:
        parser.error("--kills and --cpus must be at least 1, --aim-every at least 0")
    report = torture(args.kills, seed=args.seed, ncpus=args.cpus,
                     start_method=args.start_method, design=args.design,
                     aim_every=args.aim_every, aim=args.aim, progress=True)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
