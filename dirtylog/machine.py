"""The scripting API: a guest :class:`~dirtylog.guest.machine.Machine` that can also log its dirty pages.

The guest layer knows nothing of trackers (they sit above it); this facade adds ``dirty_log()`` so that
users get one object: ``with Machine(...) as m: t = m.dirty_log("clear")``.
"""

from __future__ import annotations

from dirtylog.guest import machine as guest
from dirtylog.tracking.base import TRACKING_MODES, Tracker, TrackingError, TrackingMode
from dirtylog.tracking.kvm_log import DEFAULT_CLEAR_CHUNK_PAGES, ClearTracker, LogTracker
from dirtylog.tracking.kvm_ring import RingTracker

__all__ = ["TRACKING_MODES", "Machine", "TrackingMode"]


class Machine(guest.Machine):
    """A KVM virtual machine running a guest workload, with dirty page logging.

    See :class:`dirtylog.guest.machine.Machine` for the arguments and the lifecycle.
    """

    def dirty_log(self, mode: TrackingMode = "log", *, slots: list[int] | None = None, initially_set: bool = False,
                  clear_chunk_pages: int = DEFAULT_CLEAR_CHUNK_PAGES,
                  ring_entries: int | None = None) -> Tracker:
        """A dirty-page tracker for this machine (not yet enabled).

        ``log``: KVM_GET_DIRTY_LOG; ``clear``: KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG (``initially_set``,
        ``clear_chunk_pages``); ``ring``: per-vCPU dirty rings of ``ring_entries`` (default: the largest the
        host allows, up to 65536) — choose it before
        :meth:`start`, since KVM only allows rings before vCPUs exist. ``slots`` limits logging to those
        memory slots (default: all).
        """
        if mode == "log":
            return LogTracker(self, slots)
        if mode == "clear":
            return ClearTracker(self, slots, initially_set=initially_set, chunk_pages=clear_chunk_pages)
        if mode == "ring":
            return RingTracker(self, slots, entries=ring_entries)
        raise TrackingError(f"unknown dirty-log mode {mode!r}; choose one of {', '.join(TRACKING_MODES)}")
