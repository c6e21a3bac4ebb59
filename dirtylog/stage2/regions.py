"""KVM_SET_USER_MEMORY_REGION (virt/kvm/kvm_main.c ``__kvm_set_memory_region``), for what logging needs.

Creating a slot, deleting it, and flipping KVM_MEM_LOG_DIRTY_PAGES on an existing one; moving or
resizing a slot is not modelled.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from dirtylog.stage2.errors import InvalidSlotError, Stage2Error
from dirtylog.stage2.kvm import Kvm
from dirtylog.stage2.memslot import (
    KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MEM_READONLY,
    KVM_USER_MEM_SLOTS,
    KvmMemorySlot,
    kvm_create_dirty_bitmap,
    kvm_destroy_dirty_bitmap,
)
from dirtylog.stage2.mmu import kvm_arch_commit_memory_region, unmap_stage2_range
from dirtylog.stage2.pgtable import KVM_PHYS_SIZE, PAGE_SHIFT, PAGE_SIZE

_KNOWN_FLAGS = KVM_MEM_LOG_DIRTY_PAGES | KVM_MEM_READONLY


class SlotOverlapError(Stage2Error):
    """EEXIST: the new slot overlaps a registered one."""

    errno = errno.EEXIST


@dataclass(frozen=True)
class KvmUserspaceMemoryRegion:
    """``struct kvm_userspace_memory_region``: sizes and addresses in bytes."""

    slot: int
    flags: int
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int


def kvm_vm_ioctl_set_user_memory_region(
    kvm: Kvm, region: KvmUserspaceMemoryRegion, *, hugepage_backed: bool = False
) -> KvmMemorySlot | None:
    """Create, delete (``memory_size == 0``) or re-flag a slot; returns the slot, None after a delete."""
    slot_id = region.slot
    if not 0 <= slot_id < KVM_USER_MEM_SLOTS:
        raise InvalidSlotError(
            f"KVM_SET_USER_MEMORY_REGION: slot {slot_id} is out of range; use 0..{KVM_USER_MEM_SLOTS - 1}"
        )
    if region.flags & ~_KNOWN_FLAGS:
        raise InvalidSlotError(
            f"KVM_SET_USER_MEMORY_REGION: slot {slot_id} has unknown flags {region.flags:#x}; "
            f"use KVM_MEM_LOG_DIRTY_PAGES ({KVM_MEM_LOG_DIRTY_PAGES}) and KVM_MEM_READONLY ({KVM_MEM_READONLY})"
        )
    for name in ("guest_phys_addr", "memory_size", "userspace_addr"):
        if getattr(region, name) % PAGE_SIZE:
            raise InvalidSlotError(
                f"KVM_SET_USER_MEMORY_REGION: slot {slot_id} {name} {getattr(region, name):#x} "
                f"is not a multiple of the {PAGE_SIZE}-byte page"
            )
    if region.guest_phys_addr + region.memory_size > KVM_PHYS_SIZE:
        raise InvalidSlotError(
            f"KVM_SET_USER_MEMORY_REGION: slot {slot_id} ends above the {KVM_PHYS_SIZE:#x} IPA limit"
        )
    old = kvm.memslots.get(slot_id)
    base_gfn = region.guest_phys_addr >> PAGE_SHIFT
    npages = region.memory_size >> PAGE_SHIFT

    if npages == 0:
        if old is not None:
            unmap_stage2_range(kvm, old.base_gfn << PAGE_SHIFT, old.npages << PAGE_SHIFT)
            del kvm.memslots[slot_id]
        return None

    if old is not None:
        if (old.base_gfn, old.npages, old.userspace_addr) != (base_gfn, npages, region.userspace_addr):
            raise InvalidSlotError(
                f"KVM_SET_USER_MEMORY_REGION: slot {slot_id} exists at gfn {old.base_gfn:#x} with "
                f"{old.npages} pages; the model only changes its flags (delete it to move or resize it)"
            )
        memslot = old
    else:
        for other in kvm.memslots.values():
            if base_gfn < other.end_gfn and other.base_gfn < base_gfn + npages:
                raise SlotOverlapError(
                    f"KVM_SET_USER_MEMORY_REGION: slot {slot_id} at gfn {base_gfn:#x}+{npages} overlaps "
                    f"slot {other.id} at gfn {other.base_gfn:#x}+{other.npages}; pick a free range"
                )
        memslot = KvmMemorySlot(slot_id, base_gfn, npages, region.userspace_addr, hugepage_backed=hugepage_backed)
        kvm.memslots[slot_id] = memslot

    was_logging = memslot.dirty_bitmap is not None
    memslot.flags = region.flags
    logging = bool(region.flags & KVM_MEM_LOG_DIRTY_PAGES)
    if logging and not was_logging:
        kvm_create_dirty_bitmap(memslot)
    elif not logging and was_logging:
        kvm_destroy_dirty_bitmap(memslot)
    kvm_arch_commit_memory_region(kvm, memslot, logging_enabled=logging and not was_logging)
    return memslot
