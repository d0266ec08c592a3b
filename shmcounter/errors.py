"""Exceptions of shmcounter."""
import errno


class ArenaError(Exception):
    """The arena cannot do what was asked: not a shmcounter segment, another layout
    version, closed, full, or a CPU registration in the wrong state."""


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

    def __reduce__(self):
        return (type(self), (str(self), self.cpu, self.pid))


class DrainTimeout(CpuError):
    """A live CPU did not answer a drain request in time; its stock stays charged."""
