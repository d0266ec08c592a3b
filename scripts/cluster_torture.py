#!/usr/bin/env python3
"""Cluster torture, the long version: whole hosts (process groups of a main process
and its CPUs) SIGKILLed or SIGSTOPped at random while they charge a limited
cluster tree, every invariant checked after each fault (shmcounter/cluster/fleet.py,
torture). Runs its own redis-server (Cluster.embedded).

    python scripts/cluster_torture.py --faults 300
"""
from __future__ import annotations

import argparse
import sys

from shmcounter.cluster import Cluster
from shmcounter.cluster.fleet import torture


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=200, help="host faults (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--hosts", type=int, default=3, help="hosts (default 3)")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs per host (default 2)")
    parser.add_argument("--ttl", type=float, default=1.0, help="lease TTL, s (default 1)")
    args = parser.parse_args()
    if args.faults < 1 or args.hosts < 2 or args.cpus < 1 or args.ttl < 0.1:
        parser.error("--faults >= 1, --hosts >= 2, --cpus >= 1, --ttl >= 0.1")
    with Cluster.embedded() as cl:
        report = torture(cl, args.faults, seed=args.seed, nhosts=args.hosts,
                         ncpus=args.cpus, ttl=args.ttl, progress=True)
    print(report)
    return 1 if report.violations else 0


if __name__ == "__main__":
    sys.exit(main())
