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

import concurrent.futures
import multiprocessing as mp
import os
import random
import select
import signal
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from shmcounter import Arena

from .errors import ClusterError, HostStale
from .host import EPOCH, Host, HostView, state_path
from .tree import DRAIN_TIMEOUT, Cluster, Snapshot

REPLY_TIMEOUT = 60.0

# Pages held by this CPU process: {(epoch, counter): pages}. Pages of an epoch
# that was reaped are gone (the reap uncharged them): only the live epoch's count.
_HELD: dict[tuple[int, str], int] = defaultdict(int)


def work(host: HostView, names: list[str], seconds: float, seed: int,
         max_pages: int) -> dict[str, Any]:
    """Random charges and uncharges of `names` for `seconds` of this process's
    running time (a CPU's task): a process stopped for a while goes on after
    SIGCONT, and meets its lease expired.

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
    last = time.monotonic()
    while last < end:
        now = time.monotonic()
        if now - last > 0.1:                # stopped meanwhile: not running time
            end += now - last
        last = now
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
               max_counters: int, auto_rejoin: bool, drain_timeout: float,
               conn: Any) -> None:
    os.setpgid(0, 0)                      # a process group of its own: the host
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with(os.getppid())
    from procs import Machine
    arena = Arena.create(ncpus=ncpus, max_counters=max_counters)
    host: Host | None = None
    try:
        cl = Cluster.connect(url, namespace)
        host = cl.join(arena, host=name, ttl=ttl, batch=batch, drain_timeout=drain_timeout)
        machine = Machine(arena, ncpus, start_method="fork")
    except BaseException as exc:              # leave nothing behind: lease, file, arena
        if host is not None:
            host.close()
        arena.close()
        arena.unlink()
        conn.send(("failed", repr(exc)))
        os._exit(1)
    conn.send(("ready", arena.name))
    futures: list[Any] = []
    results: list[dict[str, Any]] = []
    while True:
        if not conn.poll(0.02):
            if auto_rejoin and host.stale:
                host.rejoin()
            continue
        cmd, *args = conn.recv()
        if cmd in ("charge", "uncharge"):
            conn.send(_charge(host, cmd, *args))
        elif cmd == "rejoin":
            conn.send(host.rejoin())
        elif cmd == "state":
            conn.send({"epoch": host.epoch, "mirrors": {
                c: (m.max, m.usage) for c, m in host._mirrors().items()}})
        elif cmd == "call":
            fn, fargs = args
            futures = [machine.submit(cpu, fn, host, cpu, *fargs) for cpu in range(ncpus)]
            conn.send("started")
        elif cmd == "run":
            names, seconds, seed, max_pages = args
            futures = [machine.submit(cpu, work, host, names, seconds, seed * 100 + cpu,
                                      max_pages) for cpu in range(ncpus)]
            conn.send("started")
        elif cmd == "wait":
            # the CPUs may wait for a rejoin (after HostStale): rejoin meanwhile
            while concurrent.futures.wait(futures, timeout=0.02).not_done:
                if auto_rejoin and host.stale:
                    host.rejoin()
            results = [f.result() for f in futures]
            futures = []
            conn.send("done")
        elif cmd == "results":
            conn.send(results)
        elif cmd == "audit":
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


def _die_with(parent: int) -> None:
    """SIGKILL this host's whole process group when `parent` (its driver) exits:
    a driver that dies leaves no host behind."""
    fd = os.pidfd_open(parent)

    def watch() -> None:
        select.select([fd], [], [])
        os.killpg(0, signal.SIGKILL)

    threading.Thread(target=watch, name="driver-watch", daemon=True).start()


def _charge(host: Host, cmd: str, name: str, n: int) -> Any:
    """One charge or uncharge in the host's main process: (ok, refusing counter's
    name or None) | None for an uncharge | "stale"."""
    try:
        hc = host.counter(name)
        if cmd == "uncharge":
            hc.uncharge(n)
            return None
        ok, fail = hc.try_charge(n)
        return ok, None if fail is None else fail.name
    except HostStale:
        return "stale"


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
                 ttl: float = 1.0, batch: int = 16, max_counters: int = 1024,
                 auto_rejoin: bool = True, drain_timeout: float = DRAIN_TIMEOUT) -> None:
        ctx = mp.get_context("fork")
        self.name = name
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_host_main, name=f"host-{name}",
                                args=(url, namespace, name, ncpus, ttl, batch, max_counters,
                                      auto_rejoin, drain_timeout, child))
        self.proc.start()
        child.close()
        assert self.proc.pid is not None
        self.pgid: int = self.proc.pid
        self.arena_name = ""
        self.alive = True
        try:
            tag, what = self._reply()
            if tag != "ready":
                raise ClusterError(f"host {name} did not start: {what}")
            self.arena_name = what
        except BaseException:
            self.kill()
            raise

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

    def wait(self) -> None:
        """Wait for the round's end on every CPU."""
        assert self.command("wait") == "done"

    def call(self, fn: Any, *args: Any) -> None:
        """Start fn(host view, cpu, *args) on every CPU (a module-level function);
        wait() ends it, results() gives what each returned."""
        assert self.command("call", fn, args) == "started"

    def results(self) -> list[Any]:
        return list(self.command("results"))

    def audit(self) -> dict[str, Any]:
        """The host after its round (see _audit)."""
        return dict(self.command("audit"))

    def charge(self, name: str, n: int) -> Any:
        """try_charge in the host's main process: (ok, refusing name) | "stale"."""
        return self.command("charge", name, n)

    def uncharge(self, name: str, n: int) -> Any:
        return self.command("uncharge", name, n)

    def state(self) -> dict[str, Any]:
        """{epoch, mirrors: {counter: (max, usage)}} of the live epoch."""
        return dict(self.command("state"))

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
        read together under the host lock, and its mirrors' usage == the pages
        its CPUs hold (I7 one level up);
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
        if a["lease"] != mirrored:
            bad.append(f"C3 {h}: lease {a['lease']} != mirrors {mirrored}")
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


FAULT_KINDS = ("kill", "long-stop", "short-stop")


@dataclass
class TortureReport:
    """What torture() did and found. violations: [] when every check held."""
    faults: dict[str, int] = field(default_factory=lambda: {k: 0 for k in FAULT_KINDS})
    violations: list[str] = field(default_factory=list)
    reaps: int = 0                     # host epochs reaped (the tree's list, no repeats)
    spurious_reaps: int = 0            # of hosts that were not faulted (a slow heartbeat)
    fenced: int = 0                    # charges refused with HostStale
    charges: int = 0
    refused: int = 0
    drains: int = 0
    reclaim_s: list[float] = field(default_factory=list)   # SIGKILL -> reaped
    seconds: float = 0.0

    def __str__(self) -> str:
        r = sorted(self.reclaim_s) or [0.0]
        return "\n".join([
            f"{sum(self.faults.values())} host faults {self.faults} in {self.seconds:.0f} s",
            f"charges ok {self.charges}, refused {self.refused}, drains {self.drains}, "
            f"fenced (HostStale) {self.fenced}",
            f"host epochs reaped {self.reaps} (each once), of hosts not faulted "
            f"{self.spurious_reaps}",
            f"SIGKILL -> reaped: median {r[len(r) // 2]:.2f} s, max {r[-1]:.2f} s",
            "violations: " + ("none" if not self.violations else
                              f"{len(self.violations)}\n  " + "\n  ".join(self.violations)),
        ])


def torture(cl: Cluster, faults: int, seed: int = 0, nhosts: int = 3, ncpus: int = 2,
            ttl: float = 1.0, batch: int = 16, max_pages: int = 4, round_s: float = 0.25,
            drain_timeout: float = 0.2, progress: bool = False) -> TortureReport:
    """`nhosts` hosts of `ncpus` CPUs charge and uncharge root > (a, b) at random
    (work); `faults` faults on whole hosts in turn: SIGKILL (the host restarts and
    rejoins), SIGSTOP until the others reaped it (then SIGCONT: fenced), SIGSTOP
    for 50 ms (well inside the margin). After each fault, all hosts idle:
    check_cluster (C1-C4), every faulted epoch reaped, and no charge that started
    after a host was stopped succeeded at the epoch it was reaped at. (The
    tree keeps its latest 100 reaps: each faulted epoch is checked right after
    its fault, repeats among the latest 100 after each.)"""
    rng = random.Random(seed)
    report = TortureReport()
    t_start = time.monotonic()
    root = cl.new_counter("root", max=300)
    cl.new_counter("a", parent=root, max=40)
    cl.new_counter("b", parent=root, max=290)
    names: list[str] = []
    ns = cl.namespace

    def start(h: str) -> HostProcess:
        return HostProcess(cl.url, ns, h, ncpus=ncpus, ttl=ttl, batch=batch,
                           drain_timeout=drain_timeout)

    fleet: dict[str, HostProcess] = {}
    faulted: set[tuple[str, str]] = set()     # (host, epoch) killed or long-stopped
    try:
        for i in range(nhosts):
            fleet[f"h{i}"] = start(f"h{i}")
        for fault in range(faults):
            # tight rounds (a is small: refusals, drains) and roomy ones (b only:
            # leases have room, and a host that wakes stale would have stock)
            names = ["b"] if fault % 2 else ["root", "a", "b"]
            for p in fleet.values():
                p.run(names, round_s, seed * 100_000 + fault, max_pages)
            time.sleep(rng.uniform(0.02, round_s * 0.8))
            victim = rng.choice(sorted(fleet))
            p = fleet[victim]
            kind = FAULT_KINDS[fault % 3]
            report.faults[kind] += 1
            epoch = str(cl.client.get(f"{ns}:live:{victim}"))
            stopped = 0
            if kind == "kill":
                t_kill = time.monotonic()
                p.kill()
                if not _wait(lambda v=victim, e=epoch: _reaped(cl, v, e), ttl + 10):
                    report.violations.append(f"fault {fault}: {victim} epoch {epoch} "
                                             f"killed, not reaped in {ttl + 10} s")
                report.reclaim_s.append(time.monotonic() - t_kill)
                faulted.add((victim, epoch))
                fleet[victim] = start(victim)
                fleet[victim].run(names, round_s / 4, seed * 100_000 + fault, max_pages)
            elif kind == "long-stop":
                p.signal(signal.SIGSTOP)
                stopped = time.monotonic_ns()
                if not _wait(lambda v=victim, e=epoch: _reaped(cl, v, e), ttl + 10):
                    report.violations.append(f"fault {fault}: {victim} epoch {epoch} "
                                             f"stopped, not reaped in {ttl + 10} s")
                p.signal(signal.SIGCONT)
                faulted.add((victim, epoch))
            else:
                p.signal(signal.SIGSTOP)
                time.sleep(0.05)
                p.signal(signal.SIGCONT)
            for q in fleet.values():
                q.wait()
            audits = [q.audit() for q in fleet.values()]
            snap = cl.snapshot()
            report.violations += [f"fault {fault} ({kind} {victim}): {v}"
                                  for v in check_cluster(snap, audits)]
            for a in audits:
                report.charges += a["ok"]
                report.refused += a["refused"]
                report.fenced += a["stale"]
                if kind == "long-stop" and a["host"] == victim:
                    late = a["last_ok"].get(int(epoch), 0)
                    if late >= stopped:
                        report.violations.append(
                            f"fault {fault}: {victim} spent stale stock at epoch {epoch}, "
                            f"a charge started {(late - stopped) / 1e9:.3f} s after its stop")
            if progress:
                print(f"\rfault {fault + 1}/{faults}: {kind} {victim}; violations "
                      f"{len(report.violations)}", end="", file=sys.stderr, flush=True)
        for p in fleet.values():
            p.command("release")
        for p in fleet.values():
            p.close()
        snap = cl.snapshot()
        if any(f["usage"] for f in snap.counters.values()):
            report.violations.append(f"after every host left: {snap.counters}")
        report.reaps = snap.stats.get("reaped", 0)
        report.spurious_reaps = report.reaps - len(faulted)
        report.drains = snap.stats.get("drains", 0)
        # the tree keeps the latest 100 reaps: repeats among them
        seen = [tuple(r.split()[:2]) for r in snap.reaped]
        if len(seen) != len(set(seen)):
            report.violations.append("a host epoch reaped twice")
    finally:
        for p in fleet.values():
            p.kill()
        if progress:
            print(file=sys.stderr)
    report.seconds = time.monotonic() - t_start
    return report


def _reaped(cl: Cluster, host: str, epoch: str) -> bool:
    return any(r.startswith(f"{host} {epoch} ") for r in cl.snapshot().reaped)


def _wait(predicate: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True
