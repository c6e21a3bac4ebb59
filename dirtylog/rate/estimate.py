"""Pure calculators of the dirty rate: argument checks, the sampling estimator and its confidence interval,
timing bounds, the working-set curve, where in memory the writes land, and the ``auto`` choice.

Nothing here touches a machine, a clock or a thread: every function maps numbers (or bitmaps) to numbers,
so the tests can drive them exhaustively. :mod:`dirtylog.rate.meters` does the I/O.

Definitions (docs/dirty-rate.md): the dirty rate of a window is the number of *distinct* guest pages
dirtied in the window divided by the window's length. A page written a thousand times in the window
counts once; a page written in two consecutive windows counts in both.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np
import numpy.typing as npt

from dirtylog.bitmap import DirtyBitmap
from dirtylog.errors import DirtylogError
from dirtylog.units import PAGE_SIZE, UnitError, parse_duration

Method = Literal["bitmap", "ring", "sampling", "auto"]
METHODS: tuple[Method, ...] = ("bitmap", "ring", "sampling", "auto")
METHOD_HELP: dict[Method, str] = {
    "bitmap": "the KVM dirty log (KVM_GET_DIRTY_LOG): exact, write-protects, no per-vCPU split",
    "ring": "per-vCPU dirty rings: exact and per vCPU, write-protects; the machine needs dirty_ring=True",
    "sampling": "hash a random sample of pages at both ends of the window: no cost to the guest, an estimate "
                "with a confidence interval",
    "auto": "the cheapest method that meets the requested accuracy (a short sampling pilot decides)",
}

MIN_WINDOW = 0.01  # seconds: below this a collection's own duration is a large part of the window
MAX_WINDOW = 60.0
DEFAULT_SAMPLE_PAGES = 512  # per GiB, QEMU's DIRTYRATE_DEFAULT_SAMPLE_PAGES
PAGES_PER_GIB = (1 << 30) // PAGE_SIZE
DEFAULT_CONFIDENCE = 0.95
DEFAULT_ACCURACY = 0.05  # auto: relative half-width of the interval asked for
SAMPLING_HOST_BUDGET = 0.25  # auto: sampling may spend at most this fraction of the window hashing
MB = 10**6  # MB/s is SI here, as in the migration statistics; QEMU's dirty-rate "MB/s" is MiB/s (>> 20)
MIB = 1 << 20


class RateError(DirtylogError, ValueError):
    """A dirty-rate measurement that cannot be made as asked (bad window, method, sample size, machine)."""


def check_window(window: str | float) -> float:
    """The window in seconds; 10 ms to 60 s."""
    try:
        seconds = parse_duration(window)
    except UnitError as error:
        raise RateError(f"window: {error}") from None
    if not MIN_WINDOW <= seconds <= MAX_WINDOW:
        raise RateError(f"window of {seconds * 1e3:g} ms is outside 10ms..60s; give e.g. window='100ms' or '1s'")
    return seconds


def check_method(method: str) -> Method:
    if method not in METHODS:
        raise RateError(f"unknown dirty-rate method {method!r}; choose one of {', '.join(METHODS)}")
    return method


def check_sample_pages(sample_pages: int) -> int:
    """Sample pages per GiB: 1 .. 262144 (every page of a GiB)."""
    if isinstance(sample_pages, bool) or not isinstance(sample_pages, int | np.integer):
        raise RateError(f"sample_pages must be a whole number of pages per GiB, not {sample_pages!r}")
    if not 1 <= sample_pages <= PAGES_PER_GIB:
        raise RateError(f"sample_pages={sample_pages} pages per GiB is outside 1..{PAGES_PER_GIB} (a GiB has "
                        f"{PAGES_PER_GIB} pages); QEMU's default is {DEFAULT_SAMPLE_PAGES}")
    return int(sample_pages)


def check_confidence(confidence: float) -> float:
    if not 0.5 <= confidence < 1:
        raise RateError(f"confidence {confidence} is outside [0.5, 1); give e.g. 0.95")
    return float(confidence)


def check_accuracy(accuracy: float) -> float:
    if not 0 < accuracy < 1:
        raise RateError(f"accuracy {accuracy} must be a relative error in (0, 1), e.g. 0.05 for 5 %")
    return float(accuracy)


def sample_size(npages: int, sample_pages: int) -> int:
    """Pages to sample in a guest of ``npages``: ``sample_pages`` per GiB, at least one, at most all."""
    return max(1, min(npages, round(npages * sample_pages / PAGES_PER_GIB)))


def z_score(confidence: float) -> float:
    """The two-sided normal quantile of ``confidence`` (1.96 for 0.95)."""
    return NormalDist().inv_cdf(0.5 + confidence / 2)


def proportion_interval(changed: int, sampled: int, population: int, confidence: float) -> tuple[float, float]:
    """Confidence interval of the dirty fraction of ``population`` pages when ``changed`` of ``sampled``
    pages drawn without replacement changed.

    Wilson's score interval (sound at 0 and at all: it never collapses to a point there), with the
    finite-population correction for sampling without replacement, and clipped to what the sample proves:
    the ``changed`` pages are dirty and the other sampled pages are clean. A sample of every page is exact.
    """
    if not 0 <= changed <= sampled <= population or sampled == 0:
        raise RateError(f"cannot estimate from {changed} changed of {sampled} sampled of {population} pages")
    floor = changed / population
    ceiling = (population - (sampled - changed)) / population
    if sampled == population:
        return floor, floor
    z = z_score(confidence)
    n_eff = sampled * (population - 1) / (population - sampled)
    p = changed / sampled
    denominator = 1 + z * z / n_eff
    center = (p + z * z / (2 * n_eff)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / n_eff + z * z / (4 * n_eff * n_eff))
    return max(floor, center - half), min(ceiling, center + half)


def sample_needed(fraction: float, accuracy: float, confidence: float, population: int) -> int:
    """Sample size whose interval half-width is about ``accuracy`` relative to a dirty ``fraction``
    (normal approximation, finite-population corrected); the whole population when fraction is 0."""
    if fraction <= 0:
        return population
    z = z_score(confidence)
    n0 = z * z * (1 - fraction) / (fraction * accuracy * accuracy)
    return min(population, math.ceil(n0 / (1 + (n0 - 1) / population)))


def timing_interval(seconds: float, uncertainty: float) -> tuple[float, float]:
    """Bounds on the true length of a window measured as ``seconds`` between two boundaries each known
    to within ``uncertainty / 2``."""
    return max(seconds - uncertainty, seconds * 1e-3), seconds + uncertainty


@dataclass(frozen=True)
class AutoChoice:
    """What ``method="auto"`` chose, and why."""

    method: Literal["bitmap", "ring", "sampling"]
    sample_pages: int  # per GiB, for sampling
    reason: str


def choose_method(*, pilot_changed: int, pilot_sampled: int, npages: int, window: float, accuracy: float,
                  confidence: float, hash_seconds_per_page: float, has_ring: bool,
                  collect_seconds: float) -> AutoChoice:
    """The cheapest method that should meet ``accuracy`` over ``window``, from a sampling pilot.

    Sampling costs the guest nothing, so it wins whenever a sample big enough for the accuracy can be
    hashed within :data:`SAMPLING_HOST_BUDGET` of the window. The pilot's dirty fraction (over a window
    no longer than this one) is a lower bound of the window's, so the size it asks for is conservative.
    Otherwise the dirty log: the ring where the machine has one (it also gives per-vCPU rates), else the
    bitmap; their error is the boundary timing, ``collect_seconds / window``.
    """
    fraction = pilot_changed / pilot_sampled if pilot_sampled else 0.0
    needed = sample_needed(fraction, accuracy, confidence, npages)
    hash_time = 2 * needed * hash_seconds_per_page  # both ends of the window
    per_gib = min(PAGES_PER_GIB, max(1, math.ceil(needed * PAGES_PER_GIB / npages)))
    logged: Literal["ring", "bitmap"] = "ring" if has_ring else "bitmap"
    if hash_time <= SAMPLING_HOST_BUDGET * window:
        return AutoChoice("sampling", per_gib, f"a sample of {needed} pages meets {accuracy:.0%} at a pilot dirty "
                          f"fraction of {fraction:.2%} and hashes in {hash_time * 1e3:.1f} ms, no cost to the guest")
    timing = collect_seconds / window
    verdict = "meets" if timing <= accuracy else "cannot meet"
    return AutoChoice(logged, per_gib, f"sampling would need {needed} pages ({hash_time * 1e3:.0f} ms of hashing, "
                      f"over {SAMPLING_HOST_BUDGET:.0%} of the window); the {logged} log {verdict} {accuracy:.0%} "
                      f"(timing {timing:.1%}) at the cost of one write fault per dirty page")


def address_histogram(dirty: DirtyBitmap, bins: int, scale: float = 1.0) -> npt.NDArray[np.float64]:
    """Dirty pages per equal slice of guest-physical memory (``bins`` slices), times ``scale``."""
    pages = dirty.pages()
    counts = np.bincount((pages * np.uint64(bins) // np.uint64(max(1, dirty.npages))).astype(np.int64),
                         minlength=bins)[:bins]
    return counts.astype(np.float64) * scale


@dataclass(frozen=True)
class WssPoint:
    """Distinct pages written over the last ``windows`` windows, ``seconds`` long in all."""

    windows: int
    seconds: float
    pages: float

    @property
    def bytes(self) -> float:
        return self.pages * PAGE_SIZE


class WorkingSet:
    """The working-set curve from consecutive windows: distinct pages written over the last 1, 2, 4, ...
    windows. Each window's dirty pages are a bitmap over some universe (guest pages, or a sample of them)
    with a ``scale`` that turns a count into guest pages (1 for the dirty log, population / sample for
    sampling); windows of one measurement share the universe, so unions are meaningful."""

    def __init__(self, history: int = 64) -> None:
        self.history = history
        self._windows: deque[tuple[float, DirtyBitmap, float]] = deque(maxlen=history)

    def add(self, seconds: float, dirty: DirtyBitmap, scale: float = 1.0) -> None:
        self._windows.append((seconds, dirty, scale))

    def __len__(self) -> int:
        return len(self._windows)

    def curve(self, lengths: Sequence[int] | None = None) -> list[WssPoint]:
        """Points for the last ``lengths`` windows (default 1, 2, 4, ... up to what is recorded)."""
        count = len(self._windows)
        if lengths is None:
            lengths = [1 << k for k in range(count.bit_length()) if 1 << k <= count]
        wanted = sorted({n for n in lengths if 1 <= n <= count})
        points: list[WssPoint] = []
        union: DirtyBitmap | None = None
        seconds = 0.0
        for n, (window, dirty, scale) in enumerate(reversed(self._windows), start=1):
            union = dirty.copy() if union is None else union | dirty
            seconds += window
            if n in wanted:
                points.append(WssPoint(n, seconds, union.count() * scale))
            if n >= (wanted[-1] if wanted else 0):
                break
        return points
