"""check_invariants(): the invariants of the page_counter stock series (I1-I6; see
docs/design.md) as executable checks, plus our I7.

Run it at quiescence: no charge, uncharge or drain in flight in any process.
Every broken invariant is reported with its numbers, e.g.
    I1 broken at 'root': usage 130 != real 2 + stock 127
"""
from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from . import cpuhp
from .arena import Arena
from .segment import PC_MAX, PC_USAGE


class InvariantError(AssertionError):
    """One or more invariants do not hold; the message lists each."""


def check_invariants(arena: Arena, real: Mapping[str, int] | None = None, *,
                     underflows: int = 0, forced: bool = False,
                     batch: int | None = None) -> None:
    """Raise InvariantError unless these hold for every counter C:

    I1  usage(C) == sum(real[D]) + sum(stock[cpu][D]) over D in subtree(C)
        (stock: every per-CPU stock a subsystem holds: the per-counter stock,
        and memcg's legacy slots), when
        `real` (pages really charged to each counter by name, not counting
        stock) is given; without it, the part of I1 that needs no ledger:
        usage(C) >= sum(usage(children)) + sum(stock[cpu][C]).
    I2  usage >= 0 and stock >= 0, and arena.underflows == `underflows`.
    I5  every stock slot holds at most `batch` pages, when `batch` is given.
    I6  usage(C) <= max(C), unless `forced` charges were made.
    I7  usage(C) == sum over writer rows of contrib[row][C]: every usage change is
        accounted to the process that made it (what hotplug repair relies on).
    """
    n = arena._published()
    rec = arena.records[:n]
    usage = rec[:, PC_USAGE].copy()
    limit = rec[:, PC_MAX]
    parent = arena._parents(n)
    names = [c.name for c in arena.counters()]
    stocks = np.zeros((arena.ncpus, n), np.int64)
    for subsystem in cpuhp.subsystems:               # every per-CPU stock there is
        if subsystem.stock_pages is not None:
            stocks += subsystem.stock_pages(arena, n)
    stock = stocks.sum(axis=0)
    contrib = arena.contrib[:, :n].sum(axis=0)
    errors: list[str] = []

    # subtree sums, children after parents in creation order: walk backwards
    sub_stock = stock.copy()
    sub_real = np.array([(real or {}).get(name, 0) for name in names], np.int64)
    child_usage = np.zeros(n, np.int64)
    for i in range(n - 1, -1, -1):
        p = parent[i]
        if p >= 0:
            sub_stock[p] += sub_stock[i]
            sub_real[p] += sub_real[i]
            child_usage[p] += usage[i]
    for i, name in enumerate(names):
        if real is not None:
            if usage[i] != sub_real[i] + sub_stock[i]:
                errors.append(f"I1 broken at {name!r}: usage {usage[i]} != "
                              f"real {sub_real[i]} + stock {sub_stock[i]}")
        elif usage[i] < child_usage[i] + stock[i]:
            errors.append(f"I1 broken at {name!r}: usage {usage[i]} < children "
                          f"{child_usage[i]} + own stock {stock[i]}")
        if usage[i] < 0:
            errors.append(f"I2 broken at {name!r}: usage {usage[i]} < 0")
        for cpu in np.flatnonzero(stocks[:, i] < 0):
            errors.append(f"I2 broken at {name!r}: stock[{cpu}] {stocks[cpu, i]} < 0")
        if batch is not None:
            for cpu in np.flatnonzero(stocks[:, i] > batch):
                errors.append(f"I5 broken at {name!r}: stock[{cpu}] {stocks[cpu, i]} "
                              f"> batch {batch}")
        if not forced and usage[i] > limit[i]:
            errors.append(f"I6 broken at {name!r}: usage {usage[i]} > max {limit[i]}")
        if usage[i] != contrib[i]:
            errors.append(f"I7 broken at {name!r}: usage {usage[i]} != contributions "
                          f"{contrib[i]}")
    if arena.underflows != underflows:
        errors.append(f"I2 broken: arena.underflows is {arena.underflows}, "
                      f"expected {underflows}")
    if errors:
        raise InvariantError("\n".join(errors))
