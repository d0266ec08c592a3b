"""memcg's section of the segment: the cgroup tree and the legacy per-CPU stock.

Registered with the segment (segment.register_section) when shmcounter is
imported, so every arena has it; the core never reads it. In 8-byte words, each
part on its own lines:

  header     MEMCG_HEADER_WORDS: state (0 none, the pid setting the tree up, -1
             ready), variant (1 + the design's index in variants.DESIGNS; 0 no tree yet), memsw,
             eviction, batch, root, first-child drain, stock cap (v4's E14 cap)
  cgroups    max_counters records of CG_WORDS, indexed by the cgroup's memory
             counter: state, memsw counter, events.max (hierarchical), events.max
             local (cgroups.py)
  cpus       ncpus blocks of MC_WORDS (two lines): the legacy memcg_stock_pcp
             (flushing, lock, drain_idx, 7 slot words) and this CPU's event counts
             (evictions, overflow drains, flushes), written by CPU k (or by the
             hotplug path once it is dead; flushing also by drain requesters)
             (legacy.py)

Each handle gets a MemcgSection when it is built (a segment handle hook), as
arena._memcg; it is dropped when the handle closes.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .. import segment
from ._legacy import MC_WORDS, set_section

if TYPE_CHECKING:
    import numpy as np

    from ..segment import Segment

MEMCG_HEADER_WORDS = 8
(M_STATE, M_VARIANT, M_MEMSW, M_EVICTION, M_BATCH, M_ROOT, M_FIRST_CHILD_DRAIN,
 M_STOCK_CAP) = range(8)
CG_WORDS = 8
# The legacy design's eviction orders (header word M_EVICTION: an index here).
EVICTIONS = ("round-robin", "random")
# cgroup record words
CG_STATE, CG_MEMSW, CG_EVENTS_MAX, CG_EVENTS_MAX_LOCAL = range(4)
LINE_WORDS = 8


def _round(words: int) -> int:
    return -(-words // LINE_WORDS) * LINE_WORDS


def _words(ncpus: int, max_counters: int) -> int:
    return MEMCG_HEADER_WORDS + _round(max_counters * CG_WORDS) + ncpus * MC_WORDS


class MemcgSection:
    """One handle's views and slot indexes of memcg's section; `block` is this
    process's legacy per-CPU block while it is a CPU of the arena (legacy.py),
    else -1."""

    def __init__(self, arena: Segment) -> None:
        words = arena.section("memcg")
        base = arena.section_slot("memcg")
        ncg = arena.max_counters * CG_WORDS
        self.header: np.ndarray = words[:MEMCG_HEADER_WORDS]
        self.cgroups: np.ndarray = words[MEMCG_HEADER_WORDS:MEMCG_HEADER_WORDS + ncg].reshape(
            arena.max_counters, CG_WORDS)
        at = MEMCG_HEADER_WORDS + _round(ncg)
        self.cpus: np.ndarray = words[at:at + arena.ncpus * MC_WORDS].reshape(
            arena.ncpus, MC_WORDS)
        self.slot = base
        self.cgroups_slot = base + MEMCG_HEADER_WORDS
        self.cpus_slot = base + at
        self.block = -1

    def cpu_slot(self, cpu: int) -> int:
        """The first slot of CPU `cpu`'s block."""
        return self.cpus_slot + cpu * MC_WORDS


def _init(arena: Segment) -> None:
    arena._memcg = section = MemcgSection(arena)
    set_section(arena._slots, section.cpus_slot, arena.ncpus)   # its C steps check blocks


def _release(arena: Segment) -> None:
    arena.__dict__.pop("_memcg", None)               # its views, before the unmap


def _fork(arena: Segment) -> None:
    arena._memcg.block = -1


segment.register_section("memcg", _words)
segment.register_handle_attribute("_memcg")
segment.register_handle_hook("init", _init)
segment.register_handle_hook("release", _release)
segment.register_handle_hook("fork", _fork)
