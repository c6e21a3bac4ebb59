"""Page batches as arrays: runs, zero pages, compression and the memory digest."""

from __future__ import annotations

import tracemalloc

import lz4.block
import numpy as np
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from dirtylog.migration.payload.digest import memory_digest
from dirtylog.migration.payload.pages import (
    compress,
    decode_pages,
    decompress,
    make_page_batch,
    pfns_from_runs,
    runs_from_pfns,
)
from dirtylog.migration.protocol.errors import LocalProtocolError, RemoteProtocolError
from dirtylog.migration.protocol.events import Codec, PageBatch

PAGE = 4096


@settings(max_examples=200, deadline=None)
@given(st.sets(st.integers(0, (1 << 52) - 1), max_size=200) | st.sets(st.integers(0, 300), max_size=300))
def test_runs_round_trip_any_page_set(pages: set[int]) -> None:
    pfns = np.array(sorted(pages), np.uint64)
    starts, lengths = runs_from_pfns(pfns)
    assert starts.dtype == np.uint64 and lengths.dtype == np.uint32
    assert np.array_equal(pfns_from_runs(starts, lengths), pfns)
    assert (lengths > 0).all() and int(lengths.sum()) == len(pfns)
    # Maximal runs: two runs never touch, or they would have been one.
    assert (starts[1:] > starts[:-1] + lengths[:-1]).all()


def test_runs_of_a_typical_dirty_set() -> None:
    starts, lengths = runs_from_pfns([3, 4, 5, 9, 10, 20])
    assert starts.tolist() == [3, 9, 20] and lengths.tolist() == [3, 2, 1]


@pytest.mark.parametrize("pfns", [[3, 2], [1, 1], [5, 7, 6]])
def test_runs_need_strictly_ascending_pages(pfns: list[int]) -> None:
    with pytest.raises(LocalProtocolError, match="strictly ascending"):
        runs_from_pfns(pfns)


def pages_like_memory(n: int, seed: int = 0) -> np.ndarray:
    """Half random pages, half low-entropy ones (small integers), like a guest's heap."""
    rng = np.random.default_rng(seed)
    pages = np.empty((n, PAGE), np.uint8)
    pages[: n // 2] = rng.integers(0, 256, (n // 2, PAGE), dtype=np.uint8)
    pages[n // 2 :] = rng.integers(0, 100, (n - n // 2, PAGE // 4), dtype=np.int32).view(np.uint8).reshape(-1, PAGE)
    return pages


@pytest.mark.parametrize("codec", ["none", "lz4", "zstd"])
def test_a_batch_decodes_to_the_pages_it_was_made_of(codec: Codec) -> None:
    pages = pages_like_memory(8)[4:]  # compressible
    pfns = np.array([10, 11, 12, 13, 40, 41], np.uint64)
    zero = np.array([False, True, False, False, True, False])
    batch = make_page_batch(2, pfns, zero, pages, page_size=PAGE, codec=codec)
    assert batch.codec == codec
    if codec != "none":
        assert len(batch.data) < pages.nbytes // 2
    got_pfns, got_zero, got = decode_pages(batch)
    assert got_pfns.tolist() == pfns.tolist() and got_zero.tolist() == zero.tolist()
    assert np.array_equal(got, pages)


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_incompressible_pages_go_raw(codec: Codec) -> None:
    pages = pages_like_memory(4)[:2]  # random
    batch = make_page_batch(0, [1, 2], [False, False], pages, page_size=PAGE, codec=codec)
    assert batch.codec == "none" and bytes(batch.data) == pages.tobytes()


def test_a_batch_of_zero_pages_carries_no_data() -> None:
    batch = make_page_batch(0, np.arange(1000), np.ones(1000, bool), b"", page_size=PAGE, codec="zstd")
    assert batch.codec == "none" and len(batch.data) == 0 and batch.nzero == batch.npages == 1000
    pfns, zero, pages = decode_pages(batch)
    assert len(pfns) == 1000 and zero.all() and pages.shape == (0, PAGE)


def received(codec: Codec, data: bytes, pages: int = 2) -> PageBatch:
    return PageBatch(0, np.array([0], np.uint64), np.array([pages], np.uint32), np.zeros(pages, bool), data, codec)


@pytest.mark.parametrize(
    ("codec", "block", "match"),
    [
        ("lz4", b"\xff" * 64, "lz4 block of the batch is corrupt"),
        (
            "lz4",
            lz4.block.compress(bytes(PAGE), store_size=False),
            "lz4 block holds 4096 bytes of pages, .* needs 8192",
        ),
        (
            "zstd",
            zstandard.ZstdCompressor().compress(bytes(range(256)) * 32)[:-6],
            "zstd block of the batch is corrupt",
        ),
        (
            "zstd",
            zstandard.ZstdCompressor().compress(bytes(PAGE)),
            "zstd block declares 4096 bytes, the batch needs 8192",
        ),
        ("zstd", zstandard.ZstdCompressor().compress(bytes(2 * PAGE)) + b"junk", "zstd block of the batch is corrupt"),
        (
            "zstd",
            zstandard.ZstdCompressor(write_content_size=False).compress(bytes(2 * PAGE)),
            "zstd block declares -1 bytes",
        ),
        ("none", bytes(PAGE), "carries 4096 bytes, not 8192"),
    ],
)
def test_a_batch_whose_data_does_not_hold_its_pages_is_refused(codec: Codec, block: bytes, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        decode_pages(received(codec, block))


def test_a_zstd_bomb_is_refused_before_allocating() -> None:
    # 64 MiB of zeroes squeeze into a few KiB; the batch claims only 2 pages.
    bomb = zstandard.ZstdCompressor().compress(bytes(64 << 20))
    tracemalloc.start()
    try:
        with pytest.raises(RemoteProtocolError, match="declares 67108864 bytes"):
            decode_pages(received("zstd", bomb))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_decompress_gives_exactly_the_requested_size() -> None:
    data = bytes(range(256)) * 64
    for codec in ("lz4", "zstd"):
        assert decompress(codec, compress(codec, data), len(data)) == data  # type: ignore[arg-type]
    with pytest.raises(LocalProtocolError, match="cannot compress with codec 'none'"):
        compress("none", data)


def test_page_data_must_be_contiguous() -> None:
    pages = pages_like_memory(4)
    with pytest.raises(LocalProtocolError, match="contiguous"):
        make_page_batch(0, [0, 1], [False, False], pages[::2], page_size=PAGE)


def test_memory_digest_sees_every_byte_and_the_order() -> None:
    mem = pages_like_memory(16, seed=3)
    digest = memory_digest(mem.ravel())
    assert len(digest) == 16 and memory_digest(mem.copy().ravel()) == digest
    changed = mem.copy()
    changed[12, 4095] ^= 1
    assert memory_digest(changed.ravel()) != digest
    assert memory_digest(np.concatenate([mem[10:], mem[:10]]).ravel()) != digest
