"""``dirtylog track --backend stage2``: the same tracking loop against the ARM stage-2 model.

The model has no clock: every interval each vCPU performs ``rate x interval`` writes through the model's
write path, then the collector runs ``kvm_vm_ioctl_get_dirty_log`` on every memslot. Time in the output
is simulated time; the model's own speed is reported in the summary. ``--verify`` compares each
collection with the ground truth the model keeps (every page written since the previous collection).
"""

from __future__ import annotations

import argparse
import time

from dirtylog.cli.output import RowPrinter, console, emit_json
from dirtylog.cli.plots import plot_series
from dirtylog.tracking.stage2 import Stage2Machine
from dirtylog.units import PAGE_SIZE, format_size
from dirtylog.workload import WorkloadSpec

DEFAULT_MODEL_RATE = 20_000  # writes per second per vCPU of simulated time
SYSTEM_PAGES = 512  # as on KVM: the first 2 MiB are not workload area


def run_model(args: argparse.Namespace) -> int:
    """Track a workload on the stage-2 model; exit status 1 when --verify finds a wrong collection."""
    npages = args.memory // PAGE_SIZE
    spec = WorkloadSpec(args.workload, SYSTEM_PAGES, npages - SYSTEM_PAGES, args.vcpus, args.rate,
                        args.hot_fraction, args.hot_weight)
    machine = Stage2Machine(args.memory, spec, memslots=args.slots)
    tracker = machine.dirty_log()
    rate = args.rate or DEFAULT_MODEL_RATE
    writes = max(1, round(rate * args.interval))
    if not args.json:
        console.print(f"tracking [bold]{args.workload}[/bold] on the ARM stage-2 model: {args.vcpus} vCPU(s), "
                      f"{format_size(args.memory)}, {writes} writes per vCPU per {args.interval * 1e3:.0f} ms "
                      "of simulated time")
    rows = RowPrinter([("sim time", 9), ("dirty pages", 12), ("written", 9), ("collect ms", 11)]
                      + ([("verify", 8)] if args.verify else []))
    tracker.enable()
    machine.take_written()
    lost = phantom = 0
    times: list[float] = []
    dirty_counts: list[int] = []
    collect_ms: list[float] = []
    start = time.perf_counter()
    for index in range(1, int(args.duration / args.interval) + 1):
        machine.advance(writes)
        bitmap = tracker.collect()
        truth = machine.take_written()
        lost += (truth - bitmap).count()
        phantom += (bitmap - truth).count()
        now, dirty = index * args.interval, bitmap.count()
        times.append(now)
        dirty_counts.append(dirty)
        collect_ms.append(tracker.stats.last_collect_seconds * 1e3)
        if args.json:
            record: dict[str, object] = {"t": round(now, 4), "dirty_pages": dirty, "written_pages": truth.count(),
                                         "collect_ms": round(collect_ms[-1], 3)}
            if args.verify:
                record.update(lost=lost, phantom=phantom)
            emit_json(record)
        else:
            verdict = ["ok" if lost == phantom == 0 else f"{lost + phantom} BAD"] if args.verify else []
            rows.row(f"{now:.2f}s", f"{dirty:,}", f"{truth.count():,}", f"{collect_ms[-1]:.3f}", *verdict)
    tracker.disable()
    elapsed = time.perf_counter() - start
    summary = {"mode": "stage2", "backend": "stage2", "workload": args.workload, "collections": len(times),
               "pages_reported": tracker.stats.pages_reported, "model_writes": machine.stats.writes,
               "model_faults": machine.stats.faults,
               "model_writes_per_s": round(machine.stats.writes / elapsed)}
    if args.verify:
        summary.update(verified=lost == phantom == 0, lost_pages=lost, phantom_pages=phantom)
    if args.plot:
        plot_series(args.plot, f"stage-2 model dirty log: {args.workload}", times, "simulated seconds",
                    [("dirty pages", dirty_counts, "pages"), ("collection", collect_ms, "ms")])
    if args.json:
        emit_json({"summary": summary})
    else:
        console.print(f"{len(times)} collections, {tracker.stats.pages_reported:,} pages reported; the model did "
                      f"{machine.stats.writes:,} writes ({machine.stats.faults:,} faults) in {elapsed:.2f} s")
        if args.verify:
            console.print("[green]verified[/green]: every collection equals the pages written"
                          if lost == phantom == 0 else f"[red bold]LOST {lost} / PHANTOM {phantom} pages[/red bold]")
    return 0 if not args.verify or lost == phantom == 0 else 1
