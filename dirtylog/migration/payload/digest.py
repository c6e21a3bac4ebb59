"""The memory digest of a migration, kept current page by page as pages cross the wire.

Each page has a 64-bit fingerprint, a linear hash of its 512 little-endian words with fixed odd
multipliers (``sum(w[i] * K[i]) mod 2**64``), computed by a compiled loop (``_fingerprints.py``) on data
that is hot in cache: pages the source copies out of the guest in the same pass, or pages the destination
has just received. A zero page's fingerprint is 0,
so a fresh, zeroed destination starts with the right values at no cost. The digest is the xxh3-128 of
the fingerprint array.

The source fingerprints what it sends, the destination what it applies (only the copy it keeps). At the
switch-over every page dirtied since its last send is in the final round, so the source's digest is the
digest of its memory at the pause exactly when the dirty log lost no write; the destination's check
therefore verifies the transfer and the dirty log end to end. (Linear hashing detects every single-word
change and random corruption with near certainty; it is not a MAC: tampering is the frame MAC's job.)
"""

from __future__ import annotations

import functools
from types import ModuleType

import numpy as np
import numpy.typing as npt
import xxhash

from dirtylog.errors import DirtylogError

_WORDS = 512  # 64-bit words in a 4 KiB page


class DigestError(DirtylogError, ValueError):
    """Pages handed to the digest in a shape it cannot take (a caller's bug, said plainly)."""

#: The fixed odd multipliers of the fingerprint (part of its definition: a destination must use the same).
MULTIPLIERS = np.random.default_rng(0x6469727479).integers(0, 2**63, _WORDS, dtype=np.uint64) | np.uint64(1)


@functools.cache
def _kernels() -> ModuleType:
    """The compiled passes, imported on first use (Numba's import costs 0.3 s)."""
    from dirtylog.migration.payload import _fingerprints as module

    return module


def load_kernels() -> None:
    """Load the compiled passes now rather than in a migration's first round (0.3-1 s once per process)."""
    page = np.zeros((1, _WORDS * 8), dtype=np.uint8)
    fingerprints(page)
    gather(page, np.zeros(1, dtype=np.uint64), np.ones(1, dtype=np.uint32), page.copy())


def _words(pages: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint64]:
    if pages.ndim != 2 or pages.shape[1] != _WORDS * 8 or not pages.flags.c_contiguous:
        raise DigestError(f"pages must be a C-contiguous (n, {_WORDS * 8}) uint8 array, got shape {pages.shape}")
    return pages.view(np.uint64)


def fingerprints(pages: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint64]:
    """The fingerprint of each row of ``pages`` (shape ``(n, 4096)``)."""
    prints = np.empty(pages.shape[0], dtype=np.uint64)
    _kernels().fingerprint_rows(_words(np.ascontiguousarray(pages)), MULTIPLIERS, prints)
    return prints


def gather(memory: npt.NDArray[np.uint8], starts: npt.NDArray[np.uint64], lengths: npt.NDArray[np.uint32],
           out: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint64]:
    """Copy the runs ``(starts, lengths)`` of pages of ``memory`` (shape ``(npages, 4096)``) into the first rows
    of ``out`` in order, in one pass that also fingerprints them; returns the fingerprints."""
    if starts.size == 1:  # the usual batch: ints, not array passes
        count, past = int(lengths[0]), int(starts[0]) + int(lengths[0]) > memory.shape[0]
    else:
        count, past = int(lengths.sum(dtype=np.uint64)), bool(np.any(starts + lengths > memory.shape[0]))
    if count > out.shape[0]:
        raise DigestError(f"runs of {count} pages do not fit a buffer of {out.shape[0]} pages")
    if past:
        raise DigestError(f"a run goes past the memory's {memory.shape[0]} pages")
    prints = np.empty(count, dtype=np.uint64)
    _kernels().gather_rows(_words(memory), starts.astype(np.uint64, copy=False),
                           lengths.astype(np.uint32, copy=False), _words(out), MULTIPLIERS, prints)
    return prints


class PageDigest:
    """Fingerprints of every guest page, updated as pages are sent or applied."""

    def __init__(self, npages: int) -> None:
        self.values = np.zeros(npages, dtype=np.uint64)  # all zero: the fingerprint of zeroed memory

    def update(self, pfns: npt.NDArray[np.uint64], pages: npt.NDArray[np.uint8]) -> None:
        """Pages ``pfns`` now hold ``pages`` (one row each)."""
        self.values[pfns] = fingerprints(pages)

    def set(self, pfns: npt.NDArray[np.uint64], values: npt.NDArray[np.uint64]) -> None:
        """Pages ``pfns`` now have fingerprints ``values`` (computed by the caller, e.g. to find zero pages)."""
        self.values[pfns] = values

    def set_run(self, first: int, values: npt.NDArray[np.uint64]) -> None:
        """Pages ``first``, ``first + 1``, ... now have fingerprints ``values``."""
        self.values[first:first + values.size] = values

    def update_run(self, first: int, pages: npt.NDArray[np.uint8]) -> None:
        """Pages ``first``, ``first + 1``, ... now hold ``pages`` (one row each)."""
        self.values[first:first + pages.shape[0]] = fingerprints(pages)

    def zero(self, pfns: npt.NDArray[np.uint64]) -> None:
        """Pages ``pfns`` are now all zero."""
        self.values[pfns] = 0

    def digest(self) -> bytes:
        """16 bytes: xxh3-128 over the fingerprints."""
        return xxhash.xxh3_128_digest(self.values.data)

    def digest_as_zero(self, pfns: npt.NDArray[np.uint64]) -> bytes:
        """The digest with pages ``pfns`` counted as zero pages (post-copy's check of the pages it keeps)."""
        values = self.values.copy()
        values[pfns] = 0
        return xxhash.xxh3_128_digest(values.data)


def memory_digest(memory: npt.NDArray[np.uint8], page_size: int = 4096, batch_pages: int = 4096) -> bytes:
    """The digest of ``memory`` computed from scratch (what a migration's digest must equal)."""
    pages = memory.reshape(-1, page_size)
    digest = PageDigest(pages.shape[0])
    for first in range(0, pages.shape[0], batch_pages):  # batches bound the temporary, not a per-page loop
        rows = np.arange(first, min(first + batch_pages, pages.shape[0]), dtype=np.uint64)
        digest.update(rows, pages[first:first + rows.size])
    return digest.digest()
