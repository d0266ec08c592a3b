"""Every bad input of docs/reference.md gets a clear error, and the arena is byte-for-byte
unchanged afterwards."""
from __future__ import annotations

from functools import partial

import pytest

import shmcounter
from shmcounter import Arena, ArenaError

BAD_AMOUNTS = [
    (-1, ValueError, r"^n must be an int in \[0, 2\*\*62\), got -1 \(int\)$"),
    (2**62, ValueError, r"^n must be an int in \[0, 2\*\*62\), got 4611686018427387904 \(int\)$"),
    (True, TypeError, r"^n must be an int in \[0, 2\*\*62\), got True \(bool\)$"),
    (1.0, TypeError, r"^n must be an int in \[0, 2\*\*62\), got 1.0 \(float\)$"),
    ("1", TypeError, r"^n must be an int in \[0, 2\*\*62\), got '1' \(str\)$"),
    (None, TypeError, r"^n must be an int in \[0, 2\*\*62\), got None \(NoneType\)$"),
]


@pytest.fixture
def setup(arena, cpu0):
    root = arena.new_counter("root")
    leaf = arena.new_counter("leaf", parent=root, max=100)
    leaf.enable_stock(64)
    leaf.try_charge(1)
    yield arena, leaf
    leaf.uncharge(1)


def unchanged(arena: Arena, action, exc, match):
    before = arena._bytes.tobytes()
    with pytest.raises(exc, match=match):
        action()
    assert arena._bytes.tobytes() == before


@pytest.mark.parametrize("op", ["try_charge", "charge", "uncharge", "cancel"])
@pytest.mark.parametrize("bad, exc, match", BAD_AMOUNTS)
def test_bad_amounts(setup, op, bad, exc, match):
    arena, leaf = setup
    unchanged(arena, lambda: getattr(leaf, op)(bad), exc, match)


@pytest.mark.parametrize("op", ["set_max", "set_min", "set_low", "set_high"])
@pytest.mark.parametrize("bad, exc", [(-1, ValueError), (2**51, ValueError),
                                      (False, TypeError), (0.5, TypeError)])
def test_bad_limits(setup, op, bad, exc):
    arena, leaf = setup
    what = op[4:]
    unchanged(arena, lambda: getattr(leaf, op)(bad), exc,
              rf"^{what} must be an int in \[0, 2251799813685248\), got ")


@pytest.mark.parametrize("bad, exc", [(-1, ValueError), (2**32, ValueError),
                                      (True, TypeError), (64.0, TypeError)])
def test_bad_batch(setup, bad, exc):
    arena, leaf = setup
    unchanged(arena, lambda: leaf.enable_stock(bad), exc,
              r"^batch must be an int in \[0, 2\*\*32\)")


def test_bad_uncharge_to_stock_flag(setup):
    arena, leaf = setup
    unchanged(arena, lambda: leaf.enable_stock(64, uncharge_to_stock=1), TypeError,
              r"^uncharge_to_stock must be a bool, got 1$")


@pytest.mark.parametrize("bad, exc", [(-1, ValueError), (2, ValueError), (True, TypeError),
                                      (None, TypeError)])
def test_bad_cpu(setup, bad, exc):
    arena, leaf = setup
    match = r"^cpu must be an int in \[0, 2\), got "
    for action in (lambda: leaf.stock(bad), lambda: leaf.drain_cpu(bad),
                   lambda: arena.hotplug_cpu_dead(bad)):
        unchanged(arena, action, exc, match)


def test_unknown_and_duplicate_names(setup):
    arena, leaf = setup
    unchanged(arena, lambda: arena.counter("nope"), KeyError, r"no counter named 'nope' in arena")
    unchanged(arena, lambda: arena.counter(3), TypeError, r"^counter name must be a str, got int$")
    unchanged(arena, lambda: arena.new_counter("leaf"), ValueError,
              r"^a counter named 'leaf' already exists in this arena$")
    for bad in ("", "x" * 64, "a\0b"):
        unchanged(arena, partial(arena.new_counter, bad), ValueError,
                  r"^counter name must be 1\.\.63 UTF-8 bytes without NUL")
    unchanged(arena, lambda: arena.new_counter("ok", parent="root"), TypeError,
              r"^parent must be a PageCounter or None, got str$")
    unchanged(arena, lambda: arena.new_counter("ok", max=-5), ValueError, r"^max must be an int")


def test_parent_from_another_arena(setup, make_arena):
    arena, leaf = setup
    other = make_arena()
    foreign = other.new_counter("foreign")
    unchanged(arena, lambda: arena.new_counter("x", parent=foreign), ValueError,
              rf"^parent 'foreign' belongs to arena '{other.name}', not '{arena.name}'$")


def test_arena_full(make_arena):
    arena = make_arena(max_counters=2)
    arena.new_counter("one")
    arena.new_counter("two")
    unchanged(arena, lambda: arena.new_counter("three"), ArenaError,
              rf"^arena '{arena.name}' is full: 2 counters \(see max_counters\)$")


@pytest.mark.parametrize("kw, match", [
    ({"ncpus": 0}, r"^ncpus must be an int in \[1, 2\*\*20\], got 0$"),
    ({"ncpus": 2.0}, r"^ncpus must be an int"),
    ({"max_counters": 0}, r"^max_counters must be an int"),
    ({"max_stocked": -1}, r"^max_stocked must be an int in \[0, 2\*\*20\], got -1$"),
])
def test_bad_arena_geometry(kw, match):
    with pytest.raises(ValueError, match=match):
        Arena.create(**kw)


def test_drain_local_outside_a_cpu(arena):
    leaf = arena.new_counter("leaf")
    leaf.enable_stock(64)
    unchanged(arena, leaf.drain_stock_local, ArenaError,
              r"^drain_stock_local runs in a CPU process only")
    assert shmcounter.this_cpu() is None
