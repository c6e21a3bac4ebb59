"""``dirtylog track``: run a workload and collect its dirty log every interval, optionally proving it lossless."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

from dirtylog.cli.options import (
    add_machine_arguments,
    duration_arg,
    machine_from_args,
    positive_duration_arg,
    positive_int,
)
from dirtylog.cli.output import RowPrinter, console, emit_json
from dirtylog.cli.plots import plot_series
from dirtylog.cli.track_process import add_process_arguments, run_process, wants_process
from dirtylog.errors import DirtylogError
from dirtylog.machine import DIRTY_LOG_MODES, Machine
from dirtylog.tracking.base import Tracker
from dirtylog.tracking.verify import StampVerifier
from dirtylog.units import PAGE_SIZE, format_size


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("track", help="collect the dirty pages of a running guest, or of any process "
                                   "(--pid PID, -- COMMAND), every interval")
    parser.add_argument("--mode", choices=DIRTY_LOG_MODES, default="log",
                        help="log: KVM_GET_DIRTY_LOG; clear: + KVM_CLEAR_DIRTY_LOG (manual protect); "
                             "ring: per-vCPU dirty rings; uffd: userfaultfd write-protect of guest RAM in the "
                             "host, which also sees host writes (default log)")
    parser.add_argument("--backend", choices=("kvm", "stage2"), default="kvm",
                        help="kvm: a real VM; stage2: the ARM stage-2 model of the seed patch (no /dev/kvm needed)")
    add_machine_arguments(parser, workload="hotset")
    parser.set_defaults(workload=None)
    parser.add_argument("--interval", type=positive_duration_arg, default=0.1,
                        help="time between collections (default 100ms)")
    parser.add_argument("--duration", type=duration_arg, default=10.0, help="how long to track (default 10s)")
    parser.add_argument("--verify", action="store_true",
                        help="run the stamp workload and check every collection; fail on any lost page")
    parser.add_argument("--initially-set", action="store_true", help="clear mode: KVM_DIRTY_LOG_INITIALLY_SET")
    parser.add_argument("--ring-entries", type=positive_int, default=None,
                        help="ring mode: entries per vCPU (default: the host's largest, up to 65536)")
    parser.add_argument("--json", action="store_true", help="JSON lines: one per collection, then a summary")
    parser.add_argument("--plot", metavar="FILE.png", help="draw dirty pages and collection time per interval "
                        "(for a process: a heatmap by mapping and time)")
    add_process_arguments(parser)
    parser.set_defaults(func=run)


@dataclass
class Timeline:
    """Per-collection figures, for the summary and the plot."""

    t: list[float] = field(default_factory=list)
    dirty: list[int] = field(default_factory=list)
    collect_ms: list[float] = field(default_factory=list)


def run(args: argparse.Namespace) -> int:
    if wants_process(args):
        return run_process(args)
    if args.verify and args.workload not in (None, "stamp"):
        raise DirtylogError(f"--verify checks the stamp workload's page stamps; drop --workload {args.workload} "
                            "or use --workload stamp")
    args.workload = args.workload or ("stamp" if args.verify else "hotset")
    if args.backend == "stage2":
        from dirtylog.cli.track_model import run_model

        return run_model(args)
    with machine_from_args(args) as machine:
        tracker = machine.dirty_log(args.mode, initially_set=args.initially_set, ring_entries=args.ring_entries)
        verifier = StampVerifier(machine, initially_set=args.initially_set) if args.verify else None
        if not args.json:
            console.print(f"tracking [bold]{args.workload}[/bold] on {args.vcpus} vCPU(s), "
                          f"{format_size(args.memory)}, mode [bold]{args.mode}[/bold], every "
                          f"{args.interval * 1e3:.0f} ms" + (", verifying every collection" if verifier else ""))
        machine.start()
        if verifier:
            verifier.enable(tracker)
        else:
            tracker.enable()
        timeline = _track(args, machine, tracker, verifier)
        machine.pause()
        if verifier:  # paused: this last collection must account for every write still pending
            verifier.collect(tracker)
        tracker.disable()
    return _summarize(args, tracker, verifier, timeline)


def _track(args: argparse.Namespace, machine: Machine, tracker: Tracker,
           verifier: StampVerifier | None) -> Timeline:
    rows = RowPrinter([("time", 7), ("dirty pages", 12), ("MB/s dirtied", 13), ("collect ms", 11)]
                      + ([("verify", 8)] if verifier else []))
    timeline = Timeline()
    start = time.perf_counter()
    collections = int(args.duration / args.interval)
    for index in range(1, collections + 1):
        time.sleep(max(0.0, start + index * args.interval - time.perf_counter()))
        machine.check()
        bitmap = verifier.collect(tracker) if verifier else tracker.collect()
        now = time.perf_counter() - start
        dirty, seconds = bitmap.count(), tracker.stats.last_collect_seconds
        timeline.t.append(now)
        timeline.dirty.append(dirty)
        timeline.collect_ms.append(seconds * 1e3)
        verdict = ("ok" if verifier.report.ok else f"{len(verifier.report.violations)} BAD") if verifier else None
        if args.json:
            record: dict[str, object] = {"t": round(now, 4), "dirty_pages": dirty,
                                         "mb_per_s": round(dirty * PAGE_SIZE / args.interval / 1e6, 2),
                                         "collect_ms": round(seconds * 1e3, 3)}
            if verifier:
                record["violations"] = len(verifier.report.violations)
            emit_json(record)
        else:
            rows.row(f"{now:.2f}s", f"{dirty:,}", f"{dirty * PAGE_SIZE / args.interval / 1e6:,.1f}",
                     f"{seconds * 1e3:.3f}", *([verdict] if verdict else []))
    return timeline


def _summarize(args: argparse.Namespace, tracker: Tracker, verifier: StampVerifier | None, timeline: Timeline) -> int:
    stats = tracker.stats
    summary: dict[str, object] = {
        "mode": args.mode, "backend": args.backend, "workload": args.workload, "collections": stats.collections,
        "pages_reported": stats.pages_reported, "enable_ms": round(stats.enable_seconds * 1e3, 3),
        "mean_collect_ms": round(stats.total_collect_seconds / max(1, stats.collections) * 1e3, 3),
        "max_collect_ms": round(max(timeline.collect_ms, default=0.0), 3),
        "disable_ms": round(stats.disable_seconds * 1e3, 3),
    }
    if verifier:
        summary["verified"] = verifier.report.ok
        summary["violations"] = [v.describe() for v in verifier.report.violations]
        summary["changes_seen"] = verifier.report.changes_seen
    if args.plot:
        plot_series(args.plot, f"dirty log: {args.workload}, mode {args.mode}", timeline.t, "seconds",
                    [("dirty pages", timeline.dirty, "pages"), ("collection", timeline.collect_ms, "ms")])
    if args.json:
        emit_json({"summary": summary})
    else:
        console.print(f"{stats.collections} collections, {stats.pages_reported:,} pages reported; enable "
                      f"{summary['enable_ms']} ms, collect mean {summary['mean_collect_ms']} ms / max "
                      f"{summary['max_collect_ms']} ms, disable {summary['disable_ms']} ms")
        if verifier:
            if verifier.report.ok:
                console.print(f"[green]verified[/green]: {verifier.report.changes_seen:,} page changes seen, "
                              "no page lost, none reported without a write")
            else:
                console.print(f"[red bold]LOST OR WRONG PAGES[/red bold]: {len(verifier.report.violations)}")
                for violation in verifier.report.violations[:20]:
                    console.print(f"  {violation.describe()}")
    return 0 if verifier is None or verifier.report.ok else 1
