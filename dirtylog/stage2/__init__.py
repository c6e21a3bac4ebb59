"""The seed patch's ARM dirty-page logging as a pure, executable stage-2 model, with an interleaving checker.

A kernel engineer should be able to put each module beside the C it mirrors (docs/stage2-model.md has the
map): ``memslot`` and ``kvm`` (include/linux/kvm_host.h, virt/kvm/kvm_main.c), ``pgtable`` (stage-2
descriptors), ``tlb`` (per-CPU TLBs tagged by VMID), ``mmu`` (arch/arm/kvm/mmu.c), ``cpu`` (what the
hardware does on an access), ``regions`` (KVM_SET_USER_MEMORY_REGION), ``dirty_log`` (KVM_GET_DIRTY_LOG
step by step), ``mutants`` (broken orders) and ``checker`` (every interleaving of vCPUs and collector).

No threads, no I/O: everything takes values and returns values, so the checker can enumerate states.
"""

from __future__ import annotations

from dirtylog.stage2.checker import CheckConfig, CheckResult, Counterexample, TraceStep, check
from dirtylog.stage2.cpu import vcpu_read, vcpu_write
from dirtylog.stage2.dirty_log import PATCH_ORDER, DirtyLogOrder, GetDirtyLog, KvmDirtyLog, kvm_vm_ioctl_get_dirty_log
from dirtylog.stage2.errors import BadDestinationError, InvalidSlotError, NoDirtyBitmapError, Stage2Error
from dirtylog.stage2.kvm import Kvm, KvmVcpu, kvm_create_vm, mark_page_dirty
from dirtylog.stage2.memslot import KVM_MEM_LOG_DIRTY_PAGES, KvmMemorySlot, kvm_dirty_bitmap_bytes
from dirtylog.stage2.mutants import MUTANTS, PATCH, Variant, variant_named
from dirtylog.stage2.regions import KvmUserspaceMemoryRegion, kvm_vm_ioctl_set_user_memory_region

__all__ = [
    "KVM_MEM_LOG_DIRTY_PAGES",
    "MUTANTS",
    "PATCH",
    "PATCH_ORDER",
    "BadDestinationError",
    "CheckConfig",
    "CheckResult",
    "Counterexample",
    "DirtyLogOrder",
    "GetDirtyLog",
    "InvalidSlotError",
    "Kvm",
    "KvmDirtyLog",
    "KvmMemorySlot",
    "KvmUserspaceMemoryRegion",
    "KvmVcpu",
    "NoDirtyBitmapError",
    "Stage2Error",
    "TraceStep",
    "Variant",
    "check",
    "kvm_create_vm",
    "kvm_dirty_bitmap_bytes",
    "kvm_vm_ioctl_get_dirty_log",
    "kvm_vm_ioctl_set_user_memory_region",
    "mark_page_dirty",
    "variant_named",
    "vcpu_read",
    "vcpu_write",
]
