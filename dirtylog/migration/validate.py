"""What makes an event valid, checked the same way before we send it and after we receive it.

Every check raises LocalProtocolError; the connection turns it into a RemoteProtocolError when the event
came from the peer (h11 does the same), so the rules are written once.
"""

from __future__ import annotations

import bisect
import itertools
import operator
from typing import Any

import numpy as np
from numpy.typing import NDArray

from dirtylog.migration.errors import LocalProtocolError
from dirtylog.migration.events import (
    CODECS,
    Abort,
    AbortCode,
    Complete,
    Header,
    MemorySlot,
    PageBatch,
    RoundEnd,
    VcpuState,
    Verified,
)
from dirtylog.migration.wire import (
    DIGEST_SIZE,
    MAX_BATCH_DATA,
    MAX_BATCH_PAGES,
    MAX_GFN,
    MAX_PAYLOAD,
    MAX_SLOTS,
    MAX_STREAMS,
    MAX_VCPUS,
    VCPU_HEAD,
    as_bytes_view,
)

PAGE_SIZES = tuple(1 << shift for shift in range(12, 17))  # 4 KiB to 64 KiB, as KVM on x86 and arm64
U32 = (1 << 32) - 1
U64 = (1 << 64) - 1


def integer(value: Any, low: int, high: int, what: str) -> int:
    """``value`` as an int in ``[low, high]`` (NumPy integers welcome), or LocalProtocolError."""
    try:
        number = operator.index(value)
    except TypeError:
        raise LocalProtocolError(f"{what} must be an integer, got {type(value).__name__}") from None
    if not low <= number <= high:
        raise LocalProtocolError(f"{what} {number} is outside [{low}, {high}]")
    return number


class LayoutIndex:
    """The guest-physical page ranges a Header's slots cover, merged, for vectorized run checks.

    Adjacent slots merge into one range, so a run may cross a slot boundary where the slots touch,
    but never a hole between slots.
    """

    def __init__(self, slots: tuple[MemorySlot, ...]) -> None:
        ordered = sorted(slots, key=lambda s: s.base_gfn)
        low: list[int] = []
        high: list[int] = []
        for slot in ordered:
            if high and slot.base_gfn == high[-1]:
                high[-1] += slot.npages
            else:
                low.append(slot.base_gfn)
                high.append(slot.base_gfn + slot.npages)
        self.low = np.array(low, dtype=np.int64)
        self.high = np.array(high, dtype=np.int64)
        self._low, self._high = low, high

    def covers(self, start: int, end: int) -> bool:
        """Whether one covered range holds all of ``[start, end)`` (one run: plain ints, no arrays)."""
        where = bisect.bisect_right(self._low, start) - 1
        return where >= 0 and end <= self._high[where]

    def first_outside(self, starts: NDArray[np.int64], ends: NDArray[np.int64]) -> int:
        """Index of the first run ``[start, end)`` not inside one covered range, or -1."""
        where = np.searchsorted(self.low, starts, side="right") - 1
        inside = (where >= 0) & (ends <= self.high[np.maximum(where, 0)])
        bad = np.flatnonzero(~inside)
        return int(bad[0]) if bad.size else -1


def check_header(header: Header) -> LayoutIndex:
    """Validate a Header; returns the index its PageBatches are checked against."""
    if header.page_size not in PAGE_SIZES:
        raise LocalProtocolError(f"page size {header.page_size} is not one of {', '.join(map(str, PAGE_SIZES))}")
    integer(header.vcpus, 1, MAX_VCPUS, "vCPU count")
    integer(header.streams, 1, MAX_STREAMS, "stream count")
    if header.codec not in CODECS:
        raise LocalProtocolError(f"codec {header.codec!r} is not one of {', '.join(CODECS)}")
    if not isinstance(header.workload, dict):
        raise LocalProtocolError(f"workload must be a dict, got {type(header.workload).__name__}")
    if not isinstance(header.slots, tuple) or not 1 <= len(header.slots) <= MAX_SLOTS:
        raise LocalProtocolError(f"the memory layout must be a tuple of 1 to {MAX_SLOTS} MemorySlots")
    ids: set[int] = set()
    for slot in header.slots:
        if not isinstance(slot, MemorySlot):
            raise LocalProtocolError(f"memory layout entries must be MemorySlot, got {type(slot).__name__}")
        ident = integer(slot.slot, 0, U32, "slot id")
        integer(slot.flags, 0, U32, f"slot {ident} flags")
        base = integer(slot.base_gfn, 0, MAX_GFN - 1, f"slot {ident} base_gfn")
        integer(slot.npages, 1, MAX_GFN - base, f"slot {ident} page count")
        if ident in ids:
            raise LocalProtocolError(f"slot id {ident} appears twice in the memory layout")
        ids.add(ident)
    ordered = sorted(header.slots, key=lambda s: s.base_gfn)
    for before, after in itertools.pairwise(ordered):
        if after.base_gfn < before.base_gfn + before.npages:
            raise LocalProtocolError(
                f"slots {before.slot} and {after.slot} overlap at gfn {after.base_gfn:#x}: memslots are disjoint"
            )
    return LayoutIndex(header.slots)


def check_batch(batch: PageBatch, header: Header, layout: LayoutIndex) -> int:
    """Validate a PageBatch against the Header; returns its page count."""
    integer(batch.round, 0, U32, "round")
    if batch.page_size != header.page_size:
        raise LocalProtocolError(f"batch page size {batch.page_size} differs from the Header's {header.page_size}")
    if batch.codec not in ("none", header.codec):
        raise LocalProtocolError(f"batch codec {batch.codec!r} is neither 'none' nor the Header's {header.codec!r}")
    starts, lengths, zero = batch.starts, batch.lengths, batch.zero
    if not (_array(starts, np.uint64) and _array(lengths, np.uint32) and _array(zero, np.bool_)):
        raise LocalProtocolError(
            "a batch needs 1-D arrays: starts uint64, lengths uint32, zero bool (use make_page_batch)"
        )
    nruns = len(starts)
    if nruns == 0 or len(lengths) != nruns:
        raise LocalProtocolError(
            f"a batch needs at least one run and as many lengths ({len(lengths)}) as starts ({nruns})"
        )
    npages = _check_runs(starts, lengths, layout)
    if len(zero) != npages:
        raise LocalProtocolError(f"zero-page mask has {len(zero)} entries for {npages} pages")
    nonzero = npages - int(np.count_nonzero(zero))
    size = nonzero * header.page_size
    data_len = len(as_bytes_view(batch.data))
    if size > MAX_BATCH_DATA:
        raise LocalProtocolError(f"{nonzero} non-zero pages are over the {MAX_BATCH_DATA}-byte batch limit")
    if batch.codec == "none" and data_len != size:
        raise LocalProtocolError(
            f"batch data is {data_len} bytes; {nonzero} non-zero pages of {header.page_size} bytes need {size}"
        )
    if batch.codec != "none" and (nonzero == 0 or data_len == 0):
        raise LocalProtocolError("a compressed batch needs non-zero pages and a non-empty block")
    return npages


def _check_runs(starts: NDArray[np.uint64], lengths: NDArray[np.uint32], layout: LayoutIndex) -> int:
    """Runs non-empty, ascending, disjoint, inside the layout, at most MAX_BATCH_PAGES pages in all; returns
    the page count."""
    if len(starts) == 1:  # the usual batch (a stretch of dirty or round-0 pages): ints, not array passes
        start, count = int(starts[0]), int(lengths[0])
        if count == 0:
            raise LocalProtocolError("run 0 of the batch is empty")
        if count > MAX_BATCH_PAGES:
            raise LocalProtocolError(f"a batch of {count} pages is over the {MAX_BATCH_PAGES}-page limit")
        if start >= MAX_GFN:
            raise LocalProtocolError(f"page number {start:#x} is beyond any guest memory")
        if not layout.covers(start, start + count):
            raise LocalProtocolError(
                f"run 0 of the batch, gfns [{start:#x}, {start + count:#x}), is outside the memory layout")
        return count
    if not np.all(lengths > 0):
        raise LocalProtocolError(f"run {int(np.argmin(lengths))} of the batch is empty")
    npages = int(lengths.sum(dtype=np.uint64))
    if npages > MAX_BATCH_PAGES:
        raise LocalProtocolError(f"a batch of {npages} pages is over the {MAX_BATCH_PAGES}-page limit")
    if int(starts.max()) >= MAX_GFN:
        raise LocalProtocolError(f"page number {int(starts.max()):#x} is beyond any guest memory")
    first = starts.astype(np.int64)
    end = first + lengths
    overlap = np.flatnonzero(first[1:] < end[:-1])
    if overlap.size:
        i = int(overlap[0]) + 1
        raise LocalProtocolError(
            f"run {i} of the batch (gfn {int(first[i]):#x}) overlaps or precedes run {i - 1}: "
            "runs must be ascending and disjoint"
        )
    bad = layout.first_outside(first, end)
    if bad >= 0:
        raise LocalProtocolError(
            f"run {bad} of the batch, gfns [{int(first[bad]):#x}, {int(end[bad]):#x}), is outside the memory layout"
        )
    return npages


def check_vcpu_state(event: VcpuState, header: Header) -> None:
    """A vCPU that exists, and a state blob that fits a frame."""
    integer(event.index, 0, header.vcpus - 1, "vCPU index")
    if not isinstance(event.state, bytes | bytearray | memoryview):
        raise LocalProtocolError(f"vCPU state must be bytes, got {type(event.state).__name__}")
    if len(event.state) > MAX_PAYLOAD - VCPU_HEAD.size:
        raise LocalProtocolError(f"vCPU state of {len(event.state)} bytes does not fit a frame")


def check_round_end(event: RoundEnd) -> None:
    """Round and page count in range, statistics a dict."""
    integer(event.round, 0, U32, "round")
    integer(event.pages, 0, U64, "page count")
    if not isinstance(event.stats, dict):
        raise LocalProtocolError(f"round statistics must be a dict, got {type(event.stats).__name__}")


def check_complete(event: Complete, streams: int) -> None:
    """A 16-byte digest and one frame count per stream."""
    check_digest(event.digest)
    if not isinstance(event.stream_frames, tuple) or len(event.stream_frames) != streams:
        raise LocalProtocolError(f"Complete must count the frames of all {streams} streams in a tuple")
    for i, count in enumerate(event.stream_frames):
        integer(count, 0, U64, f"frame count of stream {i}")


def check_verified(event: Verified) -> None:
    """A 16-byte digest."""
    check_digest(event.digest)


def check_abort(event: Abort) -> None:
    """A reason string and a known code (the reason is cut to size when sent, never refused)."""
    if not isinstance(event.reason, str) or not isinstance(event.code, AbortCode):
        raise LocalProtocolError("Abort needs a reason string and an AbortCode")


def check_digest(digest: object) -> None:
    """A memory digest as ``digest.PageDigest.digest`` makes it."""
    if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
        raise LocalProtocolError(f"a memory digest is {DIGEST_SIZE} bytes (digest.PageDigest.digest)")


def _array(value: object, dtype: type[np.generic]) -> bool:
    return isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype == dtype
