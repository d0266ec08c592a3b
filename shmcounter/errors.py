"""Exceptions of shmcounter."""
import errno


class ArenaError(Exception):
    """The arena cannot do what was asked: not a shmcounter segment, another layout
    version, closed, full, or a CPU registration in the wrong state."""


class ArenaCorrupt(ArenaError):
    """A word read from the segment is impossible: an index out of its section, a
    parent that is not an earlier counter, a name that is not UTF-8, an intent
    record that names no op... Something wrote where it must not (a stray write, a
    foreign process): the library refuses to use the word, and changes nothing.

    segment, field and value name the word; the message says what was expected.
    """

    def __init__(self, segment: str, field: str, value: object, expected: str) -> None:
        super().__init__(f"arena {segment!r}: {field} is {value!r}, {expected}")
        self.segment, self.field, self.value, self.expected = segment, field, value, expected

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return (type(self), (self.segment, self.field, self.value, self.expected))


class WaitTimeout(ArenaError, TimeoutError):
    """A wait on a word of the segment ran out (Arena.wait_timeout): what was waited
    for, the pid that held it (as the word says), and for how many seconds. A live
    holder that never lets go (a process stopped with SIGSTOP inside an op, say),
    or a corrupted word naming a live process."""

    def __init__(self, segment: str, what: str, holder: int, seconds: float) -> None:
        super().__init__(f"arena {segment!r}: waited {seconds} s for {what}, "
                         f"held by pid {holder}")
        self.segment, self.what, self.holder, self.seconds = segment, what, holder, seconds

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return (type(self), (self.segment, self.what, self.holder, self.seconds))


class Busy(OSError):
    """EBUSY from set_max: usage stays above the requested limit, which is unchanged."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EBUSY, message)


class CpuError(Exception):
    """Something about one CPU (process): the base of procs.CpuDead and DrainTimeout."""

    def __init__(self, message: str, cpu: int, pid: int) -> None:
        super().__init__(message)
        self.cpu = cpu
        self.pid = pid

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return (type(self), (str(self), self.cpu, self.pid))


class DrainTimeout(CpuError):
    """A live CPU did not answer a drain request in time; its stock stays charged."""
