"""``dirtylog run``: run a guest workload and watch it write, second by second."""

from __future__ import annotations

import argparse
import time

from dirtylog.cli.options import add_machine_arguments, duration_arg, machine_from_args, positive_duration_arg
from dirtylog.cli.output import RowPrinter, console, emit_json
from dirtylog.cli.serve import add_qmp_argument, serve_machine
from dirtylog.units import PAGE_SIZE, format_size


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
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.qmp:
        return serve_machine(args)
    with machine_from_args(args) as machine:
        vcpus = machine.spec.vcpus
        if not args.json:
            console.print(f"[bold]{args.workload}[/bold] on {vcpus} vCPU(s), {format_size(args.memory)} RAM, "
                          f"{len(machine.workload_pages)} workload pages"
                          + (f", {args.rate} pages/s per vCPU" if args.rate else ""))
        rows = RowPrinter([("time", 7)] + [(f"vcpu{i} pages/s", 15) for i in range(vcpus)]
                          + [("total pages/s", 14), ("MB/s", 9)])
        machine.start()
        start = last_time = time.perf_counter()
        last = machine.vcpu_progress
        first = list(last)
        while (now := time.perf_counter()) - start < args.duration:
            time.sleep(min(args.interval, max(0.0, args.duration - (now - start))))
            machine.check()
            now = time.perf_counter()
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
               "pages_per_s": round(sum(written) / elapsed)}
    if args.json:
        emit_json({"summary": summary})
    else:
        console.print(f"wrote {summary['pages_written']:,} pages in {elapsed:.2f} s "
                      f"({summary['pages_per_s']:,} pages/s)")
    return 0
