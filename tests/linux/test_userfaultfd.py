"""userfaultfd on the real kernel: missing pages resolved by copy and zero-page, synchronous and
asynchronous write-protect, waking, the API handshake and its refusals."""

from __future__ import annotations

import ctypes
import mmap
import threading
import time
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import pytest

from dirtylog.linux import abi
from dirtylog.linux.errors import KernelFeatureError, RangeBusyError, UserfaultfdError
from dirtylog.linux.pagemap import Pagemap, region_pages
from dirtylog.linux.userfaultfd import Userfaultfd, _missing_features_message, ioctl_names
from dirtylog.units import PAGE_SIZE

NPAGES = 8


class Area:
    """An anonymous mapping and its address; the mapping stays alive as long as this object."""

    def __init__(self, npages: int = NPAGES) -> None:
        self.map = mmap.mmap(-1, npages * PAGE_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.bytes: npt.NDArray[np.uint8] = np.frombuffer(self.map, dtype=np.uint8)
        self.address = self.bytes.ctypes.data
        self.size = npages * PAGE_SIZE

    def page(self, index: int) -> int:
        return self.address + index * PAGE_SIZE


@pytest.fixture
def area() -> Iterator[Area]:
    yield Area()


def touch_in_thread(address: int, data: bytes | None = None) -> tuple[threading.Thread, bytearray]:
    """A thread that reads (or writes ``data`` to) ``address`` with memmove, which releases the GIL: a
    thread blocked in a userfault must not hold it."""
    seen = bytearray(16)

    def run() -> None:
        if data is None:
            ctypes.memmove((ctypes.c_char * 16).from_buffer(seen), address, 16)
        else:
            ctypes.memmove(address, data, len(data))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, seen


def test_a_missing_page_blocks_its_reader_until_copy_installs_it(area: Area) -> None:
    with Userfaultfd.create() as uffd:
        uffd.api()
        ioctls = uffd.register(area.address, area.size, missing=True)
        assert {"COPY", "ZEROPAGE", "WAKE"} <= set(ioctl_names(ioctls))
        thread, seen = touch_in_thread(area.page(3) + 8)
        assert uffd.wait(timeout=5)
        [fault] = uffd.read_faults()
        assert fault.page == area.page(3) and not fault.write and not fault.wp
        time.sleep(0.05)
        assert thread.is_alive()  # still waiting in the kernel for the page
        page = np.full(PAGE_SIZE, 0xAB, dtype=np.uint8)
        page[8:16] = np.frombuffer(b"restored", dtype=np.uint8)
        assert uffd.copy(area.page(3), page) == PAGE_SIZE
        thread.join(5)
        assert not thread.is_alive() and bytes(seen[:8]) == b"restored"
        assert area.bytes[3 * PAGE_SIZE] == 0xAB
        with pytest.raises(UserfaultfdError, match="EEXIST"):
            uffd.copy(area.page(3), page)  # already present


def test_zeropage_resolves_a_missing_page_with_zeros(area: Area) -> None:
    with Userfaultfd.create() as uffd:
        uffd.api()
        uffd.register(area.address, area.size, missing=True)
        thread, seen = touch_in_thread(area.page(5))
        assert uffd.wait(timeout=5)
        assert [fault.page for fault in uffd.read_faults()] == [area.page(5)]
        assert uffd.zeropage(area.page(5), PAGE_SIZE) == PAGE_SIZE
        thread.join(5)
        assert not thread.is_alive() and bytes(seen) == bytes(16)


def test_dontwake_leaves_the_thread_waiting_until_wake(area: Area) -> None:
    with Userfaultfd.create() as uffd:
        uffd.api()
        uffd.register(area.address, area.size, missing=True)
        thread, seen = touch_in_thread(area.page(1))
        assert uffd.wait(timeout=5)
        uffd.read_faults()
        uffd.copy(area.page(1), np.full(PAGE_SIZE, 7, dtype=np.uint8), dontwake=True)
        time.sleep(0.05)
        assert thread.is_alive()  # installed, but nobody woke it
        uffd.wake(area.page(1), PAGE_SIZE)
        thread.join(5)
        assert not thread.is_alive() and seen[0] == 7


def test_a_write_to_a_write_protected_page_waits_until_unprotected(area: Area) -> None:
    area.bytes[:] = 1  # populate: WP protects present pages
    with Userfaultfd.create() as uffd:
        info = uffd.api(abi.UFFD_FEATURE_PAGEFAULT_FLAG_WP)
        assert "PAGEFAULT_FLAG_WP" in info.feature_names
        uffd.register(area.address, area.size, wp=True)
        uffd.writeprotect(area.address, area.size)
        thread, _ = touch_in_thread(area.page(2), b"new data")
        assert uffd.wait(timeout=5)
        [fault] = uffd.read_faults()
        assert fault.page == area.page(2) and fault.write and fault.wp
        time.sleep(0.05)
        assert thread.is_alive() and area.bytes[2 * PAGE_SIZE] == 1  # the old page, still there to be saved
        saved = area.bytes[2 * PAGE_SIZE:3 * PAGE_SIZE].copy()
        uffd.writeprotect(area.page(2), PAGE_SIZE, protect=False)  # also wakes the writer
        thread.join(5)
        assert not thread.is_alive()
        assert bytes(area.bytes[2 * PAGE_SIZE:2 * PAGE_SIZE + 8]) == b"new data" and saved[0] == 1


def test_async_write_protect_never_blocks_and_pagemap_sees_the_writes(area: Area) -> None:
    area.bytes[:] = 1
    pagemap = Pagemap("self")
    with Userfaultfd.create() as uffd:
        uffd.api(abi.UFFD_FEATURE_WP_ASYNC | abi.UFFD_FEATURE_WP_UNPOPULATED)
        uffd.register(area.address, area.size, wp=True)
        pagemap.protect(area.address, area.address + area.size)
        area.bytes[[PAGE_SIZE * 1, PAGE_SIZE * 6 + 100]] = 9  # no handler: the kernel resolves both faults
        count = pagemap.collect_written(area.address, area.address + area.size)
        assert region_pages(pagemap.buffer[:count]).tolist() == [area.page(1), area.page(6)]
        assert uffd.read_messages().size == 0  # nothing was sent to a handler
    pagemap.close()


def test_close_unregisters_so_faults_no_longer_wait(area: Area) -> None:
    uffd = Userfaultfd.create()
    uffd.api()
    uffd.register(area.address, area.size, missing=True)
    uffd.close()
    thread, seen = touch_in_thread(area.page(0))
    thread.join(5)
    assert not thread.is_alive() and bytes(seen) == bytes(16)


def test_unregister_lifts_write_protection(area: Area) -> None:
    area.bytes[:] = 1
    with Userfaultfd.create() as uffd:
        uffd.api(abi.UFFD_FEATURE_PAGEFAULT_FLAG_WP)
        uffd.register(area.address, area.size, wp=True)
        uffd.writeprotect(area.address, area.size)
        uffd.unregister(area.address, area.size)
        thread, _ = touch_in_thread(area.page(4), b"x")
        thread.join(5)
        assert not thread.is_alive() and area.bytes[4 * PAGE_SIZE] == ord("x")


def test_one_range_belongs_to_one_userfaultfd(area: Area) -> None:
    with Userfaultfd.create() as first, Userfaultfd.create() as second:
        first.api()
        second.api()
        first.register(area.address, area.size, missing=True)
        with pytest.raises(RangeBusyError, match="already registered with another userfaultfd"):
            second.register(area.address, area.size, missing=True)


def test_the_handshake_refuses_what_it_cannot_do() -> None:
    with Userfaultfd.create() as uffd:
        with pytest.raises(KernelFeatureError, match="unknown feature bits 0x10000000000"):
            uffd.api(1 << 40)
        uffd.api()  # the refused attempt left the fd usable
        with pytest.raises(UserfaultfdError, match="allowed once"):
            uffd.api()


def test_missing_features_are_named_with_the_kernel_that_has_them() -> None:
    message = _missing_features_message(abi.UFFD_FEATURE_WP_ASYNC | abi.UFFD_FEATURE_MOVE)
    assert "UFFD_FEATURE_WP_ASYNC (Linux 6.7)" in message and "UFFD_FEATURE_MOVE (Linux 6.8)" in message


def test_bad_ranges_and_modes_are_refused_before_the_kernel(area: Area) -> None:
    with Userfaultfd.create() as uffd:
        uffd.api()
        with pytest.raises(UserfaultfdError, match="needs a mode"):
            uffd.register(area.address, area.size)
        with pytest.raises(UserfaultfdError, match="whole pages"):
            uffd.register(area.address + 1, area.size, missing=True)
        with pytest.raises(UserfaultfdError, match="EINVAL"):
            uffd.register(8 * PAGE_SIZE, PAGE_SIZE, missing=True)  # nothing is mapped there


def test_thread_id_and_messages_as_records(area: Area) -> None:
    with Userfaultfd.create() as uffd:
        uffd.api(abi.UFFD_FEATURE_THREAD_ID)
        uffd.register(area.address, area.size, missing=True)
        assert uffd.read_messages().size == 0
        thread, _ = touch_in_thread(area.page(7))
        assert uffd.wait(timeout=5)
        messages = uffd.read_messages()
        assert messages.dtype == abi.UFFD_MSG_DTYPE and messages["event"].tolist() == [abi.UFFD_EVENT_PAGEFAULT]
        assert int(messages["arg1"][0]) == area.page(7)
        assert int(messages["arg2"][0]) & 0xFFFFFFFF == thread.native_id
        uffd.zeropage(area.page(7), PAGE_SIZE)
        thread.join(5)


def test_copy_missing_fills_the_holes_and_leaves_present_pages_alone(area: Area) -> None:
    """Two installers racing on the same pages (post-copy's push and its answers): the first copy of a page wins,
    the later one skips it instead of failing, and says how much it installed."""
    with Userfaultfd.create() as uffd:
        uffd.api()
        uffd.register(area.address, area.size, missing=True)
        uffd.copy(area.page(2), np.full(PAGE_SIZE, 5, dtype=np.uint8))
        uffd.copy(area.page(5), np.full(PAGE_SIZE, 5, dtype=np.uint8))
        data = np.full(6 * PAGE_SIZE, 9, dtype=np.uint8)
        assert uffd.copy_missing(area.page(1), data) == 4 * PAGE_SIZE
        assert area.bytes[PAGE_SIZE:7 * PAGE_SIZE:PAGE_SIZE].tolist() == [9, 5, 9, 9, 5, 9]  # pages 0, 7: missing
        assert uffd.copy_missing(area.page(1), data[:PAGE_SIZE]) == 0  # all present: nothing to do
