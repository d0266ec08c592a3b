"""The CPU process: this module's cpu_main runs in a separate process, one per CPU.

    owner (Machine)                     CPU k (cpu_main)
    ---------------                     ----------------
    Process(target=cpu_main) ---------> pin to core, attach, register_cpu(k)
                             <--------- ("ready", pid)
    (task_id, fn, args) --------------> run fn(*args) in the main thread
                             <--------- (task_id, True, result) | (task_id, False, error)
    None -----------------------------> unregister_cpu() (drains its stocks)
                             <--------- ("bye", pid), then exit

Drain requests do not come through the pipe: register_cpu installs a signal
handler, so a drain is served at the next bytecode even in the middle of a long
task (shmcounter/drain.py). A watcher thread kills the process if the owner dies,
so an owner killed with SIGKILL leaves no CPU process behind.
"""
from __future__ import annotations

import faulthandler
import multiprocessing.connection
import os
import pickle
import select
import signal
import threading
import traceback
from typing import Any

from shmcounter import Arena, register_cpu, unregister_cpu
from shmcounter.drain import SIGDRAIN


def cpu_main(arena_name: str, cpu: int, core: int, owner_pid: int, conn: Any) -> None:
    """This runs in a separate process: CPU `cpu` of arena `arena_name`."""
    faulthandler.enable()
    # Ctrl-C in a terminal sends SIGINT to the whole process group: it is the
    # owner's to handle (leaving `with Machine` stops each CPU in order). A CPU
    # that took it would die with a traceback, and go through the hotplug path.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _watch_owner(owner_pid)
    os.sched_setaffinity(0, {core})
    arena = Arena.attach(arena_name)
    register_cpu(arena, cpu)
    # A drain signal may be delivered to any thread that does not block it (a
    # task's own threads); its handler still runs in the main thread, but only
    # when that thread runs bytecode. Idle, it waits on the task pipe and on a
    # wakeup fd that the signal writes to, so it wakes up for it.
    wakeup_r, wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wakeup_w, warn_on_full_buffer=False)
    conn.send(("ready", os.getpid()))
    while True:
        while not conn.poll():
            multiprocessing.connection.wait([conn, wakeup_r])
            _drain_pipe(wakeup_r)
        try:
            msg = conn.recv()
        except EOFError:
            break                                   # the owner closed the pipe
        if msg is None:
            break
        task_id, fn, args = msg
        try:
            reply = (task_id, True, fn(*args))
        except BaseException as exc:                # report everything, keep serving
            reply = (task_id, False, _remote_error(exc))
        try:
            conn.send(reply)
        except Exception as exc:                    # e.g. an unpicklable result
            conn.send((task_id, False, _remote_error(TypeError(
                f"the result of {_describe(fn, args)} could not be sent back: {exc!r}"))))
    unregister_cpu()
    try:
        conn.send(("bye", os.getpid()))
    except OSError:
        pass
    arena.close()


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _remote_error(exc: BaseException) -> tuple[BaseException, str]:
    """The exception (or a picklable stand-in) and its formatted traceback."""
    tb = "".join(traceback.format_exception(exc))
    try:
        pickle.loads(pickle.dumps(exc))         # the owner must be able to rebuild it
        return exc, tb
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc} (not picklable)"), tb


def _describe(fn: Any, args: tuple) -> str:
    name = getattr(fn, "__qualname__", repr(fn))
    return f"{name}({', '.join(repr(a) for a in args)})"


def _watch_owner(owner_pid: int) -> None:
    """Kill this process when the owner dies (SIGKILL of the owner included)."""
    try:
        fd = os.pidfd_open(owner_pid)
    except ProcessLookupError:
        os._exit(1)

    def watch() -> None:
        # Drain requests must interrupt the main thread, never this one.
        signal.pthread_sigmask(signal.SIG_BLOCK, {SIGDRAIN})
        select.select([fd], [], [])
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="owner-watch", daemon=True).start()
