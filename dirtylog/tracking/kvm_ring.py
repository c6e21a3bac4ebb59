"""Dirty tracking through per-vCPU dirty rings (``KVM_CAP_DIRTY_LOG_RING``).

Each vCPU has a ring of ``kvm_dirty_gfn`` entries in its mmap. KVM publishes an entry by writing its
slot and offset and then setting DIRTY in ``flags`` (a store-release); userspace harvests entries *in
order* from its fetch index while they are DIRTY, marks each RESET, and finally calls
``KVM_RESET_DIRTY_RINGS``, which re-protects the reset pages and recycles their entries. Page contents
may be trusted only after that reset, so ``collect()`` resets before returning.

The harvest is vectorized: the DIRTY prefix of the ring (from the fetch index) is found with one NumPy
pass over ``flags``, and only then are ``slot``/``offset`` read. On x86 loads are not reordered with
other loads, so reading flags first and entries second gives the acquire order the API document asks
for on x86 by itself; on arm64 :func:`~dirtylog.kvm.fence.load_acquire_fence` (a ``dmb ishld``) sits
between the two reads.

On arm64 the rings come with per-slot bitmaps (``KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP``, see
:meth:`~dirtylog.kvm.system.Vm.enable_dirty_ring`), for pages dirtied outside any vCPU: each collection
reads them with ``KVM_GET_DIRTY_LOG`` and ORs them in.

A vCPU whose ring is full exits with KVM_EXIT_DIRTY_RING_FULL; its thread harvests and resets right
there (under the same lock as ``collect()``), keeping what it harvested for the next collection, so no
entry is lost and the vCPU does not wait for the collector.

For a dirty limit, :meth:`RingTracker.count_first_writes` also counts, per vCPU, the pages written for
the first time in the current *epoch* (:class:`~dirtylog.tracking.first_writes.FirstWrites`): an epoch
ends at each collection, so the count is the distinct pages the collector will see, and whoever drives
the limit may end one sooner (:meth:`RingTracker.new_epoch`).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import numpy.typing as npt

from dirtylog.bitmap import DirtyBitmap
from dirtylog.guest.machine import Machine
from dirtylog.kvm import abi
from dirtylog.kvm.fence import load_acquire_fence
from dirtylog.tracking.first_writes import FirstWrites
from dirtylog.tracking.kvm_log import KvmBitmapTracker

_FIRST_SCAN_BLOCK = 4096  # entries of a ring's flags looked at first when harvesting


class RingTracker(KvmBitmapTracker):
    """Per-vCPU dirty rings, harvested in order and reset with ``KVM_RESET_DIRTY_RINGS``."""

    mode = "ring"

    def __init__(self, machine: Machine, slots: list[int] | None = None, *, entries: int | None = None) -> None:
        super().__init__(machine, slots)
        if machine.vm.dirty_ring_bytes == 0:
            machine.enable_dirty_ring(entries)
        self.entries = machine.vm.dirty_ring_bytes // 16
        self._fetch: dict[int, int] = {}
        self._lock = threading.Lock()
        self._pending = DirtyBitmap.empty(self.npages)
        self._slot_base = np.zeros(max(machine.vm.slots) + 1, dtype=np.uint64)
        for memslot in machine.vm.slots.values():
            self._slot_base[memslot.slot] = memslot.base_gfn
        self.ring_full_exits = 0
        self.harvested = 0
        self.vcpu_harvested: dict[int, int] = {}  # entries harvested per vCPU
        self.first_writes: FirstWrites | None = None  # distinct pages per vCPU and epoch, once asked for
        self.epoch_started = time.perf_counter()

    def _enable(self) -> None:
        with self._lock:
            self._pending.clear()
        self.machine.on_dirty_ring_full = self._on_ring_full
        self._enable_logging()

    def _collect(self) -> DirtyBitmap:
        with self._lock:
            gfns = self._harvest_all()
            self.machine.vm.reset_dirty_rings()
            bitmap = self._pending
            self._pending = DirtyBitmap.empty(self.npages)
            self._end_epoch()
        bitmap.set_pages(gfns)
        if self.machine.vm.dirty_ring_with_bitmap:
            words = np.zeros((self.npages + 63) // 64, dtype=np.uint64)
            for slot in self.slots:
                self.machine.vm.get_dirty_log(slot, self._slot_words(words, slot))
            bitmap |= DirtyBitmap(words, self.npages)
        bitmap |= self.machine.ram.take_host_dirty()
        return bitmap

    def _disable(self) -> None:
        self._disable_logging()
        self.machine.on_dirty_ring_full = None

    def _on_ring_full(self, vcpu: int) -> None:
        """Called on the full vCPU's thread: harvest and reset so it can run again, keep the pages."""
        self.sample(ring_full=True)

    def sample(self, *, ring_full: bool = False) -> dict[int, int]:
        """Harvest and reset every ring now, keeping the pages for the next collection; returns the
        cumulative entries harvested per vCPU (the basis of per-vCPU dirty rates)."""
        with self._lock:
            self.ring_full_exits += ring_full
            self._pending.set_pages(self._harvest_all())
            self.machine.vm.reset_dirty_rings()
            return dict(self.vcpu_harvested)

    def count_first_writes(self) -> None:
        """From now on also count, per vCPU, the pages written for the first time in the current epoch
        (:meth:`sample_first_writes`); an epoch ends at each collection and at :meth:`new_epoch`."""
        with self._lock:
            if self.first_writes is None:
                self.first_writes = FirstWrites(self.npages)
                self._end_epoch()

    def sample_first_writes(self) -> dict[int, int]:
        """Harvest every ring now, keeping the pages for the next collection; returns the cumulative count
        of first writes per vCPU (pages new to their epoch), which :meth:`count_first_writes` must have
        started.

        Unlike :meth:`sample` it does not reset the rings: a reset write-protects the pages again, and a
        limiter sampling every few milliseconds made every rewrite of a page in the same second fault
        again (8-13 % of a random writer's speed). The harvested entries are recycled at the end of the
        epoch (a collection, :meth:`new_epoch`) or when a ring fills."""
        with self._lock:
            self._pending.set_pages(self._harvest_all())
            assert self.first_writes is not None, "call count_first_writes() first"
            return dict(self.first_writes.totals)

    def new_epoch(self) -> None:
        """Harvest and reset every ring, then start a new epoch: every page counts as a first write again
        (a limiter's own epoch, when nobody collects). The reset matters: a page still writable since its
        last entry would not be pushed again when rewritten, and its rewrite would go uncounted."""
        with self._lock:
            self._pending.set_pages(self._harvest_all())
            self.machine.vm.reset_dirty_rings()
            self._end_epoch()

    def _end_epoch(self) -> None:
        """Called with the lock held, after the harvest that closes the epoch."""
        self.epoch_started = time.perf_counter()
        if self.first_writes is not None:
            self.first_writes.new_epoch()

    def _harvest_all(self) -> npt.NDArray[np.uint64]:
        parts = [self._harvest(vcpu.id, vcpu.dirty_ring) for vcpu in self.machine.vcpus
                 if vcpu.dirty_ring is not None]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)

    def _harvest(self, vcpu_id: int, ring: npt.NDArray[np.void]) -> npt.NDArray[np.uint64]:
        """Guest page numbers of the DIRTY entries from this ring's fetch index, marked RESET."""
        size = ring.size
        fetch = self._fetch.get(vcpu_id, 0)
        # The DIRTY entries run from the fetch index up to the first entry that is not DIRTY, wrapping at
        # most once: scan [fetch, size), and [0, fetch) only if all of that was DIRTY. Slices of the ring,
        # not an index array over all of it (which cost more than the harvest itself at low counts).
        flags = ring["flags"]
        head = _dirty_prefix(flags[fetch:])
        tail = _dirty_prefix(flags[:fetch]) if head == size - fetch else 0
        count = head + tail
        if count == 0:
            return np.zeros(0, dtype=np.uint64)
        taken = [ring[fetch:fetch + head], ring[:tail]] if tail else [ring[fetch:fetch + head]]
        load_acquire_fence()  # slot and offset are read after flags: see the module docstring on ordering
        gfns = np.concatenate([self._slot_base[entries["slot"] & 0xFFFF] + entries["offset"] for entries in taken])
        for entries in taken:
            entries["flags"] = abi.KVM_DIRTY_GFN_F_RESET
        self._fetch[vcpu_id] = (fetch + count) % size
        self.harvested += count
        self.vcpu_harvested[vcpu_id] = self.vcpu_harvested.get(vcpu_id, 0) + count
        result: npt.NDArray[np.uint64] = gfns.astype(np.uint64, copy=False)
        if self.first_writes is not None:
            self.first_writes.add(vcpu_id, result)
        return result


def _dirty_prefix(flags: npt.NDArray[np.uint32]) -> int:
    """How many entries at the start of ``flags`` are DIRTY.

    Scanned in doubling blocks, so the cost follows the number of DIRTY entries, not the ring's size.
    """
    start, block = 0, _FIRST_SCAN_BLOCK
    while start < flags.size:
        clean = (flags[start:start + block] & abi.KVM_DIRTY_GFN_F_DIRTY) == 0
        first = int(np.argmax(clean))  # the first clean entry; 0 also when there is none
        if clean[first]:
            return start + first
        start += clean.size
        block *= 2
    return int(flags.size)
