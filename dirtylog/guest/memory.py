"""Guest RAM: one anonymous mapping, a NumPy view of it, and its split into KVM memory slots.

Guest-physical address 0 is byte 0 of the mapping; slots are consecutive, 64-page aligned pieces of it
(so each slot's dirty bitmap is whole words of the guest-wide one). The host's own writes into guest RAM
never reach the KVM dirty log, so they go through :meth:`GuestMemory.write`, which records them in
``host_dirty`` for trackers to OR in (as Firecracker's ``dump_dirty`` does).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
from pathlib import Path

import numpy as np
import numpy.typing as npt

from dirtylog.bitmap import DirtyBitmap
from dirtylog.kvm.errors import GuestMemoryError
from dirtylog.kvm.memslot import MemorySlot, SlotLayout
from dirtylog.kvm.system import Vm
from dirtylog.linux import abi as linux_abi
from dirtylog.linux.syscalls import process_madvise
from dirtylog.units import PAGE_SIZE, format_size

SLOT_ALIGNMENT = 64 * PAGE_SIZE  # one dirty-bitmap word per 64 pages
HUGE_ALIGNMENT = 2 << 20
MADV_POPULATE_WRITE = 23  # Linux 5.14; not yet in Python 3.11's mmap module
IOV_MAX = 1024


def plan_slots(memory_size: int, nslots: int) -> tuple[SlotLayout, ...]:
    """Split ``memory_size`` bytes into ``nslots`` consecutive slots of whole 64-page units."""
    if nslots < 1:
        raise GuestMemoryError(f"a machine needs at least one memory slot, got {nslots}")
    units = memory_size // SLOT_ALIGNMENT
    if units < nslots:
        raise GuestMemoryError(f"{format_size(memory_size)} cannot be split into {nslots} slots of at least "
                               f"{format_size(SLOT_ALIGNMENT)}; use fewer slots or more memory")
    layouts = []
    start = 0
    for index in range(nslots):
        size_units = units // nslots + (1 if index < units % nslots else 0)
        layouts.append(SlotLayout(index, start * SLOT_ALIGNMENT, size_units * SLOT_ALIGNMENT))
        start += size_units
    return tuple(layouts)


def host_memory_bytes() -> tuple[int, int]:
    """(MemTotal, MemAvailable) of this host, in bytes."""
    values = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        values[key] = int(rest.split()[0]) * 1024
    return values["MemTotal"], values.get("MemAvailable", values["MemTotal"])


class GuestMemory:
    """Anonymous host memory that backs guest-physical ``[0, size)``, viewed as bytes and as pages."""

    def __init__(self, size: int, nslots: int = 1, *, huge_aligned: bool = False) -> None:
        if size <= 0 or size % SLOT_ALIGNMENT:
            raise GuestMemoryError(
                f"guest memory of {size} bytes is not a positive multiple of {format_size(SLOT_ALIGNMENT)} "
                f"(64 pages, one dirty-bitmap word); round it, e.g. to "
                f"{format_size(max(SLOT_ALIGNMENT, size - size % SLOT_ALIGNMENT))}")
        total, available = host_memory_bytes()
        if size > total:
            raise GuestMemoryError(f"{format_size(size)} of guest memory is more than this host has "
                                   f"({format_size(total)} in all, {format_size(available)} available); "
                                   "give the guest less memory")
        self.layout = plan_slots(size, nslots)
        try:
            # Not MAP_NORESERVE: the kernel's overcommit check then refuses what it cannot back now,
            # instead of the OOM killer taking the process in the middle of a migration.
            # huge_aligned: 2 MiB more, so guest address 0 can sit on a 2 MiB host boundary; KVM maps a
            # guest block with one stage-2 block (or EPT huge page) only where host and guest addresses
            # agree modulo 2 MiB.
            self._map = mmap.mmap(-1, size + (HUGE_ALIGNMENT if huge_aligned else 0),
                                  mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        except OSError as error:
            if error.errno == errno.ENOMEM:
                raise GuestMemoryError(
                    f"the host cannot back {format_size(size)} of guest memory ({format_size(available)} "
                    "available); give the guest less memory or free some", error.errno) from None
            raise
        # Back guest RAM with transparent huge pages where the host allows: allocating it (prefault, or the
        # guest's first touches) then takes one fault per 2 MiB instead of 512, which made a migration
        # destination's setup of 2 GiB take 0.26 s instead of 2.95 s here. KVM still maps 4 KiB pages
        # while a slot is logging, so dirty logging is unchanged.
        with contextlib.suppress(OSError):  # EINVAL: a kernel without THP
            self._map.madvise(mmap.MADV_HUGEPAGE)
        self.size = size
        base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        offset = -base % HUGE_ALIGNMENT if huge_aligned else 0
        self.bytes: npt.NDArray[np.uint8] = np.frombuffer(self._map, dtype=np.uint8, count=size, offset=offset)
        self.words: npt.NDArray[np.uint64] = self.bytes.view(np.uint64)
        self.pages: npt.NDArray[np.uint8] = self.bytes.reshape(-1, PAGE_SIZE)
        self.address = base + offset
        self._offset = offset  # of guest address 0 in the mapping
        self.host_dirty = DirtyBitmap.empty(self.npages)

    @property
    def npages(self) -> int:
        """Guest pages."""
        return self.size // PAGE_SIZE

    def prefault(self) -> None:
        """Allocate every host page now (``MADV_POPULATE_WRITE``) so the guest's first touches are cheap."""
        try:
            self._map.madvise(MADV_POPULATE_WRITE)
        except OSError as error:
            raise GuestMemoryError(f"cannot pre-allocate {format_size(self.size)} of guest memory: "
                                   f"{error.strerror}; give the guest less memory or skip prefaulting",
                                   error.errno) from None

    def discard(self, starts: npt.NDArray[np.uint64], lengths: npt.NDArray[np.uint64]) -> None:
        """Give the host pages behind the runs of guest pages ``(starts, lengths)`` back (``MADV_DONTNEED``): they
        read as zero again, or, under a userfaultfd in missing mode, as missing. A migration destination drops
        this way the stale copies of pages that post-copy will bring."""
        if not starts.size:
            return
        if int(starts.max()) >= self.npages or int((starts + lengths).max()) > self.npages:
            raise GuestMemoryError(f"runs to discard go past guest memory's {self.npages} pages")
        iov = np.empty((starts.size, 2), dtype=np.uint64)  # struct iovec {base, len}
        iov[:, 0] = np.uint64(self.address) + starts.astype(np.uint64) * np.uint64(PAGE_SIZE)
        iov[:, 1] = lengths.astype(np.uint64) * np.uint64(PAGE_SIZE)
        try:  # one system call per 1024 runs (process_madvise of every advice on ourselves: Linux 6.13)
            pidfd = os.pidfd_open(os.getpid())
            try:
                for first in range(0, starts.size, IOV_MAX):
                    chunk = iov[first:first + IOV_MAX]
                    advised = process_madvise(pidfd, chunk.ctypes.data, chunk.shape[0], linux_abi.MADV_DONTNEED)
                    if advised != int(chunk[:, 1].sum()):
                        raise OSError(errno.EINVAL, "process_madvise stopped part way")
            finally:
                os.close(pidfd)
        except OSError:  # older kernels: one call a run (dropping a page twice is harmless)
            for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
                self._map.madvise(mmap.MADV_DONTNEED, self._offset + start * PAGE_SIZE, length * PAGE_SIZE)

    def huge_pages(self, allowed: bool) -> None:
        """Allow transparent huge pages behind guest RAM, or not (``MADV_NOHUGEPAGE``), as QEMU's post-copy does
        while it fills guest RAM one page at a time: the holes it leaves are not to be folded into huge pages."""
        with contextlib.suppress(OSError):
            self._map.madvise(mmap.MADV_HUGEPAGE if allowed else mmap.MADV_NOHUGEPAGE)

    def register(self, vm: Vm, flags: int = 0) -> list[MemorySlot]:
        """Create this memory's slots in ``vm``."""
        return [vm.add_slot(s.slot, s.guest_phys_addr, s.memory_size, self.address + s.guest_phys_addr, flags)
                for s in self.layout]

    def write(self, guest_phys_addr: int, data: bytes | npt.NDArray[np.uint8]) -> None:
        """Write into guest memory from the host, recording the pages in ``host_dirty``."""
        raw = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes | bytearray) else data
        end = guest_phys_addr + raw.size
        if guest_phys_addr < 0 or end > self.size:
            raise GuestMemoryError(f"write of {raw.size} bytes at {guest_phys_addr:#x} is outside guest memory "
                                   f"(0..{self.size:#x})")
        self.bytes[guest_phys_addr:end] = raw
        self.mark_host_dirty(guest_phys_addr // PAGE_SIZE, (end - 1) // PAGE_SIZE + 1)

    def mark_host_dirty(self, first_gfn: int, end_gfn: int) -> None:
        """Record that the host wrote guest pages ``[first_gfn, end_gfn)``."""
        self.host_dirty.set_range(first_gfn, end_gfn - first_gfn)

    def take_host_dirty(self) -> DirtyBitmap:
        """Pages the host wrote since the last call, and forget them."""
        taken, self.host_dirty = self.host_dirty, DirtyBitmap.empty(self.npages)
        return taken

    def close(self) -> None:
        """Unmap the memory; views of it must be gone. Closing twice is harmless."""
        if self._map.closed or not hasattr(self, "bytes"):  # closed, or closed while a view held the mapping
            return
        del self.bytes, self.words, self.pages
        # A caller may still hold a NumPy view (e.g. ``machine.memory``); the mapping is then freed with it.
        with contextlib.suppress(BufferError):
            self._map.close()
