"""The incremental memory digest and the compiled page passes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dirtylog.migration.payload.digest import MULTIPLIERS, DigestError, PageDigest, fingerprints, gather, memory_digest

PAGES = 300


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, PAGES - 1), st.integers(0, 4095), st.integers(1, 255)), min_size=1,
                max_size=40))
def test_the_running_digest_equals_a_fresh_one(writes: list[tuple[int, int, int]]) -> None:
    memory = np.zeros(PAGES * 4096, dtype=np.uint8)
    digest = PageDigest(PAGES)
    assert digest.digest() == memory_digest(memory)  # zeroed memory needs no hashing
    for page, offset, value in writes:
        memory[page * 4096 + offset] = value
    touched = np.unique(np.array([page for page, _, _ in writes], dtype=np.uint64))
    digest.update(touched, memory.reshape(-1, 4096)[touched])
    assert digest.digest() == memory_digest(memory)
    digest.zero(touched)
    memory[:] = 0
    assert digest.digest() == memory_digest(memory)


def test_every_single_word_change_changes_the_fingerprint() -> None:
    page = np.zeros((1, 4096), dtype=np.uint8)
    base = fingerprints(page)[0]
    for word in range(512):
        for bit in (0, 31, 63):
            changed = page.copy()
            changed.view(np.uint64)[0, word] ^= np.uint64(1 << bit)
            assert fingerprints(changed)[0] != base


def test_fingerprints_are_the_linear_hash_of_the_words() -> None:
    """The compiled loop computes what the docstring defines: sum(word[i] * K[i]) mod 2**64."""
    pages = np.random.default_rng(3).integers(0, 256, (20, 4096), dtype=np.uint8)
    words = pages.view(np.uint64).astype(object)  # Python integers: no wrap-around to hide a mistake
    expected = [sum(int(w) * int(k) for w, k in zip(row, MULTIPLIERS, strict=True)) % 2**64 for row in words]
    assert fingerprints(pages).tolist() == expected
    assert fingerprints(pages[::2]).tolist() == expected[::2]  # a strided view is fingerprinted as its rows


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(1, 9)), min_size=1, max_size=8))
def test_gather_copies_runs_and_fingerprints_the_copies(gaps_and_lengths: list[tuple[int, int]]) -> None:
    memory = np.random.default_rng(4).integers(0, 256, (PAGES, 4096), dtype=np.uint8)
    starts, lengths, page = [], [], 0
    for gap, length in gaps_and_lengths:
        starts.append(page + gap)
        lengths.append(length)
        page += gap + length
    pfns = np.concatenate([np.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)])
    out = np.zeros((pfns.size + 3, 4096), dtype=np.uint8)
    prints = gather(memory, np.array(starts, dtype=np.uint64), np.array(lengths, dtype=np.uint32), out)
    assert np.array_equal(out[:pfns.size], memory[pfns])
    assert not out[pfns.size:].any()  # rows past the runs are left alone
    assert prints.tolist() == fingerprints(memory[pfns]).tolist()


def test_gather_refuses_runs_that_do_not_fit() -> None:
    memory = np.zeros((8, 4096), dtype=np.uint8)
    with pytest.raises(DigestError, match="do not fit a buffer of 2 pages"):
        gather(memory, np.array([0], dtype=np.uint64), np.array([3], dtype=np.uint32), np.zeros((2, 4096), np.uint8))
    with pytest.raises(DigestError, match="past the memory's 8 pages"):
        gather(memory, np.array([6], dtype=np.uint64), np.array([3], dtype=np.uint32), np.zeros((4, 4096), np.uint8))


def test_an_unreported_change_is_not_in_the_digest() -> None:
    """What a source whose dirty log lost a write would send: the destination's check then fails."""
    memory = np.zeros(PAGES * 4096, dtype=np.uint8)
    digest = PageDigest(PAGES)
    memory[5 * 4096] = 1
    assert digest.digest() != memory_digest(memory)


def test_a_run_of_fingerprints_lands_where_its_page_numbers_say() -> None:
    pages = np.random.default_rng(3).integers(0, 256, (6, 4096), dtype=np.uint8)
    by_numbers, by_run = PageDigest(16), PageDigest(16)
    by_numbers.update(np.arange(5, 11, dtype=np.uint64), pages)
    by_run.update_run(5, pages)
    assert by_run.digest() == by_numbers.digest() != PageDigest(16).digest()
    by_run.set_run(5, np.zeros(6, dtype=np.uint64))
    assert by_run.digest() == PageDigest(16).digest()
