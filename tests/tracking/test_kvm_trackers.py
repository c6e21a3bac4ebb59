"""The KVM tracker modes as a user drives them: slots, host writes, toggling, and every error."""

from __future__ import annotations

import time

import numpy as np
import pytest

from dirtylog.guest.machine import MachineError
from dirtylog.guest.x86 import CODE_ADDR
from dirtylog.kvm import abi
from dirtylog.kvm.errors import DirtyLogRangeError, KvmCapabilityError, LoggingNotEnabledError, NoSuchSlotError
from dirtylog.machine import Machine
from dirtylog.tracking.base import TrackingError
from dirtylog.units import PAGE_SIZE
from tests.helpers import wait_for

pytestmark = pytest.mark.kvm


@pytest.mark.parametrize("mode", ["log", "clear", "ring"])
def test_pages_are_guest_physical_across_slots(mode: str) -> None:
    with Machine("64M", vcpus=2, workload="sequential", slots=3, prefault=True) as machine:
        tracker = machine.dirty_log(mode)  # type: ignore[arg-type]
        machine.start()
        tracker.enable()
        wait_for(lambda: min(machine.iterations) >= 2, what="two passes")
        machine.pause()
        tracker.collect()
        passes = machine.iterations
        machine.resume()
        wait_for(lambda: all(now >= then + 2 for now, then in zip(machine.iterations, passes, strict=True)),
                 what="two more passes of every vCPU")
        pages = tracker.collect().pages()
        tracker.disable()
    area = machine.workload_pages
    assert pages.dtype == np.uint64 and np.all(np.diff(pages.astype(np.int64)) > 0)
    in_area = pages[(pages >= area.start) & (pages < area.stop)]
    assert in_area.size == len(area)  # a full pass covers all three slots
    for slot in machine.vm.slots.values():
        mine = pages[(pages >= slot.base_gfn) & (pages < slot.base_gfn + slot.npages)]
        assert mine.size > 0


@pytest.mark.parametrize("mode", ["log", "clear", "ring"])
def test_logging_switches_per_slot_while_vcpus_run(mode: str) -> None:
    with Machine("64M", vcpus=2, workload="random", slots=2, prefault=True) as machine:
        tracker = machine.dirty_log(mode)  # type: ignore[arg-type]
        machine.start()
        tracker.enable()
        slot1 = machine.vm.slots[1]
        in_slot1 = lambda pages: pages[(pages >= slot1.base_gfn)]  # noqa: E731
        time.sleep(0.05)
        assert in_slot1(tracker.collect().pages()).size > 0
        tracker.set_logging(1, False)  # type: ignore[attr-defined]
        tracker.collect()
        time.sleep(0.05)
        assert in_slot1(tracker.collect().pages()).size == 0
        tracker.set_logging(1, True)  # type: ignore[attr-defined]
        time.sleep(0.05)
        assert in_slot1(tracker.collect().pages()).size > 0
        tracker.disable()


@pytest.mark.parametrize("mode", ["log", "clear", "ring"])
def test_host_writes_are_in_the_next_collection(mode: str) -> None:
    with Machine("64M", vcpus=1, workload="idle") as machine:
        tracker = machine.dirty_log(mode)  # type: ignore[arg-type]
        machine.start()
        tracker.enable()
        tracker.collect()
        target = (machine.workload_pages.start + 100) * PAGE_SIZE
        machine.write(target - 8, b"x" * 16)  # straddles two pages
        # Besides them KVM may report the idle loop's code page, which the vCPU only reads (PVM's shadow
        # MMU does it in about one run in four here: see docs/dirty-logging.md, "over-reporting").
        code_page = {CODE_ADDR // PAGE_SIZE}
        pages = set(tracker.collect().pages().tolist())
        assert pages - code_page == {target // PAGE_SIZE - 1, target // PAGE_SIZE}
        assert set(tracker.collect().pages().tolist()) <= code_page
        tracker.disable()


def test_initially_set_reports_everything_first_then_only_writes() -> None:
    with Machine("64M", vcpus=1, workload="idle") as machine:
        tracker = machine.dirty_log("clear", initially_set=True)
        machine.start()
        tracker.enable()
        assert tracker.collect().count() == machine.ram.npages
        # Nothing is written now; KVM may still report the idle loop's code page, which the vCPU reads
        # (see docs/dirty-logging.md, "over-reporting").
        assert set(tracker.collect().pages().tolist()) <= {CODE_ADDR // PAGE_SIZE}
        tracker.disable()


def test_clear_mode_clears_only_chunks_with_dirty_pages() -> None:
    with Machine("64M", vcpus=1, workload="random", rate=200) as machine:
        tracker = machine.dirty_log("clear", clear_chunk_pages=1024)
        machine.start()
        tracker.enable()
        for _ in range(5):
            calls = tracker.clear_calls  # type: ignore[attr-defined]
            time.sleep(0.02)
            pages = tracker.collect().pages()
            chunks = np.unique(pages // 1024)
            assert 0 < chunks.size < 16
            assert tracker.clear_calls - calls == chunks.size  # type: ignore[attr-defined]
        tracker.disable()


def test_ring_mode_must_be_chosen_before_start() -> None:
    with Machine("32M", vcpus=1, workload="idle") as machine:
        machine.start()
        with pytest.raises(MachineError, match=r"call dirty_log\('ring'\) before start\(\)"):
            machine.dirty_log("ring")


def test_ring_size_must_be_a_power_of_two_within_the_host_limit() -> None:
    with Machine("32M", vcpus=1, workload="idle") as machine, \
            pytest.raises(KvmCapabilityError, match="must be a power of two"):
        machine.dirty_log("ring", ring_entries=1000)


def test_only_one_tracker_logs_at_a_time() -> None:
    with Machine("32M", vcpus=1, workload="idle") as machine:
        first = machine.dirty_log("log")
        first.enable()
        with pytest.raises(MachineError, match="already has an enabled 'log' tracker"):
            machine.dirty_log("clear").enable()
        first.disable()
        second = machine.dirty_log("clear")
        second.enable()
        second.disable()


def test_collect_before_enable_says_so() -> None:
    with Machine("32M", vcpus=1, workload="idle") as machine, \
            pytest.raises(TrackingError, match="not enabled; call enable"):
        machine.dirty_log("log").collect()


class TestKernelErrors:
    """The seed patch's error semantics, as named exceptions that name the slot and the valid choice."""

    def test_a_slot_that_does_not_exist(self) -> None:
        with Machine("32M", vcpus=1, workload="idle") as machine:
            words = np.zeros(1024, dtype=np.uint64)
            with pytest.raises(NoSuchSlotError, match=r"memory slot 7 does not exist \(ENOENT\).*slots are \[0\]"):
                machine.vm.get_dirty_log(7, words)
            with pytest.raises(NoSuchSlotError, match=r"slot 40000 is not a valid slot \(EINVAL\)"):
                machine.vm.get_dirty_log(40000, words)

    def test_a_slot_without_logging(self) -> None:
        with Machine("32M", vcpus=1, workload="idle") as machine:
            words = np.zeros(1024, dtype=np.uint64)
            with pytest.raises(LoggingNotEnabledError, match="not enabled on memory slot 0 \\(ENOENT\\)"):
                machine.vm.get_dirty_log(0, words)

    def test_a_misaligned_clear_range(self) -> None:
        with Machine("32M", vcpus=1, workload="idle") as machine:
            machine.vm.enable_manual_protect()
            machine.vm.set_slot_flags(0, abi.KVM_MEM_LOG_DIRTY_PAGES)
            words = np.zeros(1024, dtype=np.uint64)
            with pytest.raises(DirtyLogRangeError, match="first_page 3 is not a multiple of 64; use 0"):
                machine.vm.clear_dirty_log(0, 3, 64, words)
            with pytest.raises(DirtyLogRangeError, match=r"num_pages 100 .* use 64 or 8192"):
                machine.vm.clear_dirty_log(0, 0, 100, words)
            machine.vm.clear_dirty_log(0, 8192 - 64, 64, words)  # the last word of the slot: allowed
