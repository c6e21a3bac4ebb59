"""Small VMs for the stage-2 tests, built only through the model's own ioctls."""

from __future__ import annotations

from dataclasses import replace

from dirtylog.stage2.kvm import Kvm, kvm_create_vm
from dirtylog.stage2.memslot import KVM_MEM_LOG_DIRTY_PAGES, KvmMemorySlot
from dirtylog.stage2.pgtable import PAGE_SHIFT, PAGES_PER_BLOCK
from dirtylog.stage2.regions import KvmUserspaceMemoryRegion, kvm_vm_ioctl_set_user_memory_region

USERSPACE = 0x7F00_0000_0000
BLOCK = PAGES_PER_BLOCK


def add_slot(kvm: Kvm, slot: int, base_gfn: int, npages: int, *, huge: bool = False) -> KvmMemorySlot:
    """Register a slot whose host mapping is aligned like its guest range (so blocks are possible)."""
    region = KvmUserspaceMemoryRegion(
        slot, 0, base_gfn << PAGE_SHIFT, npages << PAGE_SHIFT, USERSPACE + (base_gfn << PAGE_SHIFT)
    )
    memslot = kvm_vm_ioctl_set_user_memory_region(kvm, region, hugepage_backed=huge)
    assert memslot is not None
    return memslot


def set_logging(kvm: Kvm, memslot: KvmMemorySlot, on: bool) -> None:
    """Flip KVM_MEM_LOG_DIRTY_PAGES on a slot through KVM_SET_USER_MEMORY_REGION."""
    region = KvmUserspaceMemoryRegion(
        memslot.id,
        KVM_MEM_LOG_DIRTY_PAGES if on else 0,
        memslot.base_gfn << PAGE_SHIFT,
        memslot.npages << PAGE_SHIFT,
        memslot.userspace_addr,
    )
    kvm_vm_ioctl_set_user_memory_region(kvm, replace(region))


def vm(vcpus: int = 2) -> Kvm:
    """An empty VM with VMID 1."""
    return kvm_create_vm(vmid=1, nr_vcpus=vcpus)


def live_bits(memslot: KvmMemorySlot) -> set[int]:
    """The gfns whose bit is set in the slot's live bitmap."""
    assert memslot.dirty_bitmap is not None
    words = memslot.dirty_bitmap[: len(memslot.dirty_bitmap) // 2]
    return {memslot.base_gfn + i * 64 + b for i, w in enumerate(words) for b in range(64) if w >> b & 1}


def reported(buffer: bytes | bytearray, base_gfn: int = 0) -> set[int]:
    """The gfns set in a bitmap copied out by KVM_GET_DIRTY_LOG."""
    return {base_gfn + i * 8 + b for i, byte in enumerate(buffer) for b in range(8) if byte >> b & 1}
