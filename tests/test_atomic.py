"""The C atomics: semantics, argument checks, and no lost update across cores."""
from __future__ import annotations

import multiprocessing as mp
import os
from multiprocessing import shared_memory

import pytest

from shmcounter import _atomic
from shmcounter._atomic import STOCK_BUSY, Slots

N = 10**6


def test_module_functions_on_a_bytearray():
    buf = bytearray(32)
    _atomic.store(buf, 8, -5)
    assert _atomic.load(buf, 8) == -5
    assert _atomic.fetch_add(buf, 8, 7) == -5
    assert _atomic.load(buf, 8) == 2
    assert _atomic.exchange(buf, 8, 40) == 2
    assert _atomic.cas(buf, 8, 40, 41) == 40          # success: previous == expected
    assert _atomic.cas(buf, 8, 40, 99) == 41          # failure: previous, unchanged
    assert _atomic.load(buf, 8) == 41
    assert buf[:8] == bytes(8) and buf[16:] == bytes(16)


@pytest.mark.parametrize("offset", [3, -8, 32, 28])
def test_misaligned_or_outside_offset_names_both(offset):
    with pytest.raises(ValueError, match=rf"^offset {offset} is not an aligned 8-byte "
                                         r"slot of a 32-byte buffer"):
        _atomic.load(bytearray(32), offset)


def test_read_only_buffer_is_refused():
    with pytest.raises(TypeError):
        _atomic.store(bytes(16), 0, 1)


def test_slots_by_index_and_release():
    buf = bytearray(64)
    s = Slots(buf)
    s.store(7, 3)
    assert s.fetch_add(7, 4) == 3 and s.load(7) == 7
    assert s.cas(7, 7, 9) == 7 and s.exchange(7, 1) == 9
    with pytest.raises(IndexError, match=r"^slot 8 \(\+1\) outside 0\.\.8$"):
        s.load(8)
    with pytest.raises(TypeError, match=r"load\(\) takes 1 arguments \(2 given\)"):
        s.load(1, 2)
    s.release()
    with pytest.raises(ValueError, match="released"):
        s.load(0)
    buf.extend(b"x")                 # the export is gone: the buffer may resize


def test_stock_steps_are_exclusive_under_the_slot_lock():
    s = Slots(bytearray(64))
    assert s.stock_deposit(2, 10, 111) is True and s.load(2) == 10
    assert s.stock_trylock(2, 222) is True
    assert s.load(3) == 222                                  # lock word: holder pid
    assert s.stock_deposit(2, 5, 111) is False and s.load(2) == 10
    assert s.stock_take(2, 111) == STOCK_BUSY
    s.stock_unlock(2)
    assert s.stock_take(2, 111) == 10 and s.load(2) == 0 and s.load(3) == 0


def test_legacy_refill_and_consume_steps():
    """A row at word 0 (pid 7 at R_PID) and a legacy block at word 32: slot i is
    word 35 + i, tag << 8 | pages, and the op's intent names the slot it changes."""
    from shmcounter._atomic import R_PID, R_STOCK_BEFORE, R_STOCK_SLOT
    from shmcounter.memcg._legacy import (CONSUME_BUSY, CONSUME_HIT, CONSUME_MISS,
                                          LEGACY_BYPASS, LEGACY_DEPOSITED, LEGACY_EVICTED,
                                          LEGACY_OVERFLOW, MC_EVICTIONS, MC_OVERFLOWS,
                                          consume, refill, trylock)
    s = Slots(bytearray(8 * 48))
    row, block, slot = 0, 32, lambda i: 35 + i
    s.store(row + R_PID, 7)
    for tag in range(1, 8):                                  # 7 cgroups fill 7 slots
        assert refill(s, row, block, tag, 63, -1) == (LEGACY_DEPOSITED, tag - 1, 0)
    assert s.load(slot(6)) == 7 << 8 | 63
    assert consume(s, row, block, 3, 60) == CONSUME_HIT and s.load(slot(2)) == 3 << 8 | 3
    assert consume(s, row, block, 3, 4) == CONSUME_MISS      # holds 3: a miss
    assert consume(s, row, block, 3, 65) == CONSUME_MISS     # > 64: never from stock
    assert refill(s, row, block, 3, 62, -1) == (LEGACY_OVERFLOW, 2, 65)
    assert s.load(slot(2)) == 0 and s.load(block + MC_OVERFLOWS) == 1
    assert refill(s, row, block, 8, 63, -1) == (LEGACY_DEPOSITED, 2, 0)  # the freed slot
    assert refill(s, row, block, 9, 63, -1) == (LEGACY_EVICTED, 0, 0)    # round-robin 0
    assert s.load(slot(0)) == (1 << 8 | 63) << 32 | 9 << 8 | 63   # tag 1 pending
    assert (s.load(row + R_STOCK_SLOT), s.load(row + R_STOCK_BEFORE)) == (slot(0), 1 << 8 | 63)
    assert refill(s, row, block, 10, 63, 0) == (LEGACY_BYPASS, -1, 0)  # still pending
    assert refill(s, row, block, 10, 63, 1) == (LEGACY_EVICTED, 1, 0)
    assert s.load(block + MC_EVICTIONS) == 2
    assert trylock(s, block, 8)                               # another context holds it
    assert refill(s, row, block, 10, 1, -1) == (LEGACY_BYPASS, -1, 0)
    assert consume(s, row, block, 10, 1) == CONSUME_BUSY


# ---- no lost update: two processes pinned to different cores, one slot ------

def _hammer(name: str, core: int, kind: str, start) -> None:
    """This runs in a separate process pinned to `core`."""
    os.sched_setaffinity(0, {core})
    shm = shared_memory.SharedMemory(name)
    s = Slots(shm.buf)
    start.wait()
    if kind == "fetch_add":
        add = s.fetch_add
        for _ in range(N):
            add(0, 1)
    elif kind == "cas":
        load, cas = s.load, s.cas
        for _ in range(N):
            while True:
                old = load(0)
                if cas(0, old, old + 1) == old:
                    break
    else:  # "lock": a plain read-modify-write of word 0, mutually excluded by word 9
        me = os.getpid()
        load, store, trylock, unlock = s.load, s.store, s.stock_trylock, s.stock_unlock
        for _ in range(N):
            while not trylock(8, me):
                pass
            store(0, load(0) + 1)
            unlock(8)
    s.release()
    shm.close()


@pytest.mark.parametrize("kind", ["fetch_add", "cas", "lock"])
def test_two_cores_lose_no_update(kind):
    cores = sorted(os.sched_getaffinity(0))
    shm = shared_memory.SharedMemory(create=True, size=128)
    try:
        shm.buf[:] = bytes(128)
        ctx = mp.get_context("fork")
        start = ctx.Barrier(2)
        procs = [ctx.Process(target=_hammer, args=(shm.name, cores[i % len(cores)], kind, start))
                 for i in range(2)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert [p.exitcode for p in procs] == [0, 0]
        s = Slots(shm.buf)
        assert s.load(0) == 2 * N
        s.release()
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        shm.close()
        shm.unlink()
