"""Compiled pieces both post-copy fault lanes use (``answer_lane.py``, ``fault_lane.py``): little-endian fields of a
frame, 8-byte alignment, and runs of pages checked as the protocol's rules check them."""

from __future__ import annotations

import numpy as np
from numba import njit

from dirtylog.migration.engine.lanes import HEADER_SIZE, MAC_SIZE
from dirtylog.migration.protocol.codec import MAX_BATCH_PAGES, MAX_GFN
from dirtylog.migration.protocol.gmac_nogil import gmac_verifies


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


@njit(cache=True, nogil=True, boundscheck=False)
def whole_frame(rx: np.ndarray, start: int, end: int, frame_type: int, seq: int, context: object,
                scratch: np.ndarray) -> int:
    """The size of the frame at ``rx[start:end]`` when it is whole, of ``frame_type``, without flags, frame ``seq``,
    and its MAC verifies; 0 while more bytes are needed; -1 for a frame the Python path must handle."""
    if end - start < HEADER_SIZE:
        return 0
    length = le(rx, start + 4, 4)
    if (rx[start] != frame_type or rx[start + 1] != 0 or rx[start + 2] != 0 or rx[start + 3] != 0
            or le(rx, start + 8, 8) != seq or HEADER_SIZE + length + MAC_SIZE > rx.size):
        return -1
    size = HEADER_SIZE + length + MAC_SIZE
    if end - start < size:
        return 0
    if not gmac_verifies(context, seq, rx[start:start + size], HEADER_SIZE + length, scratch):
        return -1
    return size


@njit(cache=True, nogil=True, boundscheck=False)
def compact(rx: np.ndarray, start: int, end: int) -> tuple[int, int]:
    """The unused bytes ``rx[start:end]`` made room after: emptied, or moved to the front when less than a quarter
    of the buffer is left behind them; returns the new (start, end)."""
    if start == end:
        return 0, 0
    if rx.size - end < rx.size // 4:
        rx[:end - start] = rx[start:end].copy()
        return 0, end - start
    return start, end
