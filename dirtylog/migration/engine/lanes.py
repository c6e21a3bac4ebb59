"""The post-copy fault lanes' shared Python side, which imports no Numba (dirtylog runs without it, as in the arm64
lab's guest): the state a compiled loop shares with Python, why it returned, borrowing the post-copy channel's
connection around each run (:class:`Lane`), and whether this host can run the loops at all.

The loops themselves are ``answer_lane.py`` (the source's answers) and ``fault_lane.py`` (the destination's faults),
imported only where a lane runs or is loaded ahead.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from dirtylog.migration.protocol.connection import Connection
from dirtylog.migration.protocol.rules import LayoutIndex
from dirtylog.units import PAGE_SIZE

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


# Kinds of the fault lane's event-log records: (kind, page, thread id, CLOCK_MONOTONIC ns).
FAULT, INSTALLED, ZERO_FAULT = 1, 2, 3


@functools.cache
def compiled_unavailable() -> str:
    """Why this host cannot run the compiled fault path ("" when it can): it needs Numba and OpenSSL's libcrypto."""
    try:
        from dirtylog.migration.protocol import gmac_nogil
    except ImportError as error:
        return f"the compiled fault path needs Numba ({error})"
    return gmac_nogil.UNAVAILABLE


#: A lane's loop, given the frame keys (receiving, sending) and the memory layout of the connection lent to it.
Loop = Callable[[npt.NDArray[np.uint8], npt.NDArray[np.uint8], LayoutIndex], None]


class Lane:
    """A compiled loop's state (shared with it while it runs), the bytes it received and not yet used, and the
    post-copy channel's connection lent to it around each run (:meth:`Connection.lend_requests`)."""

    def __init__(self, state_size: int, rx_size: int) -> None:
        self.state = np.zeros(state_size, dtype=np.int64)
        self.rx = np.zeros(rx_size, dtype=np.uint8)
        self._lock = threading.Lock()  # held while the loop runs: stop() waits on it

    @staticmethod
    def unavailable(conn: Connection) -> str:
        """Why a lane cannot carry this connection's requests now ("" when it can): the loops MAC with OpenSSL,
        handle 4 KiB pages, and take over only a connection in phase REQUESTS that is not encrypted."""
        if compiled_unavailable():
            return compiled_unavailable()
        if conn.header is None or conn.header.page_size != PAGE_SIZE:
            return f"the compiled fault path handles {PAGE_SIZE}-byte pages"
        if conn.lend_requests() is None:
            return "an encrypted session (the compiled fault path only MACs frames)" if conn.encrypted else \
                "the connection is not between frames in phase REQUESTS"
        return ""

    def _run(self, conn: Connection, loop: Loop) -> LaneResult:
        """Run ``loop`` with ``conn`` lent to it, and give the connection back with what the loop did: the frames
        and bytes it sent and took, and the bytes it received and did not use (kept here for the next run after an
        idle return, which leaves a frame begun unseen by the connection). Once stopped, a lane does not run."""
        state = self.state
        with self._lock:
            if state[STOP]:
                return LaneResult(STOPPED, 0, b"")
            lent = conn.lend_requests()
            if lent is None or conn.header is None:
                return LaneResult(HANDED_BACK, 0, b"")
            before = state.copy()
            state[SEND_SEQ], state[RECV_SEQ] = lent.send_seq, lent.recv_seq
            state[OUTCOME] = state[ERRNO] = 0
            loop(np.array(bytearray(lent.recv_key), dtype=np.uint8), np.array(bytearray(lent.send_key),
                 dtype=np.uint8), LayoutIndex(conn.header.slots))
            conn.take_back_requests(lent, sent=int(state[FRAMES_SENT] - before[FRAMES_SENT]),
                                    received=int(state[FRAMES_RECEIVED] - before[FRAMES_RECEIVED]),
                                    bytes_sent=int(state[BYTES_SENT] - before[BYTES_SENT]),
                                    bytes_received=int(state[BYTES_RECEIVED] - before[BYTES_RECEIVED]))
            if state[OUTCOME] == IDLE:
                return LaneResult(IDLE, 0, b"")
            leftover = self.rx[int(state[RX_START]):int(state[RX_END])].tobytes()
            state[RX_START] = state[RX_END] = 0
            return LaneResult(int(state[OUTCOME]), int(state[ERRNO]), leftover)

    def stop(self) -> None:
        """Stop the loop (it looks at STOP between frames, at least every POLL_NS) and wait until it has given the
        connection back."""
        self.state[STOP] = 1
        with self._lock:
            pass
