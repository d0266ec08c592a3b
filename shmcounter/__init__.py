"""shmcounter: hierarchical page counters with per-CPU charge stock in shared memory.

A model of Linux mm/page_counter.c with the per-page_counter stock of the 2026
series "mm/memcontrol, page_counter: move stock from mem_cgroup to page_counter".
See docs/design.md.

Importing the package boots the library: the core, then the built-in
subsystems, which register with the core (as the kernel's initcalls do): the
per-counter stock (stock.py) and memcg (memcg/: its section of the segment, and
its legacy per-CPU stock on the CPU paths). Every process that imports any part
of shmcounter has them all registered, whatever arena it attaches.
"""
from .arena import Arena
from .cpu import register_cpu, this_cpu, unregister_cpu
from .errors import ArenaCorrupt, ArenaError, Busy, WaitTimeout
from .page_counter import PAGE_COUNTER_MAX, PageCounter
from .stock import DEFAULT_BATCH
from .stop_machine import Repair

# isort: split
# Last, whatever the sort order: each layer's handle hooks run in the order of its
# first import, the core's (writer.py, cpu.py) before memcg's.
from . import memcg  # noqa: F401  (registers memcg's section and CPU paths)

__all__ = [
    "DEFAULT_BATCH", "PAGE_COUNTER_MAX", "Arena", "ArenaCorrupt", "ArenaError", "Busy",
    "PageCounter", "Repair", "WaitTimeout", "register_cpu", "this_cpu", "unregister_cpu",
]
