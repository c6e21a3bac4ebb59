"""Page batches as NumPy arrays: runs of page numbers, zero-page masks, compression.

The engine gathers pages from guest memory and finds zero pages (whole-array NumPy work); this module
turns that into a PageBatch and back, with no per-page Python loop. Decompression is here, not in the
connection, so the engine can run it where it likes (lz4 and zstd release the GIL).
"""

from __future__ import annotations

from typing import Any, Final

import lz4.block
import numpy as np
import zstandard
from numpy.typing import ArrayLike, NDArray

from dirtylog.migration.protocol.codec import MAX_BATCH_DATA, as_bytes_view
from dirtylog.migration.protocol.errors import LocalProtocolError, RemoteProtocolError
from dirtylog.migration.protocol.events import BytesLike, Codec, PageBatch

#: zstd level 1: at migration speeds the link, not the ratio, is what a higher level would cost.
ZSTD_LEVEL: Final = 1


def runs_from_pfns(pfns: ArrayLike) -> tuple[NDArray[np.uint64], NDArray[np.uint32]]:
    """Runs ``(starts, lengths)`` of consecutive page numbers in strictly ascending ``pfns``."""
    p = np.asarray(pfns, dtype=np.uint64).ravel()
    if p.size == 0:
        return np.empty(0, np.uint64), np.empty(0, np.uint32)
    if p.size == 1:  # post-copy's usual request: one page, no array passes
        return p.copy(), np.ones(1, np.uint32)
    if np.any(p[1:] <= p[:-1]):
        raise LocalProtocolError("page numbers of a batch must be strictly ascending (sort and deduplicate them)")
    breaks = np.flatnonzero(np.diff(p) != 1) + 1
    first = np.concatenate(([0], breaks))
    lengths = np.diff(np.concatenate((first, [p.size])))
    return p[first], lengths.astype(np.uint32)


def pfns_from_runs(starts: NDArray[np.uint64], lengths: NDArray[np.uint32]) -> NDArray[np.uint64]:
    """Every page number the runs cover, in order (validated runs: below 2**52, so int64 is exact)."""
    if len(starts) == 1:  # one run: a range (post-copy's requests and answers)
        first = int(starts[0])
        return np.arange(first, first + int(lengths[0]), dtype=np.uint64)
    lens = lengths.astype(np.int64)
    total = int(lens.sum())
    # Page k of run r is starts[r] + (k - first_index[r]): one repeat and one arange, no loop.
    first_index = np.cumsum(lens) - lens
    offsets = np.repeat(starts.astype(np.int64) - first_index, lens)
    return (offsets + np.arange(total, dtype=np.int64)).astype(np.uint64)


def compress(codec: Codec, data: BytesLike) -> bytes:
    """``data`` as one lz4 block (size not stored: the receiver knows it) or one zstd frame."""
    if codec == "lz4":
        return bytes(lz4.block.compress(data, store_size=False))
    if codec == "zstd":
        # A compressor per call: instances must not be shared between threads, and the engine may
        # compress batches on several.
        return bytes(zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data))
    raise LocalProtocolError(f"cannot compress with codec {codec!r}")


def decompress(codec: Codec, data: BytesLike, size: int) -> bytes:
    """Exactly ``size`` bytes out of a compressed block, or RemoteProtocolError (never more memory)."""
    try:
        if codec == "lz4":
            out = lz4.block.decompress(data, uncompressed_size=size)
        elif codec == "zstd":
            # zstd trusts the frame's declared size over max_output_size: check it first, so a
            # hostile frame cannot make us allocate more than the batch's pages.
            declared = zstandard.frame_content_size(data)
            if declared != size:
                raise RemoteProtocolError(f"zstd block declares {declared} bytes, the batch needs {size}")
            out = zstandard.ZstdDecompressor().decompress(data, max_output_size=size, allow_extra_data=False)
        else:
            raise RemoteProtocolError(f"codec {codec!r} is not a compression codec")
    except (lz4.block.LZ4BlockError, zstandard.ZstdError) as exc:
        raise RemoteProtocolError(f"{codec} block of the batch is corrupt: {exc}") from None
    if len(out) != size:
        raise RemoteProtocolError(f"{codec} block holds {len(out)} bytes of pages, the batch needs {size}")
    return bytes(out)


def make_page_batch(
    round: int,
    pfns: ArrayLike | None,
    zero: ArrayLike | None,
    data: BytesLike | NDArray[Any],
    *,
    page_size: int,
    codec: Codec = "none",
    runs: tuple[NDArray[np.uint64], NDArray[np.uint32]] | None = None,
) -> PageBatch:
    """A PageBatch of ``pfns`` (strictly ascending), ``zero`` marking all-zero pages (None: there are none,
    which the caller that knows it says so, sparing a pass over the mask).

    ``data`` is the non-zero pages concatenated in ``pfns`` order (e.g. ``pages[~zero]``), taken as is
    for ``codec="none"``. With lz4 or zstd the batch carries the compressed block unless compression
    saves less than 1/16: then decompressing would cost the receiver more than it saves on the link,
    and the batch goes raw. ``runs``, when the caller already has them, are ``pfns`` as (starts,
    lengths) and spare recomputing them (``pfns`` may then be None).
    """
    if runs is None:
        if pfns is None:
            raise LocalProtocolError("a page batch needs its page numbers: pfns, or runs")
        runs = runs_from_pfns(pfns)
    starts, lengths = runs
    zero_mask = None if zero is None else np.asarray(zero, dtype=np.bool_).ravel()
    if zero_mask is not None and not zero_mask.any():
        zero_mask = None  # the batch says "no zero page" by having no mask: PageBatch.run reads that
    view = as_bytes_view(data)
    if codec != "none" and len(view):
        packed = compress(codec, view)
        if len(packed) <= len(view) - len(view) // 16:
            return PageBatch(round, starts, lengths, zero_mask, packed, codec, page_size)
    return PageBatch(round, starts, lengths, zero_mask, view, "none", page_size)


def decode_pages(batch: PageBatch) -> tuple[NDArray[np.uint64], NDArray[np.bool_], NDArray[np.uint8]]:
    """``(pfns, zero, pages)`` of a received batch; ``pages[i]`` is the i-th non-zero page.

    Raw data is viewed, not copied; compressed data is decompressed once. A batch whose data does not
    hold exactly its non-zero pages raises RemoteProtocolError: apply nothing of it, abort.
    """
    pfns = pfns_from_runs(batch.starts, batch.lengths)
    zero = batch.zero if batch.zero is not None else np.zeros(pfns.size, dtype=np.bool_)
    return pfns, zero, batch_pages(batch)


def batch_pages(batch: PageBatch) -> NDArray[np.uint8]:
    """The non-zero pages of a received batch, one per row (``decode_pages`` without the page numbers)."""
    nonzero = batch.npages - batch.nzero
    size = nonzero * batch.page_size
    if size > MAX_BATCH_DATA:
        raise RemoteProtocolError(f"batch of {nonzero} non-zero pages exceeds {MAX_BATCH_DATA} bytes of data")
    if batch.codec == "none":
        raw: BytesLike = as_bytes_view(batch.data)
        if len(raw) != size:
            raise RemoteProtocolError(
                f"batch of {nonzero} non-zero {batch.page_size}-byte pages carries {len(raw)} bytes, not {size}"
            )
    else:
        raw = decompress(batch.codec, batch.data, size)
    return np.frombuffer(raw, dtype=np.uint8).reshape(nonzero, batch.page_size)
