"""A fleet of hosts on one machine, for tests, the torture script, the bench and
the demo: each host is its own process group (a main process with its arena, a
procs.Machine of CPU processes and the Host joined to the cluster), driven over
a pipe; a fault is a signal to the whole group (SIGKILL; SIGSTOP/SIGCONT, the
partition of a host).

    test / script                 host main (pgid = its pid)       CPUs (Machine)
    -------------                 --------------------------       --------------
    HostProcess(...) ---fork----> setpgid, Arena.create, Machine,
                                  cl.join                 ------>  register_cpu
    run(seconds, seed) ---------> submit work() to every CPU ---->  random charges
    collect() ------------------> the CPUs' results, then audit:   and uncharges of
                                  a fenced heartbeat (rejoin if     cluster counters
                                  stale), mirrors and lease, read
                                  under the host lock
    kill() / stop() / cont() ---> os.killpg(pgid, signal)

While idle, a host main rejoins as soon as it finds itself stale.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import time
from collections import defaultdict
from typing import Any

from shmcounter import Arena

from .errors import HostStale
from .host import EPOCH, Host, HostView, state_path
from .tree import Cluster, Snapshot

REPLY_TIMEOUT = 60.0

# Pages held by this CPU process: {(epoch, counter): pages}. Pages of an epoch
# that was reaped are gone (the reap uncharged them): only the live epoch's count.
_HELD: dict[tuple[int, str], int] = defaultdict(int)


def work(host: HostView, names: list[str], seconds: float, seed: int,
         max_pages: int) -> dict[str, Any]:
    """Random charges and uncharges of `names` for `seconds` (a CPU's task).

    Returns {epoch: the live epoch at the end, held: {counter: pages held at it},
    ok, refused, stale: counts, last_ok: {epoch: monotonic ns at the start of the
    latest charge that succeeded at that epoch}}. A charge that started after
    its epoch was reaped and still succeeded would be stale stock spent: the
    caller compares last_ok with the time the host was stopped.
    """
    rng = random.Random(seed)
    end = time.monotonic() + seconds
    counts = {"ok": 0, "refused": 0, "stale": 0}
    last_ok: dict[int, int] = {}
    handles: dict[str, Any] = {}
    live = host.epoch
    for key in [k for k in _HELD if k[0] != live]:
        del _HELD[key]
    while time.monotonic() < end:
        if host.stale:
            time.sleep(0.005)
            continue
        name = rng.choice(names)
        try:
            hc = handles.get(name)
            if hc is None or hc.epoch != host.epoch:
                hc = handles[name] = host.counter(name)
            key = (hc.epoch, name)
            if _HELD[key] == 0 or rng.random() < 0.55:
                n = rng.randint(1, max_pages)
                t0 = time.monotonic_ns()
                ok, _ = hc.try_charge(n)
                if ok:
                    _HELD[key] += n
                    counts["ok"] += 1
                    last_ok[hc.epoch] = t0
                else:
                    counts["refused"] += 1
            else:
                n = rng.randint(1, _HELD[key])
                hc.uncharge(n)
                _HELD[key] -= n
        except HostStale:
            counts["stale"] += 1
            handles.clear()
    live = host.epoch
    return {"epoch": live, "held": {c: p for (e, c), p in _HELD.items() if e == live and p},
            "last_ok": last_ok, **counts}


def release(host: HostView) -> int:
    """Uncharge every page this CPU holds at the live epoch: pages uncharged."""
    total = 0
    for (epoch, name), pages in list(_HELD.items()):
        if epoch == host.epoch and pages:
            host.counter(name).uncharge(pages)
            total += pages
        del _HELD[(epoch, name)]
    return total


def _host_main(url: str, namespace: str, name: str, ncpus: int, ttl: float, batch: int,
               max_counters: int, conn: Any) -> None:
    os.setpgid(0, 0)                      # a process group of its own: the host
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from procs import Machine
    arena = Arena.create(ncpus=ncpus, max_counters=max_counters)
    cl = Cluster.connect(url, namespace)
    host = cl.join(arena, host=name, ttl=ttl, batch=batch)
    machine = Machine(arena, ncpus, start_method="fork")
    conn.send(("ready", arena.name))
    futures: list[Any] = []
    while True:
        if not conn.poll(0.02):
            if host.stale and not futures:
                host.rejoin()
            continue
        cmd, *args = conn.recv()
        if cmd == "run":
            names, seconds, seed, max_pages = args
            futures = [machine.submit(cpu, work, host, names, seconds, seed * 100 + cpu,
                                      max_pages) for cpu in range(ncpus)]
            conn.send("started")
        elif cmd == "collect":
            results = [f.result() for f in futures]
            futures = []
            conn.send(_audit(host, results))
        elif cmd == "release":
            conn.send(sum(machine.run_on(cpu, release, host) for cpu in range(ncpus)))
        elif cmd == "leave":
            machine.close()
            pages = host.leave()
            cl.close()
            arena.close()
            arena.unlink()
            conn.send(pages)
            os._exit(0)


def _audit(host: Host, results: list[dict[str, Any]]) -> dict[str, Any]:
    """The host after a round, its CPUs idle: a fenced heartbeat (a stale host
    rejoins: it starts from zero), then, under the host lock, its mirrors and its
    lease as Redis holds it, read together."""
    try:
        host.heartbeat()
    except HostStale:
        host.rejoin()
    epoch = host.epoch
    held: dict[str, int] = defaultdict(int)
    last_ok: dict[int, int] = {}
    for r in results:
        if r["epoch"] == epoch:
            for c, p in r["held"].items():
                held[c] += p
        for e, t in r["last_ok"].items():
            last_ok[e] = max(last_ok.get(e, 0), t)
    with host._state:
        assert host._state.words[EPOCH] == epoch
        mirrors = {c: (m.max, m.usage) for c, m in host._mirrors().items()}
        lease = host._scripts.client.hgetall(f"{host.namespace}:lease:{host.name}")
    return {"host": host.name, "epoch": epoch, "held": dict(held), "mirrors": mirrors,
            "lease": {str(c): int(v) for c, v in lease.items()},
            "last_ok": last_ok, **{k: sum(r[k] for r in results)
                                   for k in ("ok", "refused", "stale")}}


class HostProcess:
    """Host `name` of the cluster at (url, namespace), as a process group of its
    own with `ncpus` CPU processes. kill() and close() leave nothing behind:
    processes, arena, lease file."""

    def __init__(self, url: str, namespace: str, name: str, ncpus: int = 2,
                 ttl: float = 1.0, batch: int = 16, max_counters: int = 1024) -> None:
        ctx = mp.get_context("fork")
        self.name = name
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_host_main, name=f"host-{name}",
                                args=(url, namespace, name, ncpus, ttl, batch, max_counters,
                                      child))
        self.proc.start()
        child.close()
        assert self.proc.pid is not None
        self.pgid: int = self.proc.pid
        self.arena_name = ""
        self.alive = True
        try:
            tag, self.arena_name = self._reply()
        except BaseException:
            self.kill()
            raise
        assert tag == "ready"

    def _reply(self, timeout: float = REPLY_TIMEOUT) -> Any:
        if not self._conn.poll(timeout):
            raise TimeoutError(f"host {self.name}: no answer within {timeout} s")
        return self._conn.recv()

    def command(self, *msg: Any, timeout: float = REPLY_TIMEOUT) -> Any:
        self._conn.send(msg)
        return self._reply(timeout)

    def run(self, names: list[str], seconds: float, seed: int, max_pages: int = 8) -> None:
        """Start a round: every CPU charges and uncharges at random for `seconds`."""
        assert self.command("run", names, seconds, seed, max_pages) == "started"

    def collect(self) -> dict[str, Any]:
        """Wait for the round, then the audit (see _audit)."""
        return dict(self.command("collect"))

    def signal(self, sig: int) -> None:
        os.killpg(self.pgid, sig)

    def kill(self) -> None:
        """SIGKILL of the whole host, then remove what it left: arena, lease file."""
        if not self.alive:
            return
        self.alive = False
        try:
            os.killpg(self.pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.join(30)
        self._conn.close()
        # its CPU processes, children of the killed main, die with the group
        for path in (f"/dev/shm/{self.arena_name}", state_path(self.arena_name)):
            if self.arena_name:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass

    def close(self) -> int | None:
        """Leave the cluster cleanly (pages uncharged), or kill if that fails."""
        if not self.alive:
            return None
        try:
            self.signal(signal.SIGCONT)
            pages = int(self.command("leave", timeout=30))
            self.proc.join(30)
            self.alive = False
            self._conn.close()
            return pages
        except Exception:
            self.kill()
            return None


def check_cluster(snap: Snapshot, audits: list[dict[str, Any]]) -> list[str]:
    """The cluster's invariants, all hosts idle; returns the violations (none: []).

    C1  usage of every cluster counter == what the live hosts charged at or below
        it (their leases): nothing lost, nothing counted twice;
    C2  usage <= max at every counter;
    C3  every live host's lease in Redis == its mirrors' max, counter by counter,
        and its mirrors' usage == the pages its CPUs hold (I7 one level up);
    C4  every host reaped at most once per epoch.
    """
    bad = []
    for name, f in snap.counters.items():
        if f["usage"] != snap.contributions(name):
            bad.append(f"C1 {name}: usage {f['usage']} != leases {snap.contributions(name)}")
        if f["usage"] > f["max"]:
            bad.append(f"C2 {name}: usage {f['usage']} > max {f['max']}")
    for a in audits:
        h = a["host"]
        if snap.epochs.get(h) != a["epoch"]:
            continue                        # reaped since its audit: C1 covers it
        mirrored = {c: m for c, (m, _) in a["mirrors"].items() if m}
        if snap.leases.get(h, {}) != mirrored or a["lease"] != mirrored:
            bad.append(f"C3 {h}: lease {snap.leases.get(h)} / {a['lease']} != mirrors "
                       f"{mirrored}")
        used = {c: u for c, (_, u) in a["mirrors"].items() if u}
        if used != a["held"]:
            bad.append(f"C3 {h}: mirrors' usage {used} != pages held {a['held']}")
    live = {a["host"] for a in audits}
    if set(snap.leases) - live:
        bad.append(f"C1 leases of hosts not live: {sorted(set(snap.leases) - live)}")
    seen = [tuple(r.split()[:2]) for r in snap.reaped]
    if len(seen) != len(set(seen)):
        bad.append(f"C4 a host epoch reaped twice: {snap.reaped}")
    return bad
