"""KVM_GET_DIRTY_LOG as the seed patch implements it for ARM, one atomic step at a time.

The patch's order, per bitmap word and then once for the slot::

    memset(dirty_bitmap_buffer, 0, n);
    for each word i:                               (skipped when the word reads 0)
        mask = xchg(&dirty_bitmap[i], 0);          1. snapshot and clear, atomically
        dirty_bitmap_buffer[i] = mask;
        kvm_mmu_write_protect_pt_masked(..., mask) 2. write-protect those pages
    if (is_dirty) kvm_tlb_flush_vmid(kvm);         3. drop writable translations cached before step 2
    copy_to_user(log->dirty_bitmap, buffer, n);    4. hand the snapshot to userspace

Why nothing is lost while vCPUs keep writing: a write that lands after step 1 either goes through a
translation that is still writable — the page is in the snapshot (that is why it was writable and being
protected), and userspace reads the page only after step 4, so it sees the write — or it faults on the
read-only entry, and the fault sets the bit again for the next call. Step 3 closes the window a cached
writable TLB entry would otherwise keep open forever.

The order is data (:class:`DirtyLogOrder`), so a mutant is literally a one-line change of it
(:mod:`dirtylog.stage2.mutants`), and :class:`GetDirtyLog` runs any order step by step, which is how the
interleaving checker slots vCPU steps between the collector's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from dirtylog.stage2.errors import BadDestinationError, InvalidSlotError, NoDirtyBitmapError
from dirtylog.stage2.kvm import Kvm, id_to_memslot
from dirtylog.stage2.memslot import (
    BITS_PER_LONG,
    KVM_USER_MEM_SLOTS,
    KvmMemorySlot,
    kvm_dirty_bitmap_bytes,
    kvm_dirty_bitmap_words,
    kvm_second_dirty_bitmap,
)
from dirtylog.stage2.mmu import kvm_mmu_write_protect_pt_masked, kvm_tlb_flush_vmid


class Op(enum.Enum):
    """One atomic step of the collector; the value is the C it stands for."""

    MEMSET_BUFFER = "memset(dirty_bitmap_buffer, 0, n)"
    XCHG = "mask = xchg(&dirty_bitmap[i], 0); dirty_bitmap_buffer[i] = mask"
    READ_WORD = "mask = dirty_bitmap[i]; dirty_bitmap_buffer[i] = mask"
    CLEAR_WORD = "dirty_bitmap[i] = 0"
    WRITE_PROTECT = "kvm_mmu_write_protect_pt_masked(kvm, memslot, i * 64, mask)"
    WRITE_PROTECT_LIVE = "kvm_mmu_write_protect_pt_masked(kvm, memslot, i * 64, dirty_bitmap[i])"
    FLUSH_IF_DIRTY = "if (is_dirty) kvm_tlb_flush_vmid(kvm)"
    COPY_TO_USER = "copy_to_user(log->dirty_bitmap, dirty_bitmap_buffer, n)"
    CLEAR_BITMAP = "memset(dirty_bitmap, 0, n)"

    @property
    def reads_word(self) -> bool:
        """Whether the op reads the live word, so its ``if (!dirty_bitmap[i]) continue`` check is here."""
        return self in (Op.XCHG, Op.READ_WORD, Op.WRITE_PROTECT_LIVE)


@dataclass(frozen=True)
class DirtyLogOrder:
    """An order of collector steps: ``before`` the word loop, ``per_word`` in it, ``after`` it."""

    name: str
    before: tuple[Op, ...]
    per_word: tuple[Op, ...]
    after: tuple[Op, ...]

    def program(self, nwords: int) -> tuple[CollectorStep, ...]:
        """The steps for a slot of ``nwords`` bitmap words, with where each word's steps end."""
        steps: list[CollectorStep] = [CollectorStep(op, -1, -1) for op in self.before]
        for word in range(nwords):
            end = len(steps) + len(self.per_word)
            steps.extend(CollectorStep(op, word, end) for op in self.per_word)
        steps.extend(CollectorStep(op, -1, -1) for op in self.after)
        return tuple(steps)

    def listing(self) -> list[str]:
        """The order as C-like lines, for people."""
        lines = [op.value + ";" for op in self.before]
        lines.append("for (i = 0; i < n / sizeof(long); i++) {  /* continue if !dirty_bitmap[i] */")
        lines.extend(f"    {op.value};" for op in self.per_word)
        lines.append("}")
        lines.extend(op.value + ";" for op in self.after)
        return lines


class CollectorStep(NamedTuple):
    """One step of a program: ``word`` is -1 outside the loop; ``word_end`` is where the word's steps end."""

    op: Op
    word: int
    word_end: int


PATCH_ORDER = DirtyLogOrder(
    name="patch",
    before=(Op.MEMSET_BUFFER,),
    per_word=(Op.XCHG, Op.WRITE_PROTECT),
    after=(Op.FLUSH_IF_DIRTY, Op.COPY_TO_USER),
)


@dataclass
class KvmDirtyLog:
    """``struct kvm_dirty_log``: which slot, and the userspace buffer to copy its bitmap into."""

    slot: int
    dirty_bitmap: bytearray | memoryview | np.ndarray | None


def copy_to_user(destination: bytearray | memoryview | np.ndarray | None, words: list[int], n: int) -> str | None:
    """Write ``n`` bytes of little-endian words into ``destination``; the reason it failed, or None."""
    if destination is None:
        return "the destination is NULL"
    try:
        raw = destination.data if isinstance(destination, np.ndarray) else memoryview(destination)
        view = raw.cast("B")
    except (TypeError, ValueError) as error:
        return f"the destination is not a contiguous buffer ({error})"
    if view.readonly:
        return "the destination is read-only"
    if view.nbytes < n:
        return f"the destination has {view.nbytes} bytes"
    view[:n] = np.array(words, dtype="<u8").tobytes()
    return None


def _logging_slots(kvm: Kvm) -> str:
    ids = [str(slot.id) for slot in kvm.memslots.values() if slot.dirty_bitmap is not None]
    return ", ".join(ids) if ids else "none"


def lookup_logging_memslot(kvm: Kvm, slot_id: int) -> KvmMemorySlot:
    """The slot whose log is asked for, or EINVAL (bad id) / ENOENT (no bitmap), as the ioctl checks."""
    if not 0 <= slot_id < KVM_USER_MEM_SLOTS:
        raise InvalidSlotError(
            f"KVM_GET_DIRTY_LOG: slot {slot_id} is out of range; valid slot ids are 0..{KVM_USER_MEM_SLOTS - 1} "
            f"(slots logging dirty pages: {_logging_slots(kvm)})"
        )
    memslot = id_to_memslot(kvm, slot_id)
    if memslot is None or memslot.dirty_bitmap is None:
        why = "is not registered" if memslot is None else "does not log dirty pages"
        raise NoDirtyBitmapError(
            f"KVM_GET_DIRTY_LOG: slot {slot_id} has no dirty bitmap: it {why}; set KVM_MEM_LOG_DIRTY_PAGES "
            f"on it first, or ask a slot that logs ({_logging_slots(kvm)})"
        )
    return memslot


class GetDirtyLog:
    """One KVM_GET_DIRTY_LOG call in progress; :meth:`step` performs exactly one atomic step.

    EINVAL and ENOENT are raised on construction (the ioctl's entry checks), EFAULT by the copy step.
    """

    def __init__(self, kvm: Kvm, log: KvmDirtyLog, order: DirtyLogOrder = PATCH_ORDER) -> None:
        self.kvm = kvm
        self.log = log
        self.order = order
        self.memslot = lookup_logging_memslot(kvm, log.slot)
        self.n = kvm_dirty_bitmap_bytes(self.memslot)
        self.program = order.program(kvm_dirty_bitmap_words(self.memslot))
        self.pc = 0
        self.is_dirty = False
        self.mask = 0
        self.continued = False

    @property
    def done(self) -> bool:
        """Whether every step has run."""
        return self.pc >= len(self.program)

    @property
    def next_step(self) -> CollectorStep:
        """The step :meth:`step` will perform."""
        return self.program[self.pc]

    def buffer_words(self) -> list[int]:
        """The second-half buffer: what the copy step hands (or handed) to userspace."""
        bitmap = self.memslot.dirty_bitmap
        assert bitmap is not None
        start = kvm_second_dirty_bitmap(self.memslot)
        return bitmap[start : start + kvm_dirty_bitmap_words(self.memslot)]

    def step(self) -> CollectorStep:
        """Perform the next step and return it; ``continued`` tells whether it found the word 0 and skipped on."""
        current = self.program[self.pc]
        op, word = current.op, current.word
        bitmap = self.memslot.dirty_bitmap
        assert bitmap is not None, "the slot stopped logging during KVM_GET_DIRTY_LOG"
        buffer = kvm_second_dirty_bitmap(self.memslot)
        self.pc += 1
        self.continued = op.reads_word and bitmap[word] == 0
        if self.continued:
            self.pc = current.word_end
        elif op is Op.MEMSET_BUFFER:
            bitmap[buffer : buffer + kvm_dirty_bitmap_words(self.memslot)] = [0] * kvm_dirty_bitmap_words(self.memslot)
        elif op is Op.XCHG:
            self.mask, bitmap[word] = bitmap[word], 0
            bitmap[buffer + word] = self.mask
            self.is_dirty = True
        elif op is Op.READ_WORD:
            self.mask = bitmap[word]
            bitmap[buffer + word] = self.mask
            self.is_dirty = True
        elif op is Op.CLEAR_WORD:
            bitmap[word] = 0
        elif op is Op.WRITE_PROTECT:
            kvm_mmu_write_protect_pt_masked(self.kvm, self.memslot, word * BITS_PER_LONG, self.mask)
        elif op is Op.WRITE_PROTECT_LIVE:
            kvm_mmu_write_protect_pt_masked(self.kvm, self.memslot, word * BITS_PER_LONG, bitmap[word])
        elif op is Op.FLUSH_IF_DIRTY:
            kvm_tlb_flush_vmid(self.kvm)
        elif op is Op.CLEAR_BITMAP:
            bitmap[:buffer] = [0] * buffer
        elif op is Op.COPY_TO_USER:
            failure = copy_to_user(self.log.dirty_bitmap, self.buffer_words(), self.n)
            if failure is not None:
                self.pc = len(self.program)
                raise BadDestinationError(
                    f"KVM_GET_DIRTY_LOG: cannot copy slot {self.log.slot}'s log: {failure}; pass a writable "
                    f"buffer of at least {self.n} bytes (kvm_dirty_bitmap_bytes). As in the kernel, the bits "
                    f"were already cleared and their pages write-protected: treat the whole slot as dirty"
                )
        # A flush with nothing dirty does nothing at all, so it is not worth a step of its own.
        while not self.done and self.program[self.pc].op is Op.FLUSH_IF_DIRTY and not self.is_dirty:
            self.pc += 1
        return current

    def run(self) -> None:
        """Perform every remaining step."""
        while not self.done:
            self.step()

    def save(self) -> tuple[int, bool, int]:
        """The collector's private state (the buffer lives in the memslot)."""
        return self.pc, self.is_dirty, self.mask

    def restore(self, saved: tuple[int, bool, int]) -> None:
        """Put the private state back."""
        self.pc, self.is_dirty, self.mask = saved


def kvm_vm_ioctl_get_dirty_log(kvm: Kvm, log: KvmDirtyLog, order: DirtyLogOrder = PATCH_ORDER) -> None:
    """Snapshot, clear and re-protect a slot's log and copy it to ``log.dirty_bitmap``, in the patch's order."""
    GetDirtyLog(kvm, log, order).run()
