"""The stage-2 model behind the common Tracker interface: a simulated ARM guest and its dirty log.

:class:`Stage2Machine` is a guest without a CPU: ``advance(n)`` makes every vCPU perform ``n`` writes,
interleaved round-robin, each through the model's full write path (TLB, table walk, stage-2 abort,
user_mem_abort), following the pattern of a :class:`~dirtylog.workload.WorkloadSpec`. It keeps the ground
truth — pages written since the last :meth:`Stage2Machine.take_written` — so a caller can compare what a
collection reported with what really happened::

    m = Stage2Machine(64 << 20, WorkloadSpec("random", first_page=0, npages=16384, vcpus=2))
    t = m.dirty_log()
    t.enable()
    m.advance(1000)
    assert t.collect() == m.take_written()
    t.disable()

Everything is sequential: a collection runs between writes, never during one. Races between the collector
and the vCPUs are the interleaving checker's business (``dirtylog model check``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dirtylog.bitmap import DirtyBitmap
from dirtylog.errors import DirtylogError
from dirtylog.stage2.cpu import vcpu_write
from dirtylog.stage2.dirty_log import PATCH_ORDER, DirtyLogOrder, KvmDirtyLog, kvm_vm_ioctl_get_dirty_log
from dirtylog.stage2.kvm import Kvm, kvm_create_vm
from dirtylog.stage2.memslot import BITS_PER_LONG, KVM_MEM_LOG_DIRTY_PAGES, KvmMemorySlot, kvm_dirty_bitmap_bytes
from dirtylog.stage2.mmu import stage2_populate_memslot
from dirtylog.stage2.pgtable import PAGE_SHIFT, PAGE_SIZE, PAGES_PER_BLOCK
from dirtylog.stage2.regions import KvmUserspaceMemoryRegion, kvm_vm_ioctl_set_user_memory_region
from dirtylog.tracking.base import Tracker
from dirtylog.workload import WorkloadSpec

_USERSPACE_BASE = 0x7F00_0000_0000
DEFAULT_TLB_ENTRIES = 1024


class Stage2MachineError(DirtylogError, ValueError):
    """A simulated machine that cannot be built as asked."""


@dataclass
class Stage2MachineStats:
    """Counters of the simulated guest since it was built."""

    writes: int = 0
    faults: int = 0


class Stage2Machine:
    """A simulated ARM guest: ``memory_bytes`` of RAM in ``memslots`` slots, running ``spec``.

    Knobs beyond the tracker contract:

    * ``memslots`` — RAM is split into this many slots of (nearly) equal size, each starting on a 2 MiB
      boundary when the memory allows (else a 64-page one, so slot bitmaps align to whole words).
    * ``hugepages`` — slots are backed by huge pages, so faults outside logging map 2 MiB blocks.
    * ``prefault`` — start with all RAM mapped writable (blocks where allowed), as a guest that has run
      for a while; otherwise pages are mapped on first touch.
    * ``tlb_entries`` — capacity of each vCPU's TLB (oldest entry evicted; None: unlimited).

    ``spec.rate`` is ignored: the model has no clock, ``advance`` counts writes.
    """

    def __init__(
        self,
        memory_bytes: int,
        spec: WorkloadSpec,
        *,
        memslots: int = 1,
        hugepages: bool = True,
        prefault: bool = True,
        tlb_entries: int | None = DEFAULT_TLB_ENTRIES,
    ) -> None:
        self.npages = memory_bytes // PAGE_SIZE
        if memslots < 1:
            raise Stage2MachineError(f"a machine needs at least one memslot, got {memslots}")
        if self.npages < BITS_PER_LONG * memslots:
            raise Stage2MachineError(
                f"{memory_bytes} bytes of RAM cannot hold {memslots} slot(s) of at least {BITS_PER_LONG} pages; "
                f"give at least {BITS_PER_LONG * memslots * PAGE_SIZE} bytes"
            )
        if spec.name == "trace":
            raise Stage2MachineError("the stage-2 model has no trace replay; run the trace workload on KVM "
                                     "(drop --backend stage2)")
        if spec.name != "idle" and (spec.first_page < 0 or spec.first_page + spec.npages > self.npages):
            raise Stage2MachineError(
                f"workload pages {spec.first_page}..{spec.first_page + spec.npages - 1} fall outside the "
                f"machine's {self.npages} pages; give more memory or a smaller area"
            )
        self.spec = spec
        self.kvm: Kvm = kvm_create_vm(vmid=1, nr_vcpus=spec.vcpus, tlb_entries=tlb_entries)
        self.memslots: list[KvmMemorySlot] = []
        for slot_id, (base_gfn, npages) in enumerate(_slot_layout(self.npages, memslots)):
            region = KvmUserspaceMemoryRegion(
                slot_id, 0, base_gfn << PAGE_SHIFT, npages << PAGE_SHIFT, _USERSPACE_BASE + (base_gfn << PAGE_SHIFT)
            )
            memslot = kvm_vm_ioctl_set_user_memory_region(self.kvm, region, hugepage_backed=hugepages)
            assert memslot is not None
            if prefault:
                stage2_populate_memslot(self.kvm, memslot)
            self.memslots.append(memslot)
        self.stats = Stage2MachineStats()
        self.stamps = np.zeros(self.npages, dtype=np.uint32)
        self.iterations = [0] * spec.vcpus
        self._written = np.zeros(self.npages, dtype=bool)
        self._rngs = [np.random.default_rng([spec.seed, vcpu]) for vcpu in range(spec.vcpus)]
        self._cursors = [0] * spec.vcpus
        self._stamp_queues: list[np.ndarray] = [np.empty(0, dtype=np.int64) for _ in range(spec.vcpus)]

    # -- the guest ----------------------------------------------------------------------------------------
    def advance(self, writes_per_vcpu: int) -> int:
        """Perform ``writes_per_vcpu`` writes on every vCPU, interleaved round-robin; returns writes done."""
        if writes_per_vcpu < 0:
            raise Stage2MachineError(f"writes per vCPU must be 0 or more, got {writes_per_vcpu}")
        if self.spec.name == "idle" or writes_per_vcpu == 0:
            return 0
        streams = np.stack([self._next_pages(v, writes_per_vcpu) for v in range(self.spec.vcpus)], axis=1)
        gfns = streams.ravel()
        vcpus = self.kvm.vcpus
        nvcpus = len(vcpus)
        faults = 0
        for index, gfn in enumerate(gfns.tolist()):
            faults += vcpu_write(self.kvm, vcpus[index % nvcpus], gfn)
        self._written[gfns] = True
        self.stats.writes += len(gfns)
        self.stats.faults += faults
        return len(gfns)

    def take_written(self) -> DirtyBitmap:
        """Ground truth: the pages written since the previous call (or since logging was enabled)."""
        pages = np.flatnonzero(self._written).astype(np.uint64)
        self._written[:] = False
        return DirtyBitmap.from_pages(pages, self.npages)

    def dirty_log(self, order: DirtyLogOrder = PATCH_ORDER) -> Stage2Tracker:
        """A tracker over this machine's memslots (not yet enabled); ``order`` can select a mutant's."""
        return Stage2Tracker(self, order)

    def _next_pages(self, vcpu: int, count: int) -> np.ndarray:
        share = self.spec.share(vcpu)
        size = len(share)
        rng = self._rngs[vcpu]
        name = self.spec.name
        if name == "sequential":
            offsets = (self._cursors[vcpu] + np.arange(count)) % size
            self._cursors[vcpu] = (self._cursors[vcpu] + count) % size
        elif name == "random":
            offsets = rng.integers(0, size, count)
        elif name == "hotset":
            hot = max(1, round(size * self.spec.hot_fraction))
            cold_low = hot if hot < size else 0
            offsets = np.where(
                rng.random(count) < self.spec.hot_weight,
                rng.integers(0, hot, count),
                rng.integers(cold_low, size, count),
            )
        else:
            offsets = self._stamp_offsets(vcpu, count, size)
        return np.asarray(offsets, dtype=np.int64) + share.start

    def _stamp_offsets(self, vcpu: int, count: int, size: int) -> np.ndarray:
        # Each iteration writes distinct random pages of the share, stamped with the iteration number.
        per_iteration = self.spec.writes_per_iteration or size
        chunks = []
        needed = count
        while needed:
            queue = self._stamp_queues[vcpu]
            if not len(queue):
                self.iterations[vcpu] += 1
                queue = self._rngs[vcpu].permutation(size)[: min(per_iteration, size)]
            take, self._stamp_queues[vcpu] = queue[:needed], queue[needed:]
            self.stamps[take + self.spec.share(vcpu).start] = self.iterations[vcpu]
            chunks.append(take)
            needed -= len(take)
        return np.concatenate(chunks)

    def _reset_written(self) -> None:
        self._written[:] = False


class Stage2Tracker(Tracker):
    """KVM_GET_DIRTY_LOG on every memslot of a :class:`Stage2Machine`, merged into one bitmap."""

    mode = "stage2"

    def __init__(self, machine: Stage2Machine, order: DirtyLogOrder = PATCH_ORDER) -> None:
        super().__init__(machine.npages)
        self.machine = machine
        self.order = order

    def _set_logging(self, on: bool) -> None:
        kvm = self.machine.kvm
        for memslot in self.machine.memslots:
            flags = memslot.flags | KVM_MEM_LOG_DIRTY_PAGES if on else memslot.flags & ~KVM_MEM_LOG_DIRTY_PAGES
            region = KvmUserspaceMemoryRegion(
                memslot.id, flags, memslot.base_gfn << PAGE_SHIFT, memslot.npages << PAGE_SHIFT, memslot.userspace_addr
            )
            kvm_vm_ioctl_set_user_memory_region(kvm, region)

    def _enable(self) -> None:
        self._set_logging(True)
        self.machine._reset_written()

    def _collect(self) -> DirtyBitmap:
        bitmap = DirtyBitmap.empty(self.npages)
        for memslot in self.machine.memslots:
            buffer = bytearray(kvm_dirty_bitmap_bytes(memslot))
            kvm_vm_ioctl_get_dirty_log(self.machine.kvm, KvmDirtyLog(memslot.id, buffer), self.order)
            bitmap.or_words_at(memslot.base_gfn // BITS_PER_LONG, np.frombuffer(buffer, dtype="<u8"))
        return bitmap

    def _disable(self) -> None:
        self._set_logging(False)


def _slot_layout(npages: int, count: int) -> list[tuple[int, int]]:
    """(base_gfn, npages) of ``count`` slots covering ``npages``, on 2 MiB boundaries when they fit."""
    align = PAGES_PER_BLOCK if npages >= PAGES_PER_BLOCK * count else BITS_PER_LONG
    size = npages // count // align * align
    bases = [i * size for i in range(count)]
    return [(base, (npages - base) if i == count - 1 else size) for i, base in enumerate(bases)]
