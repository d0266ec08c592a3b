"""Fixtures: an arena that is always unlinked, CPU processes that are always reaped,
and invariant checks after every test that uses an arena."""
from __future__ import annotations

import os

import pytest

import shmcounter
from shmcounter import Arena
from shmcounter.invariants import check_invariants

from cpuproc import CpuProcess


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "underflow_expected(n): the test causes n underflows")
    config.addinivalue_line("markers", "forced: the test makes forced charges (I6 waived)")


def _our_segments() -> set[str]:
    """Arenas created by this pytest process (not other runs on the machine)."""
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"shmcounter_{os.getpid()}_")}


@pytest.fixture(autouse=True, scope="session")
def no_leaked_segments():
    before = _our_segments()
    yield
    leaked = _our_segments() - before
    for name in leaked:
        os.unlink(f"/dev/shm/{name}")
    assert not leaked, f"tests leaked shared-memory segments: {sorted(leaked)}"


@pytest.fixture
def make_arena(request):
    """make_arena(**kw) -> Arena; unlinked after the test, invariants checked first."""
    made: list[Arena] = []

    def make(**kw) -> Arena:
        kw.setdefault("ncpus", 2)
        kw.setdefault("max_counters", 64)
        a = Arena.create(**kw)
        made.append(a)
        return a

    yield make
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    marker = request.node.get_closest_marker("underflow_expected")
    try:
        for a in made:
            if not a.closed and not failed:
                check_invariants(a, underflows=marker.args[0] if marker else 0,
                                 forced=request.node.get_closest_marker("forced") is not None)
    finally:
        shmcounter.unregister_cpu()
        for a in made:
            a.close()
            a.unlink()                    # tolerates a name already gone


@pytest.fixture
def arena(make_arena) -> Arena:
    return make_arena()


@pytest.fixture
def chain(arena):
    """root > mid > leaf (indexes 0, 1, 2), leaf with stock (batch 64); hooks
    cleared after the test."""
    from shmcounter import hooks
    root = arena.new_counter("root")
    mid = arena.new_counter("mid", parent=root)
    leaf = arena.new_counter("leaf", parent=mid)
    leaf.enable_stock(64)
    yield root, mid, leaf
    hooks.clear()


@pytest.fixture
def cpu0(arena):
    """This test process registered as CPU 0 of `arena`."""
    shmcounter.register_cpu(arena, 0)
    yield 0
    shmcounter.unregister_cpu()


@pytest.fixture
def cpus(arena):
    """cpus(k, ...) -> CpuProcess registered as CPU k; all reaped after the test."""
    started: list[CpuProcess] = []

    def start(cpu: int | None, **kw) -> CpuProcess:
        p = CpuProcess(arena, cpu, **kw)
        started.append(p)
        return p

    yield start
    for p in started:
        p.close()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


@pytest.fixture
def make_machine(arena):
    """make_machine(ncpus=None, start_method="fork") -> procs.Machine on `arena`,
    closed after the test (every CPU process joined), before the invariants run."""
    from procs import Machine
    machines: list[Machine] = []

    def make(ncpus: int | None = None, start_method: str = "fork") -> Machine:
        m = Machine(arena, ncpus, start_method=start_method)
        machines.append(m)
        return m

    yield make
    for m in machines:
        m.close()
        for cpu in range(len(m._cpus)):
            assert not m._cpus[cpu].process.is_alive()
