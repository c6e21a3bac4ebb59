"""Whole-array kernels behind :class:`~dirtylog.bitmap.DirtyBitmap`: set bits to positions, and page
lists and runs back to bits (runs of set bits are in :mod:`dirtylog.bitmap._runs`).

A bitmap is a 1-D array of ``uint64`` words laid out as the kernel's ``dirty_bitmap``: bit ``i`` is bit
``i % 64`` of word ``i // 64``. Everything here is pure NumPy with no loop per page or per word; the only
Python loops are over chunks of 8192 words (512 Ki pages), so that one chunk's temporaries stay in the L2
cache instead of streaming the whole bitmap through memory once per step.

Theory of operation, and the costs that shaped it (measured on this project's 2-vCPU VMs):

* ``np.nonzero`` of a *bool* array is NumPy's only fast index generator: about 0.5 ns per element scanned
  on its branchless path, which it leaves for a ``memchr`` loop (about 25 ns per hit) when at most 10 % of
  the elements are true. So a chunk more than 10 % set is unpacked and scanned whole, and a sparser one
  first drops its zero words and zero bytes, after which at least one bit in eight is set.
* ``np.unpackbits``, ``np.bitwise_count`` (on bytes and words; on ``uint16`` it is not vectorised) and
  ufuncs on small integer types are cheap; a gather costs about 0.5 ns per element, a fancy-index store
  2.5 ns, ``ufunc.at`` 17 ns; ``np.repeat`` (6 ns, mispredicted branches) and ``np.cumsum`` (2 ns, a serial
  dependency) are never used per page. Every whole-bitmap pass costs 0.05-0.15 ms on 64 GiB.
* Runs to bits: runs are merged, their boundaries marked in a transition bitmap, and the bitmap recovered
  as its prefix XOR (six shift-XOR steps per word plus a running parity across words).
"""

from __future__ import annotations

from typing import Final

import numpy as np
from numpy.typing import NDArray

WORD_BITS: Final = 64
ALL_ONES: Final = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
_U1: Final = np.uint64(1)
_U63: Final = np.uint64(63)

# Words per chunk: 8192 words are 512 Ki pages, whose temporaries (a few hundred KiB each) fit in L2.
CHUNK_WORDS: Final = 8192

_EMPTY_I64: Final = np.empty(0, dtype=np.int64)


def nwords(npages: int) -> int:
    """Words needed for ``npages`` bits: the kernel rounds every bitmap up to whole 64-bit words."""
    return (npages + WORD_BITS - 1) // WORD_BITS


def tail_mask(npages: int) -> np.uint64:
    """Mask of the valid bits of the last word (all ones when ``npages`` is a multiple of 64)."""
    rem = npages % WORD_BITS
    return ALL_ONES if rem == 0 else np.uint64((1 << rem) - 1)


def popcount(words: NDArray[np.uint64]) -> int:
    """Number of set bits."""
    return int(np.bitwise_count(words).sum(dtype=np.int64))


# --------------------------------------------------------------------------------------------------------
# building bitmaps from page lists and runs

# Above one page per this many, a page list is scattered into a bool array and packed (~0.1 ns per page of
# the bitmap + 2 ns per pfn) rather than ORed in with ufunc.at (~17 ns per pfn).
_PACK_PAGES_PER_PFN: Final = 128


def _packed(pfns: NDArray[np.uint64], nw: int) -> NDArray[np.uint64] | None:
    """The pages as a packed bitmap when there are enough of them for that to be the cheaper way."""
    if pfns.size * _PACK_PAGES_PER_PFN <= nw * WORD_BITS:
        return None
    bits = np.zeros(nw * WORD_BITS, dtype=np.bool_)
    bits[pfns] = True
    return np.packbits(bits, bitorder="little").view(np.uint64)


def or_pages(words: NDArray[np.uint64], pfns: NDArray[np.uint64]) -> None:
    """Set the bits of ``pfns`` (range-checked, repeats allowed) in ``words``."""
    packed = _packed(pfns, words.size)
    if packed is not None:
        words |= packed
    elif pfns.size:
        # ufunc.at is unbuffered, so repeated words accumulate every bit instead of the last one winning
        np.bitwise_or.at(words, (pfns >> np.uint64(6)).astype(np.intp), _U1 << (pfns & _U63))


def clear_pages(words: NDArray[np.uint64], pfns: NDArray[np.uint64]) -> None:
    """Clear the bits of ``pfns`` (range-checked, repeats allowed) in ``words``."""
    packed = _packed(pfns, words.size)
    if packed is not None:
        words &= ~packed
    elif pfns.size:
        np.bitwise_and.at(words, (pfns >> np.uint64(6)).astype(np.intp), ~(_U1 << (pfns & _U63)))


def set_range(words: NDArray[np.uint64], first: int, end: int) -> None:
    """Set bits ``[first, end)`` (non-empty) in place, a partial word at each end and a slice between."""
    last = end - 1
    first_word, last_word = first >> 6, last >> 6
    lo = ALL_ONES << np.uint64(first & 63)
    hi = ALL_ONES >> np.uint64(63 - (last & 63))
    if first_word == last_word:
        words[first_word] |= lo & hi
    else:
        words[first_word] |= lo
        words[first_word + 1 : last_word] = ALL_ONES
        words[last_word] |= hi


def _prefix_xor(t: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """Bit i of the result = XOR of bits 0..i of ``t`` across the whole array (in place)."""
    for shift in (1, 2, 4, 8, 16, 32):
        t ^= t << np.uint64(shift)
    # bit 63 of each word is now its parity; words after an odd number of odd words are inverted
    carry = np.bitwise_xor.accumulate((t >> _U63).astype(np.uint8))
    flip = np.nonzero(carry[:-1])[0] + 1
    t[flip] = ~t[flip]
    return t


# Below this many runs a Python loop of slice assignments beats a pass over the whole bitmap.
_FEW_RUNS: Final = 16


def runs_words(starts: NDArray[np.int64], ends: NDArray[np.int64], nw: int) -> NDArray[np.uint64]:
    """A bitmap of ``nw`` words with the non-empty runs ``[starts[i], ends[i])`` set (range-checked).

    Runs may overlap or touch. Many runs are merged into disjoint ones, their boundaries marked in a
    transition bitmap, and the bitmap recovered as its prefix XOR: no pass per run or per page.
    """
    words = np.zeros(nw, dtype=np.uint64)
    if starts.size <= _FEW_RUNS:
        for first, end in zip(starts.tolist(), ends.tolist(), strict=True):
            set_range(words, first, end)
        return words
    if not (np.all(starts[1:] >= starts[:-1]) and np.all(starts[1:] >= ends[:-1])):
        order = np.argsort(starts)  # ties need no order: ends are maxed below
        starts, ends = starts[order], np.maximum.accumulate(ends[order])
        opens = np.ones(starts.size, dtype=np.bool_)
        opens[1:] = starts[1:] > ends[:-1]  # a run that starts after every earlier run ended
        group = np.nonzero(opens)[0]
        starts, ends = starts[group], ends[np.append(group[1:] - 1, ends.size - 1)]
    # touching runs would mark their shared boundary twice, which XOR must see as no boundary at all
    touch = np.nonzero(starts[1:] == ends[:-1])[0]
    if touch.size:
        starts, ends = np.delete(starts, touch + 1), np.delete(ends, touch)
    edges = np.zeros(nw * WORD_BITS + 1, dtype=np.bool_)
    edges[starts] = True
    edges[ends] = True
    t = np.packbits(edges[:-1], bitorder="little").view(np.uint64)
    return _prefix_xor(t)


# --------------------------------------------------------------------------------------------------------
# positions of set bits


def word_bit_positions(sub: NDArray[np.uint64], widx: NDArray[np.intp], out: NDArray[np.int64]) -> None:
    """Positions of the set bits of non-zero words ``sub`` (word numbers ``widx``) into ``out``.

    Zero bytes are dropped before unpacking, so the bool array that ``nonzero`` scans is at least 1/8 true
    and takes the branchless path; a byte's position is then restored with one gather per set bit.
    """
    b = sub.view(np.uint8)
    nzb = np.nonzero(b != 0)[0]
    bits = np.unpackbits(b[nzb], bitorder="little").view(np.bool_)
    idx = np.nonzero(bits)[0]
    # bit k of compacted byte j sits at 8*global_byte(j) + k = idx + 8*(global_byte(j) - j)
    delta = widx[nzb >> 3]
    delta <<= 3
    delta += nzb & 7
    delta -= np.arange(nzb.size)
    delta <<= 3
    np.add(idx, delta[idx >> 3], out=out)


def _positions_dense(chunk: NDArray[np.uint64], base: int, out: NDArray[np.int64]) -> None:
    """Positions of the set bits of a chunk more than 10 % set: unpack and scan, no position fix-up."""
    idx = np.nonzero(np.unpackbits(chunk.view(np.uint8), bitorder="little").view(np.bool_))[0]
    np.add(idx, base, out=out)


def set_bit_positions(words: NDArray[np.uint64], count: int | None = None) -> NDArray[np.int64]:
    """Sorted positions of the set bits of ``words`` (``count`` = their number, if already known)."""
    if count is None:
        count = popcount(words)
    if count == 0:
        return _EMPTY_I64.copy()
    nbits = words.size * WORD_BITS
    if count == nbits:
        return np.arange(nbits, dtype=np.int64)
    out = np.empty(count, dtype=np.int64)
    per_word = np.bitwise_count(words)
    pos = 0
    for first in range(0, words.size, CHUNK_WORDS):
        chunk = words[first : first + CHUNK_WORDS]
        n = int(per_word[first : first + CHUNK_WORDS].sum(dtype=np.int64))
        if n == 0:
            continue
        dst = out[pos : pos + n]
        if n == chunk.size * WORD_BITS:
            dst[:] = np.arange(first * WORD_BITS, first * WORD_BITS + n)
        elif n * 10 > chunk.size * WORD_BITS:  # NumPy's branchless nonzero takes over above 10 %
            _positions_dense(chunk, first * WORD_BITS, dst)
        else:
            widx = np.nonzero(chunk != 0)[0]
            widx += first
            word_bit_positions(chunk[widx - first], widx, dst)
        pos += n
    return out
