"""The peer a user would pick instead of shmcounter: a multiprocessing.Value with
its own lock, doing the work of try_charge (a limit check and an add).

One ValuePeer models one flat counter: no hierarchy, no stock. It is the baseline
of bench/test_ops.py (one process, no contention) and of `shmcounter bench`
(P processes charging the same Values). A Value can be shared only by
inheritance, so the processes that use it must be forked after it is made.
"""
from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import NamedTuple

from shmcounter import PAGE_COUNTER_MAX


class ValuePeer(NamedTuple):
    """try_charge(n) -> bool, uncharge(n), usage() -> int on one Value('q')."""
    try_charge: Callable[[int], bool]
    uncharge: Callable[[int], None]
    usage: Callable[[], int]


def value_peer(limit: int = PAGE_COUNTER_MAX,
               ctx: multiprocessing.context.BaseContext | None = None) -> ValuePeer:
    """A multiprocessing.Value('q') (from `ctx`, default multiprocessing's) with
    its own lock, an RLock: `with v.get_lock(): if v.value + n > limit: refuse;
    v.value += n`. Each v.value access through the synchronized wrapper takes
    the RLock again (recursively), as a user who follows the docs pays it.
    A dead holder leaves the RLock held for good (no reclaim is possible)."""
    v = (ctx or multiprocessing).Value("q", 0)

    def try_charge(n: int) -> bool:
        with v.get_lock():
            if v.value + n > limit:
                return False
            v.value += n
            return True

    def uncharge(n: int) -> None:
        with v.get_lock():
            v.value -= n

    return ValuePeer(try_charge, uncharge, lambda: v.value)
