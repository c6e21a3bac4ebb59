"""Dirty tracking through the KVM dirty bitmap: ``KVM_GET_DIRTY_LOG`` alone, or with ``KVM_CLEAR_DIRTY_LOG``.

``log`` mode is the seed patch's interface: one ioctl per slot returns the bitmap and, inside the kernel,
clears it and write-protects the reported pages again before returning. ``clear`` mode (manual protect)
splits that: GET only reads the bitmap, and CLEAR re-protects the pages given in a bitmap, a chunk at a
time. QEMU uses the split to clear lazily just before sending each chunk; our ``collect()`` contract is
"reported pages are protected again on return", so it clears every dirty chunk before returning, and
skips the ioctl for chunks with nothing set. With ``initially_set`` the kernel starts a newly logged slot
with every bit set and nothing protected, which makes enabling logging on a large slot cheap; the first
collection then reports every page.

Each slot's bitmap lands directly in its words of the guest-wide bitmap (slots are 64-page aligned), and
pages the host wrote into guest RAM are ORed in, because KVM only sees guest writes.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from dirtylog.bitmap import DirtyBitmap
from dirtylog.guest.machine import Machine
from dirtylog.kvm import abi
from dirtylog.tracking.base import Tracker, TrackingError

DEFAULT_CLEAR_CHUNK_PAGES = 1 << 18  # 1 GiB of 4 KiB pages per KVM_CLEAR_DIRTY_LOG, as QEMU's default


class KvmBitmapTracker(Tracker):
    """Shared parts of the bitmap modes: which slots log, and the host's own writes."""

    def __init__(self, machine: Machine, slots: list[int] | None = None) -> None:
        super().__init__(machine.ram.npages)
        self.machine = machine
        self.slots = sorted(machine.vm.slots) if slots is None else sorted(slots)
        unknown = set(self.slots) - set(machine.vm.slots)
        if unknown:
            raise TrackingError(f"no memory slot(s) {sorted(unknown)}; the machine has {sorted(machine.vm.slots)}")

    def set_logging(self, slot: int, enabled: bool) -> None:
        """Switch dirty logging of one slot on or off; allowed while vCPUs run."""
        vm = self.machine.vm
        flags = vm.slots[slot].flags
        flags = flags | abi.KVM_MEM_LOG_DIRTY_PAGES if enabled else flags & ~abi.KVM_MEM_LOG_DIRTY_PAGES
        vm.set_slot_flags(slot, flags)
        if enabled and slot not in self.slots:
            self.slots.append(slot)
            self.slots.sort()
        elif not enabled and slot in self.slots:
            self.slots.remove(slot)

    def _enable_logging(self) -> None:
        self.machine.attach_tracker(self)
        self.machine.ram.take_host_dirty()  # host writes before tracking started are not "since enable"
        for slot in self.slots:
            self.set_logging(slot, True)

    def _disable_logging(self) -> None:
        for slot in list(self.slots):
            if self.machine.vm.slots[slot].logging:
                self.machine.vm.set_slot_flags(slot, self.machine.vm.slots[slot].flags & ~abi.KVM_MEM_LOG_DIRTY_PAGES)
        self.machine.detach_tracker(self)

    def _slot_words(self, words: npt.NDArray[np.uint64], slot: int) -> npt.NDArray[np.uint64]:
        """The words of the guest-wide bitmap that belong to ``slot``."""
        memslot = self.machine.vm.slots[slot]
        first = memslot.base_gfn // 64
        return words[first:first + memslot.bitmap_bytes // 8]

    def _with_host_writes(self, words: npt.NDArray[np.uint64]) -> DirtyBitmap:
        bitmap = DirtyBitmap(words, self.npages)
        bitmap |= self.machine.ram.take_host_dirty()
        return bitmap


class LogTracker(KvmBitmapTracker):
    """``KVM_GET_DIRTY_LOG`` per slot: the kernel snapshots, clears and re-protects in one ioctl."""

    mode = "log"

    def _enable(self) -> None:
        self._enable_logging()

    def _collect(self) -> DirtyBitmap:
        words = np.zeros((self.npages + 63) // 64, dtype=np.uint64)
        for slot in self.slots:
            self.machine.vm.get_dirty_log(slot, self._slot_words(words, slot))
        return self._with_host_writes(words)

    def _disable(self) -> None:
        self._disable_logging()


class ClearTracker(KvmBitmapTracker):
    """``KVM_GET_DIRTY_LOG`` to read, ``KVM_CLEAR_DIRTY_LOG`` (manual protect) to clear and re-protect."""

    mode = "clear"

    def __init__(self, machine: Machine, slots: list[int] | None = None, *, initially_set: bool = False,
                 chunk_pages: int = DEFAULT_CLEAR_CHUNK_PAGES) -> None:
        super().__init__(machine, slots)
        if chunk_pages <= 0 or chunk_pages % 64:
            raise TrackingError(f"clear chunk of {chunk_pages} pages must be a positive multiple of 64 "
                             "(KVM_CLEAR_DIRTY_LOG works on whole bitmap words)")
        self.initially_set = initially_set
        self.chunk_pages = chunk_pages
        self.clear_calls = 0

    def _enable(self) -> None:
        # Manual protect must be on before logging starts, so that initially-set applies to the slots.
        self.machine.vm.enable_manual_protect(self.initially_set)
        self._enable_logging()

    def _collect(self) -> DirtyBitmap:
        vm = self.machine.vm
        words = np.zeros((self.npages + 63) // 64, dtype=np.uint64)
        chunk_words = self.chunk_pages // 64
        for slot in self.slots:
            slot_words = self._slot_words(words, slot)
            vm.get_dirty_log(slot, slot_words)
            npages = vm.slots[slot].npages
            # One ioctl per chunk that has something set: a sparse log costs few clears.
            starts = np.arange(0, slot_words.size, chunk_words)
            busy = np.flatnonzero(np.logical_or.reduceat(slot_words != 0, starts))
            for chunk in busy.tolist():
                first = chunk * self.chunk_pages
                count = min(self.chunk_pages, npages - first)
                vm.clear_dirty_log(slot, first, count, slot_words[chunk * chunk_words:])
                self.clear_calls += 1
        return self._with_host_writes(words)

    def _disable(self) -> None:
        self._disable_logging()
        self.machine.vm.enable_cap(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, 0)
        self.machine.vm.manual_protect = False
