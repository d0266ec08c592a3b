"""`shmcounter demo --cluster`: a short story on an embedded redis-server.

Two hosts (process groups with their own arena and CPUs) share a cluster tree;
one holds a lease, the other's charge at the limit drains it; then the first is
killed with SIGKILL and a live host reaps it within its TTL.
"""
from __future__ import annotations

import time

from .fleet import HostProcess
from .stat import view
from .tree import Cluster


def demo() -> None:
    with Cluster.embedded("demo") as cl:
        print(f"redis-server {cl.client.info('server')['redis_version']} at {cl.url}\n")
        root = cl.new_counter("root", max=200)
        job = cl.new_counter("job", parent=root, max=100)
        print("tree: root (max 200) > job (max 100); hosts a and b, batch 64, TTL 1 s\n")
        a = HostProcess(cl.url, cl.namespace, "a", ttl=1.0, batch=64)
        b = HostProcess(cl.url, cl.namespace, "b", ttl=1.0, batch=64)
        try:
            print(f"a charges 10 pages of job: {a.charge('job', 10)}; its lease is a "
                  f"batch: job usage {job.usage}")
            print(f"a charges 20 more: {a.charge('job', 20)}, from its lease: job usage "
                  f"{job.usage} (no Redis call)")
            print(f"b charges 60: {b.charge('job', 60)}: its batch of 64 and then 60 "
                  f"exact were refused at job (64 + 60 > 100); the drain took a's "
                  f"unused 34 back; job usage {job.usage}, failcnt {job.failcnt}\n")
            time.sleep(0.5)                           # a heartbeat: unused leases
            print(view(cl) + "\n")
            t0 = time.monotonic()
            a.kill()
            print("a: SIGKILL")
            while "a" in cl.snapshot().leases:
                time.sleep(0.01)
            print(f"b's heartbeat reaped a {time.monotonic() - t0:.2f} s later: job usage "
                  f"{job.usage} (b's lease alone)\n")
            print(view(cl))
        finally:
            a.kill()
            b.close()
