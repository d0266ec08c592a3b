"""Tasks that tests send to CPU processes (module level, so that they pickle under
fork and forkserver alike). Each takes the arena as an argument: unpickled in the
CPU process it is that process's registered handle, so charges use its stock."""
from __future__ import annotations

import os
import signal
import threading
import time

import shmcounter
from shmcounter import Arena, hooks


def whoami() -> tuple[int | None, int, list[int]]:
    return shmcounter.this_cpu(), os.getpid(), sorted(os.sched_getaffinity(0))


def try_charge(arena: Arena, name: str, n: int) -> tuple[bool, str | None]:
    ok, fail = arena.counter(name).try_charge(n)
    return ok, None if fail is None else fail.name


def charge_each(arena: Arena, names: list[str], n: int) -> list[bool]:
    return [arena.counter(name).try_charge(n)[0] for name in names]


def uncharge(arena: Arena, name: str, n: int) -> None:
    arena.counter(name).uncharge(n)


def drain(arena: Arena, name: str, trylock: bool = False) -> bool:
    return arena.counter(name).drain_stock(trylock=trylock)


def stock(arena: Arena, name: str) -> int:
    cpu = shmcounter.this_cpu()
    assert cpu is not None                       # a task for CPU processes
    return arena.counter(name).stock(cpu)


def busy(seconds: float) -> int:
    """A long task that never touches a counter: pure Python for `seconds`."""
    deadline = time.monotonic() + seconds
    spins = 0
    while time.monotonic() < deadline:
        spins += 1
    return spins


def charge_loop(arena: Arena, name: str, seconds: float) -> int:
    """Charge and uncharge one page in a tight loop; returns the iterations."""
    counter = arena.counter(name)
    deadline = time.monotonic() + seconds
    spins = 0
    while time.monotonic() < deadline:
        if counter.try_charge(1)[0]:
            counter.uncharge(1)
        spins += 1
    return spins


def fail() -> None:
    raise KeyError("no such page")


def crash() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def park_at(point: str, skip: int = 0) -> None:
    """Arm kill point `point`: the (skip+1)-th time it is reached, this process
    stops itself (SIGSTOP) right there, for the test to SIGKILL it."""
    seen = [0]

    def stop(name: str) -> None:
        seen[0] += 1
        if seen[0] == skip + 1:
            os.kill(os.getpid(), signal.SIGSTOP)

    hooks.install(point, stop)


def hold_slot_lock_and_stop(arena: Arena, name: str) -> None:
    """A nested context of this CPU holds its slot lock of `name`, and stops there."""
    counter = arena.counter(name)
    assert arena._slots.stock_trylock(counter._local_slot(), os.getpid())
    os.kill(os.getpid(), signal.SIGSTOP)


def two_contexts_both_miss(arena: Arena, name: str) -> int:
    """Scenario 15: two threads of one CPU both miss the fast path. The first is
    parked before its deposit until the second has missed too (no sleeps).
    Returns the stock after both."""
    counter = arena.counter(name)
    first_parked, second_missed = threading.Event(), threading.Event()

    def at_deposit(point: str) -> None:
        if threading.current_thread().name == "first":
            first_parked.set()
            assert second_missed.wait(30)

    def at_slow(point: str) -> None:
        if threading.current_thread().name == "second":
            second_missed.set()

    hooks.install("charge:deposit", at_deposit)
    hooks.install("charge:slow", at_slow)
    try:
        first = threading.Thread(target=counter.try_charge, args=(1,), name="first")
        second = threading.Thread(target=counter.try_charge, args=(1,), name="second")
        first.start()
        assert first_parked.wait(30)
        second.start()
        first.join()
        second.join()
    finally:
        hooks.clear()
    cpu = shmcounter.this_cpu()
    assert cpu is not None                       # a task for CPU processes
    return counter.stock(cpu)


def wait_stopped(pid: int, timeout: float = 30.0) -> None:
    """Wait until process `pid` is stopped (state T), e.g. parked at a kill point."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        if stat[stat.rindex(b")") + 2:stat.rindex(b")") + 3] in (b"T", b"t"):
            return
        time.sleep(0.001)
    raise TimeoutError(f"pid {pid} did not stop within {timeout} s")


def park_then_raise_at(point: str) -> None:
    """Arm `point`: stop there (SIGSTOP); once continued, raise, as a signal
    handler's exception would, inside the op."""
    def stop_then_raise(name: str) -> None:
        hooks.clear()
        os.kill(os.getpid(), signal.SIGSTOP)
        raise KeyboardInterrupt(name)

    hooks.install(point, stop_then_raise)
