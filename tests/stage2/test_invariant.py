"""Tsirkin's invariant under random operation sequences: at every quiescent point, each page of a logging
slot is dirty in its bitmap, or read-only both in the stage-2 tables and in every vCPU's TLB."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dirtylog.stage2.cpu import vcpu_read, vcpu_write
from dirtylog.stage2.dirty_log import KvmDirtyLog, kvm_vm_ioctl_get_dirty_log
from dirtylog.stage2.kvm import Kvm
from dirtylog.stage2.memslot import KvmMemorySlot, kvm_dirty_bitmap_bytes
from dirtylog.stage2.mmu import stage2_populate_memslot, stage2_writable_pages
from tests.stage2.builders import BLOCK, add_slot, reported, set_logging, vm

# Block edges, word edges, both slots: where splitting, masks and slot offsets can go wrong.
PAGES = [0, 1, 63, 64, 200, BLOCK - 1, BLOCK, BLOCK + 77, 2 * BLOCK - 1, 2 * BLOCK, 2 * BLOCK + 65, 2 * BLOCK + 127]
VCPUS = 2

operations = st.one_of(
    st.tuples(st.just("write"), st.integers(0, VCPUS - 1), st.sampled_from(PAGES)),
    st.tuples(st.just("read"), st.integers(0, VCPUS - 1), st.sampled_from(PAGES)),
    st.tuples(st.just("collect"), st.integers(0, 1), st.just(0)),
    st.tuples(st.just("logging"), st.integers(0, 1), st.booleans()),
)


def _machine() -> tuple[Kvm, list[KvmMemorySlot]]:
    kvm = vm(VCPUS)
    slots = [add_slot(kvm, 0, 0, 2 * BLOCK, huge=True), add_slot(kvm, 1, 2 * BLOCK, 128)]
    for slot in slots:
        stage2_populate_memslot(kvm, slot)
        set_logging(kvm, slot, True)
    return kvm, slots


def _unprotected_clean_pages(kvm: Kvm, slot: KvmMemorySlot) -> set[int]:
    """Pages of a logging slot that break the invariant: writable somewhere, yet not dirty."""
    assert slot.dirty_bitmap is not None
    words = np.array(slot.dirty_bitmap[: len(slot.dirty_bitmap) // 2], dtype=np.uint64)
    dirty = np.unpackbits(words.view(np.uint8), bitorder="little")[: slot.npages].astype(bool)
    writable = stage2_writable_pages(kvm, slot.base_gfn, slot.end_gfn)
    for vcpu in kvm.vcpus:
        for gfn in vcpu.tlb.writable_gfns(kvm.vmid):
            if slot.base_gfn <= gfn < slot.end_gfn:
                writable[gfn - slot.base_gfn] = True
    return {slot.base_gfn + int(i) for i in np.flatnonzero(writable & ~dirty)}


@settings(max_examples=200, deadline=None)
@given(st.lists(operations, max_size=40))
def test_every_page_is_dirty_or_write_protected_everywhere(ops):
    kvm, slots = _machine()
    written_since_collect: list[set[int]] = [set(), set()]
    for op, who, arg in ops:
        if op == "write":
            vcpu_write(kvm, kvm.vcpus[who], arg)
            slot = 0 if arg < 2 * BLOCK else 1
            if slots[slot].dirty_bitmap is not None:
                written_since_collect[slot].add(arg)
        elif op == "read":
            vcpu_read(kvm, kvm.vcpus[who], arg)
        elif op == "collect" and slots[who].dirty_bitmap is not None:
            buffer = bytearray(kvm_dirty_bitmap_bytes(slots[who]))
            kvm_vm_ioctl_get_dirty_log(kvm, KvmDirtyLog(who, buffer))
            # Sequentially the log is exact: everything written since the last call, nothing else.
            assert reported(buffer, slots[who].base_gfn) == written_since_collect[who]
            written_since_collect[who] = set()
        elif op == "logging":
            was = slots[who].dirty_bitmap is not None
            set_logging(kvm, slots[who], bool(arg))
            if bool(arg) != was:
                written_since_collect[who] = set()
        for slot in slots:
            if slot.dirty_bitmap is not None:
                assert _unprotected_clean_pages(kvm, slot) == set(), f"after {op} {who} {arg}"


def test_the_invariant_check_itself_can_fail():
    kvm, slots = _machine()
    vcpu_write(kvm, kvm.vcpus[0], 5)
    slots[0].dirty_bitmap[0] = 0  # drop the bit behind the model's back: page 5 is writable and clean
    assert _unprotected_clean_pages(kvm, slots[0]) == {5}
