"""Everyday sharp edges: a second attach in one process, an exit without close(),
unchecked timeouts, and calls on a closed arena."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from functools import partial

import pytest

import shmcounter
from shmcounter import Arena, ArenaError, PageCounter
from shmcounter.memcg import Cgroups, MemCgroup
from shmcounter.segment import R_PID

import tasks


def _rows_of(arena: Arena, pid: int) -> list[int]:
    """The writer rows that process `pid` owns."""
    return [row for row in range(arena.nrows) if arena.rows[row, R_PID] == pid]


# ---- one handle per arena and process ------------------------------------------

def test_attach_in_a_cpu_process_is_that_cpu(arena, cpu0):
    leaf = arena.new_counter("leaf")
    leaf.enable_stock(64)
    other = Arena.attach(arena.name)
    try:
        job = other.counter("leaf")
        assert job.try_charge(1) == (True, None)
        # CPU 0 through either handle: the stock took 63, one writer row (CPU 0's)
        assert (other is arena, shmcounter.this_cpu(), leaf.stock(0), leaf.usage,
                _rows_of(arena, os.getpid())) == (True, 0, 63, 64, [0])
        assert job.drain_stock_local() == 63
    finally:
        other.close()
    assert (arena.closed, shmcounter.this_cpu()) == (False, 0)    # still CPU 0
    leaf.uncharge(1)


def test_each_attach_is_one_more_open_and_each_close_undoes_one(arena):
    x = arena.new_counter("x")
    first, second = Arena.attach(arena.name), Arena.attach(arena.name)
    assert first is arena and second is arena
    with Arena.attach(arena.name):
        pass                                          # the creator's handle: no unlink
    assert os.path.exists(f"/dev/shm/{arena.name}")
    first.close()
    second.close()
    assert not arena.closed and x.usage == 0          # the create's open is left
    arena.close()
    assert arena.closed
    with pytest.raises(ArenaError, match=rf"^arena {arena.name} is closed$"):
        x.usage
    again = Arena.attach(arena.name)                  # closed: a new handle
    try:
        assert again is not arena and again.counter("x").usage == 0
    finally:
        again.close()


# ---- exit without close() ---------------------------------------------------------

# README, "Other processes": attach, then look a counter up; no close().
OTHER_PROCESS = """
import sys
from shmcounter import Arena
arena = Arena.attach(sys.argv[1])
print(arena.counter("job").usage)
"""


def test_a_process_that_attaches_and_exits_without_close_is_silent(arena):
    job = arena.new_counter("job")
    job.charge(3)
    out = subprocess.run([sys.executable, "-c", OTHER_PROCESS, arena.name],
                         check=False, capture_output=True, text=True, timeout=60)
    assert (out.returncode, out.stdout, out.stderr) == (0, "3\n", "")
    job.uncharge(3)


# A CPU process forks a child that charges through the inherited handle; both end
# with a normal exit (atexit runs), neither calls close() or unregister_cpu().
CPU_AND_FORKED_CHILD = """
import os, sys
from shmcounter import Arena, register_cpu, this_cpu
arena = Arena.attach(sys.argv[1])
register_cpu(arena, 1)
leaf = arena.counter("leaf")
leaf.try_charge(1)                  # CPU 1 keeps 63 pages in stock
pid = os.fork()
if pid == 0:
    leaf.charge(1)                  # not a CPU: a writer row of its own
    sys.exit(0)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status), this_cpu(), leaf.stock(1), leaf.usage)
"""


def test_a_cpu_process_and_its_forked_child_exit_silently_and_cleanly(arena):
    leaf = arena.new_counter("leaf")
    leaf.enable_stock(64)
    out = subprocess.run([sys.executable, "-c", CPU_AND_FORKED_CHILD, arena.name],
                         check=False, capture_output=True, text=True, timeout=60)
    # The child's exit left the parent CPU 1 with its stock ...
    assert (out.returncode, out.stdout, out.stderr) == (0, "0 1 63 65\n", "")
    # ... and the parent's exit took CPU 1 offline: stock returned, rows given back.
    assert (arena.cpu_pid(1), leaf.stock(1), leaf.usage) == (0, 0, 2)
    assert [int(pid) for pid in arena.rows[:, R_PID] if pid] == []
    leaf.uncharge(2)


# ---- timeouts ---------------------------------------------------------------------

NOT_POSITIVE = "must be a finite number of seconds > 0, got "
NOT_A_NUMBER = "must be a number of seconds, got "
BAD_TIMEOUTS = [
    (float("nan"), ValueError, NOT_POSITIVE + "nan"),
    (float("inf"), ValueError, NOT_POSITIVE + "inf"),
    (-1, ValueError, NOT_POSITIVE + "-1"),
    (0, ValueError, NOT_POSITIVE + "0"),
    (-0.0, ValueError, NOT_POSITIVE + "-0.0"),
    (True, TypeError, NOT_A_NUMBER + "True (bool)"),
    ("1", TypeError, NOT_A_NUMBER + "'1' (str)"),
    (1j, TypeError, NOT_A_NUMBER + "1j (complex)"),
    ([1], TypeError, NOT_A_NUMBER + "[1] (list)"),
]
TIMEOUT_IDS = [repr(bad) for bad, _, _ in BAD_TIMEOUTS]


@pytest.mark.parametrize("bad, exc, message", BAD_TIMEOUTS, ids=TIMEOUT_IDS)
def test_drain_stock_refuses_a_bad_timeout_and_asks_no_cpu(arena, cpus, bad, exc, message):
    leaf = arena.new_counter("leaf")
    leaf.enable_stock(64)
    cpu1 = cpus(1)
    assert cpu1.call(tasks.try_charge, arena, "leaf", 1) == (True, None)
    before = bytes(arena._shm.buf)
    with pytest.raises(exc) as err:
        leaf.drain_stock(timeout=bad)
    assert str(err.value) == "timeout " + message
    assert bytes(arena._shm.buf) == before            # no request posted, no ticket
    assert cpu1.call(tasks.stock, arena, "leaf") == 63
    assert leaf.drain_stock(timeout=30) is True       # a good one drains
    leaf.uncharge(1)


@pytest.mark.parametrize("bad, exc, message", BAD_TIMEOUTS, ids=TIMEOUT_IDS)
def test_drain_timeout_wait_timeout_and_wait_flushed_refuse_the_same(arena, bad, exc,
                                                                      message):
    with pytest.raises(exc) as err:
        arena.drain_timeout = bad
    assert (str(err.value), arena.drain_timeout) == ("drain_timeout " + message, 5.0)
    with pytest.raises(exc) as err:
        arena.wait_timeout = bad
    assert (str(err.value), arena.wait_timeout) == ("wait_timeout " + message, 10.0)
    tree = Cgroups(arena, variant="legacy")
    with pytest.raises(exc) as err:
        tree.wait_flushed(timeout=bad)
    assert str(err.value) == "timeout " + message


def test_drain_stock_refuses_a_trylock_that_is_not_a_bool(arena):
    leaf = arena.new_counter("leaf")
    with pytest.raises(TypeError, match=r"^trylock must be a bool, got 1$"):
        leaf.drain_stock(trylock=1)


# ---- a closed arena ---------------------------------------------------------------

def _public(obj: object) -> set[str]:
    """Public names of obj's class (methods, properties) and of obj itself."""
    names = {n for klass in type(obj).__mro__ if klass is not object for n in vars(klass)}
    return {n for n in names | set(vars(obj)) if not n.startswith("_")}


def _not_closed_error(arena_name: str, calls: dict[str, Callable[[], object]]) -> dict[str, str]:
    """{label: what happened} for each call that did not raise exactly
    ArenaError("arena <name> is closed")."""
    wrong = {}
    for label, call in calls.items():
        try:
            call()
            wrong[label] = "returned"
        except ArenaError as exc:
            if str(exc) != f"arena {arena_name} is closed":
                wrong[label] = f"ArenaError: {exc}"
        except Exception as exc:
            wrong[label] = f"{type(exc).__name__}: {exc}"
    return wrong


def _set_drain_timeout(a: Arena) -> None:
    a.drain_timeout = 1


def _set_wait_timeout(a: Arena) -> None:
    a.wait_timeout = 1


# Still answered on a closed handle: its identity and lifetime, and the geometry.
ARENA_OPEN_ANYWAY = {"create", "attach", "name", "closed", "close", "unlink",
                     "ncpus", "max_counters", "max_stocked", "nrows"}
ARENA_CALLS: dict[str, Callable[[Arena, PageCounter], object]] = {
    "new_counter": lambda a, c: a.new_counter("new"),
    "counter": lambda a, c: a.counter("leaf"),
    "counters": lambda a, c: a.counters(),
    "stocked_counters": lambda a, c: a.stocked_counters(),
    "section": lambda a, c: a.section("memcg"),
    "section_slot": lambda a, c: a.section_slot("memcg"),
    "drain_timeout": lambda a, c: a.drain_timeout,
    "drain_timeout (set)": lambda a, c: _set_drain_timeout(a),
    "wait_timeout": lambda a, c: a.wait_timeout,
    "wait_timeout (set)": lambda a, c: _set_wait_timeout(a),
    "underflows": lambda a, c: a.underflows,
    "cpu_pid": lambda a, c: a.cpu_pid(0),
    "online_cpus": lambda a, c: a.online_cpus(),
    "row_owner_alive": lambda a, c: a.row_owner_alive(0),
    "hotplug_cpu_dead": lambda a, c: a.hotplug_cpu_dead(1),
    "repair": lambda a, c: a.repair(),
    # c: the leaf, under mid
    "calculate_protection": lambda a, c: a.calculate_protection(c.parent, c),  # type: ignore[arg-type]
    **{view: (lambda v: lambda a, c: getattr(a, v))(view) for view in (
        "header", "rows", "records", "stock_owner", "stocks", "contrib", "requests",
        "request_summary", "names")},
}
COUNTER_OPEN_ANYWAY = {"name", "parent"}
COUNTER_CALLS: dict[str, Callable[[PageCounter], object]] = {
    "try_charge": lambda c: c.try_charge(1),
    "charge": lambda c: c.charge(1),
    "uncharge": lambda c: c.uncharge(1),
    "cancel": lambda c: c.cancel(1),
    "set_max": lambda c: c.set_max(10),
    "set_min": lambda c: c.set_min(1),
    "set_low": lambda c: c.set_low(1),
    "set_high": lambda c: c.set_high(1),
    "reset_watermark": lambda c: c.reset_watermark(),
    "enable_stock": lambda c: c.enable_stock(64),
    "disable_stock": lambda c: c.disable_stock(),
    "free_stock": lambda c: c.free_stock(),
    "stock": lambda c: c.stock(0),
    "drain_stock_local": lambda c: c.drain_stock_local(),
    "drain_cpu": lambda c: c.drain_cpu(1),
    "drain_stock": lambda c: c.drain_stock(),
    **{field: (lambda f: lambda c: getattr(c, f))(field) for field in (
        "usage", "max", "min", "low", "high", "watermark", "failcnt", "emin", "elow",
        "children_min_usage", "children_low_usage", "has_stock", "batch", "lockless")},
}
TREE_OPEN_ANYWAY = {"variant", "memsw", "batch", "root"}
TREE_CALLS: dict[str, Callable[[Cgroups, MemCgroup], object]] = {
    "open": lambda t, g: Cgroups.open(t._arena),
    "options": lambda t, g: t.options,
    "create": lambda t, g: t.create("new"),
    "cgroup": lambda t, g: t.cgroup("job"),
    "cgroups": lambda t, g: t.cgroups(),
    "drain_all_stock": lambda t, g: t.drain_all_stock(g),
    "wait_flushed": lambda t, g: t.wait_flushed(),
    "stats": lambda t, g: t.stats(),
}
CGROUP_OPEN_ANYWAY = {"name", "parent", "memory", "memsw"}
CGROUP_CALLS: dict[str, Callable[[MemCgroup], object]] = {
    "try_charge": lambda g: g.try_charge(1),
    "uncharge": lambda g: g.uncharge(1),
    "offline": lambda g: g.offline(),
    "free": lambda g: g.free(),
    "counters": lambda g: g.counters,
    "state": lambda g: g.state,
    "events": lambda g: g.events,
    "events_local": lambda g: g.events_local,
    "stock": lambda g: g.stock(0),
    "stat": lambda g: g.stat(),
}


@pytest.mark.parametrize("as_cpu", [False, True], ids=["plain", "cpu0"])
def test_every_call_on_a_closed_arena_says_it_is_closed(arena, as_cpu):
    leaf = arena.new_counter("leaf", parent=arena.new_counter("root"))
    leaf.enable_stock(64)
    if as_cpu:
        shmcounter.register_cpu(arena, 0)
        leaf.try_charge(1)                            # 63 pages in CPU 0's stock
    assert _public(arena) - ARENA_OPEN_ANYWAY == set(ARENA_CALLS) - {"drain_timeout (set)",
                                                                  "wait_timeout (set)"}
    assert _public(leaf) - COUNTER_OPEN_ANYWAY == set(COUNTER_CALLS)
    arena.close()
    assert _not_closed_error(arena.name, {
        **{f"Arena.{k}": partial(f, arena, leaf) for k, f in ARENA_CALLS.items()},
        **{f"PageCounter.{k}": partial(f, leaf) for k, f in COUNTER_CALLS.items()},
    }) == {}
    assert (repr(arena), repr(leaf)) == ("<Arena closed>", "<PageCounter 'leaf' (arena closed)>")


def test_every_call_on_a_closed_arenas_cgroups_says_it_is_closed(arena):
    tree = Cgroups(arena)
    job = tree.create("job")
    assert _public(tree) - TREE_OPEN_ANYWAY == set(TREE_CALLS)
    assert _public(job) - CGROUP_OPEN_ANYWAY == set(CGROUP_CALLS)
    arena.close()
    assert _not_closed_error(arena.name, {
        "Cgroups(arena)": lambda: Cgroups(arena),
        **{f"Cgroups.{k}": partial(f, tree, job) for k, f in TREE_CALLS.items()},
        **{f"MemCgroup.{k}": partial(f, job) for k, f in CGROUP_CALLS.items()},
    }) == {}
    assert (repr(tree), repr(job)) == ("<Cgroups (arena closed)>",
                                       "<MemCgroup 'job' (arena closed)>")
