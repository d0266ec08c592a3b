"""shmcounter: hierarchical page counters with per-CPU charge stock in shared memory.

A model of Linux mm/page_counter.c with the per-page_counter stock of the 2026
series "mm/memcontrol, page_counter: move stock from mem_cgroup to page_counter".
See docs/design.md.
"""
from .cpu import register_cpu, this_cpu, unregister_cpu
from .errors import ArenaCorrupt, ArenaError, Busy, WaitTimeout
from .hotplug import Repair
from .layout import Arena
from .page_counter import PAGE_COUNTER_MAX, PageCounter
from .stock import DEFAULT_BATCH

__all__ = [
    "Arena", "ArenaCorrupt", "ArenaError", "Busy", "DEFAULT_BATCH", "PAGE_COUNTER_MAX",
    "PageCounter", "Repair", "WaitTimeout", "register_cpu", "this_cpu", "unregister_cpu",
]
