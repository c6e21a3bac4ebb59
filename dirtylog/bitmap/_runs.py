"""Maximal runs of set bits of a bitmap, as ``(starts, lengths)``: one compiled pass over the words.

A run starts at a set bit whose lower neighbour is clear, and ends at a set bit whose upper neighbour is
clear; for each word both are masks (the neighbours across word boundaries come from the adjacent words),
and their set bits, taken lowest first with count-trailing-zeros, are the starts and the ends in order.

This is the one kernel of the package that is compiled (Numba) rather than written as NumPy array
operations: the number of runs per word varies, which whole-array NumPy can only express through lookup
tables, scatter fixes for runs crossing table units, and several passes. Those cost 12 ms on a 64 GiB
bitmap with 10 % random dirty pages and 550 lines; this loop takes 5 ms (``bench/bitmap.py``).

Importing Numba takes 0.3 s, so :mod:`dirtylog.bitmap` imports this module on first use only.
"""

from __future__ import annotations

from typing import Any, Final

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, register_jitable
from numpy.typing import NDArray

_EMPTY: Final = np.empty(0, dtype=np.int64)


def _cttz_typer(typingctx: Any, x: Any) -> tuple[Any, Any]:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 1))  # 1: never called with 0

    return types.uint64(types.uint64), codegen


def _ctpop_typer(typingctx: Any, x: Any) -> tuple[Any, Any]:
    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        return builder.ctpop(args[0])

    return types.uint64(types.uint64), codegen


# Count trailing zeros and count set bits of a uint64, for compiled code: LLVM's own intrinsics, one
# tzcnt / popcnt instruction each.
_cttz: Any = intrinsic(_cttz_typer)
_ctpop: Any = intrinsic(_ctpop_typer)


@register_jitable
def _start_mask(words: NDArray[np.uint64], i: int) -> Any:
    """Bits of word ``i`` that start a run: set, with the bit below clear (bit 63 of the word before)."""
    w = words[i]
    below = words[i - 1] >> np.uint64(63) if i > 0 else np.uint64(0)
    return w & ~((w << np.uint64(1)) | below)


@register_jitable
def _end_mask(words: NDArray[np.uint64], i: int) -> Any:
    """Bits of word ``i`` that end a run: set, with the bit above clear (bit 0 of the word after)."""
    w = words[i]
    above = words[i + 1] << np.uint64(63) if i + 1 < words.size else np.uint64(0)
    return w & ~((w >> np.uint64(1)) | above)


# Compiled on first call and cached on disk; nogil: vCPU and stream threads go on meanwhile.
@njit(cache=True, nogil=True, boundscheck=False)
def _count_runs(words: NDArray[np.uint64]) -> int:
    count = 0
    for i in range(words.size):
        if words[i]:
            count += _ctpop(_start_mask(words, i))
    return count


@njit(cache=True, nogil=True, boundscheck=False)
def _fill_runs(words: NDArray[np.uint64], starts: NDArray[np.int64], lengths: NDArray[np.int64]) -> None:
    one = np.uint64(1)
    n = 0  # runs started so far
    m = 0  # runs ended so far (m <= n: a run's end never comes before its start)
    for i in range(words.size):
        if not words[i]:
            continue
        first_page = i * 64
        s = _start_mask(words, i)
        while s:
            starts[n] = first_page + np.int64(_cttz(s))
            n += 1
            s &= s - one
        e = _end_mask(words, i)
        while e:
            lengths[m] = first_page + np.int64(_cttz(e)) + 1 - starts[m]
            m += 1
            e &= e - one


def runs(words: NDArray[np.uint64]) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """``(starts, lengths)`` of the maximal runs of set bits, sorted by start."""
    words = np.ascontiguousarray(words, dtype=np.uint64)
    count = int(_count_runs(words))
    if count == 0:
        return _EMPTY.copy(), _EMPTY.copy()
    starts = np.empty(count, dtype=np.int64)
    lengths = np.empty(count, dtype=np.int64)
    _fill_runs(words, starts, lengths)
    return starts, lengths
