"""bench/migration.py's post-copy section: the arithmetic behind its table (no migration runs here)."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import migration


def test_spread_is_median_and_range() -> None:
    assert migration.spread([3.0, 1.0, 2.0, 10.0]) == {"median": 2.5, "min": 1.0, "max": 10.0}
    assert all(math.isnan(v) for v in migration.spread([]).values())


def test_guest_time_lost_is_the_time_not_spent_writing_at_its_own_rate() -> None:
    # 1,000 pages/s alone; in 4 s it wrote what takes 1 s: 3 s lost.
    assert migration.guest_time_lost(4.0, 1_000.0, 1_000.0) == pytest.approx(3.0)
    assert migration.guest_time_lost(2.0, 5_000.0, 1_000.0) == 0.0  # faster than alone: nothing lost, never < 0
    assert math.isnan(migration.guest_time_lost(2.0, 5.0, 0.0))


def test_the_modal_bucket_of_qemus_histogram() -> None:
    histogram = [0] * 24
    histogram[7], histogram[8], histogram[12] = 10, 30, 10  # [128, 256), [256, 512), [4096, 8192) us
    assert migration.histogram_mode(histogram) == (256, 512, 0.6)
    assert migration.histogram_mode([0] * 24) == (0, 0, 0.0)


def stats(status: str = "completed", postcopy: bool = True) -> dict[str, Any]:
    return {"status": status, "total_time_ms": 3000.0, "setup_time_ms": 20.0, "downtime_ms": 12.5,
            "ram": {"transferred": 270_000_000}, "cpu_throttle_percentage": 0, "error": "",
            "rounds": [{"final": False}, {"final": True}],
            "postcopy": {"started_ms": 40.0, "pages_pushed": 60_000, "pages_requested": 5_000,
                         "postcopy_requests": 4_000} if postcopy else None}


def test_a_postcopy_run_counts_the_guests_writes_on_both_ends() -> None:
    received = {"event": "completed", "progress_at_resume": 1_500,
                "stats": {"postcopy": {"faults": 4_100, "postcopy_blocktime": 900, "postcopy_vcpu_blocktime": [1, 2],
                                       "postcopy_latency": 600_000, "postcopy_latency_p50_us": 500.0,
                                       "postcopy_latency_p90_us": 900.0, "postcopy_latency_p99_us": 2000.0,
                                       "postcopy_latency_dist": [0] * 24}}}
    guest = {"rate_alone": 1_000.0, "at_start": 500, "at_switchover": 510, "at_end": 510}
    sample = migration.postcopy_sample("post-copy", stats(), received, guest, ideal=2.5)
    assert sample["ratio"] == pytest.approx(1.2) and sample["rounds"] == 1
    assert sample["lost_s"] == pytest.approx(2.0)  # 1,000 pages written (500 -> 1,500) in 3 s at 1,000/s alone
    assert sample["latency_mean_us"] == 600.0 and sample["latency_p50_us"] == 500.0
    assert (sample["pushed"], sample["requested"], sample["requests"]) == (60_000, 5_000, 4_000)


def test_a_failed_run_counts_what_the_source_guest_wrote() -> None:
    guest = {"rate_alone": 1_000.0, "at_start": 500, "at_switchover": 0, "at_end": 2_500}
    sample = migration.postcopy_sample("auto-converge", stats("failed", postcopy=False), {"event": "failed"}, guest,
                                       ideal=2.5)
    assert sample["lost_s"] == pytest.approx(1.0) and "faults" not in sample
