"""Arena: the public face of shmcounter, one shared-memory segment of counters.

Everything about the segment itself (geometry, views, lifetime, the registry lock,
the sweep) is the Segment's (segment.py); this class adds the counters
(page_counter.py), and the CPU-hotplug and repair entry points (hotplug.py,
stop_machine.py). See docs/design.md, "Layers".
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from .errors import ArenaError
from .hotplug import cpu_dead
from .page_counter import PAGE_COUNTER_MAX, PageCounter, calculate_protection, check_limit
from .segment import (
    H_NCOUNTERS,
    MAX_DEPTH,
    PC_MAX,
    PC_PARENT,
    PC_STOCK_ID,
    Segment,
    check_counter_name,
)
from .stop_machine import repair_dead_rows

if TYPE_CHECKING:
    from .stop_machine import Repair


class Arena(Segment):
    """One shared-memory region: header, CPUs, counters, stocks and names.

    Create it once (`Arena.create`), pass `arena.name` (or the Arena itself, which
    pickles by name) to other processes, and `Arena.attach` there. Only the creator
    unlinks. Every handle can be closed at any point, even half-built. A process
    has one handle per arena (attach returns it); once closed, every method and
    property of it and of its counters raises ArenaError("arena <name> is closed"),
    except name, closed, close, unlink and the geometry (ncpus, max_counters,
    max_stocked, nrows).
    """

    # ---- counters -----------------------------------------------------------

    def new_counter(self, name: str, parent: PageCounter | None = None,
                    max: int | None = None) -> PageCounter:
        """Create a counter under `parent` (None: a root) with limit `max`
        (default PAGE_COUNTER_MAX). Names are unique per arena."""
        self._check_open()
        encoded = check_counter_name(name)
        if parent is not None:
            if not isinstance(parent, PageCounter):
                raise TypeError(f"parent must be a PageCounter or None, got "
                                f"{type(parent).__name__}")
            if parent._arena._shm.name != self._shm.name:
                raise ValueError(f"parent {parent.name!r} belongs to arena "
                                 f"{parent._arena._shm.name!r}, not {self._shm.name!r}")
        limit = PAGE_COUNTER_MAX if max is None else check_limit(max, "max")
        if parent is not None and len(parent._path) >= MAX_DEPTH:
            raise ValueError(f"counter {name!r} would be {len(parent._path) + 1} levels "
                             f"deep; the limit is {MAX_DEPTH}")
        self._registry_lock()
        try:
            self._refresh_index()
            if name in self._index:
                raise ValueError(f"a counter named {name!r} already exists in this arena")
            index = self._published()
            if index >= self.max_counters:
                raise ArenaError(f"arena {self._shm.name!r} is full: "
                                 f"{self.max_counters} counters (see max_counters)")
            rec = self.records[index]
            rec[:] = 0
            rec[PC_MAX] = limit
            rec[PC_PARENT] = -1 if parent is None else parent._index
            rec[PC_STOCK_ID] = -1
            self.names[index] = 0
            self.names[index, :len(encoded)] = np.frombuffer(encoded, np.uint8)
            self._slots.store(H_NCOUNTERS, index + 1)     # publish
        finally:
            self._registry_unlock()
        return self.counter(name)

    def counter(self, name: str) -> PageCounter:
        """The counter named `name`, created by any process. KeyError if none."""
        self._check_open()
        if not isinstance(name, str):
            raise TypeError(f"counter name must be a str, got {type(name).__name__}")
        index = self._index.get(name)
        if index is None:
            self._refresh_index()
            index = self._index.get(name)
            if index is None:
                self._check_unpublished()
                raise KeyError(f"no counter named {name!r} in arena {self._shm.name!r}")
        return self._handle(index)

    def _check_unpublished(self) -> None:
        """ArenaCorrupt if a record beyond ncounters shows a counter: a name at index
        ncounters + 1 or later (only the next record, ncounters, is ever written
        before it is published: by a creator that may have died since). Run when a
        name is not found, so that an ncounters word that went down is not taken
        for counters that do not exist. The names are read first: ncounters only
        grows, so a name read before it cannot lie beyond it legitimately."""
        named = np.flatnonzero(self.names.any(axis=1))
        n = self._published()
        beyond = named[named > n]
        if len(beyond):
            raise self._corrupt("header ncounters", n, f"but record {int(beyond[0])} "
                                                       f"beyond it holds a name")

    def counters(self) -> list[PageCounter]:
        """All counters, in creation order."""
        self._check_open()
        return [self._handle(i) for i in range(self._published())]

    def stocked_counters(self) -> Iterator[PageCounter]:
        """Counters that currently have stock."""
        self._check_open()
        return (self._handle(i) for i in range(self._published())
                if self.records[i, PC_STOCK_ID] >= 0)

    # ---- CPU hotplug and repair -----------------------------------------------

    def hotplug_cpu_dead(self, cpu: int) -> dict[str, int]:
        """The CPU-hotplug "dead" callback: repair and reclaim CPU `cpu`.

        Under stop_machine, rolls back the op the dead process left unfinished, runs
        drain_cpu on every counter with stock, and frees the CPU for a new process
        (hotplug.py). The process registered as `cpu` must be dead (or none
        registered). Returns the pages reclaimed, by counter name.
        """
        self._check_open()
        return cpu_dead(self, cpu)

    def repair(self) -> Repair:
        """Repair every dead writer, CPU or not: under stop_machine, roll back the
        op each one left in progress (it counts not at all, at every level) and
        free the rows of dead non-CPU writers (a dead CPU's stock and row are left
        to hotplug_cpu_dead). Returns what it did (stop_machine.Repair).

        Also done, without anyone asking, by a charge about to be refused (then
        retried), by procs.Machine when a writer dies, and by the hotplug path.
        Raises WaitTimeout, having changed nothing, when a live writer stays inside
        an op for wait_timeout seconds (stopped with SIGSTOP): it names its pid.
        """
        self._check_open()
        return repair_dead_rows(self)

    # ---- protection ---------------------------------------------------------

    def calculate_protection(self, root: PageCounter, counter: PageCounter, *,
                             recursive: bool = False) -> None:
        """page_counter_calculate_protection; see page_counter.calculate_protection."""
        self._check_open()
        calculate_protection(root, counter, recursive=recursive)
