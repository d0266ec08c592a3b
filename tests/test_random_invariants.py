"""Randomised invariants: several real processes charge and uncharge at random over a
limited 3-level tree. At every quiescent point I1 (exact, against the merged shadow
ledgers), I2, I5 and I6 of docs/stock-design.md §Races hold; once every CPU has gone offline,
usage equals the real charges exactly."""
from __future__ import annotations

import os
import random

import pytest

from shmcounter.invariants import check_invariants

import cpuproc

LEAVES = ["a1", "a2", "b1", "b2"]


def _random_ops(seed: int, count: int, held: dict[str, int]) -> dict[str, int]:
    """Runs in a worker: random try_charge/uncharge; returns the pages it holds."""
    rng = random.Random(seed)
    arena = cpuproc.arena()
    leaves = {name: arena.counter(name) for name in LEAVES}
    for _ in range(count):
        name = rng.choice(LEAVES)
        if held[name] and rng.random() < 0.45:
            n = rng.randint(1, held[name])
            leaves[name].uncharge(n)
            held[name] -= n
        else:
            n = rng.choice([1, 1, 1, 2, 8, 33, 64, 100])
            if leaves[name].try_charge(n)[0]:
                held[name] += n
    return held


def _release_all(held: dict[str, int]) -> None:
    arena = cpuproc.arena()
    for name, n in held.items():
        if n:
            arena.counter(name).uncharge(n)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_charges_keep_the_invariants(arena, cpus, seed):
    root = arena.new_counter("root", max=6000)
    a = arena.new_counter("a", parent=root, max=3000)
    b = arena.new_counter("b", parent=root, max=2500)
    for name, parent, limit in [("a1", a, 800), ("a2", a, 5000), ("b1", b, 1500), ("b2", b, 1500)]:
        arena.new_counter(name, parent=parent, max=limit).enable_stock(64)
    cores = sorted(os.sched_getaffinity(0))
    # CPUs 0..3 on the cores round-robin, plus one process that is not a CPU
    workers = [cpus(k, pin=cores[k % len(cores)]) for k in range(arena.ncpus)] + [cpus(None)]
    held = [{name: 0 for name in LEAVES} for _ in workers]
    for rnd in range(3):
        for i, w in enumerate(workers):
            w.start(_random_ops, seed * 100 + rnd * 10 + i, 1500, held[i])
        held = [w.result() for w in workers]
        real = {name: sum(h[name] for h in held) for name in LEAVES}
        check_invariants(arena, real, batch=64)
    assert sum(c.failcnt for c in arena.counters()) > 0       # the limits were hit
    for w in workers[:-1]:
        w.close()                       # clean offline: each CPU drains its stocks
    real = {name: sum(h[name] for h in held) for name in LEAVES}
    assert [arena.counter(n).usage for n in LEAVES] == [real[n] for n in LEAVES]
    assert root.usage == sum(real.values())
    check_invariants(arena, real)
    workers[-1].call(_release_all, {n: real[n] for n in LEAVES})
    assert [c.usage for c in arena.counters()] == [0] * 7


@pytest.fixture
def arena(make_arena):
    return make_arena(ncpus=4)
