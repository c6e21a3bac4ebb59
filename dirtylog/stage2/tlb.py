"""A vCPU's TLB: cached stage-2 translations, tagged by VMID, *with the permissions they were walked with*.

The whole point of the TLB flush in the patch is that a cached entry keeps its write permission after the
table entry behind it was made read-only: until it is invalidated, a write through it goes straight to
memory without a fault, so without a bitmap bit. The model therefore never re-checks the tables on a hit.

An entry maps either one page (level 3) or one 2 MiB block (level 2). Capacity is unlimited by default,
which is the adversarial choice for the checker (stale entries live as long as possible); the tracker
adapter bounds it and evicts the oldest entry, as a real TLB would evict something.
"""

from __future__ import annotations

from typing import NamedTuple

from dirtylog.stage2.errors import ModelSettingError
from dirtylog.stage2.pgtable import PAGES_PER_BLOCK

_BLOCK_MASK = ~(PAGES_PER_BLOCK - 1)


class TlbEntry(NamedTuple):
    """One cached translation: ``level`` 3 (page) or 2 (block), output frame, write permission."""

    level: int
    base_gfn: int
    pfn: int
    writable: bool


TlbSaved = tuple[tuple[tuple[int, int, int], TlbEntry], ...]


class Tlb:
    """The TLB of one vCPU (one physical CPU running it)."""

    def __init__(self, capacity: int | None = None) -> None:
        if capacity is not None and capacity < 1:
            raise ModelSettingError(f"TLB capacity must be at least 1 entry, got {capacity}")
        self.capacity = capacity
        self._entries: dict[tuple[int, int, int], TlbEntry] = {}
        # The last saved value while nothing changed: most checker steps leave a TLB alone.
        self._saved: TlbSaved | None = ()

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, vmid: int, gfn: int) -> TlbEntry | None:
        """The entry translating ``gfn`` for ``vmid``, page entries first."""
        entry = self._entries.get((vmid, 3, gfn))
        if entry is None:
            entry = self._entries.get((vmid, 2, gfn & _BLOCK_MASK))
        return entry

    def fill(self, vmid: int, entry: TlbEntry) -> None:
        """Cache what a walk found."""
        key = (vmid, entry.level, entry.base_gfn)
        if self.capacity is not None and key not in self._entries and len(self._entries) >= self.capacity:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = entry
        self._saved = None

    def invalidate_vmid(self, vmid: int) -> int:
        """TLBI VMALLS12E1IS: drop every entry of ``vmid``; returns how many went."""
        doomed = [key for key in self._entries if key[0] == vmid]
        for key in doomed:
            del self._entries[key]
        if doomed:
            self._saved = None
        return len(doomed)

    def invalidate_ipa(self, vmid: int, gfn: int) -> int:
        """TLBI IPAS2E1IS: drop the entries of ``vmid`` that translate ``gfn`` (page or covering block)."""
        dropped = 0
        for key in ((vmid, 3, gfn), (vmid, 2, gfn & _BLOCK_MASK)):
            if self._entries.pop(key, None) is not None:
                dropped += 1
        if dropped:
            self._saved = None
        return dropped

    def entries(self) -> list[TlbEntry]:
        """The cached entries (any VMID), oldest first."""
        return list(self._entries.values())

    def writable_gfns(self, vmid: int) -> set[int]:
        """Pages ``vmid`` can write through this TLB without a walk (blocks expanded)."""
        pages: set[int] = set()
        for (tag, _, _), entry in self._entries.items():
            if tag == vmid and entry.writable:
                span = 1 if entry.level == 3 else PAGES_PER_BLOCK
                pages.update(range(entry.base_gfn, entry.base_gfn + span))
        return pages

    def save(self) -> TlbSaved:
        """The entries as a hashable, order-independent value."""
        if self._saved is None:
            self._saved = tuple(sorted(self._entries.items()))
        return self._saved

    def restore(self, saved: TlbSaved) -> None:
        """Put the entries back to a value from :meth:`save`."""
        if saved is self._saved:
            return
        self._entries = dict(saved)
        self._saved = saved
