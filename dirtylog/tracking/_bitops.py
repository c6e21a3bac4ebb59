"""Whole-array kernels behind :class:`~dirtylog.tracking.bitmap.DirtyBitmap`: set bits to positions and runs,
and page lists and runs back to bits.

A bitmap is a 1-D array of ``uint64`` words laid out as the kernel's ``dirty_bitmap``: bit ``i`` is bit
``i % 64`` of word ``i // 64``. Everything here is pure NumPy with no loop per page or per word; the only
Python loops are over chunks of 8192 words (512 Ki pages), so that one chunk's temporaries stay in the L2
cache instead of streaming the whole bitmap through memory once per step.

Theory of operation, and the costs that shaped it (measured on this project's 2-vCPU VMs):

* ``np.nonzero`` of a *bool* array is NumPy's only fast index generator: about 0.5 ns per element scanned
  on its branchless path, which it leaves for a ``memchr`` loop (about 25 ns per hit) when at most 10 % of
  the elements are true. So a chunk more than 10 % set is unpacked and scanned whole, and a sparser one
  first drops its zero words and zero bytes, after which at least one bit in eight is set.
* ``np.unpackbits``, ``np.bitwise_count`` and ufuncs on small integer types are cheap; a gather costs about
  0.5 ns per element and ``ufunc.at`` about 17 ns; ``np.repeat`` and ``np.cumsum`` 2-3 ns. None of the
  latter three is used per page.
* Runs, dense case: a 65 536-entry table gives every 16-bit unit one code byte per 2-bit region (a region
  holds at most one run start): whether and where a run starts there, and its length inside the unit. One
  ``nonzero`` over the code bytes yields every run start with its length. A run that crosses into the next
  unit is found from the unit-boundary bits (a few per chunk): the next unit's first region is cleared and
  the crossing run's code gains that unit's leading ones, so the scan already reads its whole length; only
  runs over whole units are finished after the scan.
* Runs, sparse case (under about one run per two words, estimated from a sample of blocks): the start and
  end bits of the non-zero words are extracted as positions, and lengths are their differences.
* Runs to bits: runs are merged, their boundaries marked in a transition bitmap, and the bitmap recovered
  as its prefix XOR (six shift-XOR steps per word plus a running parity across words).
"""

from __future__ import annotations

from functools import cache
from typing import Final, NamedTuple

import numpy as np
from numpy.typing import NDArray

WORD_BITS: Final = 64
ALL_ONES: Final = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
_U1: Final = np.uint64(1)
_U63: Final = np.uint64(63)

# Words per chunk: 8192 words are 512 Ki pages, whose temporaries (a few hundred KiB each) fit in L2.
CHUNK_WORDS: Final = 8192

# Region codes of the run table (see _run_tables): bit 0 = the run starts on the odd bit of its region,
# bits 1-5 = pages of the run inside its 16-bit unit (1..16). Zero = no run starts in the region.
_CODE_ODD: Final = 0x01
_CODE_LEN_SHIFT: Final = 1

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


def _positions_sparse(sub: NDArray[np.uint64], widx: NDArray[np.intp], out: NDArray[np.int64]) -> None:
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
            _positions_sparse(chunk[widx - first], widx, dst)
        pos += n
    return out


# --------------------------------------------------------------------------------------------------------
# runs of set bits


class _RunTables(NamedTuple):
    """Lookup tables over all 65 536 values of a 16-bit unit (built once, 704 KiB in all)."""

    codes: NDArray[np.uint64]  # 8 region codes per unit, one byte each
    leading_ones: NDArray[np.int64]  # set bits from bit 0 up (16 for 0xFFFF)
    last_region: NDArray[np.intp]  # region where the run holding bit 15 starts (if it starts in the unit)


@cache
def _run_tables() -> _RunTables:
    """Build the run tables with whole-array operations over the 65 536 values (a few milliseconds)."""
    v = np.arange(1 << 16, dtype=np.uint32)
    bit = [((v >> i) & 1).astype(np.uint8) for i in range(16)]
    # pages of the run from bit i to the end of its run, capped at the unit's end
    reach = [np.zeros(v.size, dtype=np.uint8) for _ in range(17)]
    for i in range(15, -1, -1):
        reach[i] = bit[i] * (reach[i + 1] + 1)
    codes = np.zeros((v.size, 8), dtype=np.uint8)
    last_region = np.zeros(v.size, dtype=np.intp)
    for i in range(16):
        starts = bit[i] if i == 0 else bit[i] & (1 - bit[i - 1])
        code = (i & _CODE_ODD) | (reach[i].astype(np.uint16) << _CODE_LEN_SHIFT)
        codes[:, i >> 1] |= np.where(starts == 1, code, 0).astype(np.uint8)
        last_region[(starts == 1) & (reach[i] == 16 - i)] = i >> 1
    leading_ones = np.bitwise_count((v ^ (v + 1)) >> 1).astype(np.int64)
    return _RunTables(codes.reshape(-1).view(np.uint64), leading_ones, last_region)


def _runs_sparse(words: NDArray[np.uint64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Runs of a bitmap with few runs: positions of the start and end bits, on the non-zero words only."""
    widx = np.nonzero(words != 0)[0]
    w = words[widx]
    last = words.size - 1
    prev = words[np.maximum(widx - 1, 0)]
    prev[widx == 0] = 0
    nxt = words[np.minimum(widx + 1, last)]
    nxt[widx == last] = 0
    starts_mask = w & ~((w << _U1) | (prev >> _U63))
    ends_mask = w & ~((w >> _U1) | (nxt << _U63))
    count = popcount(starts_mask)
    starts = np.empty(count, dtype=np.int64)
    ends = np.empty(count, dtype=np.int64)
    for mask, out in ((starts_mask, starts), (ends_mask, ends)):
        keep = mask != 0
        _positions_sparse(mask[keep], widx[keep], out)
    ends -= starts
    ends += 1
    return starts, ends


def _runs_dense(words: NDArray[np.uint64], bound: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Runs of a bitmap with runs in most words: one scan of the region codes per chunk.

    ``bound`` is any upper bound of the number of runs; the page count is one, known for free.
    """
    tables = _run_tables()
    # Both outputs live in one block: half the allocations, and a block this size is kept by the C
    # allocator for the next call instead of being returned to the kernel and faulted in again.
    block = np.empty(2 * bound, dtype=np.int64)
    starts, lengths = block[:bound], block[bound:]
    pos = 0
    for first in range(0, words.size, CHUNK_WORDS):
        n, carried = _runs_dense_chunk(words, first, tables, starts[pos:], lengths[pos:])
        if carried:
            lengths[pos - 1] += carried  # the last run so far went on through this chunk
        pos += n
    if 2 * pos < bound:  # mostly long runs: don't pin a block sized for one run per page
        return starts[:pos].copy(), lengths[:pos].copy()
    starts, lengths = starts[:pos], lengths[:pos]
    return starts, lengths


def _runs_dense_chunk(
    words: NDArray[np.uint64],
    first: int,
    tables: _RunTables,
    starts: NDArray[np.int64],
    lengths: NDArray[np.int64],
) -> tuple[int, int]:
    """Write the runs that start in the chunk at word ``first`` to the front of ``starts`` and ``lengths``.

    Returns how many runs were written, and how many pages of this chunk belong to a run that started in
    an earlier chunk (the caller adds them to that run).
    """
    stop = min(first + CHUNK_WORDS, words.size)
    base = first * WORD_BITS
    units = words[first:stop].view(np.uint16)
    codes = np.take(tables.codes, units).view(np.uint8)

    # The table sees each unit alone. Where a run crosses from unit u into u+1 (bit 15 of u and bit 0
    # of u+1 set), u+1 does not start a run at bit 0, and the run gains the leading ones of u+1.
    next_unit = int(words[stop] & np.uint64(0xFFFF)) if stop < words.size else 0
    crossing = np.nonzero((units[1:] & (units[:-1] >> np.uint16(15))) != 0)[0]
    after = crossing + 1
    codes[after << 3] = 0
    into = units[after]
    if first and int(words[first - 1] >> _U63) & int(units[0]) & 1:
        codes[0] = 0  # continues the run of the previous chunk
    if next_unit & 1 and units[-1] >> 15:  # crosses into the next chunk, which clears its own first region
        crossing = np.append(crossing, units.size - 1)
        into = np.append(into, np.uint16(next_unit))
    gain = tables.leading_ones[into]
    source = units[crossing]
    # Usual case: neither unit is all ones, so the run began in u and ends in u+1; its length fits the
    # 5-bit code (at most 16 + 15) and is patched in before the scan.
    simple = (gain < 16) & (source != 0xFFFF)
    patched = (crossing[simple] << 3) + tables.last_region[source[simple]]
    codes[patched] += (gain[simple] << _CODE_LEN_SHIFT).astype(np.uint8)

    region = np.nonzero(codes != 0)[0]
    code = codes[region]
    n = region.size
    # start page = 2 * region + (start on the region's odd bit) + the chunk's first page
    odd = (code & _CODE_ODD).astype(np.int64)
    odd += base
    np.left_shift(region, 1, out=region)
    chunk_starts = starts[:n]
    np.add(region, odd, out=chunk_starts)
    code >>= _CODE_LEN_SHIFT
    chunk_lengths = lengths[:n]
    chunk_lengths[:] = code

    if simple.all():
        return n, 0
    # Runs over whole units (clustered or dense bitmaps): add each crossed unit's leading ones to the
    # last run that starts before the crossing, which may be a run of an earlier chunk.
    complex_ = ~simple
    boundary = (crossing[complex_] + 1) * 16 + base
    run = np.searchsorted(chunk_starts, boundary, side="right")
    gain = gain[complex_]
    earlier = int(np.searchsorted(run, 1))  # crossings before the chunk's first start
    np.add.at(chunk_lengths, run[earlier:] - 1, gain[earlier:])
    return n, int(gain[:earlier].sum())


# Blocks sampled to estimate the number of runs per word, and the estimate above which the dense
# path wins (measured: the sparse path costs about 3x more per run, the dense one a fixed pass per word).
_SAMPLE_BLOCKS: Final = 32
_SAMPLE_BLOCK_WORDS: Final = 256
_DENSE_RUNS_PER_WORD: Final = 0.5


def _runs_per_word(words: NDArray[np.uint64]) -> float:
    """Estimated run starts per word, from a few evenly spaced blocks of consecutive words."""
    nblocks = words.size // _SAMPLE_BLOCK_WORDS
    if nblocks <= 2 * _SAMPLE_BLOCKS:
        sample = words.reshape(1, -1)
    else:
        rows = words[: nblocks * _SAMPLE_BLOCK_WORDS].reshape(nblocks, _SAMPLE_BLOCK_WORDS)
        sample = rows[np.linspace(0, nblocks - 1, _SAMPLE_BLOCKS).astype(np.intp)]
    before = sample << _U1
    before[:, 1:] |= sample[:, :-1] >> _U63
    return popcount(sample & ~before) / sample.size


def runs(words: NDArray[np.uint64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """``(starts, lengths)`` of the maximal runs of set bits, sorted by start."""
    count = popcount(words)
    if count == 0:
        return _EMPTY_I64.copy(), _EMPTY_I64.copy()
    if count == words.size * WORD_BITS:
        return np.zeros(1, dtype=np.int64), np.full(1, count, dtype=np.int64)
    if _runs_per_word(words) < _DENSE_RUNS_PER_WORD:
        return _runs_sparse(words)
    return _runs_dense(words, count)
