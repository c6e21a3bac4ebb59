"""``dirtylog rate``: how fast a running guest dirties its memory, per window, with its working set."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from dirtylog.cli.options import add_machine_arguments, duration_arg, machine_from_args, positive_int
from dirtylog.cli.output import RowPrinter, console, emit_json
from dirtylog.errors import DirtylogError
from dirtylog.rate.estimate import (
    DEFAULT_ACCURACY,
    DEFAULT_CONFIDENCE,
    DEFAULT_SAMPLE_PAGES,
    METHOD_HELP,
    METHODS,
    WorkingSet,
    address_histogram,
    check_accuracy,
    check_confidence,
    check_sample_pages,
    check_window,
)
from dirtylog.rate.result import DirtyRate
from dirtylog.units import format_size

HEATMAP_BINS = 128


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = subparsers.add_parser("rate", help="measure a guest's dirty rate and working set, window by window")
    parser.add_argument("--method", choices=METHODS, default="sampling",
                        help="; ".join(f"{name}: {text}" for name, text in METHOD_HELP.items()) + " (default sampling)")
    parser.add_argument("--window", default="1s", help="window length, 10ms..60s (default 1s)")
    parser.add_argument("--watch", action="store_true", help="measure window after window (for --duration, or "
                                                              "until Ctrl-C); without it, one window")
    parser.add_argument("--duration", type=duration_arg, default=None, help="with --watch: stop after this long")
    parser.add_argument("--sample-pages", type=int, default=DEFAULT_SAMPLE_PAGES,
                        help=f"sampling: pages sampled per GiB, 1..262144 (default {DEFAULT_SAMPLE_PAGES}, QEMU's)")
    parser.add_argument("--confidence", type=float, default=DEFAULT_CONFIDENCE,
                        help="sampling: confidence level of the interval (default 0.95)")
    parser.add_argument("--accuracy", type=float, default=DEFAULT_ACCURACY,
                        help="auto: relative accuracy asked for (default 0.05)")
    parser.add_argument("--dirty-limit", type=positive_int, default=None,
                        help="cap every vCPU at this many dirtied pages/s meanwhile (needs the ring: implies it)")
    add_machine_arguments(parser, workload="hotset")
    parser.add_argument("--json", action="store_true", help="JSON lines: one per window, then a summary")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="draw the rate over time and a heatmap of where writes land (address x time)")
    parser.set_defaults(func=run)


@dataclass
class History:
    """What the plot needs: one entry per window."""

    t: list[float] = field(default_factory=list)
    rate: list[float] = field(default_factory=list)
    low: list[float] = field(default_factory=list)
    high: list[float] = field(default_factory=list)
    heat: list[npt.NDArray[np.float64]] = field(default_factory=list)


def _check(args: argparse.Namespace) -> float:
    """Every rate argument, before any VM is built."""
    window = check_window(args.window)
    check_sample_pages(args.sample_pages)
    check_confidence(args.confidence)
    check_accuracy(args.accuracy)
    if args.duration is not None and not args.watch:
        raise DirtylogError("--duration goes with --watch (one window is measured otherwise)")
    if args.duration is not None and args.duration < window:
        raise DirtylogError(f"--duration {args.duration:g}s is shorter than one window ({window:g}s)")
    if args.plot and not args.plot.lower().endswith(".png"):
        raise DirtylogError(f"plot file {args.plot!r} must end in .png")
    return window


def run(args: argparse.Namespace) -> int:
    window = _check(args)
    ring = args.method == "ring" or args.dirty_limit is not None
    with machine_from_args(args, dirty_ring=ring) as machine:
        machine.start()
        if args.dirty_limit is not None:
            machine.dirty_limit(args.dirty_limit)
        if not args.json:
            console.print(f"dirty rate of [bold]{args.workload}[/bold] on {args.vcpus} vCPU(s), "
                          f"{format_size(args.memory)}, method [bold]{args.method}[/bold], {window * 1e3:g} ms windows"
                          + (f", dirty limit {args.dirty_limit:,} pages/s per vCPU" if args.dirty_limit else ""))
        count = None if args.watch and args.duration is None else (
            max(1, round(args.duration / window)) if args.watch else 1)
        history, wss, results = History(), WorkingSet(), []
        rows = RowPrinter([("time", 7), ("pages/s", 11), ("MB/s", 9), ("interval pages/s", 21), ("per vCPU", 22),
                           ("WSS", 18), ("cost", 16)])
        start = time.perf_counter()
        try:
            for result in machine.dirty_rates(window, args.method, args.sample_pages, count=count,
                                              confidence=args.confidence, accuracy=args.accuracy):
                results.append(result)
                wss.add(result.seconds, result.dirty, result.scale)
                t = result.start + result.seconds - start
                _record(history, t, result, machine.ram.npages)
                _show(args, rows, t, result, wss)
        except KeyboardInterrupt:
            if not results:
                raise
    _summary(args, results, wss)
    if args.plot:
        _plot(args, history, machine_size=args.memory)
    return 0


def _record(history: History, t: float, result: DirtyRate, npages: int) -> None:
    history.t.append(t)
    history.rate.append(result.pages_per_s)
    history.low.append(result.rate_low)
    history.high.append(result.rate_high)
    history.heat.append(address_histogram(result.dirty, HEATMAP_BINS, result.scale) / result.seconds)


def _show(args: argparse.Namespace, rows: RowPrinter, t: float, result: DirtyRate, wss: WorkingSet) -> None:
    curve = wss.curve()
    if args.json:
        record = {"t": round(t, 4), **result.as_dict(),
                  "wss": [{"windows": p.windows, "seconds": round(p.seconds, 4), "pages": round(p.pages)}
                          for p in curve]}
        emit_json(record)
        return
    per_vcpu = ("/".join(f"{r:,.0f}" for r in result.vcpu_pages_per_s) if result.vcpu_pages_per_s is not None
                else "-")
    last = curve[-1] if curve else None
    wss_cell = f"{format_size(last.bytes)}/{last.seconds:.1f}s" if last else "-"
    cost = (f"{result.cost.guest_slowdown:.1%} guest" if result.cost.write_faults else
            f"{result.cost.collect_seconds * 1e3:.1f} ms host")
    rows.row(f"{t:.2f}s", f"{result.pages_per_s:,.0f}", f"{result.mb_per_s:,.1f}",
             f"{result.rate_low:,.0f}..{result.rate_high:,.0f}", per_vcpu, wss_cell, cost)


def _summary(args: argparse.Namespace, results: list[DirtyRate], wss: WorkingSet) -> None:
    if not results:
        return
    rates = [r.pages_per_s for r in results]
    summary: dict[str, object] = {
        "method": results[0].method, "windows": len(results), "mean_pages_per_s": round(float(np.mean(rates)), 1),
        "max_pages_per_s": round(max(rates), 1),
        "mean_mb_per_s": round(float(np.mean([r.mb_per_s for r in results])), 3),
        "wss": [{"windows": p.windows, "seconds": round(p.seconds, 4), "pages": round(p.pages)} for p in wss.curve()],
    }
    if results[0].chosen_by:
        summary["chosen_by"] = results[0].chosen_by
    if results[0].vcpu_pages is None:
        summary["vcpu_note"] = results[0].vcpu_note
    if args.json:
        emit_json({"summary": summary})
        return
    if results[0].chosen_by:
        console.print(results[0].chosen_by)
    if results[0].vcpu_pages is None:
        console.print(f"per vCPU: not available with {results[0].method}: {results[0].vcpu_note}")
    console.print(f"{len(results)} window(s): mean {summary['mean_pages_per_s']:,} pages/s "
                  f"({summary['mean_mb_per_s']} MB/s, MB = 10^6 bytes), max {summary['max_pages_per_s']:,}")
    curve = wss.curve()
    if len(curve) > 1:
        console.print("working set: " + ", ".join(f"{format_size(p.bytes)} over {p.seconds:.2f}s" for p in curve))


def _plot(args: argparse.Namespace, history: History, machine_size: int) -> None:
    from pathlib import Path

    from dirtylog.cli.plots import PlotError

    if not Path(args.plot).resolve().parent.is_dir():
        raise PlotError(f"cannot write plot {args.plot!r}: its folder does not exist")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, sharex=True, figsize=(10, 7), height_ratios=(1, 1.4))
    top.plot(history.t, history.rate, marker="o", markersize=3, linewidth=1.2, label="pages/s")
    top.fill_between(history.t, history.low, history.high, alpha=0.25, label="interval")
    top.set_ylabel("dirty pages/s")
    top.grid(True, alpha=0.3)
    top.legend(loc="upper right")
    heat = np.array(history.heat).T  # address bin x window
    edges_t = [0.0, *history.t]
    edges_a = np.linspace(0, machine_size / (1 << 30), HEATMAP_BINS + 1)
    mesh = bottom.pcolormesh(edges_t, edges_a, heat, shading="flat", cmap="magma")
    figure.colorbar(mesh, ax=bottom, label="dirty pages/s")
    bottom.set_ylabel("guest-physical address (GiB)")
    bottom.set_xlabel("seconds")
    figure.suptitle(f"dirty rate: {args.workload}, method {args.method}")
    figure.tight_layout()
    try:
        figure.savefig(args.plot, dpi=110)
    except OSError as error:
        raise PlotError(f"cannot write plot {args.plot!r}: {error.strerror}") from None
    finally:
        plt.close(figure)
