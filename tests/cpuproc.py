"""CpuProcess: a plain multiprocessing process registered as CPU k, for tests.

The test sends module-level functions to it and gets their results back, so a
scenario can charge on CPU 0 and CPU 1 step by step. (procs.Machine is the real
runtime; this harness only needs what the core library offers.)
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import traceback
from collections.abc import Callable
from typing import Any

import shmcounter
from shmcounter import Arena

_arena: Arena | None = None


def arena() -> Arena:
    """The arena of the CPU process this runs in."""
    assert _arena is not None, "not inside a CpuProcess"
    return _arena


def _serve(name: str, cpu: int | None, pin: int | None, conn) -> None:
    """This runs in a separate process: attach, register, then serve calls."""
    global _arena
    if pin is not None:
        os.sched_setaffinity(0, {pin})
    _arena = Arena.attach(name)
    if cpu is not None:
        shmcounter.register_cpu(_arena, cpu)
    conn.send(("ready", os.getpid()))
    while True:
        msg = conn.recv()
        if msg is None:
            break
        fn, args = msg
        try:
            conn.send(("ok", fn(*args)))
        except BaseException as exc:        # report everything, keep serving
            conn.send(("err", (exc, traceback.format_exc())))
    shmcounter.unregister_cpu()
    _arena.close()
    conn.send(("bye", None))


class CpuProcess:
    def __init__(self, arena: Arena, cpu: int | None, *, method: str = "fork",
                 pin: int | None = None) -> None:
        ctx = mp.get_context(method)
        self.cpu = cpu
        self._conn, child = ctx.Pipe()
        # every start method's context has Process; typeshed's BaseContext does not
        self.process = ctx.Process(target=_serve,  # type: ignore[attr-defined]
                                   args=(arena.name, cpu, pin, child), daemon=True)
        self.process.start()
        child.close()
        kind, self.pid = self._recv(60)
        assert kind == "ready", kind

    def _recv(self, timeout: float) -> tuple[str, Any]:
        if not self._conn.poll(timeout):
            raise TimeoutError(f"CPU {self.cpu} (pid {self.process.pid}) did not answer "
                               f"within {timeout} s")
        return self._conn.recv()

    def call(self, fn: Callable, *args, timeout: float = 60) -> Any:
        self._conn.send((fn, args))
        kind, value = self._recv(timeout)
        if kind == "err":
            exc, tb = value
            raise exc from RuntimeError(f"in CPU {self.cpu}:\n{tb}")
        return value

    def start(self, fn: Callable, *args) -> None:
        """Send a call without waiting; collect it with result()."""
        self._conn.send((fn, args))

    def result(self, timeout: float = 120) -> Any:
        kind, value = self._recv(timeout)
        if kind == "err":
            exc, tb = value
            raise exc from RuntimeError(f"in CPU {self.cpu}:\n{tb}")
        return value

    def close(self) -> None:
        """Clean exit: the CPU drains its stocks, unregisters and exits."""
        if self.process.is_alive():
            try:
                self._conn.send(None)
                self._recv(30)
            except (OSError, EOFError, TimeoutError):
                pass
        self.kill()

    def kill(self) -> None:
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.join(30)
        self._conn.close()

    def __enter__(self) -> CpuProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- operations to run on a CPU (module level, so they pickle) -----------------

def try_charge(name: str, n: int) -> tuple[bool, str | None]:
    ok, fail = arena().counter(name).try_charge(n)
    return ok, None if fail is None else fail.name


def uncharge(name: str, n: int) -> None:
    arena().counter(name).uncharge(n)


def drain_local(name: str) -> int:
    return arena().counter(name).drain_stock_local()


def run_ops(ops: list[tuple[str, str, int]]) -> list[bool]:
    """Run ("charge" | "uncharge", counter, n) steps; returns try_charge results."""
    a = arena()
    results = []
    for op, name, n in ops:
        counter = a.counter(name)
        if op == "charge":
            results.append(counter.try_charge(n)[0])
        else:
            counter.uncharge(n)
    return results
