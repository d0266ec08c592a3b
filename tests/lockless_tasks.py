"""Steps of the lockless (v4) stock that tests run inside a CpuProcess (module level,
so that they pickle): a drain, and a deposit driven word by word up to a chosen
instant, where the process stops itself (SIGSTOP) for the test to SIGKILL it."""
from __future__ import annotations

import os
import signal

from shmcounter.segment import (
    R_FWD_DELTA,
    R_STOCK_AFTER,
    R_STOCK_BEFORE,
    STOCK_NR,
    V4_PAGES_MASK,
)

from cpuproc import arena


def drain(name: str) -> bool:
    return arena().counter(name).drain_stock()


def stock(name: str, cpu: int) -> int:
    return arena().counter(name).stock(cpu)


def deposit_then_stop(name: str, n: int, cas: bool) -> None:
    """try_charge(n) of a CPU whose stock misses, as _counter.c runs it, stopped
    inside its deposit: the walk of max(batch, n) done, the intent holding E (the
    word) and E + surplus; with `cas`, the CAS done too, but not the forward mark
    (the one instant a hook cannot reach: the C step does both)."""
    a = arena()
    counter = a.counter(name)
    slot, writer, slots = counter._local_slot(), a._writer, a._slots
    charge = counter.batch
    assert charge > n
    with writer.op(counter, slot) as kbase:
        assert counter._try_charge_path(charge, kbase) is None
        row, word = writer.row_slot, slots.load(slot + STOCK_NR)
        slots.store(row + R_FWD_DELTA, charge)
        slots.store(row + R_STOCK_BEFORE, word)
        slots.store(row + R_STOCK_AFTER, word + charge - n)
        if cas:
            assert slots.cas(slot + STOCK_NR, word, word + charge - n) == word
        os.kill(os.getpid(), signal.SIGSTOP)
        raise AssertionError("continued: this task is for a test that kills it")


def take_then_stop(name: str, n: int, cas: bool) -> None:
    """try_charge(n) of a CPU whose word holds more than n pages, as the E14 cap
    runs it after a second context's deposit, stopped inside: the walk of batch
    done, the intent holding E (the word), seq(E) << 34 and the net delta
    batch - surplus - pages(E); with `cas`, the word taken too, but not the
    forward mark."""
    a = arena()
    counter = a.counter(name)
    slot, writer, slots = counter._local_slot(), a._writer, a._slots
    charge = counter.batch
    with writer.op(counter, slot) as kbase:
        assert counter._try_charge_path(charge, kbase) is None
        row, word = writer.row_slot, slots.load(slot + STOCK_NR)
        pages = word & V4_PAGES_MASK
        assert pages > n
        slots.store(row + R_FWD_DELTA, n - pages)
        slots.store(row + R_STOCK_BEFORE, word)
        slots.store(row + R_STOCK_AFTER, word - pages)
        if cas:
            assert slots.cas(slot + STOCK_NR, word, word - pages) == word
        os.kill(os.getpid(), signal.SIGSTOP)
        raise AssertionError("continued: this task is for a test that kills it")
