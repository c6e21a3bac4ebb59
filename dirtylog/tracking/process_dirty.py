"""What one collection of a process's dirty pages holds: written page runs, by mapping. Pure NumPy, no I/O.

A process's address space is sparse (a few hundred mappings scattered over 128 TiB), so a collection is
not one bitmap but a list of written runs ``[start, end)`` of virtual addresses, each owned by one
mapping as ``/proc/PID/maps`` names it. :class:`ProcessDirty` keeps them as two sorted address arrays and
an owner index, and derives the rest on demand: page addresses, counts per mapping or per name, and a
:class:`~dirtylog.bitmap.DirtyBitmap` per mapping (bit ``i`` is the page at ``mapping.start + i * 4096``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from dirtylog.bitmap import DirtyBitmap
from dirtylog.linux.procfs import Mapping
from dirtylog.units import PAGE_SIZE

Addresses = npt.NDArray[np.uint64]


def split_at(starts: Addresses, ends: Addresses, cuts: Addresses) -> tuple[Addresses, Addresses]:
    """Runs ``[starts, ends)`` cut wherever a cut point falls strictly inside one (whole-array).

    The kernel merges neighbouring written pages into one run even across a mapping boundary; cutting at
    every mapping start gives each piece one owner.
    """
    if starts.size == 0 or cuts.size == 0:
        return starts, ends
    first_cut = np.searchsorted(cuts, starts, side="right")
    inside = np.searchsorted(cuts, ends, side="left") - first_cut
    if not inside.any():
        return starts, ends
    pieces = inside + 1
    run = np.repeat(np.arange(starts.size), pieces)
    piece = np.arange(int(pieces.sum())) - np.repeat(np.cumsum(pieces) - pieces, pieces)
    cut = first_cut[run] + piece  # index of the cut that ends this piece
    last = cuts.size - 1
    new_starts = np.where(piece == 0, starts[run], cuts[np.minimum(cut - 1, last)])
    new_ends = np.where(piece == inside[run], ends[run], cuts[np.minimum(cut, last)])
    return new_starts.astype(np.uint64), new_ends.astype(np.uint64)


@dataclass(frozen=True)
class ProcessDirty:
    """Pages of a process written since the previous collection, by mapping.

    ``mappings`` are the mappings tracked at this collection (address order); ``starts``/``ends`` the
    written runs (address order, each inside one mapping) and ``owner`` the index of each run's mapping.
    ``new`` mappings were found (and registered) at this collection — their pages written since they
    appeared count as written now; ``gone`` ones were tracked and are no longer mapped. ``exited`` is set
    on the collection that found the process gone: the last one.
    """

    mappings: tuple[Mapping, ...]
    starts: Addresses
    ends: Addresses
    owner: npt.NDArray[np.intp]
    new: tuple[Mapping, ...] = ()
    gone: tuple[Mapping, ...] = ()
    exited: bool = False
    _counts: list[npt.NDArray[np.int64]] = field(default_factory=list, repr=False, compare=False)

    @classmethod
    def from_runs(cls, mappings: Sequence[Mapping], starts: Addresses, ends: Addresses, *,
                  new: Sequence[Mapping] = (), gone: Sequence[Mapping] = (), exited: bool = False) -> ProcessDirty:
        """Sort the runs, cut them at mapping boundaries and find their owners."""
        mapping_starts = np.array([m.start for m in mappings], dtype=np.uint64)
        order = np.argsort(starts, kind="stable")
        starts, ends = split_at(starts[order], ends[order], mapping_starts)
        owner = np.searchsorted(mapping_starts, starts, side="right") - 1
        return cls(tuple(mappings), starts, ends, owner, tuple(new), tuple(gone), exited)

    @classmethod
    def empty(cls, mappings: Sequence[Mapping] = (), *, exited: bool = False) -> ProcessDirty:
        nothing = np.zeros(0, dtype=np.uint64)
        return cls.from_runs(mappings, nothing, nothing, exited=exited)

    # --- how many -----------------------------------------------------------------------------------

    def mapping_counts(self) -> npt.NDArray[np.int64]:
        """Written pages per mapping, in the order of :attr:`mappings`."""
        if not self._counts:
            lengths = ((self.ends - self.starts) // np.uint64(PAGE_SIZE)).astype(np.int64)
            counts = np.bincount(self.owner, weights=lengths, minlength=len(self.mappings)).astype(np.int64)
            self._counts.append(counts)
        return self._counts[0]

    def count(self) -> int:
        """Written pages in all."""
        return int(self.mapping_counts().sum())

    def counts(self) -> dict[Mapping, int]:
        """Written pages of each mapping that has any."""
        counts = self.mapping_counts()
        return {self.mappings[i]: int(counts[i]) for i in np.flatnonzero(counts).tolist()}

    def counts_by_name(self) -> dict[str, int]:
        """Written pages summed over mappings of the same name (``[heap]``, a file, ``anon``...)."""
        totals: dict[str, int] = defaultdict(int)
        for mapping, count in self.counts().items():
            totals[mapping.name] += count
        return dict(totals)

    def tracked_pages(self) -> int:
        """Pages in all tracked mappings: the denominator of a written fraction."""
        return sum(m.npages for m in self.mappings)

    # --- which --------------------------------------------------------------------------------------

    def pages(self) -> Addresses:
        """The virtual address of every written page, ascending."""
        counts = ((self.ends - self.starts) // np.uint64(PAGE_SIZE)).astype(np.int64)
        total = int(counts.sum())
        if total == 0:
            return np.zeros(0, dtype=np.uint64)
        offsets = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
        pages: Addresses = np.repeat(self.starts, counts) + offsets.astype(np.uint64) * np.uint64(PAGE_SIZE)
        return pages

    def bitmap(self, mapping: Mapping) -> DirtyBitmap:
        """The written pages of ``mapping`` as a bitmap over its pages."""
        try:
            index = self.mappings.index(mapping)
        except ValueError:
            raise KeyError(f"{mapping.label} is not tracked in this collection") from None
        mine = self.owner == index
        first = (self.starts[mine] - np.uint64(mapping.start)) // np.uint64(PAGE_SIZE)
        lengths = (self.ends[mine] - self.starts[mine]) // np.uint64(PAGE_SIZE)
        return DirtyBitmap.from_runs(first, lengths, mapping.npages)

    def bitmaps(self) -> dict[Mapping, DirtyBitmap]:
        """A bitmap for each mapping with written pages."""
        return {mapping: self.bitmap(mapping) for mapping in self.counts()}

    def __repr__(self) -> str:
        extra = "".join(f", {name}={len(value)}" for name, value in (("new", self.new), ("gone", self.gone)) if value)
        return (f"ProcessDirty(pages={self.count()}, runs={self.starts.size}, mappings={len(self.mappings)}{extra}"
                f"{', exited' if self.exited else ''})")
