"""The one interface every dirty-tracking backend offers: enable, collect, disable.

A collection returns the guest pages written since the previous collection (or since ``enable``), as a
:class:`DirtyBitmap` over guest-physical page frame numbers. After ``collect()`` returns, the reported pages
are write-protected again, so a consumer that reads their contents *after* collect cannot miss a later
write: it will be in the next collection. That is the contract migration and snapshots rely on.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, Self

from dirtylog.bitmap import DirtyBitmap
from dirtylog.errors import DirtylogError

#: The KVM dirty-log modes a machine offers (``Machine.dirty_log``).
TrackingMode = Literal["log", "clear", "ring"]
TRACKING_MODES: tuple[TrackingMode, ...] = ("log", "clear", "ring")


class TrackingError(DirtylogError):
    """A tracker asked to do what it cannot: not enabled, an unknown slot, a bad setting."""


@dataclass
class TrackerStats:
    """Running totals of a tracker, in the vocabulary of the KVM selftests' dirty_log_perf_test."""

    collections: int = 0
    pages_reported: int = 0
    enable_seconds: float = 0.0
    last_collect_seconds: float = 0.0
    total_collect_seconds: float = 0.0
    disable_seconds: float = 0.0

    def record_collect(self, seconds: float, pages: int) -> None:
        self.collections += 1
        self.pages_reported += pages
        self.last_collect_seconds = seconds
        self.total_collect_seconds += seconds


class Tracker(ABC):
    """A dirty-page tracker over a guest-physical page range ``[0, npages)``."""

    mode: str = "?"

    def __init__(self, npages: int) -> None:
        self.npages = npages
        self.stats = TrackerStats()
        self.enabled = False

    def enable(self) -> None:
        """Start tracking: from now on every guest write is reported by some collection."""
        start = time.perf_counter()
        self._enable()
        self.enabled = True
        self.stats.enable_seconds = time.perf_counter() - start

    def collect(self) -> DirtyBitmap:
        """Pages written since the last collection; they are write-protected again on return."""
        if not self.enabled:
            raise TrackingError(f"{self.mode} tracker is not enabled; call enable() first")
        start = time.perf_counter()
        bitmap = self._collect()
        self.stats.record_collect(time.perf_counter() - start, bitmap.count())
        return bitmap

    def disable(self) -> None:
        """Stop tracking and release what tracking holds."""
        if not self.enabled:
            return
        start = time.perf_counter()
        self._disable()
        self.enabled = False
        self.stats.disable_seconds = time.perf_counter() - start

    def __enter__(self) -> Self:
        self.enable()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.disable()

    @abstractmethod
    def _enable(self) -> None: ...

    @abstractmethod
    def _collect(self) -> DirtyBitmap: ...

    @abstractmethod
    def _disable(self) -> None: ...
