"""The dirty limit's pure parts: the limiter against a simulated vCPU (with the latencies of a real host) and
the count of first writes per epoch."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dirtylog.rate.estimate import RateError
from dirtylog.rate.limit import BURST_FRACTION, MIN_PERIOD, DirtyLimiter
from dirtylog.tracking.first_writes import FirstWrites


@dataclass
class SimulatedVcpu:
    """A vCPU that writes ``speed`` pages/s whenever it is not asleep. A sleep ordered at ``t`` starts when
    the kick lands (``t`` plus a latency) or when the sleep it is in ends, and ends late by an overshoot."""

    speed: float
    sleeps: list[tuple[float, float]] = field(default_factory=list)  # [start, end), in order, disjoint

    def order_sleep(self, t: float, seconds: float, kick: float, overshoot: float) -> None:
        start = max(t + kick, self.sleeps[-1][1] if self.sleeps else 0.0)
        self.sleeps.append((start, start + seconds + overshoot))

    def pages(self, a: float, b: float) -> float:
        """Pages written in ``[a, b)``."""
        asleep = sum(max(0.0, min(b, end) - max(a, start)) for start, end in self.sleeps if end > a and start < b)
        return self.speed * (b - a - asleep)


def simulate(limit: float, speed: float, seconds: int, late: float = 0.0, seed: int = 0) -> list[float]:
    """Pages per 1 s window of a vCPU limited to ``limit``, sampled when the limiter asks. ``late``: the
    controller wakes, the kick lands and the vCPU wakes each up to this late (uniform, seeded)."""
    rng = np.random.default_rng(seed)
    limiter = DirtyLimiter(1, burst=0.02)
    limiter.set_limit(limit)
    vcpu = SimulatedVcpu(speed)
    now = 0.0
    limiter.step(now, {0: 0})
    while now < seconds:
        now += limiter.next_sample(now) + rng.uniform(0, late)
        count = int(vcpu.pages(0.0, now))
        for _, sleep in limiter.step(now, {0: count}).items():
            vcpu.order_sleep(now, sleep, rng.uniform(0, late), rng.uniform(0, late))
    return [vcpu.pages(float(k), k + 1.0) for k in range(seconds)]


@pytest.mark.parametrize("limit", [1000, 5000, 20000, 60000])
def test_the_limiter_holds_one_second_windows_at_the_limit(limit: float) -> None:
    windows = simulate(limit, speed=65000, seconds=6)[1:]  # after the start-up second
    assert all(abs(w - limit) / limit < 0.03 for w in windows), windows


@pytest.mark.parametrize(("limit", "speed"), [(1000, 20000), (5000, 20000), (1000, 65000), (5000, 65000),
                                              (20000, 65000), (60000, 65000)])
def test_the_limiter_holds_within_ten_percent_on_a_late_host(limit: float, speed: float) -> None:
    """Up to 1 ms late at each of the controller's wake, the kick and the vCPU's wake, the vCPU writing all
    the while (a loaded 2-core host, the controller thread at real-time priority), with the vCPU at a
    third of its speed or all of it. (At 2 ms the worst window at 1,000 pages/s of 65,000 is 12 % off:
    the burst a late sample lets through.)"""
    for seed in range(3):
        windows = simulate(limit, speed=speed, seconds=8, late=0.001, seed=seed)[1:]
        assert all(abs(w - limit) / limit < 0.08 for w in windows), (seed, [round(w) for w in windows])


def test_a_vcpu_that_woke_late_does_not_look_slow() -> None:
    """A sample spent partly asleep (the vCPU woke after the time ordered) keeps the awake speed, so the
    next sample still comes within a small part of a second's allowance."""
    limiter = DirtyLimiter(1)
    limiter.set_limit(1000)
    limiter.step(0.0, {0: 0})
    limiter.step(0.001, {0: 65})  # awake: 65,000 pages/s, 65 ms of debt
    assert limiter.vcpus[0].speed == pytest.approx(65000)
    assert limiter.vcpus[0].asleep_until == pytest.approx(0.065)
    limiter.step(0.070, {0: 65})  # it overslept: nothing written since it should have woken
    assert limiter.vcpus[0].speed > 0.8 * 65000
    wait = limiter.next_sample(0.070)
    assert MIN_PERIOD <= wait <= 2 * BURST_FRACTION * 1000 / 65000 + MIN_PERIOD


def test_the_next_sample_comes_when_the_credit_is_spent() -> None:
    limiter = DirtyLimiter(1, burst=0.02)
    limiter.set_limit(1000)
    limiter.step(0.0, {0: 0})
    limiter.step(0.010, {0: 0})  # idle: 10 ms of credit, worth 10 pages
    limiter.vcpus[0].speed = 11000  # it writes 11 pages per ms when awake: debt grows 10 ms per ms
    assert limiter.next_sample(0.010) == pytest.approx(0.001 + BURST_FRACTION * 1000 / 11000)


def test_an_idle_vcpu_is_sampled_once_soon_then_at_the_period() -> None:
    """Unknown speed: look soon (it may be fast). Known to write nothing (an idle guest, or a machine
    paused): the longest period, not a wake-up every half millisecond."""
    limiter = DirtyLimiter(1)
    limiter.set_limit(1000)
    assert limiter.next_sample(0.0) == MIN_PERIOD
    limiter.step(0.0, {0: 0})
    limiter.step(0.001, {0: 0})
    assert limiter.next_sample(0.001) == pytest.approx(0.02)


def test_limiter_leaves_an_unlimited_or_slower_vcpu_alone() -> None:
    limiter = DirtyLimiter(2)
    limiter.set_limit(10_000, vcpu=0)
    limiter.step(0.0, {0: 0, 1: 0})
    assert limiter.step(0.1, {0: 500, 1: 10**6}) == {}
    with pytest.raises(RateError, match="no vCPU 2"):
        limiter.set_limit(100, vcpu=2)
    with pytest.raises(RateError, match="positive"):
        limiter.set_limit(0)
    assert limiter.next_sample(0.2) >= MIN_PERIOD


@given(st.lists(st.tuples(st.integers(0, 1), st.lists(st.integers(0, 63), max_size=20)), max_size=30),
       st.sets(st.integers(0, 29)))
def test_first_writes_count_each_vcpus_distinct_pages_per_epoch(batches: list[tuple[int, list[int]]],
                                                                 epoch_ends: set[int]) -> None:
    first = FirstWrites(64)
    seen: dict[int, set[int]] = {0: set(), 1: set()}
    totals = {0: 0, 1: 0}
    for index, (vcpu, pages) in enumerate(batches):
        new = first.add(vcpu, np.array(pages, dtype=np.uint64))
        assert new == len(set(pages) - seen[vcpu])
        totals[vcpu] += new
        seen[vcpu] |= set(pages)
        if index in epoch_ends:
            first.new_epoch()
            seen = {0: set(), 1: set()}
    assert {v: first.totals.get(v, 0) for v in (0, 1)} == totals
