"""The scheduling points: every step a process takes on the arena's shared words.

Every word of the arena is read and written through one Slots object per process
(_atomic.c): plain loads and stores, the atomics, the slot locks and the fused C
steps of the stepwise ops (pc_try_charge_level, stock_take, op_begin, ...). While
hooks are armed (hooks.py) every op runs as such steps, so the calls on that
object are the points: a process under the explorer gets a PointSlots in place of
its Slots (install), and each call of a STEPS method first stops at `gate(code,
args)`, then runs the real step. No point is placed for one race, and nothing of
the library changes when no explorer runs: the library never sees this class
unless a process under the explorer installs it.

Footprints (footprint): the words a step may read and may write, computed by the
controller from the step's name and arguments (conservatively: a fused step
claims every word its C code may touch). Two steps commute when neither writes a
word the other touches; the controller's pruning rests on it (strategies.py).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import hooks, wait
from .._atomic import Slots, set_hooks_armed
from ..memcg import legacy
from ..memcg._legacy import (
    MC_DRAIN_IDX,
    MC_EVICTIONS,
    MC_FLUSHES,
    MC_FLUSHING,
    MC_LOCK,
    MC_OVERFLOWS,
    MC_SLOTS,
    MC_WORDS,
    NR_MEMCG_STOCK,
)
from ..memcg.section import CG_WORDS
from ..segment import (
    H_DRAIN_LOCK,
    H_NCOUNTERS,
    H_REGISTRY_LOCK,
    H_STOP,
    H_UNDERFLOWS,
    HEADER_WORDS,
    PC_CHILDREN_LOW_USAGE,
    PC_CHILDREN_MIN_USAGE,
    PC_FAILCNT,
    PC_FLAGS,
    PC_LOW,
    PC_LOW_USAGE,
    PC_MAX,
    PC_MIN,
    PC_MIN_USAGE,
    PC_STOCK_ID,
    PC_USAGE,
    PC_WATERMARK,
    PC_WORDS,
    ROW_WORDS,
    STOCK_WORDS,
)

if TYPE_CHECKING:
    from ..segment import Segment as Arena


# Slots members that touch no shared word: this process's own state, the wake.
LOCAL = frozenset(("release", "set_layout", "set_writer", "set_cpu", "row", "contrib",
                   "cpu_block", "owner", "futex_wake"))
# The steps whose footprints are known, in code order (a code is an index here).
_KNOWN: tuple[str, ...] = (
    "load", "store", "fetch_add", "exchange", "cas",
    "pc_try_charge_level", "pc_charge_level", "pc_cancel", "pc_propagate",
    "stock_consume", "local_slot", "stock_deposit", "stock_return", "stock_take",
    "stock_trylock", "stock_unlock", "stock_deposit_v4", "stock_drain_v4",
    "stock_v4_plan", "op_begin", "op_forward", "op_end", "op_abort", "futex_wait",
    "sleep", "legacy.consume", "legacy.refill", "legacy.trylock", "legacy.unlock",
)
# Every other Slots method is a point too, with the footprint of every word: a
# step added to _atomic.c is explored (conservatively) before anyone lists it.
STEPS = _KNOWN + tuple(sorted(name for name in dir(Slots) if not name.startswith("_")
                              and name not in LOCAL and name not in _KNOWN))
CODE = {name: code for code, name in enumerate(STEPS)}
FUTEX_WAIT = CODE["futex_wait"]
SLEEP = CODE["sleep"]
# A footprint that conflicts with every step (op_abort: every usage of a path).
EVERYTHING = -1

Gate = Callable[[int, tuple[int, ...]], None]


class PointSlots:
    """A process's Slots with a point before every step of STEPS: gate(code, args)
    returns when the controller lets the step run. futex_wait is a point whose
    wait the controller models (it lets the process go once the word changed), so
    the real call is not made: a caller loops on its condition anyway. Every
    other attribute is the real Slots' (set_cpu, row, futex_wake, ...)."""

    def __init__(self, real: Any, gate: Gate) -> None:
        self.real = real
        self._gate = gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def futex_wait(self, i: int, expected: int, timeout_us: int) -> bool:
        self._gate(FUTEX_WAIT, (i, expected))
        return True


def _point(name: str) -> Callable[..., Any]:
    code = CODE[name]

    def step(self: PointSlots, *args: int) -> Any:
        self._gate(code, args)
        return getattr(self.real, name)(*args)
    step.__name__ = name
    return step


for _name in STEPS:
    if _name not in ("futex_wait", "sleep") and "." not in _name:
        setattr(PointSlots, _name, _point(_name))


class _LegacyPoints:
    """memcg/_legacy.c's slot steps (the legacy design's memcg_stock_pcp) as points:
    legacy.py calls them with the arena's Slots, a PointSlots here; each stops at
    its point, then runs with the real Slots."""

    def __init__(self, real: Any, gate: Gate) -> None:
        self._real, self._gate = real, gate

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def _step(self, name: str, slots: PointSlots, *args: int) -> Any:
        self._gate(CODE["legacy." + name], args)
        return getattr(self._real, name)(slots.real, *args)

    def consume(self, slots: PointSlots, *args: int) -> Any:
        return self._step("consume", slots, *args)

    def refill(self, slots: PointSlots, *args: int) -> Any:
        return self._step("refill", slots, *args)

    def trylock(self, slots: PointSlots, *args: int) -> Any:
        return self._step("trylock", slots, *args)

    def unlock(self, slots: PointSlots, *args: int) -> Any:
        return self._step("unlock", slots, *args)


class _Clock:
    """wait.py's clock in a process under the explorer: its pause between two
    attempts (bounded_wait: a lock's holder, stop_machine, an op to end) is the
    point "sleep", where the controller lets the process wait until a word it read
    since its last write changes. Timeouts never run out (the controller decides
    when the process runs)."""

    def __init__(self, gate: Gate) -> None:
        self._gate = gate

    def sleep(self, seconds: float) -> None:
        self._gate(SLEEP, ())

    @staticmethod
    def monotonic() -> float:
        return 0.0


def install(arena: Arena, gate: Gate) -> PointSlots:
    """In a process under the explorer: every handle of `arena` built so far, and
    the arena itself, use a PointSlots from now on, the ops run stepwise (hooks
    armed), and the library's waits pause at the point "sleep". Handles built
    later bind the real Slots in C (PageCounter binds arena._slots): a scenario
    builds its handles before."""
    wait.time = _Clock(gate)  # type: ignore[assignment]
    legacy._legacy = _LegacyPoints(legacy._legacy, gate)  # type: ignore[assignment]
    slots = PointSlots(arena._slots, gate)
    arena._slots = slots  # type: ignore[assignment]
    for handle in arena._handles:
        if handle is not None:
            handle._slots = slots  # type: ignore[assignment]
    hooks.ARMED = True
    set_hooks_armed(True)
    return slots


# ---- footprints (controller side) ------------------------------------------------

Footprint = tuple[tuple[int, ...], tuple[int, ...]]     # (words read, words written)


def _row(a: int) -> tuple[int, ...]:
    return tuple(range(a, a + ROW_WORDS))


def _level(name: str) -> Callable[[Arena, tuple[int, ...], int | None], Footprint]:
    """A page_counter level step (c, p, k, ...): c's usage, protection and (charges)
    watermark and failcnt against max; p's children sums; the contrib word k."""
    def fp(arena: Arena, a: tuple[int, ...], cpu: int | None) -> Footprint:
        c, p = a[0], a[1]
        reads = [c + PC_USAGE, c + PC_MIN, c + PC_LOW]
        writes = [c + PC_MIN_USAGE, c + PC_LOW_USAGE]
        if name != "pc_propagate":
            writes += [c + PC_USAGE, a[2]]
        if name in ("pc_try_charge_level", "pc_charge_level"):
            writes.append(c + PC_WATERMARK)
        if name == "pc_try_charge_level":
            reads.append(c + PC_MAX)
            writes.append(c + PC_FAILCNT)
        if p >= 0:
            writes += [p + PC_CHILDREN_MIN_USAGE, p + PC_CHILDREN_LOW_USAGE]
        return tuple(reads + writes), tuple(writes)
    return fp


def _stock_consume(arena: Arena, a: tuple[int, ...], cpu: int | None) -> Footprint:
    c, row = a[0], a[1]
    slot = _local_slot(arena, c, cpu)
    writes = (slot, slot + 1) if slot >= 0 else ()
    return (c + PC_STOCK_ID, c + PC_FLAGS, row + 1, *writes), writes


def _legacy_step(name: str) -> Callable[[Arena, tuple[int, ...], int | None], Footprint]:
    """legacy.*(row, block, ...) or (block, ...): the CPU's whole block, and the row
    of consume (its op word) and refill (its intent)."""
    def fp(arena: Arena, a: tuple[int, ...], cpu: int | None) -> Footprint:
        if name in ("legacy.trylock", "legacy.unlock"):
            block = tuple(range(a[0], a[0] + MC_WORDS))
            return block, block
        block, row = tuple(range(a[1], a[1] + MC_WORDS)), _row(a[0])
        return row + block, block + (row if name == "legacy.refill" else ())
    return fp


_FP = Callable[["Arena", tuple[int, ...], "int | None"], Footprint]
_FOOTPRINTS: dict[str, _FP] = {
    "sleep": lambda arena, a, cpu: ((), ()),
    "load": lambda arena, a, cpu: ((a[0],), ()),
    "futex_wait": lambda arena, a, cpu: ((a[0],), ()),
    "store": lambda arena, a, cpu: ((), (a[0],)),
    "local_slot": lambda arena, a, cpu: ((a[0] + PC_STOCK_ID,), ()),
    "stock_consume": _stock_consume,
    "stock_return": lambda arena, a, cpu: ((a[0], a[0] + 1, a[1]), (a[0], a[0] + 1)),
    "stock_v4_plan": lambda arena, a, cpu: (_row(a[0]), ()),
    "op_begin": lambda arena, a, cpu: (
        (*_row(a[0]), H_STOP, *((a[5],) if a[5] >= 0 else ())), _row(a[0])),
    "op_abort": lambda arena, a, cpu: ((EVERYTHING,), (EVERYTHING,)),  # every usage of a path
}
for _name in ("fetch_add", "exchange", "cas"):
    _FOOTPRINTS[_name] = lambda arena, a, cpu: ((a[0],), (a[0],))
for _name in ("pc_try_charge_level", "pc_charge_level", "pc_cancel", "pc_propagate"):
    _FOOTPRINTS[_name] = _level(_name)
for _name in ("stock_deposit", "stock_take", "stock_trylock", "stock_unlock"):
    _FOOTPRINTS[_name] = lambda arena, a, cpu: ((a[0], a[0] + 1), (a[0], a[0] + 1))
for _name in ("stock_deposit_v4", "stock_drain_v4"):
    _FOOTPRINTS[_name] = lambda arena, a, cpu: (
        (*_row(a[0]), a[1], a[1] + 1), (*_row(a[0]), a[1], a[1] + 1))
for _name in ("op_forward", "op_end"):
    _FOOTPRINTS[_name] = lambda arena, a, cpu: (_row(a[0]), _row(a[0]))
for _name in STEPS:
    if _name.startswith("legacy."):
        _FOOTPRINTS[_name] = _legacy_step(_name)


def footprint(arena: Arena, code: int, args: tuple[int, ...], cpu: int | None) -> Footprint:
    """The words step `code`(args) of a process (CPU `cpu`, or None) may read and
    may write, read from the arena as it is now, before the step. A fused step
    claims every word its C code may touch (_atomic.c, memcg/_legacy.c); a step
    not listed here, every word."""
    fp = _FOOTPRINTS.get(STEPS[code])
    return fp(arena, args, cpu) if fp is not None else ((EVERYTHING,), (EVERYTHING,))


def _local_slot(arena: Arena, c: int, cpu: int | None) -> int:
    if cpu is None:
        return -1
    sid = arena._slots.load(c + PC_STOCK_ID)
    return arena._stock_slot(cpu, sid) if 0 <= sid < arena.max_stocked else -1


def word_name(arena: Arena, i: int) -> str:
    """A readable name of arena word `i`: 'g.usage', 'stock[0][g].nr', 'row1.op'."""
    if i == EVERYTHING:
        return "*"
    for region in (_header, _row_word, _counter_word, _stock_word, _contrib_word,
                   _request_word, _memcg_word, _extra_word):
        name = region(arena, i)
        if name is not None:
            return name
    return f"word {i}"


def _header(arena: Arena, i: int) -> str | None:
    if i >= HEADER_WORDS:
        return None
    names = {H_NCOUNTERS: "ncounters", H_REGISTRY_LOCK: "registry_lock",
             H_UNDERFLOWS: "underflows", H_DRAIN_LOCK: "drain_lock", H_STOP: "stop"}
    return names.get(i, f"header[{i}]")


def _row_word(arena: Arena, i: int) -> str | None:
    if not arena._rows_slot <= i < arena._counters_slot:
        return None
    row, off = divmod(i - arena._rows_slot, ROW_WORDS)
    return f"row{row}.{_field('R_', off)}"


def _counter_word(arena: Arena, i: int) -> str | None:
    c0 = arena._counters_slot
    if not c0 <= i < c0 + arena.max_counters * PC_WORDS:
        return None
    index, off = divmod(i - c0, PC_WORDS)
    return f"{_counter_name(arena, index)}.{_field('PC_', off)}"


def _stock_word(arena: Arena, i: int) -> str | None:
    s0 = arena._stocks_slot
    if not s0 <= i < s0 + arena.ncpus * arena._stock_block_words:
        return None
    cpu, off = divmod(i - s0, arena._stock_block_words)
    sid, w = divmod(off, STOCK_WORDS)
    owner = int(arena.stock_owner[sid]) if sid < arena.max_stocked else -1
    name = _counter_name(arena, owner) if owner >= 0 else f"#{sid}"
    return f"stock[{cpu}][{name}].{'nr' if w == 0 else 'lock/last'}"


def _contrib_word(arena: Arena, i: int) -> str | None:
    k0 = arena._contrib_slot0
    if not k0 <= i < k0 + len(arena.rows) * arena._counter_block_words:
        return None
    row, index = divmod(i - k0, arena._counter_block_words)
    return f"contrib[{row}][{_counter_name(arena, index)}]"


def _request_word(arena: Arena, i: int) -> str | None:
    r0 = arena._requests_slot0
    if not r0 <= i < r0 + arena.ncpus * arena._request_block_words:
        return None
    cpu, off = divmod(i - r0, arena._request_block_words)
    if off < arena._counter_block_words:
        return f"request[{cpu}][{_counter_name(arena, off)}]"
    return f"request[{cpu}].summary[{off - arena._counter_block_words}]"


_MEMCG_HEADER = ("state", "variant", "memsw", "eviction", "batch", "root",
                 "first_child_drain", "stock_cap")
_CGROUP = ("state", "memsw", "events_max", "events_max_local")
_LEGACY = {MC_FLUSHING: "flushing", MC_LOCK: "lock", MC_DRAIN_IDX: "drain_idx",
           MC_EVICTIONS: "evictions", MC_OVERFLOWS: "overflows", MC_FLUSHES: "flushes",
           **{MC_SLOTS + k: f"slot{k}" for k in range(NR_MEMCG_STOCK)}}


def _memcg_word(arena: Arena, i: int) -> str | None:
    """memcg's section (memcg/section.py): its header, a cgroup's record (named by
    its memory counter), the legacy block of a CPU."""
    memcg = getattr(arena, "_memcg", None)
    if memcg is None or not memcg.slot <= i < memcg.cpus_slot + arena.ncpus * MC_WORDS:
        return None
    if i < memcg.cgroups_slot:
        return f"memcg.{_MEMCG_HEADER[i - memcg.slot]}"
    if i < memcg.cpus_slot:
        index, off = divmod(i - memcg.cgroups_slot, CG_WORDS)
        field = _CGROUP[off] if off < len(_CGROUP) else str(off)
        return f"cgroup[{_counter_name(arena, index)}].{field}"
    cpu, off = divmod(i - memcg.cpus_slot, MC_WORDS)
    return f"legacy[{cpu}].{_LEGACY.get(off, str(off))}"


def _extra_word(arena: Arena, i: int) -> str | None:
    for section, (offset, nbytes) in arena._extra.items():
        if offset // 8 <= i < (offset + nbytes) // 8:
            return f"{section}[{i - offset // 8}]"
    return None


def _field(prefix: str, off: int) -> str:
    from .. import segment as seg
    names = [k for k in dir(seg) if k.startswith(prefix) and not k.endswith("WORDS")
             and isinstance(getattr(seg, k), int) and getattr(seg, k) == off
             and not k.startswith(prefix + "FLAG_")]
    return names[0][len(prefix):].lower() if names else str(off)


def _counter_name(arena: Arena, index: int) -> str:
    try:
        return arena._name(index) if index < arena._published() else f"#{index}"
    except Exception:                       # a word that names no counter
        return f"#{index}"
