"""DirtyBitmap against a plain-Python reference: a set of page frame numbers.

Property tests draw bitmaps of every shape that matters (empty, full, sparse pages, long runs, dense noise,
sizes around multiples of 64) and check each operation against the same operation on Python sets. The
chunked kernels are also run with chunks of 1-3 words, so that chunk boundaries fall inside every kind of
run without needing bitmaps of half a million pages. Every runs kernel is also called directly, whatever the
dispatcher would pick; the slot kernel's re-slotting of crowded words (units of 5 or more runs) and its wide
fallback for words of more than 16 runs get a shape of their own.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from dirtylog.bitmap import BitmapError, DirtyBitmap, _bitops
from dirtylog.errors import DirtylogError

settings.register_profile("bitmap", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("bitmap")

EDGE_SIZES = [0, 1, 2, 63, 64, 65, 127, 128, 129, 1023, 1024, 1025, 4096]


# -- reference model ------------------------------------------------------------------------------------------


def ref_runs(pages: set[int]) -> list[tuple[int, int]]:
    """Maximal runs of ``pages`` as (start, length), the obvious way."""
    runs: list[tuple[int, int]] = []
    for p in sorted(pages):
        if runs and runs[-1][0] + runs[-1][1] == p:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((p, 1))
    return runs


def as_runs(starts: NDArray[np.uint64], lengths: NDArray[np.uint64]) -> list[tuple[int, int]]:
    assert starts.dtype == np.uint64 and lengths.dtype == np.uint64
    return list(zip(starts.tolist(), lengths.tolist(), strict=True))


@st.composite
def page_sets(draw: st.DrawFn, max_pages: int = 3000) -> tuple[int, frozenset[int]]:
    """(npages, dirty pages) in one of several shapes."""
    npages = draw(st.one_of(st.sampled_from(EDGE_SIZES), st.integers(0, max_pages)))
    if npages == 0:
        return 0, frozenset()
    shape = draw(st.sampled_from(["pages", "runs", "noise", "full", "ends", "combs"]))
    if shape == "pages":
        pages = draw(st.sets(st.integers(0, npages - 1), max_size=64))
    elif shape == "runs":
        pages = set()
        for start, length in draw(st.lists(st.tuples(st.integers(0, npages - 1), st.integers(1, 300)), max_size=12)):
            pages.update(range(start, min(start + length, npages)))
    elif shape == "noise":
        seed, density = draw(st.integers(0, 2**32 - 1)), draw(st.sampled_from([0.02, 0.1, 0.5, 0.9]))
        pages = set(np.flatnonzero(np.random.default_rng(seed).random(npages) < density).tolist())
    elif shape == "full":
        pages = set(range(npages))
    elif shape == "combs":  # stretches of every other page (8 runs a unit, 32 a word), some broken up
        pages = set()
        for start, length in draw(st.lists(st.tuples(st.integers(0, npages - 1), st.integers(1, 400)), max_size=6)):
            pages.update(range(start, min(start + length, npages), 2))
        pages -= set(draw(st.lists(st.integers(0, npages - 1), max_size=20)))
    else:  # runs touching page 0, the last page and word boundaries
        cuts = draw(st.lists(st.integers(0, npages), min_size=2, max_size=8))
        cuts += [0, npages, min(64, npages), max(npages - 64, 0)]
        cuts = sorted(set(cuts))
        pages = set()
        for i, (a, b) in enumerate(itertools.pairwise(cuts)):
            if i % 2 == draw(st.integers(0, 1)):
                pages.update(range(a, b))
    return npages, frozenset(pages)


def make(npages: int, pages: frozenset[int] | set[int]) -> DirtyBitmap:
    return DirtyBitmap.from_pages(np.array(sorted(pages), dtype=np.int64), npages)


@contextmanager
def chunk_words(words: int) -> Iterator[None]:
    """Run the chunked kernels with tiny chunks, so runs and dense words straddle chunk boundaries."""
    saved = _bitops.CHUNK_WORDS
    _bitops.CHUNK_WORDS = words  # type: ignore[misc]
    try:
        yield
    finally:
        _bitops.CHUNK_WORDS = saved  # type: ignore[misc]


# -- construction, export, round trips ------------------------------------------------------------------------


@given(page_sets())
def test_from_pages_and_pages_round_trip(case: tuple[int, frozenset[int]]) -> None:
    npages, pages = case
    bm = make(npages, pages)
    assert bm.pages().dtype == np.uint64
    assert bm.pages().tolist() == sorted(pages)
    assert bm.count() == len(pages)
    assert len(bm) == npages
    assert bool(bm) is bm.any() is bool(pages)
    for pfn in list(pages)[:20] + list(range(min(npages, 70))):
        assert bm.test(pfn) is (pfn in pages)
        assert (pfn in bm) is (pfn in pages)


@pytest.mark.parametrize("chunk", [1, 2, 3])
@given(case=page_sets())
def test_pages_across_chunk_boundaries(chunk: int, case: tuple[int, frozenset[int]]) -> None:
    npages, pages = case
    bm = make(npages, pages)
    with chunk_words(chunk):
        assert bm.pages().tolist() == sorted(pages)


@given(page_sets(), st.booleans())
def test_kernel_bytes_round_trip(case: tuple[int, frozenset[int]], extra: bool) -> None:
    npages, pages = case
    bm = make(npages, pages)
    raw = bm.to_kernel_bytes()
    assert len(raw) == 8 * ((npages + 63) // 64)
    expected = np.packbits(
        np.isin(np.arange(len(raw) * 8), np.array(sorted(pages), dtype=np.int64)), bitorder="little"
    ).tobytes()
    assert raw == expected
    buf = raw + b"\xff" * 8 if extra else raw  # KVM may hand over a longer buffer: the rest is ignored
    for source in (buf, bytearray(buf), memoryview(buf), np.frombuffer(buf, dtype=np.uint8)):
        assert DirtyBitmap.from_kernel_bytes(source, npages) == bm


def test_from_kernel_bytes_copies_and_accepts_word_arrays() -> None:
    words = np.array([0b1011, 1 << 63], dtype=np.uint64)
    bm = DirtyBitmap.from_kernel_bytes(words, 128)
    words[0] = 0
    assert bm.pages().tolist() == [0, 1, 3, 127]


@given(page_sets())
def test_from_runs_of_runs_is_identity(case: tuple[int, frozenset[int]]) -> None:
    npages, pages = case
    bm = make(npages, pages)
    starts, lengths = bm.runs()
    assert DirtyBitmap.from_runs(starts, lengths, npages) == bm
    order = np.random.default_rng(len(pages)).permutation(starts.size)
    assert DirtyBitmap.from_runs(starts[order], lengths[order], npages) == bm


@given(
    st.integers(1, 2000).flatmap(
        lambda n: st.tuples(
            st.just(n),
            st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, 200)), max_size=40),
        )
    )
)
def test_from_runs_overlapping_touching_and_empty(case: tuple[int, list[tuple[int, int]]]) -> None:
    npages, runs = case
    runs = [(s, min(length, npages - s)) for s, length in runs]
    pages = {p for s, length in runs for p in range(s, s + length)}
    bm = DirtyBitmap.from_runs([s for s, _ in runs], [n for _, n in runs], npages)
    assert bm == make(npages, pages)


def test_empty_full_and_zero_pages() -> None:
    for n in EDGE_SIZES:
        assert DirtyBitmap.empty(n).count() == 0
        full = DirtyBitmap.full(n)
        assert full.count() == n
        assert full.pages().tolist() == list(range(n))
        assert as_runs(*full.runs()) == ([(0, n)] if n else [])
    zero = DirtyBitmap.empty(0)
    assert zero.words.size == 0 and zero.to_kernel_bytes() == b"" and not zero
    assert zero.pages().size == 0 and list(zero.batches(10)) == []
    assert DirtyBitmap.from_kernel_bytes(b"", 0) == zero


# -- tail bits ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("npages", [1, 63, 65, 100, 130])
def test_tail_bits_are_cleared_on_foreign_data(npages: int) -> None:
    nwords = (npages + 63) // 64
    ones = np.full(nwords, 0xFFFF_FFFF_FFFF_FFFF, dtype=np.uint64)
    for bm in (
        DirtyBitmap(ones.copy(), npages),
        DirtyBitmap.from_kernel_bytes(ones.tobytes(), npages),
        DirtyBitmap.full(npages),
    ):
        assert bm.count() == npages
        assert bm.pages().tolist() == list(range(npages))
        assert int(bm.words[-1]) >> (npages % 64 or 64) == 0
    slot = DirtyBitmap.empty(npages)
    slot.or_words_at(0, ones)
    assert slot.count() == npages


def test_constructor_adopts_writable_words_and_copies_read_only_ones() -> None:
    words = np.array([0xFFFF_FFFF_FFFF_FFFF], dtype=np.uint64)
    bm = DirtyBitmap(words, 10)
    assert bm.words is words and int(words[0]) == 0x3FF  # adopted, tail cleared in place
    frozen = np.frombuffer(b"\xff" * 8, dtype=np.uint64)
    bm = DirtyBitmap(frozen, 10)
    assert bm.words is not frozen and bm.count() == 10
    bm.set_pages([0])  # still mutable


# -- runs and batches -----------------------------------------------------------------------------------------


@given(page_sets())
def test_runs_match_reference(case: tuple[int, frozenset[int]]) -> None:
    npages, pages = case
    assert as_runs(*make(npages, pages).runs()) == ref_runs(set(pages))


def test_runs_crossing_words() -> None:
    # runs inside a word, over word boundaries and whole words, ending at npages (a multiple of 64)
    npages = 64 * 40
    pages = set(range(15, 17)) | set(range(60, 200)) | set(range(1000, npages)) | {500, 502, 504, 506}
    pages |= set(range(64 * 9 + 1, 64 * 9 + 33, 2)) | {64 * 9 + 35}  # 17 runs in one word
    assert as_runs(*make(npages, pages).runs()) == ref_runs(pages)


def test_runs_of_a_bitmap_with_every_other_page() -> None:
    # 32 runs in every word: the most a word can hold
    npages = 64 * 100 + 7
    pages = set(range(0, npages, 2))
    assert as_runs(*make(npages, pages).runs()) == ref_runs(pages)


@given(page_sets(), st.integers(1, 700))
def test_batches_cover_pages_in_order(case: tuple[int, frozenset[int]], max_pages: int) -> None:
    npages, pages = case
    batches = list(make(npages, pages).batches(max_pages))
    covered: list[int] = []
    for i, (starts, lengths) in enumerate(batches):
        assert starts.dtype == lengths.dtype == np.uint64
        assert np.all(lengths > 0)
        size = int(lengths.sum())
        assert size == max_pages if i < len(batches) - 1 else 0 < size <= max_pages
        for s, n in as_runs(starts, lengths):
            covered.extend(range(s, s + n))
    assert covered == sorted(pages)


def test_batches_split_long_runs() -> None:
    bm = DirtyBitmap.from_runs([10, 100], [25, 3], 200)
    assert [as_runs(s, n) for s, n in bm.batches(10)] == [
        [(10, 10)],
        [(20, 10)],
        [(30, 5), (100, 3)],
    ]


# -- set algebra ----------------------------------------------------------------------------------------------


@given(st.data())
def test_algebra_matches_set_operations(data: st.DataObject) -> None:
    npages, a = data.draw(page_sets())
    _, b = data.draw(page_sets().filter(lambda c: c[0] == npages) | st.just((npages, frozenset())))
    x, y = make(npages, a), make(npages, b)
    assert (x | y).pages().tolist() == sorted(a | b)
    assert (x & y).pages().tolist() == sorted(a & b)
    assert (x - y).pages().tolist() == sorted(a - b)
    assert (x ^ y).pages().tolist() == sorted(a ^ b)
    for op, expected in (("__ior__", a | b), ("__iand__", a & b), ("__isub__", a - b), ("__ixor__", a ^ b)):
        z = x.copy()
        result = getattr(z, op)(y)
        assert result is z and z.pages().tolist() == sorted(expected)
    assert x.pages().tolist() == sorted(a)  # operands untouched
    assert (x == y) is (a == b)
    assert x == make(npages, a)


def test_equality_compares_size_too() -> None:
    assert DirtyBitmap.empty(64) != DirtyBitmap.empty(65)
    assert DirtyBitmap.empty(64) != "not a bitmap"
    assert DirtyBitmap.empty(0) == DirtyBitmap.empty(0)


@pytest.mark.parametrize("op", ["__or__", "__and__", "__sub__", "__xor__", "__ior__", "__iand__", "__isub__"])
def test_mismatched_sizes_are_refused(op: str) -> None:
    with pytest.raises(ValueError, match=r"bitmaps of 100 and 200 pages"):
        getattr(DirtyBitmap.empty(100), op)(DirtyBitmap.empty(200))


# -- per-slot assembly, single pages, ranges ------------------------------------------------------------------


@given(st.data())
def test_or_words_at_assembles_slots(data: st.DataObject) -> None:
    npages = data.draw(st.integers(1, 1500))
    nwords = (npages + 63) // 64
    bm = DirtyBitmap.empty(npages)
    expected: set[int] = set()
    for _ in range(data.draw(st.integers(1, 4))):
        offset = data.draw(st.integers(0, nwords - 1))
        count = data.draw(st.integers(0, nwords - offset))
        seed = data.draw(st.integers(0, 2**32 - 1))
        slot = np.random.default_rng(seed).integers(0, 2**64, count, dtype=np.uint64, endpoint=False)
        as_bytes = data.draw(st.booleans())
        bm.or_words_at(offset, slot.tobytes() if as_bytes else slot)
        bits = np.unpackbits(slot.view(np.uint8), bitorder="little")
        expected |= {offset * 64 + int(i) for i in np.flatnonzero(bits) if offset * 64 + i < npages}
    assert bm.pages().tolist() == sorted(expected)


def test_slice_words_is_a_view_of_a_slot() -> None:
    bm = DirtyBitmap.empty(64 * 4)
    view = bm.slice_words(1, 2)
    view[0] = 1
    assert bm.pages().tolist() == [64]
    assert bm.slice_words(4, 0).size == 0
    with pytest.raises(BitmapError, match="outside this bitmap's 4 words"):
        bm.slice_words(3, 2)


@given(page_sets(), st.lists(st.integers(0, 10**6), max_size=40), st.booleans())
def test_set_and_clear_pages(case: tuple[int, frozenset[int]], raw: list[int], clear: bool) -> None:
    npages, pages = case
    if npages == 0:
        return
    pfns = [p % npages for p in raw] * 2  # repeats allowed
    bm = make(npages, pages)
    if clear:
        bm.clear_pages(np.array(pfns, dtype=np.uint64))
        assert bm.pages().tolist() == sorted(pages - set(pfns))
    else:
        bm.set_pages(pfns)
        assert bm.pages().tolist() == sorted(pages | set(pfns))


def test_set_and_clear_many_pages_take_the_packed_path() -> None:
    npages = 64 * 100
    pfns = np.random.default_rng(7).integers(0, npages, 3000)
    bm = DirtyBitmap.empty(npages)
    bm.set_pages(pfns)
    assert bm.pages().tolist() == sorted(set(pfns.tolist()))
    bm.clear_pages(pfns[:1500])
    assert bm.pages().tolist() == sorted(set(pfns.tolist()) - set(pfns[:1500].tolist()))


@given(page_sets(), st.integers(0, 3000), st.integers(0, 3000))
def test_set_range(case: tuple[int, frozenset[int]], first: int, count: int) -> None:
    npages, pages = case
    bm = make(npages, pages)
    if first + count > npages:
        with pytest.raises(BitmapError, match="outside the bitmap's pages"):
            bm.set_range(first, count)
        return
    bm.set_range(first, count)
    assert bm.pages().tolist() == sorted(pages | set(range(first, first + count)))


def test_copy_clear_and_repr() -> None:
    bm = DirtyBitmap.from_pages([1, 2, 3], 100)
    twin = bm.copy()
    bm.clear()
    assert not bm and bm.count() == 0 and twin.count() == 3
    assert repr(twin) == "DirtyBitmap(npages=100, dirty=3)"
    assert "5" not in DirtyBitmap.from_pages([5], 10)
    assert -1 not in twin and 100 not in twin and 2 in twin and np.uint64(3) in twin


# -- errors -----------------------------------------------------------------------------------------------------


def test_error_type() -> None:
    assert issubclass(BitmapError, DirtylogError) and issubclass(BitmapError, ValueError)


def test_pfn_out_of_range_is_named() -> None:
    with pytest.raises(BitmapError, match=r"pfn 1000 is out of range for a bitmap of 100 pages.*1 of 3"):
        DirtyBitmap.from_pages([5, 1000, 7], 100)
    with pytest.raises(BitmapError, match="pfn -3 is negative"):
        DirtyBitmap.from_pages([1, -3], 100)
    bm = DirtyBitmap.empty(100)
    with pytest.raises(BitmapError, match="pfn 100 is out of range"):
        bm.set_pages(np.array([100], dtype=np.uint64))
    with pytest.raises(BitmapError, match="pfn 200 is out of range"):
        bm.clear_pages([200])
    with pytest.raises(BitmapError, match="pfn 100 is out of range"):
        bm.test(100)
    with pytest.raises(BitmapError, match="must be integers"):
        DirtyBitmap.from_pages([1.5], 100)


def test_short_kernel_buffer_is_refused() -> None:
    with pytest.raises(BitmapError, match=r"buffer of 8 bytes is too short for 65 pages: KVM fills 16 bytes"):
        DirtyBitmap.from_kernel_bytes(b"\x00" * 8, 65)


def test_bad_words_are_refused() -> None:
    with pytest.raises(BitmapError, match="needs 2 64-bit words, got 1"):
        DirtyBitmap(np.zeros(1, dtype=np.uint64), 65)
    with pytest.raises(BitmapError, match="must be uint64"):
        DirtyBitmap(np.zeros(2, dtype=np.int64), 65)
    with pytest.raises(BitmapError, match="npages must be >= 0"):
        DirtyBitmap.empty(-1)
    with pytest.raises(BitmapError, match="npages must be an integer"):
        DirtyBitmap.empty(1.0)  # type: ignore[arg-type]


def test_or_words_at_is_checked() -> None:
    bm = DirtyBitmap.empty(128)
    with pytest.raises(BitmapError, match=r"words \[1, 3\) fall outside this bitmap's 2 words"):
        bm.or_words_at(1, np.zeros(2, dtype=np.uint64))
    with pytest.raises(BitmapError, match="whole 64-bit words; got 12 bytes"):
        bm.or_words_at(0, b"\x00" * 12)
    with pytest.raises(BitmapError, match="must be uint64"):
        bm.or_words_at(0, np.zeros(1, dtype=np.uint32))


def test_from_runs_is_checked() -> None:
    with pytest.raises(BitmapError, match="ends at page 100, beyond the bitmap's last page 99"):
        DirtyBitmap.from_runs([90], [11], 100)
    with pytest.raises(BitmapError, match="run length -1 is negative"):
        DirtyBitmap.from_runs([1], [-1], 100)
    with pytest.raises(BitmapError, match="one length per start"):
        DirtyBitmap.from_runs([1, 2], [1], 100)
    assert DirtyBitmap.from_runs([100], [0], 100).count() == 0  # empty runs anywhere are fine


def test_batches_needs_a_positive_size() -> None:
    with pytest.raises(BitmapError, match="max_pages must be positive"):
        DirtyBitmap.full(10).batches(0)


# -- sizes where the real chunking and path choices kick in ---------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "density"),
    [("random", 0.001), ("random", 0.03), ("random", 0.1), ("random", 0.6), ("clustered", 0.3)],
)
def test_large_bitmaps_against_numpy(pattern: str, density: float) -> None:
    npages = (1 << 20) + 77  # two chunks and a partial last word
    rng = np.random.default_rng(int(density * 1000))
    if pattern == "random":
        bits = rng.random(npages) < density
    else:
        bits = np.zeros(npages, dtype=np.bool_)
        for start in rng.integers(0, npages, int(density * npages / 500)):
            bits[start : start + rng.integers(1, 1000)] = True
    raw = np.zeros((npages + 63) // 64 * 8, dtype=np.uint8)
    packed = np.packbits(bits, bitorder="little")
    raw[: packed.size] = packed
    bm = DirtyBitmap(raw.view(np.uint64), npages)
    assert np.array_equal(bm.pages(), np.flatnonzero(bits))
    edges = np.diff(np.concatenate(([0], bits.view(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    got_starts, got_lengths = bm.runs()
    assert np.array_equal(got_starts, starts) and np.array_equal(got_lengths, ends - starts)
    assert DirtyBitmap.from_runs(got_starts, got_lengths, npages) == bm
    assert DirtyBitmap.from_pages(np.flatnonzero(bits), npages) == bm
