"""The C atomics: semantics, argument checks, and no lost update across cores."""
from __future__ import annotations

import importlib
import inspect
import multiprocessing as mp
import os
import sys
from multiprocessing import shared_memory

import pytest

import shmcounter
from shmcounter import _atomic
from shmcounter._atomic import (
    CONSUME_BUSY,
    CONSUME_HIT,
    CONSUME_MISS,
    CONSUME_NO_STOCK,
    PC_PARENT,
    PC_STOCK_ID,
    R_OP,
    R_PID,
    R_STOCK_BLOCK,
    STOCK_BUSY,
    Slots,
)
from shmcounter.errors import ArenaCorrupt
from shmcounter.memcg import _legacy

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
        s.load(1, 2)                                  # type: ignore[call-arg]  # on purpose
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
    from shmcounter.memcg._legacy import (
        CONSUME_BUSY,
        CONSUME_HIT,
        CONSUME_MISS,
        LEGACY_BYPASS,
        LEGACY_DEPOSITED,
        LEGACY_EVICTED,
        LEGACY_OVERFLOW,
        MC_EVICTIONS,
        MC_OVERFLOWS,
        consume,
        refill,
        trylock,
    )
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


# ---- the modules: state, names, documentation ---------------------------------

def _corrupt_in(slots: Slots) -> ArenaCorrupt:
    """The ArenaCorrupt that slots raises for a lock slot outside its stocks section
    (a layout with one CPU and one stock slot at words 0-1, arena "t")."""
    slots.set_layout("t", 0, 0, 0, 0, 2, 1, 1, -1)
    with pytest.raises(ArenaCorrupt) as raised:
        slots.stock_trylock(4, 1)
    return raised.value


def test_each_import_of_the_module_has_its_own_slots_type_and_state(monkeypatch):
    """Multi-phase init: an import after the module left sys.modules makes a second
    module, with its own Slots type; Slots of both work, and raise ArenaCorrupt.
    A reload keeps the module as it is."""
    assert importlib.reload(_atomic) is _atomic
    monkeypatch.setattr(shmcounter, "_atomic", _atomic)         # restored after
    monkeypatch.delitem(sys.modules, "shmcounter._atomic")
    second = importlib.import_module("shmcounter._atomic")
    assert second is not _atomic and second.Slots is not _atomic.Slots
    for module in (_atomic, second):
        s = module.Slots(bytearray(64))
        s.store(7, 3)
        assert s.fetch_add(7, 4) == 3 and s.load(7) == 7
        assert str(_corrupt_in(s)) == ("arena 't': stock slot index is 4, not a slot of "
                                       "the stocks section (a counter's stock_id is out "
                                       "of range)")
        s.release()


@pytest.mark.parametrize("step, args", [
    ("set_section", (0, 1)), ("consume", (0, 32, 1, 1)), ("refill", (0, 32, 1, 1, -1)),
    ("trylock", (32, 7)), ("unlock", (32,)),
])
def test_the_legacy_steps_take_a_slots_first(step, args):
    buf = bytearray(8 * 48)
    with pytest.raises(TypeError, match=rf"^{step}\(\) argument 1 must be "
                                        r"shmcounter\._atomic\.Slots, not bytearray$"):
        getattr(_legacy, step)(buf, *args)
    with pytest.raises(TypeError, match=rf"^{step}\(\) takes {len(args) + 1} arguments "
                                        rf"\({len(args)} given\)$"):
        getattr(_legacy, step)(*args)
    assert buf == bytearray(8 * 48)


def test_the_legacy_section_is_set_by_the_legacy_module():
    """A layout whose 2 CPU blocks of MC_WORDS = 16 words start at word 64: the
    legacy steps take block 64 or 80 only, and op_begin takes their slot words
    (MC_SLOTS..MC_SLOTS + 6) as an op's stock slot once set_section told it."""
    s = Slots(bytearray(8 * 96))
    s.set_layout("t", 0, 32, 1, 0, 2, 2, 0, -1)    # row 0; counter record at word 32
    s.store(32 + PC_PARENT, -1)                    # a root
    s.store(32 + PC_STOCK_ID, -1)                  # without stock; contrib at word 56
    with pytest.raises(ArenaCorrupt, match=r"the stock slot of an op on counter 0 is 67"):
        s.op_begin(0, -1, 32, 56, 0, 64 + _legacy.MC_SLOTS)
    with pytest.raises(ValueError, match=r"^this Slots has no legacy section"):
        _legacy.trylock(s, 64, 7)
    with pytest.raises(ValueError, match=r"^set_section: 3 blocks of 16 words from slot 64 "
                                         r"do not fit in 96 words$"):
        _legacy.set_section(s, 64, 3)
    _legacy.set_section(s, 64, 2)
    assert _legacy.trylock(s, 80, 7) is True and s.load(81) == 7
    _legacy.unlock(s, 80)
    with pytest.raises(ArenaCorrupt, match=r"legacy block index is 72, not the start of a "
                                           r"CPU's legacy block"):
        _legacy.trylock(s, 72, 7)
    with pytest.raises(ArenaCorrupt, match=r"stock slot index is 64"):
        s.stock_trylock(64, 7)                     # not a stock slot: the core's lock only
    with pytest.raises(ArenaCorrupt, match=r"the stock slot of an op on counter 0 is 66"):
        s.op_begin(0, -1, 32, 56, 0, 64 + _legacy.MC_LOCK + 1)   # drain_idx: not a slot
    assert s.op_begin(0, -1, 32, 56, 0, 80 + _legacy.MC_SLOTS + 6) is True
    s.op_end(0)
    assert s.load(81) == 0 and s.load(16) == 0     # unlocked; no op in progress


def test_the_steps_return_named_results():
    """A row at word 0 (this pid, stock block at word 56), a counter record at word
    32 whose stock id is 0: its slot is words 56-57. Python compares the results
    with these names, never with their numbers."""
    assert len({CONSUME_HIT, CONSUME_MISS, CONSUME_BUSY, CONSUME_NO_STOCK}) == 4
    assert (_legacy.CONSUME_HIT, _legacy.CONSUME_MISS, _legacy.CONSUME_BUSY) == \
        (CONSUME_HIT, CONSUME_MISS, CONSUME_BUSY)
    assert len({_legacy.LEGACY_DEPOSITED, _legacy.LEGACY_OVERFLOW, _legacy.LEGACY_EVICTED,
                _legacy.LEGACY_BYPASS}) == 4
    s = Slots(bytearray(8 * 64))
    row, c, slot = 0, 32, 56
    s.store(row + R_PID, os.getpid())
    s.store(row + R_STOCK_BLOCK, slot)
    s.store(c + PC_STOCK_ID, -1)
    assert s.stock_consume(c, row, 1) == CONSUME_NO_STOCK
    s.store(c + PC_STOCK_ID, 0)
    s.store(slot, 5)
    assert s.stock_consume(c, row, 3) == CONSUME_HIT and s.load(slot) == 2
    assert s.stock_consume(c, row, 3) == CONSUME_MISS and s.load(slot) == 2
    s.store(row + R_OP, 1)                                 # an op of this CPU
    assert s.stock_consume(c, row, 1) == CONSUME_BUSY and s.load(slot) == 2
    s.store(row + R_OP, 0)
    assert s.stock_trylock(slot, 1)                        # another context holds it
    assert s.stock_consume(c, row, 1) == CONSUME_BUSY
    assert s.stock_return(slot, c, 1, 2) == STOCK_BUSY and s.load(slot) == 2
    assert s.stock_take(slot, 2) == STOCK_BUSY and s.load(slot) == 2


@pytest.mark.parametrize("module", [_atomic, Slots, _legacy], ids=["_atomic", "Slots", "_legacy"])
def test_every_method_and_function_is_documented_with_its_signature(module):
    for name, fn in vars(module).items():
        if name.startswith("_") or not callable(fn) or isinstance(fn, type):
            continue
        assert fn.__text_signature__ and fn.__doc__, name      # the signature line, a text
        inspect.signature(fn)                                   # that parses


# ---- no lost update: two processes pinned to different cores, one slot ------

def _hammer(name: str, core: int, kind: str, start) -> None:
    """This runs in a separate process pinned to `core`."""
    os.sched_setaffinity(0, {core})
    shm = shared_memory.SharedMemory(name)
    assert shm.buf is not None
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
    assert shm.buf is not None
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
