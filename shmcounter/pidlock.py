"""The pid-stamped lock: a word of the segment that holds its holder's pid.

Every lock word of the arena is one of these: the registry lock, the drain lock
(percpu_charge_mutex), stop_machine's stop word, memcg's set-up word and the
legacy FLUSHING_CACHED_CHARGE flag. 0 is free; a positive value is the pid of the
holder; a negative value is a state of the word's owner (memcg's "ready"), never
a holder, and is never taken over.

A holder that died cannot let go, so the word is taken over from a dead pid with
a CAS from that pid: two processes that both find it dead cannot both win. A pid
reused by another process since looks alive (these words hold a pid only, not a
start time): the word stays held until that process exits, or until the wait
that wants it runs out (wait.bounded_wait). The threads of one process share its
pid: a caller that serialises its own threads (a threading.Lock around the word)
may pass stale_self=True to take over its own pid, which then can only be left
over from a hold that ended without letting go.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .proc import pid_alive
from .wait import bounded_wait

if TYPE_CHECKING:
    from ._atomic import Slots
    from .segment import Segment


def trylock(slots: Slots, word: int, me: int, *, stale_self: bool = False) -> tuple[bool, int]:
    """Take lock word `word` for pid `me` without waiting. Returns (taken, pid):
    taken with pid 0 when the word was free, taken with the old holder's pid when
    it was taken over (a dead pid, or with stale_self our own), or not taken with
    the word's value (a live holder, or a negative state)."""
    holder = slots.cas(word, 0, me)
    if holder == 0:
        return True, 0
    stale = holder > 0 and (stale_self if holder == me else not pid_alive(holder))
    if stale and slots.cas(word, holder, me) == holder:
        return True, holder
    return False, holder


def lock(seg: Segment, word: int, me: int, what: str, *, stale_self: bool = False,
         futex: bool = False, timeout: float | None = None) -> int:
    """Take lock word `word` for pid `me`, waiting for a live holder at most
    `timeout` seconds (default seg.wait_timeout; then WaitTimeout names `what` and
    the holder). With futex, sleep on the word itself (its holder wakes it on
    release). Returns the dead holder taken over, or 0. A negative value in the
    word (a state, not a holder) is waited on like a holder."""
    took_over = 0

    def attempt() -> int:
        nonlocal took_over
        taken, pid = trylock(seg._slots, word, me, stale_self=stale_self)
        if taken:
            took_over = pid
            return 0
        return pid
    bounded_wait(seg, what, attempt, futex=word if futex else -1, timeout=timeout)
    return took_over


def unlock(slots: Slots, word: int, me: int) -> None:
    """Let go of lock word `word` held by pid `me` (a CAS: a word taken over from us
    meanwhile, as from a dead holder, stays with its new holder)."""
    slots.cas(word, me, 0)
