"""KVM_GET_DIRTY_LOG and KVM_SET_USER_MEMORY_REGION of the model, called as a VMM would."""

from __future__ import annotations

import errno

import numpy as np
import pytest

from dirtylog.stage2.cpu import vcpu_read, vcpu_write
from dirtylog.stage2.dirty_log import PATCH_ORDER, GetDirtyLog, KvmDirtyLog, Op, kvm_vm_ioctl_get_dirty_log
from dirtylog.stage2.errors import BadDestinationError, InvalidSlotError, NoDirtyBitmapError
from dirtylog.stage2.memslot import kvm_dirty_bitmap_bytes
from dirtylog.stage2.mmu import stage2_is_writable
from dirtylog.stage2.mutants import variant_named
from dirtylog.stage2.regions import KvmUserspaceMemoryRegion, SlotOverlapError, kvm_vm_ioctl_set_user_memory_region
from tests.stage2.builders import add_slot, live_bits, reported, set_logging, vm


@pytest.fixture
def logging_vm():
    kvm = vm(vcpus=2)
    slot = add_slot(kvm, 0, 0, 200)
    set_logging(kvm, slot, True)
    return kvm, slot


def _get(kvm, slot_id, order=PATCH_ORDER):
    memslot = kvm.memslots[slot_id]
    buffer = bytearray(kvm_dirty_bitmap_bytes(memslot))
    kvm_vm_ioctl_get_dirty_log(kvm, KvmDirtyLog(slot_id, buffer), order)
    return reported(buffer, memslot.base_gfn)


def test_reports_written_pages_then_protects_and_clears_them(logging_vm):
    kvm, slot = logging_vm
    for vcpu, gfn in ((0, 1), (1, 70), (0, 199), (1, 70)):
        vcpu_write(kvm, kvm.vcpus[vcpu], gfn)
    assert _get(kvm, 0) == {1, 70, 199}
    assert live_bits(slot) == set()
    assert not any(stage2_is_writable(kvm, gfn) for gfn in (1, 70, 199))
    assert all(len(vcpu.tlb.writable_gfns(kvm.vmid)) == 0 for vcpu in kvm.vcpus)
    assert _get(kvm, 0) == set()
    assert vcpu_write(kvm, kvm.vcpus[0], 70) == 1  # protected again: the next write faults and is logged
    assert _get(kvm, 0) == {70}


def test_bitmap_size_is_whole_longs():
    kvm = vm()
    assert kvm_dirty_bitmap_bytes(add_slot(kvm, 0, 0, 200)) == 32
    assert kvm_dirty_bitmap_bytes(add_slot(kvm, 1, 256, 64)) == 8


def test_einval_for_a_slot_id_out_of_range(logging_vm):
    kvm, _ = logging_vm
    for slot_id in (32, -1):
        with pytest.raises(InvalidSlotError) as raised:
            kvm_vm_ioctl_get_dirty_log(kvm, KvmDirtyLog(slot_id, bytearray(32)))
        assert raised.value.errno == errno.EINVAL
        assert f"slot {slot_id}" in str(raised.value) and "0..31" in str(raised.value)
        assert "logging dirty pages: 0" in str(raised.value)


def test_enoent_for_a_slot_without_a_bitmap(logging_vm):
    kvm, _ = logging_vm
    add_slot(kvm, 3, 1024, 64)  # registered, not logging
    for slot_id, why in ((3, "does not log dirty pages"), (5, "is not registered")):
        with pytest.raises(NoDirtyBitmapError) as raised:
            kvm_vm_ioctl_get_dirty_log(kvm, KvmDirtyLog(slot_id, bytearray(32)))
        assert raised.value.errno == errno.ENOENT
        message = str(raised.value)
        assert f"slot {slot_id}" in message and why in message and "KVM_MEM_LOG_DIRTY_PAGES" in message
        assert "(0)" in message  # the slot that does log


@pytest.mark.parametrize(
    ("destination", "why"),
    [(None, "NULL"), (bytes(32), "read-only"), (bytearray(8), "has 8 bytes"), (np.zeros(2, np.uint64), "has 16")],
)
def test_efault_for_a_bad_destination_after_clearing_as_the_kernel_does(logging_vm, destination, why):
    kvm, slot = logging_vm
    vcpu_write(kvm, kvm.vcpus[0], 9)
    with pytest.raises(BadDestinationError) as raised:
        kvm_vm_ioctl_get_dirty_log(kvm, KvmDirtyLog(0, destination))
    assert raised.value.errno == errno.EFAULT
    assert "slot 0" in str(raised.value) and why in str(raised.value) and "at least 32 bytes" in str(raised.value)
    # copy_to_user is the last step: the bit is gone and the page protected, the log is lost to userspace.
    assert live_bits(slot) == set() and not stage2_is_writable(kvm, 9)


def test_numpy_destination_receives_the_log(logging_vm):
    kvm, _ = logging_vm
    vcpu_write(kvm, kvm.vcpus[1], 130)
    words = np.zeros(4, dtype=np.uint64)
    kvm_vm_ioctl_get_dirty_log(kvm, KvmDirtyLog(0, words))
    assert words.tolist() == [0, 0, 1 << 2, 0]


def test_steps_follow_the_patch_order_and_skip_clean_words(logging_vm):
    kvm, _ = logging_vm
    vcpu_write(kvm, kvm.vcpus[0], 130)  # only word 2 is dirty
    call = GetDirtyLog(kvm, KvmDirtyLog(0, bytearray(32)))
    ops = []
    while not call.done:
        step = call.step()
        ops.append((step.op, step.word, call.continued))
    assert ops == [
        (Op.MEMSET_BUFFER, -1, False),
        (Op.XCHG, 0, True),
        (Op.XCHG, 1, True),
        (Op.XCHG, 2, False),
        (Op.WRITE_PROTECT, 2, False),
        (Op.XCHG, 3, True),
        (Op.FLUSH_IF_DIRTY, -1, False),
        (Op.COPY_TO_USER, -1, False),
    ]


def test_nothing_dirty_means_no_flush(logging_vm):
    kvm, _ = logging_vm
    vcpu_write(kvm, kvm.vcpus[0], 3)
    _get(kvm, 0)
    vcpu_read(kvm, kvm.vcpus[0], 3)  # caches a read-only entry
    assert _get(kvm, 0) == set()
    assert kvm.vcpus[0].tlb.lookup(kvm.vmid, 3) is not None  # "if (is_dirty)": a clean log flushes nothing


def test_order_listing_reads_like_the_kernel_loop():
    lines = PATCH_ORDER.listing()
    assert lines[0] == "memset(dirty_bitmap_buffer, 0, n);"
    assert lines[2].strip().startswith("mask = xchg(&dirty_bitmap[i], 0)")
    assert lines[-2:] == [
        "if (is_dirty) kvm_tlb_flush_vmid(kvm);",
        "copy_to_user(log->dirty_bitmap, dirty_bitmap_buffer, n);",
    ]


def test_without_the_flush_even_a_sequential_vmm_loses_writes(logging_vm):
    kvm, _ = logging_vm
    broken = variant_named("skip-tlb-flush").order
    vcpu_write(kvm, kvm.vcpus[0], 5)
    assert _get(kvm, 0, broken) == {5}
    assert vcpu_write(kvm, kvm.vcpus[0], 5) == 0  # the stale writable TLB entry: no fault, no bit
    assert _get(kvm, 0, broken) == set()


def test_stale_buffer_without_memset_reports_a_page_twice(logging_vm):
    kvm, _ = logging_vm
    broken = variant_named("no-buffer-memset").order
    vcpu_write(kvm, kvm.vcpus[0], 5)
    assert _get(kvm, 0, broken) == {5}
    assert _get(kvm, 0, broken) == {5}  # a phantom: nothing was written


def test_set_memory_region_rejects_bad_regions():
    kvm = vm()
    add_slot(kvm, 0, 0, 64)
    with pytest.raises(SlotOverlapError, match="overlaps slot 0"):
        add_slot(kvm, 1, 32, 64)
    with pytest.raises(InvalidSlotError, match="not a multiple"):
        kvm_vm_ioctl_set_user_memory_region(kvm, KvmUserspaceMemoryRegion(2, 0, 4096 * 100, 100, 0))
    with pytest.raises(InvalidSlotError, match="slot 40 is out of range"):
        kvm_vm_ioctl_set_user_memory_region(kvm, KvmUserspaceMemoryRegion(40, 0, 0, 4096, 0))
    with pytest.raises(InvalidSlotError, match="unknown flags"):
        kvm_vm_ioctl_set_user_memory_region(kvm, KvmUserspaceMemoryRegion(0, 0x80, 0, 64 * 4096, 0x7F00_0000_0000))


def test_deleting_a_slot_unmaps_it():
    kvm = vm(vcpus=1)
    slot = add_slot(kvm, 0, 0, 64)
    vcpu_write(kvm, kvm.vcpus[0], 4)
    assert kvm_vm_ioctl_set_user_memory_region(kvm, KvmUserspaceMemoryRegion(0, 0, 0, 0, slot.userspace_addr)) is None
    assert 0 not in kvm.memslots
    assert kvm.pgt.walk(4 << 12).desc == 0 and kvm.vcpus[0].tlb.lookup(kvm.vmid, 4) is None
