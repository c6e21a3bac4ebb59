"""Live snapshots on real KVM: memory as it was at the call while the guest keeps running, every dirty-log mode,
and host threads writing guest memory meanwhile."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from dirtylog.guest.arch import ControlBlock
from dirtylog.machine import Machine
from dirtylog.snapshot.errors import SnapshotError
from dirtylog.units import PAGE_SIZE
from tests.helpers import wait_for
from tests.snapshot.helpers import first_differences, held_pages, paused_memory, restored_memory

pytestmark = pytest.mark.kvm


def stamps(memory: np.ndarray) -> np.ndarray:
    """The first u64 of every page: where the stamp workload writes its iteration number."""
    return memory.reshape(-1, PAGE_SIZE)[:, :8].copy().view(np.uint64).ravel()


@pytest.mark.parametrize("mode", ["log", "clear", "ring"])
def test_a_live_snapshot_holds_memory_as_it_was_when_it_was_called(tmp_path: Path, mode: str) -> None:
    with Machine("256M", 2, "stamp", rate=40000, writes_per_iteration=64, dirty_ring=mode == "ring") as machine:
        machine.start()
        wait_for(lambda: min(machine.iterations) > 20, what="stamp iterations")
        base = machine.snapshot(tmp_path / "base.dlsnap", mode=mode)
        wait_for(lambda: min(machine.iterations) > 40, what="stamp iterations")
        live = machine.snapshot(tmp_path / "live.dlsnap", base, live=True)
        assert live.live and live.pause_seconds < live.seconds
        # What the guest wrote while and after the live snapshot was written: the next layer's pages.
        current = paused_memory(machine)
        after = machine.snapshot(tmp_path / "after.dlsnap", live)
        areas = [machine.spec.share(vcpu) for vcpu in range(2)]
        blocks = [machine.control_block_addr(vcpu) for vcpu in range(2)]
    restored = restored_memory(live.path)
    since = held_pages(after.path)
    untouched = np.ones(restored.size // PAGE_SIZE, dtype=bool)
    untouched[since] = False
    pages, now = restored.reshape(-1, PAGE_SIZE), current.reshape(-1, PAGE_SIZE)
    # Pages nobody wrote since the call are what they are now ...
    assert np.array_equal(pages[untouched], now[untouched]), first_differences(restored, current)
    # ... and no page holds a stamp newer than the iteration each vCPU was in at the call, though the guest
    # went on stamping newer ones while the snapshot was written.
    then_stamps, now_stamps = stamps(restored), stamps(current)
    for area, block in zip(areas, blocks, strict=True):
        at_call = int(restored[block + ControlBlock.ITERATION:block + ControlBlock.ITERATION + 8].view(np.uint64)[0])
        later = int(current[block + ControlBlock.ITERATION:block + ControlBlock.ITERATION + 8].view(np.uint64)[0])
        assert later > at_call + 1, "the guest did not run while the snapshot was written"
        share = slice(area.start, area.stop)
        assert then_stamps[share].max() <= at_call + 1
        assert now_stamps[share].max() > at_call + 1
    assert np.array_equal(restored_memory(after.path), current)


def test_a_live_full_snapshot_restores_and_runs(tmp_path: Path) -> None:
    with Machine("128M", 2, "random", rate=30000) as machine:
        machine.start()
        wait_for(lambda: machine.progress > 3000, what="guest writes")
        snap = machine.snapshot(tmp_path / "live.dlsnap", live=True)
        assert snap.kind == "full" and snap.pages == machine.ram.npages
    with Machine.restore(snap.path) as restored:
        saved = restored.vcpu_progress
        wait_for(lambda: restored.progress > sum(saved) + 1000, what="the restored guest writing")
        assert restored.wait_restored(30) is not None


def test_a_python_thread_may_write_guest_memory_during_a_live_snapshot(tmp_path: Path) -> None:
    """A host thread that writes write-protected guest RAM waits in a page fault holding the GIL; the save loop
    needs no GIL, so it saves the page and lets the writer go (a Python loop would deadlock here)."""
    with Machine("128M", 1, "random", rate=20000) as machine:
        machine.start()
        base = machine.snapshot(tmp_path / "base.dlsnap")
        page = machine.spec.pages[-3]
        stop = threading.Event()
        writes = [0]

        def write() -> None:
            while not stop.is_set():
                machine.write(page * PAGE_SIZE, np.full(64, writes[0] % 250 + 1, dtype=np.uint8))
                writes[0] += 1

        writer = threading.Thread(target=write, daemon=True)
        writer.start()
        wait_for(lambda: writes[0] > 10, what="host writes")
        live = machine.snapshot(tmp_path / "live.dlsnap", base, live=True)
        stop.set()
        writer.join(10)
        assert not writer.is_alive()
        reference = paused_memory(machine)
        after = machine.snapshot(tmp_path / "after.dlsnap", live)
    assert page in held_pages(after.path)
    assert np.array_equal(restored_memory(after.path), reference)


def test_a_live_snapshot_is_refused_on_a_uffd_chain(tmp_path: Path) -> None:
    with Machine("64M", 1, "idle") as machine:
        machine.start()
        base = machine.snapshot(tmp_path / "base.dlsnap", mode="uffd")
        with pytest.raises(SnapshotError, match="mode log, clear or ring"):
            machine.snapshot(tmp_path / "live.dlsnap", base, live=True)
        assert not (tmp_path / "live.dlsnap").exists()
        assert machine.snapshot(tmp_path / "again.dlsnap", base).kind == "incremental"
