"""Type stub of the C extension shmcounter.memcg._legacy (shmcounter/memcg/_legacy.c):
its Python-visible API exactly. Every step takes a shmcounter._atomic.Slots, then
int arguments converted with __index__ to C long long, all positional-only;
cgroup_ops takes a bound shmcounter._atomic.Counter and returns the C ops of one
cgroup."""
from collections.abc import Callable
from typing import Any, Final, SupportsIndex, TypeAlias, final

from shmcounter._atomic import Counter, Slots

_Int: TypeAlias = SupportsIndex

# legacy block words (legacy.py)
MC_FLUSHING: Final[int]
MC_LOCK: Final[int]
MC_DRAIN_IDX: Final[int]
MC_SLOTS: Final[int]
NR_MEMCG_STOCK: Final[int]
MC_EVICTIONS: Final[int]
MC_OVERFLOWS: Final[int]
MC_FLUSHES: Final[int]
MC_WORDS: Final[int]
MEMCG_CHARGE_BATCH: Final[int]
# refill's action
LEGACY_DEPOSITED: Final[int]
LEGACY_OVERFLOW: Final[int]
LEGACY_EVICTED: Final[int]
LEGACY_BYPASS: Final[int]
# consume's result
CONSUME_HIT: Final[int]
CONSUME_MISS: Final[int]
CONSUME_BUSY: Final[int]

def set_section(slots: Slots, first: _Int, count: _Int, /) -> None: ...
def consume(slots: Slots, row: _Int, block: _Int, tag: _Int, nr: _Int, /) -> int: ...
# (action, slot index or -1, pages)
def refill(
    slots: Slots, row: _Int, block: _Int, tag: _Int, nr: _Int, victim: _Int, /,
) -> tuple[int, int, int]: ...
def trylock(slots: Slots, block: _Int, owner: _Int, /) -> bool: ...
def unlock(slots: Slots, block: _Int, /) -> None: ...

@final
class CgroupOps:
    """The legacy ops of one cgroup, each one C call (cgroup_ops)."""
    def try_charge(self, n: int) -> bool: ...
    def uncharge(self, n: int, *, kmem: bool = False) -> None: ...

def cgroup_ops(
    memory: Counter, otherwise: Callable[[int, Any], bool],
    stepwise: Callable[[int, bool], None], evicted: Callable[[int], None],
    handles: list[Any], guard: _Int, bad: _Int, states: _Int, cg_words: _Int,
    eviction: _Int, random: _Int, /,
) -> CgroupOps: ...
