"""Stage-2 translation tables as the MMU reads them: pages of 64-bit descriptors in three levels.

Geometry is arm64 stage 2 with a 4 KiB granule and a 39-bit IPA space, which starts the walk at level 1
(as the ARMv7 LPAE stage 2 of the patch did): level 1 (``pgd``) entries span 1 GiB and always point to
tables; level 2 (``pmd``) entries span 2 MiB and are either a table or a *block*; level 3 (``pte``) entries
are 4 KiB pages. Bits follow the ARM ARM's VMSAv8-64 stage-2 descriptor:

====================  ======================================================
bit 0                 valid
bit 1                 levels 1-2: 1 = table, 0 = block; level 3: 1 = page
bits 7:6 (S2AP)       01 = read-only, 11 = read/write
bit 10                access flag
bits 47:12            output address (next table, or the page/block frame)
====================  ======================================================

Each table is an immutable 4 KiB ``bytes`` (little-endian u64s), replaced on every store. That is what
lets the interleaving checker snapshot the whole tree in O(tables) with shared, hash-cached values
instead of deep copies. Tables sit at deterministic physical addresses (derived from the IPA range they
map) so that two equal trees built in different orders encode equally.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import numpy as np

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
PTRS_PER_TABLE = 512
PMD_SHIFT = 21
PMD_SIZE = 1 << PMD_SHIFT
PGDIR_SHIFT = 30
PAGES_PER_BLOCK = PMD_SIZE // PAGE_SIZE
KVM_PHYS_SHIFT = 39
KVM_PHYS_SIZE = 1 << KVM_PHYS_SHIFT

DESC_VALID = 1 << 0
DESC_TABLE = 1 << 1
DESC_PAGE = DESC_TABLE
S2AP_SHIFT = 6
S2AP_MASK = 0b11 << S2AP_SHIFT
S2AP_RDONLY = 0b01 << S2AP_SHIFT
S2AP_RDWR = 0b11 << S2AP_SHIFT
DESC_AF = 1 << 10
MEMATTR_NORMAL = 0b1111 << 2
OA_MASK = ((1 << 48) - 1) & ~(PAGE_SIZE - 1)

# Where the model "allocates" table pages: far above any guest RAM frame, one page per IPA range.
_TABLE_POOL = 1 << 44
_U64 = struct.Struct("<Q")
_ZERO_TABLE = bytes(PAGE_SIZE)

TablesSaved = tuple[tuple[int, bytes], ...]


def pfn_pte(pfn: int, writable: bool) -> int:
    """A valid level-3 page descriptor for host frame ``pfn``."""
    return (
        (pfn << PAGE_SHIFT)
        | DESC_VALID
        | DESC_PAGE
        | DESC_AF
        | MEMATTR_NORMAL
        | (S2AP_RDWR if writable else S2AP_RDONLY)
    )


def pfn_pmd_huge(pfn: int, writable: bool) -> int:
    """A valid level-2 block descriptor mapping the 2 MiB starting at ``pfn``."""
    return (pfn << PAGE_SHIFT) | DESC_VALID | DESC_AF | MEMATTR_NORMAL | (S2AP_RDWR if writable else S2AP_RDONLY)


def table_desc(table_pa: int) -> int:
    """A valid table descriptor pointing at the next-level table at ``table_pa``."""
    return table_pa | DESC_VALID | DESC_TABLE


def desc_none(desc: int) -> bool:
    """pte_none/pmd_none: the entry is invalid (a walk through it takes a translation fault)."""
    return not desc & DESC_VALID


def pmd_huge(desc: int) -> bool:
    """kvm_pmd_huge: a valid level-2 entry that is a block, not a table."""
    return bool(desc & DESC_VALID) and not desc & DESC_TABLE


def kvm_s2pte_readonly(desc: int) -> bool:
    """kvm_s2pte_readonly / kvm_s2pmd_readonly: S2AP grants read but not write."""
    return desc & S2AP_MASK == S2AP_RDONLY


def desc_writable(desc: int) -> bool:
    """S2AP grants write."""
    return bool(desc & DESC_VALID) and desc & S2AP_MASK == S2AP_RDWR


def kvm_set_s2pte_readonly(desc: int) -> int:
    """kvm_set_s2pte_readonly / kvm_set_s2pmd_readonly: the same entry with S2AP = read-only."""
    return (desc & ~S2AP_MASK) | S2AP_RDONLY


def kvm_set_s2pte_writable(desc: int) -> int:
    """kvm_set_s2pte_writable / kvm_set_s2pmd_writable: the same entry with S2AP = read/write."""
    return (desc & ~S2AP_MASK) | S2AP_RDWR


def desc_address(desc: int) -> int:
    """The output address: next table or mapped frame."""
    return desc & OA_MASK


def pgd_index(ipa: int) -> int:
    """Index in the level-1 table."""
    return (ipa >> PGDIR_SHIFT) & (PTRS_PER_TABLE - 1)


def pmd_index(ipa: int) -> int:
    """Index in a level-2 table."""
    return (ipa >> PMD_SHIFT) & (PTRS_PER_TABLE - 1)


def pte_index(ipa: int) -> int:
    """Index in a level-3 table."""
    return (ipa >> PAGE_SHIFT) & (PTRS_PER_TABLE - 1)


class Walk(NamedTuple):
    """What a hardware table walk found: the leaf ``desc`` at ``level``, or ``desc == 0`` (translation fault)."""

    level: int
    desc: int


class Stage2PageTable:
    """The stage-2 tables of one VM (``kvm->arch.pgd`` and everything under it)."""

    def __init__(self) -> None:
        self.pgd = _TABLE_POOL
        self._tables: dict[int, bytes] = {self.pgd: _ZERO_TABLE}
        # The last saved value while no table changed: most checker steps leave the tables alone.
        self._saved: TablesSaved | None = None

    # -- table memory -----------------------------------------------------------------------------------
    def read(self, table_pa: int, index: int) -> int:
        """The descriptor at ``index`` of the table at ``table_pa``."""
        value: int = _U64.unpack_from(self._tables[table_pa], index * 8)[0]
        return value

    def write(self, table_pa: int, index: int, desc: int) -> None:
        """Store one descriptor (a single-copy-atomic 64-bit write, as kvm_set_pte is)."""
        table = self._tables[table_pa]
        offset = index * 8
        self._tables[table_pa] = table[:offset] + _U64.pack(desc) + table[offset + 8 :]
        self._saved = None

    def entries(self, table_pa: int) -> np.ndarray:
        """All 512 descriptors of a table, as a writable uint64 copy."""
        return np.frombuffer(self._tables[table_pa], dtype="<u8").copy()

    def store_entries(self, table_pa: int, entries: np.ndarray) -> None:
        """Replace a whole table's descriptors (the vectorised counterpart of :meth:`write`)."""
        self._tables[table_pa] = entries.astype("<u8", copy=False).tobytes()
        self._saved = None

    def alloc_table(self, level: int, ipa: int) -> int:
        """A zeroed table for the next level under the entry that maps ``ipa`` at ``level`` (1 or 2)."""
        if level == 1:
            pa = _TABLE_POOL + (1 + pgd_index(ipa)) * PAGE_SIZE
        else:
            pa = _TABLE_POOL + (1 + PTRS_PER_TABLE + (ipa >> PMD_SHIFT)) * PAGE_SIZE
        self._tables[pa] = _ZERO_TABLE
        self._saved = None
        return pa

    def free_table(self, table_pa: int) -> None:
        """Return a table page (put_page on its last reference)."""
        del self._tables[table_pa]
        self._saved = None

    @property
    def table_count(self) -> int:
        """Table pages in use, the level-1 table included."""
        return len(self._tables)

    # -- offsets, in the kernel's pgd/pmd/pte vocabulary --------------------------------------------------
    def pgd_offset(self, ipa: int) -> tuple[int, int]:
        """(table, index) of the level-1 entry for ``ipa``."""
        return self.pgd, pgd_index(ipa)

    def pmd_offset(self, pgd_desc: int, ipa: int) -> tuple[int, int]:
        """(table, index) of the level-2 entry for ``ipa`` under a table descriptor ``pgd_desc``."""
        return desc_address(pgd_desc), pmd_index(ipa)

    def pte_offset(self, pmd_desc: int, ipa: int) -> tuple[int, int]:
        """(table, index) of the level-3 entry for ``ipa`` under a table descriptor ``pmd_desc``."""
        return desc_address(pmd_desc), pte_index(ipa)

    def walk(self, ipa: int) -> Walk:
        """Translate ``ipa`` as the MMU does; the result carries the leaf's permissions."""
        pgd = self.read(self.pgd, pgd_index(ipa))
        if desc_none(pgd):
            return Walk(1, 0)
        pmd = self.read(desc_address(pgd), pmd_index(ipa))
        if desc_none(pmd):
            return Walk(2, 0)
        if pmd_huge(pmd):
            return Walk(2, pmd)
        return Walk(3, self.read(desc_address(pmd), pte_index(ipa)))

    # -- compact value for the checker -------------------------------------------------------------------
    def save(self) -> TablesSaved:
        """The whole tree as a hashable value (tables are shared, not copied)."""
        if self._saved is None:
            self._saved = tuple(sorted(self._tables.items()))
        return self._saved

    def restore(self, saved: TablesSaved) -> None:
        """Put the tree back to a value from :meth:`save`."""
        if saved is self._saved:
            return
        self._tables = dict(saved)
        self._saved = saved
