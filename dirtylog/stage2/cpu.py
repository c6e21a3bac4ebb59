"""What the CPU does on a guest access: TLB lookup, table walk on a miss, stage-2 abort on a fault.

``guest_access`` is one hardware access and is atomic (a TLB invalidation with DSB waits for accesses
already using the old translation). ``vcpu_write``/``vcpu_read`` add KVM's side: take the abort, resolve it
with user_mem_abort, re-execute the instruction, until the access retires.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from dirtylog.stage2.kvm import Kvm, KvmVcpu
from dirtylog.stage2.mmu import kvm_handle_guest_abort
from dirtylog.stage2.pgtable import PAGE_SHIFT, PAGES_PER_BLOCK, desc_address, desc_writable
from dirtylog.stage2.tlb import TlbEntry

# A write can fault at most twice in a row without a concurrent collector: translation, then permission
# (on a read-only block being dissolved); more means the model is looping.
_MAX_FAULTS = 4


class Stage2Fault(NamedTuple):
    """A stage-2 abort: ``kind`` is a missing entry (translation) or a denied write (permission)."""

    kind: Literal["translation", "permission"]
    level: int
    gfn: int
    write: bool


def guest_access(kvm: Kvm, vcpu: KvmVcpu, gfn: int, write: bool) -> Stage2Fault | None:
    """One access by ``vcpu`` to page ``gfn``: None when it retired, else the abort it took.

    A TLB hit is final: the cached permission decides, whatever the tables say now.
    """
    entry = vcpu.tlb.lookup(kvm.vmid, gfn)
    if entry is None:
        walk = kvm.pgt.walk(gfn << PAGE_SHIFT)
        if walk.desc == 0:
            return Stage2Fault("translation", walk.level, gfn, write)
        base_gfn = gfn if walk.level == 3 else gfn & ~(PAGES_PER_BLOCK - 1)
        entry = TlbEntry(walk.level, base_gfn, desc_address(walk.desc) >> PAGE_SHIFT, desc_writable(walk.desc))
        vcpu.tlb.fill(kvm.vmid, entry)
    if write and not entry.writable:
        return Stage2Fault("permission", entry.level, gfn, write)
    return None


def vcpu_access(kvm: Kvm, vcpu: KvmVcpu, gfn: int, write: bool) -> int:
    """Run one guest access to completion through any stage-2 aborts; returns how many were taken."""
    for faults in range(_MAX_FAULTS + 1):
        fault = guest_access(kvm, vcpu, gfn, write)
        if fault is None:
            return faults
        kvm_handle_guest_abort(vcpu, kvm, gfn << PAGE_SHIFT, write)
    raise AssertionError(f"vCPU {vcpu.vcpu_id}: access to gfn {gfn:#x} still faults after {_MAX_FAULTS} aborts")


def vcpu_write(kvm: Kvm, vcpu: KvmVcpu, gfn: int) -> int:
    """A guest store to ``gfn``, retired; returns the number of stage-2 aborts it took."""
    return vcpu_access(kvm, vcpu, gfn, write=True)


def vcpu_read(kvm: Kvm, vcpu: KvmVcpu, gfn: int) -> int:
    """A guest load from ``gfn``, retired; returns the number of stage-2 aborts it took."""
    return vcpu_access(kvm, vcpu, gfn, write=False)
