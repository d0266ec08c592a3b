"""procs: the CPU-process runtime of shmcounter. One process per CPU, pinned to a
core; work_on_cpu; the CPU-hotplug dead path. See machine.py."""
from .errors import BrokenMachine, CpuDead, CpuError, DrainTimeout
from .machine import Machine

__all__ = ["BrokenMachine", "CpuDead", "CpuError", "DrainTimeout", "Machine"]
