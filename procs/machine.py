"""Machine: one process per CPU, work_on_cpu, and the CPU-hotplug dead path.

    caller threads              monitor thread (owner)            CPU processes
    --------------              ----------------------            -------------
    submit(k, fn) -> Future --------------------------------->   cpu_main: fn(*args)
                                 wait([replies, sentinels,  <---  (task_id, result)
                                       wakeup pipe])
    Future.set_result <--------  reply
                                 sentinel of k fires (any death: kill, kill -9
                                 from a shell, a crash):
                                   1. arena.hotplug_cpu_dead(k): repair under
                                      stop_machine, drain_cpu on every stock
                                   2. k leaves online
                                   3. k's pending futures fail with CpuDead
    kill(k) waits for step 3 <-  offline event of k

Death is detected from process sentinels in one wait(), not by polling. A CPU
that stops on purpose (close) first sends "bye", so a clean stop is never taken
for a death. Unlike a broken ProcessPoolExecutor, a Machine stays usable when a
CPU dies: only that CPU goes offline, and start_cpu brings it back.
"""
from __future__ import annotations

import atexit
import itertools
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

from shmcounter import Arena

from .errors import CpuDead
from .worker import _describe, cpu_main

log = logging.getLogger("procs")

# Seconds a starting CPU may take to register, and a stopping one to exit,
# before it is killed. Generous: forkserver start-up on a loaded 2-core machine.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


@dataclass
class _Cpu:
    """Owner-side state of one CPU. Fields are guarded by Machine._lock."""
    cpu: int
    process: Any = None                       # multiprocessing.Process
    conn: Any = None                          # owner end of the task pipe
    pid: int = 0
    state: str = "offline"                    # "starting" | "online" | "stopping" | "offline"
    said_bye: bool = False                    # stopped on purpose, not a death
    pending: dict[int, tuple[Future, str]] = field(default_factory=dict)   # {7: (<Future>, "f(1)")}
    offline: threading.Event = field(default_factory=threading.Event)
    reclaimed: dict[str, int] = field(default_factory=dict)                # last hotplug's pages
    hotplug_error: Exception | None = None    # what the last hotplug-dead path raised
    send_lock: threading.Lock = field(default_factory=threading.Lock)


class Machine:
    """`ncpus` CPU processes on `arena`, each pinned to one core (CPU k on the
    (k mod n)-th core this process may use), started with `start_method`
    ("fork", "forkserver" or "spawn"; default: multiprocessing's).

    Use it as a context manager: leaving the block stops every CPU (each drains its
    stocks and unregisters) and joins it. If the owner dies, its CPUs kill
    themselves.
    """

    def __init__(self, arena: Arena, ncpus: int | None = None, *,
                 start_method: str | None = None) -> None:
        ncpus = arena.ncpus if ncpus is None else ncpus
        if type(ncpus) is not int or not 1 <= ncpus <= arena.ncpus:
            raise ValueError(f"ncpus must be an int in [1, {arena.ncpus}] (the arena's "
                             f"CPUs), got {ncpus!r}")
        self.arena = arena
        self._ctx = mp.get_context(start_method)
        self._cores = sorted(os.sched_getaffinity(0))
        self._cpus = {cpu: _Cpu(cpu) for cpu in range(ncpus)}
        self._lock = threading.Lock()
        self._task_ids = itertools.count(1)
        self._closing = False
        self._wakeup_r, self._wakeup_w = self._ctx.Pipe(duplex=False)
        self._monitor = threading.Thread(target=self._monitor_loop, name="machine-monitor",
                                         daemon=True)
        try:
            for cpu in self._cpus:
                self._spawn(cpu)
            for cpu in self._cpus:
                self._await_ready(cpu)
        except BaseException:
            self._kill_all(reason="start failed")
            raise
        self._monitor.start()
        atexit.register(self.close)

    # ---- state --------------------------------------------------------------

    @property
    def online(self) -> frozenset[int]:
        """The CPUs whose process is running and registered."""
        with self._lock:
            return frozenset(c.cpu for c in self._cpus.values() if c.state == "online")

    def pid(self, cpu: int) -> int:
        """OS pid of CPU `cpu`'s current (or last) process."""
        return self._cpu(cpu).pid

    def _cpu(self, cpu: int) -> _Cpu:
        if type(cpu) is not int or cpu not in self._cpus:
            raise ValueError(f"cpu must be an int in [0, {len(self._cpus)}), got {cpu!r}")
        return self._cpus[cpu]

    def __repr__(self) -> str:
        with self._lock:
            online = sorted(c.cpu for c in self._cpus.values() if c.state == "online")
            dead = sorted(c.cpu for c in self._cpus.values() if c.state != "online")
        return f"<Machine online={set(online) or '{}'} dead={set(dead) or '{}'}>"

    # ---- starting and stopping CPUs -----------------------------------------

    def _spawn(self, cpu: int) -> None:
        c = self._cpus[cpu]
        owner_end, cpu_end = self._ctx.Pipe()
        core = self._cores[cpu % len(self._cores)]
        process = self._ctx.Process(
            target=cpu_main, args=(self.arena.name, cpu, core, os.getpid(), cpu_end),
            name=f"shmcounter-cpu{cpu}", daemon=True)
        process.start()
        cpu_end.close()
        c.process, c.conn, c.said_bye, c.pid = process, owner_end, False, process.pid
        c.offline.clear()

    def _await_ready(self, cpu: int) -> None:
        c = self._cpus[cpu]
        if not c.conn.poll(START_TIMEOUT):
            raise RuntimeError(f"CPU {cpu} (pid {c.pid}) did not start within "
                               f"{START_TIMEOUT} s; see its stderr")
        try:
            kind, pid = c.conn.recv()
        except EOFError:
            c.process.join(1)
            raise RuntimeError(f"CPU {cpu} (pid {c.pid}) died while starting: exit code "
                               f"{_exit_code(c.process.exitcode)}; see its stderr") from None
        assert kind == "ready" and pid == c.pid, (kind, pid)
        with self._lock:
            c.state = "online"

    def start_cpu(self, cpu: int) -> None:
        """Bring dead CPU `cpu` back online with a new process and a clean stock."""
        c = self._cpu(cpu)
        with self._lock:
            if self._closing:
                raise RuntimeError("the Machine is closed")
            if c.state != "offline":
                raise ValueError(f"CPU {cpu} is {c.state} (pid {c.pid}); only an offline "
                                 f"CPU can be started")
            c.state = "starting"
        try:
            self._spawn(cpu)
            self._await_ready(cpu)
        except BaseException:
            with self._lock:
                c.state = "offline"
            if c.process is not None and c.process.is_alive():
                c.process.kill()
            raise
        self._wakeup_w.send(b"")

    def kill(self, cpu: int) -> dict[str, int]:
        """SIGKILL CPU `cpu`'s process; return once the hotplug-dead path has run
        (its stocks reclaimed, it has left `online`). Returns the pages reclaimed
        by counter name."""
        c = self._cpu(cpu)
        with self._lock:
            if c.state != "online":
                raise ValueError(f"CPU {cpu} is not online ({c.state})")
            pid = c.pid
        os.kill(pid, signal.SIGKILL)
        c.offline.wait()
        if c.hotplug_error is not None:
            raise RuntimeError(f"CPU {cpu} (pid {pid}) is dead but its hotplug-dead path "
                               f"failed; its stocks are not reclaimed") from c.hotplug_error
        return dict(c.reclaimed)

    def wait_offline(self, cpu: int, timeout: float | None = None) -> None:
        """Wait until CPU `cpu` is offline and its hotplug-dead path has run (for a
        CPU killed from outside, e.g. kill -9 from a shell). TimeoutError if not
        within `timeout` seconds."""
        if not self._cpu(cpu).offline.wait(timeout):
            raise TimeoutError(f"CPU {cpu} (pid {self._cpus[cpu].pid}) is still online "
                               f"after {timeout} s")

    def close(self) -> None:
        """Stop every CPU cleanly (it drains its stocks and unregisters), join it,
        and stop the monitor. A CPU that does not stop in STOP_TIMEOUT is killed
        and goes through the hotplug path. Safe to call twice."""
        with self._lock:
            if self._closing:
                return
            self._closing = True
            stopping = [c for c in self._cpus.values() if c.state == "online"]
            for c in stopping:
                c.state = "stopping"
        atexit.unregister(self.close)
        for c in stopping:
            try:
                with c.send_lock:
                    c.conn.send(None)
            except OSError:
                pass                                  # it is dying: the monitor handles it
        for c in stopping:
            if not c.offline.wait(STOP_TIMEOUT):
                _kill(c, reason=f"did not stop within {STOP_TIMEOUT} s")
                c.offline.wait()
        self._wakeup_w.send(b"")
        self._monitor.join()
        self._kill_all(reason="machine closed")
        self._wakeup_r.close()
        self._wakeup_w.close()

    def _kill_all(self, reason: str) -> None:
        for c in self._cpus.values():
            if c.process is not None:
                _kill(c, reason)
                c.process.join()
            if c.conn is not None:
                c.conn.close()
                c.conn = None

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- work_on_cpu --------------------------------------------------------

    def submit(self, cpu: int, fn: Callable[..., Any], *args: Any) -> Future:
        """Run fn(*args) on CPU `cpu` (in its process, where this_cpu() == cpu).
        The Future fails with CpuDead if the CPU dies first, and with the task's
        own exception (remote traceback as __cause__) if it raises. fn and args
        must be picklable: a module-level function."""
        c = self._cpu(cpu)
        future: Future = Future()
        desc = _describe(fn, args)
        with self._lock:
            if c.state != "online":
                future.set_exception(CpuDead(
                    f"CPU {cpu} is {c.state}; call m.start_cpu({cpu}) first", cpu, c.pid))
                return future
            task_id = next(self._task_ids)
            c.pending[task_id] = (future, desc)
            conn = c.conn
        try:
            with c.send_lock:
                conn.send((task_id, fn, args))
        except (OSError, ValueError):
            pass                          # the CPU is dying; its death fails the future
        except Exception as exc:          # pickling
            with self._lock:
                c.pending.pop(task_id, None)
            raise TypeError(f"cannot send {desc} to CPU {cpu}: {exc}. fn and its "
                            f"arguments must be picklable (a module-level function)") from exc
        return future

    def run_on(self, cpu: int, fn: Callable[..., Any], *args: Any) -> Any:
        """Like work_on_cpu: run fn(*args) on CPU `cpu` and return its result."""
        return self.submit(cpu, fn, *args).result()

    # ---- the monitor thread -------------------------------------------------

    def _monitor_loop(self) -> None:
        """Route replies to futures; run the hotplug-dead path when a CPU dies."""
        while True:
            with self._lock:
                if self._closing and all(c.state not in ("online", "stopping")
                                         for c in self._cpus.values()):
                    return
                # {waitable: (cpu, its process)}: a reply pipe or a process sentinel
                watched: dict[Any, tuple[_Cpu, Any] | None] = {self._wakeup_r: None}
                for c in self._cpus.values():
                    if c.state in ("online", "stopping"):
                        watched[c.process.sentinel] = (c, c.process)
                        watched[c.conn] = (c, c.process)
            for ready in mp.connection.wait(list(watched)):
                entry = watched[ready]
                if entry is None:
                    self._wakeup_r.recv()
                    continue
                c, process = entry
                if c.process is not process or c.state not in ("online", "stopping"):
                    continue                         # handled already, or restarted
                if ready is c.conn:
                    self._read_replies(c)
                else:
                    self._cpu_exited(c)

    def _read_replies(self, c: _Cpu) -> None:
        try:
            while c.conn is not None and c.conn.poll():
                self._reply(c, c.conn.recv())
        except (EOFError, OSError):
            pass                                     # its sentinel follows
        except Exception:                            # a reply that does not unpickle
            log.exception("CPU %d (pid %d) sent a reply that cannot be read", c.cpu, c.pid)

    def _reply(self, c: _Cpu, msg: tuple) -> None:
        if msg[0] == "bye":
            c.said_bye = True
            return
        task_id, ok, payload = msg
        with self._lock:
            future, _ = c.pending.pop(task_id, (None, None))
        if future is None:
            return
        if ok:
            future.set_result(payload)
        else:
            exc, tb = payload
            exc.__cause__ = _RemoteTraceback(tb)
            future.set_exception(exc)

    def _cpu_exited(self, c: _Cpu) -> None:
        """The process of CPU c exited. Replies it sent first are delivered first."""
        self._read_replies(c)
        c.process.join()
        reclaimed: dict[str, int] = {}
        c.hotplug_error = None
        if not c.said_bye:
            try:
                reclaimed = self.arena.hotplug_cpu_dead(c.cpu)
            except Exception as exc:            # the CPU still goes offline: no hang
                log.exception("CPU %d (pid %d): the hotplug-dead path failed", c.cpu, c.pid)
                c.hotplug_error = exc
        with self._lock:
            c.state = "offline"
            pending, c.pending = c.pending, {}
            others = sorted(o.cpu for o in self._cpus.values()
                            if o.state == "online" and o is not c)
        c.reclaimed = reclaimed
        code = _exit_code(c.process.exitcode)
        pages = sum(reclaimed.values())
        for future, desc in pending.values():
            future.set_exception(CpuDead(
                f"CPU {c.cpu} (pid {c.pid}) died while running {desc}: exit code {code}.\n"
                f"Its stocks were reclaimed ({pages} pages from {len(reclaimed)} "
                f"counters); CPUs {others} are unaffected.\n"
                f"Resubmit on an online CPU, or call m.start_cpu({c.cpu}).", c.cpu, c.pid))
        if c.conn is not None:
            c.conn.close()
            c.conn = None
        c.offline.set()


class _RemoteTraceback(Exception):
    def __init__(self, tb: str) -> None:
        super().__init__(tb)

    def __str__(self) -> str:
        return f'\n"""\n{self.args[0]}"""'


def _exit_code(code: int | None) -> str:
    """-9 -> 'SIGKILL(-9)', as loky writes it."""
    if code is not None and code < 0:
        try:
            return f"{signal.Signals(-code).name}({code})"
        except ValueError:
            pass
    return str(code)


def _kill(c: _Cpu, reason: str) -> None:
    """SIGKILL c's process if it still runs; `reason` says why, for the record."""
    if c.process is not None and c.process.is_alive():
        log.warning("killing CPU %d (pid %d): %s", c.cpu, c.process.pid, reason)
        os.kill(c.process.pid, signal.SIGKILL)
