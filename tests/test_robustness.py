"""Misuse and interruptions: an exception inside an op, threads, int64 overflow,
overlapping underflows, views kept after close, a charge racing set_max."""
from __future__ import annotations

import multiprocessing as mp
import os
import threading
import warnings

import pytest

import shmcounter
from shmcounter import Arena, Busy, hooks
from shmcounter.invariants import check_invariants
from shmcounter.proc import PF_EXITING, pid_alive, proc_stat, running


def raise_at(point: str) -> None:
    def interrupt(name: str) -> None:
        hooks.clear()
        raise KeyboardInterrupt(name)
    hooks.install(point, interrupt)


@pytest.mark.parametrize("point", ["charge:level", "charge:deposit"])
def test_an_exception_mid_charge_rolls_every_level_back(chain, arena, cpu0, point):
    root, mid, leaf = chain
    leaf.charge(7)
    raise_at(point)
    with pytest.raises(KeyboardInterrupt):
        leaf.try_charge(1)
    assert [c.usage for c in chain] == [7, 7, 7] and leaf.stock(0) == 0
    assert leaf.try_charge(1) == (True, None)              # the op lock was released
    assert [c.usage for c in chain] == [71, 71, 71] and leaf.stock(0) == 63
    check_invariants(arena, {"leaf": 8})
    leaf.uncharge(8)


def test_an_exception_mid_uncharge_or_drain_completes_it(chain, arena, cpu0):
    """An uncharge or a drain is rolled forward, not back (stop_machine.py): the
    exception goes on, the op counts wholly, at every level."""
    root, mid, leaf = chain
    leaf.try_charge(10)                                    # usage 64, stock 54
    raise_at("uncharge:level")
    with pytest.raises(KeyboardInterrupt):
        leaf.uncharge(10)
    assert [c.usage for c in chain] == [54, 54, 54]
    raise_at("drain:taken")
    with pytest.raises(KeyboardInterrupt):
        leaf.drain_stock_local()
    assert ([c.usage for c in chain], leaf.stock(0)) == ([0, 0, 0], 0)
    check_invariants(arena, {"leaf": 0})


def test_a_charge_racing_set_max_makes_it_retry_and_refuse(chain, arena):
    root, mid, leaf = chain
    leaf.charge(40)
    # After set_max(50) exchanged the limit, a charger that read the old limit
    # (none) commits 20 more: usage 60 > 50. set_max must see it, restore, refuse.
    def charge_20_once(name: str) -> None:
        hooks.clear()
        leaf.charge(20)
    hooks.install("set_max:exchanged", charge_20_once)
    with pytest.raises(Busy, match=r"^\[Errno 16\] cannot set max of 'leaf' to 50: usage is 60$"):
        leaf.set_max(50)
    assert (leaf.max, leaf.usage) == (shmcounter.PAGE_COUNTER_MAX, 60)
    leaf.uncharge(60)


def test_a_forced_charge_past_int64_raises_and_changes_nothing(chain, arena):
    root, mid, leaf = chain
    leaf.charge(2**62 - 1)
    leaf.charge(2**62 - 1)
    def state() -> tuple[bytes, bytes, bytes]:
        return arena.records.tobytes(), arena.contrib.tobytes(), arena.stocks.tobytes()
    before = state()
    with pytest.raises(OverflowError,
                       match=r"^charging 2 pages would take a usage past 2\*\*63 - 1$"):
        leaf.charge(2)
    with pytest.raises(OverflowError):
        leaf.try_charge(2)
    assert state() == before            # counters, contributions, stocks (not the intent scratch)
    leaf.uncharge(2**62 - 1)
    leaf.uncharge(2**62 - 1)


def _cancel_many(name: str, times: int) -> None:
    """This runs in a separate process: cancel 1 page `times` times, all underflows."""
    arena = Arena.attach(name)
    counter = arena.counter("x")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(times):
            counter.cancel(1)
    arena.close()


@pytest.mark.underflow_expected(2 * 20_000)
def test_overlapping_underflows_clamp_exactly_to_zero(arena):
    arena.new_counter("x")
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_cancel_many, args=(arena.name, 20_000)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    assert (arena.counter("x").usage, arena.underflows) == (0, 40_000)


def test_threads_create_counters_concurrently(arena):
    errors: list[BaseException] = []

    def create(prefix: str) -> None:
        try:
            for i in range(25):
                arena.new_counter(f"{prefix}{i}")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(p,)) for p in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(c.name for c in arena.counters()) == sorted(f"{p}{i}" for p in "ab"
                                                               for i in range(25))


def test_a_view_kept_after_close_stays_valid():
    arena = Arena.create(ncpus=1, max_counters=4)
    arena.new_counter("x").charge(3)
    records = arena.records
    with pytest.warns(RuntimeWarning, match="numpy views of it are still referenced"):
        arena.close()
    assert int(records[0, 0]) == 3                       # still mapped: no segfault
    del records
    arena.unlink()


def test_protection_through_two_handles_of_one_arena(arena):
    top = arena.new_counter("top")
    child = arena.new_counter("c", parent=top)
    child.set_min(400)
    child.charge(1)
    other = Arena.attach(arena.name)
    try:
        other.calculate_protection(top, other.counter("c"))
        assert child.emin == 400                          # parent is root: raw setting
    finally:
        other.close()
    child.uncharge(1)


def test_a_process_in_its_exit_is_no_longer_alive():
    """A SIGKILLed process can spend seconds in state D inside exit_mmap before it
    becomes a zombie; its task flags say PF_EXITING from the start of its exit,
    and it runs no user code again: a lock it holds is taken over at once."""
    me = proc_stat(os.getpid())
    assert me is not None and running(me) and pid_alive(os.getpid())
    assert [running((state, me[1], flags)) for state, flags in [
        (b"R", 0), (b"D", 0), (b"D", PF_EXITING), (b"Z", 0), (b"X", 0)]] == [
        True, True, False, False, False]
