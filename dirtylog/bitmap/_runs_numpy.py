"""Maximal runs of set bits as whole-array NumPy: the path used where Numba is not installed.

The arm64 lab ships no Numba (llvmlite's wheel alone is 43 MB, and compiling under emulation costs
seconds), so :mod:`dirtylog.bitmap` falls back to this: the set bits' positions, then the breaks between
consecutive positions. It costs time in proportion to the dirty pages rather than the words, which is
slower than the compiled kernel on dense bitmaps and fine on the lab's small guests.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from dirtylog.bitmap._bitops import set_bit_positions


def runs(words: NDArray[np.uint64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """``(starts, lengths)`` of the maximal runs of set bits, sorted by start."""
    pages = set_bit_positions(np.ascontiguousarray(words, dtype=np.uint64))
    if pages.size == 0:
        return pages, pages.copy()
    breaks = np.flatnonzero(np.diff(pages) != 1) + 1
    first = np.concatenate(([0], breaks))
    last = np.concatenate((breaks, [pages.size]))
    return pages[first], last - first
