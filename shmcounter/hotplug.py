"""CPU hotplug, the "dead" path (memcg_hotplug_cpu_dead): a CPU process died;
repair, reclaim its per-CPU state, and free the CPU for a new process.

Under stop_machine (stop_machine.py): every subsystem checks the words it will
trust (cpuhp.CpuSubsystem.check_dead) before anything changes; the ops of dead
writers are rolled back (the repair); then each subsystem reclaims the dead CPU's
state (its dead callback: the per-counter stock drains every slot of the CPU,
memcg's legacy stock its 7 slots), in the order they registered; and the CPU's
drain requests are forgotten and its row freed.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from . import cpuhp
from .segment import R_DONE_SEQ, R_REQ_SEQ, STOCK_LOCK
from .stop_machine import _repair, stop_machine

if TYPE_CHECKING:
    from .segment import Segment as Arena


def cpu_dead(arena: Arena, cpu: int) -> dict[str, int]:
    """memcg_hotplug_cpu_dead: repair, reclaim every per-CPU state of dead CPU
    `cpu`, forget its drain requests and free the CPU for a new process. Returns
    the pages reclaimed by counter name (counters with none left out). Raises
    ValueError if a live process is registered as `cpu`."""
    slots = arena._slots
    slot = arena._cpu_slot(cpu)
    row = arena._row_slot(cpu)
    with stop_machine(arena):
        pid = check_dead(arena, cpu)
        # Every word the reclaim below indexes by is checked before anything changes.
        for s in cpuhp.subsystems:
            if s.check_dead is not None:
                s.check_dead(arena, cpu)
        _repair(arena)
        reclaimed: dict[str, int] = {}
        for s in cpuhp.subsystems:
            if s.dead is not None:
                for name, n in s.dead(arena, cpu).items():
                    reclaimed[name] = reclaimed.get(name, 0) + n
        # No slot of the dead CPU may stay locked, with stock or not: a stock id
        # freed since and reused would be busy forever on this CPU.
        arena.stocks[cpu, :, STOCK_LOCK] = 0
        arena.requests[cpu, :] = 0
        arena.request_summary[cpu, :] = 0
        slots.store(row + R_DONE_SEQ, slots.load(row + R_REQ_SEQ))
        arena._set_row_owner(cpu, 0)
        slots.cas(slot, pid, 0)
    slots.futex_wake(row + R_DONE_SEQ)                 # drains waiting on it: skip it
    return {name: n for name, n in reclaimed.items() if n}


def check_dead(arena: Arena, cpu: int) -> int:
    """The pid registered as CPU `cpu` (0: none), which must be dead: ValueError if
    it is alive (its stock is drained with drain_stock, through that CPU)."""
    pid = arena._slots.load(arena._cpu_slot(cpu))
    if arena.row_owner_alive(cpu):
        raise ValueError(f"CPU {cpu} is online (pid {pid}); drain_cpu is for dead "
                         f"CPUs, use drain_stock on a live one")
    return pid
