"""The pure calculators of dirtylog.rate: checks, the sampling interval, WSS, heatmap bins, auto (the limiter:
test_limit.py)."""

from __future__ import annotations

import numpy as np
import pytest

from dirtylog.bitmap import DirtyBitmap
from dirtylog.rate.estimate import (
    PAGES_PER_GIB,
    RateError,
    WorkingSet,
    address_histogram,
    check_method,
    check_sample_pages,
    check_window,
    choose_method,
    proportion_interval,
    sample_needed,
    sample_size,
)


@pytest.mark.parametrize("window", ["5ms", "61s", 0.001, "soon"])
def test_bad_windows_name_the_range(window: object) -> None:
    with pytest.raises(RateError, match="window"):
        check_window(window)  # type: ignore[arg-type]


def test_windows_in_range_parse() -> None:
    assert check_window("10ms") == pytest.approx(0.01)
    assert check_window("1s") == 1.0
    assert check_window(60) == 60.0


def test_bad_methods_and_sample_sizes() -> None:
    with pytest.raises(RateError, match="choose one of bitmap, ring, sampling, auto"):
        check_method("pml")
    for bad in (0, -5, PAGES_PER_GIB + 1, 1.5, True):
        with pytest.raises(RateError, match="sample_pages"):
            check_sample_pages(bad)  # type: ignore[arg-type]
    assert check_sample_pages(512) == 512


def test_sample_size_scales_with_memory_and_stops_at_all_pages() -> None:
    assert sample_size(PAGES_PER_GIB, 512) == 512
    assert sample_size(8 * PAGES_PER_GIB, 512) == 4096
    assert sample_size(1000, PAGES_PER_GIB) == 1000
    assert sample_size(100, 1) == 1


def test_interval_contains_the_estimate_and_respects_what_the_sample_proves() -> None:
    low, high = proportion_interval(50, 512, PAGES_PER_GIB, 0.95)
    assert low < 50 / 512 < high
    # none changed: the interval starts at 0 but does not collapse
    low, high = proportion_interval(0, 512, PAGES_PER_GIB, 0.95)
    assert low == 0 and high > 0
    # all changed: ends at 1 minus at most the unsampled pages
    low, high = proportion_interval(512, 512, PAGES_PER_GIB, 0.95)
    assert high == 1 and low < 1
    # a census is exact
    assert proportion_interval(7, 100, 100, 0.95) == (0.07, 0.07)
    # a larger sample is a narrower interval
    narrow = proportion_interval(500, 5120, PAGES_PER_GIB, 0.95)
    wide = proportion_interval(50, 512, PAGES_PER_GIB, 0.95)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5])
def test_interval_covers_the_truth_about_as_often_as_it_claims(fraction: float) -> None:
    """Draw samples without replacement from a population with a known dirty fraction: the 95 % interval
    must hold the truth in about 95 % of 2,000 draws (a fixed seed keeps the test deterministic)."""
    rng = np.random.default_rng(1234)
    population = 50_000
    dirty = np.zeros(population, dtype=bool)
    dirty[rng.choice(population, int(population * fraction), replace=False)] = True
    hits = 0
    draws = 2000
    for _ in range(draws):
        sample = rng.choice(population, 512, replace=False)
        low, high = proportion_interval(int(dirty[sample].sum()), 512, population, 0.95)
        hits += low <= fraction <= high
    assert 0.92 <= hits / draws <= 0.99


def test_sample_needed_falls_with_the_dirty_fraction_and_is_all_pages_at_zero() -> None:
    assert sample_needed(0.0, 0.05, 0.95, 10_000) == 10_000
    assert sample_needed(0.5, 0.05, 0.95, 10**9) < sample_needed(0.05, 0.05, 0.95, 10**9)
    assert sample_needed(0.5, 0.05, 0.95, 10**9) == pytest.approx(1537, abs=2)


def test_auto_prefers_sampling_when_a_sample_is_cheap_and_the_log_otherwise() -> None:
    cheap = choose_method(pilot_changed=100, pilot_sampled=512, npages=PAGES_PER_GIB, window=1.0, accuracy=0.05,
                          confidence=0.95, hash_seconds_per_page=1e-6, has_ring=False, collect_seconds=1e-3)
    assert cheap.method == "sampling" and cheap.sample_pages > 512
    costly = choose_method(pilot_changed=1, pilot_sampled=512, npages=PAGES_PER_GIB, window=0.1, accuracy=0.01,
                           confidence=0.95, hash_seconds_per_page=1e-6, has_ring=True, collect_seconds=1e-3)
    assert costly.method == "ring" and "sampling would need" in costly.reason
    assert choose_method(pilot_changed=1, pilot_sampled=512, npages=PAGES_PER_GIB, window=0.1, accuracy=0.01,
                         confidence=0.95, hash_seconds_per_page=1e-6, has_ring=False,
                         collect_seconds=1e-3).method == "bitmap"


def test_working_set_is_the_union_over_growing_windows() -> None:
    wss = WorkingSet()
    npages = 1024
    wss.add(0.1, DirtyBitmap.from_pages([1, 2, 3], npages))
    wss.add(0.1, DirtyBitmap.from_pages([3, 4], npages))
    wss.add(0.1, DirtyBitmap.from_pages([5], npages))
    wss.add(0.1, DirtyBitmap.from_pages([1, 5, 6], npages))
    curve = wss.curve()
    assert [(p.windows, p.pages) for p in curve] == [(1, 3), (2, 3), (4, 6)]
    assert curve[-1].seconds == pytest.approx(0.4)
    scaled = WorkingSet()
    scaled.add(1.0, DirtyBitmap.from_pages([1, 2], npages), scale=10.0)
    assert scaled.curve()[0].pages == 20.0


def test_address_histogram_bins_pages_by_address() -> None:
    dirty = DirtyBitmap.from_pages([0, 1, 511, 512, 1023], 1024)
    assert address_histogram(dirty, 2).tolist() == [3.0, 2.0]
    assert address_histogram(dirty, 4, scale=2.0).tolist() == [4.0, 2.0, 2.0, 2.0]
