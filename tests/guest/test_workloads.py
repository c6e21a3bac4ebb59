"""Every workload writes exactly the pages of its area on real KVM, and nothing outside it changes."""

from __future__ import annotations

import numpy as np
import pytest

from dirtylog.guest.machine import Machine
from dirtylog.guest.programs import ControlBlock
from dirtylog.guest.x86 import control_block_addr
from dirtylog.units import PAGE_SIZE
from tests.helpers import wait_for

pytestmark = pytest.mark.kvm


def first_words(machine: Machine) -> np.ndarray:
    """The first 8 bytes of every guest page, as u64."""
    return machine.memory.reshape(-1, PAGE_SIZE)[:, :8].copy().view(np.uint64)[:, 0]


def outside_changes(machine: Machine, before: np.ndarray) -> set[int]:
    """Pages outside the workload area whose bytes changed, except the control blocks."""
    pages = machine.memory.reshape(-1, PAGE_SIZE)
    area = machine.workload_pages
    changed = np.flatnonzero((pages[: area.start] != before[: area.start]).any(axis=1))
    control = {control_block_addr(v) // PAGE_SIZE for v in range(machine.spec.vcpus)}
    return set(changed.tolist()) - control


@pytest.mark.parametrize("workload", ["sequential", "random", "hotset", "stamp"])
def test_workload_writes_every_page_of_its_area_and_nothing_else(workload: str) -> None:
    with Machine("32M", vcpus=2, workload=workload, prefault=True) as machine:
        before = machine.memory.reshape(-1, PAGE_SIZE).copy()
        area = machine.workload_pages
        machine.start()
        # Enough writes that every page is hit with near certainty: 40 per page (e^-40 to miss one);
        # hotset sends only 10 % of its writes to the whole share, so it needs ten times as many. Counted
        # per vCPU, each over its own share: a fast vCPU alone must not satisfy the count for a late one.
        per_page = 400 if workload == "hotset" else 40
        wait_for(lambda: min(machine.vcpu_progress) > per_page * len(area), what=f"{workload} to cover its area")
        machine.pause()
        stamps = first_words(machine)
        assert np.all(stamps[area.start:area.stop] != 0), "a page of the area was never written"
        assert outside_changes(machine, before) == set()
        assert np.all(machine.memory[area.stop * PAGE_SIZE:] == 0)


def test_sequential_writes_each_share_in_order() -> None:
    """Page i of a vCPU's share holds that vCPU's progress at a write to page i: i modulo the share."""
    with Machine("32M", vcpus=2, workload="sequential", prefault=True) as machine:
        machine.start()
        wait_for(lambda: min(machine.iterations) >= 3, what="three passes")
        machine.pause()
        values = first_words(machine)
        for vcpu in range(2):
            share = machine.spec.share(vcpu)
            offsets = values[share.start:share.stop] % np.uint64(len(share))
            assert np.array_equal(offsets, np.arange(len(share), dtype=np.uint64))


def test_stamp_pages_hold_iterations_of_their_own_vcpu() -> None:
    with Machine("32M", vcpus=2, workload="stamp", writes_per_iteration=64, prefault=True) as machine:
        reported: list[tuple[int, int]] = []
        machine.on_iteration = lambda vcpu, iteration: reported.append((vcpu, iteration))
        machine.start()
        wait_for(lambda: min(machine.iterations) >= 50, what="50 stamp iterations")
        machine.pause()
        stamps = first_words(machine)
        for vcpu in range(2):
            share = machine.spec.share(vcpu)
            mine = stamps[share.start:share.stop]
            assert mine.max() <= machine.iterations[vcpu] + 1
            assert np.count_nonzero(mine) > 0
        # Each finished iteration reached the host, in order, per vCPU.
        for vcpu in range(2):
            numbers = [i for v, i in reported if v == vcpu]
            assert numbers == list(range(1, len(numbers) + 1))
            assert len(numbers) >= 50


def test_idle_writes_nothing() -> None:
    with Machine("32M", vcpus=2, workload="idle") as machine:
        before = machine.memory.reshape(-1, PAGE_SIZE).copy()
        machine.start()
        import time

        time.sleep(0.3)
        machine.pause()
        assert machine.progress == 0
        assert outside_changes(machine, before) == set()
        area = machine.workload_pages
        assert np.all(machine.memory[area.start * PAGE_SIZE:] == 0)


@pytest.mark.timing
def test_rate_limit_holds_the_guest_to_its_rate() -> None:
    import time

    with Machine("32M", vcpus=2, workload="random", rate=2000) as machine:
        machine.start()
        wait_for(lambda: machine.progress > 0, what="first writes")
        start, first = time.perf_counter(), machine.vcpu_progress
        time.sleep(1.0)
        elapsed, last = time.perf_counter() - start, machine.vcpu_progress
        rates = [(b - a) / elapsed for a, b in zip(first, last, strict=True)]
        assert all(1700 < rate < 2300 for rate in rates), rates


def test_progress_counter_lives_in_guest_memory() -> None:
    with Machine("32M", vcpus=1, workload="random") as machine:
        machine.start()
        wait_for(lambda: machine.progress > 1000, what="progress")
        machine.pause()
        assert machine.progress == machine.control(0, ControlBlock.PROGRESS)
        # R10 is the register the program counts in; it publishes R10 the instruction after incrementing it,
        # so a pause may land between the two (seen in 1 of 10 runs here).
        assert machine.saved_regs(0).r10 - machine.progress in (0, 1)
