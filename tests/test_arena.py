"""The arena: create/attach/close/unlink, header checks, segment lifetime on 3.11."""
from __future__ import annotations

import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from multiprocessing import shared_memory

import pytest

from shmcounter import Arena, ArenaError
from shmcounter.invariants import check_invariants
from shmcounter.segment import (
    LAYOUT_VERSION,
    LINE,
    MAGIC,
    PC_USAGE,
    PC_WORDS,
    STOCK_WORDS,
    WORD,
    _Sections,
)


def _segment_exists(name: str) -> bool:
    return os.path.exists(f"/dev/shm/{name}")


def _wait_gone(name: str, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _segment_exists(name):
            return True
        time.sleep(0.02)
    return False


def test_create_attach_share_counters(arena):
    root = arena.new_counter("root")
    arena.new_counter("a", parent=root, max=1000)
    other = Arena.attach(arena.name)
    try:
        a = other.counter("a")
        assert a.parent is not None
        assert (a.name, a.parent.name, a.max, other.ncpus) == ("a", "root", 1000, 2)
        a.charge(5)
        assert arena.counter("a").usage == 5 and root.usage == 5
        arena.counter("a").uncharge(5)
    finally:
        other.close()
    assert [c.name for c in arena.counters()] == ["root", "a"]


def test_with_block_unlinks_for_the_creator():
    with Arena.create(ncpus=1, max_counters=4) as a:
        name = a.name
        assert _segment_exists(name)
    assert not _segment_exists(name)
    assert a.closed
    with pytest.raises(ArenaError, match="is closed"):
        a.counter("x")
    a.close()                                    # twice is fine


UNLINK_AS_AN_ATTACHER = """
import sys
from shmcounter import Arena, ArenaError
from shmcounter.invariants import check_invariants
a = Arena.attach(sys.argv[1])
a.close()
try:
    a.unlink()
except ArenaError as exc:
    print(exc)
"""


def test_only_the_creator_unlinks(arena):
    # Another process: in this one, attach returns the creator's own handle.
    out = subprocess.run([sys.executable, "-c", UNLINK_AS_AN_ATTACHER, arena.name],
                         capture_output=True, text=True, check=True, timeout=60)
    assert out.stdout == f"only the creator process unlinks arena {arena.name!r}\n"
    assert _segment_exists(arena.name)


def test_arena_pickles_by_name_to_the_open_handle(arena):
    arena.new_counter("x")
    assert pickle.loads(pickle.dumps(arena)) is arena      # same process: same handle
    other = Arena.attach(arena.name)                       # and so does attach
    try:
        assert other is arena and other.counter("x").name == "x"
    finally:
        other.close()
    assert not arena.closed                                # one of two opens undone


def test_attach_refuses_what_is_not_an_arena():
    with pytest.raises(ArenaError, match=r"^no shared-memory segment named 'shmcounter_nope'$"):
        Arena.attach("shmcounter_nope")
    shm = shared_memory.SharedMemory(create=True, size=4096)
    assert shm.buf is not None
    try:
        with pytest.raises(ArenaError, match=r"is not a shmcounter arena \(magic 0x0"):
            Arena.attach(shm.name)
        struct.pack_into("<qq", shm.buf, 0, MAGIC, LAYOUT_VERSION + 1)
        with pytest.raises(ArenaError,
                           match=rf"has layout version {LAYOUT_VERSION + 1}; "
                                 rf"this shmcounter reads layout version {LAYOUT_VERSION}$"):
            Arena.attach(shm.name)
    finally:
        shm.close()
        shm.unlink()
    tiny = shared_memory.SharedMemory(create=True, size=16)
    try:
        with pytest.raises(ArenaError, match="too small for the header"):
            Arena.attach(tiny.name)
    finally:
        tiny.close()
        tiny.unlink()


def test_layout_usage_alone_on_its_line_and_cpu_stocks_together():
    sec = _Sections(ncpus=3, max_counters=5, max_stocked=5, max_writers=2)
    assert sec.counters % LINE == 0 and (PC_WORDS * WORD) % LINE == 0
    # line A of each record holds usage and nothing else
    assert PC_USAGE == 0 and PC_WORDS * WORD == 3 * LINE
    with Arena.create(ncpus=3, max_counters=5) as a:
        from shmcounter.segment import PC_WATERMARK
        assert PC_WATERMARK * WORD == LINE
        # CPU k's slots are one contiguous block, starting on its own line
        blocks = [a._stock_slot(cpu, 0) * WORD for cpu in range(3)]
        assert all(b % LINE == 0 for b in blocks)
        assert a._stock_slot(1, 4) - a._stock_slot(1, 0) == 4 * STOCK_WORDS
        assert blocks[1] - blocks[0] >= 5 * STOCK_WORDS * WORD


ATTACH_AND_EXIT = """
import sys
from shmcounter import Arena
a = Arena.attach(sys.argv[1])
a.counter("a").charge(3)
a.close()
"""


def test_a_plain_process_that_attaches_and_exits_does_not_unlink(arena):
    a = arena.new_counter("a")
    subprocess.run([sys.executable, "-c", ATTACH_AND_EXIT, arena.name], check=True,
                   timeout=60)
    assert _segment_exists(arena.name)
    assert a.usage == 3
    Arena.attach(arena.name).close()            # still attachable
    a.uncharge(3)


CREATE_AND_WAIT = """
import sys, time
from shmcounter import Arena
a = Arena.create(ncpus=2, max_counters=8)
a.new_counter("root").charge(7)
print(a.name, flush=True)
time.sleep(600)
"""


def _start_creator(**kw) -> tuple[subprocess.Popen, str]:
    p = subprocess.Popen([sys.executable, "-c", CREATE_AND_WAIT], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True, **kw)
    assert p.stdout is not None
    return p, p.stdout.readline().strip()


def test_sigkill_of_the_creator_leaves_nothing_in_dev_shm():
    p, name = _start_creator()
    try:
        assert _segment_exists(name)
        p.send_signal(signal.SIGKILL)
        p.wait(30)
        # the creator's resource tracker sees its pipe close and unlinks
        assert _wait_gone(name), f"{name} still in /dev/shm after the creator was killed"
    finally:
        p.kill()
        p.wait()


def test_next_create_sweeps_a_dead_creators_arena():
    # Kill the creator's whole process group, resource tracker included: only the
    # sweep in Arena.create can clean up now.
    p, name = _start_creator(start_new_session=True)
    try:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(30)
        time.sleep(0.2)
        assert _segment_exists(name)
        with Arena.create(ncpus=1, max_counters=1):
            assert not _segment_exists(name)
    finally:
        p.kill()
        p.wait()
        if _segment_exists(name):
            os.unlink(f"/dev/shm/{name}")


HOLD = """
import sys, time
from shmcounter import Arena
a = Arena.attach(sys.argv[1])
print("attached", flush=True)
time.sleep(600)
"""


def test_sweep_spares_a_dead_creators_arena_that_a_live_process_maps():
    p, name = _start_creator(start_new_session=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, name], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True)
    assert holder.stdout is not None
    try:
        assert holder.stdout.readline().strip() == "attached"
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(30)
        with Arena.create(ncpus=1, max_counters=1):
            assert _segment_exists(name)            # still in use: kept
        holder.kill()
        holder.wait(30)
        with Arena.create(ncpus=1, max_counters=1):
            assert not _segment_exists(name)        # nobody maps it: swept
    finally:
        for proc in (p, holder):
            proc.kill()
            proc.wait()
        if _segment_exists(name):
            os.unlink(f"/dev/shm/{name}")


def test_an_arena_where_no_counter_may_have_stock():
    """max_stocked=0: every enable_stock says no, and charges walk the hierarchy."""
    with Arena.create(ncpus=2, max_counters=4, max_stocked=0) as arena:
        leaf = arena.new_counter("leaf", max=10)
        assert leaf.enable_stock(64) is False
        assert (leaf.try_charge(3), leaf.usage, leaf.batch) == ((True, None), 3, 0)
        leaf.uncharge(3)
        check_invariants(arena)


def test_a_create_that_fails_half_built_raises_its_own_error_and_leaks_nothing(monkeypatch):
    from shmcounter import segment

    def boom(arena: Arena) -> None:
        raise RuntimeError("an init hook failed")
    monkeypatch.setitem(segment._handle_hooks, "init", [*segment._handle_hooks["init"], boom])
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(RuntimeError, match=r"^an init hook failed$"):
        Arena.create(ncpus=2, max_counters=4)
    assert set(os.listdir("/dev/shm")) - before == set()
