"""What travels on the migration stream, as values: frozen dataclasses, one per message.

Events are dumb on purpose: they hold values and check nothing. What is legal (field ranges, page
numbers inside the memory layout, which event may follow which) is decided in one place, ``rules``, for
both directions, so a source and a destination can never disagree about it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np
from numpy.typing import NDArray

from dirtylog.bitmap import DirtyBitmap
from dirtylog.kvm.memslot import SlotLayout

#: Compression of a PageBatch's data block. The Header names the one codec the source may use;
#: each batch is either that codec or "none" (incompressible data goes raw).
Codec = Literal["none", "lz4", "zstd"]
CODECS: Final[tuple[Codec, ...]] = ("none", "lz4", "zstd")

#: Anything whose bytes can go on the wire without a copy.
BytesLike = bytes | bytearray | memoryview


class Role(enum.Enum):
    """Which end of the stream: the source sends memory, the destination receives it."""

    SOURCE = "source"
    DESTINATION = "destination"

    @property
    def peer(self) -> Role:
        return Role.DESTINATION if self is Role.SOURCE else Role.SOURCE


class Channel(enum.Enum):
    """What a connection carries: a migration's stream (pages, vCPUs, the commit), or its post-copy channel (page
    requests and their answers, apart from the pages the source pushes, so that they never queue behind them:
    QEMU's postcopy-preempt channel)."""

    STREAM = "stream"
    POSTCOPY = "postcopy"


class Sentinel(enum.Enum):
    """``next_event()`` results that are not events."""

    NEED_DATA = "NEED_DATA"
    CLOSED = "CLOSED"

    def __repr__(self) -> str:
        return self.value

    __str__ = __repr__


#: next_event(): feed more bytes with receive_data() first.
NEED_DATA: Final = Sentinel.NEED_DATA
#: next_event(): the peer closed the connection at a clean end of the stream.
CLOSED: Final = Sentinel.CLOSED


class AbortCode(enum.IntEnum):
    """Why a side gave up; travels with Abort frames and handshake REJECT records."""

    CANCELLED = 1  # the operator or the engine stopped the migration
    PROTOCOL = 2  # a corrupt, unexpected or invalid frame
    AUTHENTICATION = 3  # key mismatch or a frame whose MAC did not verify
    VERSION = 4  # the two ends speak different stream versions
    MISMATCH = 5  # the Header does not fit the destination (memory size, page size)
    VERIFY_FAILED = 6  # the destination's memory digest differs from the source's
    RESUME_FAILED = 7  # the destination could not resume the VM after Commit
    INTERNAL = 8  # a local failure unrelated to the stream (KVM, disk, ...)


# -- handshake ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Hello:
    """Destination side: a source asks to open a stream. Not yet authenticated: call ``accept()``."""

    migration_id: bytes
    stream_index: int
    stream_count: int
    encrypted: bool = False  # the source asked for encrypted frames
    channel: Channel = Channel.STREAM
    resume: bool = False  # the source reconnects to resume a post-copy migration whose link broke


@dataclass(frozen=True, slots=True)
class Accepted:
    """Source side: the destination proved it holds the key; now send the Header."""


# -- the stream --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Header:
    """Source → destination, first: what is being migrated and how it will be encoded."""

    page_size: int
    slots: tuple[SlotLayout, ...]
    vcpus: int
    workload: dict[str, Any] = field(default_factory=dict)
    codec: Codec = "none"
    streams: int = 1
    #: The source may switch to post-copy: the destination must take pages on demand (userfaultfd) and receive
    #: the migration's post-copy channel.
    postcopy: bool = False

    @property
    def end_gfn(self) -> int:
        """One past the highest guest frame number of the layout (the span page sets are laid over)."""
        return max(s.base_gfn + s.npages for s in self.slots)

    @property
    def total_pages(self) -> int:
        """Pages of guest memory, summed over the slots (derived, so it can never disagree)."""
        return sum(s.npages for s in self.slots)

    @property
    def memory_bytes(self) -> int:
        return self.total_pages * self.page_size


@dataclass(frozen=True, slots=True)
class Ready:
    """Destination → source: the Header is accepted; pages may flow."""


@dataclass(frozen=True, slots=True, eq=False)
class PageBatch:
    """Source → destination: pages of one round, as ascending runs of guest frame numbers.

    ``zero[i]`` marks the i-th page of the batch (in run order) as all zeroes: it carries no data;
    ``zero`` is None when no page of the batch is a zero page. ``data`` holds the other pages, in order,
    either raw (``codec == "none"``, exactly ``(npages - nzero) * page_size`` bytes) or as one lz4 / zstd
    block of that concatenation. ``page_size`` is not sent per batch: the receiver fills it in from the
    Header. Build batches with ``payload.pages.make_page_batch`` and read them with
    ``payload.pages.batch_pages``.
    """

    round: int
    starts: NDArray[np.uint64]
    lengths: NDArray[np.uint32]
    zero: NDArray[np.bool_] | None
    data: BytesLike
    codec: Codec = "none"
    page_size: int = 4096

    @property
    def run(self) -> tuple[int, int] | None:
        """``(first page, pages)`` when the batch is one run of non-zero pages, the usual batch (a stretch
        of dirty or round-0 pages), whose data is then exactly those pages in order; None otherwise.

        Whoever makes or decodes a batch decides this once, by giving it one run and no zero mask; every
        consumer then takes the fast path (ints and slices, no per-page arrays) from this property alone.
        """
        if self.zero is not None or len(self.starts) != 1:
            return None
        return int(self.starts[0]), int(self.lengths[0])

    @property
    def npages(self) -> int:
        if len(self.lengths) == 1:  # the usual batch; a NumPy reduction costs 10-20 us per frame in situ
            return int(self.lengths[0])
        return int(self.lengths.sum(dtype=np.uint64))

    @property
    def nzero(self) -> int:
        return 0 if self.zero is None else int(np.count_nonzero(self.zero))


@dataclass(frozen=True, slots=True)
class VcpuState:
    """Source → destination: the saved state of vCPU ``index``, opaque to the stream."""

    index: int
    state: bytes


@dataclass(frozen=True, slots=True)
class RoundEnd:
    """Source → destination: round ``round`` is over; ``pages`` went in it on this stream."""

    round: int
    pages: int
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Complete:
    """Source → destination, last data frame: the source's memory digest and its frame counts.

    ``stream_frames[i]`` is the number of frames the source sent on stream ``i`` after the handshake
    and before its Complete, so the destination can check that no stream lost its tail.
    """

    digest: bytes
    stream_frames: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Verified:
    """Destination → source: our memory digest equals ``digest``; ready to take the VM over."""

    digest: bytes


@dataclass(frozen=True, slots=True)
class Commit:
    """Source → destination: the source has stopped for good; the destination owns the VM now."""


@dataclass(frozen=True, slots=True)
class Resumed:
    """Destination → source: the VM runs on the destination."""


@dataclass(frozen=True, slots=True, eq=False)
class PostcopyStart:
    """Source → destination, instead of Complete: the VM moves now, before all of its memory has.

    ``pending`` are the pages the destination does not have (never sent, or written since they were sent): it
    drops any copy of them and takes them as they come, on demand or pushed. ``digest`` is the memory digest of
    every other page, with the pending pages counted as zero pages: the destination compares it with its own
    before it takes the VM. ``stream_frames`` counts the frames of each stream, as Complete's does.
    """

    pending: DirtyBitmap
    digest: bytes
    stream_frames: tuple[int, ...]


@dataclass(frozen=True, slots=True, eq=False)
class PageRequest:
    """Destination → source, on the post-copy channel: send these pages first (a vCPU waits for them).
    Ascending, disjoint runs of guest frame numbers (QEMU's return path carries one start and length)."""

    starts: NDArray[np.uint64]
    lengths: NDArray[np.uint32]


@dataclass(frozen=True, slots=True, eq=False)
class PostcopyPages:
    """Source → destination after the post-copy switch: pending pages, as they are at the switch-over, in
    ascending runs. ``requested``: the answer to a PageRequest (on the post-copy channel); else pushed in the
    background (on the stream). ``zero`` as in PageBatch; ``fingerprints[i]`` is the digest fingerprint of page
    ``i`` (in run order, zero pages 0), which the destination checks before the guest may see the page; ``data``
    the non-zero pages, raw."""

    starts: NDArray[np.uint64]
    lengths: NDArray[np.uint32]
    zero: NDArray[np.bool_] | None
    fingerprints: NDArray[np.uint64]
    data: BytesLike
    requested: bool = False
    page_size: int = 4096

    @property
    def npages(self) -> int:
        return int(self.lengths.sum(dtype=np.uint64)) if len(self.lengths) != 1 else int(self.lengths[0])


@dataclass(frozen=True, slots=True, eq=False)
class Missing:
    """Destination → source, answering the Header of a resumed post-copy stream: the pages it still lacks (what
    was in flight when the link broke is among them)."""

    pages: DirtyBitmap


@dataclass(frozen=True, slots=True)
class Abort:
    """Either side: give up; the connection is unusable afterwards."""

    reason: str
    code: AbortCode = AbortCode.CANCELLED


Event = (
    Hello
    | Accepted
    | Header
    | Ready
    | PageBatch
    | VcpuState
    | RoundEnd
    | Complete
    | Verified
    | Commit
    | Resumed
    | PostcopyStart
    | PageRequest
    | PostcopyPages
    | Missing
    | Abort
)
