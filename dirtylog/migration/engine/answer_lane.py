"""The source's post-copy answers in compiled code: a page request read, checked and answered without the GIL.

A fault on the destination waits for this side to read its PageRequest, gather the pages and send them back. Done
by the Python answering thread, that took ~175 µs of a ~390 µs fault on loopback, most of it waiting for the GIL
behind the push and for the interpreter (docs/performance.md). :class:`AnswerLane` runs the same conversation in
one compiled ``nogil`` loop (:func:`serve_requests`), on the channel's socket, with the stream's own frames: it
reads a frame, checks its MAC (:mod:`~dirtylog.migration.protocol.gmac_nogil`), its sequence number and every
field the Python rules check, and answers with PostcopyPages frames of ANSWER_PAGES pages, fingerprinted as it
copies them out of the (paused) guest memory; it marks them sent and records their fingerprints in the digest.

The lane borrows the connection (:meth:`~dirtylog.migration.protocol.connection.Connection.lend_requests`) and
carries only what it fully understands: at any other frame (Verified, Abort, one that fails its MAC or a check),
at the peer's end of file or at a socket error it stops, leaving the bytes it has not used, and the connection
takes them and its sequence numbers back, so the Python path reports that frame or error exactly as before.
"""

from __future__ import annotations

import functools
from typing import Final

import numpy as np
import numpy.typing as npt
from numba import njit

from dirtylog.linux import nogil
from dirtylog.migration.engine.compiled_frames import align8, checked_runs, compact, le, put, whole_frame
from dirtylog.migration.engine.lanes import (
    BYTES_RECEIVED,
    BYTES_SENT,
    CURSOR,
    ERRNO,
    FAILED,
    FRAMES_RECEIVED,
    FRAMES_SENT,
    HANDED_BACK,
    HEADER_SIZE,
    IO_TIMEOUT_NS,
    MAC_SIZE,
    OUTCOME,
    OWED,
    PAGES,
    PEER_CLOSED,
    POLL_NS,
    RECV_SEQ,
    REQUESTS,
    RX_END,
    RX_START,
    SEND_SEQ,
    STATE_SIZE,
    STOP,
    STOPPED,
    Lane,
    LaneResult,
)
from dirtylog.migration.payload.digest import MULTIPLIERS
from dirtylog.migration.protocol.codec import FrameType
from dirtylog.migration.protocol.connection import Connection
from dirtylog.migration.protocol.gmac_nogil import (
    SCRATCH_SIZE,
    UNAVAILABLE,
    gmac,
    gmac_context,
    gmac_free,
)
from dirtylog.units import PAGE_SIZE

_PAGE_REQUEST: Final = int(FrameType.PAGE_REQUEST)
_POSTCOPY_PAGES: Final = int(FrameType.POSTCOPY_PAGES)
_REQUESTED: Final = 1  # POSTCOPY_REQUESTED
_WORDS: Final = PAGE_SIZE // 8
RX_SIZE: Final = 64 << 10  # a request of 5,000 runs fits; a bigger frame is handed back to Python


@njit(cache=True, nogil=True, boundscheck=False)
def _request_runs(rx: np.ndarray, at: int, length: int, runs: np.ndarray, npages: int, low: np.ndarray,
                  high: np.ndarray) -> int:
    """The runs of the PAGE_REQUEST payload at ``rx[at:at + length]`` into ``runs`` (start, length pairs), checked
    as the rules check them; how many, or -1 for a payload the Python path must judge."""
    if length < 8:
        return -1
    nruns = le(rx, at, 4)
    if le(rx, at + 4, 4) != 0 or nruns == 0 or length != align8(8 + 12 * nruns):
        return -1
    for i in range(at + 8 + 12 * nruns, at + length):  # padding
        if rx[i] != 0:
            return -1
    if checked_runs(rx, at + 8, at + 8 + 8 * nruns, nruns, runs, npages, low, high) < 0:
        return -1
    return nruns


@njit(cache=True, nogil=True, boundscheck=False)
def _answer(sock: int, context: object, state: np.ndarray, tx: np.ndarray, pfns: np.ndarray, count: int,
            memory: np.ndarray, unsent: np.ndarray, digest: np.ndarray, multipliers: np.ndarray,
            scratch: np.ndarray, poll: np.ndarray) -> int:
    """Send pages ``pfns[:count]`` (ascending) in one POSTCOPY_PAGES frame; 0 or -errno."""
    out = tx.view(np.uint8)
    nruns = 1
    for i in range(1, count):
        if pfns[i] != pfns[i - 1] + 1:
            nruns += 1
    lengths_at = 16 + 8 * nruns
    bitmap_at = align8(lengths_at + 4 * nruns)
    prints_at = align8(bitmap_at + (count + 7) // 8)
    data_at = prints_at + 8 * count
    out[HEADER_SIZE:HEADER_SIZE + data_at] = 0
    p = HEADER_SIZE
    put(out, p, 1, _REQUESTED)
    put(out, p + 4, 4, nruns)
    put(out, p + 8, 4, count)
    run = -1
    for i in range(count):  # the runs
        if i == 0 or pfns[i] != pfns[i - 1] + 1:
            run += 1
            put(out, p + 16 + 8 * run, 8, pfns[i])
            put(out, p + lengths_at + 4 * run, 4, 1)
        else:
            put(out, p + lengths_at + 4 * run, 4, le(out, p + lengths_at + 4 * run, 4) + 1)
    nonzero = 0
    word = (p + data_at) // 8
    owed = 0
    for i in range(count):  # copy, fingerprint, and leave zero pages out
        page = pfns[i]
        total = np.uint64(0)
        for w in range(_WORDS):
            value = memory[page, w]
            tx[word + w] = value
            total += value * multipliers[w]
        if total == 0:
            zero = True
            for w in range(_WORDS):
                if tx[word + w] != 0:
                    zero = False
                    break
            if zero:
                out[p + bitmap_at + i // 8] |= np.uint8(1 << (i % 8))
        else:
            zero = False
        put(out, p + prints_at + 8 * i, 8, total)  # type: ignore[arg-type]  # (a uint64: numba shifts it alike)
        digest[page] = total
        if unsent[page]:
            owed += 1
            unsent[page] = False
        if not zero:
            nonzero += 1
            word += _WORDS
    put(out, p + 12, 4, nonzero * PAGE_SIZE)
    length = data_at + nonzero * PAGE_SIZE
    seq = state[SEND_SEQ]
    put(out, 0, 1, _POSTCOPY_PAGES)
    put(out, 1, 3, 0)
    put(out, 4, 4, length)
    put(out, 8, 8, seq)
    if not gmac(context, seq, tx.ctypes.data, HEADER_SIZE + length, tx.ctypes.data + HEADER_SIZE + length, scratch):
        return -71  # EPROTO: OpenSSL failed
    size = HEADER_SIZE + length + MAC_SIZE
    sent = nogil.write_all(sock, tx.ctypes.data, size, state[IO_TIMEOUT_NS], poll)
    if sent < 0:
        return sent
    state[SEND_SEQ] = seq + 1
    state[FRAMES_SENT] += 1
    state[BYTES_SENT] += size
    state[PAGES] += count
    state[OWED] += owed
    state[CURSOR] = pfns[count - 1] + 1
    return 0


@njit(cache=True, nogil=True, boundscheck=False)
def serve_requests(sock: int, recv_key: np.ndarray, send_key: np.ndarray, state: np.ndarray, rx: np.ndarray,
                   tx: np.ndarray, memory: np.ndarray, unsent: np.ndarray, digest: np.ndarray,
                   multipliers: np.ndarray, low: np.ndarray, high: np.ndarray, answer_pages: int) -> None:
    """Answer the page requests arriving on socket ``sock`` until ``state[STOP]`` or a frame, end or error the
    Python path must handle (``state[OUTCOME]``; the bytes not used are ``rx[state[RX_START]:state[RX_END]]``).

    ``memory``: guest memory as (pages, 512) uint64; ``unsent``: pages not sent yet (cleared as answered);
    ``digest``: fingerprints by page (set as answered); ``tx``: uint64, room for ``answer_pages`` pages and the
    frame around them."""
    receiving = gmac_context(recv_key)
    sending = gmac_context(send_key)
    scratch = np.zeros(SCRATCH_SIZE, dtype=np.uint8)
    poll = np.zeros(4, dtype=np.int64)
    runs = np.zeros(2 * ((rx.size - 8) // 12 + 1), dtype=np.int64)
    pfns = np.zeros(answer_pages, dtype=np.int64)
    npages = memory.shape[0]
    start = state[RX_START]
    end = state[RX_END]
    outcome = 0
    while outcome == 0:
        while True:  # every whole frame received
            seq = state[RECV_SEQ]
            size = whole_frame(rx, start, end, _PAGE_REQUEST, seq, receiving, scratch)
            if size == 0:
                break
            nruns = -1 if size < 0 else _request_runs(rx, start + HEADER_SIZE, size - HEADER_SIZE - MAC_SIZE, runs,
                                                      npages, low, high)
            if nruns < 0:
                outcome = HANDED_BACK
                break
            state[RECV_SEQ] = seq + 1
            state[FRAMES_RECEIVED] += 1
            state[BYTES_RECEIVED] += size
            state[REQUESTS] += 1
            start += size
            count = 0
            for r in range(nruns):
                for page in range(runs[2 * r], runs[2 * r] + runs[2 * r + 1]):
                    pfns[count] = page
                    count += 1
                    if count == answer_pages:
                        error = _answer(sock, sending, state, tx, pfns, count, memory, unsent, digest, multipliers,
                                        scratch, poll)
                        if error < 0:
                            state[ERRNO] = -error
                            outcome = FAILED
                            break
                        count = 0
                if outcome:
                    break
            if count and not outcome:
                error = _answer(sock, sending, state, tx, pfns, count, memory, unsent, digest, multipliers,
                                scratch, poll)
                if error < 0:
                    state[ERRNO] = -error
                    outcome = FAILED
            if outcome:
                break
        if outcome:
            break
        start, end = compact(rx, start, end)
        if state[STOP]:
            outcome = STOPPED
            break
        ready = nogil.poll_in(sock, state[POLL_NS], poll)
        if ready == 0:
            continue
        got = nogil.read_some(sock, rx.ctypes.data + end, rx.size - end) if ready > 0 else ready
        if got == -nogil.EAGAIN:
            continue
        if got < 0:
            state[ERRNO] = -got
            outcome = FAILED
        elif got == 0:
            outcome = PEER_CLOSED
        else:
            end += got
    state[RX_START] = start
    state[RX_END] = end
    state[OUTCOME] = outcome
    gmac_free(receiving)
    gmac_free(sending)


@functools.cache
def load_kernels() -> None:
    """Compile (first run) or load the loop, once per process, so that no post-copy waits for it: it returns at
    once, stopped."""
    if UNAVAILABLE:
        return
    state = np.zeros(STATE_SIZE, dtype=np.int64)
    state[STOP] = 1
    key = np.zeros(32, dtype=np.uint8)
    one = np.zeros(1, dtype=np.int64)
    serve_requests(-1, key, key, state, np.zeros(RX_SIZE, dtype=np.uint8), np.zeros(8, dtype=np.uint64),
                   np.zeros((1, _WORDS), dtype=np.uint64), np.zeros(1, dtype=np.bool_), np.zeros(1, dtype=np.uint64),
                   MULTIPLIERS, one, one, 1)


class AnswerLane(Lane):
    """The compiled answers on one post-copy channel (see the module doc); :meth:`run` on the answering thread."""

    def __init__(self, memory: npt.NDArray[np.uint8], unsent: npt.NDArray[np.bool_],
                 digest: npt.NDArray[np.uint64], *, answer_pages: int, io_timeout: float) -> None:
        super().__init__(STATE_SIZE, RX_SIZE)
        self.memory = memory.view(np.uint64)
        self.unsent = unsent
        self.digest = digest
        self.answer_pages = answer_pages
        self.state[POLL_NS] = 50_000_000  # how often the loop looks at STOP while no request comes
        self.state[IO_TIMEOUT_NS] = int(io_timeout * 1e9)
        self.tx = np.zeros((HEADER_SIZE + 16 + 24 * answer_pages + 64 + answer_pages * PAGE_SIZE + MAC_SIZE) // 8 + 8,
                           dtype=np.uint64)
        self.counted = np.zeros(STATE_SIZE, dtype=np.int64)  # the counters as last folded into the statistics

    def run(self, conn: Connection, sock: int) -> LaneResult:
        """Answer requests on ``sock`` until :meth:`stop` or what the Python path must handle."""
        return self._run(conn, lambda receiving, sending, layout: serve_requests(
            sock, receiving, sending, self.state, self.rx, self.tx, self.memory, self.unsent, self.digest,
            MULTIPLIERS, layout.low, layout.high, self.answer_pages))

    def counters(self) -> dict[str, int]:
        """What the lane did since the last call: requests, pages answered, pages of them still owed, bytes sent."""
        now = self.state.copy()
        delta = now - self.counted
        self.counted = now
        return {"requests": int(delta[REQUESTS]), "pages": int(delta[PAGES]), "owed": int(delta[OWED]),
                "bytes": int(delta[BYTES_SENT]), "cursor": int(now[CURSOR])}
