"""page_counter semantics without stock (docs/kernel-semantics.md): this test process is
not a CPU, so every charge walks the hierarchy exactly."""
from __future__ import annotations

import pytest

from shmcounter import PAGE_COUNTER_MAX, Busy
from shmcounter.invariants import check_invariants


@pytest.fixture
def tree(arena):
    root = arena.new_counter("root")
    parent = arena.new_counter("parent", parent=root, max=100)
    child = arena.new_counter("child", parent=parent, max=80)
    return root, parent, child


def usages(*counters):
    return tuple(c.usage for c in counters)


def test_page_counter_max_is_long_max_in_pages():
    assert PAGE_COUNTER_MAX == (2**63 - 1) // 4096 == 2251799813685247


def test_try_charge_adds_at_every_level(tree, arena):
    root, parent, child = tree
    assert child.try_charge(30) == (True, None)
    assert usages(root, parent, child) == (30, 30, 30)
    assert [c.watermark for c in tree] == [30, 30, 30]
    check_invariants(arena, {"child": 30})
    child.uncharge(30)


def test_try_charge_refused_by_own_max_counts_failcnt_there(tree):
    root, parent, child = tree
    child.charge(70)
    ok, fail = child.try_charge(11)
    assert (ok, fail) == (False, child)
    assert usages(root, parent, child) == (70, 70, 70)
    assert [c.failcnt for c in tree] == [0, 0, 1]
    assert child.try_charge(10) == (True, None) and child.usage == 80
    child.uncharge(80)


def test_try_charge_refused_by_an_ancestor_undoes_the_levels_below(tree, arena):
    root, parent, child = tree
    sibling = arena.new_counter("sibling", parent=parent)
    sibling.charge(60)
    ok, fail = child.try_charge(50)                 # child fits (50 <= 80), parent not
    assert (ok, fail) == (False, parent)
    assert usages(root, parent, child, sibling) == (60, 60, 0, 60)
    assert [c.failcnt for c in (root, parent, child)] == [0, 1, 0]
    # the child's watermark saw the charge that its parent then refused
    assert child.watermark == 50 and parent.watermark == 60
    check_invariants(arena, {"sibling": 60})
    sibling.uncharge(60)


@pytest.mark.forced
def test_forced_charge_ignores_max(tree):
    root, parent, child = tree
    child.charge(500)
    assert usages(root, parent, child) == (500, 500, 500)
    assert child.try_charge(1) == (False, child)
    child.uncharge(500)


def test_cancel_changes_one_level_uncharge_walks_to_the_root(tree):
    root, parent, child = tree
    child.charge(10)
    child.cancel(4)
    assert usages(root, parent, child) == (10, 10, 6)
    child.uncharge(6)
    parent.cancel(4)
    root.cancel(4)
    assert usages(root, parent, child) == (0, 0, 0)


@pytest.mark.underflow_expected(2)
def test_uncharge_below_zero_warns_counts_and_clamps(tree, arena):
    root, parent, child = tree
    child.charge(5)
    with pytest.warns(RuntimeWarning) as record:
        parent.uncharge(8)                          # parent and root hold 5
    assert [str(w.message) for w in record] == [
        "page_counter underflow on 'parent': usage 5, uncharge 8; clamped to 0 "
        "(arena.underflows = 1)",
        "page_counter underflow on 'root': usage 5, uncharge 8; clamped to 0 "
        "(arena.underflows = 2)",
    ]
    assert usages(root, parent, child) == (0, 0, 5) and arena.underflows == 2
    child.cancel(5)


def test_watermark_and_reset(tree):
    root, parent, child = tree
    child.charge(40)
    child.uncharge(25)
    assert (child.usage, child.watermark) == (15, 40)
    child.reset_watermark()
    assert child.watermark == 15 and parent.watermark == 40
    child.uncharge(15)


def test_set_max_ebusy_leaves_max_unchanged(tree):
    root, parent, child = tree
    child.charge(50)
    with pytest.raises(Busy, match=r"^\[Errno 16\] cannot set max of 'child' to 40: usage is 50$"):
        child.set_max(40)
    assert child.max == 80
    child.set_max(50)
    assert child.max == 50 and child.try_charge(1) == (False, child)
    child.set_max(PAGE_COUNTER_MAX)
    assert child.try_charge(1) == (True, None)
    child.uncharge(51)


def test_set_min_low_high_and_children_protected_usage(tree, arena):
    root, parent, child = tree
    other = arena.new_counter("other", parent=parent)
    child.set_min(20)
    child.set_low(30)
    other.set_low(5)
    parent.set_high(90)
    assert (child.min, child.low, other.low, parent.high) == (20, 30, 5, 90)
    assert (parent.children_min_usage, parent.children_low_usage) == (0, 0)
    child.charge(25)
    other.charge(3)
    # sum over children of min(usage, setting)
    assert (parent.children_min_usage, parent.children_low_usage) == (20, 25 + 3)
    child.set_min(10)
    assert parent.children_min_usage == 10
    child.uncharge(25)
    other.uncharge(3)
    assert (parent.children_min_usage, parent.children_low_usage) == (0, 0)


# ---- effective protection: docs/kernel-semantics.md §Protection worked examples (pages) --

def test_protection_overcommitted_level_is_shared_in_proportion(arena):
    # E1: parent's effective min 12800 (50M); children claim 19200 in all.
    top = arena.new_counter("top")
    parent = arena.new_counter("p", parent=top)
    kids = [arena.new_counter(f"c{i}", parent=parent) for i in range(4)]
    parent.set_min(12800)
    for kid, setting in zip(kids, [19200, 6400, 0, 128000], strict=True):
        kid.set_min(setting)
    for kid, usage in zip(kids, [12800, 12800, 12800, 0], strict=True):
        kid.charge(usage)
    assert parent.children_min_usage == 12800 + 6400
    arena.calculate_protection(top, parent)
    assert parent.emin == 12800                     # rule 1: child of root, raw setting
    for kid in kids:
        arena.calculate_protection(top, kid)
    assert [k.emin for k in kids] == [12800 * 12800 // 19200, 6400 * 12800 // 19200, 0, 0]
    assert [k.emin for k in kids] == [8533, 4266, 0, 0]
    for kid, usage in zip(kids, [12800, 12800, 12800, 0], strict=True):
        kid.uncharge(usage)


def test_protection_recursive_shares_unclaimed_protection(arena):
    # E2: parent effective low 50, usage 60; children usage [10, 10, 40], low [0, 0, 20].
    top = arena.new_counter("top")
    parent = arena.new_counter("p", parent=top)
    kids = [arena.new_counter(f"c{i}", parent=parent) for i in range(3)]
    parent.set_low(50)
    kids[2].set_low(20)
    for kid, usage in zip(kids, [10, 10, 40], strict=True):
        kid.charge(usage)
    arena.calculate_protection(top, parent)
    for kid in kids:
        arena.calculate_protection(top, kid)
    assert [k.elow for k in kids] == [0, 0, 20]                  # rule 4
    for kid in kids:
        arena.calculate_protection(top, kid, recursive=True)
    assert [k.elow for k in kids] == [7, 7, 35]                  # rule 5, 7.5 -> 7
    for kid, usage in zip(kids, [10, 10, 40], strict=True):
        kid.uncharge(usage)


def test_protection_child_of_root_gets_raw_setting_and_usage_zero_is_stale(arena):
    top = arena.new_counter("top")
    child = arena.new_counter("c", parent=top)
    grandchild = arena.new_counter("g", parent=child)
    child.set_min(128000)
    child.charge(1)
    arena.calculate_protection(top, child)
    assert child.emin == 128000                                  # E3: not capped by usage
    arena.calculate_protection(top, top)                         # root itself: untouched
    assert top.emin == 0
    grandchild.set_min(5)
    arena.calculate_protection(top, grandchild)                  # E4: usage 0, left stale
    assert grandchild.emin == 0
    child.uncharge(1)
    child.set_min(0)
    arena.calculate_protection(top, child)                       # usage 0: stays stale
    assert child.emin == 128000


def test_deeper_level_is_capped_by_the_parent(arena):
    top = arena.new_counter("top")
    parent = arena.new_counter("p", parent=top)
    kid = arena.new_counter("k", parent=parent)
    parent.set_min(10)
    kid.set_min(30)
    kid.charge(25)
    arena.calculate_protection(top, parent)
    arena.calculate_protection(top, kid)
    # rule 2: min(usage 25, setting 30) = 25 claimed > parent's 10: capped to 10
    assert (parent.emin, kid.emin) == (10, 10)
    kid.uncharge(25)
