"""Where higher layers plug into the CPU paths: this process's CPU, and the
subsystems that hold per-CPU state.

The kernel's memcg registers its dead-CPU callback with
cpuhp_setup_state(CPUHP_MM_MEMCG_DEAD, ...) and its drain work with INIT_WORK,
and mm/page_counter.c knows nothing of memcg. Here a subsystem registers one
CpuSubsystem (setup_state) and the core calls it without naming it:

    online       register_cpu, once the row is this process's (cpu.py)
    offline      unregister_cpu, before the row is freed: drain this CPU's state
    check_dead   the hotplug-dead path, under stop_machine, before anything changes:
                 raise ArenaCorrupt for a word it would trust (hotplug.py)
    dead         the hotplug-dead path, after the repair: reclaim the dead CPU's
                 state; returns the pages reclaimed by counter name
    work         drain.serve on this CPU, op lock held: serve what was asked of it
    stock_pages  invariants.check_invariants: pages held per (CPU, counter)
    owns_slot    the repair: is this word a stock word of CPU row `row` that an
                 intent record may name (repair rolls it back with the op)

Subsystems run in registration order (the order their modules are imported:
the per-counter stock before memcg), offline in reverse.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import stop_machine

if TYPE_CHECKING:
    import numpy as np

    from .segment import Segment


@dataclass(frozen=True)
class CpuSubsystem:
    """One subsystem's callbacks; any may be None (see the module docstring)."""
    name: str
    online: Callable[[Segment, int], None] | None = None
    offline: Callable[[Segment, int], None] | None = None
    check_dead: Callable[[Segment, int], None] | None = None
    dead: Callable[[Segment, int], dict[str, int]] | None = None
    work: Callable[[Segment, int], None] | None = None
    stock_pages: Callable[[Segment, int], np.ndarray] | None = None
    owns_slot: Callable[[Segment, int, int], bool] | None = None


subsystems: list[CpuSubsystem] = []


def setup_state(subsystem: CpuSubsystem) -> None:
    """cpuhp_setup_state: call `subsystem` on the CPU paths from now on, in every
    arena of this process. Registered once per process, at import."""
    if any(s.name == subsystem.name for s in subsystems):
        raise ValueError(f"a subsystem named {subsystem.name!r} is registered already")
    subsystems.append(subsystem)
    if subsystem.owns_slot is not None:              # the repair, one layer down
        stop_machine.owns_slot.append(subsystem.owns_slot)


# ---- this process's CPU --------------------------------------------------------

# (arena handle, cpu) of this process, or None. Per process, cleared in fork children
# and when the handle closes (cpu.py).
registered: tuple[Segment, int] | None = None


def this_cpu() -> int | None:
    """The calling process's CPU id, or None if it is not a CPU process."""
    return None if registered is None else registered[1]


def this_cpu_of(arena: Segment) -> int | None:
    """The calling process's CPU id in `arena`, or None."""
    return None if registered is None or registered[0] is not arena else registered[1]
