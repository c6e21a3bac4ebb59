"""The one interface every dirty-tracking backend offers: enable, collect, disable.

A collection returns the pages written since the previous collection (or since ``enable``). After
``collect()`` returns, the reported pages are write-protected again, so a consumer that reads their
contents *after* collect cannot miss a later write: it will be in the next collection. That is the
contract migration and snapshots rely on.

What a collection returns depends on the memory: a guest's RAM is one dense range of guest-physical
pages, so its trackers (:class:`Tracker`) return a :class:`DirtyBitmap` over page frame numbers; a
process's address space is sparse and made of mappings, so :class:`~dirtylog.tracking.process.ProcessTracker`
returns per-mapping results. Both are a :class:`TrackerBase` over a result that can at least ``count()``.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, Literal, Protocol, Self, TypeVar

from dirtylog.bitmap import DirtyBitmap
from dirtylog.errors import DirtylogError

#: The KVM dirty-log modes a machine offers (``Machine.dirty_log``).
TrackingMode = Literal["log", "clear", "ring"]
TRACKING_MODES: tuple[TrackingMode, ...] = ("log", "clear", "ring")
#: All of ``Machine.dirty_log``'s modes: KVM's, and ``uffd``, which watches guest RAM from the host side
#: (userfaultfd write-protect) and so also sees the host's own writes.
DirtyLogMode = Literal["log", "clear", "ring", "uffd"]
DIRTY_LOG_MODES: tuple[DirtyLogMode, ...] = (*TRACKING_MODES, "uffd")


class TrackingError(DirtylogError):
    """A tracker asked to do what it cannot: not enabled, an unknown slot, a bad setting."""


class DirtySet(Protocol):
    """What any collection returns: a set of dirty pages that can say how many it holds."""

    def count(self) -> int: ...


ResultT = TypeVar("ResultT", bound=DirtySet)


@dataclass
class TrackerStats:
    """Running totals of a tracker, in the vocabulary of the KVM selftests' dirty_log_perf_test.

    ``pages_reported``: the pages of every collection, except for a tracker whose results count lazily
    (:class:`~dirtylog.tracking.process.ProcessTracker`): there, of every collection whose result was
    counted or read (``count()``, ``pages()``, per-mapping counts), as the CLI's are.
    """

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

    def add_pages(self, pages: int) -> None:
        """Pages of a collection counted after it was recorded (a lazily counted result's tally)."""
        self.pages_reported += pages


class TrackerBase(ABC, Generic[ResultT]):
    """A dirty-page tracker whose collections return ``ResultT``."""

    mode: str = "?"

    def __init__(self) -> None:
        self.stats = TrackerStats()
        self.enabled = False

    def enable(self) -> None:
        """Start tracking: from now on every guest write is reported by some collection."""
        start = time.perf_counter()
        self._enable()
        self.enabled = True
        self.stats.enable_seconds = time.perf_counter() - start

    def collect(self) -> ResultT:
        """Pages written since the last collection; they are write-protected again on return."""
        if not self.enabled:
            raise TrackingError(f"{self.mode} tracker is not enabled; call enable() first")
        start = time.perf_counter()
        result = self._collect()
        self._account(time.perf_counter() - start, result)
        return result

    def _account(self, seconds: float, result: ResultT) -> None:
        """Add a collection to :attr:`stats` (a tracker whose results count themselves lazily overrides it)."""
        self.stats.record_collect(seconds, result.count())

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
    def _collect(self) -> ResultT: ...

    @abstractmethod
    def _disable(self) -> None: ...


class Tracker(TrackerBase[DirtyBitmap]):
    """A dirty-page tracker over a guest-physical page range ``[0, npages)``."""

    def __init__(self, npages: int) -> None:
        super().__init__()
        self.npages = npages
