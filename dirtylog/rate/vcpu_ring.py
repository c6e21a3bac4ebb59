"""A dirty-ring tracker that also keeps each vCPU's pages apart: the ring is per vCPU, so it can say who
dirtied what, which the bitmap cannot."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from dirtylog.bitmap import DirtyBitmap
from dirtylog.guest.machine import Machine
from dirtylog.tracking.kvm_ring import RingTracker


class VcpuRingTracker(RingTracker):
    """:class:`RingTracker` whose collections also give the distinct pages of each vCPU
    (:meth:`collect_per_vcpu`)."""

    def __init__(self, machine: Machine, slots: list[int] | None = None, *, entries: int | None = None) -> None:
        super().__init__(machine, slots, entries=entries)
        self._vcpu_pending: dict[int, DirtyBitmap] = {}

    def _harvest(self, vcpu_id: int, ring: npt.NDArray[np.void]) -> npt.NDArray[np.uint64]:
        gfns = super()._harvest(vcpu_id, ring)  # called with the tracker's lock held
        if gfns.size:
            pending = self._vcpu_pending.get(vcpu_id)
            if pending is None:
                pending = self._vcpu_pending[vcpu_id] = DirtyBitmap.empty(self.npages)
            pending.set_pages(gfns)
        return gfns

    def _enable(self) -> None:
        with self._lock:
            self._vcpu_pending.clear()
        super()._enable()

    def collect_per_vcpu(self) -> tuple[DirtyBitmap, list[DirtyBitmap]]:
        """Like :meth:`collect`, and each vCPU's own pages since the last collection (host writes are in
        the first result only: no vCPU made them)."""
        if not self.enabled:
            raise RuntimeError("ring tracker is not enabled; call enable() first")
        import time

        start = time.perf_counter()
        with self._lock:
            gfns = self._harvest_all()
            self.machine.vm.reset_dirty_rings()
            bitmap, self._pending = self._pending, DirtyBitmap.empty(self.npages)
            per_vcpu, self._vcpu_pending = self._vcpu_pending, {}
            self._end_epoch()
        bitmap.set_pages(gfns)
        bitmap |= self.machine.ram.take_host_dirty()
        self.stats.record_collect(time.perf_counter() - start, bitmap.count())
        empty = DirtyBitmap.empty(self.npages)
        return bitmap, [per_vcpu.get(vcpu.id, empty) for vcpu in self.machine.vcpus]
