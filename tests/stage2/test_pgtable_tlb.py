"""Descriptors, table walks and TLBs: the hardware half of the model."""

from __future__ import annotations

from dirtylog.stage2.pgtable import (
    DESC_TABLE,
    DESC_VALID,
    S2AP_MASK,
    S2AP_RDONLY,
    S2AP_RDWR,
    Stage2PageTable,
    desc_address,
    desc_writable,
    kvm_s2pte_readonly,
    kvm_set_s2pte_readonly,
    kvm_set_s2pte_writable,
    pfn_pmd_huge,
    pfn_pte,
    pmd_huge,
    table_desc,
)
from dirtylog.stage2.tlb import Tlb, TlbEntry


def test_page_descriptor_bits_follow_the_arm_arm():
    pte = pfn_pte(0x1234, writable=False)
    assert pte & DESC_VALID and pte & DESC_TABLE  # level 3: bit 1 set means "page"
    assert pte & S2AP_MASK == S2AP_RDONLY
    assert desc_address(pte) == 0x1234 << 12
    assert kvm_set_s2pte_writable(pte) & S2AP_MASK == S2AP_RDWR
    assert kvm_s2pte_readonly(kvm_set_s2pte_readonly(pfn_pte(0x1234, writable=True)))


def test_block_and_table_descriptors_differ_in_bit_1():
    block = pfn_pmd_huge(0x200, writable=True)
    assert pmd_huge(block) and desc_writable(block)
    assert not pmd_huge(table_desc(0x5000))
    assert not pmd_huge(0)


def test_walk_reports_the_leaf_level_and_its_permission():
    pgt = Stage2PageTable()
    l2 = pgt.alloc_table(1, 0)
    pgt.write(pgt.pgd, 0, table_desc(l2))
    pgt.write(l2, 0, pfn_pmd_huge(0x1000, writable=False))  # block for gfn 0..511
    l3 = pgt.alloc_table(2, 2 << 21)
    pgt.write(l2, 2, table_desc(l3))
    pgt.write(l3, 5, pfn_pte(0x4242, writable=True))  # page for gfn 1024 + 5

    block = pgt.walk(7 << 12)
    assert block.level == 2 and not desc_writable(block.desc)
    page = pgt.walk((1024 + 5) << 12)
    assert page.level == 3 and desc_writable(page.desc) and desc_address(page.desc) == 0x4242 << 12
    assert pgt.walk((1024 + 6) << 12) == (3, 0)  # table present, entry invalid: translation fault
    assert pgt.walk(600 << 12) == (2, 0)
    assert pgt.walk(1 << 30).desc == 0


def test_save_restore_round_trips_and_is_shared_not_copied():
    pgt = Stage2PageTable()
    l2 = pgt.alloc_table(1, 0)
    pgt.write(pgt.pgd, 0, table_desc(l2))
    saved = pgt.save()
    assert pgt.save() is saved  # unchanged tables are not re-encoded
    pgt.write(l2, 3, pfn_pmd_huge(0x600, writable=True))
    assert pgt.save() != saved
    pgt.restore(saved)
    assert pgt.walk(3 << 21).desc == 0
    assert hash(pgt.save()) == hash(saved)


def test_tlb_keeps_the_cached_permission_and_flushes_by_vmid_and_ipa():
    tlb = Tlb()
    tlb.fill(1, TlbEntry(3, 10, 0x10, True))
    tlb.fill(1, TlbEntry(2, 512, 0x200, False))
    tlb.fill(2, TlbEntry(3, 10, 0x99, True))
    assert tlb.lookup(1, 10) == TlbEntry(3, 10, 0x10, True)
    assert tlb.lookup(1, 700) == TlbEntry(2, 512, 0x200, False)  # a block entry covers its 512 pages
    assert tlb.invalidate_ipa(1, 600) == 1 and tlb.lookup(1, 700) is None
    assert tlb.invalidate_vmid(1) == 1
    assert tlb.lookup(1, 10) is None and tlb.lookup(2, 10) is not None  # another VM keeps its entries


def test_bounded_tlb_evicts_its_oldest_entry():
    tlb = Tlb(capacity=2)
    for gfn in range(3):
        tlb.fill(1, TlbEntry(3, gfn, gfn, True))
    assert len(tlb) == 2 and tlb.lookup(1, 0) is None and tlb.lookup(1, 2) is not None
