"""Fixtures for the per-operation benchmarks: arenas that are always unlinked, counter
chains, CPU 0."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import pytest

import shmcounter
from shmcounter import Arena, PageCounter

# root -> ... -> leaf, index 0 is the root and index -1 the leaf
Chain = tuple[PageCounter, ...]

DEPTHS = (1, 3, 5)
SEGMENT_PREFIX = "shmcounter_"


def _our_segments() -> set[str]:
    """The shmcounter segments this process created (their names carry its pid):
    other processes' segments, e.g. of a test suite running meanwhile, are not ours
    to judge or remove."""
    prefix = f"{SEGMENT_PREFIX}{os.getpid()}_"
    return {n for n in os.listdir("/dev/shm") if n.startswith(prefix)}


@pytest.fixture(autouse=True, scope="session")
def no_leaked_segments() -> Iterator[None]:
    """Fail the session if any benchmark left a segment of this process in /dev/shm
    (and remove it, so a failed run does not leak either)."""
    before = _our_segments()
    yield
    leaked = _our_segments() - before
    for name in leaked:
        try:
            os.unlink(f"/dev/shm/{name}")
        except FileNotFoundError:
            pass
    assert not leaked, f"benchmarks leaked shared-memory segments: {sorted(leaked)}"


def _return_all_pages(arena: Arena) -> None:
    """Give back every page the benchmark left charged, so the arena ends empty.

    Every charge in these benchmarks goes through a leaf and up to its root, and the
    stocks are drained first (unregister_cpu), so uncharging each counter's remaining
    usage from the deepest counter up empties every level. Counters are created
    parents first, hence the reversed creation order.
    """
    for counter in arena.stocked_counters():
        counter.free_stock()                 # nothing left after the drain; drops the stock id
    for counter in reversed(arena.counters()):
        left = counter.usage
        if left:
            counter.uncharge(left)
    usages = {c.name: c.usage for c in arena.counters()}
    assert all(u == 0 for u in usages.values()), f"pages left after teardown: {usages}"
    assert arena.underflows == 0, f"a benchmark uncharged below 0 ({arena.underflows} times)"


@pytest.fixture
def arena() -> Iterator[Arena]:
    """A fresh 2-CPU arena; closed and unlinked after the test, whatever happens."""
    a = Arena.create(ncpus=2, max_counters=64)
    try:
        yield a
        # normally cpu0's teardown already did this; a no-op when not a CPU
        shmcounter.unregister_cpu()
        _return_all_pages(a)
    finally:
        shmcounter.unregister_cpu()
        a.close()
        a.unlink()                        # tolerates a name already gone


@pytest.fixture
def make_chain(arena: Arena) -> Callable[[int], Chain]:
    """make_chain(depth) -> (root, ..., leaf): `depth` counters, each the child of
    the previous one, none with a max (PAGE_COUNTER_MAX) or a stock."""
    made = 0

    def make(depth: int) -> Chain:
        nonlocal made
        made += 1
        chain: list[PageCounter] = []
        parent: PageCounter | None = None
        for level in range(depth):
            parent = arena.new_counter(f"c{made}.d{depth}.l{level}", parent)
            chain.append(parent)
        return tuple(chain)

    return make


@pytest.fixture
def chain1(make_chain: Callable[[int], Chain]) -> Chain:
    """A lone root (depth 1)."""
    return make_chain(1)


@pytest.fixture
def chain3(make_chain: Callable[[int], Chain]) -> Chain:
    """root -> mid -> leaf (depth 3)."""
    return make_chain(3)


@pytest.fixture
def chain5(make_chain: Callable[[int], Chain]) -> Chain:
    """root -> ... -> leaf (depth 5)."""
    return make_chain(5)


@pytest.fixture(params=DEPTHS, ids=[f"depth{d}" for d in DEPTHS])
def chain(request: pytest.FixtureRequest, make_chain: Callable[[int], Chain]) -> Chain:
    """A chain of depth 1, 3 and 5 (parametrized)."""
    return make_chain(request.param)


@pytest.fixture
def cpu0(arena: Arena) -> Iterator[int]:
    """This (benchmark) process registered as CPU 0 of `arena`; unregistered after,
    which drains its stocks back up the hierarchy."""
    shmcounter.register_cpu(arena, 0)
    try:
        yield 0
    finally:
        shmcounter.unregister_cpu()
