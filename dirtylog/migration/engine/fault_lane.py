"""The destination's post-copy faults in compiled code: read, asked for, answered and installed without the GIL.

The other half of :mod:`~dirtylog.migration.engine.answer_lane`. :func:`handle_faults` waits on the userfaultfd and
the post-copy channel at once, as the Python handler does: a fault on a page still owed is logged and asked for (a
PageRequest of the new pages, MACed, on the channel); a fault on a page not owed is a zero page never sent
(``UFFDIO_ZEROPAGE``); one on a page installed meanwhile is woken. An answer (PostcopyPages, requested) is checked
as the Python path checks it — MAC, sequence number, every field, each page's fingerprint — and installed with
``UFFDIO_COPY`` (which wakes the vCPU); a page present already (pushed meanwhile) stays as it is.

It shares ``missing`` and ``requested`` with the Python installer of pushed pages without a lock: pages only ever
go from missing to present, ``UFFDIO_COPY`` skips present pages, and the owner recounts what is missing rather than
counting installs twice. Fault and install times go to an event log the owner folds into its FaultStats (same
clock: CLOCK_MONOTONIC is ``time.perf_counter``'s). Anything else on the channel, its end, an error, or nothing
to do for POLL_NS returns to Python, which takes the connection back and carries on.
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
    ERRNO,
    EVENTS_DROPPED,
    EVENTS_WRITTEN,
    FAILED,
    FAULT,
    FRAMES_RECEIVED,
    FRAMES_SENT,
    HANDED_BACK,
    HEADER_SIZE,
    IDLE,
    INSTALLED,
    IO_TIMEOUT_NS,
    LAST_HEARD_NS,
    MAC_SIZE,
    OUTCOME,
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
    ZERO_FAULT,
    Lane,
    LaneResult,
)
from dirtylog.migration.payload.digest import MULTIPLIERS
from dirtylog.migration.protocol.codec import MAX_BATCH_DATA, FrameType
from dirtylog.migration.protocol.connection import Connection
from dirtylog.migration.protocol.gmac_nogil import (
    SCRATCH_SIZE,
    UNAVAILABLE,
    gmac,
    gmac_context,
    gmac_free,
)
from dirtylog.units import PAGE_SIZE

EVENTS: Final = 1 << 16  # records in the log (a ring; the owner folds it often)
_PAGE_REQUEST: Final = int(FrameType.PAGE_REQUEST)
_POSTCOPY_PAGES: Final = int(FrameType.POSTCOPY_PAGES)
_WORDS: Final = PAGE_SIZE // 8
_MESSAGES: Final = 64
MAX_ANSWER_PAGES: Final = 256  # a bigger answer is handed back to Python
RX_SIZE: Final = HEADER_SIZE + 64 + 28 * MAX_ANSWER_PAGES + MAX_ANSWER_PAGES * PAGE_SIZE + MAC_SIZE
_FOLDED: Final = STATE_SIZE  # one slot after the shared ones: records the owner has folded


@njit(cache=True, nogil=True, inline="always")
def _log(events: np.ndarray, state: np.ndarray, kind: int, page: int, thread: int, at: int) -> None:
    """Append a record to the event log; counted as dropped when the owner has let the ring fill up."""
    index = state[EVENTS_WRITTEN]
    if index - state[_FOLDED] >= events.shape[0]:
        state[EVENTS_DROPPED] += 1
        return
    row = index % events.shape[0]
    events[row, 0] = kind
    events[row, 1] = page
    events[row, 2] = thread
    events[row, 3] = at
    nogil.store_fence()  # the record before the count that publishes it: the owner reads them concurrently
    state[EVENTS_WRITTEN] = index + 1


@njit(cache=True, nogil=True, boundscheck=False)
def _request(sock: int, context: object, state: np.ndarray, tx: np.ndarray, pages: np.ndarray, count: int,
             scratch: np.ndarray, poll: np.ndarray) -> int:
    """Send a PAGE_REQUEST for ``pages[:count]`` (sorted here); 0 or -errno."""
    for i in range(1, count):  # insertion sort: a handful of pages
        value = pages[i]
        j = i - 1
        while j >= 0 and pages[j] > value:
            pages[j + 1] = pages[j]
            j -= 1
        pages[j + 1] = value
    nruns = 1
    for i in range(1, count):
        if pages[i] != pages[i - 1] + 1:
            nruns += 1
    length = align8(8 + 12 * nruns)
    out = tx
    out[:HEADER_SIZE + length] = 0
    p = HEADER_SIZE
    put(out, p, 4, nruns)
    run = -1
    for i in range(count):
        if i == 0 or pages[i] != pages[i - 1] + 1:
            run += 1
            put(out, p + 8 + 8 * run, 8, pages[i])
            put(out, p + 8 + 8 * nruns + 4 * run, 4, 1)
        else:
            at = p + 8 + 8 * nruns + 4 * run
            put(out, at, 4, le(out, at, 4) + 1)
    seq = state[SEND_SEQ]
    put(out, 0, 1, _PAGE_REQUEST)
    put(out, 4, 4, length)
    put(out, 8, 8, seq)
    if not gmac(context, seq, out.ctypes.data, HEADER_SIZE + length, out.ctypes.data + HEADER_SIZE + length, scratch):
        return -71
    size = HEADER_SIZE + length + MAC_SIZE
    sent = nogil.write_all(sock, out.ctypes.data, size, state[IO_TIMEOUT_NS], poll)
    if sent < 0:
        return sent
    state[SEND_SEQ] = seq + 1
    state[FRAMES_SENT] += 1
    state[BYTES_SENT] += size
    state[REQUESTS] += 1
    return 0


@njit(cache=True, nogil=True, boundscheck=False)
def _answer_checked(rx: np.ndarray, at: int, length: int, runs: np.ndarray, npages: int, low: np.ndarray,
                    high: np.ndarray, multipliers: np.ndarray) -> int:
    """Check the POSTCOPY_PAGES payload at ``rx[at:at + length]`` as the Python path would (an answer, not a push;
    fields, runs, zero bitmap, each page's fingerprint); its page count, or -1 to hand it back."""
    if length < 16 or rx[at] != 1 or rx[at + 1] != 0 or rx[at + 2] != 0 or rx[at + 3] != 0:
        return -1
    nruns = le(rx, at + 4, 4)
    count = le(rx, at + 8, 4)
    data_len = le(rx, at + 12, 4)
    if count == 0 or count > MAX_ANSWER_PAGES or nruns > count or nruns == 0:
        return -1
    lengths_at = 16 + 8 * nruns
    bitmap_at = align8(lengths_at + 4 * nruns)
    prints_at = align8(bitmap_at + (count + 7) // 8)
    data_at = prints_at + 8 * count
    if length != data_at + data_len or data_len > MAX_BATCH_DATA:
        return -1
    for i in range(lengths_at + 4 * nruns, bitmap_at):
        if rx[at + i] != 0:
            return -1
    for i in range(bitmap_at + (count + 7) // 8, prints_at):
        if rx[at + i] != 0:
            return -1
    if count % 8 and rx[at + bitmap_at + count // 8] >> (count % 8):
        return -1
    if checked_runs(rx, at + 16, at + lengths_at, nruns, runs, npages, low, high) != count:
        return -1
    zeros = 0
    for i in range(count):
        if (rx[at + bitmap_at + i // 8] >> (i % 8)) & 1:
            zeros += 1
            if le(rx, at + prints_at + 8 * i, 8) != 0:
                return -1
    if data_len != (count - zeros) * PAGE_SIZE:
        return -1
    words = rx[at + data_at:at + data_at + data_len].view(np.uint64)
    row = 0
    for i in range(count):
        if (rx[at + bitmap_at + i // 8] >> (i % 8)) & 1:
            continue
        total = np.uint64(0)
        base = row * _WORDS
        for w in range(_WORDS):
            total += words[base + w] * multipliers[w]
        if total != np.uint64(le(rx, at + prints_at + 8 * i, 8)):
            return -1
        row += 1
    return count


@njit(cache=True, nogil=True, boundscheck=False)
def handle_faults(uffd: int, sock: int, recv_key: np.ndarray, send_key: np.ndarray, state: np.ndarray,
                  rx: np.ndarray, tx: np.ndarray, base: int, missing: np.ndarray, requested: np.ndarray,
                  owed: np.ndarray, fingerprints: np.ndarray, events: np.ndarray, multipliers: np.ndarray,
                  low: np.ndarray, high: np.ndarray) -> None:
    """Serve faults on ``uffd`` from the post-copy channel ``sock`` until ``state[STOP]``, POLL_NS with nothing to
    do, or what the Python path must handle (``state[OUTCOME]``; bytes not used: ``rx[RX_START:RX_END]``).

    ``base``: guest RAM's address; ``missing``/``requested``/``owed``: by page (see PostcopyDestination);
    ``fingerprints``: the destination's digest values, set for every page installed."""
    receiving = gmac_context(recv_key)
    sending = gmac_context(send_key)
    scratch = np.zeros(SCRATCH_SIZE, dtype=np.uint8)
    poll = np.zeros(8, dtype=np.int64)
    clock = np.zeros(2, dtype=np.int64)
    ioctl = np.zeros(6, dtype=np.int64)
    messages = np.zeros(_MESSAGES * 4, dtype=np.uint64)
    ask = np.zeros(_MESSAGES, dtype=np.int64)
    runs = np.zeros(2 * MAX_ANSWER_PAGES, dtype=np.int64)
    npages = missing.size
    start = state[RX_START]
    end = state[RX_END]
    outcome = 0
    while outcome == 0:
        if state[STOP]:
            outcome = STOPPED
            break
        # Both fds at once: struct pollfd {int fd; short events; short revents} twice.
        poll[0] = uffd | (nogil.POLLIN << 32)
        poll[1] = sock | (nogil.POLLIN << 32)
        poll[2] = state[POLL_NS] // 1_000_000_000
        poll[3] = state[POLL_NS] % 1_000_000_000
        ready = nogil.syscall6(nogil.SYS_PPOLL, poll.ctypes.data, 2, poll.ctypes.data + 16, 0, 8, 0)
        if ready == -nogil.EINTR:
            continue
        if ready < 0:
            state[ERRNO] = -ready
            outcome = FAILED
            break
        if ready == 0:
            outcome = IDLE
            break
        if (poll[0] >> 48) & 0xFFFF:  # the userfaultfd: faults
            got = nogil.read_messages(uffd, messages)
            now = nogil.monotonic_ns(clock)
            count = 0
            for m in range(max(got, 0)):
                if messages[4 * m] & 0xFF != nogil.UFFD_EVENT_PAGEFAULT:
                    continue
                address = int(messages[4 * m + 2]) & ~(PAGE_SIZE - 1)
                page = (address - base) // PAGE_SIZE
                thread = int(messages[4 * m + 3] & np.uint64(0xFFFFFFFF))
                if page < 0 or page >= npages:
                    continue
                if not missing[page]:
                    if owed[page]:  # installed since the fault was queued
                        nogil.uffd_wake(uffd, address, PAGE_SIZE, ioctl)
                    else:  # a zero page pre-copy never sent
                        nogil.uffd_zeropage(uffd, address, PAGE_SIZE, ioctl)  # EEXIST: served already
                        _log(events, state, ZERO_FAULT, page, thread, now)
                    continue
                _log(events, state, FAULT, page, thread, now)
                if not requested[page]:
                    requested[page] = True
                    ask[count] = page
                    count += 1
            if count:
                error = _request(sock, sending, state, tx, ask, count, scratch, poll[4:])
                if error < 0:
                    state[ERRNO] = -error
                    outcome = FAILED
                    break
        if (poll[1] >> 48) & 0xFFFF:  # the channel: answers
            got = nogil.read_some(sock, rx.ctypes.data + end, rx.size - end)
            if got == 0:
                outcome = PEER_CLOSED
            elif got < 0 and got != -nogil.EAGAIN:
                state[ERRNO] = -got
                outcome = FAILED
            elif got > 0:
                end += got
                state[LAST_HEARD_NS] = nogil.monotonic_ns(clock)
        while outcome != FAILED:  # every whole frame received
            seq = state[RECV_SEQ]
            size = whole_frame(rx, start, end, _POSTCOPY_PAGES, seq, receiving, scratch)
            if size == 0:
                break
            count = -1 if size < 0 else _answer_checked(rx, start + HEADER_SIZE, size - HEADER_SIZE - MAC_SIZE, runs,
                                                        npages, low, high, multipliers)
            if count < 0:
                outcome = HANDED_BACK
                break
            at = start + HEADER_SIZE
            nruns = le(rx, at + 4, 4)
            bitmap_at = align8(16 + 12 * nruns)
            prints_at = align8(bitmap_at + (count + 7) // 8)
            data = rx.ctypes.data + at + prints_at + 8 * count
            i = 0
            for r in range(nruns):
                for page in range(runs[2 * r], runs[2 * r] + runs[2 * r + 1]):
                    zero = (rx[at + bitmap_at + i // 8] >> (i % 8)) & 1
                    fingerprints[page] = le(rx, at + prints_at + 8 * i, 8)
                    if missing[page]:
                        if zero:
                            result = nogil.uffd_zeropage(uffd, base + page * PAGE_SIZE, PAGE_SIZE, ioctl)
                        else:
                            result = nogil.uffd_copy(uffd, base + page * PAGE_SIZE, data, PAGE_SIZE, 0, ioctl)
                        if result == 0 or result == -nogil.EEXIST:  # (EEXIST: pushed meanwhile)
                            _log(events, state, INSTALLED, page, 0, nogil.monotonic_ns(clock))
                            missing[page] = False  # after the record: a fold that sees it present sees why
                        elif outcome == 0:
                            state[ERRNO] = -result
                            outcome = FAILED
                    if not zero:
                        data += PAGE_SIZE
                    i += 1
            state[RECV_SEQ] = seq + 1
            state[FRAMES_RECEIVED] += 1
            state[BYTES_RECEIVED] += size
            state[PAGES] += count
            start += size
        start, end = compact(rx, start, end)
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
    state = np.zeros(STATE_SIZE + 1, dtype=np.int64)
    state[STOP] = 1
    key = np.zeros(32, dtype=np.uint8)
    flags = np.zeros(1, dtype=np.bool_)
    one = np.zeros(1, dtype=np.int64)
    handle_faults(-1, -1, key, key, state, np.zeros(RX_SIZE, dtype=np.uint8), np.zeros(8, dtype=np.uint8), 0,
                  flags, flags, flags, np.zeros(1, dtype=np.uint64), np.zeros((1, 4), dtype=np.int64), MULTIPLIERS,
                  one, one)


class FaultLane(Lane):
    """The compiled fault handler of one post-copy channel on the destination (see the module doc)."""

    def __init__(self, uffd: int, base: int, missing: npt.NDArray[np.bool_], requested: npt.NDArray[np.bool_],
                 owed: npt.NDArray[np.bool_], fingerprints: npt.NDArray[np.uint64], *, io_timeout: float,
                 poll_interval: float) -> None:
        super().__init__(STATE_SIZE + 1, RX_SIZE)
        self.uffd = uffd
        self.base = base
        self.missing, self.requested, self.owed, self.fingerprints = missing, requested, owed, fingerprints
        self.state[POLL_NS] = int(poll_interval * 1e9)
        self.state[IO_TIMEOUT_NS] = int(io_timeout * 1e9)
        self.tx = np.zeros(HEADER_SIZE + 8 + 12 * 64 + MAC_SIZE + 64, dtype=np.uint8)
        self.events = np.zeros((EVENTS, 4), dtype=np.int64)

    def run(self, conn: Connection, sock: int) -> LaneResult:
        """Serve faults until :meth:`stop`, an idle POLL_NS, or what the Python path must handle."""
        return self._run(conn, lambda receiving, sending, layout: handle_faults(
            self.uffd, sock, receiving, sending, self.state, self.rx, self.tx, self.base, self.missing,
            self.requested, self.owed, self.fingerprints, self.events, MULTIPLIERS, layout.low, layout.high))

    def take_events(self) -> npt.NDArray[np.int64]:
        """The event-log records written since the last call, oldest first (kind, page, thread id, ns)."""
        written, folded = int(self.state[EVENTS_WRITTEN]), int(self.state[_FOLDED])
        rows = np.arange(folded, written) % EVENTS
        records = self.events[rows].copy()
        self.state[_FOLDED] = written
        return records

    @property
    def requests_sent(self) -> int:
        return int(self.state[REQUESTS])

    @property
    def last_heard_ns(self) -> int:
        return int(self.state[LAST_HEARD_NS])
