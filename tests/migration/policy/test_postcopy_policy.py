"""Post-copy as pure code: when the controller switches to it, and the fault statistics QEMU names, replayed
from made-up histories."""

from __future__ import annotations

import pytest

from dirtylog.migration.errors import MigrationError, MigrationParameterError
from dirtylog.migration.policy.parameters import MigrationParameters
from dirtylog.migration.policy.postcopy import BUCKETS, FaultStats
from dirtylog.migration.policy.precopy import Action, PrecopyController, PrecopyPolicy, RoundStats
from dirtylog.migration.policy.stats import MigrationStats, MigrationStatus


def round_of(index: int, pages: int, dirty: int, seconds: float = 1.0) -> RoundStats:
    return RoundStats(index, float(index), seconds, pages, 0, pages * 4096, dirty, 0.0, False)


def test_postcopy_after_n_rounds_or_at_once() -> None:
    assert PrecopyController(PrecopyPolicy(postcopy=True, postcopy_after=0)).before_rounds() is not None
    assert PrecopyController(PrecopyPolicy(postcopy=True, postcopy_after=2)).before_rounds() is None
    controller = PrecopyController(PrecopyPolicy(downtime_limit=0.001, postcopy=True, postcopy_after=2))
    assert controller.after_round(round_of(0, 1000, 100), elapsed=1).action is Action.CONTINUE
    decision = controller.after_round(round_of(1, 100, 90), elapsed=2)
    assert decision.action is Action.POSTCOPY and decision.reason == "post-copy after 2 rounds of pre-copy"


def test_a_migration_that_converges_still_finishes_by_precopy() -> None:
    controller = PrecopyController(PrecopyPolicy(downtime_limit=0.05, postcopy=True, postcopy_after=1))
    assert controller.after_round(round_of(0, 100_000, 10), elapsed=1).action is Action.SWITCHOVER


def test_without_a_count_postcopy_starts_when_precopy_stops_converging() -> None:
    controller = PrecopyController(PrecopyPolicy(downtime_limit=0.001, postcopy=True, auto_converge=True))
    assert controller.after_round(round_of(0, 1000, 900), elapsed=1).action is Action.CONTINUE  # one high round
    assert controller.throttle == 0  # no throttle yet: with post-copy, the second high round switches instead
    decision = controller.after_round(round_of(1, 900, 800), elapsed=2)
    assert decision.action is Action.POSTCOPY and "not converging" in decision.reason
    assert controller.throttle == 0


def test_a_low_round_does_not_count_toward_postcopy() -> None:
    controller = PrecopyController(PrecopyPolicy(downtime_limit=0.001, postcopy=True))
    assert controller.after_round(round_of(0, 1000, 900), elapsed=1).action is Action.CONTINUE
    assert controller.after_round(round_of(1, 1000, 10), elapsed=2).action is Action.CONTINUE  # converging
    assert controller.after_round(round_of(2, 1000, 900), elapsed=3).action is Action.POSTCOPY  # two high rounds


def test_the_operator_and_the_time_limit_start_postcopy() -> None:
    controller = PrecopyController(PrecopyPolicy(downtime_limit=0.001, postcopy=True, postcopy_after=99))
    assert controller.after_round(round_of(0, 1000, 100), elapsed=1, start_postcopy=True).action is Action.POSTCOPY
    limited = PrecopyController(PrecopyPolicy(downtime_limit=0.001, postcopy=True, postcopy_after=99, max_time=1))
    decision = limited.after_round(round_of(0, 1000, 100), elapsed=2)
    assert decision.action is Action.POSTCOPY and "time limit" in decision.reason
    asked_only = PrecopyController(PrecopyPolicy(downtime_limit=0.001, postcopy=True, postcopy_on_request=True,
                                                 max_time=1))
    for index in range(3):  # never converging, past its time limit: it goes on until asked (or cancels, as before)
        decision = asked_only.after_round(round_of(index, 1000, 900), elapsed=0.5)
        assert decision.action is Action.CONTINUE
    assert asked_only.after_round(round_of(3, 1000, 900), elapsed=2).action is Action.CANCEL
    plain = PrecopyController(PrecopyPolicy(downtime_limit=0.001))
    assert plain.after_round(round_of(0, 1000, 100), elapsed=1, start_postcopy=True).action is Action.CONTINUE


@pytest.mark.parametrize(("changes", "match"), [
    ({"postcopy_after": 1}, r"only with postcopy=True"),
    ({"postcopy": True, "postcopy_after": -1}, r"a number of rounds"),
    ({"postcopy": True, "streams": 2}, r"post-copy runs on one stream"),
    ({"resume_timeout": 0}, r"resume timeout must be positive"),
])
def test_bad_postcopy_parameters_are_refused(changes: dict[str, object], match: str) -> None:
    with pytest.raises(MigrationParameterError, match=match):
        MigrationParameters.parse(**changes)  # type: ignore[arg-type]
    assert issubclass(MigrationParameterError, MigrationError)


def test_resume_timeout_takes_people_units() -> None:
    assert MigrationParameters.parse(postcopy=True, resume_timeout="2m").resume_timeout == 120


# -- fault statistics ------------------------------------------------------------------------------------


def test_latency_and_its_histogram_in_power_of_two_microseconds() -> None:
    stats = FaultStats(vcpus=2, start=10.0)
    stats.fault(page=7, vcpu=0, at=10.0)
    stats.fault(page=9, vcpu=1, at=10.0)
    stats.installed([7], at=10.0003)  # 300 us: bucket 8, [256, 512)
    stats.installed([9], at=10.00005)  # 50 us: bucket 5, [32, 64)
    assert stats.histogram[8] == 1 and stats.histogram[5] == 1 and sum(stats.histogram) == 2
    assert len(stats.histogram) == BUCKETS == 24
    assert stats.mean_latency == pytest.approx(175e-6)
    assert stats.vcpu_latency == pytest.approx([300e-6, 50e-6])
    assert stats.resolved == 2 and stats.fault_times == [0.0, 0.0]
    qmp = stats.as_qmp()
    assert qmp["postcopy-latency"] == 175_000 and qmp["postcopy-vcpu-latency"] == [300_000, 50_000]
    assert qmp["postcopy-latency-dist"][8] == 1


def test_blocktime_per_vcpu_and_when_all_were_blocked() -> None:
    stats = FaultStats(vcpus=2)
    stats.fault(page=1, vcpu=0, at=0.0)
    stats.fault(page=2, vcpu=1, at=1.0)  # both blocked from 1.0
    stats.installed([1], at=3.0)  # vCPU 0 waited 3 s; both were blocked 1.0..3.0
    stats.installed([2], at=4.0)  # vCPU 1 waited 3 s
    assert stats.vcpu_blocktime == pytest.approx([3.0, 3.0])
    assert stats.blocktime == pytest.approx(2.0)
    assert stats.as_qmp()["postcopy-blocktime"] == 2000


def test_two_vcpus_on_one_page_and_a_repeated_fault() -> None:
    stats = FaultStats(vcpus=2)
    stats.fault(page=5, vcpu=0, at=0.0)
    stats.fault(page=5, vcpu=0, at=0.5)  # kicked out of its wait by a pause, it faults again: not a new fault
    stats.fault(page=5, vcpu=1, at=1.0)
    assert stats.faults == 2 and stats.waiting(5) and stats.pages_waited_for == [5]
    stats.installed([5], at=2.0)
    assert stats.vcpu_blocktime == pytest.approx([2.0, 1.0]) and not stats.waiting(5)


def test_other_threads_and_zero_pages_are_counted_apart() -> None:
    stats = FaultStats(vcpus=1)
    stats.fault(page=3, vcpu=None, at=0.0)
    stats.installed([3], at=0.001)
    stats.zero_fault()
    assert stats.non_vcpu_latency == pytest.approx(0.001) and stats.resolved == 0 and stats.zero_faults == 1
    assert stats.mean_latency == 0 and stats.as_qmp()["postcopy-non-vcpu-latency"] == 1_000_000


def test_extreme_latencies_land_in_the_end_buckets_and_the_median_is_read_from_the_histogram() -> None:
    stats = FaultStats(vcpus=1)
    for page, latency in enumerate((1e-7, 100.0, 150e-6, 160e-6, 170e-6)):
        stats.fault(page=page, vcpu=0, at=0.0)
        stats.installed([page], at=latency)
    assert stats.histogram[0] == 1 and stats.histogram[-1] == 1 and stats.histogram[7] == 3
    assert 128e-6 < stats.median_latency() < 256e-6


def test_exact_percentiles_of_the_latencies_not_the_buckets() -> None:
    stats = FaultStats(vcpus=1)
    assert stats.latency_percentile(50) == 0.0
    for page, latency in enumerate((70e-6, 90e-6, 110e-6, 120e-6, 1e-3)):  # all but one in buckets 6 and 7
        stats.fault(page=page, vcpu=0, at=1.0)
        stats.installed([page], at=1.0 + latency)
    assert stats.latency_percentile(50) == pytest.approx(110e-6)
    assert stats.latency_percentile(0) == pytest.approx(70e-6) and stats.latency_percentile(100) == pytest.approx(1e-3)
    assert stats.latency_percentile(90) == pytest.approx(120e-6 + 0.6 * (1e-3 - 120e-6))
    shown = stats.as_dict()
    assert shown["postcopy_latency_p50_us"] == 110.0 and shown["postcopy_latency_p99_us"] == pytest.approx(964.8)


def test_faults_over_time() -> None:
    stats = FaultStats(vcpus=1, start=5.0)
    for page, at in enumerate((5.001, 5.002, 5.025)):
        stats.fault(page=page, vcpu=None, at=at)
    assert stats.timeline(0.01) == ([0.0, 0.01, 0.02], [2, 0, 1])
    assert FaultStats(vcpus=1).timeline(0.01) == ([], [])


def test_statistics_say_postcopy_in_qemus_words() -> None:
    stats = MigrationStats(postcopy=True, postcopy_pending=10, pages_pushed=7, pages_requested=3,
                           postcopy_requests=2, faults=FaultStats(vcpus=1))
    shown = stats.as_dict()["postcopy"]
    assert shown["pages_pushed"] == 7 and shown["pages_requested"] == 3 and shown["postcopy_requests"] == 2
    assert "postcopy_latency_dist" in shown and shown["faults"] == 0
    assert MigrationStats().as_dict()["postcopy"] is None
    assert MigrationStatus.POSTCOPY_PAUSED.value == "postcopy-paused"
