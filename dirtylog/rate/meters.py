"""The I/O of dirty-rate measurement: one meter per method, each measuring consecutive windows.

A meter's :meth:`Meter.begin` starts the first window; every :meth:`Meter.end` closes the current window,
returns its :class:`DirtyRate`, and starts the next one at the same boundary, so windows tile time with
no gap. A boundary is the meter's collection (the dirty log's collect, the sampler's hash pass); its time
is the midpoint of that operation and its uncertainty the operation's duration.

``probe`` (optional) is called just before and just after every boundary operation, and its results are
kept in :attr:`Meter.boundaries`: the bench and the tests read the guest's progress counters there to
bracket the truth of each window (:mod:`dirtylog.rate.truth`).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from dirtylog.bitmap import DirtyBitmap
from dirtylog.guest.machine import Machine, State
from dirtylog.rate.estimate import (
    DEFAULT_CONFIDENCE,
    RateError,
    check_confidence,
    check_sample_pages,
    proportion_interval,
    sample_size,
)
from dirtylog.rate.result import NO_VCPU_SPLIT, DirtyRate, MeasurementCost
from dirtylog.rate.vcpu_ring import VcpuRingTracker
from dirtylog.tracking.base import Tracker
from dirtylog.tracking.kvm_log import ClearTracker, LogTracker


@dataclass(frozen=True)
class Boundary:
    """One boundary operation: when it ran, and what the probe saw around it."""

    before: float
    after: float
    probe_before: Any = None
    probe_after: Any = None

    @property
    def middle(self) -> float:
        return (self.before + self.after) / 2

    @property
    def seconds(self) -> float:
        return self.after - self.before


def check_running(machine: Machine) -> None:
    if machine.state not in (State.RUNNING, State.PAUSED):
        raise RateError(f"a dirty rate is measured on a started machine; this one is {machine.state.value}: "
                        "call start() first")


class Meter(ABC):
    """Consecutive windows of one method on one machine."""

    method: str = "?"

    def __init__(self, machine: Machine, probe: Callable[[], Any] | None = None) -> None:
        check_running(machine)
        self.machine = machine
        self.probe = probe
        self.boundaries: list[Boundary] = []
        self._start: Boundary | None = None

    def _boundary(self, operation: Callable[[], Any]) -> tuple[Boundary, Any]:
        seen = self.probe() if self.probe else None
        before = time.perf_counter()
        result = operation()
        after = time.perf_counter()
        boundary = Boundary(before, after, seen, self.probe() if self.probe else None)
        self.boundaries.append(boundary)
        return boundary, result

    def begin(self) -> None:
        """Start the first window."""
        self._start, _ = self._boundary(self._begin)

    def end(self) -> DirtyRate:
        """Close the current window (and start the next): its dirty rate."""
        if self._start is None:
            raise RateError("end() before begin(): start a window first")
        self.machine.check()
        boundary, found = self._boundary(self._end)
        start, self._start = self._start, boundary
        return self._result(start, boundary, found)

    def close(self) -> None:  # noqa: B027 (a meter without resources has nothing to release)
        """Stop measuring and release what the meter holds."""

    @abstractmethod
    def _begin(self) -> Any: ...

    @abstractmethod
    def _end(self) -> Any: ...

    @abstractmethod
    def _result(self, start: Boundary, end: Boundary, found: Any) -> DirtyRate: ...

    def __enter__(self) -> Meter:
        self.begin()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LogMeter(Meter):
    """The dirty log: pages dirtied between two collections, exactly, at one write fault per page."""

    def __init__(self, machine: Machine, tracker: Tracker, *, fault_seconds: float = 0.0,
                 probe: Callable[[], Any] | None = None, owns_tracker: bool = True) -> None:
        super().__init__(machine, probe)
        self.tracker = tracker
        self.fault_seconds = fault_seconds
        self.owns_tracker = owns_tracker

    def _begin(self) -> Any:
        if not self.tracker.enabled:
            self.tracker.enable()
        return self._collect()

    def _end(self) -> Any:
        return self._collect()

    def _collect(self) -> tuple[DirtyBitmap, list[DirtyBitmap] | None]:
        return self.tracker.collect(), None

    def _result(self, start: Boundary, end: Boundary, found: Any) -> DirtyRate:
        dirty, per_vcpu = found
        count = dirty.count()
        seconds = end.middle - start.middle
        cost = MeasurementCost(end.seconds, count, self.fault_seconds, len(self.machine.vcpus) or 1, seconds)
        return DirtyRate(self.method, start.middle, seconds, float(count), float(count), float(count),
                         dirty.npages, dirty, vcpu_pages=None if per_vcpu is None else tuple(
                             p.count() for p in per_vcpu),
                         vcpu_note="" if per_vcpu is not None else NO_VCPU_SPLIT["bitmap"], cost=cost,
                         boundary_seconds=start.seconds + end.seconds)

    def close(self) -> None:
        if self.owns_tracker:
            self.tracker.disable()


class BitmapMeter(LogMeter):
    """``bitmap``: KVM_GET_DIRTY_LOG (``mode="log"``) or with KVM_CLEAR_DIRTY_LOG (``mode="clear"``)."""

    method = "bitmap"

    def __init__(self, machine: Machine, *, mode: str = "log", fault_seconds: float = 0.0,
                 probe: Callable[[], Any] | None = None) -> None:
        if machine.vm.dirty_ring_bytes:
            raise RateError("this machine logs dirty pages through per-vCPU rings (dirty_ring), and KVM then "
                            "offers no dirty bitmap: use method='ring' or 'sampling'")
        if mode not in ("log", "clear"):
            raise RateError(f"bitmap mode {mode!r}: choose 'log' or 'clear'")
        tracker: Tracker = LogTracker(machine) if mode == "log" else ClearTracker(machine)
        super().__init__(machine, tracker, fault_seconds=fault_seconds, probe=probe)


class RingMeter(LogMeter):
    """``ring``: the per-vCPU dirty rings; exact, and per vCPU."""

    method = "ring"

    def __init__(self, machine: Machine, tracker: VcpuRingTracker, *, fault_seconds: float = 0.0,
                 probe: Callable[[], Any] | None = None, owns_tracker: bool = True) -> None:
        super().__init__(machine, tracker, fault_seconds=fault_seconds, probe=probe, owns_tracker=owns_tracker)
        self.ring = tracker

    def _collect(self) -> tuple[DirtyBitmap, list[DirtyBitmap] | None]:
        return self.ring.collect_per_vcpu()


class SamplingMeter(Meter):
    """``sampling``: hash a fixed random sample of guest pages at every boundary; a page whose hash
    changed was dirtied in the window. No write protection, so no cost to the guest."""

    method = "sampling"

    def __init__(self, machine: Machine, sample_pages: int, *, confidence: float = DEFAULT_CONFIDENCE,
                 seed: int | None = None, probe: Callable[[], Any] | None = None) -> None:
        super().__init__(machine, probe)
        check_sample_pages(sample_pages)
        self.confidence = check_confidence(confidence)
        npages = machine.ram.npages
        self.sampled = sample_size(npages, sample_pages)
        rng = np.random.default_rng(seed)
        # Sorted: both passes read memory in address order and each sampled page's window is the same
        # length (its hash is taken at the same offset into both passes).
        self.pfns: npt.NDArray[np.int64] = np.sort(rng.choice(npages, self.sampled, replace=False)).astype(np.int64)
        self._hashes: npt.NDArray[np.uint64] | None = None
        self._hash()  # loads the compiled kernel (0.3-0.8 s once per process) before any window is timed

    def _hash(self) -> npt.NDArray[np.uint64]:
        from dirtylog.rate import _kernels

        out = np.empty(self.pfns.size, dtype=np.uint64)
        _kernels.hash_pages(self.machine.ram.pages.view(np.uint64), self.pfns, out)
        return out

    def _begin(self) -> Any:
        self._hashes = self._hash()

    def _end(self) -> Any:
        hashes = self._hash()
        assert self._hashes is not None
        changed = self._hashes != hashes
        self._hashes = hashes
        return changed

    def _result(self, start: Boundary, end: Boundary, found: Any) -> DirtyRate:
        changed: npt.NDArray[np.bool_] = found
        npages = self.machine.ram.npages
        k = int(np.count_nonzero(changed))
        low, high = proportion_interval(k, self.sampled, npages, self.confidence)
        scale = npages / self.sampled
        seconds = end.middle - start.middle
        dirty = DirtyBitmap.from_pages(self.pfns[changed], npages)
        cost = MeasurementCost(end.seconds, 0, 0.0, len(self.machine.vcpus) or 1, seconds)
        return DirtyRate(self.method, start.middle, seconds, k * scale, low * npages, high * npages, npages, dirty,
                         scale=scale, vcpu_note=NO_VCPU_SPLIT["sampling"], cost=cost, confidence=self.confidence,
                         sampled=self.sampled, boundary_seconds=start.seconds + end.seconds)
