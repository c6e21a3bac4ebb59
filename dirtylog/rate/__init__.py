"""Dirty rate and working set: how fast a guest dirties its memory, and where, measured three ways.

``bitmap`` (the KVM dirty log), ``ring`` (per-vCPU dirty rings) and ``sampling`` (hashes of a random
sample of pages) behind one call, :func:`measure` / :func:`windows` (``Machine.dirty_rate`` and
``Machine.dirty_rates`` on the facade), with ``auto`` choosing the cheapest that meets an accuracy. Pure
calculators live in :mod:`~dirtylog.rate.estimate`, the I/O in :mod:`~dirtylog.rate.meters`, the dirty
limit in :mod:`~dirtylog.rate.limit`, ground truth for our workloads in :mod:`~dirtylog.rate.truth`.
See docs/dirty-rate.md.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from dirtylog.guest.machine import Machine
from dirtylog.rate.estimate import (
    DEFAULT_ACCURACY,
    DEFAULT_CONFIDENCE,
    DEFAULT_SAMPLE_PAGES,
    METHODS,
    MIN_WINDOW,
    AutoChoice,
    RateError,
    WorkingSet,
    check_accuracy,
    check_confidence,
    check_method,
    check_sample_pages,
    check_window,
    choose_method,
)
from dirtylog.rate.meters import BitmapMeter, Meter, RingMeter, SamplingMeter, check_running
from dirtylog.rate.result import DirtyRate, MeasurementCost
from dirtylog.rate.vcpu_ring import VcpuRingTracker

__all__ = [
    "DEFAULT_SAMPLE_PAGES", "METHODS", "DirtyRate", "MeasurementCost", "Meter", "RateError", "WorkingSet",
    "make_meter", "measure", "windows",
]


def ring_tracker(machine: Machine) -> VcpuRingTracker:
    """The machine's one ring tracker for rates and limits, created on first use and kept on the machine.

    One per VM, because a ring tracker remembers where it stopped reading each vCPU's ring (its fetch
    index) and KVM keeps pushing from there: a second tracker would start reading at entry 0 and find
    nothing but entries already harvested.
    """
    tracker: VcpuRingTracker | None = getattr(machine, "_rate_ring_tracker", None)
    if tracker is not None:
        return tracker
    attached = machine.tracker
    if attached is not None:
        raise RateError(f"the machine's dirty log is taken by a {getattr(attached, 'mode', '?')!r} tracker; "
                        "disable it, or measure with method='sampling' (which needs no dirty log)")
    if not machine.vm.dirty_ring_bytes:
        raise RateError("method='ring' and the dirty limit need per-vCPU dirty rings, which KVM allows only before "
                        "the vCPUs exist: create the machine with dirty_ring=True, or use method='bitmap' or "
                        "'sampling'")
    tracker = VcpuRingTracker(machine)
    machine._rate_ring_tracker = tracker  # type: ignore[attr-defined]
    return tracker


def _ring_of(machine: Machine) -> tuple[VcpuRingTracker, bool]:
    """The ring tracker, and whether a measurement may disable it when done (not while a limit samples it)."""
    tracker = ring_tracker(machine)
    controller = getattr(machine, "_limit_controller", None)
    return tracker, controller is None or not controller.limiter.active


def make_meter(machine: Machine, method: str, *, sample_pages: int = DEFAULT_SAMPLE_PAGES,
               confidence: float = DEFAULT_CONFIDENCE, bitmap_mode: str = "log", seed: int | None = None,
               probe: Callable[[], Any] | None = None, fault_seconds: float | None = None) -> Meter:
    """A meter of ``method`` (not ``auto``) on a started machine. ``fault_seconds``: the cost of one write
    fault, for the cost figures of the dirty-log methods (default: measured once, see rate.cost)."""
    check_method(method)
    check_sample_pages(sample_pages)
    check_confidence(confidence)
    check_running(machine)
    if method == "sampling":
        return SamplingMeter(machine, sample_pages, confidence=confidence, seed=seed, probe=probe)
    if method == "auto":
        raise RateError("make_meter needs a concrete method; 'auto' is resolved by measure() and windows()")
    if method == "bitmap" and machine.tracker is not None:
        raise RateError(f"the machine's dirty log is taken by a {getattr(machine.tracker, 'mode', '?')!r} tracker; "
                        "disable it first, or measure with method='sampling'")
    if fault_seconds is None:
        from dirtylog.rate.cost import fault_cost

        fault_seconds = fault_cost()
    if method == "bitmap":
        return BitmapMeter(machine, mode=bitmap_mode, fault_seconds=fault_seconds, probe=probe)
    tracker, owned = _ring_of(machine)
    return RingMeter(machine, tracker, fault_seconds=fault_seconds, probe=probe, owns_tracker=owned)


def choose(machine: Machine, window: float, *, accuracy: float = DEFAULT_ACCURACY,
           confidence: float = DEFAULT_CONFIDENCE, seed: int | None = None) -> AutoChoice:
    """``auto``: a short sampling pilot (a tenth of the window, 10-100 ms), then the cheapest method that
    should meet ``accuracy`` over ``window`` (see :func:`dirtylog.rate.estimate.choose_method`)."""
    pilot = SamplingMeter(machine, DEFAULT_SAMPLE_PAGES, confidence=confidence, seed=seed)
    pilot.begin()
    time.sleep(min(0.1, max(MIN_WINDOW, window / 10)))
    result = pilot.end()
    hash_seconds = pilot.boundaries[-1].seconds / pilot.sampled
    has_ring = bool(machine.vm.dirty_ring_bytes)
    # The dirty log's boundary: a collection of the whole bitmap, about a millisecond per 4 GiB here
    # (bench/dirty_log_perf.py), or a ring harvest, which is faster.
    collect_seconds = 2e-3 * max(1.0, machine.ram.size / (4 << 30))
    return choose_method(pilot_changed=round(result.pages / result.scale), pilot_sampled=pilot.sampled,
                         npages=machine.ram.npages, window=window, accuracy=accuracy, confidence=confidence,
                         hash_seconds_per_page=hash_seconds, has_ring=has_ring, collect_seconds=collect_seconds)


def windows(machine: Machine, window: str | float = "1s", method: str = "sampling", *,
            sample_pages: int = DEFAULT_SAMPLE_PAGES, count: int | None = None,
            confidence: float = DEFAULT_CONFIDENCE, accuracy: float = DEFAULT_ACCURACY, bitmap_mode: str = "log",
            seed: int | None = None, probe: Callable[[], Any] | None = None,
            fault_seconds: float | None = None) -> Iterator[DirtyRate]:
    """Consecutive windows of ``window`` each (``count`` of them, or until the caller stops iterating).

    Windows follow a fixed schedule (start + k * window), so a slow consumer shortens the next window
    rather than shifting every later one; each result says how long its window actually was.
    """
    seconds = check_window(window)
    check_method(method)
    check_sample_pages(sample_pages)
    check_confidence(confidence)
    check_accuracy(accuracy)
    if count is not None and count < 1:
        raise RateError(f"count must be at least 1, got {count}")
    check_running(machine)
    reason = ""
    if method == "auto":
        choice = choose(machine, seconds, accuracy=accuracy, confidence=confidence, seed=seed)
        method, sample_pages, reason = choice.method, choice.sample_pages, f"auto: {choice.reason}"
    meter = make_meter(machine, method, sample_pages=sample_pages, confidence=confidence, bitmap_mode=bitmap_mode,
                       seed=seed, probe=probe, fault_seconds=fault_seconds)
    try:
        meter.begin()
        start = meter.boundaries[-1].after
        produced = 0
        while count is None or produced < count:
            produced += 1
            time.sleep(max(0.0, start + produced * seconds - time.perf_counter()))
            result = meter.end()
            if reason:
                result = _with_reason(result, reason)
            yield result
    finally:
        meter.close()


def _with_reason(result: DirtyRate, reason: str) -> DirtyRate:
    import dataclasses

    return dataclasses.replace(result, chosen_by=reason)


def measure(machine: Machine, window: str | float = "1s", method: str = "sampling", **options: Any) -> DirtyRate:
    """The dirty rate of one window (see :func:`windows` for the options)."""
    for result in windows(machine, window, method, count=1, **options):
        return result
    raise AssertionError("unreachable")
