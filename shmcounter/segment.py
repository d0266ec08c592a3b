"""The arena: one shared-memory segment holding every counter, stock and CPU state.

Layout, in 8-byte words unless noted; every section starts on a 64-byte line.
Bump LAYOUT_VERSION whenever a line below changes.

  header     3 lines.  line 0, written once by the creator:
                         MAGIC "SHMCNTR\\0", LAYOUT_VERSION, ncpus, max_counters,
                         max_stocked, creator pid, creator's start time (clock
                         ticks after boot: a pid alone can be reused), segment size
                       line 1, shared and rarely written:
                         ncounters (published count), registry lock (holder pid),
                         underflows (count of clamped uncharges), max_writers,
                         drain lock (pid of the single drainer, for trylock drains)
                       line 2: stop (pid of the stop_machine holder, 0 when none);
                         read by every op, written only by hotplug
  rows       ncpus + max_writers writer rows of ROW_WORDS = 32 words, 4 lines each.
                       Row k < ncpus is CPU k; the others are claimed by other
                       processes that change a usage. Every writer owns one row:
                       line 0  pid (0: free; for CPU k: the process registered as
                               CPU k), done_seq (drains served, written by CPU k),
                               stock_block (CPU k's first stock slot, for the
                               stepwise fast path; the C ops keep it in the process),
                               start (the owner's start time, 0 until written: a
                               pid reused by another process does not match it),
                               walks (hierarchy walks made through this row, a
                               statistic written by the owner), and the forward
                               plan of the op in progress: fwd_levels, fwd_delta,
                               stock_after (_op.h: op_forward)
                       line 1  req_seq (drain tickets, fetch_add by requesters)
                       line 2-3 in_op, op, counter, stock_slot, stock_before,
                               depth, base[MAX_DEPTH]: the intent record of the op
                               in progress, written by the owner only
  counters   max_counters records of PC_WORDS = 24 words, three lines each:
                       A  usage alone: every charge of the subtree hits it
                       B  watermark, failcnt, emin, elow, min_usage, low_usage,
                          children_min_usage, children_low_usage: slow-path writes
                       C  max, min, low, high, parent, batch, stock_id, flags:
                          read-mostly, so the fast path never shares a line with
                          a write
                       A record is written once under the registry lock, then
                       published by the store to ncounters; parent never changes.
  stock_owner max_stocked words: the counter that owns stock id s, or -1.
                       Written under the registry lock.
  stocks     ncpus blocks, one per CPU, each max_stocked slots of
                       [nr_pages, lock] (16 bytes), padded to a line: a CPU's
                       slots sit together and no two CPUs share a line. A
                       lockless (v4) counter's slots are [word, last] instead
                       (word = seq << 34 | pages; _op.h), changed by CAS only,
                       by the CPU (hit, deposit) or by any drainer.
                       stock[cpu][s] is written by CPU cpu only (under its lock),
                       or without the lock by the hotplug path once cpu is dead,
                       or by free_stock once nobody charges the counter.
  contrib    one line-padded block per row of max_counters words:
                       contrib[row][c] is what row's owner added to usage[c], net.
                       Written by the owner only (or by hotplug under
                       stop_machine). Invariant (quiescent, I7):
                           usage[c] == contrib[:, c].sum()
  requests   one line-padded block per CPU: max_counters words, then the
                       summary, ceil(max_counters / 4096) words (a line at least).
                       requests[k][c] is 1 while a drain of c on CPU k is asked
                       for (any process sets it; CPU k clears it when it drains).
                       Summary bit b of word w is set (after the flag) when a
                       flag of counters [64 (64 w + b), 64 (64 w + b) + 64) is
                       set, and taken by CPU k before it reads them (drain.py):
                       CPU k reads the flags of the groups asked, not all.
  names      max_counters x 64 bytes: UTF-8 name, NUL padded.
  sections   the sections of higher layers (register_section), each on its own
                       lines, in registration order; opaque here. shmcounter.memcg
                       lays its cgroup tree and the legacy per-CPU stock over one
                       (memcg/section.py).

Lifetime (Python 3.11, see docs/design.md "Segment lifetime"):
  - the creator's resource tracker keeps the segment registered, so when the
    creator's whole process tree is gone (SIGKILL included) the tracker unlinks it;
  - an attacher maps the segment without registering it with any tracker, so
    neither its exit nor its death at any instant unlinks the creator's segment;
  - Arena.create sweeps segments whose creator pid is dead and that no live
    process maps: the backstop when the tracker died with its tree;
  - anyone may create a name in /dev/shm: attach and the sweep open only a
    regular file owned by this process's uid, without following a symlink and
    without blocking (a FIFO named like an arena cannot stall us), and attach
    checks and maps the file through one fd;
  - one handle per arena and process: attach returns the open one (counting the
    opens; the last close unmaps), and an exit closes what is still open.
"""
from __future__ import annotations

import atexit
import mmap
import os
import re
import secrets
import struct
import threading
import traceback
import warnings
import weakref
from collections.abc import Callable
from multiprocessing import shared_memory
from stat import S_IFBLK, S_IFCHR, S_IFDIR, S_IFIFO, S_IFLNK, S_IFMT, S_IFSOCK, S_ISREG
from typing import TYPE_CHECKING, cast

import numpy as np

from . import pidlock
from ._atomic import Slots
from .errors import ArenaCorrupt, ArenaError
from .proc import my_start_time, pid_alive, proc_stat, running
from .wait import check_timeout

if TYPE_CHECKING:
    from typing import Self

    from numpy.typing import NDArray

    from .memcg.section import MemcgSection
    from .page_counter import PageCounter
    from .writer import Writer

LINE = 64
WORD = 8
MAGIC = int.from_bytes(b"SHMCNTR\0", "little")
LAYOUT_VERSION = 5
NAME_PREFIX = "shmcounter_"
NAME_BYTES = 64
GEOMETRY_LIMIT = 1 << 20          # ncpus, max_counters, max_stocked, max_writers

# header words
H_MAGIC, H_VERSION, H_NCPUS, H_MAX_COUNTERS, H_MAX_STOCKED, H_CREATOR_PID, \
    H_CREATOR_START, H_SIZE = range(8)
H_NCOUNTERS, H_REGISTRY_LOCK, H_UNDERFLOWS, H_MAX_WRITERS, H_DRAIN_LOCK = 8, 9, 10, 11, 12
H_STOP = 16
HEADER_WORDS = 24
# Request flags per bit of a CPU's request summary (see requests below).
REQUEST_GROUP = 64

# page_counter record, stock slot and writer row words: defined by the C module,
# whose fused steps need them; re-exported here, where the layout is documented.
from ._atomic import (  # noqa: E402, F401
    MAX_DEPTH,
    PC_BATCH,
    PC_CHILDREN_LOW_USAGE,
    PC_CHILDREN_MIN_USAGE,
    PC_ELOW,
    PC_EMIN,
    PC_FAILCNT,
    PC_FLAG_CAP,
    PC_FLAG_LOCKLESS,
    PC_FLAG_UNCHARGE_TO_STOCK,
    PC_FLAGS,
    PC_HIGH,
    PC_LOW,
    PC_LOW_USAGE,
    PC_MAX,
    PC_MIN,
    PC_MIN_USAGE,
    PC_PARENT,
    PC_STOCK_ID,
    PC_USAGE,
    PC_WATERMARK,
    PC_WORDS,
    R_BASE,
    R_COUNTER,
    R_DEPTH,
    R_DONE_SEQ,
    R_FWD_DELTA,
    R_FWD_LEVELS,
    R_IN_OP,
    R_OP,
    R_PID,
    R_REQ_SEQ,
    R_START,
    R_STOCK_AFTER,
    R_STOCK_BEFORE,
    R_STOCK_BLOCK,
    R_STOCK_SLOT,
    R_WALKS,
    ROW_WORDS,
    STOCK_LAST,
    STOCK_LOCK,
    STOCK_NR,
    STOCK_WORDS,
    V4_PAGES_BITS,
    V4_SEQ_MOD,
)

# flags word of a counter: PC_FLAG_UNCHARGE_TO_STOCK, the RFC's stock-returning
# uncharge (docs/stock-design.md §Uncharge); PC_FLAG_LOCKLESS, the v4 stock: each
# of its slots is [word, last], word = seq << V4_PAGES_BITS | pages (_op.h);
# PC_FLAG_CAP, with PC_FLAG_LOCKLESS: the E14 cap (a deposit above batch drains)
V4_PAGES_MASK = (1 << V4_PAGES_BITS) - 1

# line assertions: usage alone on line A, the read-mostly fields on line C
assert PC_USAGE == 0 and PC_WATERMARK == 8 and PC_MAX == 16 and PC_WORDS == 24

_NAME_RE = re.compile(rf"^{NAME_PREFIX}(\d+)_[0-9a-f]+$")

# Every open Arena handle of this process, so that a forked child can reset its
# per-process state: a child is a new writer, never its parent's row or CPU.
_open_arenas: weakref.WeakSet[Segment] = weakref.WeakSet()
_registry_threads = threading.Lock()
# The open handle of each arena in this process: Arena.attach returns it, and an
# Arena unpickled here (a task argument sent to a CPU process) resolves to it, so
# that it is the handle registered as this CPU and charges take this CPU's stock.
_by_name: weakref.WeakValueDictionary[str, Segment] = weakref.WeakValueDictionary()
# Serialises attach and close's count of opens, so that two threads get one handle.
_opens_lock = threading.Lock()
# What close() drops: the numpy views of the segment (their buffer exports).
_VIEWS = ("_bytes", "header", "rows", "records", "stock_owner", "stocks", "contrib",
          "requests", "request_summary", "names")


# What higher layers do with each handle of this process (register_handle_hook):
#   init   when a handle is built (writer.py gives it its Writer);
#   close  when it closes, in reverse order of registration: higher layers first
#          (cpu.py takes a CPU offline, then writer.py gives its row back);
#   release  then, before the unmap: drop views of the segment a layer keeps;
#   fork   in a forked child, for each handle it inherits: a child is a new
#          writer, never its parent's row or CPU.
_handle_hooks: dict[str, list[Callable[[Segment], None]]] = {
    "init": [], "close": [], "release": [], "fork": []}
# Module state of higher layers to reset in a forked child (register_at_fork).
_fork_resets: list[Callable[[], None]] = []


def register_handle_hook(when: str, hook: Callable[[Segment], None]) -> None:
    """Call hook(handle) at `when` ("init", "close", "release" or "fork") of every
    handle."""
    _handle_hooks[when].append(hook)


def register_handle_attribute(name: str) -> None:
    """A higher layer keeps per-handle state in attribute `name` (set by its init
    hook, dropped by its release hook): reading it on a closed handle raises
    ArenaError("arena <name> is closed"), as the segment's own views do."""
    setattr(Segment, name, _View())


def register_at_fork(reset: Callable[[], None]) -> None:
    """Call reset() in every forked child, before the handles' fork hooks: the one
    at-fork handler of the library runs them all, in registration order."""
    _fork_resets.append(reset)


def _after_fork_in_child() -> None:
    global _registry_threads, _opens_lock
    _registry_threads = threading.Lock()
    _opens_lock = threading.Lock()
    for reset in _fork_resets:
        reset()
    for arena in list(_open_arenas):
        arena._children_lock = threading.Lock()
        for hook in _handle_hooks["fork"]:
            hook(arena)
        arena._opens = 1      # the child holds one open of each handle it inherits
    _by_name.clear()          # inherited handles are usable, but not this process's own


os.register_at_fork(after_in_child=_after_fork_in_child)


def _round_up(n: int, to: int = LINE) -> int:
    return (n + to - 1) // to * to


# name -> words(ncpus, max_counters): the sections higher layers lay over the
# segment (register_section). Every process registers the same ones, in the same
# order, when shmcounter is imported, so every process computes the same geometry.
_extra_sections: dict[str, Callable[[int, int], int]] = {}


# The class of counter handles (page_counter.PageCounter, which registers itself).
_counter_type: list[Callable[[Segment, int], PageCounter]] = []


def register_counter_type(factory: Callable[[Segment, int], PageCounter]) -> None:
    """Build counter handles with factory(segment, index) (Segment._handle)."""
    _counter_type[:] = [factory]


def register_section(name: str, words: Callable[[int, int], int]) -> None:
    """Reserve a section of words(ncpus, max_counters) 8-byte words, line-aligned,
    in every arena created from now on, for a higher layer (memcg's cgroup tree).
    The core never reads it: Segment.section(name) gives its owner a view."""
    if name in _extra_sections:
        raise ValueError(f"a section named {name!r} is registered already")
    _extra_sections[name] = words


class _Sections:
    """Byte offsets of each section for one geometry."""

    def __init__(self, ncpus: int, max_counters: int, max_stocked: int,
                 max_writers: int) -> None:
        nrows = ncpus + max_writers
        self.header = 0
        self.rows = HEADER_WORDS * WORD
        self.counters = self.rows + nrows * ROW_WORDS * WORD
        self.stock_owner = self.counters + max_counters * PC_WORDS * WORD
        self.stocks = self.stock_owner + _round_up(max_stocked * WORD)
        # at least one slot a CPU, so that every slot index stays in bounds even
        # when no counter may have stock (max_stocked = 0)
        self.stock_block = _round_up(max(max_stocked, 1) * STOCK_WORDS * WORD)
        self.contrib = self.stocks + ncpus * self.stock_block
        self.counter_block = _round_up(max_counters * WORD)
        self.summary_words = -(-max_counters // (REQUEST_GROUP * 64))
        self.request_block = self.counter_block + _round_up(self.summary_words * WORD)
        self.requests = self.contrib + nrows * self.counter_block
        self.names = self.requests + ncpus * self.request_block
        # The sections of higher layers (register_section), in registration order,
        # each on its own lines: opaque to this module.
        at = _round_up(self.names + max_counters * NAME_BYTES)
        self.extra: dict[str, tuple[int, int]] = {}
        for name, words in _extra_sections.items():
            nbytes = words(ncpus, max_counters) * WORD
            self.extra[name] = (at, nbytes)
            at = _round_up(at + nbytes)
        self.size = at


_KINDS = {S_IFLNK: "a symbolic link", S_IFDIR: "a directory", S_IFIFO: "a FIFO",
          S_IFSOCK: "a socket", S_IFCHR: "a character device", S_IFBLK: "a block device"}


def _check_entry(name: str, st: os.stat_result) -> None:
    """ArenaError unless `st` is a regular file owned by this process's effective uid."""
    if not S_ISREG(st.st_mode):
        kind = _KINDS.get(S_IFMT(st.st_mode), "not a regular file")
        raise ArenaError(f"{name!r} in /dev/shm is {kind}, not a shared-memory segment")
    if st.st_uid != os.geteuid():
        raise ArenaError(f"segment {name!r} is owned by uid {st.st_uid}, not by this "
                         f"process's uid {os.geteuid()}: refused")


def _open_segment(name: str, flags: int) -> tuple[int, os.stat_result]:
    """An fd on /dev/shm/`name` (flags: O_RDONLY or O_RDWR) and its fstat, when it
    is a regular file owned by this process's effective uid; ArenaError saying why
    otherwise. Any user may create a name in /dev/shm, so nothing else is opened:
    lstat first (a FIFO, socket or device is never opened), then an open that
    follows no symlink and never blocks, since the name may have been replaced in
    between; the fstat of that fd is what counts."""
    path = f"/dev/shm/{name}"
    try:
        _check_entry(name, os.lstat(path))
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ArenaError(f"no shared-memory segment named {name!r}") from None
    except OSError as exc:
        raise ArenaError(f"cannot open segment {name!r}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        _check_entry(name, st)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _open_untracked(name: str) -> shared_memory.SharedMemory:
    """A SharedMemory on the arena named `name`: opened once (_open_segment), its
    header read (_check_header) and the segment mapped through that one fd, so
    the file checked is the file mapped.

    Never registered with a resource tracker: an attacher's tracker would unlink
    the creator's segment when the attacher exits or dies, even between the
    stdlib's register and our unregister (python/cpython#82300). We build what
    SharedMemory.__init__ builds for an existing name on POSIX, less the
    registration (3.13's track=False)."""
    if "/" in name or "\0" in name or name in ("", ".", ".."):
        raise ArenaError(f"{name!r} is not a shared-memory segment name")
    fd, st = _open_segment(name, os.O_RDWR)
    try:
        _check_header(name, os.pread(fd, HEADER_WORDS * WORD, 0), st.st_size)
        shm = shared_memory.SharedMemory.__new__(shared_memory.SharedMemory)
        mapping = mmap.mmap(fd, st.st_size)
        # SharedMemory's private attributes (typeshed declares none of them)
        vars(shm).update(_name="/" + name, _fd=fd, _size=st.st_size, _track=False,
                         _mmap=mapping, _buf=memoryview(mapping))
    except BaseException:
        os.close(fd)
        raise
    return shm


def _mapped_shm_names() -> set[str]:
    """Names of /dev/shm segments that some live process maps."""
    names = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/maps") as f:
                for line in f:
                    at = line.find("/dev/shm/" + NAME_PREFIX)
                    if at >= 0:
                        names.add(line[at + 9:].split(" ")[0].rstrip("\n"))
        except OSError:
            continue
    return names


def _dead_arena(name: str, pid: int) -> tuple[int, int] | None:
    """(st_dev, st_ino) of /dev/shm/`name` if it is an arena left by a dead creator:
    a regular file of this process's uid (_open_segment) whose header names a
    creator, pid `pid` with its start time, that is no longer running (a pid
    reused by another process has another start time). None for anything else,
    which the sweep leaves alone: a live creator, another uid's file, a FIFO,
    device, socket, directory or symlink, an unreadable or foreign header."""
    stat = proc_stat(pid)
    start = stat[1] if running(stat) else None
    try:
        fd, st = _open_segment(name, os.O_RDONLY)
    except ArenaError:
        return None
    try:
        header = os.pread(fd, HEADER_WORDS * WORD, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(header) < HEADER_WORDS * WORD:
        return None
    magic = struct.unpack_from("<q", header, 0)[0]
    created = struct.unpack_from("<q", header, H_CREATOR_START * WORD)[0]
    if magic != MAGIC or created == start:
        return None
    return st.st_dev, st.st_ino


def sweep_dead_arenas() -> list[str]:
    """Unlink arenas whose creator is dead and that no live process maps.

    Only names of our own pattern are touched, and of those only what _dead_arena
    recognises; the name is unlinked only if it still names the file checked.
    (/dev/shm is sticky: another uid cannot swap our file for another in between.)
    Returns the names removed.
    """
    try:
        names = os.listdir("/dev/shm")
    except FileNotFoundError:
        return []
    candidates = {n: ident for n in names
                  if (m := _NAME_RE.match(n)) and (ident := _dead_arena(n, int(m.group(1))))}
    if not candidates:
        return []
    mapped = _mapped_shm_names()
    removed = []
    for name, ident in candidates.items():
        if name in mapped:
            continue
        path = f"/dev/shm/{name}"
        try:
            st = os.lstat(path)
            if (st.st_dev, st.st_ino) == ident:
                os.unlink(path)
                removed.append(name)
        except FileNotFoundError:
            pass
    return removed


class _View:
    """The class attribute behind each numpy view of the segment. While the handle
    is open, its own view (an instance attribute) shadows this non-data descriptor
    at no cost to the lookup; once close() has dropped the views, this answers:
    the arena is closed. (No __getattr__ on Arena: it would slow down every
    attribute lookup, the stock hit's included.)"""

    def __get__(self, arena: Segment | None, owner: type | None = None) -> object:
        if arena is None:
            return self
        arena._check_open()
        raise AttributeError("a view of a half-built arena")


class Segment:
    """A handle on one arena's shared-memory segment: its views and slots, its
    lifetime (create, attach, close, unlink), the registry lock, the counter
    names and handles, and the sections and per-handle state of higher layers.
    Arena (arena.py) is the public class; the lower layers take a Segment."""

    # Class defaults, so that close() and unlink() work after a failed __init__.
    if TYPE_CHECKING:
        # The types of a built handle, which is all the code past __init__ sees:
        # _shm and _slots are None only on a half-built one (_close, unlink), and
        # an open handle's views shadow the _View that says "closed".
        _shm: shared_memory.SharedMemory
        _slots: Slots
        _bytes: NDArray[np.uint8]
        header: NDArray[np.int64]
        rows: NDArray[np.int64]
        records: NDArray[np.int64]
        stock_owner: NDArray[np.int64]
        stocks: NDArray[np.int64]
        contrib: NDArray[np.int64]
        requests: NDArray[np.int64]
        request_summary: NDArray[np.int64]
        names: NDArray[np.uint8]
        # Per-handle state of higher layers, set by their init hooks
        # (register_handle_attribute): writer.py's and memcg/section.py's.
        _writer: Writer
        _memcg: MemcgSection
    else:
        _shm = _slots = None
        _bytes = header = rows = records = stock_owner = stocks = contrib = requests = \
            request_summary = names = _View()
    _creator = False
    _unlinked = False
    _closed = True
    _opens = 1                        # create or attach calls that close() has not undone
    _drain_timeout: float = 5.0      # see drain_timeout
    _wait_timeout: float = 10.0      # see wait_timeout

    def __init__(self, shm: shared_memory.SharedMemory, creator: bool) -> None:
        self._shm = shm
        self._creator = creator
        # Before any view: a geometry that does not fit raises with nothing
        # exported, so that the caller can still unmap.
        mapped = shm.buf
        assert mapped is not None                 # an open SharedMemory is mapped
        sec = _check_geometry(shm.name, mapped)
        try:
            self._build(shm, sec)
        except BaseException as exc:
            # Half built: drop every export of the buffer (ours, and the finished
            # frames' locals in the traceback), so that the caller can unmap (and
            # the creator unlink) and its error is the one that shows.
            traceback.clear_frames(exc.__traceback__)
            self._closed = True
            for release in _handle_hooks["release"]:
                release(self)
            if self._slots is not None:
                self._slots.release()
            for attr in _VIEWS:
                self.__dict__.pop(attr, None)
            raise

    def _build(self, shm: shared_memory.SharedMemory, sec: _Sections) -> None:
        mapped = shm.buf
        assert mapped is not None                 # an open SharedMemory is mapped
        # Every view below is derived from _bytes, which holds an export of the
        # buffer: while a caller keeps one, close() cannot unmap the segment under
        # it (BufferError, turned into a warning), instead of a later segfault.
        self._bytes = np.frombuffer(mapped, np.uint8)
        hdr = np.ndarray((HEADER_WORDS,), np.int64, self._bytes)
        self.ncpus = int(hdr[H_NCPUS])
        self.max_counters = int(hdr[H_MAX_COUNTERS])
        self.max_stocked = int(hdr[H_MAX_STOCKED])
        self.nrows = self.ncpus + int(hdr[H_MAX_WRITERS])
        buf = self._bytes
        # numpy views for reading, vectorised sums and the stat view; writes that
        # race go through self._slots (seq_cst atomics).
        self.header = hdr
        self.rows = np.ndarray((self.nrows, ROW_WORDS), np.int64, buf, sec.rows)
        self.records = np.ndarray((self.max_counters, PC_WORDS), np.int64, buf, sec.counters)
        self.stock_owner = np.ndarray((self.max_stocked,), np.int64, buf, sec.stock_owner)
        self.stocks = np.ndarray(
            (self.ncpus, self.max_stocked, STOCK_WORDS), np.int64, buf, sec.stocks,
            strides=(sec.stock_block, STOCK_WORDS * WORD, WORD))
        self.contrib = np.ndarray((self.nrows, self.max_counters), np.int64, buf,
                                  sec.contrib, strides=(sec.counter_block, WORD))
        self.requests = np.ndarray((self.ncpus, self.max_counters), np.int64, buf,
                                   sec.requests, strides=(sec.request_block, WORD))
        self.request_summary = np.ndarray(
            (self.ncpus, sec.summary_words), np.int64, buf, sec.requests + sec.counter_block,
            strides=(sec.request_block, WORD))
        self.names = np.ndarray((self.max_counters, NAME_BYTES), np.uint8, buf, sec.names)
        self._extra = sec.extra
        self._slots = Slots(mapped)
        self._sec = sec
        self._set_layout()
        # slot indexes (8-byte words from the segment start)
        self._rows_slot = sec.rows // WORD
        self._counters_slot = sec.counters // WORD
        self._stocks_slot = sec.stocks // WORD
        self._stock_block_words = sec.stock_block // WORD
        self._contrib_slot0 = sec.contrib // WORD
        self._requests_slot0 = sec.requests // WORD
        self._counter_block_words = sec.counter_block // WORD
        self._request_block_words = sec.request_block // WORD
        self._handles: list[PageCounter | None] = [None] * self.max_counters
        self._index: dict[str, int] = {}
        self._known = 0
        self._children: dict[int, list[int]] = {}
        self._children_known = 0
        self._children_lock = threading.Lock()
        self._closed = False
        for init in _handle_hooks["init"]:
            init(self)
        _open_arenas.add(self)
        _by_name.setdefault(shm.name, self)

    # ---- construction -------------------------------------------------------

    @classmethod
    def create(cls, ncpus: int | None = None, max_counters: int = 1024,
               max_stocked: int | None = None, max_writers: int = 32) -> Self:
        """Create a new arena; this process becomes its creator and owns unlink.

        ncpus: CPU slots (default: the CPUs this process may run on). More CPUs than
        cores is fine. max_counters: counter records. max_stocked: counters that can
        have stock at once (default max_counters); enable_stock returns False past it.
        max_writers: processes other than CPUs that may change usages at once
        (each needs a writer row; rows of dead processes are reused).
        """
        if ncpus is None:
            ncpus = len(os.sched_getaffinity(0))
        if max_stocked is None:
            max_stocked = max_counters
        for what, v, lo in (("ncpus", ncpus, 1), ("max_counters", max_counters, 1),
                            ("max_stocked", max_stocked, 0), ("max_writers", max_writers, 1)):
            if type(v) is not int or not lo <= v <= GEOMETRY_LIMIT:
                raise ValueError(f"{what} must be an int in [{lo}, 2**20], got {v!r}")
        sweep_dead_arenas()
        sec = _Sections(ncpus, max_counters, max_stocked, max_writers)
        while True:
            name = f"{NAME_PREFIX}{os.getpid()}_{secrets.token_hex(4)}"
            try:
                shm = shared_memory.SharedMemory(name, create=True, size=sec.size)
                break
            except FileExistsError:
                continue
        try:
            hdr = np.ndarray((HEADER_WORDS,), np.int64, shm.buf)
            hdr[:] = 0
            hdr[H_MAGIC], hdr[H_VERSION] = MAGIC, LAYOUT_VERSION
            hdr[H_NCPUS], hdr[H_MAX_COUNTERS], hdr[H_MAX_STOCKED] = ncpus, max_counters, max_stocked
            hdr[H_CREATOR_PID], hdr[H_CREATOR_START] = os.getpid(), my_start_time()
            hdr[H_SIZE], hdr[H_MAX_WRITERS] = sec.size, max_writers
            del hdr
            arena = cls(shm, creator=True)
            arena.stock_owner[:] = -1
            return arena
        except BaseException:
            shm.close()
            shm.unlink()
            raise

    @classmethod
    def attach(cls, name: str) -> Self:
        """Attach to an existing arena by name, from any process of this uid on this
        machine.

        A process has one handle per arena: if this process has arena `name` open
        already (it created it, attached it, or runs as one of its CPUs), attach
        returns that same handle and counts one more open. So a CPU process that
        attaches again is still that CPU (this_cpu(), the stock fast path,
        drain_stock_local), and owns one writer row. Each open is undone by one
        close(); the last one unmaps.

        Raises ArenaError when /dev/shm/`name` is not a regular file owned by this
        process's uid (a symlink, FIFO, directory or another user's file is never
        opened for good), or not a shmcounter arena of this layout version.
        """
        if not isinstance(name, str):
            raise TypeError(f"arena name must be a str, got {type(name).__name__}")
        with _opens_lock:
            arena = _by_name.get(name)
            if arena is not None and not arena._closed:
                arena._opens += 1
                return cast("Self", arena)        # one class (Arena) opens them all
            shm = _open_untracked(name)
            try:
                return cls(shm, creator=False)
            except BaseException:
                shm.close()
                raise

    def __reduce__(self) -> tuple[Callable[[str], Self], tuple[str]]:
        return (type(self)._unpickle, (self.name,))

    @classmethod
    def _unpickle(cls, name: str) -> Self:
        """This process's open handle on arena `name`, attaching if it has none."""
        arena = _by_name.get(name)
        if arena is not None and not arena.closed:
            return cast("Self", arena)                    # see attach
        return cls.attach(name)

    # ---- lifetime -----------------------------------------------------------

    @property
    def name(self) -> str:
        return self._shm.name

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Undo one open of this handle (Arena.create, or an Arena.attach that
        returned it); the last one closes it: a CPU on this handle goes offline
        first (unregister_cpu), the writer row is given back, and this process's
        view is unmapped. Every method of the handle and of its counters raises
        ArenaError afterwards. Call it once per open: an extra call undoes another
        user's open of the same handle. Once closed, more calls do nothing; a
        half-built handle closes too. A process that exits closes what it left
        open (_close_at_exit)."""
        with _opens_lock:                   # an attach meanwhile gets a new handle
            if self._opens > 1:
                self._opens -= 1
                return
            self._close(warn=True)

    def _close(self, warn: bool) -> None:
        """Close this handle whatever its count of opens (close's last step, and
        the exit hook); then drop its views and unmap, which may be retried."""
        if not self._closed:
            for close in reversed(_handle_hooks["close"]):   # higher layers first
                close(self)
            for release in _handle_hooks["release"]:
                release(self)
            _open_arenas.discard(self)
            if _by_name.get(self._shm.name) is self:
                del _by_name[self._shm.name]
            self._closed = True
        shm: shared_memory.SharedMemory | None = self._shm      # None: half-built
        if shm is None:
            return
        if self._slots is not None:         # kept: every later step raises ArenaError
            self._slots.release(ArenaError, f"arena {shm.name} is closed")
        for attr in _VIEWS:
            self.__dict__.pop(attr, None)
        try:
            shm.close()
        except BufferError:
            # A caller keeps a view: the mapping goes when the last view does. Drop
            # our references, so that SharedMemory.__del__ has nothing left to close.
            if warn:
                warnings.warn(f"arena {shm.name!r}: numpy views of it are still "
                              f"referenced, so it stays mapped until they are gone",
                              RuntimeWarning, stacklevel=3)
            private = vars(shm)                   # typeshed declares none of these
            private["_buf"] = private["_mmap"] = None
            os.close(private["_fd"])
            private["_fd"] = -1

    def unlink(self) -> None:
        """Remove the segment's name (creator only). Processes that have it mapped
        keep working; nobody can attach afterwards."""
        shm: shared_memory.SharedMemory | None = self._shm      # None: half-built
        if shm is None or self._unlinked:
            return
        if not self._creator:
            raise ArenaError(f"only the creator process unlinks arena {shm.name!r}")
        self._unlinked = True
        try:
            shm.unlink()
        except FileNotFoundError:
            pass                          # swept, or unlinked by the tracker

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        """close(); the creator's handle also unlinks, once that close was its last."""
        self.close()
        if self._creator and self._closed:
            self.unlink()

    def _check_open(self) -> None:
        if self._closed:
            shm: shared_memory.SharedMemory | None = self._shm  # None: half-built
            raise ArenaError(f"arena {shm.name if shm is not None else '?'} is closed")

    # ---- registry lock: serialises counter creation and stock-id allocation --

    def _registry_lock(self) -> None:
        """Take the arena-wide registry lock (pidlock.py); the threads of one process
        queue on _registry_threads first, so our own pid in the word is stale.
        WaitTimeout after wait_timeout seconds of one live holder."""
        _registry_threads.acquire()
        try:
            stolen = pidlock.lock(self, H_REGISTRY_LOCK, os.getpid(), "the registry lock",
                                  stale_self=True)
        except BaseException:
            _registry_threads.release()
            raise
        if stolen:
            try:
                # The dead holder may have claimed a stock id without publishing it.
                self._repair_stock_owners()
            except BaseException:
                self._registry_unlock()
                raise

    def _registry_unlock(self) -> None:
        pidlock.unlock(self._slots, H_REGISTRY_LOCK, os.getpid())
        _registry_threads.release()

    def _repair_stock_owners(self) -> None:
        for sid in np.flatnonzero(self.stock_owner >= 0):
            c = int(self.stock_owner[sid])
            if c >= self._published() or self.records[c, PC_STOCK_ID] != sid:
                self.stock_owner[sid] = -1

    # ---- counters -----------------------------------------------------------

    def _corrupt(self, field: str, value: object, expected: str) -> ArenaCorrupt:
        """The error for word `field` of this arena holding the impossible `value`."""
        return ArenaCorrupt(self._shm.name, field, value, expected)

    def _published(self) -> int:
        n = self._slots.load(H_NCOUNTERS)
        if not 0 <= n <= self.max_counters:
            raise self._corrupt("header ncounters", n,
                                f"not a count in [0, max_counters = {self.max_counters}]")
        return n

    def _name(self, index: int) -> str:
        """Counter `index`'s name: 1 to 63 bytes of UTF-8 without NUL, NUL padded."""
        raw = bytes(self.names[index]).rstrip(b"\0")
        try:
            name = raw.decode()
        except UnicodeDecodeError:
            name = ""
        if not name or b"\0" in raw or len(raw) >= NAME_BYTES:
            raise self._corrupt(f"counter {index}'s name", raw,
                                "not 1 to 63 bytes of UTF-8 without NUL")
        return name

    def _refresh_index(self) -> None:
        n = self._published()
        for i in range(self._known, n):
            name = self._name(i)
            if self._index.get(name, i) != i:
                raise self._corrupt(f"counter {i}'s name", name,
                                    f"which counter {self._index[name]} has: names are unique")
            self._index[name] = i
            self._known = i + 1

    def _handle(self, index: int, field: str = "a counter index") -> PageCounter:
        """The handle of counter `index` (built once). An index read from the
        segment is checked here: `field` names its word in the error. Building a
        handle checks its path: each parent is an earlier counter, at most
        MAX_DEPTH levels (handles are built root first, so never recursively)."""
        if 0 <= index < self.max_counters and (h := self._handles[index]) is not None:
            return h
        n = self._published()
        if not 0 <= index < n:
            raise self._corrupt(field, index, f"not a counter index below ncounters = {n}")
        h = self._handles[index]
        if h is None:
            unbuilt = [index]                      # index, its parent, ... child first
            while True:
                i = unbuilt[-1]
                parent = self._parent(i)
                if parent < 0 or self._handles[parent] is not None:
                    break
                if len(unbuilt) == MAX_DEPTH:
                    raise self._corrupt(f"the depth of counter {index}", MAX_DEPTH + 1,
                                        f"not at most MAX_DEPTH = {MAX_DEPTH}: a parent "
                                        f"word is wrong")
                unbuilt.append(parent)
            for i in reversed(unbuilt[1:]):        # its unbuilt ancestors, root first
                self._handles[i] = _counter_type[0](self, i)
            h = self._handles[index] = _counter_type[0](self, index)
        return h

    def _parent(self, index: int) -> int:
        """Counter `index`'s parent: -1 (a root) or an earlier counter, since a
        parent is created before its children."""
        parent = int(self.records[index, PC_PARENT])
        if not -1 <= parent < index:
            raise self._corrupt(f"counter {index}'s parent", parent,
                                "not -1 or an earlier counter")
        return parent

    def _child_counters(self, index: int) -> list[int]:
        """The indexes of counter `index`'s children, in creation order, whoever
        created them. This handle keeps the index of children and extends it with
        the counters published since its last call: a counter's parent never
        changes and ncounters only grows, so a call costs one load of ncounters
        when no counter was created since, and the cost of a walk of a subtree
        does not grow with the rest of the tree. The caller must not modify the
        list."""
        n = self._published()
        if self._children_known < n:
            with self._children_lock:
                for i in range(self._children_known, n):
                    parent = self._parent(i)
                    if parent >= 0:
                        self._children.setdefault(parent, []).append(i)
                    self._children_known = i + 1
        return self._children.get(index, [])

    def _parents(self, n: int) -> np.ndarray:
        """The parents of counters 0..n-1, each checked as by _parent."""
        parents = self.records[:n, PC_PARENT].copy()
        bad = np.flatnonzero((parents < -1) | (parents >= np.arange(n)))
        if len(bad):
            self._parent(int(bad[0]))              # raises, naming the first
        return parents

    def _stock_ids(self, n: int) -> np.ndarray:
        """The stock ids of counters 0..n-1: each -1 or below max_stocked."""
        sids = self.records[:n, PC_STOCK_ID].copy()
        bad = np.flatnonzero((sids < -1) | (sids >= self.max_stocked))
        if len(bad):
            raise self._corrupt(f"counter {int(bad[0])}'s stock_id", int(sids[bad[0]]),
                                f"not -1 or a stock id below max_stocked = {self.max_stocked}")
        return sids

    @property
    def drain_timeout(self) -> float:
        """Seconds a drain_stock waits for a live CPU before DrainTimeout (default
        5): a finite number > 0. Too short gives false timeouts on a busy machine;
        too long stalls a failing charge."""
        self._check_open()
        return self._drain_timeout

    @drain_timeout.setter
    def drain_timeout(self, seconds: float) -> None:
        self._check_open()
        check_timeout(seconds, "drain_timeout")
        self._drain_timeout = seconds

    @property
    def wait_timeout(self) -> float:
        """Seconds any wait on a word of the segment (the registry lock,
        stop_machine, a row's op, a CPU's own slot lock) waits for one live holder
        before WaitTimeout (default 10; wait.py): a finite number > 0. Holds last
        microseconds, a stop_machine milliseconds: only a holder stopped with
        SIGSTOP (or stuck), or a corrupted word, makes a wait run out."""
        self._check_open()
        return self._wait_timeout

    @wait_timeout.setter
    def wait_timeout(self, seconds: float) -> None:
        self._check_open()
        check_timeout(seconds, "wait_timeout")
        self._wait_timeout = seconds

    @property
    def underflows(self) -> int:
        """Uncharges that would have taken a usage below 0 (clamped, and warned)."""
        self._check_open()
        return self._slots.load(H_UNDERFLOWS)

    # ---- CPUs ---------------------------------------------------------------

    def cpu_pid(self, cpu: int) -> int:
        """Pid registered as CPU `cpu`, or 0."""
        self._check_open()
        return self._slots.load(self._cpu_slot(cpu))

    def online_cpus(self) -> list[int]:
        """CPUs whose registered process is alive."""
        self._check_open()
        return [cpu for cpu in range(self.ncpus) if self.row_owner_alive(cpu)]

    def row_owner_alive(self, row: int) -> bool:
        """Is the process that owns writer row `row` (CPU k: row k) still running?
        Pid and start time: a pid reused since by another process does not count."""
        self._check_open()
        base = self._row_slot(row)
        pid = self._slots.load(base + R_PID)
        return pid != 0 and pid_alive(pid, self._slots.load(base + R_START))

    def _set_row_owner(self, row: int, pid: int) -> None:
        """Record the start time of row `row`'s new owner `pid` (this process), or,
        with pid 0, forget it before the row is freed: start is 0 whenever the row
        is free, so a checker never pairs a new pid with an old start."""
        self._slots.store(self._row_slot(row) + R_START, my_start_time() if pid else 0)

    def _cpu_slot(self, cpu: int) -> int:
        """The slot of CPU `cpu`'s registered pid (its row's R_PID); validates cpu."""
        if type(cpu) is not int or not 0 <= cpu < self.ncpus:
            raise (TypeError if type(cpu) is not int else ValueError)(
                f"cpu must be an int in [0, {self.ncpus}), got {cpu!r}")
        return self._rows_slot + cpu * ROW_WORDS + R_PID

    def _row_slot(self, row: int) -> int:
        return self._rows_slot + row * ROW_WORDS

    def _contrib_slot(self, row: int, index: int) -> int:
        return self._contrib_slot0 + row * self._counter_block_words + index

    def _request_slot(self, cpu: int, index: int) -> int:
        return self._requests_slot0 + cpu * self._request_block_words + index

    def _summary_slot(self, cpu: int, word: int) -> int:
        """Word `word` of CPU `cpu`'s summary of its request flags."""
        return (self._requests_slot0 + cpu * self._request_block_words
                + self._counter_block_words + word)

    def _stock_slot(self, cpu: int, sid: int) -> int:
        return self._stocks_slot + cpu * self._stock_block_words + sid * STOCK_WORDS

    def _set_layout(self) -> None:
        sec = self._sec
        self._slots.set_layout(self._shm.name, sec.rows // WORD, sec.counters // WORD,
                               self.max_counters, sec.stocks // WORD, sec.stock_block // WORD,
                               self.ncpus, self.max_stocked, H_STOP)

    # This process's CPU, set by register_cpu (Slots.set_cpu), where the ops of
    # _counter.c read it: the first slot of its stock block, its lock owner token
    # (its pid), and its row's first slot. -1, 0, -1: not a CPU of this arena.
    @property
    def _stock_block(self) -> int:
        return -1 if self._slots is None else self._slots.cpu_block

    @property
    def _stock_owner(self) -> int:
        return 0 if self._slots is None else self._slots.owner

    @property
    def _stock_row(self) -> int:
        return -1 if self._slots is None or self._slots.cpu_block < 0 else self._slots.row

    def section(self, name: str) -> np.ndarray:
        """The int64 words of section `name` (register_section), for its owner."""
        self._check_open()
        at, nbytes = self._extra[name]
        return np.ndarray((nbytes // WORD,), np.int64, self._bytes, at)

    def section_slot(self, name: str) -> int:
        """The slot index of the first word of section `name`."""
        self._check_open()
        return self._extra[name][0] // WORD

    def __repr__(self) -> str:
        if self._closed:
            return "<Arena closed>"
        return (f"<Arena {self._shm.name!r} ncpus={self.ncpus} "
                f"counters={self._published()}/{self.max_counters}>")


def _close_at_exit() -> None:
    """Close every handle this process left open, before the interpreter tears its
    objects down in no particular order (a SharedMemory collected while our views
    of it live prints an ignored BufferError). A CPU goes offline on the way
    (close). A process that ends in os._exit (a forked multiprocessing child) or
    is killed skips this: its CPU is then the hotplug path's, as after a kill."""
    for arena in list(_open_arenas):
        arena._close(warn=False)


atexit.register(_close_at_exit)


def _check_header(name: str, header: bytes, actual: int) -> None:
    """Raise ArenaError unless `header`, the first bytes of segment `name` of
    `actual` bytes, is the header of a whole arena of our layout version."""
    if len(header) < HEADER_WORDS * WORD:
        raise ArenaError(f"segment {name!r} ({actual} bytes) is not a shmcounter arena: "
                         f"too small for the header")
    magic, version = struct.unpack_from("<qq", header, 0)
    if magic != MAGIC:
        raise ArenaError(f"segment {name!r} is not a shmcounter arena "
                         f"(magic {magic:#x}, expected {MAGIC:#x})")
    if version != LAYOUT_VERSION:
        raise ArenaError(f"segment {name!r} has layout version {version}; this "
                         f"shmcounter reads layout version {LAYOUT_VERSION}")
    size = struct.unpack_from("<q", header, H_SIZE * WORD)[0]
    if actual < size:
        raise ArenaError(f"segment {name!r} is truncated: {actual} of {size} bytes")


def _check_geometry(name: str, buf: memoryview) -> _Sections:
    """The sections of segment `name` (mapped as `buf`) from its header, or
    ArenaCorrupt if the geometry is out of range or not that of a segment of the
    header's size. Reads through struct: no buffer export outlives the call."""
    words = struct.unpack_from(f"<{HEADER_WORDS}q", buf, 0)
    for field, word, lo in (("ncpus", H_NCPUS, 1), ("max_counters", H_MAX_COUNTERS, 1),
                            ("max_stocked", H_MAX_STOCKED, 0),
                            ("max_writers", H_MAX_WRITERS, 1)):
        if not lo <= words[word] <= GEOMETRY_LIMIT:
            raise ArenaCorrupt(name, f"header {field}", words[word], f"not in [{lo}, 2**20]")
    sec = _Sections(words[H_NCPUS], words[H_MAX_COUNTERS], words[H_MAX_STOCKED],
                    words[H_MAX_WRITERS])
    if words[H_SIZE] != sec.size or len(buf) < sec.size:
        raise ArenaCorrupt(name, "header size", words[H_SIZE],
                           f"not {sec.size}, the size of this geometry (the segment has "
                           f"{len(buf)} bytes)")
    return sec


def check_counter_name(name: object) -> bytes:
    """The UTF-8 bytes of counter name `name`; TypeError or ValueError if it is not
    1 to 63 bytes of UTF-8 without NUL."""
    if not isinstance(name, str):
        raise TypeError(f"counter name must be a str, got {type(name).__name__}")
    encoded = name.encode()
    if not 0 < len(encoded) < NAME_BYTES or b"\0" in encoded:
        raise ValueError(f"counter name must be 1..{NAME_BYTES - 1} UTF-8 bytes "
                         f"without NUL, got {name!r}")
    return encoded
