"""Benchmark DirtyBitmap against the bare NumPy baseline, all ratios measured in one run.

For each guest size, dirty density and pattern it times (median of ``--repeat`` runs):

* baseline  ``np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little"))``
* pages()   and its speed-up over the baseline (``ratio`` > 1 means pages() is faster)
* runs()    maximal runs of dirty pages
* count()   popcount, plus ``|`` and ``&`` of two bitmaps of the same size

Patterns: ``random`` dirties each page independently; ``clustered`` dirties runs of pages (geometric
lengths, mean 64 pages = 256 KiB) at random places, as a guest writing buffers does.

    python bench/bitmap.py                 # table
    python bench/bitmap.py --json          # one JSON object per row
    python bench/bitmap.py --repeat 5 --sizes 4G
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from dirtylog.bitmap import DirtyBitmap

SIZES = {"4G": 1 << 20, "64G": 1 << 24}
DENSITIES = (0.001, 0.01, 0.1, 1.0)
PATTERNS = ("random", "clustered")
CLUSTER_MEAN_PAGES = 64


@dataclass
class Row:
    size: str
    npages: int
    pattern: str
    density: float
    dirty: int
    runs: int
    baseline_ms: float
    pages_ms: float
    ratio: float
    runs_ms: float
    count_ms: float
    or_ms: float
    and_ms: float


def median_ms(fn: Callable[[], Any], repeat: int) -> float:
    """Median wall time of ``fn`` over ``repeat`` calls, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def make_bitmap(npages: int, density: float, pattern: str, rng: np.random.Generator) -> DirtyBitmap:
    if density >= 1.0:
        return DirtyBitmap.full(npages)
    if pattern == "random":
        bits = rng.random(npages) < density
        return DirtyBitmap(np.packbits(bits, bitorder="little").view(np.uint64).copy(), npages)
    nruns = max(1, round(density * npages / CLUSTER_MEAN_PAGES))
    lengths = rng.geometric(1 / CLUSTER_MEAN_PAGES, nruns)
    starts = rng.integers(0, npages, nruns)
    lengths = np.minimum(lengths, npages - starts)
    return DirtyBitmap.from_runs(starts, lengths, npages)


def baseline_pages(words: NDArray[np.uint64]) -> NDArray[np.intp]:
    return np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little"))


def bench_case(size: str, density: float, pattern: str, repeat: int, rng: np.random.Generator) -> Row:
    npages = SIZES[size]
    bm = make_bitmap(npages, density, pattern, rng)
    other = make_bitmap(npages, density, pattern, rng)
    expected = baseline_pages(bm.words)
    if not np.array_equal(bm.pages(), expected):  # a benchmark of a wrong answer is worthless
        raise AssertionError(f"pages() disagrees with the baseline for {size} {pattern} {density}")
    base = median_ms(lambda: baseline_pages(bm.words), repeat)
    pages = median_ms(bm.pages, repeat)
    return Row(
        size=size,
        npages=npages,
        pattern=pattern,
        density=density,
        dirty=bm.count(),
        runs=len(bm.runs()[0]),
        baseline_ms=base,
        pages_ms=pages,
        ratio=base / pages,
        runs_ms=median_ms(bm.runs, repeat),
        count_ms=median_ms(bm.count, repeat),
        or_ms=median_ms(lambda: bm | other, repeat),
        and_ms=median_ms(lambda: bm & other, repeat),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per measurement (median is kept)")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=list(SIZES))
    parser.add_argument("--densities", nargs="+", type=float, default=list(DENSITIES))
    parser.add_argument("--patterns", nargs="+", choices=PATTERNS, default=list(PATTERNS))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print one JSON object per row")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    rows = []
    for size in args.sizes:
        for density in args.densities:
            for pattern in args.patterns if density < 1.0 else args.patterns[:1]:
                row = bench_case(size, density, pattern, args.repeat, rng)
                rows.append(row)
                if args.json:
                    print(json.dumps(asdict(row)), flush=True)
    if not args.json:
        print_table(rows, args.repeat)
    return 0


def print_table(rows: list[Row], repeat: int) -> None:
    print(f"DirtyBitmap, median of {repeat} runs, times in ms; ratio = baseline / pages()")
    header = (
        f"{'guest':>5} {'pattern':>9} {'dirty%':>7} {'pages':>9} {'runs':>8} "
        f"{'baseline':>9} {'pages()':>8} {'ratio':>6} {'runs()':>8} {'count()':>8} {'|':>7} {'&':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        pattern = "full" if r.density >= 1.0 else r.pattern
        print(
            f"{r.size:>5} {pattern:>9} {r.density * 100:>7.1f} {r.dirty:>9} {r.runs:>8} "
            f"{r.baseline_ms:>9.3f} {r.pages_ms:>8.3f} {r.ratio:>6.1f} {r.runs_ms:>8.3f} "
            f"{r.count_ms:>8.3f} {r.or_ms:>7.3f} {r.and_ms:>7.3f}"
        )


if __name__ == "__main__":
    sys.exit(main())
