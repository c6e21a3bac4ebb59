"""The pre-copy policy as pure decisions, replayed from made-up round histories."""

from __future__ import annotations

import json

import pytest

from dirtylog.migration.errors import MigrationError
from dirtylog.migration.policy.precopy import Action, PrecopyController, PrecopyPolicy, RoundStats
from dirtylog.migration.policy.stats import MigrationStats, ms


def round_of(index: int, pages: int, dirty: int, seconds: float = 1.0, zero: int = 0) -> RoundStats:
    return RoundStats(index, float(index), seconds, pages, zero, pages * 4096, dirty, 0.0, False)


def test_switches_over_when_the_rest_fits_in_the_downtime_limit() -> None:
    controller = PrecopyController(PrecopyPolicy(downtime_limit=0.05))
    # 100,000 pages/s: 10,000 pending pages would take 100 ms, 4,000 take 40 ms.
    first = controller.after_round(round_of(0, 100_000, 10_000), elapsed=1.0)
    assert first.action is Action.CONTINUE and first.expected_downtime == pytest.approx(0.1)
    second = controller.after_round(round_of(1, 10_000, 4_000, seconds=0.1), elapsed=1.1)
    assert second.action is Action.SWITCHOVER and second.expected_downtime == pytest.approx(0.04)


def test_nothing_pending_switches_over_at_once() -> None:
    decision = PrecopyController(PrecopyPolicy()).after_round(round_of(0, 5, 0), elapsed=0.1)
    assert decision.action is Action.SWITCHOVER and decision.expected_downtime == 0


def test_time_limit_cancels_or_forces_as_chosen() -> None:
    for on_timeout, action in (("cancel", Action.CANCEL), ("force", Action.SWITCHOVER)):
        controller = PrecopyController(PrecopyPolicy(downtime_limit=0.001, max_time=2.0, on_timeout=on_timeout))
        assert controller.after_round(round_of(0, 1000, 900), elapsed=1.0).action is Action.CONTINUE
        decision = controller.after_round(round_of(1, 900, 900), elapsed=2.5)
        assert decision.action is action
        assert "2.0 s" in decision.reason


def test_auto_converge_throttles_after_two_high_rounds_and_steps_up() -> None:
    controller = PrecopyController(PrecopyPolicy(downtime_limit=0.001, auto_converge=True))
    throttles = [controller.after_round(round_of(i, 1000, 900), elapsed=i).throttle for i in range(8)]
    # QEMU: two rounds dirtying more than half of what was sent trigger 20 %, then +10 % per two rounds.
    assert throttles == pytest.approx([0, 0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.5])


def test_a_converging_guest_is_not_throttled() -> None:
    controller = PrecopyController(PrecopyPolicy(downtime_limit=0.001, auto_converge=True))
    for i in range(6):
        assert controller.after_round(round_of(i, 1000, 300), elapsed=i).throttle == 0


def test_the_throttle_stops_at_its_maximum() -> None:
    controller = PrecopyController(PrecopyPolicy(downtime_limit=0.001, auto_converge=True, throttle_max=0.5))
    for i in range(30):
        decision = controller.after_round(round_of(i, 1000, 999), elapsed=i)
    assert decision.throttle == 0.5


def test_dirty_limit_switches_on_with_the_same_trigger() -> None:
    controller = PrecopyController(PrecopyPolicy(downtime_limit=0.001, dirty_limit=1000))
    flags = [controller.after_round(round_of(i, 1000, 900), elapsed=i).dirty_limited for i in range(3)]
    assert flags == [False, True, True]
    assert controller.throttle == 0


def test_a_bandwidth_cap_bounds_the_expected_downtime() -> None:
    controller = PrecopyController(PrecopyPolicy(downtime_limit=0.01, bandwidth=4096 * 1000))
    # The round went at 100,000 pages/s, but the cap allows only 1,000 pages/s.
    decision = controller.after_round(round_of(0, 100_000, 100, seconds=1.0), elapsed=1.0)
    assert decision.expected_downtime == pytest.approx(0.1)
    assert decision.action is Action.CONTINUE


@pytest.mark.parametrize(("options", "message"), [
    ({"downtime_limit": 0}, "downtime limit must be positive"),
    ({"bandwidth": -1}, "bandwidth must be positive"),
    ({"max_time": 0}, "maximum time must be positive"),
    ({"on_timeout": "wait"}, "choose 'cancel' or 'force'"),
    ({"dirty_limit": 0}, "dirty limit must be a positive"),
])
def test_bad_policies_name_the_problem(options: dict[str, object], message: str) -> None:
    with pytest.raises(MigrationError, match=message):
        PrecopyPolicy(**options)  # type: ignore[arg-type]


def test_throughput_leaves_the_setup_out_as_qemu_does() -> None:
    stats = MigrationStats(transferred=3_000_000_000, total_time=4.0, setup_time=1.0)
    assert stats.throughput == pytest.approx(1e9)
    assert stats.as_dict()["ram"]["mbps"] == pytest.approx(8000.0)
    assert MigrationStats(transferred=10, total_time=1.0, setup_time=1.0).throughput == 0.0


def test_an_infinite_expected_downtime_is_null_in_json() -> None:
    """Before any page rate is known the expected downtime is infinite: JSON (and so QMP) carries it as null, never
    as a float JSON does not have (a QMP answer holding one was an internal error)."""
    controller = PrecopyController(PrecopyPolicy())
    assert controller.expected_downtime(100) == float("inf")
    stats = MigrationStats(expected_downtime=controller.expected_downtime(100))
    record = stats.as_dict()
    assert record["expected_downtime_ms"] is None
    json.dumps(record, allow_nan=False)  # raises on inf or NaN
    assert ms(0.0125) == 12.5 and ms(None) is None and ms(float("nan")) is None
