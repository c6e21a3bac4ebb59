"""Dirty rate: every method against the ground truth, QEMU's calc-dirty-rate beside it, the cost to the
guest, and the dirty limit.

    python bench/dirty_rate.py                  # all sections, 1 GiB and 8 GiB guests (~10 minutes here)
    python bench/dirty_rate.py --quick          # 1 GiB, one rate, fewer windows (~3 minutes)
    python bench/dirty_rate.py --sections accuracy,limit --sizes 1G
    flock /tmp/dirtylog-bench.lock python bench/dirty_rate.py     # final figures

``accuracy``: for each guest size, workload (sequential, random, hotset) and rate (pages/s per vCPU, 2
vCPUs), each method (bitmap, ring, sampling at QEMU's 512 pages/GiB and at 8192) measures consecutive
windows of 10 ms, 100 ms and 1 s. The truth of each window is replayed from the guest's progress counters
read just before and just after each of the meter's boundaries (dirtylog/rate/truth.py): ``low`` counts
the writes certainly inside the window, ``high`` those possibly inside; the error is taken against their
middle, and the truth's own half-width is printed beside it. For sampling, "in CI" is the share of
windows whose truth (middle) lies inside the stated 95 % interval.

``qemu``: the same guest shape under QEMU/KVM (bench/qemu_guest.py), QEMU's ``calc-dirty-rate`` over 1 s
(QEMU 7.2 takes whole seconds) in page-sampling, dirty-bitmap and dirty-ring modes, against the truth of
a 1 s window read while QEMU measures. QEMU reports MiB/s (it calls them MB/s), truncated to an integer;
converted to pages/s here.

``cost``: a guest writing random pages as fast as it can; its write rate with no measurement, and while
each method measures 100 ms windows back to back. The slowdown is measured (1 - rate while measuring /
rate alone, in the same run) and compared with the one the method reports (write faults x the measured
cost of one fault).

``limit``: a guest writing as fast as it can with the ring on; ``Machine.dirty_limit`` at 1,000 pages/s
per vCPU up to its unthrottled ring rate, the ring method measuring each vCPU over 1 s windows (distinct
pages), beside the guest's own write rate (its progress counters: a page rewritten counts again).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dirtylog.machine import Machine
from dirtylog.rate import make_meter
from dirtylog.rate.cost import fault_cost
from dirtylog.rate.truth import Truth, bracket
from dirtylog.units import PAGE_SIZE, format_size, parse_size

WINDOWS = (0.01, 0.1, 1.0)
STALLED_PAGES = 10
WORKLOADS = ("sequential", "random", "hotset")
METHODS: tuple[tuple[str, int], ...] = (("bitmap", 0), ("ring", 0), ("sampling", 512), ("sampling", 8192))


def emit(args: argparse.Namespace, record: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(record), flush=True)


@dataclass
class Row:
    size: str
    workload: str
    rate: int
    method: str
    window: float
    errors: list[float] = field(default_factory=list)
    truth_width: list[float] = field(default_factory=list)
    in_interval: list[bool] = field(default_factory=list)
    true_rate: list[float] = field(default_factory=list)
    stalled: int = 0  # windows in which the guest wrote (almost) nothing: the host did not run it

    def line(self) -> str:
        if not self.errors:
            head = f"| {self.size} | {self.workload} | {self.rate:,} | {self.method} | {self.window * 1e3:g} ms"
            return head + " | every window stalled |"
        med = statistics.median(abs(e) for e in self.errors)
        worst = max(abs(e) for e in self.errors)
        bias = statistics.mean(self.errors)
        ci = f" in CI {sum(self.in_interval)}/{len(self.in_interval)}" if self.method.startswith("sampling") else ""
        if self.stalled:
            ci += f" ({self.stalled} stalled window(s) left out)"
        return (f"| {self.size} | {self.workload} | {self.rate:,} | {self.method} | {self.window * 1e3:g} ms | "
                f"{statistics.median(self.true_rate):,.0f} | {med:.2%} | {worst:.2%} | {bias:+.2%} | "
                f"{statistics.median(self.truth_width):.2%} |{ci}")


def accuracy(args: argparse.Namespace) -> list[Row]:
    rows: list[Row] = []
    windows_per = {0.01: 8, 0.1: 5, 1.0: 3} if not args.quick else {0.01: 5, 0.1: 3, 1.0: 2}
    print("\n## accuracy: each method against the truth (2 vCPUs)\n")
    print("| guest | workload | pages/s per vCPU | method | window | true pages/s | median error | worst | "
          "mean (bias) | truth +- | sampling: truth in 95 % CI |")
    print("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for size in args.sizes:
        for workload in WORKLOADS:
            for rate in args.rates:
                for ring in (False, True):
                    with Machine(size, 2, workload, rate, prefault=True, dirty_ring=ring) as machine:  # type: ignore[arg-type]
                        machine.start()
                        time.sleep(0.1)
                        for method, sample_pages in METHODS:
                            if (method == "ring") != ring:
                                continue
                            for window in WINDOWS:
                                row = _windows(machine, workload, method, sample_pages, window, windows_per[window])
                                row.size, row.rate = format_size(parse_size(size)), rate
                                rows.append(row)
                                print(row.line(), flush=True)
                                emit(args, {"section": "accuracy", **row.__dict__})
    return rows


def _windows(machine: Machine, workload: str, method: str, sample_pages: int, window: float, count: int) -> Row:
    truth = Truth(machine.ram.words, workload, machine.spec.vcpus, machine.ram.npages)
    label = method if method != "sampling" else f"sampling {sample_pages}/GiB"
    row = Row("", workload, 0, label, window)
    meter = make_meter(machine, method, sample_pages=sample_pages or 512, probe=truth.read, fault_seconds=0.0)
    try:
        meter.begin()
        start = meter.boundaries[-1].middle
        for k in range(1, count + 1):
            time.sleep(max(0.0, start + k * window - time.perf_counter()))
            result = meter.end()
            b0, b1 = meter.boundaries[-2], meter.boundaries[-1]
            known = bracket(truth, b0.probe_before, b0.probe_after, b1.probe_before, b1.probe_after)
            truth.forget(b0.probe_before)
            if known.high < STALLED_PAGES:  # the host did not run the guest in this window: no error to take
                row.stalled += 1
                continue
            middle = known.middle
            row.errors.append((result.pages - middle) / middle)
            row.truth_width.append((known.high - known.low) / 2 / middle)
            row.in_interval.append(result.pages_low <= middle <= result.pages_high)
            row.true_rate.append(middle / result.seconds)
    finally:
        meter.close()
    return row


def qemu(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from qemu_guest import QemuGuest, QemuOptions, qemu_unavailable_reason

    reason = qemu_unavailable_reason()
    print("\n## QEMU calc-dirty-rate on the same guest shape (2 vCPUs, 1 s)\n")
    if reason:
        print(f"skipped: {reason}")
        return
    print("| guest | workload | pages/s per vCPU | QEMU mode | QEMU dirty-rate (MiB/s) | QEMU pages/s | true pages/s | "
          "error | per vCPU (QEMU, pages/s) |")
    print("|---|---|---:|---|---:|---:|---:|---:|---|")
    for size in args.sizes:
        for workload in args.qemu_workloads:
            for rate in args.rates:
                for ring in (False, True):
                    # QEMU 7.2's ring reaper asserts when it runs before the vCPUs have their rings, which
                    # a slow preallocation of a large guest provokes: ring guests allocate lazily.
                    options = QemuOptions(dirty_ring=65536, prealloc=False) if ring else QemuOptions()
                    with QemuGuest(size, 2, workload, rate, options=options) as guest:
                        truth = Truth(guest.words, workload, 2, guest.npages)
                        time.sleep(0.2)
                        modes = ("dirty-ring",) if ring else ("page-sampling", "dirty-bitmap")
                        for mode in modes:
                            for _ in range(args.qemu_repeat):
                                answer, true_rate = _qemu_once(guest, truth, mode)
                                mib = float(answer["dirty-rate"])
                                pages = mib * (1 << 20) / PAGE_SIZE
                                per_vcpu = [v["dirty-rate"] * 256 for v in answer.get("vcpu-dirty-rate", [])]
                                error = (pages - true_rate) / true_rate
                                print(f"| {format_size(parse_size(size))} | {workload} | {rate:,} | {mode} | {mib:g} | "
                                      f"{pages:,.0f} | {true_rate:,.0f} | {error:+.1%} | {per_vcpu or '-'} |",
                                      flush=True)
                                emit(args, {"section": "qemu", "size": size, "workload": workload, "rate": rate,
                                            "mode": mode, "dirty_rate_mib": mib, "pages_per_s": pages,
                                            "true_pages_per_s": true_rate, "error": error})


def _qemu_once(guest: Any, truth: Truth, mode: str) -> tuple[dict[str, Any], float]:
    """QEMU measures 1 s; meanwhile the truth of a 1 s window is read from the guest's counters (the
    workload is steady, so a concurrent window of the same length is the same population)."""
    assert guest.qmp is not None
    guest.qmp("calc-dirty-rate", calc_time=1, mode=mode)
    a = truth.read(time.perf_counter())
    time.sleep(1.0)
    b = truth.read(time.perf_counter())
    true_pages = truth.pages(a, b).count()
    truth.forget(b)
    true_rate = true_pages / (b.t - a.t)
    while True:
        answer: dict[str, Any] = guest.qmp("query-dirty-rate")
        if answer.get("status") == "measured":
            return answer, true_rate
        time.sleep(0.05)


def cost(args: argparse.Namespace) -> None:
    print("\n## cost to the guest: random writes at full speed, 1 GiB, 2 vCPUs, 100 ms windows for 2 s\n")
    print(f"one write fault measured at {fault_cost() * 1e6:.1f} us (rate.cost.fault_cost)\n")
    print("| method | guest writes/s alone | while measuring | measured slowdown | reported slowdown | "
          "collect ms per window |")
    print("|---|---:|---:|---:|---:|---:|")
    for method, sample_pages in METHODS:
        with Machine("1G", 2, "random", prefault=True, dirty_ring=(method == "ring")) as machine:
            machine.start()
            time.sleep(0.2)
            before = _write_rate(machine, 1.0)
            meter = make_meter(machine, method, sample_pages=sample_pages or 512)
            meter.begin()
            first, t0 = machine.progress, time.perf_counter()
            results = []
            for k in range(1, 21):
                time.sleep(max(0.0, t0 + k * 0.1 - time.perf_counter()))
                results.append(meter.end())
            during = (machine.progress - first) / (time.perf_counter() - t0)
            meter.close()
            time.sleep(0.1)
            alone = (before + _write_rate(machine, 1.0)) / 2  # before and after, against the host's drift
            reported = statistics.mean(r.cost.guest_slowdown for r in results)
            collect = statistics.median(r.cost.collect_seconds for r in results) * 1e3
            label = method if method != "sampling" else f"sampling {sample_pages}/GiB"
            print(f"| {label} | {alone:,.0f} | {during:,.0f} | {1 - during / alone:.1%} | {reported:.1%} | "
                  f"{collect:.2f} |", flush=True)
            emit(args, {"section": "cost", "method": label, "alone": alone, "during": during,
                        "measured_slowdown": 1 - during / alone, "reported_slowdown": reported,
                        "collect_ms": collect})


def _write_rate(machine: Machine, seconds: float) -> float:
    first, t0 = machine.progress, time.perf_counter()
    time.sleep(seconds)
    return (machine.progress - first) / (time.perf_counter() - t0)


def limit(args: argparse.Namespace) -> None:
    print("\n## dirty limit: random writes at full speed with the ring on, 1 GiB, 2 vCPUs, ring method, 1 s windows\n")
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with Machine("1G", 2, "random", prefault=True, dirty_ring=True) as machine:
        machine.start()
        time.sleep(0.2)
        free = _vcpu_rates(machine, 3)
        ceiling = min(min(rates) for rates, _ in free)
        print(f"unthrottled with the ring on: {'; '.join(_cells(r) for r, _ in free)} distinct pages/s per vCPU "
              f"({'; '.join(_cells(w) for _, w in free)} writes/s)\n")
        print("| limit (pages/s per vCPU) | measured per vCPU (1 s windows) | guest writes/s | median error | "
              "worst error |")
        print("|---:|---|---|---:|---:|")
        limits = ([1000, 2000, 5000, int(ceiling * 0.25), int(ceiling * 0.5), int(ceiling * 0.75), int(ceiling * 0.9),
                   int(ceiling)] if not args.quick else [1000, int(ceiling * 0.5), int(ceiling * 0.9)])
        controller = None
        for value in limits:
            controller = machine.dirty_limit(value)
            time.sleep(0.5)
            windows = _vcpu_rates(machine, 3)
            errors = [abs(r - value) / value for rates, _ in windows for r in rates]
            measured, writes = "; ".join(_cells(r) for r, _ in windows), "; ".join(_cells(w) for _, w in windows)
            print(f"| {value:,} | {measured} | {writes} "
                  f"| {statistics.median(errors):.1%} | {max(errors):.1%} |", flush=True)
            emit(args, {"section": "limit", "limit": value, "rates": [r for r, _ in windows],
                        "writes": [w for _, w in windows], "worst": max(errors)})
        if controller is not None:
            print(f"\ncontroller thread at real-time priority: {getattr(controller, 'realtime', False)}; load average "
                  f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        machine.dirty_limit(None)


def _cells(values: Sequence[float]) -> str:
    return ", ".join(f"{v:,.0f}" for v in values)


def _vcpu_rates(machine: Machine, count: int) -> list[tuple[list[float], list[float]]]:
    """Per 1 s ring window: each vCPU's dirty rate (distinct pages/s) and its write rate (its progress
    counter: pages written, a page rewritten counting each time)."""
    out = []
    before, start = machine.vcpu_progress, time.perf_counter()
    for result in machine.dirty_rates("1s", "ring", count=count, fault_seconds=0.0):
        after, end = machine.vcpu_progress, time.perf_counter()
        writes = [(b - a) / (end - start) for a, b in zip(before, after, strict=True)]
        out.append((list(result.vcpu_pages_per_s or ()), writes))
        before, start = after, end
    return out


SECTIONS: dict[str, Callable[[argparse.Namespace], Any]] = {
    "accuracy": accuracy, "qemu": qemu, "cost": cost, "limit": limit}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}")
    parser.add_argument("--sizes", default=None, help="guest sizes (default 1G,8G; --quick: 1G)")
    parser.add_argument("--rates", default=None, help="pages/s per vCPU (default 5000,20000; --quick: 20000)")
    parser.add_argument("--qemu-workloads", default="random", help="workloads for the QEMU section (default random)")
    parser.add_argument("--qemu-repeat", type=int, default=2, help="calc-dirty-rate runs per mode (default 2)")
    parser.add_argument("--quick", action="store_true", help="1 GiB, one rate, fewer windows")
    parser.add_argument("--json", action="store_true", help="also print one JSON line per result")
    args = parser.parse_args(argv)
    args.sizes = (args.sizes or ("1G" if args.quick else "1G,8G")).split(",")
    args.rates = [int(r) for r in (args.rates or ("20000" if args.quick else "5000,20000")).split(",")]
    args.qemu_workloads = args.qemu_workloads.split(",")
    if args.quick:
        args.qemu_repeat = 1
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    started = time.time()
    print(f"# bench/dirty_rate.py {' '.join(argv or sys.argv[1:])}  ({time.strftime('%Y-%m-%d %H:%M')})")
    for name in args.sections.split(","):
        SECTIONS[name](args)
    print(f"\n({time.time() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
