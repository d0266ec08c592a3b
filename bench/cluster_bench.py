#!/usr/bin/env python3
"""The cluster on Redis against its peer, side by side in one run.

    python bench/cluster_bench.py [--seconds 1.0] [--hosts 1,2,4,8]
                                  [--counters 1,32,1024] [--batch 64] [--rounds 3]
                                  [--kills 5] [--growing]
                                  [--json docs/cluster-bench.json]
                                  [--png docs/cluster-bench.png]
    python bench/cluster_bench.py --profile

One redis-server (Cluster.embedded, loopback). Hosts are fleet.HostProcess
process groups of 2 CPU processes each. The tree: root > c0 .. c{N-1}, limits
that never bind (root 10**12, each c 10**9): the same for both designs.

  ours  each CPU runs a random walk on its counters: a charge or an uncharge of
        1 page, half and half (an uncharge only of a page it holds), through
        host.counter(c): lease hits are local; a refill is one EVALSHA.
  peer  the same walk, each charge one EVALSHA of a hierarchical Lua limiter on
        the same tree shape (check and add at every level, undo below a refusal)
        and each uncharge one EVALSHA: no lease.

Hosts of the throughput cells have a TTL of 10 s: 8 hosts of 2 spinning CPUs on
2 cores starve heartbeats (a reaped host rejoins; the cell says how often).
For each (hosts, counters): ops/s of all CPUs together, ours and the peer in
turns, --rounds times, medians; EVALSHA calls per charged page (the server's
commandstats over ours' whole runs, heartbeats included, over the pages charged
in the measured windows: the leases fill in the 0.3 s + 1 ms per counter not
measured). Both walks
follow one precomputed random plan (counter, coin) per CPU, so that drawing
random numbers costs neither of them; by default a steady one (each counter's
steps uncharge as often as they charge: usage stays level), with --growing
independent coins (some counters grow every pass: their leases keep refilling).
Then reclaim: a host holding leases is SIGKILLed, the time until the live
hosts' heartbeats reaped it (TTL 1 s), --kills times.
--profile instead: where a lease hit's time goes, in this one process (timeit,
minimum of 5 runs): a HostCounter's try_charge(1) + uncharge(1), its mirror
counter's own C pair, and one time.monotonic_ns().
No timing assertion anywhere: this prints, and writes JSON and a PNG.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
import timeit
from pathlib import Path
from typing import Any

import redis

from shmcounter import Arena
from shmcounter.cluster import Cluster, HostStale
from shmcounter.cluster.fleet import HostProcess
from shmcounter.cluster.host import HostView

PEER_LUA = r"""
-- ARGV: ns, name, n (n < 0: uncharge). One hierarchical limiter call: walk from
-- `name` up, add n at every level; over max at a level: undo, failcnt, refuse.
local ns, name, n = ARGV[1], ARGV[2], tonumber(ARGV[3])
local path, c = {}, name
while c and c ~= '' do
  path[#path + 1] = c
  c = redis.call('HGET', ns .. ':c:' .. c, 'parent')
end
for i = 1, #path do
  local k = ns .. ':c:' .. path[i]
  local new = redis.call('HINCRBY', k, 'usage', n)
  if n > 0 and new > tonumber(redis.call('HGET', k, 'max')) then
    redis.call('HINCRBY', k, 'failcnt', 1)
    for j = 1, i do redis.call('HINCRBY', ns .. ':c:' .. path[j], 'usage', -n) end
    return 0
  end
end
return 1
"""


def walk_ours(host: HostView, cpu: int, names: list[str], warmup: float, seconds: float,
              seed: int, steady: bool) -> dict[str, int]:
    """A CPU's random walk through its host's leases; counts after the warm-up.
    A host reaped meanwhile (a heartbeat starved past its TTL on a loaded
    machine) loses its pages; the walk goes on at the next epoch, and says so."""
    plan = _plan(len(names), seed * 10 + cpu, steady=steady)
    handles = [host.counter(n) for n in names]
    held = [0] * len(handles)
    ops = charged = stale = 0
    t_end = time.monotonic() + warmup + seconds
    t_measure = t_end - seconds
    measuring = False
    while True:
        try:
            for i, coin in plan:
                if held[i] and coin:
                    handles[i].uncharge(1)
                    held[i] -= 1
                elif handles[i].try_charge(1)[0]:
                    held[i] += 1
                    charged += measuring
                ops += measuring
        except HostStale:
            stale += 1
            while host.stale:
                time.sleep(0.01)
            handles = [host.counter(n) for n in names]
            held = [0] * len(handles)
        now = time.monotonic()
        if now >= t_end:
            break
        if not measuring and now >= t_measure:
            measuring = True
    for h, n in zip(handles, held, strict=True):
        if n:
            h.uncharge(n)
    return {"ops": ops, "charged": charged, "stale": stale}


def walk_peer(host: HostView, cpu: int, names: list[str], warmup: float, seconds: float,
              seed: int, steady: bool, ns: str) -> dict[str, int]:
    """The same walk, one Lua limiter call per charge and per uncharge."""
    client = redis.Redis.from_url(host.url, decode_responses=True)
    sha = client.script_load(PEER_LUA)
    plan = _plan(len(names), seed * 10 + cpu, steady=steady)
    k = 0
    held = [0] * len(names)
    ops = charged = 0
    t_end = time.monotonic() + warmup + seconds
    t_measure = t_end - seconds
    measuring = False
    while True:
        k = (k + 8) % len(plan)
        for i, coin in plan[k:k + 8]:
            if held[i] and coin:
                client.evalsha(sha, 0, ns, names[i], -1)
                held[i] -= 1
            elif client.evalsha(sha, 0, ns, names[i], 1):
                held[i] += 1
                charged += measuring
            ops += measuring
        now = time.monotonic()
        if now >= t_end:
            break
        if not measuring and now >= t_measure:
            measuring = True
    for name, n in zip(names, held, strict=True):
        if n:
            client.evalsha(sha, 0, ns, name, -n)
    client.close()
    return {"ops": ops, "charged": charged, "stale": 0}


def _plan(ncounters: int, seed: int, length: int = 4096,
          steady: bool = True) -> list[tuple[int, bool]]:
    """The walk's steps: (counter index, uncharge if it holds a page). Steady:
    each counter's steps uncharge as often as they charge, shuffled, so that
    usage stays level pass after pass; not steady: independent coins, so that
    some counters' usage grows every pass (their leases refill every batch)."""
    rng = random.Random(seed)
    if not steady:
        return [(rng.randrange(ncounters), rng.random() < 0.5) for _ in range(length)]
    steps = []
    for _ in range(length // 2):
        i = rng.randrange(ncounters)
        steps += [(i, False), (i, True)]
    rng.shuffle(steps)
    return steps


def build_tree(cl: Cluster, ncounters: int) -> list[str]:
    root = cl.new_counter("root", max=10**12)
    return [cl.new_counter(f"c{i}", parent=root, max=10**9).name for i in range(ncounters)]


def measure(hosts: list[HostProcess], cl: Cluster, fn: Any, args: tuple,
            seconds: float) -> dict[str, float]:
    before = cl.redis_calls()
    for p in hosts:
        p.call(fn, *args)
    for p in hosts:
        p.wait()
    results = [r for p in hosts for r in p.results()]
    calls = cl.redis_calls() - before
    ops = sum(r["ops"] for r in results)
    charged = sum(r["charged"] for r in results)
    return {"ops_per_s": ops / seconds, "charged": charged, "calls": calls,
            "stale": sum(r["stale"] for r in results)}


def run(seconds: float, host_counts: list[int], counter_counts: list[int], batch: int,
        kills: int, rounds: int, steady: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"seconds": seconds, "batch": batch, "steady": steady, "cells": [],
                           "reclaim_s": []}
    with Cluster.embedded("ours") as cl:
        peer_ns = "peer"
        out["redis_version"] = cl.client.info("server")["redis_version"]
        for ncounters in counter_counts:
            # a fresh tree per counter count: new namespaces, same server
            ours = Cluster.connect(cl.url, f"ours{ncounters}")
            peer = Cluster.connect(cl.url, f"{peer_ns}{ncounters}")
            names = build_tree(ours, ncounters)
            build_tree(peer, ncounters)
            fleet: list[HostProcess] = []
            try:
                for nhosts in host_counts:
                    while len(fleet) < nhosts:
                        fleet.append(HostProcess(cl.url, ours.namespace, f"h{len(fleet)}",
                                                 ttl=10.0, batch=batch,
                                                 max_counters=ncounters + 64))
                    hosts = fleet[:nhosts]
                    # ours and the peer in turns, `rounds` times: both see the
                    # machine's noise alike; the cell keeps the medians
                    o, pe = [], []
                    # leases fill on each counter's first charges: 1 ms a counter
                    warmup = 0.3 + ncounters / 1000
                    for r in range(rounds):
                        o.append(measure(hosts, ours, walk_ours,
                                         (names, warmup, seconds, nhosts * 100 + r, steady),
                                         seconds))
                        pe.append(measure(hosts, peer, walk_peer,
                                          (names, 0.1, seconds, nhosts * 100 + r, steady,
                                           peer.namespace), seconds))
                    ops = statistics.median(m["ops_per_s"] for m in o)
                    peer_ops = statistics.median(m["ops_per_s"] for m in pe)
                    # calls over each whole run (warm-up and the final uncharges
                    # included), pages charged in its measured window only: an
                    # upper bound of the steady state's calls per page
                    calls = sum(m["calls"] for m in o)
                    charged = sum(m["charged"] for m in o)
                    cell = {"hosts": nhosts, "counters": ncounters, "ours_ops_s": ops,
                            "peer_ops_s": peer_ops, "ratio": ops / peer_ops,
                            "ours_rounds": [m["ops_per_s"] for m in o],
                            "peer_rounds": [m["ops_per_s"] for m in pe],
                            "calls_per_page": calls / max(charged, 1),
                            "reaped_while_measured": sum(m["stale"] for m in o)}
                    out["cells"].append(cell)
                    print(f"hosts {nhosts:2d} counters {ncounters:5d}: ours "
                          f"{ops:10,.0f} ops/s, peer {peer_ops:8,.0f} ops/s, "
                          f"x{cell['ratio']:6.1f}; EVALSHA per charged page: ours "
                          f"{cell['calls_per_page']:.4f} (1/batch = {1 / batch:.4f})",
                          flush=True)
            finally:
                for p in fleet:
                    p.close()
                ours.close()
                peer.close()
        out["reclaim_s"] = reclaim(cl, kills)
    return out


def reclaim(cl: Cluster, kills: int) -> list[float]:
    """SIGKILL a host holding leases, time until the live hosts reaped it."""
    ns = Cluster.connect(cl.url, "reclaim")
    ns.new_counter("job")
    times = []
    live = HostProcess(cl.url, ns.namespace, "live", ttl=1.0)
    try:
        for k in range(kills):
            victim = HostProcess(cl.url, ns.namespace, "victim", ttl=1.0)
            assert victim.charge("job", 5) == (True, None)
            epoch = str(ns.client.get("reclaim:live:victim"))
            t0 = time.monotonic()
            victim.kill()
            while not any(r.startswith(f"victim {epoch} ") for r in ns.snapshot().reaped):
                time.sleep(0.005)
            times.append(time.monotonic() - t0)
            print(f"kill {k + 1}: reaped {times[-1]:.3f} s after SIGKILL (TTL 1 s)",
                  flush=True)
    finally:
        live.close()
        ns.close()
    return times


def plot(out: dict[str, Any], png: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for ncounters in sorted({c["counters"] for c in out["cells"]}):
        cells = [c for c in out["cells"] if c["counters"] == ncounters]
        hosts = [c["hosts"] for c in cells]
        ax1.plot(hosts, [c["ours_ops_s"] for c in cells], "o-", label=f"ours, {ncounters} c")
        ax1.plot(hosts, [c["peer_ops_s"] for c in cells], "x--", label=f"peer, {ncounters} c")
        ax2.plot(hosts, [c["calls_per_page"] for c in cells], "o-", label=f"{ncounters} c")
    ax1.set(xscale="log", yscale="log", xlabel="hosts (2 CPUs each)", ylabel="ops/s",
            title="charge/uncharge throughput")
    ax2.axhline(1 / out["batch"], color="grey", ls=":", label="1/batch")
    ax2.set(xscale="log", yscale="log", xlabel="hosts (2 CPUs each)",
            ylabel="EVALSHA per charged page", title="Redis calls, ours")
    for ax in (ax1, ax2):
        ax.set_xticks(sorted({c["hosts"] for c in out["cells"]}))
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.get_xaxis().set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def profile_hit(batch: int, number: int = 200_000) -> dict[str, float]:
    """ns per lease-hit pair (try_charge(1), uncharge(1)) of a host counter, of its
    mirror's C ops alone, and per monotonic_ns(): one host, one counter, here."""
    cl = Cluster.embedded()
    try:
        cl.new_counter("root")
        cl.new_counter("c", parent="root")
        with Arena.create(ncpus=1) as arena:
            host = cl.join(arena, host="profile", ttl=10, batch=batch)
            try:
                c = host.counter("c")
                assert c.try_charge(1)[0]           # the lease fills: a refill
                m = c.mirror
                names = {"c": c, "m": m, "time": time}

                def ns(stmt: str) -> float:
                    return min(timeit.repeat(stmt, globals=names, number=number,
                                             repeat=5)) / number * 1e9
                out = {"host pair": ns("c.try_charge(1); c.uncharge(1)"),
                       "mirror pair": ns("m.try_charge(1); m.uncharge(1)"),
                       "monotonic_ns": ns("time.monotonic_ns()")}
                c.uncharge(1)
            finally:
                host.leave()
    finally:
        cl.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda s: [int(x) for x in s.split(",")]   # noqa: E731
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--hosts", type=ints, default=[1, 2, 4, 8])
    parser.add_argument("--counters", type=ints, default=[1, 32, 1024])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--kills", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--growing", action="store_true",
                        help="independent coins: some counters' usage grows every pass "
                             "(default: steady, each counter uncharges as often as it "
                             "charges)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--png", type=Path, default=None)
    parser.add_argument("--profile", action="store_true",
                        help="only where a lease hit's time goes, in one process")
    args = parser.parse_args()
    if args.profile:
        for what, ns in profile_hit(args.batch).items():
            print(f"{what:>14}: {ns:6.0f} ns")
        return
    out = run(args.seconds, args.hosts, args.counters, args.batch, args.kills, args.rounds,
              not args.growing)
    cells = out["cells"]
    r = out["reclaim_s"]
    print(f"\nratio ours/peer: min {min(c['ratio'] for c in cells):.0f}x, median "
          f"{statistics.median(c['ratio'] for c in cells):.0f}x (goal >= 100x)")
    print(f"EVALSHA per charged page: max {max(c['calls_per_page'] for c in cells):.4f} "
          f"(goal <= 1/batch = {1 / args.batch:.4f})")
    if r:
        print(f"reclaim after SIGKILL: median {statistics.median(r):.2f} s, max {max(r):.2f} s "
              f"(goal <= TTL + 1 = 2 s)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    if args.png:
        plot(out, args.png)


if __name__ == "__main__":
    main()
