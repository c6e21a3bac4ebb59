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


@pytest.mark.timing
def test_bytes_charged_without_waiting_are_paid_by_the_next_writer() -> None:
    """Post-copy's answers go out at once; the push after them waits for their share of the link."""
    pacer = Pacer(rate=10_000_000, burst_seconds=0.01)
    pacer.wait(100_000)  # the burst
    pacer.charge(2_000_000)  # 0.2 s of the link, taken without waiting
    start = time.monotonic()
    pacer.wait(1)
    assert time.monotonic() - start >= 0.15


def test_a_charge_never_waits_behind_a_sleeping_writer() -> None:
    import threading

    pacer = Pacer(rate=1_000_000, burst_seconds=0.001)
    writer = threading.Thread(target=pacer.wait, args=(500_000,))  # sleeps 0.5 s, holding the writers' lock
    writer.start()
    time.sleep(0.05)
    start = time.monotonic()
    pacer.charge(1000)
    assert time.monotonic() - start < 0.2
    writer.join()
