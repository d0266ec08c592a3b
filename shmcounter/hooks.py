"""Named kill points: a test parks a CPU at a point inside an op, then SIGKILLs it.

The slow paths call `at(name)` between their steps when any hook is armed:

    charge:slow       a try_charge missed the fast path, before its op begins
    charge:level      after each level of a hierarchical charge succeeded
    charge:deposit    after the greedy charge, before the surplus is deposited
    uncharge:level    after each level of a hierarchical uncharge
    drain:taken       after drain_stock_local took the stock, before uncharging it
                      (a lockless drain: marked forward, before uncharging)
    drain:cas         a lockless drain has recorded the word W, before its CAS
    drain:swapped     a lockless drain's CAS is done; last and the mark are not
    stock:cas         a lockless deposit has recorded E and E + surplus, no CAS yet
    stock:deposited   a lockless deposit's CAS is done and marked forward
    set_max:exchanged after set_max exchanged the limit, before it re-reads usage
    stock:consume     memcg's stepwise stock hit, slot lock held: after reading
                      the slot, before writing it back (PageCounter._consume_stepwise)
    legacy:evicted    between the two ops of a legacy eviction: the new cgroup is
                      charged and cached, the victim's pages wait in the slot's
                      pending half
    drain_all:locked  memcg drain_all_stock holds the single-drainer lock and has
                      not drained yet: a concurrent drain_all_stock loses the trylock

A hook may also raise, to play a signal handler's exception between two steps.
Armed only in the process that installs a hook (a CPU process under test). The
ops are one C call each (_counter.c, memcg/_legacy.c), with no step to stop at:
install() sets a flag in the C module's state, and while it is set they run the
same op in Python steps, with these points between them. Unarmed, the cost is
that flag's test, once per op.
"""
from __future__ import annotations

from collections.abc import Callable

from ._atomic import set_hooks_armed

ARMED = False
_hooks: dict[str, Callable[[str], None]] = {}


def install(name: str, fn: Callable[[str], None]) -> None:
    """Call fn(name) every time the op reaches point `name`."""
    global ARMED
    _hooks[name] = fn
    ARMED = True
    set_hooks_armed(True)


def clear() -> None:
    global ARMED
    _hooks.clear()
    ARMED = False
    set_hooks_armed(False)


def at(name: str) -> None:
    fn = _hooks.get(name)
    if fn is not None:
        fn(name)
