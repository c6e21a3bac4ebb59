"""The stage-2 MMU code of arch/arm/kvm/mmu.c that dirty logging touches, over the model's tables.

Addresses are ``phys_addr_t`` IPAs in bytes where the kernel uses them, gfns where it uses gfns, so each
function can be read beside its C namesake. ``mmu_lock`` is deliberately not modelled: every function here
is one atomic step, and the interleaving checker lets the collector and the fault handler interleave
between such steps, which is a superset of what the lock allows. See docs/stage2-model.md.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from dirtylog.stage2.errors import Stage2Error
from dirtylog.stage2.kvm import Kvm, KvmVcpu, gfn_to_memslot, mark_page_dirty
from dirtylog.stage2.memslot import KvmMemorySlot, memslot_is_logging
from dirtylog.stage2.pgtable import (
    DESC_VALID,
    PAGE_SHIFT,
    PAGE_SIZE,
    PAGES_PER_BLOCK,
    PGDIR_SHIFT,
    PMD_SIZE,
    S2AP_MASK,
    S2AP_RDONLY,
    desc_address,
    desc_none,
    desc_writable,
    kvm_s2pte_readonly,
    kvm_set_s2pte_readonly,
    pfn_pmd_huge,
    pfn_pte,
    pmd_huge,
    pte_index,
    table_desc,
)

# Below this many entries a per-descriptor loop beats a NumPy round trip of the table.
_VECTOR_MIN = 16


class FaultResolution(NamedTuple):
    """What the part of user_mem_abort under mmu_lock installed: a page or block, writable or not.

    ``dirty_gfn`` is the page ``mark_page_dirty`` must log (a writable page mapped in a logging slot),
    or None.
    """

    level: int
    gfn: int
    writable: bool
    dirty_gfn: int | None


class NoMemslotError(Stage2Error, LookupError):
    """A guest access outside every memslot: KVM would exit to userspace as MMIO; the model has no devices."""


# -- TLB maintenance ---------------------------------------------------------------------------------------
def kvm_tlb_flush_vmid(kvm: Kvm) -> int:
    """__kvm_tlb_flush_vmid: invalidate every stage-2 entry of the VM's VMID on every CPU (broadcast TLBI)."""
    kvm.stat["kvm_tlb_flush_vmid"] += 1
    return sum(vcpu.tlb.invalidate_vmid(kvm.vmid) for vcpu in kvm.vcpus)


kvm_flush_remote_tlbs = kvm_tlb_flush_vmid


def kvm_tlb_flush_vmid_ipa(kvm: Kvm, ipa: int) -> int:
    """__kvm_tlb_flush_vmid_ipa: invalidate the entries translating ``ipa`` on every CPU."""
    kvm.stat["kvm_tlb_flush_vmid_ipa"] += 1
    gfn = ipa >> PAGE_SHIFT
    return sum(vcpu.tlb.invalidate_ipa(kvm.vmid, gfn) for vcpu in kvm.vcpus)


# -- building and tearing down entries ---------------------------------------------------------------------
def stage2_get_pmd(kvm: Kvm, addr: int, allocate: bool = True) -> tuple[int, int] | None:
    """(table, index) of the level-2 entry for ``addr``, allocating the level-2 table if needed."""
    pgt = kvm.pgt
    table, index = pgt.pgd_offset(addr)
    pgd = pgt.read(table, index)
    if desc_none(pgd):
        if not allocate:
            return None
        pgd = table_desc(pgt.alloc_table(1, addr))
        pgt.write(table, index, pgd)
    return pgt.pmd_offset(pgd, addr)


def stage2_dissolve_pmd(kvm: Kvm, addr: int, pmd: tuple[int, int]) -> bool:
    """Clear a block entry and flush its IPA, so the range can be remapped page by page (patch 4/4)."""
    table, index = pmd
    if not pmd_huge(kvm.pgt.read(table, index)):
        return False
    kvm.stat["stage2_dissolve_pmd"] += 1
    kvm.pgt.write(table, index, 0)
    kvm_tlb_flush_vmid_ipa(kvm, addr)
    return True


def stage2_set_pte(kvm: Kvm, addr: int, new_pte: int, logging_active: bool) -> None:
    """Install a level-3 entry, dissolving a covering block first when the slot is logging."""
    pgt = kvm.pgt
    pmd = stage2_get_pmd(kvm, addr)
    assert pmd is not None
    if logging_active:
        stage2_dissolve_pmd(kvm, addr, pmd)
    pmd_desc = pgt.read(*pmd)
    if desc_none(pmd_desc):
        pmd_desc = table_desc(pgt.alloc_table(2, addr))
        pgt.write(*pmd, pmd_desc)
    elif pmd_huge(pmd_desc):
        raise AssertionError(f"VM_BUG_ON: page mapping at {addr:#x} under a block while not logging")
    table, index = pgt.pte_offset(pmd_desc, addr)
    old_pte = pgt.read(table, index)
    if not desc_none(old_pte):
        # Break before make: no CPU may keep the old translation once the new one is visible.
        pgt.write(table, index, 0)
        kvm_tlb_flush_vmid_ipa(kvm, addr)
    pgt.write(table, index, new_pte)


def stage2_set_pmd_huge(kvm: Kvm, addr: int, new_pmd: int) -> None:
    """Install a 2 MiB block entry; a level-3 table already there is unmapped first (as later kernels do)."""
    pgt = kvm.pgt
    pmd = stage2_get_pmd(kvm, addr)
    assert pmd is not None
    old_pmd = pgt.read(*pmd)
    block = addr & ~(PMD_SIZE - 1)
    if not desc_none(old_pmd) and not pmd_huge(old_pmd):
        unmap_stage2_range(kvm, block, PMD_SIZE)
        old_pmd = pgt.read(*pmd)
    if not desc_none(old_pmd):
        pgt.write(*pmd, 0)
        kvm_tlb_flush_vmid_ipa(kvm, block)
    pgt.write(*pmd, new_pmd)


def unmap_stage2_range(kvm: Kvm, start: int, size: int) -> None:
    """Clear every entry mapping ``[start, start + size)``, flushing each IPA and freeing emptied tables."""
    pgt = kvm.pgt
    addr, end = start, start + size
    while addr < end:
        next_addr = min((addr | (PMD_SIZE - 1)) + 1, end)
        pmd = stage2_get_pmd(kvm, addr, allocate=False)
        pmd_desc = 0 if pmd is None else pgt.read(*pmd)
        if pmd is not None and pmd_huge(pmd_desc):
            pgt.write(*pmd, 0)
            kvm_tlb_flush_vmid_ipa(kvm, addr)
        elif pmd is not None and not desc_none(pmd_desc):
            table = desc_address(pmd_desc)
            for page in range(addr, next_addr, PAGE_SIZE):
                if not desc_none(pgt.read(table, pte_index(page))):
                    pgt.write(table, pte_index(page), 0)
                    kvm_tlb_flush_vmid_ipa(kvm, page)
            if not pgt.entries(table).any():
                pgt.write(*pmd, 0)
                pgt.free_table(table)
        addr = next_addr


# -- write protection (patches 2/4 and 3/4) ----------------------------------------------------------------
def stage2_wp_ptes(kvm: Kvm, pmd_desc: int, addr: int, end: int) -> None:
    """Make every present page entry in ``[addr, end)`` of one level-3 table read-only."""
    pgt = kvm.pgt
    table = desc_address(pmd_desc)
    first = pte_index(addr)
    count = (end - addr) >> PAGE_SHIFT
    if count < _VECTOR_MIN:
        for index in range(first, first + count):
            pte = pgt.read(table, index)
            if not desc_none(pte) and not kvm_s2pte_readonly(pte):
                pgt.write(table, index, kvm_set_s2pte_readonly(pte))
        return
    entries = pgt.entries(table)
    window = entries[first : first + count]
    present = (window & np.uint64(DESC_VALID)) != 0
    window[present] = (window[present] & np.uint64(~S2AP_MASK & (2**64 - 1))) | np.uint64(S2AP_RDONLY)
    pgt.store_entries(table, entries)


def stage2_wp_pmds(kvm: Kvm, pgd_desc: int, addr: int, end: int) -> None:
    """Write-protect ``[addr, end)`` under one level-1 entry: blocks whole, tables entry by entry."""
    pgt = kvm.pgt
    while addr != end:
        next_addr = min((addr | (PMD_SIZE - 1)) + 1, end)
        table, index = pgt.pmd_offset(pgd_desc, addr)
        pmd = pgt.read(table, index)
        if not desc_none(pmd):
            if pmd_huge(pmd):
                if not kvm_s2pte_readonly(pmd):
                    pgt.write(table, index, kvm_set_s2pte_readonly(pmd))
            else:
                stage2_wp_ptes(kvm, pmd, addr, next_addr)
        addr = next_addr


def stage2_wp_range(kvm: Kvm, addr: int, end: int) -> None:
    """Write-protect the stage-2 mappings of ``[addr, end)``; flushing TLBs is the caller's job."""
    kvm.stat["stage2_wp_range"] += 1
    pgt = kvm.pgt
    while addr != end:
        next_addr = min((addr | ((1 << PGDIR_SHIFT) - 1)) + 1, end)
        pgd = pgt.read(*pgt.pgd_offset(addr))
        if not desc_none(pgd):
            stage2_wp_pmds(kvm, pgd, addr, next_addr)
        addr = next_addr


def kvm_mmu_wp_memory_region(kvm: Kvm, slot_id: int) -> None:
    """Write-protect a whole slot and flush, when logging is switched on (patch 2/4)."""
    memslot = kvm.memslots[slot_id]
    start = memslot.base_gfn << PAGE_SHIFT
    end = (memslot.base_gfn + memslot.npages) << PAGE_SHIFT
    stage2_wp_range(kvm, start, end)
    kvm_flush_remote_tlbs(kvm)


def kvm_mmu_write_protect_pt_masked(kvm: Kvm, memslot: KvmMemorySlot, gfn_offset: int, mask: int) -> None:
    """Write-protect the pages of one bitmap word: from its lowest to its highest set bit (__ffs.. __fls)."""
    kvm.stat["kvm_mmu_write_protect_pt_masked"] += 1
    base_gfn = memslot.base_gfn + gfn_offset
    start = (base_gfn + ((mask & -mask).bit_length() - 1)) << PAGE_SHIFT
    end = (base_gfn + mask.bit_length()) << PAGE_SHIFT
    stage2_wp_range(kvm, start, end)


# -- the fault path (patch 4/4) ----------------------------------------------------------------------------
def gfn_to_pfn(memslot: KvmMemorySlot, gfn: int) -> int:
    """Host frame backing ``gfn``: the slot's userspace mapping, page for page."""
    return (memslot.userspace_addr >> PAGE_SHIFT) + (gfn - memslot.base_gfn)


def fault_supports_stage2_huge_mapping(memslot: KvmMemorySlot, gfn: int) -> bool:
    """A block may map ``gfn`` only if its whole 2 MiB lies in the slot and host and guest agree mod 2 MiB."""
    if (memslot.userspace_addr >> PAGE_SHIFT) % PAGES_PER_BLOCK != memslot.base_gfn % PAGES_PER_BLOCK:
        return False
    block = gfn & ~(PAGES_PER_BLOCK - 1)
    return memslot.base_gfn <= block and block + PAGES_PER_BLOCK <= memslot.end_gfn


def stage2_map_fault(kvm: Kvm, memslot: KvmMemorySlot, fault_ipa: int, write_fault: bool) -> FaultResolution:
    """The part of user_mem_abort under mmu_lock: choose page or block, set permissions, install it."""
    gfn = fault_ipa >> PAGE_SHIFT
    logging_active = memslot_is_logging(memslot)
    # Without logging a read fault may map the page writable (the host page is writable); with logging it
    # must not, or the first write would never fault and never be logged.
    writable = write_fault or not logging_active
    force_pte = logging_active or not fault_supports_stage2_huge_mapping(memslot, gfn)
    if memslot.hugepage_backed and not force_pte:
        block_gfn = gfn & ~(PAGES_PER_BLOCK - 1)
        stage2_set_pmd_huge(kvm, block_gfn << PAGE_SHIFT, pfn_pmd_huge(gfn_to_pfn(memslot, block_gfn), writable))
        return FaultResolution(level=2, gfn=block_gfn, writable=writable, dirty_gfn=None)
    stage2_set_pte(kvm, gfn << PAGE_SHIFT, pfn_pte(gfn_to_pfn(memslot, gfn), writable), logging_active)
    dirty = gfn if writable and logging_active else None
    return FaultResolution(level=3, gfn=gfn, writable=writable, dirty_gfn=dirty)


def user_mem_abort(kvm: Kvm, memslot: KvmMemorySlot, fault_ipa: int, write_fault: bool) -> FaultResolution:
    """Resolve a stage-2 fault on RAM: install the mapping, then log the page if it became writable.

    The kernel does both under mmu_lock (the patch calls mark_page_dirty just before stage2_set_pte);
    without the lock, as the model runs, only this order is safe: a page made writable before its bit is
    set is at worst reported one collection late, never lost. The checker's ``mark-before-map`` mutant
    shows the other order losing a write.
    """
    kvm.stat["user_mem_abort"] += 1
    resolution = stage2_map_fault(kvm, memslot, fault_ipa, write_fault)
    if resolution.dirty_gfn is not None:
        mark_page_dirty(kvm, resolution.dirty_gfn)
    return resolution


def kvm_handle_guest_abort(vcpu: KvmVcpu, kvm: Kvm, fault_ipa: int, write_fault: bool) -> FaultResolution:
    """Route a stage-2 abort: RAM goes to user_mem_abort, anything else would be MMIO."""
    gfn = fault_ipa >> PAGE_SHIFT
    memslot = gfn_to_memslot(kvm, gfn)
    if memslot is None:
        slots = ", ".join(f"{s.id}: gfn {s.base_gfn:#x}-{s.end_gfn - 1:#x}" for s in kvm.memslots.values())
        raise NoMemslotError(
            f"vCPU {vcpu.vcpu_id} accessed gfn {gfn:#x}, which is in no memslot; "
            f"the model has no MMIO devices, so access RAM only (memslots {slots or 'none'})"
        )
    return user_mem_abort(kvm, memslot, fault_ipa, write_fault)


# -- commit of a memory region ------------------------------------------------------------------------------
def kvm_arch_commit_memory_region(kvm: Kvm, memslot: KvmMemorySlot, logging_enabled: bool) -> None:
    """After a slot change: start logging by write-protecting everything already mapped."""
    if logging_enabled:
        kvm_mmu_wp_memory_region(kvm, memslot.id)


def stage2_populate_memslot(kvm: Kvm, memslot: KvmMemorySlot) -> None:
    """Map the whole slot writable, as if the guest had already written every page (blocks where allowed).

    Not a kernel function: it is the state user_mem_abort would leave after faulting every block or page
    in, built table by table so that a multi-GiB guest starts in milliseconds.
    """
    pgt = kvm.pgt
    gfn = memslot.base_gfn
    while gfn < memslot.end_gfn:
        block_end = min((gfn | (PAGES_PER_BLOCK - 1)) + 1, memslot.end_gfn)
        addr = gfn << PAGE_SHIFT
        if memslot.hugepage_backed and gfn % PAGES_PER_BLOCK == 0 and fault_supports_stage2_huge_mapping(memslot, gfn):
            stage2_set_pmd_huge(kvm, addr, pfn_pmd_huge(gfn_to_pfn(memslot, gfn), True))
        else:
            pmd = stage2_get_pmd(kvm, addr)
            assert pmd is not None
            pmd_desc = pgt.read(*pmd)
            if desc_none(pmd_desc):
                pmd_desc = table_desc(pgt.alloc_table(2, addr))
                pgt.write(*pmd, pmd_desc)
            table = desc_address(pmd_desc)
            entries = pgt.entries(table)
            first = pte_index(addr)
            gfns = np.arange(gfn, block_end, dtype=np.uint64)
            pfns = gfns - np.uint64(memslot.base_gfn) + np.uint64(memslot.userspace_addr >> PAGE_SHIFT)
            template = np.uint64(pfn_pte(0, True))
            entries[first : first + len(gfns)] = (pfns << np.uint64(PAGE_SHIFT)) | template
            pgt.store_entries(table, entries)
        gfn = block_end


def stage2_is_writable(kvm: Kvm, gfn: int) -> bool:
    """Whether the tables (not the TLBs) grant write access to ``gfn``."""
    return desc_writable(kvm.pgt.walk(gfn << PAGE_SHIFT).desc)


def stage2_writable_pages(kvm: Kvm, start_gfn: int, end_gfn: int) -> np.ndarray:
    """For each gfn in ``[start_gfn, end_gfn)``, whether the tables grant write (blocks expanded)."""
    pgt = kvm.pgt
    writable = np.zeros(end_gfn - start_gfn, dtype=bool)
    gfn = start_gfn
    while gfn < end_gfn:
        block_end = min((gfn | (PAGES_PER_BLOCK - 1)) + 1, end_gfn)
        addr = gfn << PAGE_SHIFT
        pgd = pgt.read(*pgt.pgd_offset(addr))
        pmd = 0 if desc_none(pgd) else pgt.read(*pgt.pmd_offset(pgd, addr))
        if pmd_huge(pmd):
            writable[gfn - start_gfn : block_end - start_gfn] = desc_writable(pmd)
        elif not desc_none(pmd):
            first = pte_index(addr)
            ptes = pgt.entries(desc_address(pmd))[first : first + block_end - gfn]
            writable[gfn - start_gfn : block_end - start_gfn] = (ptes & np.uint64(DESC_VALID | S2AP_MASK)) == np.uint64(
                DESC_VALID | S2AP_MASK
            )
        gfn = block_end
    return writable
