"""Type stub of the C extension shmcounter._atomic (shmcounter/_atomic.c): its
Python-visible API exactly. Every int argument is converted with __index__ to a C
long long (OverflowError outside int64); every argument is positional-only, as
the C functions parse them, except Slots(buffer)."""
from typing import Final, SupportsIndex, TypeAlias, final, overload

from _typeshed import WriteableBuffer

_Int: TypeAlias = SupportsIndex

# page_counter record words (documented in segment.py)
PC_USAGE: Final[int]
PC_WATERMARK: Final[int]
PC_FAILCNT: Final[int]
PC_EMIN: Final[int]
PC_ELOW: Final[int]
PC_MIN_USAGE: Final[int]
PC_LOW_USAGE: Final[int]
PC_CHILDREN_MIN_USAGE: Final[int]
PC_CHILDREN_LOW_USAGE: Final[int]
PC_MAX: Final[int]
PC_MIN: Final[int]
PC_LOW: Final[int]
PC_HIGH: Final[int]
PC_PARENT: Final[int]
PC_BATCH: Final[int]
PC_STOCK_ID: Final[int]
PC_FLAGS: Final[int]
PC_WORDS: Final[int]
# stock slot words (_slots.h)
STOCK_NR: Final[int]
STOCK_LOCK: Final[int]
STOCK_WORDS: Final[int]
# writer row words (_slots.h)
R_PID: Final[int]
R_DONE_SEQ: Final[int]
R_STOCK_BLOCK: Final[int]
R_START: Final[int]
R_REQ_SEQ: Final[int]
R_IN_OP: Final[int]
R_OP: Final[int]
R_COUNTER: Final[int]
R_STOCK_SLOT: Final[int]
R_STOCK_BEFORE: Final[int]
R_DEPTH: Final[int]
R_BASE: Final[int]
MAX_DEPTH: Final[int]
ROW_WORDS: Final[int]
# results of stock_consume
CONSUME_HIT: Final[int]
CONSUME_MISS: Final[int]
CONSUME_BUSY: Final[int]
CONSUME_NO_STOCK: Final[int]
# result of stock_return and stock_take when the slot lock is held
STOCK_BUSY: Final[int]

# module functions on (writable buffer, byte offset)
def load(buf: WriteableBuffer, offset: _Int, /) -> int: ...
def store(buf: WriteableBuffer, offset: _Int, value: _Int, /) -> None: ...
def fetch_add(buf: WriteableBuffer, offset: _Int, delta: _Int, /) -> int: ...
def exchange(buf: WriteableBuffer, offset: _Int, value: _Int, /) -> int: ...
def cas(buf: WriteableBuffer, offset: _Int, expected: _Int, desired: _Int, /) -> int: ...

@final
class Slots:
    """A writable, 8-byte aligned buffer held until release(); 8-byte slot indexes."""

    def __init__(self, buffer: WriteableBuffer) -> None: ...
    # release(None, ...) is a TypeError: no error type, or one with its message.
    @overload
    def release(self) -> None: ...
    @overload
    def release(self, error_type: type[BaseException], message: str, /) -> None: ...
    def set_layout(
        self, name: str, rows: _Int, counters: _Int, max_counters: _Int, stocks: _Int,
        stock_block: _Int, ncpus: _Int, max_stocked: _Int, /,
    ) -> None: ...
    def load(self, i: _Int, /) -> int: ...
    def store(self, i: _Int, value: _Int, /) -> None: ...
    def fetch_add(self, i: _Int, delta: _Int, /) -> int: ...
    def exchange(self, i: _Int, value: _Int, /) -> int: ...
    def cas(self, i: _Int, expected: _Int, desired: _Int, /) -> int: ...
    # page_counter steps: one level each; None when c's max refused nr
    def pc_try_charge_level(self, c: _Int, p: _Int, k: _Int, nr: _Int, /) -> int | None: ...
    def pc_charge_level(self, c: _Int, p: _Int, k: _Int, nr: _Int, /) -> int: ...
    def pc_cancel(self, c: _Int, p: _Int, k: _Int, nr: _Int, /) -> int: ...
    def pc_propagate(self, c: _Int, p: _Int, /) -> None: ...
    # stock steps
    def stock_consume(self, c: _Int, row: _Int, nr: _Int, /) -> int: ...
    def local_slot(self, c: _Int, block: _Int, /) -> int: ...
    def stock_deposit(self, s: _Int, nr: _Int, owner: _Int, /) -> bool: ...
    def stock_return(self, s: _Int, batch: _Int, nr: _Int, owner: _Int, /) -> int: ...
    def stock_take(self, s: _Int, owner: _Int, /) -> int: ...
    def stock_trylock(self, s: _Int, owner: _Int, /) -> bool: ...
    def stock_unlock(self, s: _Int, /) -> None: ...
    # ops: the intent record
    def op_begin(
        self, row: _Int, stop: _Int, counters: _Int, contrib: _Int, index: _Int,
        stock_slot: _Int, /,
    ) -> bool: ...
    def op_end(self, row: _Int, /) -> None: ...
    def op_abort(self, row: _Int, counters: _Int, contrib: _Int, /) -> None: ...
    # futex
    def futex_wait(self, i: _Int, expected: _Int, timeout_us: _Int, /) -> bool: ...
    def futex_wake(self, i: _Int, /) -> int: ...
