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
from typing import Any, Final, NamedTuple

import numpy as np
from numpy.typing import NDArray

WORD_BITS: Final = 64
ALL_ONES: Final = np.uint64(0xFFFF_FFFF_FFFF_FFFF)
_U1: Final = np.uint64(1)
_U63: Final = np.uint64(63)

# Words per chunk: 8192 words are 512 Ki pages, whose temporaries (a few hundred KiB each) fit in L2.
CHUNK_WORDS: Final = 8192

_EMPTY_I64: Final = np.empty(0, dtype=np.int64)
_EMPTY_INTP: Final = np.empty(0, dtype=np.intp)


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
#
# The dense kernel reads the bitmap as 16-bit units and looks each one up in a table of slot codes: one
# code per run start of the unit, in start order, 0 for an empty slot. One ``nonzero`` over a chunk's
# codes then lists every run start in order, and each code says where its start lies, relative to its
# slot's own bits, and how long the run is:
#     code = (start - bits_per_slot * slot + bias) << _LEN_BITS | length
# Two layouts:
#   narrow   4 uint16 slots per unit (4 bits per slot): the unit's first 3 starts, and its last start in
#            slot 3. Half the slots of the other layout, so half the ``nonzero`` work; but a unit can hold
#            8 starts, so a word with a crowded unit (5 or more) gets its up to 16 starts re-slotted over
#            its 16 slots (the bias lets a start lie up to 32 bits before its slot), and a chunk with a word
#            of more than 16 starts uses the other layout.
#   regions  8 uint8 slots per unit, one per 2-bit region, which holds at most one start.
# The tables see each unit alone. Where a run goes on from one unit into the next, the rows are fixed
# before the scan: the next unit loses its start at bit 0 and the run's code gains the pages it has there
# (lengths fit _LEN_BITS: at most 16 + 15). Runs over whole units are finished after the scan.

_LEN_BITS: Final = 5
_LEN_MASK: Final = (1 << _LEN_BITS) - 1
_U16_1: Final = np.uint16(1)
_U16_15: Final = np.uint16(15)
_U16_FULL: Final = np.uint16(0xFFFF)

# A start *key* is offset << _LEN_BITS | length: keys sort like their starts, and adding _slot_offsets()[j]
# turns a key into its code in slot j. _NO_START pads the key rows and sorts after every real key.
_NO_START: Final = 0x8000

_NARROW_SLOTS: Final = 4
_NARROW_BIAS: Final = 32
_WORD_SLOTS: Final = 4 * _NARROW_SLOTS


@cache
def _start_keys() -> NDArray[np.uint16]:
    """(65 536, 8): the keys of the run starts of each unit value on its own, in order, then _NO_START."""
    v = np.arange(1 << 16, dtype=np.uint32)
    bit = [((v >> i) & 1).astype(np.uint16) for i in range(16)]
    reach = [np.zeros(v.size, dtype=np.uint16) for _ in range(17)]  # pages from bit i to the run's end
    for i in range(15, -1, -1):
        reach[i] = bit[i] * (reach[i + 1] + 1)
    keys = np.full((v.size, 8), _NO_START, dtype=np.uint16)
    found = np.zeros(v.size, dtype=np.intp)
    for i in range(16):
        starts = np.flatnonzero(bit[i] if i == 0 else bit[i] & (1 - bit[i - 1]))
        keys[starts, found[starts]] = (i << _LEN_BITS) | reach[i][starts]
        found[starts] += 1
    return keys


@cache
def _start_counts() -> NDArray[np.intp]:
    """Run starts of each unit value on its own."""
    return np.count_nonzero(_start_keys() != _NO_START, axis=1)


@cache
def _slot_offsets(slots: int, bits_per_slot: int, bias: int) -> NDArray[np.uint16]:
    return ((bias - bits_per_slot * np.arange(slots)) << _LEN_BITS).astype(np.uint16)


def _codes(keys: NDArray[np.uint16], bits_per_slot: int, bias: int) -> NDArray[np.uint16]:
    """Codes of keys laid out one per slot along the last axis; _NO_START keys give empty slots."""
    codes = keys + _slot_offsets(keys.shape[-1], bits_per_slot, bias)
    codes *= keys < _NO_START
    return codes


class _Layout(NamedTuple):
    """Slot codes for every unit value, and how to read them."""

    table: NDArray[np.uint64]  # (65 536, 1 or 2): a unit's codes as one or two words
    slots: int  # slots per unit
    shift: int  # log2 of the bits per slot
    bias: int
    code: type[np.unsignedinteger[Any]]  # uint16 or uint8
    first: NDArray[np.intp]  # the slot of each value's first start (a run coming in at bit 0 starts no run)
    last: NDArray[np.intp]  # the slot of each value's last start (its run is the one that may go on)


@cache
def _narrow() -> _Layout:
    keys = _start_keys()
    count = _start_counts()
    placed = np.full((keys.shape[0], _NARROW_SLOTS), _NO_START, dtype=np.uint16)
    placed[:, :-1] = keys[:, : _NARROW_SLOTS - 1]
    some = np.flatnonzero(count)
    placed[some, -1] = keys[some, count[some] - 1]
    few = some[count[some] < _NARROW_SLOTS]
    placed[few, count[few] - 1] = _NO_START  # moved to the last slot
    table = _codes(placed, 4, _NARROW_BIAS).view(np.uint64)
    first = np.where(count == 1, _NARROW_SLOTS - 1, 0)
    return _Layout(table, _NARROW_SLOTS, 2, _NARROW_BIAS, np.uint16, first, np.full(count.size, _NARROW_SLOTS - 1))


@cache
def _regions() -> _Layout:
    keys = _start_keys()
    regions = np.zeros((keys.shape[0], 8), dtype=np.uint8)
    value, which = np.nonzero(keys != _NO_START)
    key = keys[value, which].astype(np.intp)
    offset = key >> _LEN_BITS
    regions[value, offset >> 1] = ((offset & 1) << _LEN_BITS) | (key & _LEN_MASK)
    last = np.zeros(keys.shape[0], dtype=np.intp)
    last[value] = offset >> 1  # starts come in order: the last one written stays
    return _Layout(regions.view(np.uint64), 8, 1, 0, np.uint8, np.zeros(last.size, dtype=np.intp), last)


@cache
def _entry_tables() -> tuple[NDArray[np.int64], NDArray[np.uint16]]:
    """Per unit value: the pages of a run coming in at bit 0 (its trailing ones), and the same as a code
    increment, 0 where the run fills the unit (those are finished after the scan)."""
    v = np.arange(1 << 16, dtype=np.uint32)
    ones = np.bitwise_count((v ^ (v + 1)) >> 1).astype(np.int64)
    return ones, np.where(ones < 16, ones, 0).astype(np.uint16)


@cache
def _word_keys() -> NDArray[np.uint64]:
    """Keys of every unit value at each of the 4 places in a word (row ``place << 16 | value``)."""
    keys = _start_keys()
    placed = [keys + np.uint16(q << (4 + _LEN_BITS)) for q in range(4)]
    return np.concatenate(placed).view(np.uint64)


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


# Units per block of the detection passes (each temporary 128-256 KiB: they stay in L2).
_DETECT_UNITS: Final = 1 << 17


def _run_entries(units: NDArray[np.uint16]) -> NDArray[np.intp]:
    """Sorted indices of the units a run enters from the unit before (its bit 15 and their bit 0 set)."""
    before = np.empty(min(_DETECT_UNITS, units.size), dtype=np.uint16)
    found = []
    for lo in range(0, units.size, _DETECT_UNITS):
        block = units[lo : lo + _DETECT_UNITS]
        b = before[: block.size]
        if lo:
            np.right_shift(units[lo - 1 : lo - 1 + block.size], _U16_15, out=b)
        else:
            b[0] = 0
            np.right_shift(block[:-1], _U16_15, out=b[1:])
        b &= block
        # b is 0 or 1: its low bytes, read as bools, hold the answer (at even byte offsets)
        entries = np.nonzero(b.view(np.bool_))[0]
        entries >>= 1
        entries += lo
        found.append(entries)
    return np.concatenate(found)


def _crowded_words(units: NDArray[np.uint16]) -> NDArray[np.intp]:
    """Sorted words with a unit of more than 4 run starts (counted as if the unit stood alone).

    A unit with s starts has 2s bit changes from one bit to the next (bit 0 compared with a 0), less one
    if its last run reaches bit 15: s >= 5 exactly when it has 9 or more.
    """
    n = min(_DETECT_UNITS, units.size)
    changes = np.empty(n, dtype=np.uint16)
    counts = np.empty(2 * n, dtype=np.uint8)
    crowded = np.empty(n, dtype=np.bool_)
    found = []
    for lo in range(0, units.size, _DETECT_UNITS):
        block = units[lo : lo + _DETECT_UNITS]
        t = changes[: block.size]
        np.left_shift(block, _U16_1, out=t)
        t ^= block
        c = counts[: 2 * block.size]
        np.bitwise_count(t.view(np.uint8), out=c)  # uint16 popcount is not vectorised; bytes are
        c16 = c.view(np.uint16)
        c16 *= np.uint16(257)  # high byte: the unit's two byte counts added
        k = crowded[: block.size]
        np.greater_equal(c16, np.uint16(9 << 8), out=k)
        units_found = np.nonzero(k)[0]
        units_found += lo
        found.append(units_found)
    words = np.concatenate(found) >> 2
    return words[np.append(True, words[1:] != words[:-1])] if words.size else words


class _Joins(NamedTuple):
    """Where runs go on from one unit into the next, as changes to the slot codes (sorted by unit)."""

    drop_at: NDArray[np.intp]  # flat slot of the start at bit 0 of each unit entered: it starts no run
    gain_at: NDArray[np.intp]  # flat slot of the last start of the unit before (its run goes on)...
    gains: NDArray[np.unsignedinteger[Any]]  # ... and the pages the run has in the unit entered
    far_at: NDArray[np.int64]  # first page of units entered where that does not do (see _joins)...
    far_pages: NDArray[np.int64]  # ... and their pages, added after the scan to the last run before


def _joins(units: NDArray[np.uint16], entered: NDArray[np.intp], layout: _Layout) -> _Joins:
    """The code changes for runs entering units ``entered`` (sorted), in ``layout``."""
    into = np.take(units, entered)
    source = np.take(units, entered - 1)
    drop_at = entered * layout.slots
    drop_at += np.take(layout.first, into)
    gain_at = drop_at - np.take(layout.first, into) - layout.slots  # the first slot of the unit before
    gain_at += np.take(layout.last, source)  # (a unit's last start is not dropped but for all ones)
    pages, increments = _entry_tables()
    gains = np.take(increments, into).astype(layout.code)
    # A source of all ones started its run only if nothing came into it, and a unit entered that is all
    # ones passes the run on: both are left for after the scan, where the run is the last one before.
    gains *= source != _U16_FULL
    far = np.maximum(source, into) == _U16_FULL
    far_at = entered[far].astype(np.int64) * 16
    return _Joins(drop_at, gain_at, gains, far_at, np.take(pages, into[far]))


_AROUND_WORD: Final = np.arange(-1, 5)  # the unit before a word, its 4 units, the unit after
_PLACE_IN_WORD: Final = np.arange(4, dtype=np.intp) << 16


def _reslot(
    units: NDArray[np.uint16], words: NDArray[np.intp]
) -> tuple[NDArray[np.intp], NDArray[np.uint16], NDArray[np.intp]]:
    """Narrow codes for crowded words: all the word's run starts, in order, over its 16 slots.

    Returns the words that fit, their (n, 16) codes, and the words with more than 16 starts.
    """
    u = np.take(units, np.clip(4 * words + _AROUND_WORD[:, None], 0, units.size - 1))  # (6, n)
    u[0, words == 0] = 0
    u[5, 4 * words + 4 >= units.size] = 0
    own = u[1:5]
    enters = u[:5] >> _U16_15
    enters &= u[1:]  # a run goes on into each of the 4 units, and into the unit after
    alone = own + _U16_1
    alone |= enters[:4] - _U16_1  # all ones where no run comes in
    alone &= own  # so: without the run coming in
    keys = np.take(_word_keys(), alone.T + _PLACE_IN_WORD, axis=0).view(np.uint16).reshape(-1, 32)
    keys.sort(axis=1)  # each unit's _NO_START padding goes to the end
    codes = _codes(keys[:, :_WORD_SLOTS], 4, _NARROW_BIAS)
    # the last start of each unit gains the pages its run has in the next one (as in _entries)
    gains = np.take(_entry_tables()[1], u[2:])
    gains *= enters[1:]
    gains *= own != _U16_FULL
    last = np.minimum(np.cumsum(np.take(_start_counts(), alone), axis=0) - 1, _WORD_SLOTS - 1)
    word, place = np.nonzero(gains.T)
    codes[word, last[place, word]] += gains[place, word]
    fits = keys[:, _WORD_SLOTS] >= _NO_START  # the 17th key is padding
    return words[fits], codes[fits], words[~fits]


def _scan(
    codes: NDArray[np.unsignedinteger[Any]],
    first_bit: int,
    layout: _Layout,
    starts: NDArray[np.int64],
    lengths: NDArray[np.int64],
) -> int:
    """Decode the non-empty slots of one chunk into the front of ``starts`` and ``lengths``; their number."""
    f = np.nonzero(codes != 0)[0]
    code = np.take(codes, f)
    n = f.size
    np.left_shift(f, layout.shift, out=f)
    f += first_bit - layout.bias
    np.add(f, code >> _LEN_BITS, out=starts[:n])
    np.bitwise_and(code, _LEN_MASK, out=lengths[:n])
    return n


def _runs_slots(
    words: NDArray[np.uint64], bound: int, layout: _Layout
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Runs of a bitmap with runs in most words: each chunk's rows, fixed, then one scan of their codes.

    ``bound`` is any upper bound of the number of runs; the page count is one, known for free.
    """
    units = words.view(np.uint16)
    chunk = 4 * CHUNK_WORDS  # units
    edges = np.arange(0, units.size + chunk, chunk)
    entered = _run_entries(units)
    joins = _joins(units, entered, layout)
    entered_at = np.searchsorted(entered, edges).tolist()  # runs entering each chunk's units...
    gained_at = np.searchsorted(entered, edges + 1).tolist()  # ... and leaving them (unit before)
    crowded, crowded_codes, overfull = _EMPTY_INTP, np.empty((0, _WORD_SLOTS), np.uint16), _EMPTY_INTP
    if layout.slots == _NARROW_SLOTS:
        crowded, crowded_codes, overfull = _reslot(units, _crowded_words(units))
    crowded_at = np.searchsorted(crowded, edges // 4).tolist()
    wide = set((overfull // CHUNK_WORDS).tolist())  # chunks with a word of more than 16 starts

    # Both outputs live in one block: half the allocations, and a block this size is kept by the C
    # allocator for the next call instead of being returned to the kernel and faulted in again.
    block = np.empty(2 * bound, dtype=np.int64)
    starts, lengths = block[:bound], block[bound:]
    pos = 0
    for c in range(-(-units.size // chunk)):
        lo = c * chunk
        e0, e1, g1 = entered_at[c], entered_at[c + 1], gained_at[c + 1]
        use, fix, first = layout, joins, 0
        if c in wide:  # joins of this chunk in the other layout; they start at entered[e0]
            use, first = _regions(), e0
            fix = _joins(units, entered[e0:g1], use)
        rows = np.take(use.table, units[lo : lo + chunk], axis=0)
        codes = rows.view(use.code).reshape(-1)
        base = lo * use.slots
        codes[fix.drop_at[e0 - first : e1 - first] - base] = 0
        g0 = gained_at[c]
        codes[fix.gain_at[g0 - first : g1 - first] - base] += fix.gains[g0 - first : g1 - first]
        if use is layout:
            w0, w1 = crowded_at[c], crowded_at[c + 1]
            rows.view(np.uint16).reshape(-1, _WORD_SLOTS)[crowded[w0:w1] % CHUNK_WORDS] = crowded_codes[w0:w1]
        pos += _scan(codes, 16 * lo, use, starts[pos:], lengths[pos:])
    starts, lengths = starts[:pos], lengths[:pos]
    if joins.far_at.size:
        run = np.searchsorted(starts, joins.far_at, side="right") - 1
        np.add.at(lengths, run, joins.far_pages)
    if 2 * pos < bound:  # mostly long runs: don't pin a block sized for one run per page
        return starts.copy(), lengths.copy()
    return starts, lengths


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
    return _runs_slots(words, count, _narrow())
