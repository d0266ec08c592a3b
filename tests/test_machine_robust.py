"""procs.Machine never waits forever: a cancelled future, a monitor that fails, a
stop_machine that cannot quiesce, a hotplug that does not finish in time."""
from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import pytest

from procs import BrokenMachine, CpuDead, Machine
from shmcounter import WaitTimeout
from shmcounter.invariants import check_invariants

import tasks

HANG = 60.0         # seconds after which a call counts as hung


def bounded(fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
    """fn(*args, **kw) in a thread: its result or its exception, or a failure if it
    has not returned within HANG seconds (the thread is left behind)."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append((True, fn(*args, **kw)))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(HANG)
    if not outcome:
        pytest.fail(f"{getattr(fn, '__qualname__', fn)}{args} hangs")
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


@pytest.fixture
def machine(arena):
    """machine(ncpus) -> Machine on `arena`, closed after the test within HANG
    seconds, its CPU processes killed if not (machine's close is unbounded)."""
    made: list[Machine] = []

    def make(ncpus: int) -> Machine:
        m = Machine(arena, ncpus, start_method="fork")
        made.append(m)
        return m

    yield make
    for m in made:
        try:
            bounded(m.close)
        finally:
            for c in m._cpus.values():
                if c.process.is_alive():
                    c.process.kill()
                c.process.join(30)


@pytest.fixture
def x(arena):
    x = arena.new_counter("x")
    x.enable_stock(64)
    return x


def park_writer_in_op(cpus, arena):
    """A live non-CPU writer stopped (SIGSTOP) inside a charge of x: no
    stop_machine can quiesce while it stays there. Returns its CpuProcess."""
    w = cpus(None)
    w.call(tasks.park_at, "charge:level")
    w.start(tasks.try_charge, arena, "x", 1)
    tasks.wait_stopped(w.pid)
    return w


def test_a_submitted_task_cannot_be_cancelled_and_its_cpu_still_dies_cleanly(machine, x, arena):
    m = machine(2)
    m.run_on(1, tasks.try_charge, arena, "x", 1)
    task = m.submit(1, tasks.busy, 60)
    assert task.cancel() is False and task.running()    # it is in CPU 1's pipe already
    assert bounded(m.kill, 1, timeout=30) == {"x": 63}
    with pytest.raises(CpuDead, match=rf"^CPU 1 \(pid {m.pid(1)}\) died while running busy\(60\)"):
        task.result(timeout=0)
    assert m.run_on(0, tasks.try_charge, arena, "x", 1) == (True, None)   # monitor alive
    check_invariants(arena, {"x": 2})


def test_a_monitor_that_fails_breaks_the_machine_and_wakes_everyone(machine, x, arena):
    m = machine(2)
    for cpu in range(2):
        m.run_on(cpu, tasks.try_charge, arena, "x", 1)
    assert (x.usage, x.stock(0), x.stock(1)) == (128, 63, 63)
    task = m.submit(0, tasks.busy, 60)

    def fail(c):
        raise ZeroDivisionError("injected into the monitor")

    m._cpu_exited = fail                                  # the monitor's next step fails
    with pytest.raises(BrokenMachine, match=r"^the monitor of this Machine failed "
                                            r"\(ZeroDivisionError: injected into the monitor\)"):
        bounded(m.kill, 1)
    with pytest.raises(BrokenMachine, match=rf"^busy\(60\) on CPU 0 \(pid {m.pid(0)}\) will "
                                            r"get no reply: the monitor") as info:
        task.result(timeout=0)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    for call in (lambda: m.wait_offline(0), lambda: m.submit(0, tasks.whoami),
                 lambda: m.kill(0), lambda: m.wait_repaired(1)):
        with pytest.raises(BrokenMachine):
            call()
    assert repr(m) == "<Machine broken online={0, 1} dead={}>"
    bounded(m.close, timeout=30)      # kills CPU 0, runs both CPUs' hotplug-dead path
    assert not any(c.process.is_alive() for c in m._cpus.values())
    assert (x.usage, x.stock(0), x.stock(1), arena.cpu_pid(0), arena.cpu_pid(1)) == (2, 0, 0, 0, 0)
    check_invariants(arena, {"x": 2})


def test_stop_machine_gives_up_naming_the_writer_that_keeps_it_from_quiescing(
        machine, cpus, x, arena):
    m = machine(2)
    m.run_on(1, tasks.try_charge, arena, "x", 1)
    w = park_writer_in_op(cpus, arena)
    arena.wait_timeout = 0.3
    pid = m.pid(1)
    with pytest.raises(RuntimeError, match=rf"^CPU 1 \(pid {pid}\) is dead but its hotplug-dead "
                                           r"path failed; its stocks are not reclaimed$") as info:
        bounded(m.kill, 1)
    assert str(info.value.__cause__) == (
        f"arena '{arena.name}': waited 0.3 s for writer row 2 to end its op, held by pid "
        f"{w.pid}")
    with pytest.raises(WaitTimeout, match=rf"^arena '{arena.name}': waited 0.3 s for writer "
                                          rf"row 2 to end its op, held by pid {w.pid}$"):
        arena.repair()
    # nothing changed: CPU 1's stock, its registration, the writer's half charge
    assert (x.usage, x.stock(1), arena.cpu_pid(1)) == (65, 63, pid)
    os.kill(w.pid, signal.SIGCONT)                        # its charge completes
    assert w.result() == (True, None)
    arena.wait_timeout = 10.0
    assert arena.hotplug_cpu_dead(1) == {"x": 63}
    check_invariants(arena, {"x": 2})
    w.call(tasks.uncharge, arena, "x", 1)


def test_kill_and_close_give_up_at_their_deadline_naming_the_cpu(machine, cpus, x, arena):
    m = machine(2)
    m.run_on(1, tasks.try_charge, arena, "x", 1)
    w = park_writer_in_op(cpus, arena)                   # the hotplug-dead path waits for it
    pid = m.pid(1)
    for bad in (-1, float("inf")):
        with pytest.raises(ValueError, match=r"^timeout must be a finite number of seconds "
                                             rf"> 0, got {bad}$"):
            m.kill(1, timeout=bad)
    assert m.online == {0, 1}                            # nothing was killed
    with pytest.raises(TimeoutError, match=rf"^CPU 1 \(pid {pid}\) was killed, but its "
                                           r"hotplug-dead path has not finished within 0.5 s; "
                                           r"m.wait_offline\(1\) waits for it$"):
        bounded(m.kill, 1, timeout=0.5)
    # CPU 0 cannot stop cleanly either: its unregister drains in an op, which
    # waits for the same stop_machine; killed at the deadline, it waits as well
    with pytest.raises(TimeoutError, match=rf"^CPU 0 \(pid {m.pid(0)}\) and CPU 1 \(pid {pid}\) "
                                           r"did not go offline within 1 s: the hotplug-dead "
                                           r"path has not finished; every CPU process is killed$"):
        bounded(m.close, timeout=1)
    assert not any(c.process.is_alive() for c in m._cpus.values())
    os.kill(w.pid, signal.SIGCONT)                        # the hotplug-dead path goes on
    assert w.result() == (True, None)
    m.wait_offline(1, timeout=30)
    m._monitor.join(30)
    assert not m._monitor.is_alive()
    assert (x.usage, x.stock(0), x.stock(1)) == (2, 0, 0)
    check_invariants(arena, {"x": 2})
    w.call(tasks.uncharge, arena, "x", 1)
