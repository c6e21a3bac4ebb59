"""Memory slots: where a slot sits in guest-physical memory, and the KVM memslot that backs it.

A :class:`SlotLayout` is the part of a slot that means the same in every process (a migration stream
carries it); a :class:`MemorySlot` is a slot registered with ``KVM_SET_USER_MEMORY_REGION``, which adds
the host address that backs it in this process and its flags.
"""

from __future__ import annotations

from dataclasses import dataclass

from dirtylog.kvm import abi
from dirtylog.units import PAGE_SIZE


@dataclass(frozen=True)
class SlotLayout:
    """Slot ``slot`` covers guest-physical ``[guest_phys_addr, guest_phys_addr + memory_size)``."""

    slot: int
    guest_phys_addr: int
    memory_size: int

    @property
    def base_gfn(self) -> int:
        """First guest page frame number of the slot."""
        return self.guest_phys_addr // PAGE_SIZE

    @property
    def npages(self) -> int:
        """Pages in the slot."""
        return self.memory_size // PAGE_SIZE

    @property
    def bitmap_bytes(self) -> int:
        """Bytes of this slot's dirty bitmap as KVM copies it (``kvm_dirty_bitmap_bytes``: whole u64 words)."""
        return (self.npages + 63) // 64 * 8

    @classmethod
    def of_pages(cls, slot: int, base_gfn: int, npages: int) -> SlotLayout:
        """The layout of ``npages`` pages from guest frame ``base_gfn``."""
        return cls(slot, base_gfn * PAGE_SIZE, npages * PAGE_SIZE)


@dataclass(frozen=True)
class MemorySlot(SlotLayout):
    """A KVM memory slot: its layout, backed at ``userspace_addr`` in this process, with KVM_MEM_* ``flags``."""

    userspace_addr: int
    flags: int = 0

    @property
    def layout(self) -> SlotLayout:
        """The slot's place in guest-physical memory, without this process's address."""
        return SlotLayout(self.slot, self.guest_phys_addr, self.memory_size)

    @property
    def logging(self) -> bool:
        """Whether KVM logs writes to this slot (``KVM_MEM_LOG_DIRTY_PAGES``)."""
        return bool(self.flags & abi.KVM_MEM_LOG_DIRTY_PAGES)
