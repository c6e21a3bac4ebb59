"""Deliberately broken variants of the patch, each one line away from it, for the checker to refute.

The first five are the orders the issue asks about; the last three break the other patches of the series
(the fault path of 4/4, the initial write-protect of 2/4) or the buffer handling, and show that the
checker's second invariant (no phantom pages) can fail too.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from dirtylog.stage2.dirty_log import PATCH_ORDER, DirtyLogOrder, Op
from dirtylog.stage2.errors import Stage2Error

FaultOrder = Literal["map-then-mark", "mark-then-map"]


class UnknownMutantError(Stage2Error, ValueError):
    """A mutant name the checker does not know."""


@dataclass(frozen=True)
class Variant:
    """The algorithm under check: the collector's order, the fault path's order, the initial protect."""

    name: str
    summary: str
    change: str
    order: DirtyLogOrder = PATCH_ORDER
    fault_order: FaultOrder = "map-then-mark"
    initial_write_protect: bool = True

    @property
    def is_patch(self) -> bool:
        """Whether this is the patch itself rather than a mutant."""
        return self.name == PATCH.name


PATCH = Variant(
    name="patch",
    summary="the seed patch: xchg, write-protect, flush the VMID's TLBs, then copy_to_user",
    change="(none)",
)

MUTANTS: tuple[Variant, ...] = (
    Variant(
        name="skip-tlb-flush",
        summary="omit kvm_tlb_flush_vmid: a writable TLB entry outlives the write-protect",
        change="-    if (is_dirty) kvm_tlb_flush_vmid(kvm);",
        order=replace(PATCH_ORDER, name="skip-tlb-flush", after=(Op.COPY_TO_USER,)),
    ),
    Variant(
        name="wp-before-snapshot",
        summary="write-protect the word's pages before the xchg that snapshots and clears it",
        change="kvm_mmu_write_protect_pt_masked(.., dirty_bitmap[i]) moved above mask = xchg(..)",
        order=replace(PATCH_ORDER, name="wp-before-snapshot", per_word=(Op.WRITE_PROTECT_LIVE, Op.XCHG)),
    ),
    Variant(
        name="clear-after-copy",
        summary="snapshot with a plain read and clear the live bitmap only after copy_to_user",
        change="dirty_bitmap[i] = 0 moved from the snapshot to after copy_to_user (as memset)",
        order=replace(
            PATCH_ORDER,
            name="clear-after-copy",
            per_word=(Op.READ_WORD, Op.WRITE_PROTECT),
            after=(Op.FLUSH_IF_DIRTY, Op.COPY_TO_USER, Op.CLEAR_BITMAP),
        ),
    ),
    Variant(
        name="read-then-clear",
        summary="replace the atomic xchg by a read and a separate store of 0",
        change="-    mask = xchg(&dirty_bitmap[i], 0);  +    mask = dirty_bitmap[i]; dirty_bitmap[i] = 0;",
        order=replace(PATCH_ORDER, name="read-then-clear", per_word=(Op.READ_WORD, Op.CLEAR_WORD, Op.WRITE_PROTECT)),
    ),
    Variant(
        name="flush-before-wp",
        summary="flush the TLBs before write-protecting the word's pages instead of after",
        change="if (is_dirty) kvm_tlb_flush_vmid(kvm) moved above kvm_mmu_write_protect_pt_masked(..)",
        order=replace(
            PATCH_ORDER,
            name="flush-before-wp",
            per_word=(Op.XCHG, Op.FLUSH_IF_DIRTY, Op.WRITE_PROTECT),
            after=(Op.COPY_TO_USER,),
        ),
    ),
    Variant(
        name="no-buffer-memset",
        summary="omit the memset of the second-half buffer: a stale snapshot word is reported again",
        change="-    memset(dirty_bitmap_buffer, 0, n);",
        order=replace(PATCH_ORDER, name="no-buffer-memset", before=()),
    ),
    Variant(
        name="mark-before-map",
        summary="in user_mem_abort, mark_page_dirty before stage2_set_pte with no mmu_lock around both",
        change="mark_page_dirty(kvm, gfn) moved above stage2_set_pte(..) (safe only under mmu_lock)",
        fault_order="mark-then-map",
    ),
    Variant(
        name="skip-initial-wp",
        summary="omit kvm_mmu_wp_memory_region when logging is switched on (patch 2/4)",
        change="-    kvm_mmu_wp_memory_region(kvm, mem->slot);",
        initial_write_protect=False,
    ),
)

VARIANTS: dict[str, Variant] = {variant.name: variant for variant in (PATCH, *MUTANTS)}


def variant_named(name: str | None) -> Variant:
    """The patch (``None`` or "patch") or the mutant called ``name``."""
    if name is None:
        return PATCH
    try:
        return VARIANTS[name]
    except KeyError:
        raise UnknownMutantError(
            f"unknown mutant {name!r}; choose one of {', '.join(m.name for m in MUTANTS)}"
        ) from None
