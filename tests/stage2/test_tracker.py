"""Stage2Machine and Stage2Tracker: the model behind the same Tracker interface as the KVM backends."""

from __future__ import annotations

import pytest

pytest.importorskip("dirtylog.bitmap", reason="DirtyBitmap (dirtylog/tracking/bitmap.py) is not there yet")

from dirtylog.stage2.dirty_log import PATCH_ORDER
from dirtylog.stage2.mutants import variant_named
from dirtylog.stage2.pgtable import PAGE_SHIFT
from dirtylog.tracking.base import Tracker
from dirtylog.tracking.stage2 import Stage2Machine, Stage2MachineError, Stage2Tracker
from dirtylog.workload import WORKLOADS, WorkloadSpec

MiB = 1 << 20


def _spec(name: str, vcpus: int = 2, first_page: int = 256, npages: int = 4096) -> WorkloadSpec:
    return WorkloadSpec(name, first_page=first_page, npages=npages, vcpus=vcpus)


@pytest.mark.parametrize("workload", [w for w in WORKLOADS if w != "trace"])  # trace replays need KVM
def test_collections_equal_ground_truth_for_every_workload(workload):
    machine = Stage2Machine(32 * MiB, _spec(workload), memslots=3)
    tracker = machine.dirty_log()
    assert isinstance(tracker, Tracker) and tracker.mode == "stage2"
    tracker.enable()
    for _ in range(4):
        machine.advance(300)
        collected = tracker.collect()
        truth = machine.take_written()
        assert collected == truth
        if workload != "idle":
            assert truth.count() > 0
            pages = truth.pages()
            assert pages.min() >= 256 and pages.max() < 256 + 4096
    tracker.disable()
    assert all(slot.dirty_bitmap is None for slot in machine.memslots)
    assert tracker.stats.collections == 4


def test_the_cli_call_sequence():
    m = Stage2Machine(32 * MiB, _spec("random"))
    t = m.dirty_log()
    t.enable()
    m.advance(100)
    bm = t.collect()
    truth = m.take_written()
    t.disable()
    assert type(bm).__name__ == "DirtyBitmap" and bm == truth and bm.npages == m.npages == 8192


def test_slots_start_on_2mib_so_their_words_align():
    machine = Stage2Machine(64 * MiB, _spec("sequential"), memslots=3)
    bases = [slot.base_gfn for slot in machine.memslots]
    assert bases[0] == 0 and all(base % 512 == 0 for base in bases)
    assert sum(slot.npages for slot in machine.memslots) == machine.npages


def test_writes_spanning_slots_are_merged_at_their_gfns():
    machine = Stage2Machine(8 * MiB, WorkloadSpec("sequential", first_page=0, npages=2048, vcpus=1), memslots=4)
    tracker = machine.dirty_log()
    tracker.enable()
    machine.advance(2048)
    collected = tracker.collect()
    assert collected.count() == 2048 and collected == machine.take_written()


def test_blocks_are_split_only_where_written():
    machine = Stage2Machine(8 * MiB, WorkloadSpec("sequential", first_page=0, npages=1, vcpus=1))
    pgt = machine.kvm.pgt
    assert pgt.walk(0).level == 2  # prefaulted as 2 MiB blocks
    tracker = machine.dirty_log()
    tracker.enable()
    machine.advance(1)
    assert pgt.walk(0).level == 3 and pgt.walk(2 * MiB).level == 2
    assert machine.stats.faults == 1


def test_without_hugepages_or_prefault_everything_is_pages():
    machine = Stage2Machine(4 * MiB, _spec("random", npages=512), hugepages=False, prefault=False)
    tracker = machine.dirty_log()
    tracker.enable()
    machine.advance(50)
    assert tracker.collect() == machine.take_written()
    gfn = int(machine.take_written().pages().size)  # nothing written since
    assert gfn == 0
    assert all(machine.kvm.pgt.walk(int(g) << PAGE_SHIFT).level == 3 for g in range(256, 300))


def test_stamp_workload_stamps_iterations():
    spec = WorkloadSpec("stamp", first_page=0, npages=100, vcpus=1, writes_per_iteration=10)
    machine = Stage2Machine(4 * MiB, spec)
    machine.advance(25)
    assert machine.iterations == [3]
    # 25 writes = two whole iterations of 10 distinct pages and half of a third.
    assert machine.stamps.max() == 3 and int((machine.stamps == 3).sum()) == 5
    assert int((machine.stamps > 0).sum()) <= 25


def test_re_enabling_starts_a_fresh_log():
    machine = Stage2Machine(8 * MiB, _spec("random", npages=1024))
    tracker = machine.dirty_log()
    tracker.enable()
    machine.advance(100)
    tracker.disable()
    machine.advance(100)  # not logged
    tracker.enable()
    assert tracker.collect().count() == 0 and machine.take_written().count() == 0
    machine.advance(10)
    assert tracker.collect() == machine.take_written()


def test_a_mutant_order_loses_writes_even_sequentially():
    machine = Stage2Machine(8 * MiB, _spec("hotset", vcpus=1, npages=64))
    tracker = Stage2Tracker(machine, variant_named("skip-tlb-flush").order)
    tracker.enable()
    machine.advance(200)
    tracker.collect()
    machine.take_written()
    machine.advance(200)
    collected, truth = tracker.collect(), machine.take_written()
    assert (truth - collected).count() > 0  # stale writable TLB entries: writes with no fault, no bit
    assert machine.dirty_log().order is PATCH_ORDER


def test_machines_that_cannot_be_built_say_why():
    with pytest.raises(Stage2MachineError, match="fall outside"):
        Stage2Machine(4 * MiB, _spec("random", first_page=1000, npages=500))
    with pytest.raises(Stage2MachineError, match="cannot hold 3 slot"):
        Stage2Machine(512 * 1024, _spec("idle", npages=0), memslots=3)
    with pytest.raises(Stage2MachineError, match="0 or more"):
        Stage2Machine(4 * MiB, _spec("random", npages=64)).advance(-1)


def test_the_model_refuses_a_trace_replay():
    with pytest.raises(Stage2MachineError, match="no trace replay; run the trace workload on KVM"):
        Stage2Machine(32 * MiB, _spec("trace"))
