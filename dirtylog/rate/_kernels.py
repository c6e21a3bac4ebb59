"""Compiled loops of the rate tools: page hashes for sampling, and the replay of a workload's writes.

Both are sequential by nature (a hash chains over a page's words; the guest's xorshift chains over its
writes), which NumPy cannot express without a per-element Python loop. Numba compiles them on first use
and caches the code on disk; importing it costs 0.3 s, so the modules that need these import them lazily.
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numpy.typing import NDArray

# XXH64's primes: the hash of a sampled page is the XXH64 round function over its 512 words in four
# lanes, as QEMU's compute_page_hash does, so a change anywhere in the page changes it but for a 2**-64
# chance.
_P1 = np.uint64(0x9E3779B185EBCA87)
_P2 = np.uint64(0xC2B2AE3D27D4EB4F)
_P3 = np.uint64(0x165667B19E3779F9)
_P4 = np.uint64(0x85EBCA77C2B2AE63)


@njit(inline="always")
def _rotl(x: np.uint64, r: int) -> np.uint64:
    return (x << np.uint64(r)) | (x >> np.uint64(64 - r))


@njit(inline="always")
def _round(acc: np.uint64, value: np.uint64) -> np.uint64:
    return _rotl(acc + value * _P2, 31) * _P1


@njit(cache=True, nogil=True, boundscheck=False)
def hash_pages(pages: NDArray[np.uint64], pfns: NDArray[np.int64], out: NDArray[np.uint64]) -> None:
    """``out[i]`` = hash of row ``pfns[i]`` of ``pages`` (guest RAM as rows of 512 words)."""
    words = pages.shape[1]
    for i in range(pfns.size):
        row = pfns[i]
        v1 = _P1 + _P2
        v2 = _P2
        v3 = np.uint64(0)
        v4 = np.uint64(0) - _P1
        for w in range(0, words, 4):
            v1 = _round(v1, pages[row, w])
            v2 = _round(v2, pages[row, w + 1])
            v3 = _round(v3, pages[row, w + 2])
            v4 = _round(v4, pages[row, w + 3])
        h = _rotl(v1, 1) + _rotl(v2, 7) + _rotl(v3, 12) + _rotl(v4, 18)
        h ^= h >> np.uint64(33)
        h *= _P3
        h ^= h >> np.uint64(29)
        h *= _P4
        h ^= h >> np.uint64(32)
        out[i] = h


@njit(inline="always")
def _xorshift(x: np.uint64) -> np.uint64:
    x ^= x << np.uint64(13)
    x ^= x >> np.uint64(7)
    x ^= x << np.uint64(17)
    return x


@njit(inline="always")
def _mulhi(a: np.uint64, b: np.uint64) -> np.uint64:
    """High 64 bits of the 128-bit product ``a * b`` (the guest's ``mul``: RDX)."""
    mask = np.uint64(0xFFFFFFFF)
    a_lo, a_hi = a & mask, a >> np.uint64(32)
    b_lo, b_hi = b & mask, b >> np.uint64(32)
    lo_lo = a_lo * b_lo
    hi_lo = a_hi * b_lo
    lo_hi = a_lo * b_hi
    cross = (lo_lo >> np.uint64(32)) + (hi_lo & mask) + lo_hi
    return a_hi * b_hi + (hi_lo >> np.uint64(32)) + (cross >> np.uint64(32))


@njit(cache=True, nogil=True, boundscheck=False)
def skip_writes(state: np.uint64, count: np.int64) -> np.uint64:
    """The xorshift state after ``count`` more writes of a random, hotset or stamp workload."""
    for _ in range(count):
        state = _xorshift(state)
    return state


@njit(cache=True, nogil=True, boundscheck=False)
def replay_writes(state: np.uint64, count: np.int64, npages: np.uint64, hot_npages: np.uint64,
                  hot_threshold: np.uint64, out: NDArray[np.int64]) -> None:
    """The share-relative page of each of the next ``count`` writes from xorshift ``state``, into ``out``.

    Mirrors the guest programs (dirtylog/guest/programs.py): each write advances xorshift64 (13, 7, 17)
    once; ``hotset`` sends a write to the first ``hot_npages`` pages when the state's low 32 bits are below
    ``hot_threshold`` (0 for random and stamp: never), and the page is ``state * pages >> 64``.
    """
    low = np.uint64(0xFFFFFFFF)
    for i in range(count):
        state = _xorshift(state)
        pages = hot_npages if (state & low) < hot_threshold else npages
        out[i] = np.int64(_mulhi(state, pages))
