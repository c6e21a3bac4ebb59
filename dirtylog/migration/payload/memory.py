"""The destination's copy of guest memory as it fills: pages, the round each came from, and their digest.

Several streams apply batches at once, and a page may be sent in two rounds on two streams; the copy
of the later round must win whatever the arrival order, so every page remembers the round of the copy
it holds and an older copy is dropped. The digest follows every page applied, so the check at the end
costs one hash over the fingerprints, not a pass over memory.

A one-run batch of non-zero pages (``PageBatch.run``) is applied with slices and ints: with the cache full
of page data each NumPy call costs 10-20 us, and the usual batch would otherwise spend more on per-page
arrays than on its pages.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from dirtylog.migration.payload.digest import PageDigest
from dirtylog.migration.payload.pages import batch_pages, pfns_from_runs
from dirtylog.migration.protocol.events import PageBatch


@dataclass(frozen=True)
class Applied:
    """What one batch changed: pages written with data, pages zeroed, and bytes it carried."""

    normal: int
    zero: int
    wire_bytes: int


class DestinationMemory:
    """Guest pages ``pages`` (shape ``(npages, page_size)``, zeroed) filling from page batches."""

    def __init__(self, pages: NDArray[np.uint8]) -> None:
        self.pages = pages
        self._round = np.full(pages.shape[0], -1, dtype=np.int64)
        self._digest = PageDigest(pages.shape[0])  # zeroed memory: every fingerprint is the zero page's
        self._lock = threading.Lock()

    def apply(self, batch: PageBatch) -> Applied:
        """Write a batch, keeping for each page the copy of the latest round; safe from several threads."""
        data = batch_pages(batch)  # before taking the lock: streams decompress in parallel
        run = batch.run
        if run is not None and self._apply_run(batch.round, run[0], data):
            return Applied(len(data), 0, len(batch.data))
        normal, zeros = self._apply_pages(batch, data)
        return Applied(normal, zeros, len(batch.data))

    def place_run(self, round: int, first: int, npages: int) -> memoryview | None:
        """Where a one-run batch's pages may be received in place: their own bytes in guest memory, unless a
        later round of one of them has already arrived (then None: the batch goes the usual way)."""
        if first < 0 or first + npages > self.pages.shape[0]:
            return None
        with self._lock:
            if (self._round[first:first + npages] > round).any():
                return None
        return self.pages[first:first + npages].data.cast("B")

    def digest(self) -> bytes:
        """The memory digest of everything applied so far."""
        with self._lock:
            return self._digest.digest()

    def digest_as_zero(self, pfns: NDArray[np.uint64]) -> bytes:
        """The digest with pages ``pfns`` counted as zero pages (post-copy's check of the pages kept)."""
        with self._lock:
            return self._digest.digest_as_zero(pfns)

    @property
    def fingerprints(self) -> NDArray[np.uint64]:
        """Each page's fingerprint (the array itself): for a compiled installer that sets them as
        :meth:`installed` does, without the lock (a page's fingerprint is written once per copy, the same each
        time)."""
        return self._digest.values

    def installed(self, pfns: NDArray[np.uint64], fingerprints: NDArray[np.uint64]) -> None:
        """Pages ``pfns`` were installed by other means (post-copy's userfaultfd) with these fingerprints."""
        with self._lock:
            self._digest.set(pfns, fingerprints)

    def _apply_run(self, round_: int, first: int, data: NDArray[np.uint8]) -> bool:
        """Pages ``first``, ``first + 1``, ... now hold ``data``. False, with nothing applied, when a later
        round of one of them already arrived."""
        with self._lock:
            rounds = self._round[first:first + len(data)]
            if rounds.max() > round_:
                return False
            if data.ctypes.data != self.pages[first].ctypes.data:  # else it was received in place
                self.pages[first:first + len(data)] = data
            rounds[:] = round_
            self._digest.update_run(first, data)
        return True

    def _apply_pages(self, batch: PageBatch, data: NDArray[np.uint8]) -> tuple[int, int]:
        """Any batch, with page arrays: zero pages, several runs, pages a later round already brought.
        Returns the pages applied with data and as zero pages."""
        pfns = pfns_from_runs(batch.starts, batch.lengths)
        zero = batch.zero if batch.zero is not None else np.zeros(pfns.size, dtype=np.bool_)
        with self._lock:
            newer = self._round[pfns] <= batch.round
            if not newer.all():  # a later round of this page already arrived on another stream
                data, zero, pfns = data[newer[~zero]], zero[newer], pfns[newer]
            self.pages[pfns[~zero]] = data
            if zero.any():
                self.pages[pfns[zero]] = 0
            self._round[pfns] = batch.round
            self._digest.update(pfns[~zero], data)
            self._digest.zero(pfns[zero])
        zeros = int(np.count_nonzero(zero))
        return int(pfns.size) - zeros, zeros
