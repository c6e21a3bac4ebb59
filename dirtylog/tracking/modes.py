"""The dirty-log modes a machine offers, by name: one place that turns a mode into its tracker."""

from __future__ import annotations

from dirtylog.guest.machine import Machine
from dirtylog.tracking.base import DIRTY_LOG_MODES, DirtyLogMode, Tracker, TrackingError
from dirtylog.tracking.guest_uffd import GuestUffdTracker
from dirtylog.tracking.kvm_log import DEFAULT_CLEAR_CHUNK_PAGES, ClearTracker, LogTracker
from dirtylog.tracking.kvm_ring import RingTracker


def open_tracker(machine: Machine, mode: DirtyLogMode = "log", *, slots: list[int] | None = None,
                 initially_set: bool = False, clear_chunk_pages: int = DEFAULT_CLEAR_CHUNK_PAGES,
                 ring_entries: int | None = None) -> Tracker:
    """A tracker of ``machine`` in ``mode`` (not yet enabled); ``Machine.dirty_log`` documents the modes."""
    if mode == "log":
        return LogTracker(machine, slots)
    if mode == "clear":
        return ClearTracker(machine, slots, initially_set=initially_set, chunk_pages=clear_chunk_pages)
    if mode == "ring":
        return RingTracker(machine, slots, entries=ring_entries)
    if mode == "uffd":
        if slots is not None:
            raise TrackingError("the uffd mode watches all of guest RAM; it takes no slots")
        return GuestUffdTracker(machine)
    raise TrackingError(f"unknown dirty-log mode {mode!r}; choose one of {', '.join(DIRTY_LOG_MODES)}")
