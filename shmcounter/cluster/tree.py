"""Cluster: a counter tree held in Redis, and ClusterCounter, a handle on one node.

The tree has the kernel's page_counter semantics (usage, max, failcnt, watermark,
a parent per counter; hierarchical try_charge; set_max with EBUSY), kept in Redis
hashes and changed only by the Lua scripts of lua.py, one EVALSHA per operation.
Hosts charge it through their leases (host.py); nothing else charges it.
"""
from __future__ import annotations

import re
import time
import uuid
from typing import TYPE_CHECKING, Any

import redis

from shmcounter.errors import Busy

from .errors import ClusterError
from .lua import CLUSTER_MAX, Scripts
from .server import RedisServer

if TYPE_CHECKING:
    from shmcounter import Arena

    from .host import Host

# Names of counters, hosts and namespaces: they become parts of Redis keys and of
# the host's local mirror counters (at most 63 bytes with their prefix).
_NAME = re.compile(r"[A-Za-z0-9_.\-/]{1,40}")
DRAIN_TIMEOUT = 1.0


def check_name(name: object, what: str) -> str:
    if not isinstance(name, str):
        raise TypeError(f"{what} must be a str, got {type(name).__name__}")
    if not _NAME.fullmatch(name):
        raise ValueError(f"{what} must be 1..40 characters among A-Z a-z 0-9 _ . - /, "
                         f"got {name!r}")
    return name


def check_pages(n: object, what: str = "nr_pages") -> int:
    if type(n) is not int or not 0 <= n <= CLUSTER_MAX:
        raise ValueError(f"{what} must be an int in [0, {CLUSTER_MAX}], got {n!r}")
    return n


class ClusterCounter:
    """A handle on cluster counter `name`; every field is read from the server."""

    def __init__(self, client: redis.Redis, scripts: Scripts, namespace: str,
                 name: str) -> None:
        self._client, self._scripts, self.namespace, self.name = (
            client, scripts, namespace, name)

    def _field(self, field: str) -> int:
        value = self._client.hget(f"{self.namespace}:c:{self.name}", field)
        if value is None:
            raise KeyError(f"no cluster counter named {self.name!r} in {self.namespace!r}")
        return int(value)

    @property
    def usage(self) -> int:
        return self._field("usage")

    @property
    def max(self) -> int:
        return self._field("max")

    @property
    def failcnt(self) -> int:
        return self._field("failcnt")

    @property
    def watermark(self) -> int:
        return self._field("watermark")

    @property
    def parent(self) -> str | None:
        value = self._client.hget(f"{self.namespace}:c:{self.name}", "parent")
        return str(value) if value else None

    def set_max(self, n: int, drain_timeout: float = DRAIN_TIMEOUT) -> None:
        """page_counter_set_max: Busy (EBUSY) if usage stays above n, max unchanged.
        Hosts' unused leases count in usage: on EBUSY, every host is asked to
        return its lease under this counter (as mem_cgroup_resize_max drains),
        then one more try."""
        limit = check_pages(n, "max")
        answer = self._scripts.call("set_max", self.namespace, self.name, limit)
        if answer[0] == 1:
            return
        drain(self._client, self.namespace, self.name, drain_timeout)
        answer = self._scripts.call("set_max", self.namespace, self.name, limit)
        if answer[0] == 1:
            return
        raise Busy(f"cannot set max of cluster counter {self.name!r} to {limit}: usage is "
                   f"{answer[1]}")

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, ClusterCounter) and other.name == self.name
                and other.namespace == self.namespace)

    def __hash__(self) -> int:
        return hash((self.namespace, self.name))

    def __repr__(self) -> str:
        return f"<ClusterCounter {self.namespace}:{self.name}>"


def drain(client: redis.Redis, namespace: str, counter: str, timeout: float) -> int:
    """Ask every host to return its unused lease on the counters under `counter`
    (drain_all_stock one level up), and wait for their answers, `timeout` seconds
    at most. Returns how many hosts answered; a host that did not is left to its
    TTL. Message on channel ns:drain: "<request id> <counter>"; answers: one RPUSH
    each on ns:ack:<request id>."""
    request = uuid.uuid4().hex
    ack = f"{namespace}:ack:{request}"
    asked = int(client.publish(f"{namespace}:drain", f"{request} {counter}"))
    client.hincrby(f"{namespace}:stats", "drains", 1)
    answered = 0
    deadline = time.monotonic() + timeout
    while answered < asked:
        left = deadline - time.monotonic()
        if left <= 0 or client.blpop([ack], timeout=left) is None:
            break
        answered += 1
    client.delete(ack)
    return answered


class Cluster:
    """A connection to one counter tree: `namespace` on the Redis server at `url`.

    Another process connects to the same tree with Cluster.connect(cl.url,
    cl.namespace). close() stops the embedded server if this handle started it.
    """

    def __init__(self, url: str, namespace: str, server: RedisServer | None = None) -> None:
        self.url = url
        self.namespace = check_name(namespace, "namespace")
        self._server = server
        self._hosts: list[Host] = []
        self.client = redis.Redis.from_url(url, decode_responses=True)
        self.scripts = Scripts(self.client)
        try:
            self.scripts.load()
        except redis.exceptions.ConnectionError as exc:
            self.client.close()
            raise ClusterError(f"cannot reach the Redis server at {url}: {exc}") from None

    @classmethod
    def connect(cls, url: str, namespace: str = "shmcounter") -> Cluster:
        return cls(url, namespace)

    @classmethod
    def embedded(cls, namespace: str = "shmcounter") -> Cluster:
        """A real redis-server on a free loopback port, stopped by close()."""
        server = RedisServer()
        try:
            return cls(server.url, namespace, server)
        except BaseException:
            server.stop()
            raise

    def close(self) -> None:
        """Leave every host joined through this handle, close the connection, and
        stop the embedded server if this handle started one."""
        for host in self._hosts:
            host.close()
        self._hosts.clear()
        self.client.close()
        if self._server is not None:
            self._server.stop()
            self._server = None

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- the tree -----------------------------------------------------------

    def new_counter(self, name: str, parent: ClusterCounter | str | None = None,
                    max: int | None = None) -> ClusterCounter:
        check_name(name, "counter name")
        pname = parent.name if isinstance(parent, ClusterCounter) else parent
        if pname is not None:
            check_name(pname, "parent")
        limit = CLUSTER_MAX if max is None else check_pages(max, "max")
        try:
            self.scripts.call("new_counter", self.namespace, name, pname or "", limit)
        except redis.exceptions.ResponseError as exc:
            raise ValueError(str(exc)) from None
        return self.counter(name)

    def counter(self, name: str) -> ClusterCounter:
        check_name(name, "counter name")
        if not self.client.exists(f"{self.namespace}:c:{name}"):
            raise KeyError(f"no cluster counter named {name!r} in {self.namespace!r}")
        return ClusterCounter(self.client, self.scripts, self.namespace, name)

    def counters(self) -> list[ClusterCounter]:
        names = self.client.zrange(f"{self.namespace}:names", 0, -1)
        return [ClusterCounter(self.client, self.scripts, self.namespace, str(n))
                for n in names]

    # ---- hosts --------------------------------------------------------------

    def join(self, arena: Arena, host: str, ttl: float = 2.0, batch: int = 64,
             margin: float | None = None, drain_timeout: float = DRAIN_TIMEOUT) -> Host:
        """Join `arena`'s machine to the cluster as host `host` (see host.Host)."""
        from .host import Host
        joined = Host(self, arena, host, ttl=ttl, batch=batch, margin=margin,
                      drain_timeout=drain_timeout)
        self._hosts.append(joined)
        return joined

    def reap(self) -> dict[str, int]:
        """Reap every host whose lease expired: {host: pages uncharged}."""
        out = self.scripts.call("reap", self.namespace)
        return {str(out[i]): int(out[i + 1]) for i in range(0, len(out), 2)}

    def drain(self, counter: str, timeout: float = DRAIN_TIMEOUT) -> int:
        """Ask every host to return its unused lease under `counter` (see drain)."""
        return drain(self.client, self.namespace, check_name(counter, "counter"), timeout)

    def snapshot(self) -> Snapshot:
        """One atomic view of the tree, the live hosts and the reaped ones."""
        return Snapshot(self.scripts.call("snapshot", self.namespace))

    def redis_calls(self) -> int:
        """Script calls (EVALSHA) the server ran so far, from every client: one per
        cluster operation. Connection set-up and this INFO are not counted."""
        stats = self.client.info("commandstats")
        return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


def _pairs(flat: list[Any]) -> dict[str, Any]:
    return {str(flat[i]): flat[i + 1] for i in range(0, len(flat), 2)}


class Snapshot:
    """The tree at one instant (one script): counters {name: {usage, max, failcnt,
    watermark, parent}}, leases {host: {counter: pages}}, unused {host: {counter:
    pages}} (as each host last said), ttl_ms {host: ms left}, epochs {host: epoch},
    reaped ["host epoch pages why", newest first], stats {name: n}."""

    def __init__(self, raw: list[Any]) -> None:
        counters, leases, unused, live, epochs, reaped, stats = raw
        self.counters: dict[str, dict[str, Any]] = {}
        for name, fields in _pairs(counters).items():
            f = _pairs(fields)
            self.counters[name] = {k: int(f[k]) for k in ("usage", "max", "failcnt",
                                                         "watermark")}
            self.counters[name]["parent"] = f["parent"] or None
        self.leases = {h: {c: int(v) for c, v in _pairs(f).items()}
                       for h, f in _pairs(leases).items()}
        self.unused = {h: {c: int(v) for c, v in _pairs(f).items()}
                       for h, f in _pairs(unused).items()}
        self.ttl_ms = {h: int(v) for h, v in _pairs(live).items()}
        self.epochs = {h: int(v) for h, v in _pairs(epochs).items()}
        self.reaped = [str(r) for r in reaped]
        self.stats = {k: int(v) for k, v in _pairs(stats).items()}

    def subtree(self, name: str) -> set[str]:
        """`name` and every counter below it."""
        out = {name}
        grew = True
        while grew:
            more = {c for c, f in self.counters.items() if f["parent"] in out} - out
            out |= more
            grew = bool(more)
        return out

    def contributions(self, name: str) -> int:
        """What the live hosts have charged at or below `name`: equals its usage."""
        below = self.subtree(name)
        return sum(p for lease in self.leases.values() for c, p in lease.items()
                   if c in below)
