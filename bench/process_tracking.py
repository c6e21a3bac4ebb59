"""Dirty tracking of a process (userfaultfd async WP + PAGEMAP_SCAN): our cost against the bare ioctl.

    python bench/process_tracking.py                        # 1 GiB target, 0/1/10/100 % written, tables
    python bench/process_tracking.py --size 4G --repeat 7   # more memory, more samples
    python bench/process_tracking.py --json                 # one JSON object, raw samples included

A target process (a small Python program started here, with NumPy like most Python jobs) maps ``--size``
of private anonymous memory, touches all of it, and then writes a fraction of its pages when told (evenly
spread: one written run per page below 50 %, the worst case for the output), timing its own writes.

Part 1, per written fraction: ``ProcessTracker.collect()`` on the target, by default re-reading
``/proc/PID/maps`` at every collection (``refresh 0``) and with ``refresh_interval=1`` (the maps are re-read
only when the process's size changes), against the *bare* collection: one ``PAGEMAP_SCAN`` ioctl
(``PM_SCAN_WP_MATCHING``, WRITTEN only) over the target's area and nothing else; and against the classic
alternative, reading the area's ``/proc/PID/pagemap`` entries whole and picking the pages without the
uffd-WP bit with NumPy (which reads but cannot re-arm; re-arming would take more calls and race with the
writer). The three alternate, each after the target wrote the same pages again; medians of wall time and
of this thread's CPU time, per GiB tracked, and ours/bare. Goal: ours/bare <= 1.15.

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
    reported: int
    ours: Sample = field(default_factory=Sample)
    ours_cached: Sample = field(default_factory=Sample)
    bare: Sample = field(default_factory=Sample)
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
            result = DensityResult(fraction, count, 0)
            for _ in range(args.repeat):
                ns = target.write(count)
                if count:
                    result.write_tracked_ns.append(ns / count)
                tracker.refresh_interval = 0.0
                dirty = timed(result.ours, tracker.collect)
                result.reported = dirty.count()
                target.write(count)
                timed(result.bare, lambda: pagemap.collect_written(target.start, target.end))
                target.write(count)
                tracker.refresh_interval = 1.0
                timed(result.ours_cached, tracker.collect)
                target.write(count)
                timed(result.pagemap_read, lambda: np.flatnonzero(
                    pagemap.read_entries(target.start, target.end) & np.uint64(abi.PM_UFFD_WP) == 0))
                pagemap.collect_written(target.start, target.end)  # re-arm what the read could not
            results.append(result)
        tracker.disable()
        pagemap.close()
        mappings = len(tracker.tracked)
    finally:
        target.close()
    return {"size": size, "gib": gib, "npages": npages, "mappings": mappings, "repeat": args.repeat,
            "untracked_write_ns": {str(f): statistics.median(v) for f, v in untracked.items()},
            "results": results}


def report(data: dict[str, Any]) -> None:
    gib = data["gib"]
    print(f"target: {format_size(data['size'])} private anonymous area, {data['mappings']} tracked mappings in all; "
          f"{data['repeat']} samples each, medians; ms per GiB tracked (wall / this thread's CPU)")
    print(f"{'written':>8} {'reported':>9} | {'ours':>13} {'ours, maps':>13} {'bare ioctl':>13} | "
          f"{'ours/bare':>10} {'cached/bare':>11} | {'read pagemap':>13} {'read/bare':>9}")
    for r in data["results"]:
        def ms(s: Sample) -> str:
            return f"{s.median_wall / gib * 1e3:6.3f}/{s.median_cpu / gib * 1e3:6.3f}"
        print(f"{r.fraction * 100:7.1f}% {r.reported:9,} | {ms(r.ours):>13} {ms(r.ours_cached):>13} {ms(r.bare):>13} | "
              f"{r.ours.median_wall / r.bare.median_wall:4.2f}/{r.ours.median_cpu / r.bare.median_cpu:4.2f} "
              f"{r.ours_cached.median_wall / r.bare.median_wall:5.2f}/"
              f"{r.ours_cached.median_cpu / r.bare.median_cpu:4.2f} | {ms(r.pagemap_read):>13} "
              f"{r.pagemap_read.median_wall / r.bare.median_wall:9.2f}")
    print("(ours: refresh_interval=0, maps re-read at every collection; ours, maps: refresh_interval=1, re-read"
          " on a size change)")
    print("\nthe target's writes, ns per page (median): untracked | tracked (async WP fault) | fault cost")
    for r in data["results"]:
        if not r.write_tracked_ns:
            continue
        untracked = data["untracked_write_ns"][str(r.fraction)]
        tracked = statistics.median(r.write_tracked_ns)
        print(f"{r.fraction * 100:7.1f}% {untracked:9.0f} | {tracked:9.0f} | {tracked - untracked:9.0f}")


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
