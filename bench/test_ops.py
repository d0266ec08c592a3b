"""Per-operation benchmarks: try_charge (stock hit, slow path), the slow-path
pair (try_charge then uncharge), uncharge, multiprocessing peers, and the floors
they are measured against: an empty Python call and the bare C call of a hit."""
from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any

import pytest

from procs.lab.peer import value_peer
from shmcounter import PAGE_COUNTER_MAX, Arena, PageCounter, this_cpu
from shmcounter._atomic import CONSUME_HIT
from shmcounter.segment import R_WALKS
from shmcounter.stock import BATCH_LIMIT

# root -> ... -> leaf, as built by the chain fixtures of conftest.py
Chain = tuple[PageCounter, ...]

# The largest batch enable_stock accepts. Priming with try_charge(1) charges it
# greedily and leaves STOCK_BATCH - 1 (~4.3e9) pages in CPU 0's stock: a benchmark
# makes ~1e6 calls, so the stock never runs dry and every measured call is a hit.
STOCK_BATCH = BATCH_LIMIT - 1
# Pages charged (forced) before the uncharge benchmark, so it never underflows.
UNCHARGE_RESERVE = 10**9
# The peers' limit: as for the counters (no max), the check never refuses.
PEER_LIMIT = PAGE_COUNTER_MAX
# Each benchmark: ROUNDS samples, each the mean of ITERATIONS back-to-back calls.
ROUNDS = 1000
ITERATIONS = 1000
WARMUP_ROUNDS = 10


def run(benchmark: Any, op: Callable[..., Any],
        args: tuple[Any, ...] = (1,)) -> tuple[Any, int]:
    """Benchmark op(*args) (by default op(1)) in ROUNDS rounds of ITERATIONS
    back-to-back calls (after WARMUP_ROUNDS unmeasured rounds). Returns (op's
    result, calls made in all).

    Each call is pytest-benchmark's `op(*args, **kwargs)` in a `for` loop: every
    row pays the same loop step and call, the "empty call" row's time.

    Fixed iterations rather than pytest-benchmark's calibration: calibration times
    the cold first call, which alone passes its 5 us target, so it settles on one
    call per round and every sample then includes the timer's own overhead.
    With --benchmark-disable, op runs once.
    """
    result = benchmark.pedantic(op, args=args, rounds=ROUNDS, iterations=ITERATIONS,
                                warmup_rounds=WARMUP_ROUNDS)
    if benchmark.disabled:
        return result, 1
    # pytest-benchmark makes one more call after a looped run, for the result
    return result, (WARMUP_ROUNDS + ROUNDS) * ITERATIONS + 1


# ---- group "charge": the floors, the stock hit, the slow-path pair, the peers ----
#
# One table for every ratio of the per-call goals (scripts/ratios.py computes
# them from --benchmark-json): the stock hit against an empty Python call and
# against the bare C call it makes, and the slow-path pair against the hit.

def empty(n: int) -> None:
    """The floor: a Python function that does nothing."""


def wrapped_empty(n: int) -> None:
    """One Python frame that makes one call, as the pair's frame does: this row
    minus the empty call's is what the pair's own frame adds."""
    empty(n)


@pytest.mark.benchmark(group="charge")
def test_empty_call(benchmark: Any) -> None:
    """An empty Python function, called as every row calls its op: the cost of
    the harness's loop step and of one Python call, the floor of every row."""
    result, _ = run(benchmark, empty)
    assert result is None


@pytest.mark.benchmark(group="charge")
def test_wrapped_empty_call(benchmark: Any) -> None:
    """A Python function whose body calls the empty one: the pair's frame."""
    result, _ = run(benchmark, wrapped_empty)
    assert result is None


@pytest.fixture
def stocked_leaf(chain3: Chain, cpu0: int) -> PageCounter:
    """The leaf of a depth-3 chain, with a stock on CPU 0 (this process) holding
    STOCK_BATCH - 1 pages."""
    leaf = chain3[-1]
    assert leaf.enable_stock(batch=STOCK_BATCH)
    assert leaf.try_charge(1) == (True, None)            # greedy: refills the stock
    assert leaf.stock(cpu0) == STOCK_BATCH - 1
    return leaf


@pytest.mark.benchmark(group="charge")
def test_try_charge_stock_hit(benchmark: Any, stocked_leaf: PageCounter, chain3: Chain,
                              cpu0: int) -> None:
    """try_charge(1) served from CPU 0's stock of a depth-3 leaf (the fast path: one
    C call that trylocks the slot and takes a page; no level's usage changes)."""
    usage_before = [c.usage for c in chain3]
    stock_before = stocked_leaf.stock(cpu0)

    result, calls = run(benchmark, stocked_leaf.try_charge)

    assert result == (True, None)
    # Every call was a hit: a miss would have gone up the hierarchy and charged
    # a whole batch, changing usage at every level; each hit takes one page.
    assert [c.usage for c in chain3] == usage_before
    assert stock_before - stocked_leaf.stock(cpu0) == calls


@pytest.mark.benchmark(group="charge")
def test_try_charge_stock_hit_lockless(benchmark: Any, chain3: Chain, cpu0: int) -> None:
    """The same hit on a lockless (v4) stock: one C call that CASes CPU 0's word
    down by a page (no lock to take and release)."""
    leaf = chain3[-1]
    assert leaf.enable_stock(batch=STOCK_BATCH, lockless=True)
    assert leaf.try_charge(1) == (True, None)            # greedy: deposits in the word
    assert leaf.stock(cpu0) == STOCK_BATCH - 1
    usage_before = [c.usage for c in chain3]

    result, calls = run(benchmark, leaf.try_charge)

    assert result == (True, None)
    assert [c.usage for c in chain3] == usage_before
    assert STOCK_BATCH - 1 - leaf.stock(cpu0) == calls


@pytest.mark.benchmark(group="charge")
def test_stock_consume_bare(benchmark: Any, arena: Arena, stocked_leaf: PageCounter,
                            chain3: Chain, cpu0: int) -> None:
    """The C call a stock hit makes, issued bare: stock_consume(counter, this CPU's
    row, 1) on the stocked depth-3 leaf, without try_charge's Python around it."""
    usage_before = [c.usage for c in chain3]
    stock_before = stocked_leaf.stock(cpu0)
    row = arena._stock_row
    assert row >= 0                                      # this process is CPU 0

    result, calls = run(benchmark, arena._slots.stock_consume,
                        (stocked_leaf._c, row, 1))

    assert result == CONSUME_HIT
    # as for try_charge: every call took one page from the stock, and nothing else
    assert [c.usage for c in chain3] == usage_before
    assert stock_before - stocked_leaf.stock(cpu0) == calls


@pytest.mark.benchmark(group="charge")
def test_slow_path_pair(benchmark: Any, arena: Arena, chain: Chain) -> None:
    """try_charge(1) then uncharge(1) on the leaf of a chain of depth 1, 3 and 5,
    from a process that is not a CPU (no stock): the slow path of a charge and
    its release, both walking to the root. Measured as one op, so it pays one
    more Python frame than the two calls issued by hand: test_wrapped_empty_call
    minus test_empty_call."""
    assert this_cpu() is None, "the slow-path pair must not run as a CPU"
    leaf = chain[-1]
    assert not leaf.has_stock
    charge, uncharge = leaf.try_charge, leaf.uncharge

    def pair(n: int) -> None:
        charge(n)
        uncharge(n)

    walks_before = int(arena.rows[:, R_WALKS].sum())

    result, calls = run(benchmark, pair)

    assert result is None
    # every call charged one page at every level and gave it back: two walks a
    # call, never more than one page charged, nothing refused
    assert int(arena.rows[:, R_WALKS].sum()) - walks_before == 2 * calls
    assert [(c.usage, c.watermark, c.failcnt) for c in chain] == [(0, 1, 0)] * len(chain)


def lock_rawvalue_peer() -> tuple[Callable[[int], bool], Callable[[], int]]:
    """multiprocessing.Lock() guarding a multiprocessing.RawValue('q'), doing the same
    work. Returns (charge, read)."""
    lock = multiprocessing.Lock()
    v = multiprocessing.RawValue("q", 0)
    limit = PEER_LIMIT

    def charge(n: int) -> bool:
        with lock:
            if v.value + n > limit:
                return False
            v.value += n
            return True

    return charge, lambda: v.value


@pytest.mark.benchmark(group="charge")
def test_peer_mp_value_locked(benchmark: Any) -> None:
    """Peer: `with v.get_lock(): limit check; v.value += n` on multiprocessing.Value('q')
    (each v.value access through the synchronized wrapper re-takes the RLock)."""
    peer = value_peer(PEER_LIMIT)
    result, calls = run(benchmark, peer.try_charge)
    assert result is True
    assert peer.usage() == calls


@pytest.mark.benchmark(group="charge")
def test_peer_mp_lock_rawvalue(benchmark: Any) -> None:
    """Peer: `with lock: limit check; v.value += n` on a RawValue('q') guarded by a
    multiprocessing.Lock()."""
    charge, read = lock_rawvalue_peer()
    result, calls = run(benchmark, charge)
    assert result is True
    assert read() == calls


# ---- group "slow-path": try_charge through the hierarchy, by depth ------------

@pytest.mark.benchmark(group="slow-path")
def test_try_charge_slow_path(benchmark: Any, chain: Chain) -> None:
    """try_charge(1) on the leaf of a chain of depth 1, 3 and 5, from a process that
    is not a CPU (so no stock): one speculative add and max check per level. Usage
    only grows (no max), and the arena teardown gives it back."""
    assert this_cpu() is None, "the slow-path benchmark must not run as a CPU"
    leaf = chain[-1]
    assert not leaf.has_stock
    before = leaf.usage

    result, calls = run(benchmark, leaf.try_charge)

    assert result == (True, None)
    # one page per call, at every level: no refusal, no stock anywhere
    assert leaf.usage - before == calls
    assert all(c.usage == leaf.usage for c in chain)
    assert all(c.failcnt == 0 for c in chain)


# ---- group "uncharge" ---------------------------------------------------------

@pytest.fixture
def precharged_leaf(chain3: Chain) -> PageCounter:
    """The leaf of a depth-3 chain with UNCHARGE_RESERVE pages charged (forced charge);
    the arena teardown uncharges what the benchmark left."""
    leaf = chain3[-1]
    leaf.charge(UNCHARGE_RESERVE)
    return leaf


@pytest.mark.benchmark(group="uncharge")
def test_uncharge(benchmark: Any, arena: Arena, precharged_leaf: PageCounter,
                  chain3: Chain) -> None:
    """uncharge(1) on a depth-3 leaf, not a CPU: one subtraction per level up to the
    root, never reaching 0."""
    before = precharged_leaf.usage

    result, calls = run(benchmark, precharged_leaf.uncharge)

    assert result is None
    assert before - precharged_leaf.usage == calls
    assert precharged_leaf.usage > 0
    assert all(c.usage == precharged_leaf.usage for c in chain3)
    assert arena.underflows == 0
