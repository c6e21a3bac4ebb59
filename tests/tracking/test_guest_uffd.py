"""The uffd dirty-log mode on real KVM: guest writes are seen, and so are host writes KVM's log misses."""

from __future__ import annotations

import time

import numpy as np
import pytest

from dirtylog.machine import Machine
from dirtylog.tracking.base import TrackingError
from dirtylog.tracking.verify import StampVerifier
from dirtylog.units import PAGE_SIZE


@pytest.mark.kvm
def test_a_host_write_kvm_misses_is_caught_and_guest_writes_are_seen() -> None:
    with Machine("64M", vcpus=1, workload="idle") as machine:
        kvm_log = machine.dirty_log("log")
        uffd = machine.dirty_log("uffd")
        machine.start()
        kvm_log.enable()
        uffd.enable()
        kvm_log.collect()
        uffd.collect()
        page = machine.workload_pages.start + 100
        machine.memory[page * PAGE_SIZE + 8] = 0xAA  # the host writes guest RAM through the raw view
        machine.write((page + 1) * PAGE_SIZE, b"recorded")  # ... and once the recorded way
        missed, caught = kvm_log.collect(), uffd.collect()
        assert page not in missed and page + 1 in missed  # KVM only knows the write the VMM recorded
        assert page in caught and page + 1 in caught
        assert uffd.collect().count() == 0  # protected again
        kvm_log.disable()
        uffd.disable()


@pytest.mark.kvm
def test_every_page_the_guest_changes_is_in_the_uffd_log() -> None:
    with Machine("64M", vcpus=2, workload="random", rate=50_000, prefault=True) as machine:
        tracker = machine.dirty_log("uffd")
        machine.start()
        tracker.enable()
        for _ in range(4):
            machine.pause()
            tracker.collect()
            before = machine.memory.reshape(-1, PAGE_SIZE).copy()
            machine.resume()
            time.sleep(0.03)
            machine.pause()
            reported = tracker.collect().pages()
            changed = np.flatnonzero((machine.memory.reshape(-1, PAGE_SIZE) != before).any(axis=1))
            assert changed.size > 100
            assert np.setdiff1d(changed, reported).size == 0, "a changed page is missing from the uffd log"
            machine.resume()
        tracker.disable()


@pytest.mark.kvm
def test_the_stamp_proof_holds_for_the_uffd_mode() -> None:
    with Machine("64M", vcpus=2, workload="stamp", writes_per_iteration=64) as machine:
        tracker = machine.dirty_log("uffd")
        verifier = StampVerifier(machine)
        machine.start()
        verifier.enable(tracker)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            verifier.collect(tracker)
            time.sleep(0.005)
        machine.pause()
        verifier.collect(tracker)
        verifier.collect(tracker)
        tracker.disable()
    report = verifier.report
    assert report.ok, [v.describe() for v in report.violations[:5]]
    assert report.changes_seen > 1000 and report.over_reported <= 0.01 * report.pages_reported


@pytest.mark.kvm
def test_the_uffd_mode_takes_no_slots() -> None:
    with Machine("64M", vcpus=1, workload="idle") as machine, pytest.raises(TrackingError, match="takes no slots"):
        machine.dirty_log("uffd", slots=[0])
