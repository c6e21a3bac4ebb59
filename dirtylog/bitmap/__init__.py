"""DirtyBitmap: the set of dirty guest pages, stored exactly as KVM stores a memslot's ``dirty_bitmap``.

A bitmap covers guest page frame numbers ``[0, npages)`` with one bit per page in little-endian 64-bit words:
page ``i`` is bit ``i % 64`` of word ``i // 64``, so ``KVM_GET_DIRTY_LOG`` buffers load without reshuffling
and a memslot's log is ORed in at word ``base_gfn // 64``. Bits at or beyond ``npages`` are always zero;
every constructor that takes foreign data enforces that, and every operation keeps it.

All work is whole-array NumPy (see :mod:`dirtylog.bitmap._bitops` for the kernels and their costs).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Final, Self, TypeAlias

import numpy as np
from numpy.typing import ArrayLike, NDArray

from dirtylog.bitmap import _bitops
from dirtylog.bitmap._bitops import tail_mask
from dirtylog.errors import DirtylogError

__all__ = ["BitmapError", "DirtyBitmap", "load_kernels"]

# The kernel writes dirty_bitmap as native unsigned longs; reading them as little-endian words is right
# on every host KVM runs on (x86-64, arm64, riscv64, little-endian ppc64).
if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("dirtylog.bitmap assumes a little-endian host, as KVM's dirty_bitmap does")

_WORD_BYTES: Final = 8

Words: TypeAlias = NDArray[np.uint64]


def _runs_kernel() -> ModuleType:
    """The compiled runs kernel, imported on first use: importing Numba costs 0.3 s that most commands
    (``dirtylog info``, the model) never need."""
    try:
        from dirtylog.bitmap import _runs
    except ImportError:  # no Numba (the arm64 lab): the whole-array NumPy path
        from dirtylog.bitmap import _runs_numpy

        return _runs_numpy
    return _runs


def load_kernels() -> None:
    """Load the compiled kernels now (0.3-0.8 s once per process) rather than in the first ``runs()``:
    for callers that time their work, e.g. a migration's first round."""
    _runs_kernel().runs(np.zeros(1, dtype=np.uint64))


class BitmapError(DirtylogError, ValueError):
    """A bitmap operation got data it cannot represent: wrong size, page out of range, mismatched bitmaps."""


def _check_npages(npages: int) -> int:
    if isinstance(npages, bool) or not isinstance(npages, int | np.integer):
        raise BitmapError(f"npages must be an integer, not {type(npages).__name__}")
    n = int(npages)
    if n < 0:
        raise BitmapError(f"npages must be >= 0, got {n}")
    return n


def _as_pfns(pfns: ArrayLike, npages: int, what: str = "pfn") -> NDArray[np.uint64]:
    """``pfns`` as a 1-D uint64 array, after checking that every one lies in ``[0, npages)``."""
    arr = np.asarray(pfns)
    if arr.ndim != 1:
        arr = arr.reshape(-1)
    if arr.size == 0:
        return np.empty(0, dtype=np.uint64)
    if arr.dtype.kind not in "iu":
        raise BitmapError(f"{what}s must be integers, got an array of {arr.dtype}")
    if arr.dtype.kind == "i":
        low = int(arr.min())
        if low < 0:
            raise BitmapError(f"{what} {low} is negative; page frame numbers start at 0")
    high = int(arr.max())
    if high >= npages:
        bad = int(np.count_nonzero(arr >= npages))
        raise BitmapError(
            f"{what} {high} is out of range for a bitmap of {npages} pages (valid: 0..{npages - 1}); "
            f"{bad} of {arr.size} {what}s are out of range"
        )
    return arr.astype(np.uint64, copy=False)


def _as_ints(values: ArrayLike, what: str) -> NDArray[np.int64]:
    arr = np.asarray(values).reshape(-1)
    if arr.size == 0:
        return np.empty(0, dtype=np.int64)
    if arr.dtype.kind not in "iu":
        raise BitmapError(f"{what}s must be integers, got an array of {arr.dtype}")
    if arr.dtype == np.uint64:
        if int(arr.max()) > np.iinfo(np.int64).max:
            raise BitmapError(f"{what} {int(arr.max())} is beyond any guest's memory")
        return arr.view(np.int64)
    return arr.astype(np.int64, copy=False)


class DirtyBitmap:
    """Dirty pages ``[0, npages)`` as kernel-layout 64-bit words; set algebra, page lists, runs, batches."""

    __slots__ = ("npages", "words")

    words: Words
    npages: int

    def __init__(self, words: Words, npages: int) -> None:
        """Adopt ``words`` (``ceil(npages / 64)`` uint64s, not copied if writable); bits past ``npages`` are cleared."""
        n = _check_npages(npages)
        arr = np.asarray(words)
        if arr.dtype != np.uint64:
            raise BitmapError(f"bitmap words must be uint64, got {arr.dtype}")
        if arr.ndim != 1:
            raise BitmapError(f"bitmap words must be a 1-D array, got shape {arr.shape}")
        need = _bitops.nwords(n)
        if arr.size != need:
            raise BitmapError(f"a bitmap of {n} pages needs {need} 64-bit words, got {arr.size}")
        if not (arr.flags.c_contiguous and arr.flags.writeable):
            arr = arr.copy()
        if need:
            arr[-1] &= tail_mask(n)
        self.words = arr
        self.npages = n

    @classmethod
    def _adopt(cls, words: Words, npages: int) -> Self:
        # internal results are already validated and have clean tails
        self = cls.__new__(cls)
        self.words = words
        self.npages = npages
        return self

    # -- construction -------------------------------------------------------------------------------------

    @classmethod
    def empty(cls, npages: int) -> Self:
        """No page dirty."""
        n = _check_npages(npages)
        return cls._adopt(np.zeros(_bitops.nwords(n), dtype=np.uint64), n)

    @classmethod
    def full(cls, npages: int) -> Self:
        """Every page dirty (the first pass of a pre-copy migration)."""
        n = _check_npages(npages)
        words = np.full(_bitops.nwords(n), _bitops.ALL_ONES, dtype=np.uint64)
        if words.size:
            words[-1] &= tail_mask(n)
        return cls._adopt(words, n)

    @classmethod
    def from_pages(cls, pfns: ArrayLike, npages: int) -> Self:
        """The pages in ``pfns`` (any order, repeats allowed); a pfn outside ``[0, npages)`` is an error."""
        n = _check_npages(npages)
        words = np.zeros(_bitops.nwords(n), dtype=np.uint64)
        _bitops.or_pages(words, _as_pfns(pfns, n))
        return cls._adopt(words, n)

    @classmethod
    def from_kernel_bytes(cls, buf: bytes | bytearray | memoryview | NDArray[np.generic], npages: int) -> Self:
        """Copy a ``KVM_GET_DIRTY_LOG`` buffer: at least ``ceil(npages / 64) * 8`` bytes, extra bytes ignored."""
        n = _check_npages(npages)
        need = _bitops.nwords(n)
        if isinstance(buf, np.ndarray):
            raw = np.ascontiguousarray(buf).reshape(-1).view(np.uint8)
        else:
            raw = np.frombuffer(buf, dtype=np.uint8)
        if raw.size < need * _WORD_BYTES:
            raise BitmapError(
                f"dirty log buffer of {raw.size} bytes is too short for {n} pages: KVM fills "
                f"{need * _WORD_BYTES} bytes (the bitmap rounded up to 64-bit words)"
            )
        words = raw[: need * _WORD_BYTES].view("<u8").astype(np.uint64)
        if need:
            words[-1] &= tail_mask(n)
        return cls._adopt(words, n)

    @classmethod
    def from_runs(cls, starts: ArrayLike, lengths: ArrayLike, npages: int) -> Self:
        """The pages of the runs ``[starts[i], starts[i] + lengths[i])``; runs may overlap or be empty."""
        n = _check_npages(npages)
        s = _as_ints(starts, "run start")
        ln = _as_ints(lengths, "run length")
        if ln.size != s.size:
            raise BitmapError(f"from_runs needs one length per start, got {s.size} starts and {ln.size} lengths")
        shortest = int(ln.min()) if ln.size else 1
        if shortest < 0:
            raise BitmapError(f"run length {shortest} is negative")
        if shortest == 0:
            keep = ln > 0
            s, ln = s[keep], ln[keep]
        if s.size and int(s.min()) < 0:
            raise BitmapError(f"run start {int(s.min())} is negative; page frame numbers start at 0")
        end = s + ln
        if end.size and int(end.max()) > n:
            i = int(np.argmax(end))
            raise BitmapError(
                f"run {int(s[i])}+{int(ln[i])} ends at page {int(end[i]) - 1}, beyond the bitmap's last page {n - 1}"
            )
        return cls._adopt(_bitops.runs_words(s, end, _bitops.nwords(n)), n)

    # -- export -------------------------------------------------------------------------------------------

    def to_kernel_bytes(self) -> bytes:
        """The bitmap as ``KVM_GET_DIRTY_LOG`` / ``KVM_CLEAR_DIRTY_LOG`` lay it out."""
        return self.words.astype("<u8", copy=False).tobytes()

    @property
    def nwords(self) -> int:
        """Number of 64-bit words."""
        return int(self.words.size)

    # -- set algebra --------------------------------------------------------------------------------------

    def _other_words(self, other: DirtyBitmap, op: str) -> Words:
        if other.npages != self.npages:
            raise BitmapError(
                f"cannot combine bitmaps of {self.npages} and {other.npages} pages with {op}: "
                "they cover different guest memory"
            )
        return other.words

    def __or__(self, other: object) -> DirtyBitmap:
        if not isinstance(other, DirtyBitmap):
            return NotImplemented
        return DirtyBitmap._adopt(self.words | self._other_words(other, "|"), self.npages)

    def __and__(self, other: object) -> DirtyBitmap:
        if not isinstance(other, DirtyBitmap):
            return NotImplemented
        return DirtyBitmap._adopt(self.words & self._other_words(other, "&"), self.npages)

    def __sub__(self, other: object) -> DirtyBitmap:
        if not isinstance(other, DirtyBitmap):
            return NotImplemented
        o = self._other_words(other, "-")
        return DirtyBitmap._adopt(self.words & ~o, self.npages)

    def __xor__(self, other: object) -> DirtyBitmap:
        if not isinstance(other, DirtyBitmap):
            return NotImplemented
        return DirtyBitmap._adopt(self.words ^ self._other_words(other, "^"), self.npages)

    def __ior__(self, other: object) -> Self:
        if not isinstance(other, DirtyBitmap):
            return NotImplemented
        self.words |= self._other_words(other, "|=")
        return self

    def __iand__(self, other: object) -> Self:
        if not isinstance(other, DirtyBitmap):
            return NotImplemented
        self.words &= self._other_words(other, "&=")
        return self

    def __isub__(self, other: object) -> Self:
        if not isinstance(other, DirtyBitmap):
            return NotImplemented
        self.words &= ~self._other_words(other, "-=")
        return self

    def __ixor__(self, other: object) -> Self:
        if not isinstance(other, DirtyBitmap):
            return NotImplemented
        self.words ^= self._other_words(other, "^=")
        return self

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DirtyBitmap):
            return NotImplemented
        return self.npages == other.npages and bool(np.array_equal(self.words, other.words))

    # -- per-slot assembly --------------------------------------------------------------------------------

    def _check_word_span(self, first_word: int, count: int, what: str) -> None:
        if first_word < 0 or count < 0 or first_word + count > self.words.size:
            raise BitmapError(
                f"{what}: words [{first_word}, {first_word + count}) fall outside this bitmap's "
                f"{self.words.size} words ({self.npages} pages)"
            )

    def or_words_at(self, word_offset: int, words: Words | bytes | bytearray | memoryview) -> None:
        """OR a memslot's dirty log in at ``word_offset`` = ``base_gfn // 64`` (slots are 64-page aligned)."""
        if isinstance(words, np.ndarray):
            src = words.reshape(-1)
            if src.dtype != np.uint64:
                raise BitmapError(f"slot words must be uint64, got {src.dtype}")
        else:
            raw = memoryview(words).cast("B")
            if raw.nbytes % _WORD_BYTES:
                raise BitmapError(f"a kernel dirty log is whole 64-bit words; got {raw.nbytes} bytes")
            src = np.frombuffer(raw, dtype="<u8")
        offset = int(word_offset)
        self._check_word_span(offset, src.size, "or_words_at")
        self.words[offset : offset + src.size] |= src
        if src.size and offset + src.size == self.words.size:
            self.words[-1] &= tail_mask(self.npages)

    def slice_words(self, first_word: int, nwords: int) -> Words:
        """A writable view of ``nwords`` words from ``first_word`` (a memslot's part of the bitmap)."""
        first, count = int(first_word), int(nwords)
        self._check_word_span(first, count, "slice_words")
        return self.words[first : first + count]

    # -- single pages and ranges --------------------------------------------------------------------------

    def set_pages(self, pfns: ArrayLike) -> None:
        """Mark ``pfns`` dirty."""
        _bitops.or_pages(self.words, _as_pfns(pfns, self.npages))

    def clear_pages(self, pfns: ArrayLike) -> None:
        """Mark ``pfns`` clean."""
        _bitops.clear_pages(self.words, _as_pfns(pfns, self.npages))

    def set_range(self, first: int, count: int) -> None:
        """Mark the ``count`` pages from ``first`` dirty."""
        f, c = int(first), int(count)
        if c < 0 or f < 0 or f + c > self.npages:
            raise BitmapError(f"range {f}+{c} is outside the bitmap's pages [0, {self.npages})")
        if c:
            _bitops.set_range(self.words, f, f + c)

    def test(self, pfn: int) -> bool:
        """Whether page ``pfn`` is dirty; a pfn outside the bitmap is an error."""
        p = int(pfn)
        if not 0 <= p < self.npages:
            raise BitmapError(f"pfn {p} is out of range for a bitmap of {self.npages} pages")
        return bool((int(self.words[p >> 6]) >> (p & 63)) & 1)

    def __contains__(self, pfn: object) -> bool:
        if isinstance(pfn, bool) or not isinstance(pfn, int | np.integer):
            return False
        p = int(pfn)
        return 0 <= p < self.npages and bool((int(self.words[p >> 6]) >> (p & 63)) & 1)

    # -- whole-bitmap queries -----------------------------------------------------------------------------

    def __len__(self) -> int:
        return self.npages

    def any(self) -> bool:
        """Whether any page is dirty."""
        return bool(self.words.any())

    __bool__ = any

    def count(self) -> int:
        """Number of dirty pages."""
        return _bitops.popcount(self.words)

    def copy(self) -> DirtyBitmap:
        """An independent copy."""
        return DirtyBitmap._adopt(self.words.copy(), self.npages)

    def clear(self) -> None:
        """Mark every page clean, in place."""
        self.words.fill(0)

    def pages(self) -> NDArray[np.uint64]:
        """Sorted page frame numbers of the dirty pages."""
        return _bitops.set_bit_positions(self.words).view(np.uint64)

    def runs(self) -> tuple[NDArray[np.uint64], NDArray[np.uint64]]:
        """``(starts, lengths)`` of the maximal runs of contiguous dirty pages, sorted by start."""
        starts, lengths = _runs_kernel().runs(self.words)
        return starts.view(np.uint64), lengths.view(np.uint64)

    def batches(self, max_pages: int) -> Iterator[tuple[NDArray[np.uint64], NDArray[np.uint64]]]:
        """Runs grouped into batches of at most ``max_pages`` pages, splitting runs at batch boundaries.

        Every batch but the last holds exactly ``max_pages`` pages: batch ``k`` is pages ``k*max_pages ..
        (k+1)*max_pages - 1`` of the dirty pages counted in order, as ``(starts, lengths)``.
        """
        m = int(max_pages)
        if m <= 0:
            raise BitmapError(f"max_pages must be positive, got {max_pages}")
        starts, lengths = _runs_kernel().runs(self.words)
        return _batches(starts, lengths, m)

    def __repr__(self) -> str:
        return f"DirtyBitmap(npages={self.npages}, dirty={self.count()})"


def _batches(
    starts: NDArray[np.int64], lengths: NDArray[np.int64], max_pages: int
) -> Iterator[tuple[NDArray[np.uint64], NDArray[np.uint64]]]:
    if starts.size == 0:
        return
    ends_in_order = np.cumsum(lengths)  # dirty pages up to and including each run
    begins_in_order = ends_in_order - lengths
    total = int(ends_in_order[-1])
    nbatches = -(-total // max_pages)
    edges = np.arange(nbatches + 1, dtype=np.int64) * max_pages
    edges[-1] = total
    # batch k holds runs first[k]..last[k]-1: those overlapping its window of the page order
    first = np.searchsorted(ends_in_order, edges[:-1], side="right")
    last = np.searchsorted(begins_in_order, edges[1:], side="left")
    for k in range(nbatches):
        i, j = int(first[k]), int(last[k])
        s = starts[i:j].copy()
        ln = lengths[i:j].copy()
        lo, hi = int(edges[k]), int(edges[k + 1])
        cut_front = lo - int(begins_in_order[i])
        if cut_front > 0:
            s[0] += cut_front
            ln[0] -= cut_front
        cut_back = int(ends_in_order[j - 1]) - hi
        if cut_back > 0:
            ln[-1] -= cut_back
        yield s.view(np.uint64), ln.view(np.uint64)
