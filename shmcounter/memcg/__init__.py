"""shmcounter.memcg: cgroups on the page counters, in the series' designs and the
old one it replaces (cgroups.py, variants.py, legacy.py)."""
from .cgroups import VARIANTS, Cgroups, MemCgroup

__all__ = ["VARIANTS", "Cgroups", "MemCgroup"]
