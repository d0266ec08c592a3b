"""A corrupted segment: every word read from it is distrusted.

One word is written the way a stray write would write it, then the public API
runs in a forked child, so that a crash or a hang is an outcome of the test and
not the end of the run. The answer is ArenaCorrupt naming the segment, the word
and its value, or, for a word that names a live holder, WaitTimeout naming what
was waited for, the pid and the seconds; never a signal, an endless wait or an
unrelated exception, and a refused repair changes nothing. The last test writes
hundreds of such words at random (procs/lab/corruption.py; scripts/corruption_fuzz.py
is the long run).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections.abc import Callable
from typing import Any

import pytest

import shmcounter
from shmcounter import Arena, hooks
from shmcounter.invariants import check_invariants
from shmcounter.memcg import Cgroups
from shmcounter.memcg.legacy import MC_DRAIN_IDX, MC_LOCK, MC_SLOTS
from shmcounter.memcg.section import M_VARIANT
from shmcounter.segment import (
    H_MAX_WRITERS,
    H_NCOUNTERS,
    H_REGISTRY_LOCK,
    H_STOP,
    PC_PARENT,
    PC_STOCK_ID,
    PC_WORDS,
    R_DEPTH,
    R_IN_OP,
    R_STOCK_BLOCK,
    R_STOCK_SLOT,
    STOCK_LOCK,
)

WAIT = 0.2                      # the children's wait_timeout, seconds
NOT_A_PID = 2**22 + 1           # above the kernel's largest pid_max


def in_child(fn: Callable[..., Any], *args: Any, timeout: float = 30.0) -> tuple:
    """fn(*args) in a forked child: ("ok", result), ("raised", type name, message),
    ("signal", signum) if a signal killed it, ("exit", code) if it exited without
    an answer, or ("hang",) at the timeout."""
    ctx = mp.get_context("fork")
    here, there = ctx.Pipe(duplex=False)
    p = ctx.Process(target=_child, args=(there, fn, args))
    p.start()
    there.close()
    p.join(timeout)
    if p.is_alive():
        assert p.pid is not None
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        return ("hang",)
    assert p.exitcode is not None
    if p.exitcode < 0:
        return ("signal", -p.exitcode)
    try:
        return here.recv()
    except EOFError:
        return ("exit", p.exitcode)


def _child(conn: Any, fn: Callable[..., Any], args: tuple) -> None:
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as exc:
        conn.send(("raised", type(exc).__name__, str(exc)))


def attach(name: str) -> Arena:
    arena = Arena.attach(name)
    arena.wait_timeout = WAIT
    return arena


def record(arena: Arena, index: int, field: int) -> int:
    return arena._counters_slot + index * PC_WORDS + field


# ---- the intent record: op_abort and the repair ------------------------------------

def _abort_with_impossible_intent(name: str) -> tuple[str, bool]:
    """A plain writer's charge of leaf raises after its first level, and just before
    that, a stray write left its row's depth at 2**40 and leaf as its own parent.
    Returns the error and whether this process's op lock is still held."""
    arena = attach(name)

    def corrupt_then_raise(point: str) -> None:
        hooks.clear()
        arena._slots.store(arena._writer.row_slot + R_DEPTH, 2**40)
        arena._slots.store(record(arena, 2, PC_PARENT), 2)
        raise KeyboardInterrupt(point)
    hooks.install("charge:level", corrupt_then_raise)
    try:
        arena.counter("leaf").charge(5)
        error = "charged"
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"
    return error, arena._writer._lock.locked()


def test_op_abort_refuses_an_impossible_intent_record_instead_of_crashing(arena, chain):
    root, mid, leaf = chain
    assert in_child(_abort_with_impossible_intent, arena.name) == ("ok", (
        f"ArenaCorrupt: arena {arena.name!r}: row 2's op depth is 1099511627776, not a "
        f"path length in [1, 10]", False))
    # Nothing rolled back: leaf keeps the op's first level, as contrib[2] says.
    assert [c.usage for c in chain] == [0, 0, 5] and arena.contrib[2, 2] == 5
    # Put the words right: the repair of the dead writer rolls its op back.
    arena._slots.store(record(arena, 2, PC_PARENT), 1)
    arena._slots.store(arena._row_slot(2) + R_DEPTH, 3)
    arena.hotplug_cpu_dead(1)
    assert [c.usage for c in chain] == [0, 0, 0]


def _die_inside_a_charge(name: str) -> None:
    arena = attach(name)
    hooks.install("charge:level", lambda point: os._exit(0))
    arena.counter("leaf").charge(5)


def test_repair_refuses_a_dead_op_whose_stock_slot_is_the_header(arena, chain):
    root, mid, leaf = chain
    assert in_child(_die_inside_a_charge, arena.name) == ("exit", 0)
    assert [c.usage for c in chain] == [0, 0, 5]           # dead inside the op
    arena._slots.store(arena._row_slot(2) + R_STOCK_SLOT, 0)   # slot 0: the magic word
    before = arena._bytes.tobytes()
    try:
        arena.hotplug_cpu_dead(1)
        error = "repaired"
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    assert error == (f"ArenaCorrupt: arena {arena.name!r}: row 2's op stock_slot is 0, "
                     f"not -1 or a stock slot")
    assert arena._bytes.tobytes() == before                # refused whole: nothing changed
    Arena.attach(arena.name).close()                       # the header is intact
    arena._slots.store(arena._row_slot(2) + R_STOCK_SLOT, -1)
    arena.hotplug_cpu_dead(1)
    assert [c.usage for c in chain] == [0, 0, 0]


# ---- waits: bounded, naming what and who ---------------------------------------------

def _charge_leaf(name: str) -> Any:
    return attach(name).counter("leaf").charge(1)


def _new_counter(name: str) -> Any:
    return attach(name).new_counter("x").name


def _hotplug(name: str) -> Any:
    return attach(name).hotplug_cpu_dead(1)


def test_a_stop_word_naming_a_live_process_times_out_every_op(arena, chain):
    arena._slots.store(H_STOP, os.getpid())
    try:
        assert in_child(_charge_leaf, arena.name) == (
            "raised", "WaitTimeout", f"arena {arena.name!r}: waited {WAIT} s for "
                                     f"stop_machine, held by pid {os.getpid()}")
    finally:
        arena._slots.store(H_STOP, 0)
    assert chain[2].usage == 0


def test_a_registry_lock_naming_a_live_process_times_out(arena, chain):
    arena._slots.store(H_REGISTRY_LOCK, os.getpid())
    try:
        assert in_child(_new_counter, arena.name) == (
            "raised", "WaitTimeout", f"arena {arena.name!r}: waited {WAIT} s for the "
                                     f"registry lock, held by pid {os.getpid()}")
    finally:
        arena._slots.store(H_REGISTRY_LOCK, 0)
    assert arena.new_counter("x").name == "x"


def test_a_live_row_stuck_in_an_op_times_out_stop_machine(arena, chain):
    chain[2].charge(1)                       # this process's row: 2
    chain[2].uncharge(1)
    arena._slots.store(arena._row_slot(2) + R_IN_OP, 1)
    try:
        assert in_child(_hotplug, arena.name) == (
            "raised", "WaitTimeout", f"arena {arena.name!r}: waited {WAIT} s for writer "
                                     f"row 2 to end its op, held by pid {os.getpid()}")
    finally:
        arena._slots.store(arena._row_slot(2) + R_IN_OP, 0)


def _drain_with_lock_held_by(name: str, holder: int | None) -> tuple[int, str]:
    """CPU 0 takes 63 pages into stock, then its slot's lock word says `holder`
    (None: this process, another context that never lets go) and it drains."""
    arena = attach(name)
    shmcounter.register_cpu(arena, 0)
    leaf = arena.counter("leaf")
    leaf.try_charge(1)
    lock = leaf._local_slot() + STOCK_LOCK
    arena._slots.store(lock, os.getpid() if holder is None else holder)
    try:
        leaf.drain_stock_local()
    except Exception as exc:
        return os.getpid(), f"{type(exc).__name__}: {exc}"
    finally:
        arena._slots.store(lock, 0)
        leaf.uncharge(1)
        shmcounter.unregister_cpu()
    return os.getpid(), "drained"


def _child_pid(result: tuple) -> int | None:
    """The pid a child returned with its answer ("ok", (pid, ...)), if it did."""
    return result[1][0] if result[0] == "ok" else None


def test_a_foreign_pid_in_this_cpus_own_slot_lock_is_corrupt(arena, chain):
    result = in_child(_drain_with_lock_held_by, arena.name, NOT_A_PID)
    pid = _child_pid(result)
    assert result == ("ok", (pid, f"ArenaCorrupt: arena {arena.name!r}: this CPU's stock lock "
                                  f"of counter 2 is {NOT_A_PID}, not 0 or this CPU's pid {pid}, "
                                  f"the only process that takes it"))


def test_this_cpus_own_pid_in_its_slot_lock_is_waited_for_then_times_out(arena, chain):
    result = in_child(_drain_with_lock_held_by, arena.name, None)
    pid = _child_pid(result)
    assert result == ("ok", (pid, f"WaitTimeout: arena {arena.name!r}: waited {WAIT} s for "
                                  f"this CPU's stock lock of counter 2, held by pid {pid}"))


def _legacy_drain_with_lock(name: str) -> tuple[int, str]:
    """CPU 0 caches 63 pages of cgroup g, then its legacy lock word names another
    pid, and it goes offline (which drains its 7 slots under that lock)."""
    arena = attach(name)
    shmcounter.register_cpu(arena, 0)
    Cgroups(arena).cgroup("g").try_charge(1)
    lock = arena._memcg.block + MC_LOCK
    arena._slots.store(lock, NOT_A_PID)
    try:
        shmcounter.unregister_cpu()
        return os.getpid(), "offline"
    except Exception as exc:
        return os.getpid(), f"{type(exc).__name__}: {exc}"
    finally:
        arena._slots.store(lock, 0)
        shmcounter.unregister_cpu()


def test_a_foreign_pid_in_this_cpus_legacy_lock_is_corrupt(arena):
    cg = Cgroups(arena, variant="legacy")
    g = cg.create("g")
    result = in_child(_legacy_drain_with_lock, arena.name)
    pid = _child_pid(result)
    assert result == ("ok", (pid, f"ArenaCorrupt: arena {arena.name!r}: memcg_cpu 0's lock is "
                                  f"{NOT_A_PID}, not 0 or this CPU's pid {pid}, the only "
                                  f"process that takes it"))
    g.uncharge(1)


# ---- index words: each checked where it is read ----------------------------------

def _scenario(name: str, cpu: bool, corrupt: Callable[[Arena], None],
              act: Callable[[Arena], Any]) -> Any:
    """Attach (and register as CPU 0), write the stray word(s), then act."""
    arena = attach(name)
    if cpu:
        shmcounter.register_cpu(arena, 0)
    corrupt(arena)
    return act(arena)


def _store(*words: tuple[Callable[[Arena], int], int]) -> Callable[[Arena], None]:
    def corrupt(arena: Arena) -> None:
        for slot, value in words:
            arena._slots.store(slot(arena), value)
    return corrupt


def _name(index: int, raw: bytes) -> Callable[[Arena], None]:
    def corrupt(arena: Arena) -> None:
        arena.names[index] = 0
        arena.names[index, :len(raw)] = list(raw)
    return corrupt


def _parent(index: int) -> Callable[[Arena], int]:
    return lambda arena: record(arena, index, PC_PARENT)


def _lookup(what: str) -> Callable[[Arena], Any]:
    return lambda arena: arena.counter(what)._index


def _charge_leaf_as_cpu(arena: Arena) -> Any:
    return arena.counter("leaf").try_charge(1)


def _stock_block(arena: Arena) -> int:
    return arena._row_slot(0) + R_STOCK_BLOCK


@pytest.mark.parametrize("cpu, corrupt, act, expected", [
    (False, _store((_parent(2), 2)), _lookup("leaf"),
     "counter 2's parent is 2, not -1 or an earlier counter"),
    (False, _store((_parent(1), 10**6)), _lookup("leaf"),
     "counter 1's parent is 1000000, not -1 or an earlier counter"),
    (False, _name(1, b"\xffid"), _lookup("leaf"),
     "counter 1's name is b'\\xffid', not 1 to 63 bytes of UTF-8 without NUL"),
    (False, _name(1, b"m\0d"), _lookup("leaf"),
     "counter 1's name is b'm\\x00d', not 1 to 63 bytes of UTF-8 without NUL"),
    (False, _name(2, b"mid"), _lookup("mid"),
     "counter 2's name is 'mid', which counter 1 has: names are unique"),
    (False, _store((lambda arena: H_NCOUNTERS, 65)), _lookup("leaf"),
     "header ncounters is 65, not a count in [0, max_counters = 64]"),
    (False, _store((lambda arena: H_NCOUNTERS, 1)), _lookup("leaf"),
     "header ncounters is 1, but record 2 beyond it holds a name"),
    (True, _store((lambda arena: record(arena, 2, PC_STOCK_ID), 64)), _charge_leaf_as_cpu,
     "counter 2's stock_id is 64, not -1 or a stock id below max_stocked"),
], ids=["parent-self", "parent-beyond", "name-not-utf8", "name-nul-inside", "name-twice",
        "ncounters-above-max", "ncounters-down", "stock-id-beyond"])
def test_an_impossible_index_word_is_arena_corrupt(arena, chain, cpu, corrupt, act, expected):
    before = arena._bytes.copy()
    result = in_child(_scenario, arena.name, cpu, corrupt, act)
    changed = arena._bytes != before
    arena._bytes[:] = before                        # every word back, for the next checks
    assert result == ("raised", "ArenaCorrupt", f"arena {arena.name!r}: {expected}")
    if cpu:         # the fast path refused before touching a slot: only registration
        assert changed[arena._stocks_slot * 8:].sum() == 0


def test_the_fast_path_takes_its_stock_block_from_the_process_not_the_row(arena, chain):
    """A CPU's try_charge finds its stock block where register_cpu put it, in the
    process (Slots.set_cpu): a wrong stock_block word in its row is not followed.
    With the word zeroed, CPU 0 charges 1 page greedily (63 to its stock), then 1
    more, a hit: usage 64, the stock 62."""
    leaf = chain[-1]
    assert leaf.enable_stock(64)
    result = in_child(_scenario, arena.name, True, _store((_stock_block, 0)),
                      lambda a: [a.counter("leaf").try_charge(1) for _ in range(2)])
    assert result == ("ok", [(True, None), (True, None)])
    assert (leaf.usage, leaf.stock(0)) == (64, 62)
    assert arena.hotplug_cpu_dead(0) == {"leaf": 62}
    leaf.uncharge(2)


@pytest.fixture
def legacy(arena):
    """A legacy tree of 8 cgroups g0..g7 (counters 1..8 under root, 0), and a
    plain counter (9) outside it."""
    cg = Cgroups(arena, variant="legacy")
    for k in range(8):
        cg.create(f"g{k}")
    arena.new_counter("plain")
    return cg


def _charge_cgroups(n: int) -> Callable[[Arena], Any]:
    def act(arena: Arena) -> Any:
        cg = Cgroups(arena)
        return [cg.cgroup(f"g{k}").try_charge(1) for k in range(n)]
    return act


def _fill_7_then(corrupt: Callable[[Arena], None], act: Callable[[Arena], Any]
                 ) -> Callable[[Arena], Any]:
    def run(arena: Arena) -> Any:
        _charge_cgroups(7)(arena)                   # g0..g6 in slots 0..6, 63 pages each
        corrupt(arena)
        return act(arena)
    return run


def _mc(word: int) -> Callable[[Arena], int]:
    return lambda arena: arena._memcg.cpu_slot(0) + word


@pytest.mark.parametrize("cpu, act, expected", [
    (True, _fill_7_then(_store((_mc(MC_DRAIN_IDX), 2**40)), _charge_cgroups(8)),
     "memcg_cpu 0's drain_idx is 1099511627776, not a slot number in [0, 7)"),
    (True, _fill_7_then(_store((_mc(MC_SLOTS), 200 << 8 | 63)), check_invariants),
     "memcg_cpu 0's slot[0] cached tag is 200, not the tag of one of the 10 counters"),
    (True, _fill_7_then(_store((_mc(MC_SLOTS), 10 << 8 | 63)),
                        lambda arena: shmcounter.unregister_cpu()),
     "memcg_cpu 0's slot[0] cached tag is 10, not the tag of a cgroup (its memory "
     "counter's index + 1)"),
    (False, lambda arena: (_store((lambda a: a._memcg.slot + M_VARIANT, 99))(arena),
                           Cgroups.open(arena)),
     "memcg variant is 99, not 1 + an index of ('fixed', 'v2', 'rfc', 'legacy', 'v4')"),
], ids=["drain-idx", "slot-tag-beyond", "slot-tag-not-a-cgroup", "variant"])
def test_an_impossible_legacy_word_is_arena_corrupt(arena, legacy, cpu, act, expected):
    before = arena._bytes.copy()
    result = in_child(_scenario, arena.name, cpu, lambda arena: None, act)
    arena._bytes[:] = before
    assert result == ("raised", "ArenaCorrupt", f"arena {arena.name!r}: {expected}")


# ---- the header's geometry ---------------------------------------------------------

def _attach_and_count_mappings(name: str) -> tuple[str, int]:
    """Attach; return the error and how many more mappings of the segment this
    process has afterwards (a forked child inherits its parent's)."""
    def mapped() -> int:
        with open("/proc/self/maps") as f:
            return f.read().count(f"/dev/shm/{name}")
    before = mapped()
    try:
        Arena.attach(name)
        error = "attached"
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
    return error, mapped() - before


@pytest.mark.parametrize("word, value, expected", [
    (H_MAX_WRITERS, 33, "header size is {size}, not {bigger}, the size of this geometry "
                        "(the segment has {size} bytes)"),
    (2, 0, "header ncpus is 0, not in [1, 2**20]"),                   # H_NCPUS
    (3, 2**40, "header max_counters is 1099511627776, not in [1, 2**20]"),
])
def test_a_geometry_that_does_not_fit_is_corrupt_and_left_unmapped(arena, word, value,
                                                                    expected):
    from shmcounter.segment import _Sections
    size = arena._shm.size
    bigger = _Sections(arena.ncpus, arena.max_counters, arena.max_stocked,
                       arena.nrows - arena.ncpus + 1).size
    old = int(arena.header[word])
    arena._slots.store(word, value)
    try:
        assert in_child(_attach_and_count_mappings, arena.name) == ("ok", (
            f"ArenaCorrupt: arena {arena.name!r}: "
            + expected.format(size=size, bigger=bigger), 0))
    finally:
        arena._slots.store(word, old)


# ---- hundreds of them --------------------------------------------------------------

def test_hundreds_of_corrupt_words_get_only_errors_of_ours():
    """procs/lab/corruption.py: 400 tries on a world of a 4-level counter tree with
    stock, a legacy cgroup tree, 2 live CPUs, a CPU and a writer killed inside an
    op; each try drives attach, lookups, charges, the stock, hotplug, drains, the
    memcg tree, check_invariants and close from a fresh process."""
    from procs.lab.corruption import CORRUPT, CRASH, FOREIGN, HANG, fuzz
    report = fuzz(400, seed=2026)
    counts = report.counts
    assert len(report.tries) == 400
    assert (counts[CRASH], counts[HANG], counts[FOREIGN], report.signalled) == (0, 0, 0, 0), \
        report.table()
    assert counts[CORRUPT] >= 40, report.table()       # it does find corruption
