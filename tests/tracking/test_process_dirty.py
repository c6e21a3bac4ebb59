"""ProcessDirty, the result of a process collection: every question answered from the kernel's runs agrees
with the same question asked of the written pages one by one, and nothing is computed before it is asked."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from dirtylog.linux import abi
from dirtylog.linux.procfs import Mapping
from dirtylog.tracking.process_dirty import ProcessDirty
from dirtylog.units import PAGE_SIZE

BASE = 0x7F00_0000_0000


@st.composite
def layouts(draw: st.DrawFn) -> tuple[list[Mapping], list[int]]:
    """Adjacent and separate mappings, and a set of written pages inside them (as page numbers from BASE)."""
    mappings, at = [], 0
    for _ in range(draw(st.integers(1, 6))):
        at += draw(st.sampled_from([0, 0, 3]))  # often adjacent: the kernel merges runs across them
        npages = draw(st.integers(1, 40))
        mappings.append(Mapping(BASE + at * PAGE_SIZE, BASE + (at + npages) * PAGE_SIZE, "rw-p"))
        at += npages
    inside = sorted({p for m in mappings for p in range((m.start - BASE) // PAGE_SIZE, (m.end - BASE) // PAGE_SIZE)})
    written = draw(st.lists(st.sampled_from(inside), unique=True)) if inside else []
    return mappings, sorted(written)


def kernel_runs(pages: list[int]) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[type-arg]
    """Runs of neighbouring pages, as PAGEMAP_SCAN returns them (mapping boundaries ignored)."""
    starts: list[int] = []
    ends: list[int] = []
    for page in pages:
        if ends and ends[-1] == page:
            ends[-1] = page + 1
        else:
            starts.append(page)
            ends.append(page + 1)
    as_addresses = np.array(starts, dtype=np.uint64) * np.uint64(PAGE_SIZE) + np.uint64(BASE)
    return as_addresses, np.array(ends, dtype=np.uint64) * np.uint64(PAGE_SIZE) + np.uint64(BASE)


@given(layouts())
def test_counts_pages_and_bitmaps_agree_with_the_pages_one_by_one(layout: tuple[list[Mapping], list[int]]) -> None:
    mappings, written = layout
    starts, ends = kernel_runs(written)
    dirty = ProcessDirty(tuple(mappings), starts, ends)
    addresses = [BASE + p * PAGE_SIZE for p in written]
    assert dirty.count() == len(written)
    assert dirty.pages().tolist() == addresses
    expected = {m: sum(m.start <= a < m.end for a in addresses) for m in mappings}
    assert dirty.counts() == {m: n for m, n in expected.items() if n}
    assert dirty.mapping_counts().tolist() == [expected[m] for m in mappings]
    for mapping in mappings:
        mine = [(a - mapping.start) // PAGE_SIZE for a in addresses if mapping.start <= a < mapping.end]
        assert dirty.bitmap(mapping).pages().tolist() == mine


def test_nothing_is_counted_until_asked_and_the_tally_hears_each_count_once() -> None:
    mapping = Mapping(BASE, BASE + 64 * PAGE_SIZE, "rw-p")
    tallied: list[int] = []
    for ask in ("count", "pages", "mapping_counts", "counts_by_name"):
        starts, ends = kernel_runs([0, 1, 2, 10, 40])
        dirty = ProcessDirty((mapping,), starts, ends, on_count=tallied.append)
        assert tallied == []  # made, not counted
        getattr(dirty, ask)()
        assert tallied == [5], ask
        assert dirty.count() == 5 and dirty.pages().size == 5
        dirty.mapping_counts()
        assert tallied == [5], ask  # once, whatever is asked after
        tallied.clear()


def test_a_result_detached_from_a_reused_buffer_keeps_its_pages_and_is_counted() -> None:
    mapping = Mapping(BASE, BASE + 64 * PAGE_SIZE, "rw-p")
    buffer = np.zeros(8, dtype=abi.PAGE_REGION_DTYPE)
    starts, ends = kernel_runs([3, 4, 9])
    buffer["start"][:2], buffer["end"][:2] = starts, ends
    tallied: list[int] = []
    dirty = ProcessDirty((mapping,), buffer["start"][:2], buffer["end"][:2], on_count=tallied.append)
    dirty.detach()  # as a tracker does before it scans into this buffer again
    assert tallied == [3]
    buffer["start"][:2], buffer["end"][:2] = kernel_runs([50, 60])
    assert dirty.pages().tolist() == [BASE + p * PAGE_SIZE for p in (3, 4, 9)]
