"""arch/arm/kvm/mmu.c of the model: write protection, the fault path, block splitting."""

from __future__ import annotations

import numpy as np
import pytest

from dirtylog.stage2.cpu import guest_access, vcpu_read, vcpu_write
from dirtylog.stage2.mmu import (
    NoMemslotError,
    kvm_mmu_write_protect_pt_masked,
    kvm_tlb_flush_vmid,
    stage2_is_writable,
    stage2_populate_memslot,
    stage2_set_pte,
    stage2_wp_range,
    stage2_writable_pages,
    user_mem_abort,
)
from dirtylog.stage2.pgtable import PAGE_SHIFT, desc_writable, pfn_pte
from dirtylog.stage2.tlb import TlbEntry
from tests.stage2.builders import BLOCK, add_slot, live_bits, set_logging, vm


def _level(kvm, gfn):
    return kvm.pgt.walk(gfn << PAGE_SHIFT).level


def _mapped(kvm, gfn):
    return kvm.pgt.walk(gfn << PAGE_SHIFT).desc != 0


def test_stage2_wp_range_over_blocks_and_pages():
    kvm = vm()
    slot = add_slot(kvm, 0, 0, 4 * BLOCK, huge=True)
    stage2_populate_memslot(kvm, slot)  # four writable 2 MiB blocks
    # Turn block 1 into pages: two of them mapped writable, the rest unmapped.
    for gfn in (BLOCK + 0, BLOCK + 300):
        stage2_set_pte(kvm, gfn << PAGE_SHIFT, pfn_pte(gfn, writable=True), logging_active=True)
    assert [_level(kvm, g) for g in (0, BLOCK, BLOCK + 300, 2 * BLOCK, 3 * BLOCK)] == [2, 3, 3, 2, 2]

    # From page 100 of block 1 into block 2: block 1's page 0 is outside, block 2 is cut in the middle.
    stage2_wp_range(kvm, (BLOCK + 100) << PAGE_SHIFT, (2 * BLOCK + 5) << PAGE_SHIFT)

    assert stage2_is_writable(kvm, 5)  # block 0 untouched
    assert stage2_is_writable(kvm, BLOCK)  # page before the range
    assert not stage2_is_writable(kvm, BLOCK + 300)
    assert not _mapped(kvm, BLOCK + 200)  # write-protect never maps anything
    # A block partly in the range is protected whole: it is one descriptor.
    assert not stage2_is_writable(kvm, 2 * BLOCK + 400)
    assert stage2_is_writable(kvm, 3 * BLOCK)


def test_write_protect_pt_masked_covers_lowest_to_highest_bit():
    kvm = vm()
    slot = add_slot(kvm, 0, 64, 128)
    stage2_populate_memslot(kvm, slot)
    kvm_mmu_write_protect_pt_masked(kvm, slot, 64, (1 << 3) | (1 << 9))  # word 1 of the slot, bits 3 and 9
    writable = stage2_writable_pages(kvm, 64, 192)
    protected = {64 + i for i in np.flatnonzero(~writable)}
    assert protected == set(range(64 + 64 + 3, 64 + 64 + 10))  # __ffs..__fls, the pages between included


def test_write_to_a_logged_block_splits_it_into_pages():
    kvm = vm(vcpus=1)
    slot = add_slot(kvm, 0, 0, 2 * BLOCK, huge=True)
    stage2_populate_memslot(kvm, slot)
    vcpu = kvm.vcpus[0]
    assert vcpu_write(kvm, vcpu, 10) == 0  # not logging: the block is writable
    assert vcpu.tlb.lookup(kvm.vmid, 10).level == 2

    set_logging(kvm, slot, True)
    assert vcpu.tlb.lookup(kvm.vmid, 10) is None  # kvm_mmu_wp_memory_region flushed the VMID
    assert not stage2_is_writable(kvm, 10)

    assert vcpu_write(kvm, vcpu, 10) == 1  # permission fault on the read-only block
    assert _level(kvm, 10) == 3 and stage2_is_writable(kvm, 10)
    assert not _mapped(kvm, 11)  # the rest of the block was dissolved, to be faulted in page by page
    assert _level(kvm, BLOCK + 1) == 2  # the other block stays a (read-only) block
    assert live_bits(slot) == {10}

    assert vcpu_write(kvm, vcpu, 11) == 1  # translation fault, mapped as a page, logged
    assert _level(kvm, 11) == 3 and live_bits(slot) == {10, 11}


def test_disabling_logging_allows_blocks_again():
    kvm = vm(vcpus=1)
    slot = add_slot(kvm, 0, 0, 2 * BLOCK, huge=True)
    stage2_populate_memslot(kvm, slot)
    set_logging(kvm, slot, True)
    vcpu = kvm.vcpus[0]
    vcpu_write(kvm, vcpu, 10)
    assert _level(kvm, 10) == 3

    set_logging(kvm, slot, False)
    assert slot.dirty_bitmap is None
    vcpu_write(kvm, vcpu, 20)  # unmapped page of the split block: a fault may map the whole block again
    assert _level(kvm, 20) == 2 and _level(kvm, 10) == 2 and stage2_is_writable(kvm, 10)
    vcpu_write(kvm, vcpu, BLOCK + 3)  # read-only block left by logging: write fault remaps it writable
    assert _level(kvm, BLOCK + 3) == 2 and stage2_is_writable(kvm, BLOCK + 3)


def test_read_fault_under_logging_maps_read_only_and_logs_nothing():
    kvm = vm(vcpus=1)
    slot = add_slot(kvm, 0, 0, 64)
    set_logging(kvm, slot, True)
    resolution = user_mem_abort(kvm, slot, 5 << PAGE_SHIFT, write_fault=False)
    assert resolution.dirty_gfn is None and not resolution.writable
    assert _mapped(kvm, 5) and not stage2_is_writable(kvm, 5) and live_bits(slot) == set()
    assert vcpu_read(kvm, kvm.vcpus[0], 6) == 1 and live_bits(slot) == set()
    assert vcpu_write(kvm, kvm.vcpus[0], 6) == 1 and live_bits(slot) == {6}


def test_a_stale_writable_tlb_entry_lets_a_write_through_without_a_fault():
    kvm = vm(vcpus=1)
    slot = add_slot(kvm, 0, 0, 64)
    set_logging(kvm, slot, True)
    vcpu = kvm.vcpus[0]
    vcpu_write(kvm, vcpu, 3)
    stage2_wp_range(kvm, 3 << PAGE_SHIFT, 4 << PAGE_SHIFT)  # tables say read-only...
    assert guest_access(kvm, vcpu, 3, write=True) is None  # ...the TLB still says writable
    kvm_tlb_flush_vmid(kvm)
    fault = guest_access(kvm, vcpu, 3, write=True)
    assert fault is not None and fault.kind == "permission"


def test_replacing_a_present_pte_invalidates_it_on_every_cpu():
    kvm = vm(vcpus=2)
    slot = add_slot(kvm, 0, 0, 64)
    set_logging(kvm, slot, True)
    vcpu_read(kvm, kvm.vcpus[1], 7)  # vCPU 1 caches a read-only entry for gfn 7
    assert kvm.vcpus[1].tlb.lookup(kvm.vmid, 7) == TlbEntry(3, 7, kvm.vcpus[1].tlb.lookup(1, 7).pfn, False)
    vcpu_write(kvm, kvm.vcpus[0], 7)
    assert kvm.vcpus[1].tlb.lookup(kvm.vmid, 7) is None  # break-before-make flushed the IPA everywhere


def test_populate_equals_faulting_every_page_in():
    faulted, populated = vm(vcpus=1), vm(vcpus=1)
    slot_f = add_slot(faulted, 0, 0, 80)
    slot_p = add_slot(populated, 0, 0, 80)
    for gfn in range(80):
        vcpu_write(faulted, faulted.vcpus[0], gfn)
    stage2_populate_memslot(populated, slot_p)
    assert faulted.pgt.save() == populated.pgt.save()
    assert slot_f.npages == slot_p.npages


def test_blocks_need_the_whole_2mib_in_the_slot():
    kvm = vm(vcpus=1)
    add_slot(kvm, 0, 0, BLOCK + 64, huge=True)  # one full block, then a 64-page tail
    vcpu_write(kvm, kvm.vcpus[0], 3)
    vcpu_write(kvm, kvm.vcpus[0], BLOCK + 3)
    assert _level(kvm, 3) == 2 and _level(kvm, BLOCK + 3) == 3
    assert desc_writable(kvm.pgt.walk(3 << PAGE_SHIFT).desc)


def test_an_access_outside_every_memslot_says_which_slots_exist():
    kvm = vm(vcpus=1)
    add_slot(kvm, 0, 0, 64)
    with pytest.raises(NoMemslotError, match=r"gfn 0x100, which is in no memslot.*0: gfn 0x0-0x3f"):
        vcpu_write(kvm, kvm.vcpus[0], 0x100)
