"""Errors of the CPU runtime. CpuError and DrainTimeout live in shmcounter (a drain
can be asked from any process); they are re-exported here."""
from concurrent.futures import BrokenExecutor

from shmcounter.errors import CpuError, DrainTimeout


class CpuDead(CpuError):
    """The CPU died (or was offline) before the task finished. Its stocks were
    reclaimed by the hotplug-dead path; other CPUs are unaffected."""


class BrokenMachine(BrokenExecutor):
    """The Machine's monitor failed: CPU deaths and replies are no longer handled.
    Every pending future fails with it, and so do submit, kill, start_cpu and the
    waits; close() kills every CPU and reclaims it. The monitor's own error is the
    __cause__."""


__all__ = ["BrokenMachine", "CpuDead", "CpuError", "DrainTimeout"]
