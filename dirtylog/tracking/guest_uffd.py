"""A machine's guest RAM tracked from the host side: userfaultfd async write-protect + ``PAGEMAP_SCAN``.

KVM's dirty log sees only what the *guest* writes. A VMM also writes guest RAM itself — loading programs,
device models filling buffers (Firecracker lost pages this way through virtio-rng), restoring pages — and
a write through a raw view such as ``machine.memory`` never reaches KVM's log. This tracker watches the
host mapping that backs guest RAM instead, where every write lands, whoever makes it:

* a host write to a protected page faults in the host and the kernel un-protects it (asynchronous mode);
* a guest write reaches the host page through KVM, which maps guest memory writable only after a write
  fault on the host page (``get_user_pages`` with ``FOLL_WRITE``) — the same fault; and re-protecting
  (``PM_SCAN_WP_MATCHING``) notifies KVM (``MMU_NOTIFY_PROTECTION_VMA``), which drops its own mappings
  of the range, so the guest's next write faults again.

The price is that every collection makes KVM drop its mappings of all guest RAM, so the guest then
faults on its first access to each page (reads included), not only on writes.
"""

from __future__ import annotations

import numpy as np

from dirtylog.bitmap import DirtyBitmap
from dirtylog.guest.machine import Machine
from dirtylog.linux.pagemap import Pagemap
from dirtylog.linux.userfaultfd import Userfaultfd
from dirtylog.tracking.base import Tracker
from dirtylog.tracking.process import WP_FEATURES, check_kernel_support
from dirtylog.units import PAGE_SIZE


class GuestUffdTracker(Tracker):
    """Written guest pages, as a :class:`DirtyBitmap` over guest page frame numbers, seen in the host."""

    mode = "uffd"

    def __init__(self, machine: Machine) -> None:
        super().__init__(machine.ram.npages)
        self.machine = machine
        self._uffd: Userfaultfd | None = None
        self._pagemap: Pagemap | None = None

    @property
    def _range(self) -> tuple[int, int]:
        return self.machine.ram.address, self.machine.ram.address + self.machine.ram.size

    def _enable(self) -> None:
        check_kernel_support()
        start, end = self._range
        try:
            # User-mode-only needs no privilege, and asynchronous faults are resolved before that rule
            # applies: KVM's faults on guest RAM (taken in the kernel) are seen all the same.
            self._uffd = Userfaultfd.create(user_mode_only=True)
            self._uffd.api(WP_FEATURES)
            self._uffd.register(start, end - start, wp=True)
            self._pagemap = Pagemap("self")
            self._pagemap.protect(start, end)
        except BaseException:
            self._disable()
            raise

    def _collect(self) -> DirtyBitmap:
        assert self._pagemap is not None
        start, end = self._range
        count = self._pagemap.collect_written(start, end)
        regions = self._pagemap.buffer[:count]
        first = (regions["start"] - np.uint64(start)) // np.uint64(PAGE_SIZE)
        lengths = (regions["end"] - regions["start"]) // np.uint64(PAGE_SIZE)
        return DirtyBitmap.from_runs(first, lengths, self.npages)

    def _disable(self) -> None:
        if self._uffd is not None:
            self._uffd.close()  # unregisters guest RAM and lifts every protection
            self._uffd = None
        if self._pagemap is not None:
            self._pagemap.close()
            self._pagemap = None
