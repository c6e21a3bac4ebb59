"""The rules of the migration stream, in one place: every kind of message, who may send it when, and what
makes it valid — checked the same way before we send a message and after we receive one.

Theory of operation
===================

A migration stream is one connection between a *source* (which owns a running VM and sends its memory)
and a *destination* (which builds a copy and takes the VM over at the end). Both ends run the same
state machine over the same sequence of messages, so each can tell, at every point, whose turn it is
and what may be said. The machine is pure: it sees messages as values; the connection feeds it the
events we send (a violation is our bug: LocalProtocolError) and the events we receive (a violation is
the peer's: the connection turns it into a RemoteProtocolError, as h11 does).

The conversation is lock-step: in every phase exactly one side may speak (except Abort, see below, and the
post-copy channel, where requests and answers cross)::

    phase       who speaks    what                                   next phase
    ---------   -----------   ------------------------------------   --------------------------------
    HELLO       source        HELLO record (initiate())              CHALLENGE
    CHALLENGE   destination   CHALLENGE record (accept())            AUTH
    AUTH        source        AUTH record (sent with its Header)     HEADER (CHANNEL_HEADER on a post-copy
                                                                     channel, RESUME_HEADER when resuming)
    HEADER      source        Header                                 READY
    READY       destination   Ready                                  STREAMING
    STREAMING   source        PageBatch | VcpuState | RoundEnd       STREAMING
                source        Complete                               VERIFY (DONE on a secondary stream)
                source        PostcopyStart                          POSTCOPY_VERIFY
    VERIFY      destination   Verified                               COMMIT
    COMMIT      source        Commit                                 RESUME
    RESUME      destination   Resumed                                DONE
    any live    either        Abort frame (REJECT record in the      ERROR
                              handshake)
    DONE        nobody; the peer's EOF is the clean end (next_event() → CLOSED)
    ERROR       nobody; every further call raises

Post-copy (a Header with ``postcopy``): the VM moves before all of its memory, and the pages still owed follow::

    POSTCOPY_VERIFY   destination   Verified                         POSTCOPY_COMMIT
    POSTCOPY_COMMIT   source        Commit                           POSTCOPY_RESUME
    POSTCOPY_RESUME   destination   Resumed                          POSTCOPY
    POSTCOPY          source        PostcopyPages (pushed)           POSTCOPY
                      source        Complete                         POSTCOPY_END
    POSTCOPY_END      destination   Verified                         DONE

  its post-copy channel, a second connection (HELLO flag) whose only business is requests and answers::

    CHANNEL_HEADER    source        Header (the stream's)            CHANNEL_READY
    CHANNEL_READY     destination   Ready                            REQUESTS
    REQUESTS          destination   PageRequest                      REQUESTS
                      source        PostcopyPages (requested)        REQUESTS
                      source        Complete                         CHANNEL_END
    CHANNEL_END       destination   PageRequest (crossed the Complete)  CHANNEL_END
                      destination   Verified                         DONE

  and a stream that reconnects after the link broke in post-copy (HELLO flag ``resume``)::

    RESUME_HEADER     source        Header (the same one)            RESUMING
    RESUMING          destination   Missing                          POSTCOPY

Why these rules:

* **Handshake first, nothing unauthenticated after it.** Before AUTH only records fly, and the only
  trusted thing in them is what the proofs cover; after it every frame is MACed and sequenced.
* **Ready before pages.** The destination may refuse the Header (memory size, page size): Abort
  instead of Ready. One round trip is cheap next to pouring a guest's memory into a refusal.
* **Rounds.** A batch belongs to the open round; a round opens with its first batch and closes with
  RoundEnd, whose page count must equal what this stream carried in it. Round numbers only grow
  (a stream may skip rounds in which it had nothing to send). Complete needs the last round closed.
* **vCPU state** goes on the primary stream (index 0) only, exactly once per vCPU, and Complete on the
  primary requires every vCPU's: a destination never holds a VM without all its registers.
* **Complete counts frames.** ``stream_frames[i]`` must equal the frames this stream carried, so a
  secondary stream that lost its tail is detected; the engine compares the other streams' counts.
* **Two-phase commit, so the VM never runs twice.** The destination answers Complete with Verified
  only when its memory digest matches; the source answers Verified with Commit, after which it must
  never resume its copy; only then does the destination resume (and say Resumed). If the connection
  dies before Commit the destination discards its copy and the source stays the owner; if it dies
  after Commit the source must not resume on its own (the destination may be running). A secondary
  stream ends at Complete: the commit runs on the primary.
* **Abort** is legal from either side in every live phase, even when it is not that side's turn
  (it races with the peer's frames); afterwards the connection is in ERROR and refuses further use.

Post-copy keeps the commit and changes what is verified when. There is no whole-memory check before the guest
runs on the destination, because the destination does not hold the whole memory yet:

* **PostcopyStart** replaces Complete: after the last round (closed), with every vCPU's state, it names the
  pending pages (never sent, or written since) and carries the digest of all *other* pages, pending ones
  counted as zero pages. The destination drops its copies of the pending pages and answers Verified only when
  that digest matches its own: every page it keeps is checked before the VM moves. Commit, Resumed: as above;
  the source is paused for good from Commit on, but keeps its memory, since it still owns the pending pages.
* **Every page that follows is checked on arrival**: PostcopyPages carry each page's fingerprint, which the
  destination compares with the page's before the guest may see it (the frame's MAC has already vouched for
  the bytes on the wire; the fingerprint for what the source read). Pushed pages ride the stream, requested
  ones the post-copy channel, so that an answer never queues behind the push: only there may the destination
  speak, and requests and answers cross freely.
* **The end**: when every pending page has been sent, the source says Complete on both connections, with the
  digest of the whole memory as it was at the switch-over; the destination answers Verified on both once every
  page has arrived and its digest of what it installed, with what it kept, matches. Requests sent before the
  destination heard the channel's Complete may still cross it; the source drops them (the page is on its way).
  The guest has run meanwhile: this checks the transfer, not the live memory.
* **A broken link is not a lost VM.** After Commit the source pauses instead of failing (it still has every
  page the destination lacks) and reconnects with the ``resume`` flag; the destination answers the repeated
  Header with Missing, the pages it still lacks (whatever was in flight when the link broke is among them).

The table
=========

:data:`KINDS` lists every message once: its name, its sender, the phases it may appear in and where each
leads, and for frames the frame type, the event class, the encoder and decoder (``codec``), and the check
that decides whether it is valid here — field ranges and sequencing together, one function per kind, so a
received event is checked in one call. Adding a frame type touches three modules: its event
(``events.py``), its bytes (``codec.py``: a FrameType value, an encoder and a decoder), and its row and
check (here); the connection, the framing and the engine's transport need no change.
"""

from __future__ import annotations

import bisect
import enum
import itertools
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from numpy.typing import NDArray

from dirtylog.bitmap import DirtyBitmap
from dirtylog.kvm.memslot import SlotLayout
from dirtylog.migration.protocol import codec
from dirtylog.migration.protocol.codec import (
    DIGEST_SIZE,
    MAX_BATCH_DATA,
    MAX_BATCH_PAGES,
    MAX_GFN,
    MAX_PAGESET,
    MAX_PAYLOAD,
    MAX_SLOTS,
    MAX_STREAMS,
    MAX_VCPUS,
    VCPU_HEAD,
    FrameType,
    as_bytes_view,
)
from dirtylog.migration.protocol.errors import LocalProtocolError
from dirtylog.migration.protocol.events import (
    CODECS,
    Abort,
    AbortCode,
    Channel,
    Commit,
    Complete,
    Event,
    Header,
    Missing,
    PageBatch,
    PageRequest,
    PostcopyPages,
    PostcopyStart,
    Ready,
    Resumed,
    Role,
    RoundEnd,
    VcpuState,
    Verified,
)

PAGE_SIZES = tuple(1 << shift for shift in range(12, 17))  # 4 KiB to 64 KiB, as KVM on x86 and arm64
U32 = (1 << 32) - 1
U64 = (1 << 64) - 1


class Phase(enum.Enum):
    """Where the conversation is; names say what comes next."""

    HELLO = "HELLO"
    CHALLENGE = "CHALLENGE"
    AUTH = "AUTH"
    HEADER = "HEADER"
    READY = "READY"
    STREAMING = "STREAMING"
    VERIFY = "VERIFY"
    COMMIT = "COMMIT"
    RESUME = "RESUME"
    POSTCOPY_VERIFY = "POSTCOPY_VERIFY"
    POSTCOPY_COMMIT = "POSTCOPY_COMMIT"
    POSTCOPY_RESUME = "POSTCOPY_RESUME"
    POSTCOPY = "POSTCOPY"
    POSTCOPY_END = "POSTCOPY_END"
    CHANNEL_HEADER = "CHANNEL_HEADER"
    CHANNEL_READY = "CHANNEL_READY"
    REQUESTS = "REQUESTS"
    CHANNEL_END = "CHANNEL_END"
    RESUME_HEADER = "RESUME_HEADER"
    RESUMING = "RESUMING"
    DONE = "DONE"
    ERROR = "ERROR"


HANDSHAKE: Final = frozenset({Phase.HELLO, Phase.CHALLENGE, Phase.AUTH})
#: Phases in which an authenticated Abort frame may be sent or received.
ABORTABLE: Final = frozenset(Phase) - HANDSHAKE - {Phase.DONE, Phase.ERROR}
#: Phases in which an (unauthenticated) REJECT record may arrive: the handshake, and, at the source,
#: the round trip after its pipelined AUTH + Header, where the destination may refuse the AUTH.
REJECTABLE: Final = HANDSHAKE | {Phase.HEADER, Phase.READY, Phase.CHANNEL_HEADER, Phase.CHANNEL_READY,
                                 Phase.RESUME_HEADER, Phase.RESUMING}
#: Phases after the post-copy commit: the destination runs the VM and the source holds pages it lacks, so a broken
#: link pauses both, to be resumed.
POSTCOPY_LIVE: Final = frozenset({Phase.POSTCOPY, Phase.POSTCOPY_END, Phase.REQUESTS, Phase.CHANNEL_END,
                                  Phase.RESUME_HEADER, Phase.RESUMING})

SOURCE, DESTINATION = Role.SOURCE, Role.DESTINATION

Check = Callable[["StreamState", Any], None]


@dataclass(frozen=True)
class Kind:
    """One kind of message: who sends it (None: either side), and ``moves`` from each phase it may appear in
    to the phase after it. Frames add their type, event class, bytes and validity check."""

    name: str
    sender: Role | None
    moves: Mapping[Phase, Phase]
    frame: FrameType | None = None
    event: type[Event] | None = None
    encode: Callable[[Any], codec.Encoded] | None = None
    decode: Callable[[memoryview, int], Event] | None = None
    check: Check | None = None


# -- the checks, one per frame kind: fields and sequencing together ------------------------------------


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

    def __init__(self, slots: tuple[SlotLayout, ...]) -> None:
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

    def first_page_outside(self, pages: DirtyBitmap) -> int:
        """The first page of ``pages`` in no slot (a hole, or past the end), or -1."""
        covered = DirtyBitmap.from_runs(self.low, self.high - self.low, pages.npages)
        outside = pages - covered
        return int(outside.pages()[0]) if outside.any() else -1

    def first_outside(self, starts: NDArray[np.int64], ends: NDArray[np.int64]) -> int:
        """Index of the first run ``[start, end)`` not inside one covered range, or -1."""
        where = np.searchsorted(self.low, starts, side="right") - 1
        inside = (where >= 0) & (ends <= self.high[np.maximum(where, 0)])
        bad = np.flatnonzero(~inside)
        return int(bad[0]) if bad.size else -1


def check_header(state: StreamState, header: Header) -> None:
    """A page size KVM uses, vCPU and stream counts in range, disjoint slots inside the gfn space."""
    if header.page_size not in PAGE_SIZES:
        raise LocalProtocolError(f"page size {header.page_size} is not one of {', '.join(map(str, PAGE_SIZES))}")
    integer(header.vcpus, 1, MAX_VCPUS, "vCPU count")
    integer(header.streams, 1, MAX_STREAMS, "stream count")
    if header.codec not in CODECS:
        raise LocalProtocolError(f"codec {header.codec!r} is not one of {', '.join(CODECS)}")
    if not isinstance(header.workload, dict):
        raise LocalProtocolError(f"workload must be a dict, got {type(header.workload).__name__}")
    if not isinstance(header.slots, tuple) or not 1 <= len(header.slots) <= MAX_SLOTS:
        raise LocalProtocolError(f"the memory layout must be a tuple of 1 to {MAX_SLOTS} SlotLayouts")
    ids: set[int] = set()
    for slot in header.slots:
        if not isinstance(slot, SlotLayout):
            raise LocalProtocolError(f"memory layout entries must be SlotLayout, got {type(slot).__name__}")
        ident = integer(slot.slot, 0, U32, "slot id")
        if slot.guest_phys_addr % header.page_size or slot.memory_size % header.page_size:
            raise LocalProtocolError(f"slot {ident} is not a whole number of {header.page_size}-byte pages")
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
    if header.streams != state.stream_count:
        raise LocalProtocolError(
            f"Header says {header.streams} streams but the handshake opened stream "
            f"{state.stream_index} of {state.stream_count}"
        )
    if header.postcopy:
        if header.streams != 1:
            raise LocalProtocolError(f"post-copy runs on one stream and its post-copy channel, not {header.streams} "
                                     "streams")
        if header.end_gfn > MAX_PAGESET:
            raise LocalProtocolError(f"post-copy takes guests of up to {MAX_PAGESET} pages (page sets must fit a "
                                     f"frame); this one spans {header.end_gfn}")
    elif state.channel is Channel.POSTCOPY or state.resume:
        raise LocalProtocolError("a post-copy channel, or a resumed stream, belongs to a migration whose Header "
                                 "allows post-copy")
    state.header, state.layout = header, LayoutIndex(header.slots)


def check_batch(state: StreamState, batch: PageBatch) -> None:
    """Runs inside the layout, data that fits them, and the batch in the open round."""
    header, layout = state.streaming()
    integer(batch.round, 0, U32, "round")
    if batch.page_size != header.page_size:
        raise LocalProtocolError(f"batch page size {batch.page_size} differs from the Header's {header.page_size}")
    if batch.codec not in ("none", header.codec):
        raise LocalProtocolError(f"batch codec {batch.codec!r} is neither 'none' nor the Header's {header.codec!r}")
    starts, lengths, zero = batch.starts, batch.lengths, batch.zero
    if not (_array(starts, np.uint64) and _array(lengths, np.uint32) and (zero is None or _array(zero, np.bool_))):
        raise LocalProtocolError(
            "a batch needs 1-D arrays: starts uint64, lengths uint32, zero bool or None (use make_page_batch)"
        )
    nruns = len(starts)
    if nruns == 0 or len(lengths) != nruns:
        raise LocalProtocolError(
            f"a batch needs at least one run and as many lengths ({len(lengths)}) as starts ({nruns})"
        )
    npages = _check_runs(batch, layout)
    nzero = 0
    if zero is not None:
        if len(zero) != npages:
            raise LocalProtocolError(f"zero-page mask has {len(zero)} entries for {npages} pages")
        nzero = int(np.count_nonzero(zero))
        if nzero == 0:
            raise LocalProtocolError("a batch with no zero page has no zero mask (None): make_page_batch does that")
    nonzero = npages - nzero
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
    if state.open_round is None:
        if batch.round < state.next_round:
            raise LocalProtocolError(f"batch of round {batch.round} after round {state.next_round - 1} ended")
        state.open_round = batch.round
    elif batch.round != state.open_round:
        raise LocalProtocolError(
            f"batch of round {batch.round} while round {state.open_round} is open: end it with RoundEnd first"
        )
    state.round_pages += npages


def _check_runs(batch: PageBatch | PageRequest | PostcopyPages, layout: LayoutIndex, what: str = "batch") -> int:
    """Runs non-empty, ascending, disjoint, inside the layout, at most MAX_BATCH_PAGES pages in all; returns
    the page count."""
    starts, lengths = batch.starts, batch.lengths
    if len(starts) == 1:  # the usual batch (a stretch of dirty or round-0 pages): ints, not array passes
        start, count = int(starts[0]), int(lengths[0])
        if count == 0:
            raise LocalProtocolError(f"run 0 of the {what} is empty")
        if count > MAX_BATCH_PAGES:
            raise LocalProtocolError(f"a {what} of {count} pages is over the {MAX_BATCH_PAGES}-page limit")
        if start >= MAX_GFN:
            raise LocalProtocolError(f"page number {start:#x} is beyond any guest memory")
        if not layout.covers(start, start + count):
            raise LocalProtocolError(
                f"run 0 of the {what}, gfns [{start:#x}, {start + count:#x}), is outside the memory layout")
        return count
    if not np.all(lengths > 0):
        raise LocalProtocolError(f"run {int(np.argmin(lengths))} of the {what} is empty")
    npages = int(lengths.sum(dtype=np.uint64))
    if npages > MAX_BATCH_PAGES:
        raise LocalProtocolError(f"a {what} of {npages} pages is over the {MAX_BATCH_PAGES}-page limit")
    if int(starts.max()) >= MAX_GFN:
        raise LocalProtocolError(f"page number {int(starts.max()):#x} is beyond any guest memory")
    first = starts.astype(np.int64)
    end = first + lengths
    overlap = np.flatnonzero(first[1:] < end[:-1])
    if overlap.size:
        i = int(overlap[0]) + 1
        raise LocalProtocolError(
            f"run {i} of the {what} (gfn {int(first[i]):#x}) overlaps or precedes run {i - 1}: "
            "runs must be ascending and disjoint"
        )
    bad = layout.first_outside(first, end)
    if bad >= 0:
        raise LocalProtocolError(
            f"run {bad} of the {what}, gfns [{int(first[bad]):#x}, {int(end[bad]):#x}), is outside the memory layout"
        )
    return npages


def check_vcpu_state(state: StreamState, event: VcpuState) -> None:
    """A vCPU that exists, on the primary stream, once, with a state blob that fits a frame."""
    header, _ = state.streaming()
    integer(event.index, 0, header.vcpus - 1, "vCPU index")
    if not isinstance(event.state, bytes | bytearray | memoryview):
        raise LocalProtocolError(f"vCPU state must be bytes, got {type(event.state).__name__}")
    if len(event.state) > MAX_PAYLOAD - VCPU_HEAD.size:
        raise LocalProtocolError(f"vCPU state of {len(event.state)} bytes does not fit a frame")
    if not state.primary:
        raise LocalProtocolError(f"vCPU state on secondary stream {state.stream_index}: send it on stream 0")
    if event.index in state.vcpus_seen:
        raise LocalProtocolError(f"state of vCPU {event.index} sent twice")
    state.vcpus_seen.add(event.index)


def check_round_end(state: StreamState, event: RoundEnd) -> None:
    """The open round (or a later one) ends, counting exactly the pages this stream carried in it."""
    state.streaming()
    integer(event.round, 0, U32, "round")
    integer(event.pages, 0, U64, "page count")
    _check_round_stats(event.stats)
    if state.open_round is not None and event.round != state.open_round:
        raise LocalProtocolError(f"RoundEnd of round {event.round} while round {state.open_round} is open")
    if state.open_round is None and event.round < state.next_round:
        raise LocalProtocolError(f"RoundEnd of round {event.round} after round {state.next_round - 1} ended")
    if event.pages != state.round_pages:
        raise LocalProtocolError(
            f"RoundEnd of round {event.round} counts {event.pages} pages, the stream carried {state.round_pages}"
        )
    state.open_round, state.next_round, state.round_pages = None, event.round + 1, 0


MAX_STATS = 32
MAX_STAT_KEY = 64
MAX_STAT_TEXT = 256


def _check_round_stats(stats: object) -> None:
    """Round statistics are a small flat record of numbers, booleans and short texts: what a receiver may show
    or log without trusting the sender any further."""
    if not isinstance(stats, dict):
        raise LocalProtocolError(f"round statistics must be a dict, got {type(stats).__name__}")
    if len(stats) > MAX_STATS:
        raise LocalProtocolError(f"round statistics have {len(stats)} entries, over the {MAX_STATS} allowed")
    for key, value in stats.items():
        if not isinstance(key, str) or not 0 < len(key) <= MAX_STAT_KEY:
            raise LocalProtocolError(f"round statistic names are 1 to {MAX_STAT_KEY} characters: {key!r:.80}")
        if isinstance(value, str):
            if len(value) > MAX_STAT_TEXT:
                raise LocalProtocolError(f"round statistic {key!r} is a text of {len(value)} characters, over "
                                         f"{MAX_STAT_TEXT}")
        elif value is not None and not isinstance(value, bool | int | float):
            raise LocalProtocolError(f"round statistic {key!r} is a {type(value).__name__}: statistics are numbers, "
                                     "booleans or short texts")


def check_complete(state: StreamState, event: Complete) -> None:
    """A digest and the frame count of every stream; in pre-copy also no open round and every vCPU's state
    (primary). In post-copy it ends the stream (its digest: the whole memory at the switch-over) or the channel."""
    header, _ = state.streaming()
    _check_digest(event.digest)
    if not isinstance(event.stream_frames, tuple) or len(event.stream_frames) != header.streams:
        raise LocalProtocolError(f"Complete must count the frames of all {header.streams} streams in a tuple")
    for i, count in enumerate(event.stream_frames):
        integer(count, 0, U64, f"frame count of stream {i}")
    if state.phase is Phase.STREAMING:
        _check_switch(state, "Complete")
    if event.stream_frames[state.stream_index] != state.source_frames:
        raise LocalProtocolError(
            f"Complete counts {event.stream_frames[state.stream_index]} frames on stream {state.stream_index}, "
            f"it carried {state.source_frames}: frames were lost"
        )
    state.digest = event.digest


def _check_switch(state: StreamState, name: str) -> None:
    """What the end of pre-copy needs, Complete or PostcopyStart: no open round, every vCPU's state (primary)."""
    header, _ = state.streaming()
    if state.open_round is not None:
        raise LocalProtocolError(f"{name} while round {state.open_round} has no RoundEnd")
    if state.primary and len(state.vcpus_seen) != header.vcpus:
        missing = sorted(set(range(header.vcpus)) - state.vcpus_seen)
        raise LocalProtocolError(
            f"{name} without the state of vCPU {', '.join(map(str, missing[:8]))}{' ...' if len(missing) > 8 else ''}"
        )


def check_postcopy_start(state: StreamState, event: PostcopyStart) -> None:
    """A post-copy migration, the end of pre-copy (as Complete), frame counts, and pending pages that are a page
    set over the layout."""
    header, _ = state.streaming()
    if not header.postcopy:
        raise LocalProtocolError("PostcopyStart in a migration whose Header does not allow post-copy")
    _check_digest(event.digest)
    if not isinstance(event.stream_frames, tuple) or len(event.stream_frames) != header.streams:
        raise LocalProtocolError(f"PostcopyStart must count the frames of all {header.streams} streams in a tuple")
    _check_switch(state, "PostcopyStart")
    _check_pageset(state, event.pending, "pending pages")
    if event.stream_frames[state.stream_index] != state.source_frames:
        raise LocalProtocolError(
            f"PostcopyStart counts {event.stream_frames[state.stream_index]} frames on stream {state.stream_index}, "
            f"it carried {state.source_frames}: frames were lost"
        )
    state.digest = event.digest


def check_missing(state: StreamState, event: Missing) -> None:
    """A page set over the layout."""
    _check_pageset(state, event.pages, "missing pages")


def _check_pageset(state: StreamState, pages: object, what: str) -> None:
    header, layout = state.streaming()
    if not isinstance(pages, DirtyBitmap):
        raise LocalProtocolError(f"{what} must be a DirtyBitmap, got {type(pages).__name__}")
    if pages.npages != header.end_gfn:
        raise LocalProtocolError(f"{what} span {pages.npages} pages; the memory layout spans {header.end_gfn}")
    outside = layout.first_page_outside(pages)
    if outside >= 0:
        raise LocalProtocolError(f"{what} include gfn {outside:#x}, outside the memory layout")


def check_page_request(state: StreamState, event: PageRequest) -> None:
    """Runs of pages inside the layout."""
    _, layout = state.streaming()
    if not (_array(event.starts, np.uint64) and _array(event.lengths, np.uint32)):
        raise LocalProtocolError("a page request needs 1-D arrays: starts uint64, lengths uint32")
    if len(event.starts) == 0 or len(event.lengths) != len(event.starts):
        raise LocalProtocolError(f"a page request needs at least one run and as many lengths ({len(event.lengths)}) "
                                 f"as starts ({len(event.starts)})")
    _check_runs(event, layout, "page request")


def check_postcopy_pages(state: StreamState, event: PostcopyPages) -> None:
    """Runs inside the layout, a fingerprint per page (0 for zero pages), raw data that fits them; answers on the
    post-copy channel, pushed pages on the stream."""
    header, layout = state.streaming()
    if event.page_size != header.page_size:
        raise LocalProtocolError(f"page size {event.page_size} differs from the Header's {header.page_size}")
    if event.requested != (state.channel is Channel.POSTCOPY):
        raise LocalProtocolError("requested pages go on the post-copy channel, pushed pages on the stream"
                                 if event.requested else
                                 "the post-copy channel carries requested pages only; push on the stream")
    starts, lengths, zero, prints = event.starts, event.lengths, event.zero, event.fingerprints
    if not (_array(starts, np.uint64) and _array(lengths, np.uint32) and _array(prints, np.uint64)
            and (zero is None or _array(zero, np.bool_))):
        raise LocalProtocolError("post-copy pages need 1-D arrays: starts, fingerprints uint64, lengths uint32, "
                                 "zero bool or None")
    if len(starts) == 0 or len(lengths) != len(starts):
        raise LocalProtocolError(f"post-copy pages need at least one run and as many lengths ({len(lengths)}) as "
                                 f"starts ({len(starts)})")
    npages = _check_runs(event, layout, "post-copy batch")
    if len(prints) != npages:
        raise LocalProtocolError(f"{len(prints)} fingerprints for {npages} pages")
    nzero = 0
    if zero is not None:
        if len(zero) != npages:
            raise LocalProtocolError(f"zero-page mask has {len(zero)} entries for {npages} pages")
        nzero = int(np.count_nonzero(zero))
        if nzero == 0:
            raise LocalProtocolError("post-copy pages with no zero page have no zero mask (None)")
        if prints[zero].any():
            raise LocalProtocolError("a zero page's fingerprint is 0")
    size = (npages - nzero) * header.page_size
    data_len = len(as_bytes_view(event.data))
    if data_len != size:
        raise LocalProtocolError(
            f"post-copy data is {data_len} bytes; {npages - nzero} non-zero pages of {header.page_size} bytes need "
            f"{size}")
    if size > MAX_BATCH_DATA:
        raise LocalProtocolError(f"{npages - nzero} non-zero pages are over the {MAX_BATCH_DATA}-byte batch limit")


def check_verified(state: StreamState, event: Verified) -> None:
    """The digest the source sent in Complete."""
    _check_digest(event.digest)
    if event.digest != state.digest:
        raise LocalProtocolError(
            f"Verified digest {event.digest.hex()} is not the one the source sent "
            f"({state.digest.hex() if state.digest else 'none'})"
        )


def check_abort(state: StreamState, event: Abort) -> None:
    """A reason string and a known code (the reason is cut to size when sent, never refused)."""
    if not isinstance(event.reason, str) or not isinstance(event.code, AbortCode):
        raise LocalProtocolError("Abort needs a reason string and an AbortCode")


def _check_digest(digest: object) -> None:
    if not isinstance(digest, bytes) or len(digest) != DIGEST_SIZE:
        raise LocalProtocolError(f"a memory digest is {DIGEST_SIZE} bytes (payload.digest.PageDigest.digest)")


def _array(value: object, dtype: type[np.generic]) -> bool:
    return isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype == dtype


# -- the table -------------------------------------------------------------------------------------------

KINDS: Final[tuple[Kind, ...]] = (
    Kind("HELLO", SOURCE, {Phase.HELLO: Phase.CHALLENGE}),
    Kind("CHALLENGE", DESTINATION, {Phase.CHALLENGE: Phase.AUTH}),
    Kind("AUTH", SOURCE, {Phase.AUTH: Phase.HEADER}),
    Kind("REJECT", None, dict.fromkeys(REJECTABLE, Phase.ERROR)),
    Kind("Header", SOURCE, {Phase.HEADER: Phase.READY, Phase.CHANNEL_HEADER: Phase.CHANNEL_READY,
                            Phase.RESUME_HEADER: Phase.RESUMING}, FrameType.HEADER, Header,
         codec.encode_header, codec.decode_header, check_header),
    Kind("Ready", DESTINATION, {Phase.READY: Phase.STREAMING, Phase.CHANNEL_READY: Phase.REQUESTS},
         FrameType.READY, Ready, codec.encode_empty, codec.decode_empty(Ready())),
    Kind("PageBatch", SOURCE, {Phase.STREAMING: Phase.STREAMING}, FrameType.PAGE_BATCH, PageBatch,
         codec.encode_batch, codec.decode_batch, check_batch),
    Kind("VcpuState", SOURCE, {Phase.STREAMING: Phase.STREAMING}, FrameType.VCPU_STATE, VcpuState,
         codec.encode_vcpu_state, codec.decode_vcpu_state, check_vcpu_state),
    Kind("RoundEnd", SOURCE, {Phase.STREAMING: Phase.STREAMING}, FrameType.ROUND_END, RoundEnd,
         codec.encode_round_end, codec.decode_round_end, check_round_end),
    Kind("Complete", SOURCE, {Phase.STREAMING: Phase.VERIFY, Phase.POSTCOPY: Phase.POSTCOPY_END,
                              Phase.REQUESTS: Phase.CHANNEL_END}, FrameType.COMPLETE, Complete,
         codec.encode_complete, codec.decode_complete, check_complete),
    Kind("PostcopyStart", SOURCE, {Phase.STREAMING: Phase.POSTCOPY_VERIFY}, FrameType.POSTCOPY_START, PostcopyStart,
         codec.encode_postcopy_start, codec.decode_postcopy_start, check_postcopy_start),
    Kind("Verified", DESTINATION, {Phase.VERIFY: Phase.COMMIT, Phase.POSTCOPY_VERIFY: Phase.POSTCOPY_COMMIT,
                                   Phase.POSTCOPY_END: Phase.DONE, Phase.CHANNEL_END: Phase.DONE},
         FrameType.VERIFIED, Verified,
         codec.encode_verified, codec.decode_verified, check_verified),
    Kind("Commit", SOURCE, {Phase.COMMIT: Phase.RESUME, Phase.POSTCOPY_COMMIT: Phase.POSTCOPY_RESUME},
         FrameType.COMMIT, Commit, codec.encode_empty, codec.decode_empty(Commit())),
    Kind("Resumed", DESTINATION, {Phase.RESUME: Phase.DONE, Phase.POSTCOPY_RESUME: Phase.POSTCOPY},
         FrameType.RESUMED, Resumed, codec.encode_empty, codec.decode_empty(Resumed())),
    Kind("PostcopyPages", SOURCE, {Phase.POSTCOPY: Phase.POSTCOPY, Phase.REQUESTS: Phase.REQUESTS},
         FrameType.POSTCOPY_PAGES, PostcopyPages, codec.encode_postcopy_pages, codec.decode_postcopy_pages,
         check_postcopy_pages),
    Kind("PageRequest", DESTINATION, {Phase.REQUESTS: Phase.REQUESTS, Phase.CHANNEL_END: Phase.CHANNEL_END},
         FrameType.PAGE_REQUEST, PageRequest,
         codec.encode_page_request, codec.decode_page_request, check_page_request),
    Kind("Missing", DESTINATION, {Phase.RESUMING: Phase.POSTCOPY}, FrameType.MISSING, Missing,
         codec.encode_missing, codec.decode_missing, check_missing),
    Kind("Abort", None, dict.fromkeys(ABORTABLE, Phase.ERROR), FrameType.ABORT, Abort,
         codec.encode_abort, codec.decode_abort, check_abort),
)

BY_NAME: Final = {kind.name: kind for kind in KINDS}
BY_EVENT: Final = {kind.event: kind for kind in KINDS if kind.event is not None}
BY_FRAME: Final = {int(kind.frame): kind for kind in KINDS if kind.frame is not None}


# -- the state -------------------------------------------------------------------------------------------


class StreamState:
    """Phase and per-stream bookkeeping of one connection; ``process`` applies the table to an event."""

    def __init__(self) -> None:
        self.phase = Phase.HELLO
        self.stream_index = 0
        self.stream_count = 1
        self.channel = Channel.STREAM
        self.resume = False
        self.header: Header | None = None
        self.layout: LayoutIndex | None = None
        #: Frames the source sent after the handshake, before its Complete.
        self.source_frames = 0
        self.open_round: int | None = None
        self.next_round = 0
        self.round_pages = 0
        self.vcpus_seen: set[int] = set()
        self.digest: bytes | None = None

    @property
    def primary(self) -> bool:
        """Stream 0 (not a post-copy channel): it carries the vCPU states and the commit."""
        return self.stream_index == 0 and self.channel is Channel.STREAM

    def streaming(self) -> tuple[Header, LayoutIndex]:
        """The Header and its layout index, which every STREAMING phase has (set by the Header's check)."""
        assert self.header is not None and self.layout is not None
        return self.header, self.layout

    def next_phase(self, sender: Role, name: str) -> Phase:
        """The phase after message ``name`` from ``sender``, or LocalProtocolError if it is illegal now."""
        kind = BY_NAME[name]
        nxt = kind.moves.get(self.phase) if kind.sender in (None, sender) else None
        if nxt is None:
            why = "" if kind.sender is None else f" ({self.expected()})"
            raise LocalProtocolError(f"{sender.value} cannot send {name} in phase {self.phase.value}{why}")
        if nxt is Phase.VERIFY and not self.primary:
            return Phase.DONE  # the commit runs on the primary stream only
        if nxt is Phase.HEADER and self.channel is Channel.POSTCOPY:
            return Phase.CHANNEL_HEADER  # after AUTH: the HELLO said what this connection is for
        if nxt is Phase.HEADER and self.resume:
            return Phase.RESUME_HEADER
        return nxt

    def advance(self, sender: Role, name: str) -> None:
        """Move to the phase after message ``name`` from ``sender``, or LocalProtocolError if illegal."""
        self.phase = self.next_phase(sender, name)

    def expected(self) -> str:
        """What may come next, for messages."""
        options = [f"{kind.sender.value} {kind.name}" for kind in KINDS
                   if kind.sender is not None and self.phase in kind.moves]
        return "expected " + " or ".join(options) if options else "the stream is over"

    def process(self, sender: Role, event: Event) -> None:
        """Apply the table to an event ``sender`` sends: legal now, valid, then the phase moves on.
        LocalProtocolError if it breaks a rule."""
        kind = BY_EVENT.get(type(event))
        if kind is None:
            raise LocalProtocolError(f"{type(event).__name__} is not sent as a frame")
        nxt = self.next_phase(sender, kind.name)
        if kind.check is not None:
            kind.check(self, event)
        self.phase = nxt
        if sender is SOURCE and not isinstance(event, Complete):
            self.source_frames += 1
