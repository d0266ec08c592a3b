"""A drain signal reaches only a live, registered CPU of the arena (drain.post_work).

SIGDRAIN (SIGRTMIN+3) terminates a process that has no handler for it, and a
kill() of pid 0 reaches the sender's whole process group. So each scenario that
could send one astray runs in a child that leads its own session and process
group: if it signals its group, it dies with -SIGDRAIN, and pytest, outside that
group, sees the exit code. A bystander ("innocent") counts the SIGDRAINs it gets.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest

import shmcounter
from shmcounter import Arena
from shmcounter.drain import SIGDRAIN
from shmcounter.invariants import check_invariants
from shmcounter.memcg import Cgroups
from shmcounter.proc import my_start_time, proc_stat
from shmcounter.segment import R_REQ_SEQ, R_START

import tasks

SESSION_TIMEOUT = 90.0
ROUNDS = 40000                # register/unregister rounds racing the drains
RESTART_SECONDS = 3.0         # how long CPU 0 drains while CPU 1 is killed and restarted

_fork = mp.get_context("fork")


# ---- harness --------------------------------------------------------------------------

def _session_main(conn: Any, fn: Callable[..., Any], args: tuple) -> None:
    os.setsid()
    conn.send(fn(*args))


def in_own_session(fn: Callable[..., Any], *args: Any) -> tuple[int | None, Any]:
    """Run fn(*args) in a forked child that leads a new session and process group;
    return (its exit code, fn's result, or None if it died before returning)."""
    r, w = _fork.Pipe(duplex=False)
    p = _fork.Process(target=_session_main, args=(w, fn, args))
    p.start()
    assert p.pid is not None
    w.close()
    try:
        result = None
        if r.poll(SESSION_TIMEOUT):
            try:
                result = r.recv()
            except EOFError:
                pass                                    # died before returning
        p.join(SESSION_TIMEOUT)
    finally:
        if p.exitcode is None:                          # alive, not reaped: its group
            os.killpg(p.pid, signal.SIGKILL)
            p.join()
        r.close()
    return p.exitcode, result


def _innocent(conn: Any) -> None:
    """A process that is no CPU: counts the SIGDRAINs it receives, reports on request."""
    got: list[int] = []
    signal.signal(SIGDRAIN, lambda signum, frame: got.append(signum))
    conn.send(my_start_time())
    while conn.recv() is not None:
        conn.send(len(got))


@pytest.fixture
def innocent():
    """(pid, start time, signals received so far: a callable) of a bystander process."""
    ours, theirs = _fork.Pipe()
    p = _fork.Process(target=_innocent, args=(theirs,), daemon=True)
    p.start()
    theirs.close()
    start = ours.recv()

    def received() -> int:
        ours.send(True)
        return ours.recv()

    yield p.pid, start, received
    ours.send(None)
    p.join(30)
    ours.close()
    assert p.exitcode == 0


# ---- a CPU that registers and unregisters while another process drains ----------------

def _register_loop(name: str, rounds: int, legacy: bool) -> None:
    """CPU 1 comes and goes `rounds` times, charging one page into its stock each time."""
    arena = Arena.attach(name)
    target = Cgroups.open(arena).cgroup("A") if legacy else arena.counter("c")
    for _ in range(rounds):
        shmcounter.register_cpu(arena, 1)
        charged = target.try_charge(1)
        assert charged if legacy else charged[0]  # type: ignore[index]  # a (ok, failed) pair
        target.uncharge(1)
        shmcounter.unregister_cpu()
    arena.close()


def _drain_while_cpu1_comes_and_goes(name: str, rounds: int, legacy: bool) -> tuple:
    """Drain (drain_stock, or the legacy drain_all_stock) until CPU 1's loop ends."""
    arena = Arena.attach(name)
    if legacy:
        tree = Cgroups.open(arena)
        drain = partial(tree.drain_all_stock, tree.cgroup("A"))
    else:
        drain = partial(arena.counter("c").drain_stock, timeout=30)
    churn = _fork.Process(target=_register_loop, args=(name, rounds, legacy))
    churn.start()
    results = set()
    while churn.exitcode is None:
        results.add(drain())
    churn.join()
    arena.close()
    return churn.exitcode, results


@pytest.mark.parametrize("legacy", [False, True], ids=["drain_stock", "legacy_drain_all"])
def test_a_drain_racing_register_and_unregister_signals_no_process_group(make_arena, legacy):
    """The issue's reproducer: CPU 1 registers and unregisters in a loop while a
    process of the same group drains. A pid read while CPU 1 is offline (0) must
    never be signalled once it has come back: kill(0) would end the group."""
    arena = make_arena(ncpus=2)
    if legacy:
        counter = Cgroups(arena, variant="legacy").create("A").memory
    else:
        counter = arena.new_counter("c")
        counter.enable_stock(64)
    code, result = in_own_session(_drain_while_cpu1_comes_and_goes, arena.name, ROUNDS, legacy)
    assert (code, result) == (0, (0, {True}))          # every drain done, every round run
    assert (arena.cpu_pid(1), counter.usage) == (0, 0)
    check_invariants(arena, {})


# ---- rows that name a process that is not the CPU --------------------------------------

def word(arena: Arena, row: int, index: int) -> int:
    """Word `index` (R_START, R_REQ_SEQ, ...) of writer row `row`."""
    return arena._slots.load(arena._row_slot(row) + index)


def test_a_stray_pid_in_a_free_cpu_row_is_not_signalled(arena, innocent):
    """Row 1 is free (start word 0) but its pid word names a live bystander."""
    pid, start, received = innocent
    c = arena.new_counter("c")
    c.enable_stock(64)
    arena._slots.store(arena._cpu_slot(1), pid)
    try:
        assert (arena.cpu_pid(1), word(arena, 1, R_START)) == (pid, 0)
        assert c.drain_stock(timeout=5)
        assert received() == 0                          # it got no SIGDRAIN
        assert (word(arena, 1, R_REQ_SEQ), int(arena.requests[1, c._index])) == (0, 0)
    finally:
        arena._slots.store(arena._cpu_slot(1), 0)


def test_a_pid_whose_start_time_is_not_the_rows_is_not_signalled(arena, innocent):
    """Row 1 names the bystander's pid with the start time of another process (this
    one, started earlier): the pid was reused since the CPU registered."""
    pid, start, received = innocent
    c = arena.new_counter("c")
    c.enable_stock(64)
    other = my_start_time()
    assert other != start
    arena._slots.store(arena._row_slot(1) + R_START, other)
    arena._slots.store(arena._cpu_slot(1), pid)
    try:
        assert c.drain_stock(timeout=5)
        assert received() == 0
        assert (word(arena, 1, R_REQ_SEQ), int(arena.requests[1, c._index])) == (0, 0)
    finally:
        arena._slots.store(arena._cpu_slot(1), 0)
        arena._slots.store(arena._row_slot(1) + R_START, 0)


def test_pid_1_is_never_signalled(arena, monkeypatch):
    """Row 1 names pid 1 with its true start time. Sending nothing for real: every
    way to send a signal records instead (SIGRTMIN+3 tells systemd to halt)."""
    sent: list[tuple] = []
    monkeypatch.setattr(os, "kill", lambda *a: sent.append(("kill", *a)))
    monkeypatch.setattr(signal, "pidfd_send_signal", lambda *a: sent.append(("pidfd", *a)))
    c = arena.new_counter("c")
    c.enable_stock(64)
    init = proc_stat(1)
    assert init is not None
    arena._slots.store(arena._row_slot(1) + R_START, init[1])
    arena._slots.store(arena._cpu_slot(1), 1)
    try:
        assert c.drain_stock(timeout=1)
        assert sent == []
        assert word(arena, 1, R_REQ_SEQ) == 0
    finally:
        arena._slots.store(arena._cpu_slot(1), 0)
        arena._slots.store(arena._row_slot(1) + R_START, 0)


# ---- procs.Machine: one CPU drains while the owner kills and restarts another ----------

def drain_for(arena: Arena, name: str, seconds: float) -> tuple[int, set]:
    """A task for CPU 0: drain `name` on every CPU for `seconds`."""
    counter = arena.counter(name)
    deadline = time.monotonic() + seconds
    drains, results = 0, set()
    while time.monotonic() < deadline:
        results.add(counter.drain_stock(timeout=30))
        drains += 1
    return drains, results


def _drain_while_cpu1_restarts(name: str, seconds: float) -> tuple:
    from procs import Machine
    arena = Arena.attach(name)
    with Machine(arena, start_method="fork") as m:
        drainer = m.submit(0, drain_for, arena, "c", seconds)
        rounds = 0
        while not drainer.done():
            assert m.run_on(1, tasks.try_charge, arena, "c", 1) == (True, None)
            m.kill(1)
            m.start_cpu(1)
            rounds += 1
        drains, results = drainer.result()
        online = sorted(m.online)
    arena.close()
    return rounds, drains > 0, results, online


def test_a_cpu_draining_while_the_owner_kills_and_restarts_another_survives(make_arena):
    """Each restart of CPU 1 turns its row from free to registered: a drain on CPU 0
    that read the row's pid before must not signal pid 0 (CPU 0's group, with the
    owner in it) after. Each round CPU 1 charges one page and dies holding the
    other 63 of its batch: the page stays charged (hotplug reclaims stock only)."""
    arena = make_arena(ncpus=2)
    c = arena.new_counter("c")
    c.enable_stock(64)
    code, result = in_own_session(_drain_while_cpu1_restarts, arena.name, RESTART_SECONDS)
    assert code == 0, f"the owner's session died: exit code {code}"
    rounds, drained, results, online = result
    assert rounds > 0 and (drained, results, online) == (True, {True}, [0, 1])
    assert (c.usage, c.stock(0), c.stock(1)) == (rounds, 0, 0)
    assert (arena.cpu_pid(0), arena.cpu_pid(1)) == (0, 0)         # both stopped cleanly
    check_invariants(arena, {"c": rounds})
    c.uncharge(rounds)
