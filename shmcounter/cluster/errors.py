"""The cluster's exceptions."""
from __future__ import annotations


class ClusterError(Exception):
    """A cluster operation failed: a bad request, or the server said no."""


class HostStale(ClusterError):
    """The host's epoch is no longer the live one: its lease expired and it was
    reaped (or it left). Every page it had charged was uncharged by the reap;
    the host must rejoin (Host.rejoin) and start from zero."""
