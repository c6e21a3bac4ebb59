"""The scripting API: a guest :class:`~dirtylog.guest.machine.Machine` that can also log its dirty pages.

The guest layer knows nothing of trackers (they sit above it); this facade adds ``dirty_log()`` so that
users get one object: ``with Machine(...) as m: t = m.dirty_log("clear")``.
"""

from __future__ import annotations

from dirtylog.guest import machine as guest
from dirtylog.tracking.base import DIRTY_LOG_MODES, TRACKING_MODES, DirtyLogMode, Tracker, TrackingError, TrackingMode
from dirtylog.tracking.guest_uffd import GuestUffdTracker
from dirtylog.tracking.kvm_log import DEFAULT_CLEAR_CHUNK_PAGES, ClearTracker, LogTracker
from dirtylog.tracking.kvm_ring import RingTracker

__all__ = ["DIRTY_LOG_MODES", "TRACKING_MODES", "DirtyLogMode", "Machine", "TrackingMode"]


class Machine(guest.Machine):
    """A KVM virtual machine running a guest workload, with dirty page logging.

    See :class:`dirtylog.guest.machine.Machine` for the arguments and the lifecycle.
    """

    def dirty_log(self, mode: DirtyLogMode = "log", *, slots: list[int] | None = None, initially_set: bool = False,
                  clear_chunk_pages: int = DEFAULT_CLEAR_CHUNK_PAGES,
                  ring_entries: int | None = None) -> Tracker:
        """A dirty-page tracker for this machine (not yet enabled).

        ``log``: KVM_GET_DIRTY_LOG; ``clear``: KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG (``initially_set``,
        ``clear_chunk_pages``); ``ring``: per-vCPU dirty rings of ``ring_entries`` (default: the largest the
        host allows, up to 65536) — choose it before
        :meth:`start`, since KVM only allows rings before vCPUs exist. ``slots`` limits logging to those
        memory slots (default: all). ``uffd``: userfaultfd write-protect of the host memory behind guest RAM
        (Linux 6.7): it also sees writes the host makes, which KVM's log never does; it touches no slot, so
        it may run beside a KVM mode.
        """
        if mode == "log":
            return LogTracker(self, slots)
        if mode == "clear":
            return ClearTracker(self, slots, initially_set=initially_set, chunk_pages=clear_chunk_pages)
        if mode == "ring":
            return RingTracker(self, slots, entries=ring_entries)
        if mode == "uffd":
            if slots is not None:
                raise TrackingError("the uffd mode watches all of guest RAM; it takes no slots")
            return GuestUffdTracker(self)
        raise TrackingError(f"unknown dirty-log mode {mode!r}; choose one of {', '.join(DIRTY_LOG_MODES)}")
