"""shmcounter.memcg: cgroups on the page counters, in the series' designs and the
old one it replaces.

    section.py        its section of the segment (cgroup records, per-CPU blocks)
    cgroup.py         MemCgroup: a handle on one cgroup
    cgroups.py        Cgroups: the tree, try_charge_memcg, drain_all_stock
    variants.py       the designs' interface and the series' designs (fixed, v2, rfc)
    legacy_design.py  the old design, on legacy.py (its 7 slots) and _legacy.c
    v4_design.py      the series' v4: the lockless stock, drained remotely

Importing it registers the designs, in this order (the segment records a tree's
design by its index): a new design is one module and one import below.
"""
# registers "legacy", then "v4", after fixed, v2 and rfc (variants.py)
from . import legacy_design, v4_design  # noqa: F401
from .cgroup import MemCgroup
from .cgroups import Cgroups
from .variants import DESIGNS

VARIANTS = tuple(DESIGNS)

__all__ = ["VARIANTS", "Cgroups", "MemCgroup"]
