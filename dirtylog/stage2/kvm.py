"""``struct kvm`` and ``struct kvm_vcpu`` of the model, and the generic helpers of virt/kvm/kvm_main.c.

Only what the dirty log touches is here: the memslots, the stage-2 tables (``kvm->arch.pgd``), the VMID,
and per vCPU the TLB of the CPU it runs on.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from dirtylog.stage2.memslot import BITS_PER_LONG, KvmMemorySlot
from dirtylog.stage2.pgtable import Stage2PageTable, TablesSaved
from dirtylog.stage2.tlb import Tlb, TlbSaved

SlotSaved = tuple[int, int, tuple[int, ...] | None]
KvmSaved = tuple[TablesSaved, tuple[TlbSaved, ...], tuple[SlotSaved, ...]]


@dataclass(eq=False)
class KvmVcpu:
    """One vCPU and the TLB of the physical CPU it runs on."""

    vcpu_id: int
    tlb: Tlb


@dataclass(eq=False)
class Kvm:
    """One VM: its memslots by id, its stage-2 tables, its VMID and its vCPUs."""

    vmid: int
    pgt: Stage2PageTable = field(default_factory=Stage2PageTable)
    memslots: dict[int, KvmMemorySlot] = field(default_factory=dict)
    vcpus: list[KvmVcpu] = field(default_factory=list)
    #: How often each kernel function of the model ran, by its name (as ftrace counts them in the kernel).
    #: Not part of :meth:`save`: the checker's states are the VM's, not its history.
    stat: Counter[str] = field(default_factory=Counter)

    def save(self) -> KvmSaved:
        """Everything mutable, as one hashable value: tables, every TLB, every slot's flags and bitmap."""
        return (
            self.pgt.save(),
            tuple(vcpu.tlb.save() for vcpu in self.vcpus),
            tuple(
                (slot.id, slot.flags, None if slot.dirty_bitmap is None else tuple(slot.dirty_bitmap))
                for slot in self.memslots.values()
            ),
        )

    def restore(self, saved: KvmSaved) -> None:
        """Put the VM back to a value from :meth:`save` (the memslot layout itself must not have changed)."""
        tables, tlbs, slots = saved
        self.pgt.restore(tables)
        for vcpu, tlb in zip(self.vcpus, tlbs, strict=True):
            vcpu.tlb.restore(tlb)
        for slot_id, flags, bitmap in slots:
            slot = self.memslots[slot_id]
            slot.flags = flags
            slot.dirty_bitmap = None if bitmap is None else list(bitmap)


def kvm_create_vm(vmid: int = 1, nr_vcpus: int = 1, tlb_entries: int | None = None) -> Kvm:
    """A VM with ``nr_vcpus`` vCPUs, empty tables and no memslots."""
    kvm = Kvm(vmid=vmid)
    kvm.vcpus = [KvmVcpu(vcpu_id=i, tlb=Tlb(tlb_entries)) for i in range(nr_vcpus)]
    return kvm


def id_to_memslot(kvm: Kvm, slot_id: int) -> KvmMemorySlot | None:
    """The registered slot with this id, if any."""
    return kvm.memslots.get(slot_id)


def gfn_to_memslot(kvm: Kvm, gfn: int) -> KvmMemorySlot | None:
    """The slot containing ``gfn``, if any."""
    for slot in kvm.memslots.values():
        if slot.base_gfn <= gfn < slot.base_gfn + slot.npages:
            return slot
    return None


def mark_page_dirty(kvm: Kvm, gfn: int) -> bool:
    """Set ``gfn``'s bit in its slot's live bitmap (an atomic set_bit); False when the slot is not logging."""
    slot = gfn_to_memslot(kvm, gfn)
    if slot is None or slot.dirty_bitmap is None:
        return False
    rel = gfn - slot.base_gfn
    slot.dirty_bitmap[rel // BITS_PER_LONG] |= 1 << (rel % BITS_PER_LONG)
    kvm.stat["mark_page_dirty"] += 1
    return True
