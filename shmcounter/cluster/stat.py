"""The read view of a cluster tree: `shmcounter stat --cluster URL`."""
from __future__ import annotations

from .tree import Cluster


def view(cl: Cluster) -> str:
    """The tree (usage, max, failcnt, watermark), each live host's lease and its
    unused part per counter, and the hosts reaped, from one atomic snapshot."""
    snap = cl.snapshot()
    lines = [f"cluster {cl.namespace!r} at {cl.url}: {len(snap.leases)} live host(s), "
             f"{snap.stats.get('reaped', 0)} reaped ({snap.stats.get('reaped_pages', 0)} "
             f"pages), {snap.stats.get('left', 0)} left, {snap.stats.get('drains', 0)} "
             f"drains", "",
             f"{'counter':<24} {'parent':<16} {'usage':>10} {'max':>16} {'failcnt':>8} "
             f"{'watermark':>10}"]
    for name, f in snap.counters.items():
        lines.append(f"{name:<24} {f['parent'] or '-':<16} {f['usage']:>10} {f['max']:>16} "
                     f"{f['failcnt']:>8} {f['watermark']:>10}")
    lines += ["", "live hosts: lease = pages charged to the cluster (used + unused); "
                  "unused as of the host's last heartbeat",
              f"{'host':<16} {'epoch':>6} {'ttl ms':>7} {'counter':<24} {'lease':>10} "
              f"{'unused':>8}"]
    for host in sorted(snap.leases):
        lease = snap.leases[host]
        head = f"{host:<16} {snap.epochs.get(host, 0):>6} {snap.ttl_ms.get(host, -2):>7}"
        if not lease:
            lines.append(f"{head} {'-':<24} {0:>10} {0:>8}")
        for c in sorted(lease):
            lines.append(f"{head} {c:<24} {lease[c]:>10} "
                         f"{snap.unused.get(host, {}).get(c, 0):>8}")
            head = " " * len(head)
    lines += ["", "hosts reaped or left, newest first: host epoch pages why"]
    lines += [f"  {r}" for r in snap.reaped] or ["  none"]
    return "\n".join(lines)
