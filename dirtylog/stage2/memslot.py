"""``struct kvm_memory_slot`` and its dirty bitmap (include/linux/kvm_host.h, virt/kvm/kvm_main.c).

The bitmap is one allocation of ``2 * kvm_dirty_bitmap_bytes`` as in ``kvm_create_dirty_bitmap``: the first
half is the live log that ``mark_page_dirty`` sets bits in, the second half is the buffer
``kvm_vm_ioctl_get_dirty_log`` snapshots into before copying to userspace. Words are Python ints holding
64 bits (``unsigned long`` on arm64), so a word-sized ``xchg`` is one list assignment.
"""

from __future__ import annotations

from dataclasses import dataclass

BITS_PER_LONG = 64
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
# arch/arm/include/asm/kvm_host.h at the time of the patch.
KVM_USER_MEM_SLOTS = 32


@dataclass(eq=False)
class KvmMemorySlot:
    """A guest-physical range ``[base_gfn, base_gfn + npages)`` backed by host memory at ``userspace_addr``.

    ``hugepage_backed`` stands for a VMA backed by transparent or hugetlbfs huge pages: only then may a
    fault map a 2 MiB stage-2 block.
    """

    id: int
    base_gfn: int
    npages: int
    userspace_addr: int
    flags: int = 0
    hugepage_backed: bool = False
    dirty_bitmap: list[int] | None = None

    @property
    def end_gfn(self) -> int:
        """First gfn after the slot."""
        return self.base_gfn + self.npages

    def __repr__(self) -> str:
        return f"KvmMemorySlot(id={self.id}, base_gfn={self.base_gfn:#x}, npages={self.npages})"


def kvm_dirty_bitmap_bytes(memslot: KvmMemorySlot) -> int:
    """Bytes of one half of the slot's dirty bitmap: npages rounded up to whole longs."""
    return -(-memslot.npages // BITS_PER_LONG) * (BITS_PER_LONG // 8)


def kvm_dirty_bitmap_words(memslot: KvmMemorySlot) -> int:
    """Words (longs) of one half of the slot's dirty bitmap."""
    return kvm_dirty_bitmap_bytes(memslot) // (BITS_PER_LONG // 8)


def kvm_second_dirty_bitmap(memslot: KvmMemorySlot) -> int:
    """Index in ``memslot.dirty_bitmap`` where the second half (the snapshot buffer) starts."""
    return kvm_dirty_bitmap_words(memslot)


def kvm_create_dirty_bitmap(memslot: KvmMemorySlot) -> None:
    """Allocate both halves zeroed, as vzalloc does."""
    memslot.dirty_bitmap = [0] * (2 * kvm_dirty_bitmap_words(memslot))


def kvm_destroy_dirty_bitmap(memslot: KvmMemorySlot) -> None:
    """Free the bitmap; the slot stops logging."""
    memslot.dirty_bitmap = None


def memslot_is_logging(memslot: KvmMemorySlot) -> bool:
    """Logging is on when the slot has a bitmap and is writable (arch/arm/kvm/mmu.c)."""
    return memslot.dirty_bitmap is not None and not memslot.flags & KVM_MEM_READONLY
