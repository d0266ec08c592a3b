"""shmcounter.cluster: a counter tree held in Redis, with hosts as its CPUs.

The per-CPU stock design one level up: a host (a machine, its arena) holds a
lease on cluster counters, as a CPU holds a stock on a page_counter; its death
(its lease's TTL expired) is hotplug, reaped exactly once; a limit hit
broadcasts a drain. See docs/design.md, "Across machines: the cluster on Redis".

    cl = Cluster.embedded()                 # or Cluster.connect(url, namespace)
    root = cl.new_counter("root", max=1000)
    cl.new_counter("job", parent=root)
    host = cl.join(arena, host="a", ttl=2.0, batch=64)
    ok, refusing = host.counter("job").try_charge(10)
"""
from .errors import ClusterError, HostStale
from .host import Host, HostCounter, HostView
from .lua import CLUSTER_MAX
from .server import RedisServer
from .tree import Cluster, ClusterCounter, Snapshot

__all__ = ["CLUSTER_MAX", "Cluster", "ClusterCounter", "ClusterError", "Host",
           "HostCounter", "HostStale", "HostView", "RedisServer", "Snapshot"]
