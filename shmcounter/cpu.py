"""this_cpu(): which CPU of an arena the calling process is.

A process becomes CPU k of an arena with register_cpu(arena, k). The runtime in
procs/ does this for its CPU processes; a test may do it for a plain
multiprocessing process. Only a registered process has stock: its charges take the
fast path on stock[k], and its slow-path surplus is deposited there. Any other
process charges and uncharges by walking the hierarchy.

Registration lives in the arena (row k's pid), so two processes can never both be
CPU k. A process that dies while registered leaves its pid there: that CPU is dead
until the hotplug-dead path (Arena.hotplug_cpu_dead) reclaims its stocks and frees
the slot. A forked child is never its parent's CPU: fork clears the registration.

A CPU serves drain requests (drain.py) from a signal handler, which only the main
thread can install: register_cpu runs in the main thread.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from . import cpuhp, drain, segment, writer  # noqa: F401  (writer: each handle's row)
from .cpuhp import this_cpu, this_cpu_of
from .errors import ArenaError
from .segment import R_DONE_SEQ, R_STOCK_BLOCK

if TYPE_CHECKING:
    from .segment import Segment as Arena

__all__ = ["register_cpu", "this_cpu", "this_cpu_of", "unregister_cpu"]


def register_cpu(arena: Arena, cpu: int) -> None:
    """Make the calling process CPU `cpu` of `arena`.

    Raises ArenaError if this process is already a CPU, if a live process is CPU
    `cpu`, or if a dead one still is (run arena.hotplug_cpu_dead(cpu) first).
    """
    arena._check_open()
    slot = arena._cpu_slot(cpu)
    if cpuhp.registered is not None:
        raise ArenaError(f"this process (pid {os.getpid()}) is already CPU "
                         f"{cpuhp.registered[1]}; call unregister_cpu() first")
    me = os.getpid()
    drain.install_handler()             # before anyone can see us as a CPU
    holder = arena._slots.cas(slot, 0, me)
    if holder not in (0, me):
        if arena.row_owner_alive(cpu):
            raise ArenaError(f"CPU {cpu} is already registered by pid {holder}")
        raise ArenaError(f"CPU {cpu}'s previous process (pid {holder}) died and its "
                         f"stocks were not reclaimed; run arena.hotplug_cpu_dead({cpu}) first")
    # The pid claims the row; the start word, written next, publishes it to
    # drain.post_work, which signals no row whose start word is 0. Until then
    # this CPU has no stock (_stock_block below), so a drain that skips it loses
    # nothing. unregister_cpu and hotplug.cpu_dead clear the start word first.
    arena._set_row_owner(cpu, me)
    arena._writer.release_row()
    arena._writer.use_row(cpu)
    arena._writer.serve_drains = lambda: drain.serve(arena)
    arena._slots.store(arena._row_slot(cpu) + R_STOCK_BLOCK, arena._stock_slot(cpu, 0))
    arena._slots.set_cpu(arena._stock_slot(cpu, 0), me)
    for s in cpuhp.subsystems:
        if s.online is not None:
            s.online(arena, cpu)
    cpuhp.registered = (arena, cpu)


def unregister_cpu() -> None:
    """Take the calling CPU offline cleanly: drain its own stocks, then free the slot.
    A no-op in a process that is not a CPU."""
    if cpuhp.registered is None:
        return
    arena, cpu = cpuhp.registered
    for s in reversed(cpuhp.subsystems):
        if s.offline is not None:
            s.offline(arena, cpu)
    arena._set_row_owner(cpu, 0)                         # start word first: see register_cpu
    arena._slots.cas(arena._cpu_slot(cpu), os.getpid(), 0)
    done = arena._row_slot(cpu) + R_DONE_SEQ
    arena._slots.futex_wake(done)       # drains waiting for us: we are gone
    _forget_arena(arena)


def _forget_arena(arena: Arena) -> None:
    """Drop this process's registration on `arena`, locally (close, fork)."""
    arena._slots.set_cpu(-1, 0)
    if cpuhp.registered is not None and cpuhp.registered[0] is arena:
        cpuhp.registered = None
        arena._writer.release_row()
        arena._writer.serve_drains = None


def _close(arena: Arena) -> None:
    """A handle closes: the CPU that runs on it goes offline cleanly first, or its
    registration would stand for a process that is no longer a CPU (others would
    wait for its drains)."""
    if this_cpu_of(arena) is not None:
        unregister_cpu()
    _forget_arena(arena)


def _after_fork_in_child() -> None:
    if cpuhp.registered is not None:
        _forget_arena(cpuhp.registered[0])


segment.register_at_fork(_after_fork_in_child)
segment.register_handle_hook("close", _close)
