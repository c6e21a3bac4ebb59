"""The QEMU side-by-side harness (bench/qemu_guest.py): its image, and a real QEMU/KVM guest running our
workload with RAM shared, so that the replayed truth holds there too. Skips, saying why, without QEMU."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from qemu_guest import (
    IMAGE_ADDR,
    MULTIBOOT_MAGIC,
    QemuError,
    QemuGuest,
    build_image,
    migrate,
    page_tables,
    qemu_unavailable_reason,
)

from dirtylog.guest.x86 import WORKLOAD_ADDR
from dirtylog.rate.truth import Reading, Truth
from dirtylog.units import PAGE_SIZE
from dirtylog.workload import WorkloadSpec

needs_qemu = pytest.mark.skipif(qemu_unavailable_reason() is not None,
                                reason=f"QEMU guest unavailable: {qemu_unavailable_reason()}")


def test_image_is_multiboot_and_maps_ram_file_offsets_around_the_pci_hole() -> None:
    spec = WorkloadSpec("random", 512, 3 * 262144 - 512, 2, 1000)
    image = build_image(3 << 30, spec, 2_000_000_000)
    header = np.frombuffer(image[:32], dtype="<u4")
    assert header[0] == MULTIBOOT_MAGIC and (int(header[0]) + int(header[1]) + int(header[2])) & 0xFFFFFFFF == 0
    assert header[5] == IMAGE_ADDR + len(image)
    directories = next(t for a, t in page_tables(3 << 30).items() if t.size > 512)
    physical = (directories[:1536] & np.uint64(~0xFFF & (2**64 - 1))).astype(np.int64)
    assert physical[0] == 0 and physical[1023] == (2 << 30) - (2 << 20)  # below max-ram-below-4g: identity
    assert physical[1024] == 4 << 30  # the next 2 MiB of the RAM file sits at 4 GiB


def test_a_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(QemuError, match="apt-get install -y qemu-system-x86"):
        QemuGuest("64M", 1, "random")


@pytest.mark.kvm
@needs_qemu
def test_qemu_runs_our_workload_and_the_truth_holds_there() -> None:
    with QemuGuest("256M", 2, "random", 20000) as guest:
        assert all(p > 0 for p in guest.vcpu_progress)
        truth = Truth(guest.words, "random", 2, guest.npages)
        assert guest.qmp is not None
        guest.qmp("stop")
        start, before = truth.read(), guest.memory.copy()
        guest.qmp("cont")
        time.sleep(0.2)
        guest.qmp("stop")
        end, after = truth.read(), guest.memory.copy()
        guest.qmp("cont")
        changed = np.flatnonzero((before.reshape(-1, PAGE_SIZE) != after.reshape(-1, PAGE_SIZE)).any(axis=1))
        replayed = truth.pages(start, end).pages().astype(np.int64)
        assert replayed.size > 1000
        # A vCPU stopped between its write and publishing its count leaves that write in flight: at the
        # start, write number `progress` is already in `before` (replayed, unchanged); at the end, the
        # newest write is in `after` (changed, not replayed). Apart from those, only the firmware's
        # kvmclock page (below 1 MiB, updated by KVM itself) may differ.
        next_writes = truth.pages(start, Reading(start.t, tuple(n + 1 for n in start.progress))).pages()
        stray = np.setxor1d(changed, replayed)
        assert stray.size <= 2 * 2 + 1, stray
        assert all(p < 256 or p in changed or p in next_writes for p in stray), (stray, next_writes)
        answer = guest.calc_dirty_rate(1, "page-sampling")
        assert answer["status"] == "measured" and answer["dirty-rate"] > 0


@pytest.mark.kvm
@needs_qemu
def test_an_idle_guest_boots_halts_and_qemu_migrates_it_into_a_waiting_destination() -> None:
    with QemuGuest("256M", 1, "idle") as source:
        assert source.booted == 1  # left the firmware: host writes into guest RAM are safe from here
        marker = slice(WORKLOAD_ADDR, WORKLOAD_ADDR + PAGE_SIZE)
        source.memory[marker] = 0x5A
        with source.destination() as destination:
            assert destination.qmp is not None and destination.qmp("query-status")["status"] == "inmigrate"
            result = migrate(source, destination, downtime_limit_ms=300, max_bandwidth=0)
            assert result.info["status"] == "completed"
            assert result.parameters["downtime-limit"] == 300 and result.parameters["max-bandwidth"] == 0
            assert result.total_ms >= result.downtime_ms >= 0 and result.info["ram"]["transferred"] > 0
            assert result.stop_to_resume_ms is not None and result.stop_to_resume_ms >= 0
            assert destination.qmp("query-status")["status"] == "running"
            assert (destination.memory[marker] == 0x5A).all()


@pytest.mark.kvm
@needs_qemu
def test_a_writing_guest_keeps_writing_after_qemu_migrates_it() -> None:
    with QemuGuest("256M", 2, "random", 20000) as source, source.destination() as destination:
        migrate(source, destination)
        assert source.qmp is not None and source.qmp("query-status")["status"] == "postmigrate"
        arrived = destination.vcpu_progress
        assert sum(arrived) >= source.progress > 0  # the source stopped at the switch-over; its writes came along
        time.sleep(0.3)
        assert all(now > then for now, then in zip(destination.vcpu_progress, arrived, strict=True))


@pytest.mark.kvm
@needs_qemu
def test_migrating_needs_a_started_destination_that_waits_for_one() -> None:
    with QemuGuest("64M", 1, "idle") as source, QemuGuest("64M", 1, "idle") as plain:
        with pytest.raises(QemuError, match="must wait for a migration"):
            migrate(source, plain)
        unstarted = source.destination()
        try:
            with pytest.raises(QemuError, match="start both"):
                migrate(source, unstarted)
        finally:
            unstarted.stop()
