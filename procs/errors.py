"""Errors of the CPU runtime. CpuError and DrainTimeout live in shmcounter (a drain
can be asked from any process); they are re-exported here."""
from shmcounter.errors import CpuError, DrainTimeout


class CpuDead(CpuError):
    """The CPU died (or was offline) before the task finished. Its stocks were
    reclaimed by the hotplug-dead path; other CPUs are unaffected."""


__all__ = ["CpuDead", "CpuError", "DrainTimeout"]
