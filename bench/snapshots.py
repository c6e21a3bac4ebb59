"""Snapshots: create time and size against one sequential write, guest pauses, live slowdown, restore latency.

    python bench/snapshots.py [--sizes 1G,8G] [--restore-sizes 1G,16G] [--dir DIR] [--quick] [--json]

Measured in one run, as ratios where a bound exists:

  * **create**: a guest whose memory is all written (1 vCPU, idle, so nothing else moves), a full snapshot,
    then incremental layers after dirtying 1 %, 10 % and 100 % of its pages at random; each against the bound
    of writing the same bytes (the layer's non-zero pages, from guest memory) to a new file with one
    sequential write, both flushed to disk (fsync); medians of 3, each started after a sync(2) so that neither
    waits for the other's write-back. File size and space on disk beside them; the file's page cache is
    dropped after each measurement.
  * **pause**: how long the vCPUs were paused by each of those, and by live full and 10 % snapshots.
  * **live**: a guest writing random pages (2 vCPUs; as fast as it can, and at 20,000 pages/s each) during a
    live full snapshot: its write rate against the rate in an equal window right after, the writes that waited
    for their block, and how long.
  * **restore**: a full snapshot (1 GiB all written; 16 GiB with 1 GiB written, the rest zero pages) restored
    to a running guest: the call returning with the vCPUs in the guest, the first page the guest touched in,
    the guest's first write seen by the host, and all memory in — with the file in the page cache (warm) and
    not (cold: POSIX_FADV_DONTNEED first), and into a blank VM built beforehand (prepared: its memory slots
    exist, which on PVM costs ~0.5 ms per GiB). The compiled loops and the guest assembler are loaded before
    the timed restores (once per process).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from dirtylog.machine import Machine
from dirtylog.snapshot import _kernels
from dirtylog.snapshot.session import Snapshot
from dirtylog.units import PAGE_SIZE, format_size, parse_size

FILL_CHUNK = 64 << 20


def fill(machine: Machine) -> None:
    """Write every workload page (random bytes, so no page is zero) from the host, untracked."""
    rng = np.random.default_rng(7)
    pattern = rng.integers(1, 255, FILL_CHUNK, dtype=np.uint8)
    first = machine.spec.pages[0] * PAGE_SIZE
    memory = machine.memory
    for start in range(first, memory.size, FILL_CHUNK):
        end = min(start + FILL_CHUNK, memory.size)
        memory[start:end] = pattern[:end - start]


def dirty(machine: Machine, fraction: float, seed: int) -> int:
    """Change ``fraction`` of the workload pages at random from the host, recorded as host writes (what the
    next layer must hold); returns how many."""
    pages = np.asarray(machine.spec.pages)
    rng = np.random.default_rng(seed)
    count = max(1, int(pages.size * fraction))
    chosen = np.sort(rng.choice(pages, size=count, replace=False)) if fraction < 1 else pages
    view = machine.memory.reshape(-1, PAGE_SIZE)
    view[chosen, 7] += 1
    machine.ram.host_dirty.set_pages(chosen.astype(np.uint64))
    return int(chosen.size)


def drop_cache(path: Path) -> None:
    """Evict ``path`` from the page cache (its pages are on disk: it was flushed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def warm(path: Path) -> None:
    """Read ``path`` into the page cache (its data regions only: holes are skipped)."""
    buffer = bytearray(16 << 20)
    fd = os.open(path, os.O_RDONLY)
    try:
        offset, end = 0, os.fstat(fd).st_size
        while offset < end:
            try:
                offset = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after offset
                break
            hole = os.lseek(fd, offset, os.SEEK_HOLE)
            while offset < hole:
                offset += os.preadv(fd, [memoryview(buffer)[:min(len(buffer), hole - offset)]], offset) or hole
    finally:
        os.close(fd)


def sequential_write(memory: np.ndarray, nbytes: int, path: Path) -> float:
    """Seconds to write ``nbytes`` of ``memory`` to a new file with one sequential write, flushed."""
    view = memory.data.cast("B")[:nbytes]
    began = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        while view:
            written = os.write(fd, view[:1 << 30])
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    seconds = time.perf_counter() - began
    drop_cache(path)
    path.unlink()
    return seconds


def create(size: int, folder: Path, repeats: int) -> list[dict[str, Any]]:
    """Create time, size and pause of full snapshots and of 1 %, 10 %, 100 % layers against the bound, and the
    pauses of live ones; each measured ``repeats`` times, ours and the bound in turn (medians)."""
    rows: list[dict[str, Any]] = []
    with Machine(size, 1, "idle", prefault=True) as machine:
        fill(machine)
        machine.start()
        parent: Snapshot | None = None
        seed = 0
        for live in (False, True):
            for fraction in (None, 0.01, 0.1, 1.0) if not live else (None, 0.1):
                ours, bounds, pauses, writes = [], [], [], []
                for _ in range(repeats):
                    seed += 1
                    pages = dirty(machine, fraction, seed) if fraction is not None else machine.ram.npages
                    path = folder / f"create-{seed}.dlsnap"
                    os.sync()  # both sides start with nothing of anyone's waiting to be written back
                    snap = machine.snapshot(path, parent if fraction is not None else None, live=live)
                    drop_cache(path)
                    ours.append(snap.seconds)
                    pauses.append(snap.pause_seconds)
                    writes.append(snap.write_seconds)
                    if not live:
                        written = (snap.pages - snap.zero_pages) * PAGE_SIZE
                        os.sync()
                        bounds.append(sequential_write(machine.memory, written, folder / "bound.bin"))
                    if parent is not None:
                        parent.path.unlink()  # keep the disk use to one layer's worth
                    parent = snap
                row: dict[str, Any] = {
                    "memory": format_size(size), "kind": snap.kind + (" (live)" if live else ""),
                    "dirtied": "all" if fraction is None else f"{fraction:.0%}", "pages": snap.pages,
                    "dirtied_pages": pages, "create_s": round(statistics.median(ours), 4),
                    "file_bytes": snap.file_bytes, "disk_bytes": snap.disk_bytes,
                    "pause_ms": round(statistics.median(pauses) * 1e3, 2),
                    "pause_max_ms": round(max(pauses) * 1e3, 2), "write_ms": round(statistics.median(writes) * 1e3, 2)}
                if bounds:
                    row["bound_s"] = round(statistics.median(bounds), 4)
                    row["ratio"] = round(statistics.median(ours) / statistics.median(bounds), 3)
                rows.append(row)
        assert parent is not None
        parent.path.unlink()
    return rows


def live_slowdown(size: int, folder: Path, rate: int | None) -> dict[str, Any]:
    """A guest writing random pages during a live full snapshot, against an equal window before it."""
    with Machine(size, 2, "random", rate=rate, prefault=True) as machine:
        fill(machine)
        machine.start()
        first = machine.snapshot(folder / "live-0.dlsnap")  # the dirty log is on from here, as during the rest
        first.path.unlink()
        time.sleep(0.5)
        before = machine.progress
        began = time.perf_counter()
        snap = machine.snapshot(folder / "live-1.dlsnap", live=True)
        seconds = time.perf_counter() - began
        during = machine.progress - before
        time.sleep(seconds)  # the same window, after: the guest's rate with the dirty log on and no snapshot
        after = machine.progress - before - during
        snap.path.unlink()
    rate_during, rate_after = during / seconds, after / seconds
    return {"memory": format_size(size), "guest_rate": "unlimited" if rate is None else f"{rate}/s per vCPU",
            "snapshot_s": round(seconds, 3), "pause_ms": round(snap.pause_seconds * 1e3, 2),
            "pages_per_s_during": round(rate_during), "pages_per_s_without": round(rate_after),
            "slowdown": round(1 - rate_during / rate_after, 3) if rate_after else None,
            "writes_waited": snap.live_faults, "wait_ms_total": round(snap.live_wait_seconds * 1e3, 2),
            "wait_ms_max": round(snap.live_wait_max_seconds * 1e3, 3),
            "wait_us_mean": round(snap.live_wait_seconds / max(snap.live_faults, 1) * 1e6, 1)}


def restore(size: int, written: int, folder: Path, repeats: int) -> list[dict[str, Any]]:
    """Restore latency of a full snapshot of ``size`` with ``written`` bytes of it non-zero."""
    path = folder / f"restore-{format_size(size).replace(' ', '')}.dlsnap"
    with Machine(size, 2, "random", rate=20000, prefault=written == size) as machine:
        memory, first = machine.memory, machine.spec.pages[0] * PAGE_SIZE
        memory[first:first + written - first] = 1  # every page written, none zero
        machine.start()
        time.sleep(0.2)
        machine.pause()
        snap = machine.snapshot(path)
    rows = []
    for cache, prepared in (("warm", False), ("cold", False), ("warm", True)):
        samples: list[dict[str, Any]] = []
        for _ in range(repeats):
            if cache == "cold":
                drop_cache(path)
            else:
                warm(path)
            spare = Machine(size, 1, "idle", blank=True) if prepared else None
            began = time.perf_counter()
            restored = Machine.restore(path, into=spare)
            returned = time.perf_counter() - began
            saved = restored.vcpu_progress
            while restored.vcpu_progress == saved:
                # Not a bare spin: a rate-limited vCPU exits to the host, whose Python handler would wait for
                # this thread's GIL for a whole switch interval (5 ms).
                time.sleep(0.0001)
            first_write = time.perf_counter() - began
            stats = restored.wait_restored(120)
            restored.stop()
            assert stats is not None
            samples.append({"returned_ms": returned * 1e3, "first_served_ms": (stats.first_served_seconds or 0) * 1e3,
                            "first_write_ms": first_write * 1e3, "resident_ms": (stats.resident_seconds or 0) * 1e3,
                            "running_ms": (stats.running_seconds or 0) * 1e3, "build_ms": stats.build_seconds * 1e3,
                            "open_ms": stats.open_seconds * 1e3})
        row: dict[str, Any] = {"memory": format_size(size), "written": format_size(written), "cache": cache,
                               "vm": "prepared" if prepared else "built", "disk_bytes": snap.disk_bytes,
                               "repeats": repeats}
        for key in samples[0]:
            values = [sample[key] for sample in samples]
            row[key] = round(statistics.median(values), 2)
            row[key.replace("_ms", "_max_ms")] = round(max(values), 2)
        rows.append(row)
    path.unlink()
    return rows


def table(rows: list[dict[str, Any]], keys: list[str]) -> None:
    widths = [max(len(key), *(len(str(row.get(key, ""))) for row in rows)) for key in keys]
    print("  ".join(f"{key:>{width}}" for key, width in zip(keys, widths, strict=True)))
    for row in rows:
        print("  ".join(f"{row.get(key, '')!s:>{width}}" for key, width in zip(keys, widths, strict=True)))
    print()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", default="1G,8G", help="guest sizes of the create measurements")
    parser.add_argument("--restore-sizes", default="1G,16G", help="guest sizes of the restore measurements")
    parser.add_argument("--dir", help="where to write snapshots (default: a temporary directory under /var/tmp)")
    parser.add_argument("--repeats", type=int, default=5, help="restores per size and cache state (median, max)")
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat: a smoke test")
    parser.add_argument("--json", action="store_true", help="one JSON object with every row")
    args = parser.parse_args(argv)
    sizes = [parse_size(s) for s in ("128M" if args.quick else args.sizes).split(",")]
    restore_sizes = [parse_size(s) for s in ("128M,512M" if args.quick else args.restore_sizes).split(",")]
    repeats = 1 if args.quick else args.repeats
    folder = Path(tempfile.mkdtemp(prefix="dirtylog-bench-", dir=args.dir or "/var/tmp"))
    _kernels.load_kernels()
    Machine("64M", 1, "idle", blank=True).stop()  # the guest assembler, imported once
    try:
        results: dict[str, Any] = {"create": [], "live": [], "restore": []}
        for size in sizes:
            results["create"] += create(size, folder, 1 if args.quick else 3)
        for size in sizes[:1]:
            results["live"] += [live_slowdown(size, folder, None), live_slowdown(size, folder, 20000)]
        for size in restore_sizes:
            written = min(size, 1 << 30)
            results["restore"] += restore(size, written, folder, repeats)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if args.json:
        json.dump(results, sys.stdout)
        print()
        return 0
    print("create: medians of 3; a snapshot (to the file flushed on disk) against one sequential write of the same "
          "bytes, flushed")
    table(results["create"], ["memory", "kind", "dirtied", "pages", "create_s", "bound_s", "ratio", "file_bytes",
                              "disk_bytes", "pause_ms", "pause_max_ms", "write_ms"])
    print("live: a guest writing random pages during a live full snapshot")
    table(results["live"], ["memory", "guest_rate", "snapshot_s", "pause_ms", "pages_per_s_during",
                            "pages_per_s_without", "slowdown", "writes_waited", "wait_us_mean", "wait_ms_max"])
    print(f"restore: medians (max) of {repeats} restores of a full snapshot, ms from the call")
    table(results["restore"], ["memory", "written", "cache", "vm", "returned_ms", "returned_max_ms", "first_served_ms",
                               "first_write_ms", "first_write_max_ms", "resident_ms", "build_ms"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
