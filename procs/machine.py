"""Machine: one process per CPU, work_on_cpu, and the CPU-hotplug dead path.

    caller threads              monitor thread (owner)            CPU processes
    --------------              ----------------------            -------------
    submit(k, fn) -> Future --------------------------------->   cpu_main: fn(*args)
                                 wait([replies, sentinels,  <---  (task_id, result)
                                       writers' pidfds,
                                       wakeup pipe], 0.15 s)
    Future.set_result <--------  reply
                                 sentinel of k fires (any death: kill, kill -9
                                 from a shell, a crash):
                                   1. arena.hotplug_cpu_dead(k): repair under
                                      stop_machine, drain_cpu on every stock
                                   2. k leaves online
                                   3. k's pending futures fail with CpuDead
    kill(k) waits for step 3 <-  offline event of k
                                 pidfd of another writer fires (a process that
                                 is not one of our CPUs and claimed a writer row):
                                   arena.repair(), if its row still names it
    wait_repaired(pid) <-------  the Repair, by pid

Death is detected from process sentinels in one wait(), not by polling. A CPU
that stops on purpose (close) first sends "bye", so a clean stop is never taken
for a death. Unlike a broken ProcessPoolExecutor, a Machine stays usable when a
CPU dies: only that CPU goes offline, and start_cpu brings it back.

Other writers. Any process that attaches to the arena and charges claims a
writer row (shmcounter/writer.py); killed inside a charge, it leaves its op half
applied until someone repairs it. The monitor watches them too: every
WRITER_SCAN_INTERVAL (its wait's timeout) it rescans the row table, since rows
are claimed at any time, and opens a pidfd (os.pidfd_open, which works on any
process, not only children) on the owner of each row that is not one of this
Machine's CPUs; a pidfd becomes readable when its process exits, in the same
wait() as the sentinels. When one fires and the row still names that process,
the monitor runs arena.repair(): the dead op is rolled back and the row freed.
An owner found dead by the rescan itself (it died between two scans) is
repaired at once. A CPU row of a process this Machine did not start gets its op
rolled back the same way; its stock and registration are left to its own
owner's hotplug_cpu_dead.

Failures. The monitor keeps the guards of CPython's process pool: a future is
set running (set_running_or_notify_cancel) when its task goes into the pipe, so
it cannot be cancelled under the monitor's feet, and setting a result tolerates
InvalidStateError. A monitor that fails anyway (an error nobody expected) marks
the Machine broken, fails every pending future with BrokenMachine and wakes every
waiter (kill, wait_offline, wait_repaired, close); close then kills every CPU
and runs the hotplug-dead path itself. kill and close take a deadline, and the
stop_machine they depend on has one too (arena.wait_timeout): nothing waits
forever on a stopped or lost process.
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
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

from shmcounter import Arena, Repair
from shmcounter.drain import check_timeout
from shmcounter.proc import pid_alive
from shmcounter.segment import R_PID, R_START

from .errors import BrokenMachine, CpuDead
from .worker import _describe, cpu_main

log = logging.getLogger("procs")

# Seconds a starting CPU may take to register, and a stopping one to exit,
# before it is killed. Generous: forkserver start-up on a loaded 2-core machine.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
# Seconds kill() waits for the hotplug-dead path: more than arena.wait_timeout
# (10 s by default), so that a stop_machine that cannot quiesce is reported as
# such (the hotplug error) rather than as a kill that timed out.
KILL_TIMEOUT = 60.0
# Seconds close() may take in all: STOP_TIMEOUT for the CPUs to stop cleanly,
# then KILL_TIMEOUT for the hotplug-dead path of those that had to be killed.
CLOSE_TIMEOUT = STOP_TIMEOUT + KILL_TIMEOUT
# Seconds between two rescans of the writer rows for new writers to watch: a
# writer that dies sooner after claiming its row is repaired at the next rescan.
# Shorter costs the monitor more wakeups (each reads the row table).
WRITER_SCAN_INTERVAL = 0.15
# Deaths of writers whose Repair wait_repaired() can still return: the latest ones.
REPAIRS_KEPT = 1024


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
    themselves. While it runs, it also repairs every other writer of the arena
    that dies (see the module docstring).
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
        # Set once, by a monitor that failed (_break); guarded by _lock.
        self._broken: BrokenMachine | None = None
        # Notified when a writer's death is handled, or the Machine breaks.
        self._changed = threading.Condition(self._lock)
        # {pid: Repair} of the latest dead writers the monitor handled, e.g.
        # {4711: Repair(rows=(3,), pids=(4711,), ops=(3,), pages={'leaf': 10})}.
        # Guarded by _lock.
        self._repairs: OrderedDict[int, Repair] = OrderedDict()
        # {pidfd: (row, pid, start)} of the other writers watched, e.g.
        # {17: (3, 4711, 889912)}. The monitor thread's alone.
        self._writers: dict[int, tuple[int, int, int]] = {}
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
            broken = " broken" if self._broken is not None else ""
        return f"<Machine{broken} online={set(online) or '{}'} dead={set(dead) or '{}'}>"

    def _check_broken(self) -> None:
        """Raise BrokenMachine if the monitor failed. Under _lock."""
        if self._broken is not None:
            raise BrokenMachine(str(self._broken)) from self._broken.__cause__

    # ---- starting and stopping CPUs -----------------------------------------

    def _spawn(self, cpu: int) -> None:
        c = self._cpus[cpu]
        owner_end, cpu_end = self._ctx.Pipe()
        core = self._cores[cpu % len(self._cores)]
        # every start method's context has Process; typeshed's BaseContext does not
        process = self._ctx.Process(  # type: ignore[attr-defined]
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
            self._check_broken()
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

    def kill(self, cpu: int, timeout: float = KILL_TIMEOUT) -> dict[str, int]:
        """SIGKILL CPU `cpu`'s process; return once the hotplug-dead path has run
        (its stocks reclaimed, it has left `online`). Returns the pages reclaimed
        by counter name.

        Raises TimeoutError naming the CPU and pid if the hotplug-dead path has not
        finished within `timeout` seconds (it goes on: wait_offline), RuntimeError
        if it failed, and BrokenMachine if the monitor failed (close() then
        reclaims the CPU)."""
        c = self._cpu(cpu)
        check_timeout(timeout, "timeout")
        with self._lock:
            self._check_broken()
            if c.state != "online":
                raise ValueError(f"CPU {cpu} is not online ({c.state})")
            pid = c.pid
        os.kill(pid, signal.SIGKILL)
        if not c.offline.wait(timeout):
            raise TimeoutError(f"CPU {cpu} (pid {pid}) was killed, but its hotplug-dead path "
                               f"has not finished within {timeout} s; m.wait_offline({cpu}) "
                               f"waits for it")
        with self._lock:
            if c.state != "offline":             # woken by _break, not by its death
                self._check_broken()
        if c.hotplug_error is not None:
            raise RuntimeError(f"CPU {cpu} (pid {pid}) is dead but its hotplug-dead path "
                               f"failed; its stocks are not reclaimed") from c.hotplug_error
        return dict(c.reclaimed)

    def wait_offline(self, cpu: int, timeout: float | None = None) -> None:
        """Wait until CPU `cpu` is offline and its hotplug-dead path has run (for a
        CPU killed from outside, e.g. kill -9 from a shell). TimeoutError if not
        within `timeout` seconds; BrokenMachine if the monitor failed first."""
        c = self._cpu(cpu)
        if timeout is not None:
            check_timeout(timeout, "timeout")
        if not c.offline.wait(timeout):
            raise TimeoutError(f"CPU {cpu} (pid {c.pid}) is still online "
                               f"after {timeout} s")
        with self._lock:
            if c.state != "offline":
                self._check_broken()

    def wait_repaired(self, pid: int, timeout: float | None = None) -> Repair:
        """Wait until the monitor has handled the death of writer `pid`, a process
        that is not one of this Machine's CPUs and claimed a writer row of the
        arena (it charged or uncharged): its op in progress, if any, is rolled back
        and its row is free. Returns the Repair the monitor ran (an empty one if
        another process, a refused charge say, had repaired it first).

        A writer that released its row before it died (Arena.close) is seen only
        if a rescan found it first. TimeoutError if not within `timeout` seconds;
        BrokenMachine if the monitor failed first."""
        if type(pid) is not int or pid <= 0:
            raise ValueError(f"pid must be a positive int, got {pid!r}")
        if timeout is not None:
            check_timeout(timeout, "timeout")
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._changed:
            while pid not in self._repairs:
                self._check_broken()
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"no death of writer pid {pid} was handled within "
                                       f"{timeout} s (alive, or it never claimed a row)")
                self._changed.wait(left)
            return self._repairs[pid]

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Stop every CPU cleanly (it drains its stocks and unregisters), join it,
        and stop the monitor. A CPU that does not stop in STOP_TIMEOUT is killed
        and goes through the hotplug path. On a broken Machine every CPU is killed
        and its hotplug-dead path runs here. Safe to call twice.

        Raises TimeoutError naming each CPU (and pid) that has not gone offline
        within `timeout` seconds (its hotplug-dead path goes on in the monitor);
        every CPU process is killed and joined all the same."""
        check_timeout(timeout, "timeout")
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._closing:
                return
            self._closing = True
            stopping = [c for c in self._cpus.values() if c.state == "online"]
            for c in stopping:
                c.state = "stopping"
            broken = self._broken is not None
        atexit.unregister(self.close)
        late: list[_Cpu] = []
        if not broken:
            for c in stopping:
                try:
                    with c.send_lock:
                        c.conn.send(None)
                except OSError:
                    pass                              # it is dying: the monitor handles it
            for c in stopping:
                if not c.offline.wait(_left(deadline, STOP_TIMEOUT)):
                    _kill(c, reason=f"did not stop within {STOP_TIMEOUT} s")
            late = [c for c in stopping if not c.offline.wait(_left(deadline))]
            self._wakeup_w.send(b"")
            self._monitor.join(_left(deadline))
        if self._broken is not None:
            self._reclaim_broken()
            self._monitor.join(_left(deadline))       # it is on its way out
            late = []
        # A monitor still running (late) uses the pipes until it is done: they
        # are closed with their objects then.
        done = not self._monitor.is_alive()
        self._kill_all(reason="machine closed", close_pipes=done)
        if done:
            self._wakeup_r.close()
            self._wakeup_w.close()
        if late:
            cpus = " and ".join(f"CPU {c.cpu} (pid {c.pid})" for c in late)
            raise TimeoutError(f"{cpus} did not go offline within {timeout} s: the "
                               f"hotplug-dead path has not finished; every CPU process "
                               f"is killed")

    def _reclaim_broken(self) -> None:
        """Close of a broken Machine: nobody runs the hotplug-dead path when a CPU
        dies, so kill every CPU process and run it here for each CPU whose
        registration still stands (it did not unregister before it died)."""
        for c in self._cpus.values():
            if c.process is None:
                continue
            _kill(c, reason="broken machine")
            c.process.join()
            try:
                if not self.arena.closed and self.arena.cpu_pid(c.cpu) == c.pid:
                    c.reclaimed = self.arena.hotplug_cpu_dead(c.cpu)
            except Exception:
                log.exception("CPU %d (pid %d): the hotplug-dead path failed", c.cpu, c.pid)
            with self._lock:
                c.state = "offline"

    def _kill_all(self, reason: str, close_pipes: bool = True) -> None:
        for c in self._cpus.values():
            if c.process is not None:
                _kill(c, reason)
                c.process.join()
            if close_pipes and c.conn is not None:
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
        own exception (remote traceback as __cause__) if it raises. It is running
        from the start: cancel() returns False. fn and args must be picklable: a
        module-level function. BrokenMachine if the monitor failed."""
        c = self._cpu(cpu)
        future: Future = Future()
        desc = _describe(fn, args)
        with self._lock:
            self._check_broken()
            if c.state != "online":
                future.set_exception(CpuDead(
                    f"CPU {cpu} is {c.state}; call m.start_cpu({cpu}) first", cpu, c.pid))
                return future
            task_id = next(self._task_ids)
            c.pending[task_id] = (future, desc)
            conn = c.conn
            # The task goes into the CPU's pipe now and cannot be taken back: the
            # future runs from here on, so cancel() returns False (a process pool's
            # work item in its call queue). Nobody else holds it yet: never False.
            future.set_running_or_notify_cancel()
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
        """The monitor thread. It catches everything: a monitor that fails marks the
        Machine broken and wakes everyone (_break), instead of dying silently and
        leaving kill and close to wait forever."""
        try:
            self._monitor_body()
        except BaseException as exc:
            log.exception("the monitor of the Machine on arena %r failed", self.arena.name)
            self._break(exc)
        finally:
            for fd in self._writers:
                os.close(fd)
            self._writers.clear()

    def _monitor_body(self) -> None:
        """Route replies to futures; run the hotplug-dead path when a CPU dies, and
        repair when another writer dies."""
        next_scan = 0.0
        while True:
            if time.monotonic() >= next_scan:
                self._scan_writers()
                next_scan = time.monotonic() + WRITER_SCAN_INTERVAL
            with self._lock:
                if self._closing and all(c.state not in ("online", "stopping")
                                         for c in self._cpus.values()):
                    return
                # {waitable: what fired}: the wakeup pipe (None), a reply pipe or a
                # process sentinel ((cpu, its process)), a writer's pidfd (its fd)
                watched: dict[Any, tuple[_Cpu, Any] | int | None] = {self._wakeup_r: None}
                for c in self._cpus.values():
                    if c.state in ("online", "stopping"):
                        watched[c.process.sentinel] = (c, c.process)
                        watched[c.conn] = (c, c.process)
            for fd in self._writers:
                watched[fd] = fd
            for ready in mp.connection.wait(list(watched),
                                            max(0.0, next_scan - time.monotonic())):
                entry = watched[ready]
                if entry is None:
                    self._wakeup_r.recv()
                    continue
                if isinstance(entry, int):
                    self._writer_exited(entry)
                    continue
                c, process = entry
                if c.process is not process or c.state not in ("online", "stopping"):
                    continue                         # handled already, or restarted
                if ready is c.conn:
                    self._read_replies(c)
                else:
                    self._cpu_exited(c)

    def _break(self, cause: BaseException) -> None:
        """The monitor failed. As a broken process pool, in this order:
          1. mark the Machine broken, so that submit, kill, start_cpu and the
             waits fail at once;
          2. fail every pending future with BrokenMachine, `cause` as __cause__;
          3. wake every waiter: kill, wait_offline, close (offline events) and
             wait_repaired (the condition).
        The CPU processes are left running (nobody would reclaim one that dies):
        close() kills them and runs their hotplug-dead path."""
        message = (f"the monitor of this Machine failed ({type(cause).__name__}: {cause}): "
                   f"deaths are no longer handled; close() it, which kills and reclaims "
                   f"every CPU")
        with self._changed:
            self._broken = BrokenMachine(message)
            self._broken.__cause__ = cause
            pending = [(c, p) for c in self._cpus.values() for p in c.pending.values()]
            for c in self._cpus.values():
                c.pending = {}
            self._changed.notify_all()
        for c, (future, desc) in pending:
            exc = BrokenMachine(f"{desc} on CPU {c.cpu} (pid {c.pid}) will get no reply: "
                                f"{message}")
            exc.__cause__ = cause
            _set_exception(future, exc)
        for c in self._cpus.values():
            c.offline.set()

    # ---- other writers ------------------------------------------------------

    def _scan_writers(self) -> None:
        """Watch the owner of every writer row that is not one of our CPUs: a
        pidfd on each live one; an owner found dead is repaired at once. A row whose
        owner changed since (released, claimed again) is watched anew."""
        arena = self.arena
        if arena.closed:
            return
        owners = arena.rows[:, [R_PID, R_START]].tolist()    # rows change while we look
        for fd, (row, pid, start) in list(self._writers.items()):
            if owners[row] != [pid, start]:
                del self._writers[fd]
                os.close(fd)
        watched = set(self._writers.values())
        me = os.getpid()
        for row, (pid, start) in enumerate(owners):
            if pid in (0, me) or row in self._cpus or (row, pid, start) in watched:
                continue
            if start == 0:                        # being claimed: its start follows
                if not pid_alive(pid):
                    self._writer_dead(row, pid, start)
                continue
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                self._writer_dead(row, pid, start)
                continue
            if pid_alive(pid, start):             # the fd is that very process
                self._writers[fd] = (row, pid, start)
            else:
                os.close(fd)
                self._writer_dead(row, pid, start)

    def _writer_exited(self, fd: int) -> None:
        """The pidfd of a watched writer is readable: its process exited."""
        row, pid, start = self._writers.pop(fd)
        os.close(fd)
        self._writer_dead(row, pid, start)

    def _writer_dead(self, row: int, pid: int, start: int) -> None:
        """Writer `pid` of row `row` is dead: repair, if its row still names it
        (a process that released its row, or one repaired already, needs none).
        A repair that fails (a live writer stopped inside an op: TimeoutError) is
        logged; the next rescan finds the row and tries again."""
        arena = self.arena
        repair = Repair()
        if not arena.closed and arena.rows[row, [R_PID, R_START]].tolist() == [pid, start]:
            try:
                repair = arena.repair()
            except Exception:
                log.exception("writer row %d (pid %d) is dead, and its repair failed; "
                              "retried at the next rescan", row, pid)
                return
        with self._changed:
            for dead in {pid, *repair.pids}:
                self._repairs[dead] = repair
                self._repairs.move_to_end(dead)
            while len(self._repairs) > REPAIRS_KEPT:
                self._repairs.popitem(last=False)
            self._changed.notify_all()

    # ---- replies and deaths of CPUs -------------------------------------------

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
            _set_result(future, payload)
        else:
            exc, tb = payload
            exc.__cause__ = _RemoteTraceback(tb)
            _set_exception(future, exc)

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
            _set_exception(future, CpuDead(
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


def _set_result(future: Future, result: Any) -> None:
    """Set a future's result, unless it is done already (cancelled by a caller, or
    failed by _break): set it and catch InvalidStateError, rather than test first
    and race with whoever changes it in between."""
    try:
        future.set_result(result)
    except InvalidStateError:
        pass


def _set_exception(future: Future, exc: BaseException) -> None:
    """Set a future's exception, unless it is done already (see _set_result)."""
    try:
        future.set_exception(exc)
    except InvalidStateError:
        pass


def _left(deadline: float, cap: float | None = None) -> float:
    """Seconds left until `deadline` (never negative), at most `cap`."""
    left = max(0.0, deadline - time.monotonic())
    return left if cap is None else min(left, cap)
