"""``dirtylog run``: run a guest workload and watch it write, second by second."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from dirtylog.cli.options import add_machine_arguments, duration_arg, machine_from_args, positive_duration_arg
from dirtylog.cli.output import RowPrinter, console, emit_json, error_console
from dirtylog.cli.serve import add_qmp_argument, serve_machine
from dirtylog.errors import DirtylogError
from dirtylog.machine import Machine
from dirtylog.tracking.base import DIRTY_LOG_MODES
from dirtylog.units import PAGE_SIZE, format_duration, format_size


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("run", help="run a guest workload on real KVM with a live view")
    add_machine_arguments(parser)
    parser.add_argument("--duration", type=duration_arg, default=5.0, help="how long, e.g. 500ms or 5s (default 5s)")
    parser.add_argument("--interval", type=positive_duration_arg, default=1.0, help="time between rows (default 1s)")
    parser.add_argument("--json", action="store_true", help="JSON lines: one per interval, then a summary")
    add_qmp_argument(parser, "keep the VM running (--duration and --interval do not apply)")
    parser.add_argument("--key-file", help="with --qmp: the pre-shared key QMP's migrate uses (dirtylog keygen)")
    parser.add_argument("--dirty-ring", action="store_true",
                        help="with --qmp: give vCPUs dirty rings (QEMU's dirty-ring-size), which the dirty-limit "
                        "migration capability needs")
    snapshots = parser.add_argument_group("snapshots (a chain while the guest runs: docs/snapshots.md)")
    snapshots.add_argument("--snapshot-every", type=positive_duration_arg, metavar="DURATION",
                           help="take a snapshot this often: a full one first, then incremental layers on it")
    snapshots.add_argument("--snapshot-dir", metavar="DIR", help="where the chain goes (snap-0001.dlsnap, ...)")
    snapshots.add_argument("--live", action="store_true",
                           help="live snapshots: the guest runs on while memory is written")
    snapshots.add_argument("--snapshot-mode", choices=DIRTY_LOG_MODES, default="log",
                           help="the dirty log kept between snapshots (default log; uffd also sees raw host writes)")
    parser.set_defaults(func=run)


class _Snapshots:
    """``--snapshot-every``: a chain taken on schedule while the guest runs; a failed snapshot is reported and
    its pages stay owed to the next one."""

    def __init__(self, args: argparse.Namespace, start: float) -> None:
        if bool(args.snapshot_every) != bool(args.snapshot_dir):
            raise DirtylogError("--snapshot-every and --snapshot-dir go together: say how often and where")
        if args.live and not args.snapshot_every:
            raise DirtylogError("--live is for --snapshot-every (live snapshots of the chain)")
        if args.live and args.snapshot_mode == "uffd":
            raise DirtylogError("--live write-protects guest RAM with a userfaultfd of its own, which the uffd mode "
                                "holds: use --snapshot-mode log, clear or ring with --live")
        self.every: float | None = args.snapshot_every
        self.folder = Path(args.snapshot_dir) if args.snapshot_dir else None
        if self.folder is not None:
            try:
                self.folder.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise DirtylogError(f"cannot use --snapshot-dir {self.folder}: {error.strerror}") from None
        if self.every:
            from dirtylog.snapshot import _kernels

            _kernels.load_kernels()  # before the guest starts, not at its first snapshot
        self.args = args
        self.next_at = start + (self.every or 0.0)
        self.taken: list[Any] = []
        self.failed = 0

    def due(self, now: float) -> bool:
        return self.every is not None and now >= self.next_at

    def take(self, machine: Machine, start: float) -> None:
        from dirtylog.snapshot.errors import SnapshotError
        from dirtylog.snapshot.session import layer_name

        assert self.folder is not None and self.every is not None
        path = self.folder / layer_name(len(self.taken) + self.failed + 1)
        parent = self.taken[-1] if self.taken else None
        when = time.perf_counter() - start
        try:
            snap = machine.snapshot(path, parent, live=self.args.live,
                                    mode=self.args.snapshot_mode if parent is None else None)
        except SnapshotError as error:
            self.failed += 1
            if self.args.json:
                emit_json({"snapshot": str(path), "t": round(when, 3), "error": str(error)})
            else:
                error_console.print(f"[bold]snapshot failed[/bold] at {when:.1f}s: {error}")
        else:
            self.taken.append(snap)
            if self.args.json:
                emit_json({"snapshot": str(path), "t": round(when, 3), **snap.as_dict()})
            else:
                console.print(f"[bold]{snap.kind} snapshot[/bold] {path.name} at {when:.1f}s: {snap.pages:,} pages "
                              f"({snap.zero_pages:,} zero), {format_size(snap.disk_bytes)} on disk, guest paused "
                              f"{format_duration(snap.pause_seconds)}, written in {format_duration(snap.seconds)}"
                              + (f", {snap.live_faults} guest writes waited" if snap.live else ""))
        self.next_at = max(self.next_at + self.every, time.perf_counter())

    def summary(self) -> dict[str, Any]:
        if self.every is None:
            return {}
        return {"snapshots": len(self.taken), "snapshots_failed": self.failed,
                "snapshot_disk_bytes": sum(snap.disk_bytes for snap in self.taken),
                "last_snapshot": str(self.taken[-1].path) if self.taken else None}


def run(args: argparse.Namespace) -> int:
    if args.qmp:
        if args.snapshot_every:
            raise DirtylogError("--snapshot-every is for a run with --duration, not one served over --qmp")
        return serve_machine(args)
    snapshots = _Snapshots(args, time.perf_counter())
    with machine_from_args(args, dirty_ring=args.snapshot_mode == "ring" and bool(args.snapshot_every)) as machine:
        vcpus = machine.spec.vcpus
        if not args.json:
            console.print(f"[bold]{args.workload}[/bold] on {vcpus} vCPU(s), {format_size(args.memory)} RAM, "
                          f"{len(machine.workload_pages)} workload pages"
                          + (f", {args.rate} pages/s per vCPU" if args.rate else ""))
        rows = RowPrinter([("time", 7)] + [(f"vcpu{i} pages/s", 15) for i in range(vcpus)]
                          + [("total pages/s", 14), ("MB/s", 9)])
        machine.start()
        start = last_time = time.perf_counter()
        snapshots.next_at = start + (snapshots.every or 0.0)
        last = machine.vcpu_progress
        first = list(last)
        while (now := time.perf_counter()) - start < args.duration:
            next_row = last_time + args.interval
            wake = min(next_row, snapshots.next_at) if snapshots.every else next_row
            time.sleep(max(0.0, min(wake, start + args.duration) - now))
            machine.check()
            now = time.perf_counter()
            if snapshots.due(now):
                snapshots.take(machine, start)
                continue
            if now < next_row and now - start < args.duration:
                continue
            progress = machine.vcpu_progress
            rates = [(p - q) / (now - last_time) for p, q in zip(progress, last, strict=True)]
            if args.json:
                emit_json({"t": round(now - start, 3), "vcpu_pages_per_s": [round(r) for r in rates],
                           "pages_per_s": round(sum(rates)), "progress": sum(progress)})
            else:
                rows.row(f"{now - start:.1f}s", *(f"{r:,.0f}" for r in rates), f"{sum(rates):,.0f}",
                         f"{sum(rates) * PAGE_SIZE / 1e6:,.0f}")
            last, last_time = progress, now
        machine.pause()
        elapsed = time.perf_counter() - start
        written = [p - f for p, f in zip(machine.vcpu_progress, first, strict=True)]
    summary = {"workload": args.workload, "vcpus": vcpus, "memory": args.memory, "seconds": round(elapsed, 3),
               "pages_written": sum(written), "vcpu_pages_written": written,
               "pages_per_s": round(sum(written) / elapsed), **snapshots.summary()}
    if args.json:
        emit_json({"summary": summary})
    else:
        console.print(f"wrote {summary['pages_written']:,} pages in {elapsed:.2f} s "
                      f"({summary['pages_per_s']:,} pages/s)")
        if snapshots.taken:
            console.print(f"{len(snapshots.taken)} snapshot(s), {format_size(summary['snapshot_disk_bytes'])} on "
                          f"disk; run the last again with: dirtylog restore {summary['last_snapshot']}")
    return 0
