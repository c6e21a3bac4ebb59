"""What a dirty-rate measurement returns: :class:`DirtyRate` for one window, with its :class:`MeasurementCost`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dirtylog.bitmap import DirtyBitmap
from dirtylog.rate.estimate import MB, MIB
from dirtylog.units import PAGE_SIZE

NO_VCPU_SPLIT = {
    "bitmap": "the dirty bitmap is one per memory slot, shared by all vCPUs: it cannot tell which vCPU wrote",
    "sampling": "a page's hash says that it changed, not who changed it",
}


@dataclass(frozen=True)
class MeasurementCost:
    """What measuring cost, on the host and to the guest.

    ``collect_seconds`` is host time spent in the measurement's own operations during the window
    (collections, hashing); ``write_faults`` the write-protection faults the method made the guest take
    (one per page it found dirty, for the dirty log; none for sampling); ``fault_seconds`` the cost of one
    such fault on this host (measured once per process, see :func:`dirtylog.rate.cost.fault_cost`; 0 when
    not measured), so ``guest_stall_seconds`` is vCPU time lost to the measurement and ``guest_slowdown``
    that time as a fraction of the vCPUs' time in the window.
    """

    collect_seconds: float = 0.0
    write_faults: int = 0
    fault_seconds: float = 0.0
    vcpus: int = 1
    window: float = 1.0

    @property
    def guest_stall_seconds(self) -> float:
        return self.write_faults * self.fault_seconds

    @property
    def guest_slowdown(self) -> float:
        """Fraction of vCPU time the measurement took from the guest (0 for sampling)."""
        return self.guest_stall_seconds / (self.vcpus * self.window) if self.window > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"collect_ms": round(self.collect_seconds * 1e3, 3), "write_faults": self.write_faults,
                "fault_us": round(self.fault_seconds * 1e6, 2), "guest_slowdown": round(self.guest_slowdown, 5)}


@dataclass(frozen=True)
class DirtyRate:
    """The dirty rate of one window: distinct pages dirtied in it, over its length.

    ``pages`` is the count (an estimate for sampling), ``pages_low``/``pages_high`` its interval: the
    confidence interval for sampling, the boundary timing for the dirty log (whose counts are exact but
    whose window ends are known only to within a collection's duration). ``vcpu_pages`` are per-vCPU
    distinct pages where the method can tell vCPUs apart (``ring``); otherwise None and ``vcpu_note``
    says why. ``dirty`` holds the pages found: all dirty pages for the dirty log, the sampled pages that
    changed for sampling (``scale`` turns their count into guest pages).
    """

    method: str
    start: float  # time.perf_counter() of the window's start
    seconds: float  # the window actually measured, between the midpoints of its boundaries
    pages: float
    pages_low: float
    pages_high: float
    npages: int  # guest pages
    dirty: DirtyBitmap = field(repr=False)
    scale: float = 1.0
    vcpu_pages: tuple[int, ...] | None = None
    vcpu_note: str = ""
    cost: MeasurementCost = field(default_factory=MeasurementCost)
    confidence: float | None = None  # sampling: the interval's confidence level
    sampled: int = 0  # sampling: pages in the sample
    boundary_seconds: float = 0.0  # how long the two boundary operations took together
    chosen_by: str = ""  # auto: why this method
    page_size: int = PAGE_SIZE

    @property
    def pages_per_s(self) -> float:
        return self.pages / self.seconds

    @property
    def rate_low(self) -> float:
        """Lower end of the rate's interval, pages/s (window timing included)."""
        return self.pages_low / (self.seconds + self.boundary_seconds / 2)

    @property
    def rate_high(self) -> float:
        return self.pages_high / max(self.seconds - self.boundary_seconds / 2, self.seconds * 1e-3)

    @property
    def mb_per_s(self) -> float:
        """Megabytes (10**6 bytes) per second."""
        return self.pages_per_s * self.page_size / MB

    @property
    def mib_per_s(self) -> float:
        """MiB (2**20 bytes) per second: the unit of QEMU's ``dirty-rate`` (which it calls MB/s)."""
        return self.pages_per_s * self.page_size / MIB

    @property
    def vcpu_pages_per_s(self) -> tuple[float, ...] | None:
        return None if self.vcpu_pages is None else tuple(p / self.seconds for p in self.vcpu_pages)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures (the page set is left out)."""
        record: dict[str, Any] = {
            "method": self.method, "window_s": round(self.seconds, 6), "pages": round(self.pages, 1),
            "pages_per_s": round(self.pages_per_s, 1), "mb_per_s": round(self.mb_per_s, 3),
            "rate_low": round(self.rate_low, 1), "rate_high": round(self.rate_high, 1),
        }
        if self.vcpu_pages is not None:
            record["vcpu_pages_per_s"] = [round(r, 1) for r in self.vcpu_pages_per_s or ()]
        else:
            record["vcpu_note"] = self.vcpu_note
        if self.confidence is not None:
            record["confidence"] = self.confidence
            record["sampled"] = self.sampled
        if self.chosen_by:
            record["chosen_by"] = self.chosen_by
        record["cost"] = self.cost.as_dict()
        return record
