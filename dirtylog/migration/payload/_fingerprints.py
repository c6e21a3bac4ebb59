"""Compiled page passes of the migration digest: fingerprints, and gathering pages with their fingerprints.

A page's fingerprint is ``sum(word[i] * multiplier[i]) mod 2**64`` over its 512 words (see ``digest.py``).
NumPy's ``einsum`` computes it at ~18 GB/s whether the data is in cache or not (it does not vectorize
64-bit multiplies); this loop, which LLVM vectorizes, runs at the speed of memory, and at ~90 GB/s on a
page just received or copied, which is where the migration calls it.

``gather`` is the source's one pass over guest memory: it copies each page into the batch buffer and
fingerprints the copy while it is in L1, instead of a copy pass and then a fingerprint pass over the
buffer. It fingerprints the copy, not the guest page, so the two agree even while the guest writes.

Importing Numba takes 0.3 s, so :mod:`dirtylog.migration.digest` imports this module on first use.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numpy.typing import NDArray


@njit(cache=True, nogil=True, boundscheck=False)
def _fingerprint(words: NDArray[np.uint64], row: int, multipliers: NDArray[np.uint64]) -> np.uint64:
    total = np.uint64(0)
    for i in range(words.shape[1]):
        total += words[row, i] * multipliers[i]  # wraps mod 2**64
    return total


# Compiled on first call and cached on disk; nogil: the stream threads go on meanwhile.
@njit(cache=True, nogil=True, boundscheck=False)
def fingerprint_rows(words: NDArray[np.uint64], multipliers: NDArray[np.uint64], out: NDArray[np.uint64]) -> None:
    """``out[p]`` = the fingerprint of row ``p`` of ``words`` (one page of 64-bit words per row)."""
    for p in range(words.shape[0]):
        out[p] = _fingerprint(words, p, multipliers)


@njit(cache=True, nogil=True, boundscheck=False)
def gather_rows(memory: NDArray[np.uint64], starts: NDArray[np.uint64], lengths: NDArray[np.uint32],
                out: NDArray[np.uint64], multipliers: NDArray[np.uint64], prints: NDArray[np.uint64]) -> None:
    """Copy the runs ``(starts, lengths)`` of rows of ``memory`` into ``out`` in order, and fingerprint each
    copied row into ``prints``."""
    p = 0
    for r in range(starts.size):
        first = np.int64(starts[r])
        for k in range(np.int64(lengths[r])):
            out[p, :] = memory[first + k, :]
            prints[p] = _fingerprint(out, p, multipliers)
            p += 1
