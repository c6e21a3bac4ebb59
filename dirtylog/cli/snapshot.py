"""``dirtylog snapshot info|merge`` (chains of snapshot files) and ``dirtylog restore`` (run one again)."""

from __future__ import annotations

import argparse
import datetime
import time
from typing import Any

from dirtylog.cli.options import duration_arg, positive_duration_arg
from dirtylog.cli.output import RowPrinter, console, emit_json, key_value_table
from dirtylog.machine import Machine
from dirtylog.snapshot.format import short
from dirtylog.units import format_duration, format_size


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    snapshot = subparsers.add_parser("snapshot", help="inspect and merge chains of snapshot files")
    commands = snapshot.add_subparsers(dest="snapshot_command", metavar="COMMAND", required=True)
    info = commands.add_parser("info", help="the layers of a snapshot's chain: what each holds and restores to")
    info.add_argument("path", metavar="PATH", help="a snapshot file (its parents are found beside it)")
    info.add_argument("--json", action="store_true", help="one JSON line per layer, then a summary")
    info.set_defaults(func=run_info)
    merge = commands.add_parser("merge", help="collapse a chain into one full snapshot of the same state")
    merge.add_argument("path", metavar="PATH", help="the layer whose state to keep")
    merge.add_argument("-o", "--output", required=True, metavar="OUT", help="the full snapshot to write")
    merge.add_argument("--json", action="store_true", help="one JSON object")
    merge.set_defaults(func=run_merge)

    restore = subparsers.add_parser("restore", help="restore a snapshot (and its chain) and run the guest on")
    restore.add_argument("path", metavar="PATH", help="the snapshot file to restore")
    restore.add_argument("--duration", type=duration_arg, default=2.0,
                         help="how long to run the restored guest, e.g. 2s (default 2s)")
    restore.add_argument("--interval", type=positive_duration_arg, default=0.5,
                         help="time between rows (default 500ms)")
    restore.add_argument("--eager", action="store_true",
                         help="bring in and check all of memory before the guest runs (default: on first touch "
                              "and in the background)")
    restore.add_argument("--json", action="store_true", help="JSON lines: the restore, one per interval, a summary")
    restore.set_defaults(func=run_restore)


def _when(created: object) -> str:
    if not isinstance(created, int | float):
        return "?"
    return datetime.datetime.fromtimestamp(created).strftime("%Y-%m-%d %H:%M:%S")


def run_info(args: argparse.Namespace) -> int:
    from dirtylog.snapshot.merge import describe

    rows = describe(args.path)
    top = rows[-1]
    summary = {"path": args.path, "layers": len(rows), "disk_bytes": sum(row["disk_bytes"] for row in rows),
               "restores_to": top["restores_to"], "identity": top["identity"]}
    if args.json:
        for row in rows:
            emit_json(row)
        emit_json({"summary": summary})
        return 0
    printer = RowPrinter([("layer", 5), ("file", 18), ("kind", 11), ("created", 19), ("mode", 5), ("pages", 9),
                          ("zero", 9), ("on disk", 10), ("pause", 9), ("state", 12), ("on", 12)])
    for row in rows:
        kind = row["kind"] + (" (live)" if row["live"] else "")
        pause = "" if row["pause_ms"] is None else format_duration(row["pause_ms"] / 1e3)
        printer.row(row["layer"], row["name"][-18:], kind[:11], _when(row["created"]), row["mode"] or "",
                    f"{row['pages']:,}", f"{row['zero_pages'] or 0:,}", format_size(row["disk_bytes"]), pause,
                    row["identity"][:12], (row["parent"] or "")[:12])
    state = top["restores_to"]
    console.print(f"{args.path} restores to state {top['identity'][:12]}: {format_size(state['memory_bytes'])} in "
                  f"{state['slots']} slot(s), {state['vcpus']} vCPU(s) running {state['workload']}, progress "
                  f"{state['vcpu_progress']}; {len(rows)} layer(s), {format_size(summary['disk_bytes'])} on disk")
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from dirtylog.snapshot.merge import merge

    merged = merge(args.path, args.output)
    if args.json:
        emit_json(merged.as_dict())
    else:
        console.print(f"merged {merged.layers} layer(s) into {merged.path}: {merged.pages:,} pages, "
                      f"{merged.zero_pages:,} of them zero, {format_size(merged.disk_bytes)} on disk, in "
                      f"{format_duration(merged.seconds)}")
    return 0


def run_restore(args: argparse.Namespace) -> int:
    from dirtylog.snapshot import _kernels
    from dirtylog.snapshot.layer import Layer

    began = time.perf_counter()
    _kernels.load_kernels()
    loaded = time.perf_counter() - began
    with Layer.open(args.path) as layer:
        saved = layer.info.get("vcpu_progress") or []
        identity = short(layer.identity)
    with Machine.restore(args.path, lazy=not args.eager) as machine:
        stats = machine.restore_stats
        memory = machine.ram.size
        record: dict[str, Any] = {"restored": args.path, "state": identity, "saved_progress": saved,
                                  "kernels_ms": round(loaded * 1e3, 3), **(stats.as_dict() if stats else {})}
        if args.json:
            emit_json(record)
        else:
            running = stats.running_seconds if stats else None
            console.print(f"restored {args.path} (state {identity}, {stats.layers if stats else '?'} layer(s)): "
                          f"running after {format_duration(running or 0)}"
                          + (f", compiled loops loaded first in {format_duration(loaded)} (once per process)"
                             if loaded > 0.001 else ""))
        vcpus = machine.spec.vcpus
        rows = RowPrinter([("time", 7)] + [(f"vcpu{i} progress", 15) for i in range(vcpus)]
                          + [("pages/s", 12), ("resident", 9)])
        start = last_time = time.perf_counter()
        last = machine.vcpu_progress
        while (now := time.perf_counter()) - start < args.duration:
            time.sleep(min(args.interval, max(0.0, args.duration - (now - start))))
            machine.check()
            now = time.perf_counter()
            progress = machine.vcpu_progress
            rate = (sum(progress) - sum(last)) / max(now - last_time, 1e-9)
            current = machine.restore_stats
            resident = current is not None and current.resident_seconds is not None
            if args.json:
                emit_json({"t": round(now - start, 3), "vcpu_progress": progress, "pages_per_s": round(rate),
                           "resident": resident})
            else:
                rows.row(f"{now - start:.1f}s", *(f"{p:,}" for p in progress), f"{rate:,.0f}",
                         "yes" if resident else "arriving")
            last, last_time = progress, now
        final = machine.wait_restored(60)
        machine.pause()
        progress = machine.vcpu_progress
    summary = {"restored": args.path, "saved_progress": saved, "progress": progress,
               "continued": bool(saved) and all(p >= s for p, s in zip(progress, saved, strict=False))
               and sum(progress) > sum(saved),
               **(final.as_dict() if final else {})}
    if args.json:
        emit_json({"summary": summary})
        return 0
    timings = final.as_dict() if final else {}

    def ms(key: str, otherwise: str = "-") -> str:
        value = timings.get(key)
        return otherwise if value is None else f"{value} ms"

    console.print(key_value_table("restore", [
        ("chain opened and checked", ms("open_ms")),
        ("machine built", ms("build_ms")),
        ("vCPUs running", ms("running_ms")),
        ("first page the guest needed, in", ms("first_served_ms", "before the guest ran (--eager)")),
        ("all memory in and checked", f"{ms('resident_ms')} ({format_size(memory)})"),
        ("faults served", f"{timings.get('faults')} (waited {timings.get('fault_wait_ms')} ms in all, at most "
                          f"{timings.get('fault_wait_max_ms')} ms)"),
    ]))
    console.print(f"progress {saved} at the snapshot, {progress} now"
                  + (": the guest went on from where it was saved" if summary["continued"] else ""))
    return 0
