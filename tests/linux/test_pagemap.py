"""PAGEMAP_SCAN on this process's memory: arming, atomic read-and-rearm, buffer growth, the pitfalls."""

from __future__ import annotations

import mmap
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dirtylog.linux import abi
from dirtylog.linux.errors import NotRegisteredError, ProcessExitedError
from dirtylog.linux.pagemap import (
    Pagemap,
    pagemap_scan_missing_message,
    pagemap_scan_supported,
    region_page_count,
    region_pages,
)
from dirtylog.linux.userfaultfd import Userfaultfd
from dirtylog.units import PAGE_SIZE
from tests.helpers import wait_for

NPAGES = 4096


class Tracked:
    """An anonymous mapping registered for async write-protect with its own userfaultfd."""

    def __init__(self, npages: int = NPAGES, *, arm: bool = True) -> None:
        self.map = mmap.mmap(-1, npages * PAGE_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.bytes: npt.NDArray[np.uint8] = np.frombuffer(self.map, dtype=np.uint8)
        self.start = self.bytes.ctypes.data
        self.end = self.start + npages * PAGE_SIZE
        self.bytes[::PAGE_SIZE] = 1  # present pages
        self.uffd = Userfaultfd.create(user_mode_only=True)
        self.uffd.api(abi.UFFD_FEATURE_WP_ASYNC | abi.UFFD_FEATURE_WP_UNPOPULATED)
        self.uffd.register(self.start, npages * PAGE_SIZE, wp=True)
        self.pagemap = Pagemap("self", regions=1)
        if arm:
            self.pagemap.protect(self.start, self.end)

    def write(self, pages: npt.NDArray[np.int64] | list[int]) -> None:
        self.bytes[np.asarray(pages, dtype=np.int64) * PAGE_SIZE + 8] += 1

    def collect(self) -> list[int]:
        count = self.pagemap.collect_written(self.start, self.end)
        return ((region_pages(self.pagemap.buffer[:count]) - np.uint64(self.start)) // PAGE_SIZE).tolist()

    def close(self) -> None:
        self.uffd.close()
        self.pagemap.close()


@pytest.fixture
def tracked() -> Iterator[Tracked]:
    t = Tracked()
    yield t
    t.close()


def test_a_collection_reports_exactly_the_written_pages_and_rearms(tracked: Tracked) -> None:
    assert tracked.collect() == []
    tracked.write([5, 6, 7, 100, 4095])
    assert tracked.collect() == [5, 6, 7, 100, 4095]
    assert tracked.collect() == []  # re-protected by the same walk
    tracked.write([6])
    assert tracked.collect() == [6]


def test_neighbouring_pages_come_back_as_one_region(tracked: Tracked) -> None:
    tracked.write(list(range(10, 20)))
    count = tracked.pagemap.collect_written(tracked.start, tracked.end)
    assert count == 1
    region = tracked.pagemap.buffer[0]
    first, end = tracked.start + 10 * PAGE_SIZE, tracked.start + 20 * PAGE_SIZE
    assert (int(region["start"]), int(region["end"])) == (first, end)
    assert int(region["categories"]) == abi.PAGE_IS_WRITTEN


def test_a_full_buffer_grows_and_no_page_is_lost(tracked: Tracked) -> None:
    every_other = np.arange(0, NPAGES, 2)  # 2048 separate regions; the buffer starts with 512
    tracked.write(every_other)
    assert tracked.collect() == every_other.tolist()
    assert len(tracked.pagemap.buffer) >= 2048
    assert tracked.collect() == []


def test_before_arming_every_present_page_reads_as_written() -> None:
    unarmed = Tracked(64, arm=False)
    try:
        assert unarmed.collect() == list(range(64))  # PAGE_IS_WRITTEN means "not write-protected"
        assert unarmed.collect() == []
    finally:
        unarmed.close()


def test_never_touched_pages_are_protected_too(tracked: Tracked) -> None:
    fresh = mmap.mmap(-1, 16 * PAGE_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = np.frombuffer(fresh, dtype=np.uint8)
    start = view.ctypes.data
    tracked.uffd.register(start, 16 * PAGE_SIZE, wp=True)
    tracked.pagemap.protect(start, start + 16 * PAGE_SIZE)
    view[3 * PAGE_SIZE] = 1  # first touch of an unpopulated page: the marker makes it count
    count = tracked.pagemap.collect_written(start, start + 16 * PAGE_SIZE)
    assert region_pages(tracked.pagemap.buffer[:count]).tolist() == [start + 3 * PAGE_SIZE]
    _ = view[5 * PAGE_SIZE]  # a read is not a write
    assert tracked.pagemap.collect_written(start, start + 16 * PAGE_SIZE) == 0


def test_memory_not_registered_is_an_error_when_asked_for() -> None:
    plain = mmap.mmap(-1, 4 * PAGE_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = np.frombuffer(plain, dtype=np.uint8).ctypes.data
    pagemap = Pagemap("self")
    try:
        with pytest.raises(NotRegisteredError, match="not registered for async write-protect"):
            pagemap.collect_written(start, start + 4 * PAGE_SIZE)
        assert pagemap.collect_written(start, start + 4 * PAGE_SIZE, check_registered=False) == 0  # skipped
    finally:
        pagemap.close()


def test_the_classic_read_shows_presence_and_the_uffd_wp_bit(tracked: Tracked) -> None:
    tracked.write([1])
    entries = tracked.pagemap.read_entries(tracked.start, tracked.start + 4 * PAGE_SIZE)
    assert entries.size == 4 and bool(np.all(entries & np.uint64(abi.PM_PRESENT)))
    protected = (entries & np.uint64(abi.PM_UFFD_WP)) != 0
    assert protected.tolist() == [True, False, True, True]  # page 1 was written: no longer protected


@given(st.lists(st.tuples(st.integers(0, 1000), st.integers(1, 50)), max_size=30))
def test_region_pages_expands_runs_in_order(runs: list[tuple[int, int]]) -> None:
    regions = np.zeros(len(runs), dtype=abi.PAGE_REGION_DTYPE)
    starts = np.cumsum([0] + [first + length for first, length in runs])[:-1] * PAGE_SIZE
    for index, ((gap, length), base) in enumerate(zip(runs, starts, strict=True)):
        regions[index] = (base + gap * PAGE_SIZE, base + (gap + length) * PAGE_SIZE, abi.PAGE_IS_WRITTEN)
    expected = [int(region["start"]) + i * PAGE_SIZE for region in regions
                for i in range((int(region["end"]) - int(region["start"])) // PAGE_SIZE)]
    assert region_pages(regions).tolist() == expected
    assert region_page_count(regions) == len(expected)


def test_this_kernel_has_pagemap_scan_and_the_message_for_one_that_has_not() -> None:
    assert pagemap_scan_supported()
    message = pagemap_scan_missing_message()
    assert "needs Linux 6.7 or newer" in message and "PAGEMAP_SCAN" in message and "WP_ASYNC" in message


def test_a_process_that_exits_under_the_scan_is_reported_as_exited_not_as_a_scan_failure() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    pagemap = Pagemap(child.pid)  # opened while it lives, as a tracker holds it
    try:
        assert child.stdin is not None
        child.stdin.close()  # it exits; not reaped yet, its memory is already gone
        wait_for(lambda: Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z",
                 what="the child to become a zombie")
        with pytest.raises(ProcessExitedError, match=f"process {child.pid} exited during PAGEMAP_SCAN"):
            pagemap.scan_once(0, 1 << 47)
    finally:
        pagemap.close()
        child.wait()
