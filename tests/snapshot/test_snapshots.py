"""Full and incremental snapshots of real KVM machines, restored byte for byte: every dirty-log mode, host
writes, a full snapshot resetting the chain, several memory slots, merge, and chains continued after a restore."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dirtylog.machine import Machine
from dirtylog.migration.payload.digest import memory_digest
from dirtylog.snapshot.errors import SnapshotChainError, SnapshotError
from dirtylog.snapshot.layer import Layer
from dirtylog.snapshot.merge import describe, merge
from dirtylog.units import PAGE_SIZE
from tests.helpers import wait_for
from tests.snapshot.helpers import (
    changed_pages,
    first_differences,
    held_pages,
    paused_memory,
    restored_memory,
    wait_progress,
)

pytestmark = pytest.mark.kvm


def test_a_full_snapshot_restores_byte_for_byte_and_the_guest_continues(tmp_path: Path) -> None:
    with Machine("128M", 2, "random", rate=20000) as machine:
        machine.start()
        wait_for(lambda: machine.progress > 2000, what="guest writes")
        reference = paused_memory(machine)
        saved = machine.vcpu_progress
        snap = machine.snapshot(tmp_path / "full.dlsnap")
        assert snap.kind == "full" and snap.parent is None and snap.pause_seconds == 0.0  # it was paused already
        assert snap.pages == machine.ram.npages
    with Layer.open(snap.path) as layer:
        assert layer.meta.digest == memory_digest(reference)
        assert layer.info["vcpu_progress"] == saved
    assert np.array_equal(restored_memory(snap.path), reference)
    with Machine.restore(snap.path) as restored:
        # The guest continues where it stopped: each vCPU's counter rises from its saved value.
        assert [now >= then for now, then in zip(restored.vcpu_progress, saved, strict=True)] == [True, True]
        wait_progress(restored, saved)
        stats = restored.wait_restored(30)
        assert stats is not None and stats.digest_checked and stats.blocks == restored.ram.npages // 64
        assert stats.first_served_seconds is not None and stats.resident_seconds is not None
        assert stats.first_served_seconds <= stats.resident_seconds


def test_zero_pages_cost_nothing_on_disk(tmp_path: Path) -> None:
    with Machine("256M", 1, "idle") as machine:
        machine.start()
        snap = machine.snapshot(tmp_path / "idle.dlsnap")
    # An idle guest wrote page tables, program and control block: a few pages; the rest are holes.
    assert snap.zero_pages > snap.pages - 1000
    assert snap.file_bytes > 256 << 20 and snap.disk_bytes < 8 << 20


@pytest.mark.parametrize("mode", ["log", "clear", "ring", "uffd"])
def test_incremental_layers_hold_every_changed_page_and_restore_each_state(tmp_path: Path, mode: str) -> None:
    with Machine("128M", 2, "hotset", rate=30000, hot_fraction=0.05, dirty_ring=mode == "ring") as machine:
        machine.start()
        references = []
        snaps = []
        for index in range(4):
            wait_for(lambda index=index: machine.progress > 1000 * (index + 1), what="guest writes")
            references.append(paused_memory(machine))
            parent = snaps[-1] if snaps else None
            snaps.append(machine.snapshot(tmp_path / f"{index}.dlsnap", parent, mode=mode if not snaps else None))
            machine.resume()
    assert [s.kind for s in snaps] == ["full", "incremental", "incremental", "incremental"]
    for index in range(1, 4):
        # Every page whose bytes changed since the parent is in the layer (the dirty log lost nothing) ...
        changed = changed_pages(references[index - 1], references[index])
        held = held_pages(snaps[index].path)
        assert np.isin(changed, held).all(), f"layer {index} misses pages {np.setdiff1d(changed, held)[:8]}"
        # ... and the layer is not the whole memory.
        assert held.size < machine.ram.npages // 4
        assert snaps[index].parent == snaps[index - 1].identity
    for index, snap in enumerate(snaps):  # any layer restores its own state
        restored = restored_memory(snap.path)
        assert np.array_equal(restored, references[index]), first_differences(restored, references[index])


@pytest.mark.parametrize("mode", ["log", "clear", "ring"])
def test_host_writes_through_the_machine_are_in_the_next_layer(tmp_path: Path, mode: str) -> None:
    """KVM's log never sees what the host writes; Machine.write records it, and every mode ORs it in."""
    with Machine("64M", 1, "idle", dirty_ring=mode == "ring") as machine:
        machine.start()
        base = machine.snapshot(tmp_path / "base.dlsnap", mode=mode)
        page = machine.spec.pages[100]
        machine.write(page * PAGE_SIZE, b"written by the host, as a device model would")
        layer = machine.snapshot(tmp_path / "layer.dlsnap", base)
        reference = paused_memory(machine)
    assert page in held_pages(layer.path)
    assert np.array_equal(restored_memory(layer.path), reference)


def test_raw_host_writes_are_in_the_next_layer_of_a_uffd_chain(tmp_path: Path) -> None:
    """Writes through a raw view (m.memory), which no bookkeeping records, are seen by the uffd mode."""
    with Machine("64M", 1, "idle") as machine:
        machine.start()
        base = machine.snapshot(tmp_path / "base.dlsnap", mode="uffd")
        page = machine.spec.pages[77]
        machine.memory[page * PAGE_SIZE:page * PAGE_SIZE + 5] = np.frombuffer(b"raw!!", dtype=np.uint8)
        layer = machine.snapshot(tmp_path / "layer.dlsnap", base)
        reference = paused_memory(machine)
    assert page in held_pages(layer.path)
    assert np.array_equal(restored_memory(layer.path), reference)


def test_a_full_snapshot_resets_the_chain(tmp_path: Path) -> None:
    """Firecracker #4543: after a full snapshot, the next layer holds only what was written after it."""
    with Machine("64M", 1, "random", rate=50000) as machine:
        machine.start()
        first = machine.snapshot(tmp_path / "a.dlsnap")
        wait_for(lambda: machine.progress > 3000, what="guest writes")
        machine.snapshot(tmp_path / "b.dlsnap", first)
        machine.pause()
        full = machine.snapshot(tmp_path / "c.dlsnap")  # the guest stays paused from here
        pages = machine.spec.pages
        for page in (pages[1], pages[500], pages[-1]):
            machine.write(page * PAGE_SIZE, b"after the full snapshot")
        layer = machine.snapshot(tmp_path / "d.dlsnap", full)
        reference = machine.memory.copy()
        with pytest.raises(SnapshotChainError, match="not the last snapshot"):
            machine.snapshot(tmp_path / "e.dlsnap", first)  # the dirty log counts from c, not a
    assert held_pages(layer.path).tolist() == [pages[1], pages[500], pages[-1]]
    assert np.array_equal(restored_memory(layer.path), reference)


def test_several_slots_that_end_in_clean_pages_restore_exactly(tmp_path: Path) -> None:
    """Firecracker #5696/#5705: a diff snapshot of a VM with several memory slots, some ending in clean pages."""
    with Machine("96M", 1, "idle", slots=3) as machine:
        machine.start()
        slots = sorted(machine.vm.slots.values(), key=lambda slot: slot.base_gfn)
        first = machine.spec.pages[0]
        base = machine.snapshot(tmp_path / "0.dlsnap")
        references, layers = [], [base]
        writes = [
            [slot.base_gfn + k for slot in slots[1:] for k in range(10)],  # slot starts; their ends stay clean
            [slots[0].base_gfn + slots[0].npages - 1, slots[2].base_gfn, slots[1].base_gfn + slots[1].npages - 1],
            [slots[2].base_gfn + slots[2].npages - 1],  # only the very last page
        ]
        for index, pages in enumerate(writes, 1):
            for page in pages:
                machine.write(page * PAGE_SIZE, np.full(PAGE_SIZE, index + page % 200, dtype=np.uint8))
            layers.append(machine.snapshot(tmp_path / f"{index}.dlsnap", layers[-1]))
            references.append(paused_memory(machine))
            machine.resume()
    for pages, layer, reference in zip(writes, layers[1:], references, strict=True):
        # KVM may over-report the idle loop's code page after logging starts (docs/dirty-logging.md).
        extra = set(held_pages(layer.path).tolist()) - set(pages)
        assert set(pages) <= set(held_pages(layer.path).tolist()) and all(page < first for page in extra)
        restored = restored_memory(layer.path)
        assert np.array_equal(restored, reference), first_differences(restored, reference)


def test_merge_collapses_a_chain_into_a_full_snapshot_of_the_same_state(tmp_path: Path) -> None:
    with Machine("64M", 2, "random", rate=20000) as machine:
        machine.start()
        snaps = [machine.snapshot(tmp_path / "0.dlsnap")]
        for index in (1, 2):
            wait_for(lambda index=index: machine.progress > 2000 * index, what="guest writes")
            snaps.append(machine.snapshot(tmp_path / f"{index}.dlsnap", snaps[-1]))
        wait_for(lambda: machine.progress > 8000, what="guest writes")
        reference = paused_memory(machine)
        after = machine.snapshot(tmp_path / "3.dlsnap", snaps[-1])
    merged = merge(snaps[-1].path, tmp_path / "merged.dlsnap")
    assert merged.layers == 3
    with Layer.open(merged.path) as layer:
        assert layer.full and layer.identity == snaps[-1].identity and layer.info["merged_from"] == [
            "0.dlsnap", "1.dlsnap", "2.dlsnap"]
    assert np.array_equal(restored_memory(merged.path), restored_memory(snaps[-1].path))
    # The merged file stands in for the layers it replaces: the layer taken on the top finds it by identity.
    for snap in snaps:
        snap.path.unlink()
    assert np.array_equal(restored_memory(after.path), reference)
    rows = describe(after.path)
    assert [row["name"] for row in rows] == ["merged.dlsnap", "3.dlsnap"]
    with pytest.raises(SnapshotChainError, match="layer of the chain"):
        merge(after.path, tmp_path / "merged.dlsnap")


def test_describe_says_what_each_layer_holds_and_restores_to(tmp_path: Path) -> None:
    with Machine("64M", 2, "random", rate=10000) as machine:
        machine.start()
        first = machine.snapshot(tmp_path / "a.dlsnap")
        wait_for(lambda: machine.progress > 1000, what="guest writes")
        second = machine.snapshot(tmp_path / "b.dlsnap", first, live=True)
    rows = describe(second.path)
    assert [(row["kind"], row["live"], row["pages"]) for row in rows] == [
        ("full", False, first.pages), ("incremental", True, second.pages)]
    assert rows[1]["parent"] == rows[0]["identity"] == first.identity.hex()
    assert rows[1]["restores_to"]["vcpus"] == 2 and rows[1]["restores_to"]["memory_bytes"] == 64 << 20
    assert rows[0]["disk_bytes"] < rows[0]["file_bytes"]


@pytest.mark.parametrize("track", ["log", "ring"])
def test_a_restored_machine_continues_its_chain(tmp_path: Path, track: str) -> None:
    with Machine("64M", 2, "random", rate=20000) as machine:
        machine.start()
        base = machine.snapshot(tmp_path / "a.dlsnap")
        wait_for(lambda: machine.progress > 2000, what="guest writes")
        top = machine.snapshot(tmp_path / "b.dlsnap", base)
    with Machine.restore(top.path, track=track) as restored:  # type: ignore[arg-type]
        wait_progress(restored, restored.vcpu_progress)
        reference = paused_memory(restored)
        layer = restored.snapshot(tmp_path / "c.dlsnap", top.path)
        assert layer.parent == top.identity and layer.pages < restored.ram.npages // 4
    assert np.array_equal(restored_memory(layer.path), reference)
    with Machine.restore(top.path) as untracked, pytest.raises(SnapshotChainError, match="full snapshot first"):
        untracked.snapshot(tmp_path / "d.dlsnap", top.path)


def test_snapshots_of_a_machine_that_is_not_running_are_refused(tmp_path: Path) -> None:
    machine = Machine("64M", 1, "idle")
    try:
        with pytest.raises(SnapshotError, match="running or paused"):
            machine.snapshot(tmp_path / "x.dlsnap")
    finally:
        machine.stop()
    assert not (tmp_path / "x.dlsnap").exists()


def test_a_restore_into_a_prepared_machine_runs_the_snapshot(tmp_path: Path) -> None:
    with Machine("64M", 2, "random", rate=20000, slots=2) as machine:
        machine.start()
        wait_for(lambda: machine.progress > 2000, what="guest writes")
        reference = paused_memory(machine)
        saved = machine.vcpu_progress
        snap = machine.snapshot(tmp_path / "a.dlsnap")
    spare = Machine("64M", 1, "idle", blank=True, slots=2)  # built before anyone knew what it would run
    with Machine.restore(snap.path, into=spare, resume=False) as restored:
        assert restored is spare and restored.spec.vcpus == 2 and restored.spec.name == "random"
        assert np.array_equal(restored.memory, reference)
        restored.start()
        wait_progress(restored, saved)
    wrong = Machine("64M", 1, "idle", blank=True)  # one slot, not two
    try:
        with pytest.raises(SnapshotError, match="memory slots"):
            Machine.restore(snap.path, into=wrong)
    finally:
        wrong.stop()
