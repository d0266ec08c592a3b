"""drain_stock: a work message to every online CPU, answered by each in parallel;
a lockless (v4) stock is drained by the requester itself, remotely (drain_lock).

The kernel's page_counter_drain_stock runs work_on_cpu(cpu, drain_one) for each
online CPU in turn, N round trips. Here the requester posts to every CPU first,
then waits for all, so the latency is one round trip:

  requester (any attached process)            CPU k (a registered process)
  -----------------------------------         --------------------------------------
  requests[k][c] = 1                  (1)
  summary[k] |= bit of c's group      (1')
  t = ++req_seq[k]                    (2)
  signal CPU k's process (post_work) ------>  handler, between two bytecodes:
  (own part inline, if a CPU)                   s = req_seq[k]          (3)
                                                for each group g whose bit it
                                                takes (exchange the summary word):
                                                  for c of g with requests[k][c]:
                                                    requests[k][c] = 0
                                                    drain_stock_local(c)
  futex_wait(done_seq[k]) <----------------     done_seq[k] = max(done_seq[k], s);
  until done_seq[k] >= t                        futex_wake(done_seq[k])

Correctness: (1) comes before (1') before (2), and CPU k reads req_seq (3) before
it takes the summary bits, and takes a bit before it reads its group's flags; so
when done_seq[k] >= t, our bit was taken by that serve, or by an earlier one after
(1'), and the serve that took it read our flag after (1): it drained c, or found
the flag cleared by an earlier serve that drained c after (1). A serve reads the
flags of the groups asked (64 counters each) and the summary (one word per 4096
counters), not every flag: a drain costs the CPU what it asks, whatever the number
of counters in the arena.

A signal is the closest thing to an interrupt: the handler runs at the next
bytecode even in a tight charge loop, and interrupts a blocking wait (EINTR). If
the CPU is inside an op, the handler only marks the drain pending and the op
serves it when it ends (writer.py): a drain never nests inside an op. Two CPUs
draining each other both wait in futex_wait, which a signal interrupts, so each
serves the other while it waits: no deadlock.

A CPU that dies before answering is skipped: its stock is the hotplug path's, which
wakes the waiters. A live CPU that stays silent (SIGSTOP, or a long C call that
never returns to the interpreter) raises DrainTimeout.

post_work is the only sender of SIGDRAIN, and signals only the live process
registered as the CPU, through a pidfd: never a free row's stray pid, a pid
reused since, pid 0 (the caller's process group) or pid 1.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

import numpy as np

from . import cpuhp, pidlock, segment
from ._atomic import drain_all_v4
from .cpuhp import this_cpu_of
from .errors import DrainTimeout, WaitTimeout
from .proc import pid_alive
from .segment import H_DRAIN_LOCK, H_STOP, R_DONE_SEQ, R_PID, R_REQ_SEQ, R_START, REQUEST_GROUP
from .stop_machine import repair_dead_rows
from .wait import check_timeout

# Linux's largest possible pid (PID_MAX_LIMIT, 64-bit): a pid word above it names
# no process, whatever it holds.
PID_MAX_LIMIT = 4 * 1024 * 1024

if TYPE_CHECKING:
    from ._atomic import Slots
    from .segment import Segment as Arena
    from .stock import PageCounterStock

# A real-time signal: queued, and with no other user in this library.
SIGDRAIN = signal.SIGRTMIN + 3
# Longest single futex sleep: how late a waiter notices a CPU that died without a
# hotplug path running (a plain registered process killed from outside).
_WAIT_SLICE_US = 20_000


def drain_stock(arena: Arena, counters: Sequence[PageCounterStock],
                timeout: float | None = None, trylock: bool = False) -> bool:
    """Make every online CPU drain its own stock of each of `counters`; return True
    when all have, or raise DrainTimeout for the first live CPU that did not in time.

    trylock: be the single drainer of the arena (memcg's percpu_charge_mutex):
    if another trylock drain is running, return False at once, draining nothing.
    A bad timeout or trylock raises TypeError or ValueError before anything is asked.
    """
    if timeout is not None:
        check_timeout(timeout, "timeout")
    if not isinstance(trylock, bool):
        raise TypeError(f"trylock must be a bool, got {trylock!r}")
    arena._check_open()
    if not trylock:
        _drain(arena, counters, timeout)
        return True
    with single_drainer(arena) as got:
        if got:
            _drain(arena, counters, timeout)
    return got


# The threads of this process hold the drain lock one at a time (its word holds
# only a pid); reentrant, for a drain_lock nested in single_drainer.
_drain_threads = threading.RLock()


def _after_fork_in_child() -> None:
    global _drain_threads
    _drain_threads = threading.RLock()


segment.register_at_fork(_after_fork_in_child)


@contextmanager
def single_drainer(arena: Arena) -> Iterator[bool]:
    """mutex_trylock(percpu_charge_mutex): yield True holding the arena's drain
    lock, or False at once if another process (or thread of this one) holds it.
    The lock word holds the holder's pid; a dead holder's lock is taken over, and
    dead writers repaired (drain_lock says why)."""
    slots, me = arena._slots, os.getpid()
    if not _drain_threads.acquire(blocking=False):
        yield False                     # another thread of ours holds it
        return
    try:
        taken, holder = pidlock.trylock(slots, H_DRAIN_LOCK, me)
        if not taken:
            yield False
            return
        try:
            if holder:
                repair_dead_rows(arena)     # its drain op first (lockless stock, below)
            yield True
        finally:
            pidlock.unlock(slots, H_DRAIN_LOCK, me)
    finally:
        _drain_threads.release()


@contextmanager
def drain_lock(arena: Arena, timeout: float | None = None) -> Iterator[None]:
    """Hold the arena's drain lock, waiting for a live holder at most `timeout`
    seconds (default arena.wait_timeout; then WaitTimeout). The lock word holds a
    pid, so the threads of this process take turns on _drain_threads first: the
    word holding our pid then means an outer frame of this very thread holds it
    (single_drainer, or an outer drain_lock), and we nest.

    The lock every drain of a lockless (v4) stock holds: it serialises the CASes
    that bump a word's seq, which is what lets a repair tell from the word whether
    a dead drain's CAS happened (_op.h, v4_outcome). Taken over from a dead holder,
    it repairs dead writers first: the dead drainer's op is decided before any
    other drain moves seq on."""
    slots, me = arena._slots, os.getpid()
    timeout = arena.wait_timeout if timeout is None else timeout
    if not _drain_threads.acquire(timeout=timeout):
        raise WaitTimeout(arena.name, "the drain lock, held by another thread of this "
                          "process", me, timeout)
    try:
        if slots.load(H_DRAIN_LOCK) == me:      # an outer frame of this thread holds it
            yield
            return
        if pidlock.lock(arena, H_DRAIN_LOCK, me, "the drain lock", timeout=timeout):
            try:
                repair_dead_rows(arena)
            except BaseException:
                pidlock.unlock(slots, H_DRAIN_LOCK, me)
                raise
        try:
            yield
        finally:
            pidlock.unlock(slots, H_DRAIN_LOCK, me)
    finally:
        _drain_threads.release()


def drain_lockless_at_once(counters: tuple[PageCounterStock, ...]) -> bool:
    """Drain every CPU's word of each lockless stock of `counters` (one arena's)
    in one C call (drain_all_v4): take the drain lock if it is free, drain, let go.
    A drain is rare, so it mostly runs with cold caches, where each Python frame
    costs microseconds: this is v4's drain latency (README, "Drains and hotplug").
    The call holds the GIL while it holds the lock, so no other thread of ours
    can see the lock held by it. True: done. False: something stands in the way
    (the lock held, by another process, another thread of ours or a dead holder
    to take over and repair; a hook armed; no writer row yet; a stop_machine):
    the caller takes the lock the usual way and drains; words drained meanwhile
    stay drained."""
    return drain_all_v4(counters, H_DRAIN_LOCK) >= 0


def _drain(arena: Arena, counters: Sequence[PageCounterStock], timeout: float | None) -> None:
    timeout = arena.drain_timeout if timeout is None else timeout
    slots = arena._slots
    # A lockless (v4) stock needs no CPU: the caller drains every CPU's word itself.
    lockless = tuple(counter for counter in counters if counter._lockless())
    if lockless:
        if not drain_lockless_at_once(lockless):
            with drain_lock(arena, timeout):
                for counter in lockless:
                    counter._drain_lockless()
        counters = [counter for counter in counters if not counter._lockless()]
        if not counters:
            return
    me = this_cpu_of(arena)
    indexes = [counter._index for counter in counters]
    sent: list[tuple[int, int, int]] = []                  # (cpu, pid, ticket)
    for cpu in range(arena.ncpus):
        if cpu != me:
            pid, ticket = post_work(arena, cpu, indexes)
            if ticket:
                sent.append((cpu, pid, ticket))
    if me is not None:
        for counter in counters:
            counter.drain_stock_local()
    deadline = time.monotonic() + timeout
    for cpu, pid, ticket in sent:
        done_slot = arena._row_slot(cpu) + R_DONE_SEQ
        while (done := slots.load(done_slot)) < ticket:
            if slots.load(arena._cpu_slot(cpu)) != pid or not arena.row_owner_alive(cpu):
                break                                       # died: hotplug's job
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _timeout(arena, cpu, pid, counters, timeout)
            slots.futex_wait(done_slot, done, min(int(remaining * 1e6) + 1, _WAIT_SLICE_US))


def post_work(arena: Arena, cpu: int, indexes: Sequence[int] = ()) -> tuple[int, int]:
    """Ask CPU `cpu` to serve what is asked of it: set its request flag of each
    counter in `indexes`, take a ticket and send it SIGDRAIN. Returns (pid, ticket):
    the process signalled and the ticket it serves (done when done_seq reaches it);
    or (0, 0) if CPU `cpu` is not a live registered process, which nobody need wait
    for: its stock, if any, is the hotplug path's.

    The only sender of SIGDRAIN. The row's pid is read once, and signalled only if
    it is > 1 (0 is the caller's process group) and at most PID_MAX_LIMIT, the
    row's start word is not 0,
    and, with a pidfd of that pid held, the row still holds that pid and a start
    word equal to the start time of the process at that pid. A row's start word is
    written after its pid and cleared before it (register_cpu, unregister_cpu,
    hotplug.cpu_dead), so a start word read between two reads of the same pid
    belongs to a registration of that pid; a row whose start word is 0 (free, or
    its CPU registering or unregistering) has no stock, and skipping it loses
    nothing. The pidfd pins the process: if the send succeeds, the process lived
    from the pidfd's opening to the send, so the /proc read in between was its
    own, and it is the process that registered. It may have unregistered since the
    check: its handler, installed before it registered and kept for life, then
    ignores the request.
    """
    slots, row = arena._slots, arena._row_slot(cpu)
    pid = slots.load(row + R_PID)
    if not 1 < pid <= PID_MAX_LIMIT or slots.load(row + R_START) == 0:
        return 0, 0
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return 0, 0
    try:
        start = slots.load(row + R_START)
        if start == 0 or slots.load(row + R_PID) != pid or not pid_alive(pid, start):
            return 0, 0
        # Flags and ticket after the checks: a skipped CPU keeps no stale request.
        # Ticket before the send: the handler reads req_seq once the signal is in,
        # so it serves this ticket. If the send fails (the process exited since
        # the check) nobody waits on the ticket; the CPU's next serve, or
        # hotplug.cpu_dead, moves done_seq past it.
        ask(arena, cpu, indexes)
        ticket = slots.fetch_add(row + R_REQ_SEQ, 1) + 1
        try:
            signal.pidfd_send_signal(pidfd, SIGDRAIN)
        except ProcessLookupError:
            return 0, 0
        return pid, ticket
    finally:
        os.close(pidfd)


WORD_BITS = 64
_WORD_MASK = (1 << WORD_BITS) - 1


def ask(arena: Arena, cpu: int, indexes: Iterable[int]) -> None:
    """Set CPU `cpu`'s request flag of each counter in `indexes`, then the summary
    bit of each one's group: (1) and (1') of the module docstring."""
    slots = arena._slots
    groups = set()
    for index in indexes:
        slots.store(arena._request_slot(cpu, index), 1)
        groups.add(index // REQUEST_GROUP)
    for group in groups:
        word, bit = divmod(group, WORD_BITS)
        _or(slots, arena._summary_slot(cpu, word), 1 << bit)


def take_requests(arena: Arena, cpu: int, drain: Callable[[int], object]) -> None:
    """CPU `cpu`'s half, after it read req_seq: take each summary bit set, and for
    each flag set in that group, clear it and call drain(index). O(the groups
    asked + the summary words), whatever the number of counters. Flags of
    counters not published (a hostile word) are left alone. If drain raises, its
    flag and the bits not served yet are set again before the error propagates,
    so that the next serve does them."""
    slots = arena._slots
    for word in np.flatnonzero(arena.request_summary[cpu]).tolist():
        summary = arena._summary_slot(cpu, word)
        bits = slots.exchange(summary, 0) & _WORD_MASK
        try:
            while bits:
                low = bits & -bits
                _take_group(arena, cpu, word * WORD_BITS + low.bit_length() - 1, drain)
                bits ^= low
        except BaseException:
            _or(slots, summary, bits)
            raise


def _take_group(arena: Arena, cpu: int, group: int, drain: Callable[[int], object]) -> None:
    slots = arena._slots
    start = group * REQUEST_GROUP
    flags = arena.requests[cpu, start:start + REQUEST_GROUP].copy()     # others write it
    n = arena._published()
    for index in (start + np.flatnonzero(flags)).tolist():
        if index >= n and index >= (n := arena._published()):
            continue                                # not a counter (yet): not ours to clear
        flag = arena._request_slot(cpu, index)
        if slots.exchange(flag, 0):
            try:
                drain(index)
            except BaseException:
                slots.store(flag, 1)
                raise


def _or(slots: Slots, slot: int, bits: int) -> None:
    """Atomically set `bits` (a mask of 64 bits, unsigned) in word `slot`."""
    if bits >> (WORD_BITS - 1):
        bits -= 1 << WORD_BITS                       # the word is a signed int64
    old = slots.load(slot)
    while old | bits != old:
        seen = slots.cas(slot, old, old | bits)
        if seen == old:
            return
        old = seen


def _timeout(arena: Arena, cpu: int, pid: int, counters: Sequence[PageCounterStock],
             timeout: float) -> DrainTimeout:
    names = ", ".join(repr(c.name) for c in counters)
    stranded = sum(c.stock(cpu) for c in counters)
    return DrainTimeout(
        f"CPU {cpu} (pid {pid}) did not answer the drain of {names} within {timeout} s; "
        f"it is alive, so its stock ({stranded} pages) stays charged", cpu, pid)


def install_handler() -> None:
    """Serve drain requests in this process (main thread only; idempotent)."""
    if signal.getsignal(SIGDRAIN) is not _on_drain_signal:
        signal.signal(SIGDRAIN, _on_drain_signal)


def _on_drain_signal(signum: int, frame: object) -> None:
    registered = cpuhp.registered
    if registered is None:
        return                  # a late request to a CPU that went offline
    arena = registered[0]
    arena._writer.drain_pending = True
    serve(arena)


def serve(arena: Arena) -> None:
    """Serve this CPU's pending drain requests, unless an op of this process holds
    the op lock: then that op serves them when it ends. Never waits for the op lock;
    it may wait for a stop_machine to end, or for the slot lock of its own CPU."""
    writer, slots = arena._writer, arena._slots
    cpu = this_cpu_of(arena)
    while writer.drain_pending and cpu is not None:
        if slots.load(H_STOP) == os.getpid():
            return                  # we hold stop_machine: served when it ends
        if not writer.try_lock():
            return
        try:
            writer.drain_pending = False
            row = arena._row_slot(cpu)
            seq = slots.load(row + R_REQ_SEQ)
            for s in cpuhp.subsystems:                  # the work items (INIT_WORK)
                if s.work is not None:
                    s.work(arena, cpu)
            while (done := slots.load(row + R_DONE_SEQ)) < seq:
                if slots.cas(row + R_DONE_SEQ, done, seq) == done:
                    break
            slots.futex_wake(row + R_DONE_SEQ)
        finally:
            writer.unlock()
