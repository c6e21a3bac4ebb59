"""``dirtylog track --pid PID`` / ``dirtylog track -- COMMAND ARGS...`` / ``dirtylog track --self``: the dirty
pages of a Linux process, window by window, by mapping.

Each window prints the pages written in it, the rate, the written working set so far (distinct pages
written since tracking began), the busiest mappings and the collection time; ``--json`` gives the same as
JSON lines and a summary, ``--plot`` a heatmap of writes by mapping and time, ``--record`` the dirty sets
of every window for ``Machine(workload="trace", trace=FILE)`` to replay.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import subprocess
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from rich.markup import escape

from dirtylog.cli.output import RowPrinter, console, emit_json
from dirtylog.cli.plots import plot_heatmap
from dirtylog.errors import DirtylogError
from dirtylog.trace import DirtyTrace
from dirtylog.tracking.process import ProcessTracker
from dirtylog.tracking.process_dirty import ProcessDirty
from dirtylog.units import PAGE_SIZE, format_size

TOP_MAPPINGS = 3  # busiest mappings shown per window for people
HEATMAP_ROWS = 24  # mappings (by name) in the heatmap; the rest are summed as "other"


def add_process_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("process (instead of a VM)")
    group.add_argument("--pid", type=int, help="track the running process PID, without restarting it (ptrace)")
    group.add_argument("--self", dest="track_self", action="store_true",
                       help="track this dirtylog process while it runs the VM (guest RAM is one of its mappings)")
    group.add_argument("--refresh-interval", type=float, default=1.0, metavar="SECONDS",
                       help="re-read /proc/PID/maps when the process's size changes or after this long (default "
                            "1; 0: at every collection)")
    group.add_argument("--shared", action="store_true", help="also track writable shared mappings (this "
                       "process's writes to them only)")
    group.add_argument("--record", metavar="FILE.npz",
                       help="write the dirty pages of every window, to replay with --workload trace --trace FILE")
    parser.add_argument("command", nargs="*", metavar="-- COMMAND",
                        help="start COMMAND (after --) and track it until it exits")


def wants_process(args: argparse.Namespace) -> bool:
    """Whether the arguments ask for a process rather than a VM."""
    return bool(args.pid is not None or args.command or args.track_self or args.record)


@dataclass
class ProcessTimeline:
    """Per-window figures for the summary, the plot and the recording."""

    t: list[float] = field(default_factory=list)
    dirty: list[int] = field(default_factory=list)
    working_set: list[int] = field(default_factory=list)
    collect_ms: list[float] = field(default_factory=list)
    by_name: list[dict[str, int]] = field(default_factory=list)
    pages: list[npt.NDArray[np.uint64]] = field(default_factory=list)  # kept only when recording
    totals: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    new: int = 0
    gone: int = 0
    exited: bool = False
    written: npt.NDArray[np.uint64] = field(default_factory=lambda: np.zeros(0, dtype=np.uint64))


def run_process(args: argparse.Namespace) -> int:
    """Track a process as the arguments say; returns the exit status."""
    chosen = [name for name, on in (("--pid", args.pid is not None), ("-- COMMAND", bool(args.command)),
                                    ("--self", args.track_self)) if on]
    if len(chosen) != 1:
        raise DirtylogError("tell which process to track with exactly one of --pid PID, --self or -- COMMAND "
                            + (f"(got {' and '.join(chosen)})" if chosen else "(got none)"))
    if args.verify:
        raise DirtylogError("--verify runs the VM stamp proof; it does not apply to a process")
    if args.refresh_interval < 0:
        raise DirtylogError(f"--refresh-interval must be 0 or more seconds, got {args.refresh_interval}")
    if args.record and not args.record.endswith(".npz"):
        raise DirtylogError(f"--record file {args.record!r} must end in .npz (a NumPy archive)")
    with _target(args) as (pid, source, child):
        tracker = ProcessTracker(pid, refresh_interval=args.refresh_interval, shared=args.shared)
        tracker.enable()
        try:
            if not args.json:
                console.print(f"tracking [bold]{escape(source)}[/bold]: {len(tracker.tracked)} writable mappings, "
                              f"{format_size(sum(m.size for m in tracker.tracked))}, every "
                              f"{args.interval * 1e3:.0f} ms" + (", until it exits" if child else ""))
            timeline = _track(args, tracker, child)
        finally:
            tracker.disable()
        status = child.wait() if child is not None and timeline.exited else None
    return _summarize(args, tracker, timeline, source, status)


@contextlib.contextmanager
def _target(args: argparse.Namespace) -> Iterator[tuple[int | None, str, subprocess.Popen[bytes] | None]]:
    """The process to track: (pid, description, the child we started or None)."""
    if args.pid is not None:
        yield args.pid, f"process {args.pid}", None
        return
    if args.command:
        try:
            child = subprocess.Popen(args.command)
        except OSError as error:
            raise DirtylogError(f"cannot start {shlex.join(args.command)}: {error.strerror}") from None
        try:
            yield child.pid, shlex.join(args.command), child
        finally:
            if child.poll() is None:
                child.terminate()
                try:
                    child.wait(5)
                except subprocess.TimeoutExpired:
                    child.kill()
                    child.wait()
        return
    from dirtylog.cli.options import machine_from_args

    args.workload = args.workload or "hotset"
    with machine_from_args(args) as machine:
        machine.start()
        yield None, f"this process (pid {os.getpid()}) running a {args.workload} VM", None
        machine.check()


def _track(args: argparse.Namespace, tracker: ProcessTracker, child: subprocess.Popen[bytes] | None) -> ProcessTimeline:
    rows = RowPrinter([("time", 6), ("dirty", 8), ("MB/s", 7), ("written", 10), ("ms", 6), ("busiest mappings", 32)])
    timeline = ProcessTimeline()
    start = time.perf_counter()
    index = 0
    # A child we started runs until it exits; an existing process for --duration (or until it exits).
    while child is not None or index * args.interval < args.duration:
        index += 1
        time.sleep(max(0.0, start + index * args.interval - time.perf_counter()))
        dirty = tracker.collect()
        _record(args, timeline, dirty, time.perf_counter() - start, tracker.stats.last_collect_seconds)
        if args.json:
            emit_json(_row_json(args, timeline, dirty))
        else:
            _row_people(args, rows, timeline, dirty)
        if dirty.exited:
            timeline.exited = True
            break
    return timeline


def _record(args: argparse.Namespace, timeline: ProcessTimeline, dirty: ProcessDirty, now: float,
            seconds: float) -> None:
    pages = dirty.pages()
    timeline.written = np.union1d(timeline.written, pages)
    by_name = dirty.counts_by_name()
    timeline.t.append(now)
    timeline.dirty.append(int(pages.size))
    timeline.working_set.append(int(timeline.written.size))
    timeline.collect_ms.append(seconds * 1e3)
    timeline.by_name.append(by_name)
    for name, count in by_name.items():
        timeline.totals[name] += count
    timeline.new += len(dirty.new)
    timeline.gone += len(dirty.gone)
    if args.record:
        timeline.pages.append(pages)


def _busiest(by_name: dict[str, int], count: int = TOP_MAPPINGS) -> list[tuple[str, int]]:
    return sorted(by_name.items(), key=lambda item: -item[1])[:count]


def _base(name: str) -> str:
    """A mapping's name for people: a file's base name."""
    return os.path.basename(name) if name.startswith("/") else name


def _short(name: str) -> str:
    """:func:`_base`, escaped for the console (``[heap]`` looks like rich markup)."""
    return escape(_base(name))


def _row_json(args: argparse.Namespace, timeline: ProcessTimeline, dirty: ProcessDirty) -> dict[str, object]:
    record: dict[str, object] = {
        "t": round(timeline.t[-1], 4), "dirty_pages": timeline.dirty[-1],
        "mb_per_s": round(timeline.dirty[-1] * PAGE_SIZE / args.interval / 1e6, 2),
        "working_set_pages": timeline.working_set[-1], "collect_ms": round(timeline.collect_ms[-1], 3),
        "mappings": len(dirty.mappings), "by_mapping": dict(_busiest(timeline.by_name[-1], 20)),
    }
    if dirty.new:
        record["new"] = [m.label for m in dirty.new]
    if dirty.gone:
        record["gone"] = [m.label for m in dirty.gone]
    if dirty.exited:
        record["exited"] = True
    return record


def _row_people(args: argparse.Namespace, rows: RowPrinter, timeline: ProcessTimeline, dirty: ProcessDirty) -> None:
    busiest = ", ".join(f"{_base(name)} {count}" for name, count in _busiest(timeline.by_name[-1]))
    if dirty.new or dirty.gone:
        busiest = f"+{len(dirty.new)}/-{len(dirty.gone)} maps, " + busiest
    busiest = escape(busiest[:32])
    rows.row(f"{timeline.t[-1]:.2f}s", f"{timeline.dirty[-1]:,}",
             f"{timeline.dirty[-1] * PAGE_SIZE / args.interval / 1e6:,.1f}",
             format_size(timeline.working_set[-1] * PAGE_SIZE), f"{timeline.collect_ms[-1]:.2f}",
             "exited" if dirty.exited else busiest)


def _summarize(args: argparse.Namespace, tracker: ProcessTracker, timeline: ProcessTimeline, source: str,
               status: int | None) -> int:
    stats = tracker.stats
    collections = max(1, stats.collections)
    summary: dict[str, object] = {
        "target": source, "pid": tracker.pid, "collections": stats.collections,
        "pages_reported": stats.pages_reported, "working_set_pages": int(timeline.written.size),
        "working_set_bytes": int(timeline.written.size) * PAGE_SIZE,
        "mean_dirty_pages": round(float(np.mean(timeline.dirty)), 1) if timeline.dirty else 0.0,
        "mappings_tracked": len(tracker.tracked), "mappings_new": timeline.new, "mappings_gone": timeline.gone,
        "untracked": {m.label: why for m, why in tracker.untracked.items()},
        "by_mapping": dict(_busiest(timeline.totals, 20)),
        "enable_ms": round(stats.enable_seconds * 1e3, 3),
        "mean_collect_ms": round(stats.total_collect_seconds / collections * 1e3, 3),
        "max_collect_ms": round(max(timeline.collect_ms, default=0.0), 3),
        "maps_refreshes": tracker.refreshes, "disable_ms": round(stats.disable_seconds * 1e3, 3),
        "exited": timeline.exited,
    }
    if status is not None:
        summary["exit_status"] = status
    if args.record:
        trace = DirtyTrace.from_windows(timeline.t, timeline.pages, source=source, interval=args.interval)
        trace.save(args.record)
        summary["recorded"] = {"file": args.record, "windows": trace.nwindows, "distinct_pages": trace.npages}
    if args.plot:
        _plot(args, timeline, source)
    if args.json:
        emit_json({"summary": summary})
        return 0
    console.print(f"{stats.collections} collections, {stats.pages_reported:,} pages reported; written working set "
                  f"{format_size(int(timeline.written.size) * PAGE_SIZE)}; collect mean {summary['mean_collect_ms']} "
                  f"ms / max {summary['max_collect_ms']} ms; enable {summary['enable_ms']} ms")
    console.print("busiest mappings: " + ", ".join(f"{_short(name)} {count:,}"
                                                   for name, count in _busiest(timeline.totals, 8)))
    if timeline.exited:
        console.print(f"{escape(source)} exited" + (f" with status {status}" if status is not None else "")
                      + "; the last collection above holds its last writes")
    if args.record:
        recorded = summary["recorded"]
        assert isinstance(recorded, dict)
        console.print(f"recorded {recorded['windows']} windows, {recorded['distinct_pages']:,} distinct pages to "
                      f"{escape(args.record)}; replay it in a VM with `dirtylog run --workload trace --trace "
                      f"{escape(args.record)}`")
    return 0


def _plot(args: argparse.Namespace, timeline: ProcessTimeline, source: str) -> None:
    names = [name for name, _ in _busiest(timeline.totals, HEATMAP_ROWS)]
    rest = set(timeline.totals) - set(names)
    rows = [_base(name) for name in names] + (["other"] if rest else [])
    cells = np.zeros((len(rows), len(timeline.t)), dtype=np.int64)
    for column, by_name in enumerate(timeline.by_name):
        for row, name in enumerate(names):
            cells[row, column] = by_name.get(name, 0)
        if rest:
            cells[-1, column] = sum(count for name, count in by_name.items() if name in rest)
    plot_heatmap(args.plot, f"dirty pages of {source}, every {args.interval * 1e3:.0f} ms", timeline.t, rows,
                 cells, [("dirty pages", timeline.dirty, "pages"), ("working set", timeline.working_set, "pages")])
