"""Compiled pieces both post-copy fault lanes use (``answer_lane.py``, ``fault_lane.py``): little-endian fields of a
frame, 8-byte alignment, and runs of pages checked as the protocol's rules check them."""

from __future__ import annotations

import numpy as np
from numba import njit

from dirtylog.migration.protocol.codec import MAX_BATCH_PAGES, MAX_GFN


@njit(cache=True, nogil=True, inline="always")
def le(buffer: np.ndarray, at: int, size: int) -> int:
    """The ``size``-byte little-endian unsigned field at ``buffer[at]``."""
    value = 0
    for i in range(size - 1, -1, -1):
        value = (value << 8) | int(buffer[at + i])
    return value


@njit(cache=True, nogil=True, inline="always")
def put(buffer: np.ndarray, at: int, size: int, value: int) -> None:
    """Write ``value`` as a ``size``-byte little-endian field at ``buffer[at]``."""
    for i in range(size):
        buffer[at + i] = value & 0xFF
        value >>= 8


@njit(cache=True, nogil=True, inline="always")
def align8(size: int) -> int:
    return (size + 7) & ~7


@njit(cache=True, nogil=True, boundscheck=False)
def checked_runs(buffer: np.ndarray, starts_at: int, lengths_at: int, nruns: int, runs: np.ndarray, npages: int,
                 low: np.ndarray, high: np.ndarray) -> int:
    """Runs (uint64 starts at ``starts_at``, uint32 lengths at ``lengths_at``) into ``runs`` as (start, length)
    pairs, checked as the rules check them (non-empty, ascending, disjoint, inside one covered range of the layout
    and the guest's ``npages``); the pages in all, or -1 for runs the Python path must judge."""
    if nruns == 0 or nruns * 2 > runs.size:
        return -1
    total = 0
    previous_end = 0
    for r in range(nruns):
        start = le(buffer, starts_at + 8 * r, 8)
        count = le(buffer, lengths_at + 4 * r, 4)
        if count == 0 or start >= MAX_GFN or (r > 0 and start < previous_end):
            return -1
        end = start + count
        total += count
        if total > MAX_BATCH_PAGES or end > npages:
            return -1
        covered = False
        for k in range(low.size):
            if low[k] <= start and end <= high[k]:
                covered = True
                break
        if not covered:
            return -1
        runs[2 * r] = start
        runs[2 * r + 1] = count
        previous_end = end
    return total
