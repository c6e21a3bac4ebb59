"""``/proc/PID/pagemap``: the ``PAGEMAP_SCAN`` ioctl (Linux 6.7) and the classic one-u64-per-page read.

``PAGEMAP_SCAN`` walks a range of a process's page tables in the kernel and returns the pages that match
some ``PAGE_IS_*`` categories as ``page_region`` runs ``{start, end, categories}``, merging neighbours with
equal categories. With ``PM_SCAN_WP_MATCHING`` it also write-protects (userfaultfd async WP) each page it
reports, under the page-table lock, in the same walk: that is the atomic "get and clear" of a dirty log,
which soft-dirty never had. ``PAGE_IS_WRITTEN`` means "not write-protected": a page written since it was
protected, *or one never protected at all*, so protection must be armed before the first collection.

Results land in a reusable NumPy array of ``page_region`` records; when it fills, the kernel stops at
``walk_end`` (protecting nothing beyond it) and :meth:`Pagemap.scan` grows it and continues from there, so
a scan never loses pages to a small buffer. The buffer is its own anonymous mapping, so a process tracking itself can
leave the tracker's output out of what it tracks.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
from typing import NamedTuple

import numpy as np
import numpy.typing as npt

from dirtylog.linux import abi, procfs
from dirtylog.linux.errors import (
    KernelFeatureError,
    NoSuchProcessError,
    NotRegisteredError,
    PagemapError,
    ProcessExitedError,
    PtraceNotPermittedError,
    describe_errno,
)
from dirtylog.units import PAGE_SIZE

Regions = npt.NDArray[np.void]  # records of abi.PAGE_REGION_DTYPE: start, end, categories
DEFAULT_REGIONS = 4096  # page_region records the buffer starts with (96 KiB); it doubles when it fills
_RECORDS_PER_UNIT = 512  # 512 records of 24 bytes are exactly 3 pages


class ScanResult(NamedTuple):
    """What one ``PAGEMAP_SCAN`` ioctl returned."""

    regions: int  # page_region records written
    walk_end: int  # where the walk stopped: the range's end, unless the buffer filled


def pagemap_scan_missing_message() -> str:
    return (f"this kernel (Linux {os.uname().release}) has no PAGEMAP_SCAN ioctl on /proc/PID/pagemap; dirty "
            "tracking of processes needs Linux 6.7 or newer (PAGEMAP_SCAN and UFFD_FEATURE_WP_ASYNC)")


class Pagemap:
    """The ``pagemap`` file of process ``pid`` (``"self"`` for this one), open for scans and reads."""

    def __init__(self, pid: int | str, *, regions: int = DEFAULT_REGIONS) -> None:
        self.pid = pid
        try:
            self.fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NoSuchProcessError(f"no process {pid}: /proc/{pid} does not exist") from None
        except PermissionError:
            raise PtraceNotPermittedError(f"may not ptrace process {pid} (reading /proc/{pid}/pagemap needs ptrace "
                                          f"access): {procfs.not_permitted_reason(int(pid))}", errno.EACCES) from None
        self._arg = abi.pm_scan_arg(size=96)
        self._allocate(regions)

    def _allocate(self, count: int) -> None:
        # Whole pages holding whole records: a multiple of 512 records (lcm of 4096 and 24 bytes).
        count = -(-max(1, count) // _RECORDS_PER_UNIT) * _RECORDS_PER_UNIT
        self._map = mmap.mmap(-1, count * abi.PAGE_REGION_DTYPE.itemsize, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        # VM_DONTCOPY keeps the buffer a mapping of its own: the kernel merges neighbouring anonymous
        # mappings only when their flags are equal, and a self-tracker leaves exactly this mapping out.
        self._map.madvise(mmap.MADV_DONTFORK)
        self.buffer: Regions = np.frombuffer(self._map, dtype=abi.PAGE_REGION_DTYPE)
        # The fields as arrays of their own, made once: results are slices of them.
        self.starts: npt.NDArray[np.uint64] = self.buffer["start"]
        self.ends: npt.NDArray[np.uint64] = self.buffer["end"]
        self._address = self.buffer.ctypes.data

    @property
    def buffer_range(self) -> tuple[int, int]:
        """``[start, end)`` of the output buffer's mapping (for leaving it out of self-tracking)."""
        return self._address, self._address + len(self._map)

    def _grow(self, keep: int) -> None:
        old = self.buffer[:keep].copy()
        self._allocate(2 * len(self.buffer))
        self.buffer[:keep] = old

    # --- PAGEMAP_SCAN ----------------------------------------------------------------------------

    def scan_once(self, start: int, end: int, *, flags: int = 0, category_mask: int = 0, category_inverted: int = 0,
                  category_anyof_mask: int = 0, return_mask: int = 0, first: int = 0, output: bool = True,
                  max_pages: int = 0) -> ScanResult:
        """One ``PAGEMAP_SCAN`` ioctl over ``[start, end)``, writing regions from record ``first`` of the
        buffer on (``output=False``: no output at all, as for a pure write-protect)."""
        arg = self._arg
        arg.flags, arg.start, arg.end = flags, start, end
        arg.vec = self._address + first * abi.PAGE_REGION_DTYPE.itemsize if output else 0
        arg.vec_len = len(self.buffer) - first if output else 0
        arg.max_pages = max_pages
        arg.category_inverted, arg.category_mask = category_inverted, category_mask
        arg.category_anyof_mask, arg.return_mask = category_anyof_mask, return_mask
        try:
            count = fcntl.ioctl(self.fd, abi.PAGEMAP_SCAN, arg, True)
        except OSError as error:
            code = error.errno or 0
            if code == errno.ENOTTY:
                raise KernelFeatureError(pagemap_scan_missing_message(), code) from None
            if code == errno.EPERM and flags & abi.PM_SCAN_CHECK_WPASYNC:
                raise NotRegisteredError(f"PAGEMAP_SCAN of {start:#x}-{end:#x} in process {self.pid} met memory "
                                         "not registered for async write-protect", code) from None
            if code == errno.ESRCH:  # its memory went away under the scan: the process is exiting
                raise ProcessExitedError(f"process {self.pid} exited during PAGEMAP_SCAN", code) from None
            raise PagemapError(f"PAGEMAP_SCAN of {start:#x}-{end:#x} in process {self.pid} failed: "
                               f"{describe_errno(code)}", code) from None
        return ScanResult(count, int(arg.walk_end))

    def scan(self, start: int, end: int, *, first: int = 0, flags: int = 0, category_mask: int = 0,
             category_inverted: int = 0, category_anyof_mask: int = 0, return_mask: int = 0) -> int:
        """``PAGEMAP_SCAN`` over all of ``[start, end)``, growing the buffer as needed; the regions are
        ``buffer[first:result]``. Flags and masks as :meth:`scan_once`."""
        at, filled = start, first
        while True:
            count, walk_end = self.scan_once(at, end, first=filled, flags=flags, category_mask=category_mask,
                                             category_inverted=category_inverted,
                                             category_anyof_mask=category_anyof_mask, return_mask=return_mask)
            filled += count
            # Only a full buffer stops the walk early. walk_end alone does not tell: the kernel sets it each
            # time its internal 512-record bounce buffer fills, and leaves that value when the walk then
            # completes (6.18's do_pagemap_scan sets it to ``end`` only if it was never set).
            if walk_end >= end or filled < len(self.buffer):
                return filled
            self._grow(filled)
            at = walk_end

    def collect_written(self, start: int, end: int, *, first: int = 0, check_registered: bool = True) -> int:
        """Report the pages written in ``[start, end)`` since they were last protected, and protect them
        again in the same walk (``PM_SCAN_WP_MATCHING``); returns the end record as :meth:`scan`.

        The masks take the kernel's fast path (category and return mask both exactly WRITTEN). With
        ``check_registered`` the scan fails with :class:`NotRegisteredError` instead of silently skipping
        memory that is not registered for async write-protect.
        """
        flags = abi.PM_SCAN_WP_MATCHING | (abi.PM_SCAN_CHECK_WPASYNC if check_registered else 0)
        return self.scan(start, end, first=first, flags=flags, category_mask=abi.PAGE_IS_WRITTEN,
                         return_mask=abi.PAGE_IS_WRITTEN)

    def protect(self, start: int, end: int) -> None:
        """Write-protect every page of ``[start, end)`` (registered for async WP), reporting nothing: arming.

        Also protects pages never touched (the kernel leaves a marker), so their first write is seen."""
        _, walk_end = self.scan_once(start, end, flags=abi.PM_SCAN_WP_MATCHING, output=False)
        if walk_end < end:
            raise PagemapError(f"arming write protection of {start:#x}-{end:#x} stopped at {walk_end:#x}")

    # --- the classic interface: one u64 per page -------------------------------------------------

    def read_entries(self, start: int, end: int) -> npt.NDArray[np.uint64]:
        """The pagemap entries of ``[start, end)``: one u64 per page (``abi.PM_*`` bits)."""
        npages = (end - start) // PAGE_SIZE
        data = bytearray(npages * 8)
        view = memoryview(data)
        done = 0
        while done < len(data):
            got = os.preadv(self.fd, [view[done:]], start // PAGE_SIZE * 8 + done)
            if got <= 0:
                break
            done += got
        return np.frombuffer(data, dtype=np.uint64)[: done // 8]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def region_pages(regions: Regions) -> npt.NDArray[np.uint64]:
    """Every page address in ``regions``, in order (whole-array: ``repeat`` + ``arange``, no Python loop)."""
    starts = regions["start"].astype(np.uint64, copy=False)
    counts = ((regions["end"] - regions["start"]) // PAGE_SIZE).astype(np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.uint64)
    firsts = np.repeat(starts, counts)
    run_offsets = np.repeat(np.cumsum(counts) - counts, counts)
    within = np.arange(total, dtype=np.int64) - run_offsets
    pages: npt.NDArray[np.uint64] = firsts + within.astype(np.uint64) * np.uint64(PAGE_SIZE)
    return pages


def region_page_count(regions: Regions) -> int:
    """How many pages ``regions`` cover."""
    return int(((regions["end"] - regions["start"]) // PAGE_SIZE).sum())


def pagemap_scan_supported() -> bool:
    """Whether this kernel has ``PAGEMAP_SCAN`` (asked of this process's own pagemap)."""
    pagemap = Pagemap("self", regions=1)
    try:
        probe = mmap.mmap(-1, PAGE_SIZE)
        address = np.frombuffer(probe, dtype=np.uint8).ctypes.data
        try:
            pagemap.scan_once(address, address + PAGE_SIZE, return_mask=abi.PAGE_IS_PRESENT,
                              category_mask=abi.PAGE_IS_PRESENT)
        except KernelFeatureError:
            return False
        finally:
            del address
        return True
    finally:
        pagemap.close()
