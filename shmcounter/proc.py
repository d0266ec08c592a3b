"""Processes on this machine, as /proc shows them: is a pid alive, and is it still
the process that started at a given time (a pid alone can be reused)."""
from __future__ import annotations

import os
from typing import TypeGuard

# Linux's task flag of a process in do_exit (include/linux/sched.h): it runs no
# user code again, and so stores nothing more to any segment; it may stay in
# state D for a long time in exit_mmap (seconds, waiting for the mapping's lock
# on a loaded machine) before it becomes a zombie.
PF_EXITING = 0x4


def proc_stat(pid: int) -> tuple[bytes, int, int] | None:
    """(state, start time in clock ticks after boot, task flags) of process `pid`,
    or None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat[stat.rindex(b")") + 2:].split()     # after the command name
    return fields[0], int(fields[19]), int(fields[6])


def running(stat: tuple[bytes, int, int] | None) -> TypeGuard[tuple[bytes, int, int]]:
    """Whether a proc_stat describes a process that may still run user code: not
    gone, not a zombie, not exiting."""
    return stat is not None and stat[0] not in (b"Z", b"X") and not stat[2] & PF_EXITING


def pid_alive(pid: int, start: int = 0) -> bool:
    """True if `pid` is a running (not zombie, not exiting) process on this
    machine, and, when `start` is given, the one that started then (not a later
    user of the pid)."""
    stat = proc_stat(pid)
    return running(stat) and start in (0, stat[1])


def my_start_time() -> int:
    """This process's start time, in clock ticks after boot."""
    stat = proc_stat(os.getpid())
    assert stat is not None                           # we are running
    return stat[1]
