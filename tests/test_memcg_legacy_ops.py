"""The legacy design's try_charge and uncharge, each one C call (memcg/_legacy.c,
CgroupOps): the consume_stock hit, the op that charges and refills, and an
eviction's second op on the victim's path all run inside the call, without
entering a Python function. Python takes over only where the C module says: a
freed cgroup, armed hooks (the stepwise path, with its hook points).

This test process is CPU 0 (fixture cpu0); cgroups A1..A9 under root, so cgroup
Ak's memory counter has index k and tag k + 1 in the slots. Slot words as in
memcg/legacy.py: bits 0-7 pages, 8-31 tag; bits 32-63 the pending half."""
from __future__ import annotations

import gc
import sys

import pytest

from shmcounter import hooks
from shmcounter.errors import ArenaCorrupt
from shmcounter.invariants import check_invariants
from shmcounter.memcg import Cgroups
from shmcounter.memcg.legacy import MC_DRAIN_IDX, MC_SLOTS, NR_MEMCG_STOCK
from shmcounter.segment import R_COUNTER, R_IN_OP, R_OP, R_STOCK_BEFORE, R_STOCK_SLOT


def python_calls(fn, *args, **kw):
    """(fn(*args, **kw), the Python functions it entered, by name)."""
    entered = []

    def profile(frame, event, arg):
        if event == "call":
            entered.append(frame.f_code.co_name)
    gc.disable()                               # no gc callback inside the call
    sys.setprofile(profile)
    try:
        result = fn(*args, **kw)
    finally:
        sys.setprofile(None)
        gc.enable()
    return result, entered


def in_c(fn, *args, **kw):
    """fn(*args, **kw), which must enter no Python function: one C call."""
    result, entered = python_calls(fn, *args, **kw)
    assert entered == []
    return result


def half(tag: int, pages: int) -> int:
    return tag << 8 | pages


@pytest.fixture
def tree(arena, cpu0):
    """A legacy tree: root (counter 0), A1..A9 (counters 1..9); hooks cleared after."""
    cg = Cgroups(arena, variant="legacy")
    for k in range(1, 10):
        cg.create(f"A{k}")
    yield cg
    hooks.clear()


def slots(arena) -> list[int]:
    block = arena._memcg.cpu_slot(0)
    return [arena._slots.load(block + MC_SLOTS + i) for i in range(NR_MEMCG_STOCK)]


def fill_7(cg):
    """A1..A7 charge one page each, in C: usage 64 each, 63 in slots 0..6."""
    groups = [cg.cgroup(f"A{k}") for k in range(1, 8)]
    for g in groups:
        assert in_c(g.try_charge, 1) is True
    assert slots(cg._arena) == [half(k + 1, 63) for k in range(1, 8)]
    return groups


def test_an_eviction_charges_caches_and_uncharges_the_victim_in_one_call(arena, tree):
    cg = tree
    a1, *_ = fill_7(cg)
    a8 = cg.cgroup("A8")
    walks = cg.stats()["walks"]
    assert in_c(a8.try_charge, 1) is True
    # slot 0 now caches A8 (64 - 1 = 63 pages); A1's 63 pages were uncharged from its
    # path and the pending half cleared, by the second op of the same call
    assert slots(arena) == [half(9, 63)] + [half(k + 1, 63) for k in range(2, 8)]
    assert (a1.memory.usage, a8.memory.usage, cg.root.memory.usage) == (1, 64, 1 + 6 * 64 + 64)
    assert cg.stats()["walks"] - walks == 2 and cg.stats()["evictions"] == 1
    assert arena._slots.load(arena._memcg.cpu_slot(0) + MC_DRAIN_IDX) == 1
    # the last op's intent record: the second op, on A1, naming slot 0 with both halves
    row = arena._slots.row
    assert [arena._slots.load(row + w) for w in (R_OP, R_IN_OP, R_COUNTER, R_STOCK_SLOT,
                                                   R_STOCK_BEFORE)] == [
        0, 0, 1, arena._memcg.cpu_slot(0) + MC_SLOTS, half(2, 63) << 32 | half(9, 63)]
    check_invariants(arena, {f"A{k}": 1 for k in range(1, 9)})
    for k in range(1, 9):
        in_c(cg.cgroup(f"A{k}").uncharge, 1)               # a folio uncharge: the walk
    assert [cg.cgroup(f"A{k}").memory.usage for k in range(1, 9)] == [0] + [63] * 7


def test_a_kmem_uncharge_refills_the_slot_in_one_call(arena, tree):
    """MT-08's numbers: deposit, an overflow past 64 that drains the slot, and a
    kmem uncharge of more than 64 pages, which bypasses the stock."""
    a = tree.cgroup("A1")
    assert in_c(a.try_charge, 1) is True                  # usage 64, slot 63
    assert in_c(a.try_charge, 100) is True                # > 64: exact, no stock
    assert in_c(a.uncharge, 1, kmem=True) is None         # 63 + 1 = 64 fits
    assert (a.memory.usage, slots(arena)[0]) == (164, half(2, 64))
    assert in_c(a.uncharge, 2, kmem=True) is None         # 64 + 2 > 64: all 66 go
    assert (a.memory.usage, slots(arena)[0], tree.stats()["overflows"]) == (98, 0, 1)
    assert in_c(a.uncharge, 65, kmem=True) is None        # > 64: through the hierarchy
    assert (a.memory.usage, slots(arena)[0]) == (33, 0)
    check_invariants(arena, {"A1": 33})
    in_c(a.uncharge, 33)


def test_a_kmem_uncharge_that_evicts_uncharges_the_victim_in_the_same_call(arena, tree):
    a1, *_ = fill_7(tree)
    a8 = tree.cgroup("A8")
    assert in_c(a8.try_charge, 70) is True                # > 64: no stock, no eviction
    assert in_c(a8.uncharge, 5, kmem=True) is None        # 5 pages to a new slot: evict
    assert slots(arena)[0] == half(9, 5) and a1.memory.usage == 1
    assert (a8.memory.usage, tree.stats()["evictions"]) == (70, 1)
    check_invariants(arena, {**{f"A{k}": 1 for k in range(1, 8)}, "A8": 65})
    for k in range(1, 8):
        tree.cgroup(f"A{k}").uncharge(1)
    a8.uncharge(65)


def test_random_eviction_draws_in_c_and_stays_exact(arena, cpu0):
    """eviction="random": 14 cgroups take turns on CPU 0's 7 slots, 300 charges of
    one page in C; every slot is a victim at some point, not in round-robin order,
    no pending half is left, and every cgroup's usage is its real pages plus what
    the slots hold of it."""
    cg = Cgroups(arena, variant="legacy", eviction="random")
    groups = [cg.create(f"B{k}") for k in range(14)]
    victims = []
    for i in range(300):
        before, evictions = slots(arena), cg.stats()["evictions"]
        assert in_c(groups[i % 14].try_charge, 1) is True
        if cg.stats()["evictions"] > evictions:
            after = slots(arena)
            victims += [s for s in range(NR_MEMCG_STOCK) if before[s] != after[s]]
    assert sorted(set(victims)) == list(range(NR_MEMCG_STOCK))
    assert victims[:14] != [i % NR_MEMCG_STOCK for i in range(14)]
    assert [w >> 32 for w in slots(arena)] == [0] * NR_MEMCG_STOCK
    real = {g.name: len(range(k, 300, 14)) for k, g in enumerate(groups)}
    check_invariants(arena, real)
    for g in groups:
        g.uncharge(real[g.name])


def test_a_process_that_is_not_a_cpu_charges_exactly_in_c(arena):
    cg = Cgroups(arena, variant="legacy")
    a = cg.create("A")
    assert a.try_charge(1) is True                        # claims a writer row: Python
    assert in_c(a.try_charge, 1) is True
    assert (a.memory.usage, a.stock(0), a.stock(1)) == (2, 0, 0)
    in_c(a.uncharge, 2, kmem=True)                        # not a CPU: the walk
    assert a.memory.usage == 0


def test_a_freed_cgroups_ops_are_handed_to_python_which_raises(arena, tree):
    """C sees the freed state word and hands the call over (otherwise(n, None),
    stepwise(n, kmem)); Python raises, and nothing changes."""
    a = tree.cgroup("A1")
    a.offline()
    a.free()
    words = slots(arena)
    error, entered = python_calls(_raised, a.try_charge, 1)
    assert error == "cgroup 'A1' is freed"
    assert entered[:3] == ["_raised", "_after_refusal", "_try_charge"]
    error, entered = python_calls(_raised, a.uncharge, 1, kmem=True)
    assert error == "cgroup 'A1' is freed"
    assert entered[:2] == ["_raised", "_uncharge_stepwise"]
    assert (a.memory.usage, slots(arena)) == (0, words)


def _raised(fn, *args, **kw) -> str:
    """fn(*args, **kw)'s ValueError or ArenaCorrupt, as a string."""
    try:
        fn(*args, **kw)
    except (ValueError, ArenaCorrupt) as exc:
        return str(exc)
    raise AssertionError("nothing raised")


def test_a_corrupt_drain_idx_raises_from_the_c_op_which_changes_nothing(arena, tree):
    """Round-robin eviction reads drain_idx under the CPU's lock, inside the charge
    op: out of range, the C op takes its 64 pages back at every level and raises
    ArenaCorrupt itself (no Python step runs but the exception's constructor)."""
    fill_7(tree)
    a8, drain_idx = tree.cgroup("A8"), arena._memcg.cpu_slot(0) + MC_DRAIN_IDX
    arena._slots.store(drain_idx, 2**40)
    words, walks = slots(arena), tree.stats()["walks"]
    error, entered = python_calls(_raised, a8.try_charge, 1)
    assert error == (f"arena {arena.name!r}: memcg_cpu 0's drain_idx is 1099511627776, "
                     f"not a slot number in [0, 7)")
    assert set(entered) == {"_raised", "__init__"}          # ArenaCorrupt's
    assert (a8.memory.usage, tree.root.memory.usage, slots(arena)) == (0, 7 * 64, words)
    assert tree.stats()["walks"] - walks == 1               # the charge, taken back
    assert [arena._slots.load(arena._slots.row + w) for w in (R_OP, R_IN_OP)] == [0, 0]
    arena._slots.store(drain_idx, 0)
    assert in_c(a8.try_charge, 1) is True
    assert (a8.memory.usage, slots(arena)[0]) == (64, half(9, 63))
    check_invariants(arena, {f"A{k}": 1 for k in range(1, 9)})
    for k in range(1, 9):
        tree.cgroup(f"A{k}").uncharge(1)


def test_armed_hooks_take_the_stepwise_path_and_stop_at_legacy_evicted(arena, tree):
    """With a hook armed, the eviction runs in Python steps: at legacy:evicted
    the new cgroup is cached and the victim's pages wait in the pending half.
    Cleared, the next eviction runs in C, with the same result."""
    fill_7(tree)
    at_evicted = []
    hooks.install("legacy:evicted", lambda name: at_evicted.append(slots(arena)[0]))
    result, entered = python_calls(tree.cgroup("A8").try_charge, 1)
    assert result is True and "_uncharge_evicted" in entered
    assert at_evicted == [half(2, 63) << 32 | half(9, 63)]
    hooks.clear()
    assert in_c(tree.cgroup("A9").try_charge, 1) is True  # evicts slot 1 (A2)
    assert slots(arena)[:2] == [half(9, 63), half(10, 63)]
    assert [tree.cgroup(f"A{k}").memory.usage for k in range(1, 10)] == [1, 1] + [64] * 7
    check_invariants(arena, {f"A{k}": 1 for k in range(1, 10)})
    for k in range(1, 10):
        tree.cgroup(f"A{k}").uncharge(1)
