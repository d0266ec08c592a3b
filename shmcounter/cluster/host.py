"""Host: a machine's arena joined to the cluster; its lease on cluster counters is
its stock, one level up.

    CPU (a process)      host (its arena)                 cluster (Redis)
    ---------------      ----------------                 ---------------
    try_charge(n) -----> mirror counter "cluster:C@E":    ns:c:C usage/max/...
                         max = the host's lease on C,     ns:lease:H  C -> pages
                         usage = pages charged here        (real + leased)
                         room = max - usage: unused lease

A charge of cluster counter C on host H is a charge of C's mirror in H's arena,
a local root counter whose max is H's lease on C (what Redis records in
ns:lease:H), so the I7 of the arena holds one level up: the cluster's usage of C
is the sum of the leases of the live hosts on C and below. While the mirror has
room, a charge is one C call on the arena and never talks to Redis. When it has
not, the charging process takes the host lock and makes one cluster call: greedy
max(batch, n), then an exact retry with n; a refusal asks every host to return
its unused lease (tree.drain), then retries once (as try_charge_memcg does).
An uncharge gives the pages back to the mirror; a lease left unused above
2 x batch is returned down to batch (as refill_stock drains a stock above
MEMCG_CHARGE_BATCH).

Lease state shared by the host's processes: a 64-byte file in /dev/shm
(shmcounter-cluster.<arena name>), two words: EPOCH (the host's fencing token, 0
when stale) and DEADLINE (CLOCK_MONOTONIC ns until which the lease surely holds).
The host lock is the file's flock (a dead holder releases it) plus a thread lock.

Lease expiry. Every successful cluster call renews the liveness key's TTL on the
server, at a time after the caller read its monotonic clock (t_send); so the
server keeps the host alive until at least t_send + ttl, and the caller raises
DEADLINE to t_send + ttl - margin. A charge spends the mirror's room only while
monotonic < DEADLINE, read before and again after the charge (a charge that sees
the deadline passed afterwards is undone): a host stopped (SIGSTOP) past its TTL
wakes with DEADLINE in the past, so its first charge goes to the cluster, whose
fence answers STALE if it was reaped. Writers of EPOCH hold the host lock.

Rejoin. A stale host's pages were uncharged by its reap: they are gone. Host.rejoin
takes a new epoch; the mirrors are per epoch ("cluster:C@E"), so the new epoch
starts from zero and old handles raise HostStale.
"""
from __future__ import annotations

import fcntl
import logging
import mmap
import os
import threading
import time
from typing import TYPE_CHECKING, Any

import redis

from shmcounter import Arena, Busy, PageCounter
from shmcounter.segment import PC_MAX, PC_USAGE

from .errors import ClusterError, HostStale
from .lua import OK, STALE, Scripts
from .tree import DRAIN_TIMEOUT, ClusterCounter, check_name, check_pages, drain

if TYPE_CHECKING:
    from .tree import Cluster

log = logging.getLogger("shmcounter.cluster")

EPOCH, DEADLINE = 0, 1
_STATE_BYTES = 64
_RETRIES = 4              # refills at most, when other processes take the room first
LISTEN_TIMEOUT = 10.0     # seconds a joining host waits for its drain listener
_SUCCESS: tuple[bool, ClusterCounter | None] = (True, None)


def state_path(arena_name: str) -> str:
    return f"/dev/shm/shmcounter-cluster.{arena_name}"


class _State:
    """The host's lease words (EPOCH, DEADLINE) and its lock, in one process."""

    def __init__(self, path: str, create: bool) -> None:
        self.path = path
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        self.fd = os.open(path, flags, 0o600)
        if create:
            os.ftruncate(self.fd, _STATE_BYTES)
        self._mm = mmap.mmap(self.fd, _STATE_BYTES)
        self.words = memoryview(self._mm).cast("q")
        self._tlock = threading.RLock()
        self._depth = 0

    def __enter__(self) -> _State:
        self._tlock.acquire()
        if self._depth == 0:
            fcntl.flock(self.fd, fcntl.LOCK_EX)
        self._depth += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        self._tlock.release()

    def valid(self) -> bool:
        return time.monotonic_ns() < self.words[DEADLINE]

    def extend(self, t_send: int, ttl_ns: int, margin_ns: int) -> None:
        """A fenced call sent at t_send succeeded: the lease holds until then + ttl."""
        deadline = t_send + ttl_ns - margin_ns
        self.words[DEADLINE] = max(self.words[DEADLINE], deadline)

    def close(self) -> None:
        self.words.release()
        self._mm.close()
        os.close(self.fd)


class _HostBase:
    """What every process of a host needs to charge: the arena, the lease state,
    a Redis client of its own (created in the process that uses it)."""

    def __init__(self, url: str, namespace: str, name: str, arena: Arena, ttl: float,
                 batch: int, margin: float, drain_timeout: float, state: _State) -> None:
        self.url, self.namespace, self.name, self.arena = url, namespace, name, arena
        self.ttl, self.batch, self.margin, self.drain_timeout = ttl, batch, margin, drain_timeout
        self._ttl_ms = int(ttl * 1000)
        self._ttl_ns, self._margin_ns = int(ttl * 1e9), int(margin * 1e9)
        self._state = state
        self._pid = -1
        self._client_: redis.Redis | None = None
        self._scripts_: Scripts | None = None

    def __reduce__(self) -> tuple[Any, ...]:
        return (HostView, (self.url, self.namespace, self.name, self.arena.name, self.ttl,
                           self.batch, self.margin, self.drain_timeout))

    @property
    def _scripts(self) -> Scripts:
        if self._pid != os.getpid():                # a fork: never share a socket
            self._client_ = redis.Redis.from_url(self.url, decode_responses=True)
            self._scripts_ = Scripts(self._client_)
            self._pid = os.getpid()
        assert self._scripts_ is not None
        return self._scripts_

    @property
    def epoch(self) -> int:
        """The live epoch, 0 while stale."""
        return int(self._state.words[EPOCH])

    @property
    def stale(self) -> bool:
        return self._state.words[EPOCH] == 0

    def counter(self, name: str) -> HostCounter:
        """This host's handle on cluster counter `name`, bound to the live epoch
        (HostStale if none)."""
        return HostCounter(self, check_name(name, "counter name"))

    # ---- fenced calls, under the host lock --------------------------------------

    def _call(self, op: str, *args: object) -> list[Any]:
        """One fenced script call at the live epoch; extends the lease on success,
        marks the host stale and raises HostStale on STALE. Under the host lock,
        but for the heartbeat."""
        epoch = self._state.words[EPOCH]
        if epoch == 0:
            raise HostStale(f"host {self.name!r} is stale: rejoin")
        t_send = time.monotonic_ns()
        answer = self._scripts.call(op, self.namespace, self.name, epoch, self._ttl_ms, *args)
        if answer[0] == STALE:
            self._mark_stale(epoch)
            raise HostStale(f"host {self.name!r} epoch {epoch} was reaped: rejoin")
        self._state.extend(t_send, self._ttl_ns, self._margin_ns)
        return list(answer)

    def _mark_stale(self, epoch: int) -> None:
        with self._state:
            if self._state.words[EPOCH] == epoch:
                self._state.words[DEADLINE] = 0
                self._state.words[EPOCH] = 0

    def _mirror(self, name: str, epoch: int) -> PageCounter:
        """The local mirror of cluster counter `name` at `epoch` (created at max 0)."""
        mirror = f"cluster:{name}@{epoch}"
        try:
            return self.arena.counter(mirror)
        except KeyError:
            pass
        with self._state:
            try:
                return self.arena.counter(mirror)
            except KeyError:
                return self.arena.new_counter(mirror, max=0)

    def _give_back(self, mirror: PageCounter, name: str, keep: int) -> int:
        """Return the mirror's unused lease above `keep` to the cluster: lower the
        mirror's max first (no charge here can spend it any more), then one
        uncharge on the cluster. Under the host lock. Returns the pages returned."""
        with self._state:
            for _ in range(8):
                usage = mirror.usage
                give = mirror.max - usage - keep
                if give <= 0:
                    return 0
                try:
                    mirror.set_max(usage + keep)
                    break
                except Busy:                        # a charge raced in: read again
                    continue
            else:
                return 0
            self._call("uncharge", name, give)
            return give

    def _renew(self) -> None:
        """A fenced heartbeat: the lease holds again, or HostStale."""
        self._call("heartbeat")


class HostView(_HostBase):
    """A host in one of its CPU processes: what a pickled Host becomes there."""

    def __init__(self, url: str, namespace: str, name: str, arena_name: str, ttl: float,
                 batch: int, margin: float, drain_timeout: float) -> None:
        arena = Arena.attach(arena_name)
        super().__init__(url, namespace, name, arena, ttl, batch, margin, drain_timeout,
                         _State(state_path(arena_name), create=False))


class HostCounter:
    """Host's handle on one cluster counter at one epoch: try_charge, uncharge."""

    def __init__(self, host: _HostBase, name: str) -> None:
        self.host, self.name = host, name
        self._epoch = host.epoch
        if self._epoch == 0:
            raise HostStale(f"host {host.name!r} is stale: rejoin")
        self._mirror_ = mirror = host._mirror(name, self._epoch)
        self._words = host._state.words
        self._state = host._state
        # the mirror's usage and max words, read as its properties do, without
        # their two Python frames (uncharge reads both on every call)
        self._load = mirror._slots.load
        self._usage_slot, self._max_slot = mirror._c + PC_USAGE, mirror._c + PC_MAX
        self._give_above = 2 * host.batch

    @property
    def epoch(self) -> int:
        """The epoch this handle charges at."""
        return self._epoch

    @property
    def mirror(self) -> PageCounter:
        """The local counter holding this host's lease (max) and charges (usage)."""
        return self._mirror_

    def _check_epoch(self) -> None:
        if self._words[EPOCH] != self._epoch:
            raise HostStale(f"host {self.host.name!r} epoch {self._epoch} is over: rejoin")

    def try_charge(self, nr_pages: int) -> tuple[bool, ClusterCounter | None]:
        """Charge nr_pages to this cluster counter and its ancestors: (True, None),
        or (False, the cluster counter that refused). HostStale if the host was
        reaped. A hit on the host's lease is one local C call and no Redis call."""
        words = self._words
        if words[EPOCH] != self._epoch:
            self._check_epoch()
        if time.monotonic_ns() < words[DEADLINE] and self._mirror_.try_charge(nr_pages)[0]:
            # Again after the charge: the lease may have expired meanwhile, or the
            # host been reaped and rejoined (DEADLINE is written before EPOCH).
            if time.monotonic_ns() < words[DEADLINE] and words[EPOCH] == self._epoch:
                return _SUCCESS
            self._mirror_.uncharge(nr_pages)
        return self._charge_slow(nr_pages)

    def _local(self, n: int) -> bool:
        """Charge the mirror while the lease surely holds. Under the host lock."""
        for _ in range(2):
            if not self._state.valid():
                self.host._renew()
            if not self._mirror_.try_charge(n)[0]:
                return False
            if self._state.valid():
                return True
            self._mirror_.uncharge(n)
        return False

    def _charge_slow(self, n: int) -> tuple[bool, ClusterCounter | None]:
        """The lease has no room for n (or may have expired): under the host lock,
        greedy max(batch, n), then exact n; refused, drain every host's unused
        lease under the refusing counter and try n once more."""
        check_pages(n)
        host = self.host
        fail = self.name
        for after_drain in (False, True):
            with self._state:
                self._check_epoch()
                sizes = (n,) if after_drain or host.batch <= n else (host.batch, n)
                for size in sizes:
                    refused = self._refill(n, size)
                    if refused is None:
                        return _SUCCESS
                    fail = refused
            if not after_drain:
                drain(host._scripts.client, host.namespace, fail, host.drain_timeout)
        return False, ClusterCounter(host._scripts.client, host._scripts, host.namespace, fail)

    def _refill(self, n: int, size: int) -> str | None:
        """Charge n to the mirror, refilling its room with `size` pages from the
        cluster (one call) when it has none: None, or the refusing counter's name.
        Other processes of the host may take the room first (their hits need no
        lock): _RETRIES refills at most. Under the host lock."""
        mirror = self._mirror_
        for _ in range(_RETRIES):
            if self._local(n):
                return None
            answer = self.host._call("charge", self.name, size)
            if answer[0] != OK:
                return str(answer[1])
            mirror.set_max(mirror.max + size)
        return None if self._local(n) else self.name

    def uncharge(self, nr_pages: int) -> None:
        """Give nr_pages back to the host's lease; a lease unused above 2 x batch
        goes back to the cluster down to batch. HostStale if the host was reaped:
        the reap uncharged these pages already."""
        if self._words[EPOCH] != self._epoch:
            self._check_epoch()
        usage = self._load(self._usage_slot)
        if type(nr_pages) is not int or not 0 <= nr_pages <= usage:
            raise ValueError(f"nr_pages must be an int in [0, {usage}] (the host's "
                             f"usage of {self.name!r}), got {nr_pages!r}")
        self._mirror_.uncharge(nr_pages)
        if self._load(self._max_slot) - usage + nr_pages > self._give_above:
            self.host._give_back(self._mirror_, self.name, self.host.batch)

    def __repr__(self) -> str:
        return f"<HostCounter {self.host.name}:{self.name}@{self._epoch}>"


class Host(_HostBase):
    """Host `name` of `cluster`: `arena`'s machine, joined.

    The process that joins runs two threads: the heartbeat (every ttl/3: renew the
    lease, publish the unused lease, reap expired hosts) and the drain listener
    (a drain request for counter R: return the unused lease on every counter at or
    below R, then answer). Pickled to a CPU process, a Host becomes a HostView
    there (charges only).
    """

    def __init__(self, cluster: Cluster, arena: Arena, name: str, ttl: float, batch: int,
                 margin: float | None, drain_timeout: float = DRAIN_TIMEOUT) -> None:
        check_name(name, "host")
        if not isinstance(arena, Arena):
            raise TypeError(f"arena must be an Arena, got {type(arena).__name__}")
        if not isinstance(ttl, (int, float)) or not 0.1 <= ttl <= 3600:
            raise ValueError(f"ttl must be a number of seconds in [0.1, 3600], got {ttl!r}")
        if type(batch) is not int or not 1 <= batch <= 2**32:
            raise ValueError(f"batch must be an int in [1, 2**32], got {batch!r}")
        margin = ttl / 4 if margin is None else margin
        if not isinstance(margin, (int, float)) or not 0 <= margin < ttl:
            raise ValueError(f"margin must be a number of seconds in [0, ttl), got {margin!r}")
        try:
            state = _State(state_path(arena.name), create=True)
        except FileExistsError:
            raise ClusterError(f"arena {arena.name!r} has joined a cluster already "
                               f"(one host per arena)") from None
        super().__init__(cluster.url, cluster.namespace, name, arena, float(ttl), batch,
                         float(margin), drain_timeout, state)
        self.reaped: dict[str, int] = {}      # hosts this host's heartbeat reaped: pages
        self._paths: dict[str, list[str]] = {}
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._threads: list[threading.Thread] = []
        try:
            self._join()
        except BaseException:
            self._close_state()
            raise
        try:
            self._start_threads()
        except BaseException:
            self.close()
            raise

    def _join(self) -> None:
        with self._state:
            t_send = time.monotonic_ns()
            try:
                epoch = self._scripts.call("join", self.namespace, self.name, self._ttl_ms)
            except redis.exceptions.ResponseError as exc:
                raise ClusterError(str(exc)) from None
            # EPOCH is 0 here (a first join, or stale): a charge at the old epoch
            # that reads this DEADLINE reads EPOCH after it, and is undone
            self._state.words[DEADLINE] = t_send + self._ttl_ns - self._margin_ns
            self._state.words[EPOCH] = int(epoch)

    def rejoin(self) -> int:
        """After HostStale: join again with a new epoch (a host from zero)."""
        if not self.stale:
            raise ClusterError(f"host {self.name!r} is live at epoch {self.epoch}")
        self._join()
        return self.epoch

    def _start_threads(self) -> None:
        self._stop.clear()
        for target, what in ((self._heartbeat_loop, "heartbeat"),
                             (self._drain_loop, "drain")):
            t = threading.Thread(target=target, name=f"cluster-{what}", daemon=True)
            t.start()
            self._threads.append(t)
        if not self._listening.wait(LISTEN_TIMEOUT):
            self._stop_threads()
            raise ClusterError(f"host {self.name!r}: the drain listener did not subscribe "
                               f"within {LISTEN_TIMEOUT} s")

    def _stop_threads(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        self._threads.clear()

    # ---- the heartbeat ------------------------------------------------------

    def _mirrors(self) -> dict[str, PageCounter]:
        """{cluster counter: mirror} of the live epoch, every process's."""
        suffix = f"@{self.epoch}"
        return {c.name[len("cluster:"):-len(suffix)]: c for c in self.arena.counters()
                if c.name.startswith("cluster:") and c.name.endswith(suffix)}

    def heartbeat(self) -> dict[str, int]:
        """Renew the lease, publish the unused lease, reap expired hosts: {host:
        pages} reaped. HostStale if this host was reaped. Without the host lock:
        it changes only the TTL (a renewal must not wait behind charges), and the
        unused lease it publishes is read without one (a statistic)."""
        unused = [x for name, m in self._mirrors().items()
                  for x in (name, max(m.max - m.usage, 0))]
        answer = self._call("heartbeat", *unused)
        reaped = {str(answer[i]): int(answer[i + 1]) for i in range(1, len(answer), 2)}
        self.reaped.update(reaped)
        return reaped

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            if self.stale:
                continue
            try:
                self.heartbeat()
            except HostStale:
                log.info("host %s: stale (reaped); rejoin", self.name)
            except redis.exceptions.RedisError as exc:
                log.warning("host %s: heartbeat failed: %s", self.name, exc)

    # ---- the drain listener -------------------------------------------------

    def _path(self, name: str) -> list[str]:
        path = self._paths.get(name)
        if path is None:
            client = self._scripts.client
            path, c = [], name
            while c:
                path.append(c)
                c = str(client.hget(f"{self.namespace}:c:{c}", "parent") or "")
            self._paths[name] = path
        return path

    def return_unused(self, under: str | None = None) -> int:
        """Return the unused lease on every counter at or below `under` (None: all):
        pages returned."""
        returned = 0
        with self._state:
            if self.stale:
                return 0
            for name, mirror in self._mirrors().items():
                if under is None or under in self._path(name):
                    returned += self._give_back(mirror, name, 0)
        return returned

    def _drain_loop(self) -> None:
        client = redis.Redis.from_url(self.url, decode_responses=True)
        pubsub = client.pubsub()
        pubsub.subscribe(f"{self.namespace}:drain")
        try:
            while not self._stop.is_set():
                try:
                    msg = pubsub.get_message(timeout=0.1)
                    if msg is None:
                        continue
                    if msg["type"] == "subscribe":
                        self._listening.set()       # drains from now on reach us
                        continue
                    request, counter = str(msg["data"]).split(" ", 1)
                    try:
                        self.return_unused(counter)
                    except HostStale:
                        pass
                    ack = f"{self.namespace}:ack:{request}"
                    client.rpush(ack, self.name)
                    client.expire(ack, 60)
                except redis.exceptions.RedisError as exc:
                    log.warning("host %s: drain listener: %s", self.name, exc)
                    self._stop.wait(0.1)
        finally:
            pubsub.close()
            client.close()

    # ---- leaving ------------------------------------------------------------

    def leave(self) -> int:
        """Leave the cluster: the unused lease goes back to the tree, then every
        page this host charged is uncharged (a host takes its charges with it).
        Returns the pages uncharged in all; 0 if the host was stale."""
        self._stop_threads()
        try:
            with self._state:
                epoch = self._state.words[EPOCH]
                if epoch == 0:
                    return 0
                try:
                    returned = self.return_unused()
                except HostStale:
                    return 0
                answer = self._scripts.call("leave", self.namespace, self.name, epoch)
                self._state.words[DEADLINE] = 0
                self._state.words[EPOCH] = 0
                return 0 if int(answer) == STALE else returned + int(answer)
        finally:
            self._close_state()

    def close(self) -> None:
        """leave(), tolerating a server already gone."""
        if self._state.fd < 0:
            return
        try:
            self.leave()
        except redis.exceptions.RedisError:
            self._close_state()

    def _close_state(self) -> None:
        if self._state.fd >= 0:
            self._state.close()
            self._state.fd = -1
            try:
                os.unlink(self._state.path)
            except FileNotFoundError:
                pass
