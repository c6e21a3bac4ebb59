"""Maximal runs of set bits of a bitmap, as (starts, lengths): three whole-array kernels and their choice.

Three kernels, chosen from a sample of blocks (runs per word, and how often a run goes on from
  one 16-bit unit into the next):
  - sparse (under one run per two words): the start and end bits of the non-zero words are extracted as
    positions, and lengths are their differences;
  - slots (up to 6.5 runs per word and few runs crossing unit boundaries, e.g. 64 GiB with 1-12 % random
    dirty pages): a table gives every 16-bit unit value 4 ``uint16`` slot codes, its first 3 run starts
    and its last, each code holding where its start lies and the run's length in the unit. One
    ``nonzero`` over 4 slots per unit yields every run start with its length. The few units with more
    than 4 starts (0.4 % at 10 % dirty) have their word re-slotted (its up to 16 starts sorted over its 16
    slots), and runs crossing unit boundaries (1 % of the units) are fixed in the codes before the scan;
    both are found by passes over the whole bitmap first;
  - dense (otherwise): the same idea with one code byte per 2-bit region (a region holds at most one
    start), twice the slots but never crowded; crossings are found and fixed chunk by chunk, which is
    cheaper where they are frequent.
"""

from __future__ import annotations

from functools import cache
from typing import Final, NamedTuple

import numpy as np
from numpy.typing import NDArray

from dirtylog.bitmap._bitops import (
    _EMPTY_I64,
    _EMPTY_INTP,
    _U1,
    _U63,
    CHUNK_WORDS,
    WORD_BITS,
    popcount,
    word_bit_positions,
)

# Region codes of the run table (see _run_tables): bit 0 = the run starts on the odd bit of its region,
# bits 1-5 = pages of the run inside its 16-bit unit (1..16). Zero = no run starts in the region.
_CODE_ODD: Final = 0x01
_CODE_LEN_SHIFT: Final = 1



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
        word_bit_positions(mask[keep], widx[keep], out)
    ends -= starts
    ends += 1
    return starts, ends


# --------------------------------------------------------------------------------------------------------
# slot kernel
#
# The slot kernel reads the bitmap as 16-bit units and looks each one up in a table of slot codes: the
# codes of the unit's run starts, in order, 0 for an empty slot. One ``nonzero`` over a chunk's codes then
# lists every run start in order, and each code says where its start lies, relative to its slot's own
# bits, and how long the run is:
#     code = (start - bits_per_slot * slot + _SLOT_BIAS) << _LEN_BITS | length
# Narrow layout: 4 slots per unit (4 bits each), the unit's first 3 starts and its last start in slot 3.
# That is half the slots of the region kernel, so half the ``nonzero`` work, but a unit can hold 8 starts:
# a word with such a crowded unit gets all its (up to 16) starts re-slotted over its 16 slots, which the
# bias allows (a start may lie up to 32 bits before its slot), and a chunk with a word of more than 16
# starts is read in the wide layout, 8 slots per unit (the first 7 starts and the last).
# The tables see each unit alone. Where a run goes on from one unit into the next, the codes are fixed
# before the scan: the start at bit 0 of the unit entered goes, and the run's code gains the pages it has
# there (lengths fit _LEN_BITS: at most 16 + 15). Runs over whole units are finished after the scan.

_LEN_BITS: Final = 5
_LEN_MASK: Final = (1 << _LEN_BITS) - 1
_U16_1: Final = np.uint16(1)
_U16_15: Final = np.uint16(15)
_U16_FULL: Final = np.uint16(0xFFFF)

# A start *key* is offset << _LEN_BITS | length: keys sort like their starts, and adding _slot_offsets()[j]
# turns a key into its code in slot j. _NO_START pads the key rows and sorts after every real key.
_NO_START: Final = 0x8000

_NARROW_SLOTS: Final = 4
_SLOT_BIAS: Final = 32  # a start may lie up to 32 bits before its slot (re-slotted words)
_WIDE_SLOTS: Final = 8
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
    counts: NDArray[np.intp] = np.count_nonzero(_start_keys() != _NO_START, axis=1)
    return counts


@cache
def _slot_offsets(slots: int, bits_per_slot: int) -> NDArray[np.uint16]:
    return ((_SLOT_BIAS - bits_per_slot * np.arange(slots)) << _LEN_BITS).astype(np.uint16)


def _codes(keys: NDArray[np.uint16], bits_per_slot: int) -> NDArray[np.uint16]:
    """Codes of keys laid out one per slot along the last axis; _NO_START keys give empty slots."""
    codes = keys + _slot_offsets(keys.shape[-1], bits_per_slot)
    codes *= keys < _NO_START
    return codes


class _Layout(NamedTuple):
    """Slot codes for every unit value, and how to read them."""

    table: NDArray[np.uint64]  # (65 536, slots // 4): a unit's codes as one or two words
    slots: int  # slots per unit
    shift: int  # log2 of the bits per slot
    first: NDArray[np.uint8]  # the slot of each value's first start (a run coming in at bit 0 starts no run)


@cache
def _slot_layout(slots: int) -> _Layout:
    """Codes with a unit's first ``slots - 1`` starts from slot 0 and its last start in the last slot."""
    keys = _start_keys()
    count = _start_counts()
    placed = np.full((keys.shape[0], slots), _NO_START, dtype=np.uint16)
    placed[:, :-1] = keys[:, : slots - 1]
    some = np.flatnonzero(count)
    placed[some, -1] = keys[some, count[some] - 1]
    few = some[count[some] < slots]
    placed[few, count[few] - 1] = _NO_START  # moved to the last slot
    bits_per_slot = 16 // slots
    table = _codes(placed, bits_per_slot).view(np.uint64)
    first = np.where(count == 1, slots - 1, 0).astype(np.uint8)
    return _Layout(table, slots, bits_per_slot.bit_length() - 1, first)


@cache
def _entry_tables() -> tuple[NDArray[np.int64], NDArray[np.uint16]]:
    """Per unit value: the pages of a run coming in at bit 0 (its trailing ones), and the same as a code
    increment, 0 where the run fills the unit (those are finished after the scan)."""
    v = np.arange(1 << 16, dtype=np.uint32)
    ones = np.bitwise_count((v ^ (v + 1)) >> 1).astype(np.int64)
    return ones, np.where(ones < 16, ones, 0).astype(np.uint16)


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
    """Where runs go on from one unit into the next, as changes to slot codes (sorted by unit).

    Slots are numbered within their chunk (of ``chunk`` units).
    """

    drop_at: NDArray[np.intp]  # slot of the start at bit 0 of each unit entered: it starts no run
    gain_at: NDArray[np.intp]  # slot of the last start of the unit before (its run goes on)...
    gains: NDArray[np.uint16]  # ... and the pages the run has in the unit entered
    far_at: NDArray[np.int64]  # first page of the units entered where a gain does not do (below)...
    far_pages: NDArray[np.int64]  # ... and their pages, added after the scan to the last run before


def _joins(units: NDArray[np.uint16], entered: NDArray[np.intp], layout: _Layout, chunk: int) -> _Joins:
    """The code changes in ``layout`` for runs entering units ``entered`` (sorted)."""
    into = np.take(units, entered)
    source = np.take(units, entered - 1)
    drop_at = entered % chunk * layout.slots  # the unit's first slot, plus
    drop_at += np.take(layout.first, into)
    gain_at = (entered - 1) % chunk * layout.slots
    gain_at += layout.slots - 1  # the unit's last start (never one dropped above, but in all ones)
    pages, increments = _entry_tables()
    gains = np.take(increments, into)
    # A source of all ones started its run only if nothing came into it, and a unit entered that is all
    # ones passes the run on: both are left for after the scan, where the run is the last one before.
    gains *= source != _U16_FULL
    far = np.maximum(source, into) == _U16_FULL
    far_at = entered[far].astype(np.int64) * 16
    return _Joins(drop_at, gain_at, gains, far_at, np.take(pages, into[far]))


_AROUND_WORD: Final = np.arange(-1, 5)  # the unit before a word, its 4 units, the unit after
_PLACE_IN_WORD: Final = (np.arange(4, dtype=np.uint16) << (4 + _LEN_BITS))[:, None]  # offsets 0, 16, 32, 48


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
    keys = np.take(_start_keys(), alone.T, axis=0)  # (n, 4, 8)
    keys += _PLACE_IN_WORD  # offsets in the word (the padding stays above every real key)
    keys = keys.reshape(-1, 32)
    keys.sort(axis=1)  # each unit's _NO_START padding goes to the end
    codes = _codes(keys[:, :_WORD_SLOTS], 4)
    # the last start of each unit gains the pages its run has in the next one (as in _joins)
    gains = np.take(_entry_tables()[1], u[2:])
    gains *= enters[1:]
    gains *= own != _U16_FULL
    place, word = np.nonzero(gains != 0)
    ends = np.take(_start_counts(), alone[:, word])  # starts up to and including each place
    ends[1] += ends[0]
    ends[2] += ends[1]
    ends[3] += ends[2]
    last = np.minimum(ends[place, np.arange(word.size)] - 1, _WORD_SLOTS - 1)
    codes[word, last] += gains[place, word]
    fits = keys[:, _WORD_SLOTS] >= _NO_START  # the 17th key is padding
    return words[fits], codes[fits], words[~fits]


def _scan(
    codes: NDArray[np.uint16],
    first_bit: int,
    layout: _Layout,
    starts: NDArray[np.int64],
    lengths: NDArray[np.int64],
    scratch: NDArray[np.uint16],
) -> int:
    """Decode the non-empty slots of one chunk into the front of ``starts`` and ``lengths``; their number.

    ``scratch`` holds at least a code per slot (reused: one buffer that stays in the cache).
    """
    full = scratch.view(np.bool_)[: codes.size]
    np.not_equal(codes, 0, out=full)
    f = np.nonzero(full)[0]
    n = f.size
    code = np.take(codes, f, mode="wrap", out=scratch[:n])  # in range anyway: "wrap" checks more cheaply
    np.left_shift(f, layout.shift, out=f)
    f += first_bit - _SLOT_BIAS
    np.add(f, code >> _LEN_BITS, out=starts[:n])
    np.bitwise_and(code, _LEN_MASK, out=lengths[:n])
    return n


def _runs_slots(words: NDArray[np.uint64], bound: int, layout: _Layout) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Runs of a bitmap with runs in most words: each chunk's rows, fixed, then one scan of their codes.

    ``bound`` is any upper bound of the number of runs; the page count is one, known for free.
    """
    units = words.view(np.uint16)
    chunk = 4 * CHUNK_WORDS  # units
    entered = _run_entries(units)
    joins = _joins(units, entered, layout, chunk)
    crowded, crowded_codes, overfull = _EMPTY_INTP, np.empty((0, _WORD_SLOTS), np.uint16), _EMPTY_INTP
    if layout.slots == _NARROW_SLOTS:
        crowded, crowded_codes, overfull = _reslot(units, _crowded_words(units))
    wide = set((overfull // CHUNK_WORDS).tolist())  # chunks with a word of more than 16 starts
    # each chunk's share of the fixes: the units it has entered, its units a run leaves, its crowded words
    edges = np.arange(0, units.size + chunk, chunk)
    entered_at = np.searchsorted(entered, edges).tolist()
    leaving_at = np.searchsorted(entered, edges + 1).tolist()
    crowded_at = np.searchsorted(crowded, edges // 4).tolist()
    crowded %= CHUNK_WORDS

    # Both outputs live in one block: half the allocations, and a block this size is kept by the C
    # allocator for the next call instead of being returned to the kernel and faulted in again.
    block = np.empty(2 * bound, dtype=np.int64)
    starts, lengths = block[:bound], block[bound:]
    scratch = np.empty(chunk * _WIDE_SLOTS, dtype=np.uint16)
    pos = 0
    for c, lo in enumerate(range(0, units.size, chunk)):
        use, fix = layout, joins
        e0, e1, l0, l1 = entered_at[c], entered_at[c + 1], leaving_at[c], leaving_at[c + 1]
        if c in wide:  # this chunk's joins in the wide layout, from its first unit entered on
            use = _slot_layout(_WIDE_SLOTS)
            fix = _joins(units, entered[e0:l1], use, chunk)
            e0, e1, l0, l1 = 0, e1 - e0, l0 - e0, l1 - e0
        rows = np.take(use.table, units[lo : lo + chunk], axis=0, mode="wrap")
        codes = rows.view(np.uint16).reshape(-1)
        codes[fix.drop_at[e0:e1]] = 0
        codes[fix.gain_at[l0:l1]] += fix.gains[l0:l1]
        if use is layout:
            w0, w1 = crowded_at[c], crowded_at[c + 1]
            codes.reshape(-1, _WORD_SLOTS)[crowded[w0:w1]] = crowded_codes[w0:w1]
        pos += _scan(codes, 16 * lo, use, starts[pos:], lengths[pos:], scratch)
    starts, lengths = starts[:pos], lengths[:pos]
    if joins.far_at.size:
        run = np.searchsorted(starts, joins.far_at, side="right") - 1
        np.add.at(lengths, run, joins.far_pages)
    if 2 * pos < bound:  # mostly long runs: don't pin a block sized for one run per page
        return starts.copy(), lengths.copy()
    return starts, lengths


# --------------------------------------------------------------------------------------------------------
# region kernel


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


# --------------------------------------------------------------------------------------------------------
# choosing the kernel

# Blocks sampled to estimate how a bitmap's runs look, and the estimates that choose the kernel (measured
# on 64 GiB bitmaps, random and clustered, against the region kernel): the sparse kernel costs about 3x
# more per run than the others. The slot kernel takes 0.4-0.85x the time up to 6 runs per word (2-10 %
# random), breaks even near 6.7 and loses beyond (1.2x at 8: crowded words), and it fixes each run
# crossing a unit boundary apart, which stops paying off somewhere between 8 % and 14 % of units crossed
# into (short clustered runs). Its passes over the whole bitmap cost more than they save below 3 chunks
# (4 GiB: +4 %, 8 GiB: -6 %).
_SAMPLE_BLOCKS: Final = 32
_SAMPLE_BLOCK_WORDS: Final = 256
_DENSE_RUNS_PER_WORD: Final = 0.5
_SLOT_RUNS_PER_WORD: Final = 6.5
_SLOT_ENTRIES_PER_UNIT: Final = 0.08
_SLOT_MIN_WORDS: Final = 2 * CHUNK_WORDS
_UNIT_FIRST_BITS: Final = np.uint64(0x0001_0001_0001_0001)


def _sample(words: NDArray[np.uint64]) -> NDArray[np.uint64]:
    """A few evenly spaced blocks of consecutive words (all the words of a small bitmap), one per row."""
    nblocks = words.size // _SAMPLE_BLOCK_WORDS
    if nblocks <= 2 * _SAMPLE_BLOCKS:
        return words.reshape(1, -1)
    rows = words[: nblocks * _SAMPLE_BLOCK_WORDS].reshape(nblocks, _SAMPLE_BLOCK_WORDS)
    return rows[np.linspace(0, nblocks - 1, _SAMPLE_BLOCKS).astype(np.intp)]


def _runs_per_word(words: NDArray[np.uint64]) -> float:
    """Estimated run starts per word."""
    sample = _sample(words)
    before = sample << _U1
    before[:, 1:] |= sample[:, :-1] >> _U63
    return popcount(sample & ~before) / sample.size


def _entries_per_unit(words: NDArray[np.uint64]) -> float:
    """Estimated fraction of 16-bit units that a run goes on into from the unit before."""
    sample = _sample(words)
    before = sample << _U1
    before[:, 1:] |= sample[:, :-1] >> _U63
    before &= sample
    before &= _UNIT_FIRST_BITS
    return popcount(before) / (4 * sample.size)


def runs(words: NDArray[np.uint64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """``(starts, lengths)`` of the maximal runs of set bits, sorted by start."""
    count = popcount(words)
    if count == 0:
        return _EMPTY_I64.copy(), _EMPTY_I64.copy()
    if count == words.size * WORD_BITS:
        return np.zeros(1, dtype=np.int64), np.full(1, count, dtype=np.int64)
    per_word = _runs_per_word(words)
    if per_word < _DENSE_RUNS_PER_WORD:
        return _runs_sparse(words)
    if (
        words.size > _SLOT_MIN_WORDS
        and per_word <= _SLOT_RUNS_PER_WORD
        and _entries_per_unit(words) <= _SLOT_ENTRIES_PER_UNIT
    ):
        return _runs_slots(words, count, _slot_layout(_NARROW_SLOTS))
    return _runs_dense(words, count)
