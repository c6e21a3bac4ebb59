"""What one collection of a process's dirty pages holds: written page runs, by mapping. Pure NumPy, no I/O.

A process's address space is sparse (a few hundred mappings scattered over 128 TiB), so a collection is
not one bitmap but a list of written runs ``[start, end)`` of virtual addresses, each owned by one
mapping as ``/proc/PID/maps`` names it. :class:`ProcessDirty` keeps them as the kernel returned them, two
address arrays, and derives the rest on demand: page addresses, counts per mapping or per name, and a
:class:`~dirtylog.bitmap.DirtyBitmap` per mapping (bit ``i`` is the page at ``mapping.start + i * 4096``).
Nothing is computed unless asked, not even the page count: a collection hands out what the kernel wrote
without reading it (right after its page-table walk, that output is out of the caches, and reading it cost
more than a tenth of the walk), and the first question pays for it once.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence

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


def _expand(starts: Addresses, ends: Addresses) -> Addresses:
    """Every page address of the runs, in order (whole-array: ``repeat`` + ``arange``)."""
    counts = ((ends - starts) // np.uint64(PAGE_SIZE)).astype(np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, dtype=np.uint64)
    offsets = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    pages: Addresses = np.repeat(starts, counts) + offsets.astype(np.uint64) * np.uint64(PAGE_SIZE)
    return pages


def _runs_of(pages: Addresses) -> tuple[Addresses, Addresses]:
    """Sorted distinct page addresses as runs ``[start, end)`` of neighbours."""
    if pages.size == 0:
        return pages, pages
    breaks = np.flatnonzero(np.diff(pages) != np.uint64(PAGE_SIZE)) + 1
    firsts = np.concatenate([[0], breaks])
    lasts = np.concatenate([breaks, [pages.size]]) - 1
    return pages[firsts], pages[lasts] + np.uint64(PAGE_SIZE)


class ProcessDirty:
    """Pages of a process written since the previous collection, by mapping.

    ``mappings`` are the mappings tracked at this collection (address order); ``starts``/``ends`` the
    written runs in address order, as the kernel returned them (a run may cross from one mapping into an
    adjacent one; per-mapping questions cut it, once, when first asked). ``new`` mappings were found (and
    registered) at this collection — their pages written since they appeared count as written now;
    ``gone`` ones were tracked and are no longer mapped. ``exited`` is set on the collection that found the
    process gone: the last one.

    Everything is derived on first use and kept: the page count too. ``on_count`` (a tracker's tally of
    the pages it reported) is called once, with the count, when it is first known.

    A plain class with slots rather than a dataclass: one is made per collection, on the hot path.
    """

    __slots__ = ("__weakref__", "_cache", "_count", "_on_count", "ends", "exited", "gone", "mappings", "new",
                 "starts")

    def __init__(self, mappings: tuple[Mapping, ...], starts: Addresses, ends: Addresses,
                 new: tuple[Mapping, ...] = (), gone: tuple[Mapping, ...] = (), exited: bool = False,
                 on_count: Callable[[int], None] | None = None) -> None:
        self.mappings = mappings
        self.starts = starts
        self.ends = ends
        self.new = new
        self.gone = gone
        self.exited = exited
        self._cache: dict[str, npt.NDArray[np.generic]] = {}
        self._count: int | None = None
        self._on_count = on_count

    def detach(self) -> None:
        """Own the run arrays: a tracker hands out views of its scan buffer and calls this before it reuses
        the buffer while the result is still referenced (counting them then, while the copy is in cache)."""
        self.starts = self.starts.copy()
        self.ends = self.ends.copy()
        self.count()

    @classmethod
    def from_runs(cls, mappings: Sequence[Mapping], starts: Addresses, ends: Addresses, *,
                  new: Sequence[Mapping] = (), gone: Sequence[Mapping] = (), exited: bool = False,
                  on_count: Callable[[int], None] | None = None) -> ProcessDirty:
        """Runs in any order, perhaps overlapping (a scan repeated after a mapping changed under it)."""
        if starts.size > 1 and np.any(starts[1:] < ends[:-1]):
            pages = np.unique(_expand(starts, ends))
            starts, ends = _runs_of(pages)
        return cls(tuple(mappings), starts, ends, tuple(new), tuple(gone), exited, on_count)

    @classmethod
    def empty(cls, mappings: Sequence[Mapping] = (), *, exited: bool = False) -> ProcessDirty:
        nothing = np.zeros(0, dtype=np.uint64)
        return cls(tuple(mappings), nothing, nothing, exited=exited)

    def _owned(self) -> tuple[Addresses, Addresses, npt.NDArray[np.intp]]:
        """The runs cut at mapping boundaries, and the index of each piece's mapping (computed once)."""
        if "owner" not in self._cache:
            mapping_starts = np.array([m.start for m in self.mappings], dtype=np.uint64)
            starts, ends = split_at(self.starts, self.ends, mapping_starts)
            self._cache["starts"], self._cache["ends"] = starts, ends
            self._cache["owner"] = np.searchsorted(mapping_starts, starts, side="right") - 1
        return self._cache["starts"], self._cache["ends"], self._cache["owner"]  # type: ignore[return-value]

    # --- how many -----------------------------------------------------------------------------------

    def mapping_counts(self) -> npt.NDArray[np.int64]:
        """Written pages per mapping, in the order of :attr:`mappings`."""
        starts, ends, owner = self._owned()
        lengths = ((ends - starts) // np.uint64(PAGE_SIZE)).astype(np.int64)
        counts = np.bincount(owner, weights=lengths, minlength=len(self.mappings)).astype(np.int64)
        if self._count is None:
            self._counted(int(counts.sum()))
        return counts

    def count(self) -> int:
        """Written pages in all: two sums and no temporary array (each sum may wrap around 2^64; their
        difference modulo 2^64, the total length, is exact), the first time it is asked."""
        if self._count is None:
            total = 0 if self.starts.size == 0 else (int(self.ends.sum()) - int(self.starts.sum())) % 2**64
            self._counted(total // PAGE_SIZE)
        assert self._count is not None
        return self._count

    def _counted(self, count: int) -> None:
        self._count = count
        if self._on_count is not None:
            on_count, self._on_count = self._on_count, None
            on_count(count)

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
        pages = _expand(self.starts, self.ends)
        if self._count is None:
            self._counted(int(pages.size))
        return pages

    def bitmap(self, mapping: Mapping) -> DirtyBitmap:
        """The written pages of ``mapping`` as a bitmap over its pages."""
        try:
            index = self.mappings.index(mapping)
        except ValueError:
            raise KeyError(f"{mapping.label} is not tracked in this collection") from None
        starts, ends, owner = self._owned()
        mine = owner == index
        first = (starts[mine] - np.uint64(mapping.start)) // np.uint64(PAGE_SIZE)
        lengths = (ends[mine] - starts[mine]) // np.uint64(PAGE_SIZE)
        return DirtyBitmap.from_runs(first, lengths, mapping.npages)

    def bitmaps(self) -> dict[Mapping, DirtyBitmap]:
        """A bitmap for each mapping with written pages."""
        return {mapping: self.bitmap(mapping) for mapping in self.counts()}

    @property
    def runs(self) -> int:
        """Written runs, as the kernel merged them."""
        return int(self.starts.size)

    def __repr__(self) -> str:
        extra = "".join(f", {name}={len(value)}" for name, value in (("new", self.new), ("gone", self.gone)) if value)
        return (f"ProcessDirty(pages={self.count()}, runs={self.runs}, mappings={len(self.mappings)}{extra}"
                f"{', exited' if self.exited else ''})")
