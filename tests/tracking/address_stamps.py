"""The stamp proof for process memory: the checks of :mod:`dirtylog.tracking.verify`, over virtual addresses.

Every stamped page has one writer thread and its stamp only grows. Around collection ``k`` the verifier
reads each thread's completed-iteration counter *before* the collection (``S_k``) and every page's stamp
*after* it (``M_k``), and checks, with no assumption about timing:

* **lost**: a page whose stamp changed between ``M_{k-1}`` and ``M_k`` is reported by ``k`` or ``k+1``;
* **stale**: a page not reported by ``k`` never holds a stamp newer than at its last report and older
  than ``S_k`` (such a write happened before ``k`` began and after its last report: ``k`` must see it).

A reported page whose stamp is older than ``S_{k-1}`` was not written since collection ``k-1`` began:
an over-report, counted, not failed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from dirtylog.tracking.process import ProcessTracker
from dirtylog.tracking.process_dirty import ProcessDirty

Stamps = npt.NDArray[np.uint64]


@dataclass
class StampReport:
    collections: int = 0
    pages_reported: int = 0  # stamped pages reported, over all collections
    changes_seen: int = 0
    over_reported: int = 0
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


def reported_among(dirty: ProcessDirty, pages: Stamps) -> npt.NDArray[np.bool_]:
    """For each address of ``pages``, whether ``dirty`` reports it."""
    reported = dirty.pages()
    if reported.size == 0:
        return np.zeros(pages.size, dtype=bool)
    index = np.minimum(np.searchsorted(reported, pages), reported.size - 1)
    return reported[index] == pages


class AddressStampVerifier:
    """Checks each collection of a :class:`ProcessTracker` against pages stamped by known threads."""

    def __init__(self, pages: Stamps, owner: npt.NDArray[np.intp], read_stamps: Callable[[], Stamps],
                 read_completed: Callable[[], Stamps]) -> None:
        self.pages = pages
        self.owner = owner
        self.read_stamps = read_stamps
        self.read_completed = read_completed
        self.report = StampReport()
        self._pending = np.zeros(pages.size, dtype=bool)
        self._s_prev = np.zeros(pages.size, dtype=np.uint64)
        self._m_prev = np.zeros(pages.size, dtype=np.uint64)
        self._reported = np.zeros(pages.size, dtype=np.uint64)

    def _floor(self) -> Stamps:
        return (self.read_completed() + np.uint64(1))[self.owner]

    def enable(self, tracker: ProcessTracker) -> None:
        self._s_prev = self._floor()
        tracker.enable()
        self._m_prev = self.read_stamps()
        self._reported = self._m_prev.copy()

    def collect(self, tracker: ProcessTracker) -> ProcessDirty:
        floor = self._floor()
        dirty = tracker.collect()
        stamps = self.read_stamps()
        k = self.report.collections + 1
        reported = reported_among(dirty, self.pages)
        changed = stamps != self._m_prev
        for kind, mask in (("lost", self._pending & ~reported),
                           ("stale", ~reported & (stamps != self._reported) & (stamps < floor))):
            for i in np.flatnonzero(mask)[:20].tolist():
                self.report.violations.append(f"collection {k}: {kind} page {int(self.pages[i]):#x} "
                                              f"(stamp {int(stamps[i])}, thread {int(self.owner[i])})")
        self.report.over_reported += int(np.count_nonzero(reported & (stamps < self._s_prev)))
        self._pending = changed & ~reported
        self._reported[reported] = stamps[reported]
        self._m_prev, self._s_prev = stamps, floor
        self.report.collections = k
        self.report.pages_reported += int(np.count_nonzero(reported))
        self.report.changes_seen += int(np.count_nonzero(changed))
        return dirty
