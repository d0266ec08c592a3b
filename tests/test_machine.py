"""procs.Machine: CPU processes, work_on_cpu, kill and the hotplug-dead path, under
both the fork and the forkserver start methods."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from procs import CpuDead, Machine
from shmcounter.invariants import check_invariants

import tasks

METHODS = ["fork", "forkserver"]


@pytest.fixture
def leaf(arena):
    root = arena.new_counter("root")
    leaf = arena.new_counter("leaf", parent=root)
    leaf.enable_stock(64)
    return leaf


@pytest.fixture
def arena(make_arena):
    return make_arena(ncpus=3)                   # more CPUs than the 2 cores


@pytest.mark.parametrize("method", METHODS)
def test_cpus_are_pinned_k_mod_n_and_know_who_they_are(make_machine, method):
    m = make_machine(start_method=method)
    cores = sorted(os.sched_getaffinity(0))
    assert m.online == {0, 1, 2}
    for cpu in range(3):
        assert m.run_on(cpu, tasks.whoami) == (cpu, m.pid(cpu), [cores[cpu % len(cores)]])
    assert repr(m) == "<Machine online={0, 1, 2} dead={}>"


@pytest.mark.parametrize("method", METHODS)
def test_run_on_charges_through_the_cpus_own_stock(make_machine, leaf, arena, method):
    m = make_machine(start_method=method)
    assert [m.run_on(cpu, tasks.try_charge, arena, "leaf", 1) for cpu in range(3)] == \
        [(True, None)] * 3
    assert (leaf.usage, [leaf.stock(cpu) for cpu in range(3)]) == (192, [63, 63, 63])
    check_invariants(arena, {"leaf": 3})
    for cpu in range(3):
        m.run_on(cpu, tasks.uncharge, arena, "leaf", 1)


def test_task_errors_come_back_with_the_remote_traceback(make_machine):
    m = make_machine(1)
    with pytest.raises(KeyError, match="no such page") as info:
        m.run_on(0, tasks.fail)
    assert 'raise KeyError("no such page")' in str(info.value.__cause__)
    with pytest.raises(TypeError,
                       match=r"^cannot send .*<lambda>\(\) to CPU 0: .*must be picklable"):
        m.submit(0, lambda: 1)
    assert m.run_on(0, tasks.whoami)[0] == 0                  # still serving


@pytest.mark.parametrize("method", METHODS)
def test_kill_returns_after_the_dead_cpus_stock_is_reclaimed(make_machine, leaf, arena, method):
    m = make_machine(start_method=method)
    for cpu in range(3):
        m.run_on(cpu, tasks.try_charge, arena, "leaf", 10)    # stock 54 each
    long_task = m.submit(1, tasks.busy, 60)
    assert m.kill(1) == {"leaf": 54}
    assert m.online == {0, 2} and repr(m) == "<Machine online={0, 2} dead={1}>"
    assert (leaf.usage, [leaf.stock(cpu) for cpu in range(3)]) == (64 * 3 - 54, [54, 0, 54])
    with pytest.raises(CpuDead, match=rf"^CPU 1 \(pid {m.pid(1)}\) died while running "
                                      r"busy\(60\): exit code SIGKILL\(-9\)\.\nIts stocks were "
                                      r"reclaimed \(54 pages from 1 counters\); CPUs \[0, 2\] "
                                      r"are unaffected\.\nResubmit on an online CPU, or call "
                                      r"m\.start_cpu\(1\)\.$"):
        long_task.result()
    with pytest.raises(CpuDead, match=r"^CPU 1 is offline; call m\.start_cpu\(1\) first$"):
        m.run_on(1, tasks.whoami)
    check_invariants(arena, {"leaf": 30})                     # the dead CPU's 10 stay charged
    old_pid = m.pid(1)
    m.start_cpu(1)
    assert m.online == {0, 1, 2} and m.pid(1) != old_pid
    assert m.run_on(1, tasks.stock, arena, "leaf") == 0       # a clean slot
    for cpu in range(3):
        m.run_on(cpu, tasks.uncharge, arena, "leaf", 10)


def test_a_failing_hotplug_path_raises_from_kill_instead_of_hanging(make_machine, leaf,
                                                                    arena, monkeypatch):
    m = make_machine(2)
    m.run_on(1, tasks.try_charge, arena, "leaf", 10)
    real = arena.hotplug_cpu_dead

    def broken(cpu: int) -> dict[str, int]:
        raise OSError("no such thing")

    monkeypatch.setattr(arena, "hotplug_cpu_dead", broken)
    with pytest.raises(RuntimeError, match=r"^CPU 1 \(pid \d+\) is dead but its hotplug-dead "
                                           r"path failed; its stocks are not reclaimed$"):
        m.kill(1)
    assert m.online == {0} and leaf.stock(1) == 54
    assert real(1) == {"leaf": 54}                          # run it by hand: reclaimed
    m.start_cpu(1)
    m.run_on(1, tasks.uncharge, arena, "leaf", 10)


def test_kill_minus_9_from_a_shell_and_a_crash_are_detected(make_machine, leaf, arena):
    m = make_machine()
    m.run_on(0, tasks.try_charge, arena, "leaf", 1)
    m.run_on(2, tasks.try_charge, arena, "leaf", 1)
    subprocess.run(["kill", "-9", str(m.pid(0))], check=True)
    m.wait_offline(0, timeout=10)
    crashed = m.submit(2, tasks.crash)
    m.wait_offline(2, timeout=10)
    with pytest.raises(CpuDead, match=r"died while running crash\(\): exit code SIGSEGV\(-11\)"):
        crashed.result()
    assert m.online == {1}
    assert (leaf.usage, leaf.stock(0), leaf.stock(2)) == (2, 0, 0)
    check_invariants(arena, {"leaf": 2})
    leaf.uncharge(2)


def test_wait_offline_times_out_on_a_live_cpu(make_machine):
    m = make_machine(1)
    with pytest.raises(TimeoutError, match=r"^CPU 0 \(pid \d+\) is still online after 0.05 s$"):
        m.wait_offline(0, timeout=0.05)


def test_bad_cpu_ids(make_machine):
    m = make_machine(2)
    for bad in (-1, 2, "0", None):
        with pytest.raises(ValueError, match=r"^cpu must be an int in \[0, 2\), got "):
            m.submit(bad, tasks.whoami)
    with pytest.raises(ValueError, match=r"^CPU 0 is online \(pid \d+\); only an offline CPU"):
        m.start_cpu(0)
    with pytest.raises(ValueError, match=r"^ncpus must be an int in \[1, 3\]"):
        Machine(m.arena, 4)


OWNER = """
import sys, time
from shmcounter import Arena
from procs import Machine
arena = Arena.create(ncpus=2, max_counters=4)
m = Machine(arena, start_method=sys.argv[1])
print(" ".join(str(m.pid(k)) for k in range(2)), flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("method", METHODS)
def test_no_cpu_process_outlives_a_killed_owner(method):
    owner = subprocess.Popen([sys.executable, "-c", OWNER, method], stdout=subprocess.PIPE,
                             text=True)
    assert owner.stdout is not None
    try:
        pids = [int(p) for p in owner.stdout.readline().split()]
        assert len(pids) == 2
        owner.send_signal(signal.SIGKILL)
        owner.wait(30)
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not [pid for pid in pids if _alive(pid)]
    finally:
        owner.kill()
        owner.wait()


def test_leaving_the_with_block_stops_every_cpu(arena, leaf):
    with Machine(arena, 2) as m:
        m.run_on(0, tasks.try_charge, arena, "leaf", 1)
        pids = [m.pid(0), m.pid(1)]
    assert not [pid for pid in pids if _alive(pid)]
    assert (leaf.usage, leaf.stock(0)) == (1, 0)             # clean stop drained CPU 0
    assert arena.online_cpus() == []
    leaf.uncharge(1)


def _alive(pid: int) -> bool:
    from shmcounter.proc import pid_alive
    return pid_alive(pid)
