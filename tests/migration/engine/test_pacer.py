"""The bandwidth cap."""

from __future__ import annotations

import time

import pytest

from dirtylog.migration.engine.pacer import Pacer


@pytest.mark.timing
def test_pacer_holds_the_rate() -> None:
    pacer = Pacer(rate=10_000_000, burst_seconds=0.01)
    start = time.monotonic()
    for _ in range(30):
        pacer.wait(100_000)  # 3 MB at 10 MB/s
    assert time.monotonic() - start >= 0.25
