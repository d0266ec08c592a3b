"""Every wait of the library on a word of the segment, bounded.

The words we wait on (the registry lock, stop_machine, a row's in_op, a CPU's own
lock words) name their holder by pid. A dead holder is taken over by the caller
(each caller says how); a live one is waited for, but not forever: a holder that
keeps the word for arena.wait_timeout seconds gets WaitTimeout, naming what was
waited for, the pid and the seconds. It may be stopped (SIGSTOP) or stuck, or the
word may be corrupt and name a live bystander. A holder that changes restarts the
clock: a queue of short holds is progress, not a stuck holder.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from numbers import Real
from typing import TYPE_CHECKING

from .errors import WaitTimeout

if TYPE_CHECKING:
    from .segment import Segment as Arena

# Longest single futex sleep (us): the stop word is woken on release, but a dead
# stopper never wakes anyone, and a holder that changes must restart the clock.
_FUTEX_SLICE_US = 50_000


def bounded_wait(arena: Arena, what: str, attempt: Callable[[], int],
                 futex: int = -1, timeout: float | None = None) -> None:
    """Call attempt() until it returns 0: done (it took the word, or found it free).
    Otherwise it returns the pid holding `what`; in between, sleep (10 us, doubling
    up to 1 ms), or with `futex` (a slot index), wait on that word while it holds
    the pid. Raises WaitTimeout once one holder has held it for `timeout` seconds
    (default arena.wait_timeout). The first attempt costs one call: no clock is
    read unless we wait."""
    holder = attempt()
    if holder == 0:
        return
    limit = arena.wait_timeout if timeout is None else timeout
    since, held_by, pause = time.monotonic(), holder, 0.0
    while True:
        if futex >= 0:
            arena._slots.futex_wait(futex, holder, _FUTEX_SLICE_US)
        else:
            time.sleep(pause)
            pause = min(pause * 2 or 1e-5, 1e-3)
        holder = attempt()
        if holder == 0:
            return
        now = time.monotonic()
        if holder != held_by:
            since, held_by = now, holder
        elif now - since >= limit:
            raise WaitTimeout(arena.name, what, holder, limit)


def wait_own_lock(arena: Arena, lock: int, what: str, attempt: Callable[[], bool]) -> None:
    """Wait for a lock word that only this CPU's process ever takes (a stock slot's
    lock, the legacy block's lock; slot index `lock`), until attempt() takes it.
    Held by another pid, the word is corrupt: ArenaCorrupt at once, for no other
    process ever lets it go (the hotplug path clears a dead CPU's words before a
    new process can register). Held by this pid: another context of this CPU, so
    wait (bounded_wait)."""
    owner = arena._stock_owner

    def take() -> int:
        if attempt():
            return 0
        holder = arena._slots.load(lock)
        if holder not in (0, owner):
            raise arena._corrupt(what, holder, f"not 0 or this CPU's pid {owner}, the "
                                               f"only process that takes it")
        return owner
    bounded_wait(arena, what, take)


def check_timeout(seconds: object, what: str) -> None:
    """TypeError or ValueError naming `what`, unless `seconds` is a finite real
    number > 0 (a bool is not)."""
    if isinstance(seconds, bool) or not isinstance(seconds, Real):
        raise TypeError(f"{what} must be a number of seconds, got {seconds!r} "
                        f"({type(seconds).__name__})")
    try:
        # (typeshed's numbers.Real declares no __gt__)
        ok = math.isfinite(seconds) and seconds > 0  # type: ignore[operator]
    except OverflowError:                   # an int past the range of a float
        ok = False
    if not ok:
        raise ValueError(f"{what} must be a finite number of seconds > 0, got {seconds!r}")
