"""Compiled pieces both post-copy fault lanes use (``answer_lane.py``, ``fault_lane.py``): little-endian fields of
a frame, 8-byte alignment, runs of pages checked as the protocol's rules check them, and the state both share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
from numba import njit

from dirtylog.migration.protocol.codec import MAX_BATCH_PAGES, MAX_GFN

# Slots of a lane's state array (int64), shared with Python while the loop runs.
SEND_SEQ, RECV_SEQ, STOP, OUTCOME, ERRNO, RX_START, RX_END = 0, 1, 2, 3, 4, 5, 6
REQUESTS, PAGES, OWED, BYTES_SENT, BYTES_RECEIVED, FRAMES_SENT, FRAMES_RECEIVED, CURSOR, POLL_NS, IO_TIMEOUT_NS = (
    7, 8, 9, 10, 11, 12, 13, 14, 15, 16)
LAST_HEARD_NS, EVENTS_WRITTEN, EVENTS_DROPPED = 17, 18, 19
STATE_SIZE: Final = 20
# Why a loop returned.
STOPPED, HANDED_BACK, PEER_CLOSED, FAILED, IDLE = 1, 2, 3, 4, 5
HEADER_SIZE: Final = 16
MAC_SIZE: Final = 16


@dataclass(frozen=True)
class LaneResult:
    """Why a lane stopped, and the bytes it received but did not use (the connection's from there on)."""

    outcome: int
    errno: int
    leftover: bytes


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
