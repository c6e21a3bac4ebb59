"""Dirty tracking of a process (userfaultfd async WP + PAGEMAP_SCAN): our cost against the bare ioctl.

    python bench/process_tracking.py                        # 1 GiB target, 0/1/10/100 % written, tables
    python bench/process_tracking.py --size 4G --repeat 7   # more memory, more samples
    python bench/process_tracking.py --json                 # one JSON object, raw samples included

A target process (a small Python program started here, with NumPy like most Python jobs) maps ``--size``
of private anonymous memory, touches all of it, and then writes a fraction of its pages when told (evenly
spread: one written run per page below 50 %, the worst case for the output), timing its own writes.

Part 1, per written fraction: ``ProcessTracker.collect()`` on the target, as it runs by default (maps
re-read only when the process's size changes or a second has passed: one ``PAGEMAP_SCAN`` over all
tracked memory otherwise) and with ``refresh_interval=0`` (maps re-read and every run of mappings scanned
with its registration checked, at every collection), against the *bare* collection: what any user of
the ioctl must do, ``PAGEMAP_SCAN`` (``PM_SCAN_WP_MATCHING``, WRITTEN only) called until the walk ends,
into a buffer allocated once and as large as each of the tracker's two — over the same memory (the
whole tracked span, the target's ~50 other writable mappings included) and over the target's area alone;
and against the classic alternative, reading the area's ``/proc/PID/pagemap`` entries whole and picking
the pages without the uffd-WP bit with NumPy (which reads but cannot re-arm; re-arming would take more
calls and race with the writer). Each runs after the target wrote the same pages again; ours and the
bare ioctl over the same memory alternate in a loop of their own (the pagemap read streams megabytes
through the cache and would otherwise cool whatever runs next), after one untimed round in which the
target makes its index array and the buffers grow to size; medians of wall time and of this thread's
CPU time, per GiB of the memory each covers. Goal: ours / bare (same memory) <= 1.15.

"ours" is the steady collection, between refreshes: for this pair the refresh interval is a minute (at
100 % the target's writes alone take longer than the default second, so every collection would re-read
the maps), and any collection that re-reads them all the same (the size changed) is counted in the
"maps" column and left out of the median, since the bare ioctl neither finds new mappings nor checks
that the old ones are still registered. The "ours, maps" column is the cost of a collection that does:
with the default interval of 1 s, one collection a second.
Neither ours nor bare reads what the kernel wrote; "count" is what the first ``count()`` of a result
costs afterwards (the two sums over the runs a user of the bare ioctl would compute too).

Part 2: the target's cost of a write to a page, per page: untracked (the page is present and writable),
tracked (the first write after a collection takes an async write-protect fault, resolved by the kernel
alone), and the difference: the fault cost tracking adds to the program.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from dirtylog.linux import abi
from dirtylog.linux.pagemap import Pagemap
from dirtylog.tracking.process import ProcessTracker
from dirtylog.units import PAGE_SIZE, format_size, parse_size

TARGET = textwrap.dedent("""
    import mmap, sys, time
    import numpy as np
    size = int(sys.argv[1])
    area = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    view = np.frombuffer(area, dtype=np.uint8)
    view[::4096] = 1
    npages = size // 4096
    print(view.ctypes.data, flush=True)
    chosen = {}  # made once per count: new temporaries would be new mappings for the tracker every time
    stamp = 1
    for line in sys.stdin:
        count = int(line)
        if count not in chosen:
            chosen[count] = np.linspace(0, npages - 1, count).astype(np.int64) * 4096
        pages = chosen[count]
        stamp = stamp % 255 + 1  # a new value every time: each write changes its page
        began = time.perf_counter_ns()
        view[pages] = stamp  # a scalar: no temporary array, so the process's size stays put
        print(time.perf_counter_ns() - began, flush=True)
""")


class Target:
    """The target process: ``write(n)`` makes it write ``n`` evenly spread pages and returns its ns."""

    def __init__(self, size: int) -> None:
        self.child = subprocess.Popen([sys.executable, "-c", TARGET, str(size)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        assert self.child.stdout is not None
        self.start = int(self.child.stdout.readline())
        self.end = self.start + size

    def write(self, count: int) -> int:
        assert self.child.stdin is not None and self.child.stdout is not None
        self.child.stdin.write(f"{count}\n")
        self.child.stdin.flush()
        return int(self.child.stdout.readline())

    def close(self) -> None:
        self.child.kill()
        self.child.wait()


@dataclass
class Sample:
    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def add(self, wall: float, cpu: float) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu)

    @property
    def median_wall(self) -> float:
        return statistics.median(self.wall)

    @property
    def median_cpu(self) -> float:
        return statistics.median(self.cpu)


def timed(sample: Sample, work: Callable[[], Any]) -> Any:
    wall, cpu = time.perf_counter(), time.thread_time()
    result = work()
    sample.add(time.perf_counter() - wall, time.thread_time() - cpu)
    return result


@dataclass
class DensityResult:
    fraction: float
    pages: int
    reported: int = 0
    refreshes: int = 0  # of the default-mode collections, how many re-read the maps
    buffer_records: tuple[int, ...] = ()  # page_region records: ours (two buffers), bare
    ours: Sample = field(default_factory=Sample)  # default, steady: collections that did not re-read the maps
    ours_refreshed: Sample = field(default_factory=Sample)  # default, those that did (size change, interval)
    count: Sample = field(default_factory=Sample)  # the first count() of a result, after the collection
    ours_maps: Sample = field(default_factory=Sample)  # refresh_interval=0
    bare_span: Sample = field(default_factory=Sample)  # one ioctl over the same memory as ours
    bare_area: Sample = field(default_factory=Sample)  # one ioctl over the target's area only
    pagemap_read: Sample = field(default_factory=Sample)
    write_tracked_ns: list[float] = field(default_factory=list)


def measure(args: argparse.Namespace) -> dict[str, Any]:
    size = parse_size(args.size)
    gib = size / 2**30
    npages = size // PAGE_SIZE
    target = Target(size)
    try:
        untracked = {fraction: [target.write(round(npages * fraction)) / max(1, round(npages * fraction))
                                for _ in range(args.repeat)] for fraction in args.fractions if fraction}
        tracker = ProcessTracker(target.child.pid)
        tracker.enable()
        pagemap = Pagemap(target.child.pid)
        tracker.collect()
        results = []
        for fraction in args.fractions:
            count = round(npages * fraction)
            result = DensityResult(fraction, count)
            first, last = tracker.tracked[0].start, tracker.tracked[-1].end

            def bare_span(first: int = first, last: int = last) -> int:
                return pagemap.collect_written(first, last, check_registered=False)

            # One untimed round: the target makes its index array for this count (a new mapping, so a
            # refresh), and the tracker's two buffers and the bare one grow to the size this count needs.
            tracker.refresh_interval = 60.0
            for _ in range(2):
                target.write(count)
                tracker.collect()
                target.write(count)
                bare_span()
            result.buffer_records = (*(len(p.buffer) for p in tracker._pagemaps), len(pagemap.buffer))
            # The goal's pair first, alternating, so that neither runs after the other pass's cache-flushing
            # pagemap read; then the others.
            for _ in range(args.repeat):
                ns = target.write(count)
                if count:
                    result.write_tracked_ns.append(ns / count)
                refreshes = tracker.refreshes
                sample = Sample()
                dirty = timed(sample, tracker.collect)
                refreshed = tracker.refreshes != refreshes
                result.refreshes += refreshed
                (result.ours_refreshed if refreshed else result.ours).add(sample.wall[0], sample.cpu[0])
                result.reported = timed(result.count, dirty.count)
                del dirty  # as a loop `d = tracker.collect()` does: a result held longer is copied out later
                target.write(count)
                timed(result.bare_span, bare_span)
            for _ in range(args.repeat):
                target.write(count)
                tracker.refresh_interval = 0.0
                timed(result.ours_maps, tracker.collect)
                target.write(count)
                timed(result.bare_area, lambda: pagemap.collect_written(target.start, target.end))
                target.write(count)
                timed(result.pagemap_read, lambda: np.flatnonzero(
                    pagemap.read_entries(target.start, target.end) & np.uint64(abi.PM_UFFD_WP) == 0))
                pagemap.collect_written(target.start, target.end)  # re-arm what the read could not
            results.append(result)
        tracked_bytes = sum(m.size for m in tracker.tracked)
        mappings = len(tracker.tracked)
        tracker.disable()
        pagemap.close()
    finally:
        target.close()
    return {"size": size, "gib": gib, "npages": npages, "mappings": mappings, "repeat": args.repeat,
            "tracked_bytes": tracked_bytes, "tracked_gib": tracked_bytes / 2**30,
            "untracked_write_ns": {str(f): statistics.median(v) for f, v in untracked.items()},
            "results": results}


def report(data: dict[str, Any]) -> None:
    gib, tracked = data["gib"], data["tracked_gib"]
    print(f"target: a {format_size(data['size'])} private anonymous area; {data['mappings']} tracked mappings, "
          f"{format_size(data['tracked_bytes'])} in all. {data['repeat']} samples each, medians of wall / this "
          "thread's CPU time, ms per GiB of the memory each covers")
    print(f"{'written':>8} {'reported':>9} {'maps':>5} | {'ours':>13} {'bare, same':>13} {'ours/bare':>9} "
          f"{'count us':>8} | {'ours, maps':>13} {'/bare':>5} | {'bare, area':>13} {'read pagemap':>13} "
          f"{'read/bare':>9}")

    def per_gib(sample: Sample, size: float) -> str:
        if not sample.wall:
            return "-"
        return f"{sample.median_wall / size * 1e3:6.3f}/{sample.median_cpu / size * 1e3:6.3f}"

    def ratio(ours: Sample, bare: Sample) -> str:
        if not ours.wall:
            return "-"
        return f"{ours.median_wall / bare.median_wall:4.2f}/{ours.median_cpu / bare.median_cpu:4.2f}"

    for r in data["results"]:
        print(f"{r.fraction * 100:7.1f}% {r.reported:9,} {r.refreshes:5} | {per_gib(r.ours, tracked):>13} "
              f"{per_gib(r.bare_span, tracked):>13} {ratio(r.ours, r.bare_span):>9} "
              f"{r.count.median_cpu * 1e6:8.1f} | "
              f"{per_gib(r.ours_maps, tracked):>13} {r.ours_maps.median_wall / r.bare_span.median_wall:5.2f} | "
              f"{per_gib(r.bare_area, gib):>13} {per_gib(r.pagemap_read, gib):>13} "
              f"{r.pagemap_read.median_wall / r.bare_area.median_wall:9.2f}")
    print("ours: ProcessTracker.collect() between refreshes ('maps' counts those that re-read the maps all the "
          "same: the size changed); bare, same: PAGEMAP_SCAN until the walk ends "
          "over the same memory, same buffer size; count us: the first count() of our result, CPU us; "
          "ours, maps: refresh_interval=0; bare, area: PAGEMAP_SCAN over the area only; read pagemap: the area's "
          "entries read whole and decoded, without re-arming")
    for r in data["results"]:
        if r.ours_refreshed.wall:
            print(f"{r.fraction * 100:7.1f}%: {r.refreshes} default collections re-read the maps: "
                  f"{per_gib(r.ours_refreshed, tracked)} ms/GiB")
    print("page_region records in the buffers (ours, ours, bare): "
          + "; ".join(f"{r.fraction * 100:g} %: {r.buffer_records}" for r in data["results"]))
    print("\nthe target's writes, ns per page (median): untracked | tracked (async WP fault) | fault cost")
    for r in data["results"]:
        if not r.write_tracked_ns:
            continue
        untracked = data["untracked_write_ns"][str(r.fraction)]
        tracked_ns = statistics.median(r.write_tracked_ns)
        print(f"{r.fraction * 100:7.1f}% {untracked:9.0f} | {tracked_ns:9.0f} | {tracked_ns - untracked:9.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", default="1G", help="the target's tracked area (default 1G)")
    parser.add_argument("--repeat", type=int, default=5, help="samples per figure (default 5)")
    parser.add_argument("--fractions", type=lambda text: [float(f) / 100 for f in text.split(",")],
                        default=[0.0, 0.01, 0.1, 1.0], help="written percentages (default 0,1,10,100)")
    parser.add_argument("--json", action="store_true", help="one JSON object with the raw samples")
    args = parser.parse_args()
    data = measure(args)
    if args.json:
        data["results"] = [asdict(r) for r in data["results"]]
        json.dump(data, sys.stdout, indent=1)
        print()
    else:
        report(data)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    main()
