"""Live migration throughput, downtime and convergence against the bounds measured in the same run.

    python bench/migration.py [--sizes 1G,4G] [--quick] [--json]

Each migration goes to a separate `dirtylog receive` process over loopback. Measures:
  * throughput of round 0 of a guest whose memory is fully written (no zero pages) and then idles,
    against a raw memory->socket copy of the same size to another process (goal >= 0.8x, one stream),
    and with 2 streams; beside it, the same copy making only the engine's passes (gather with
    fingerprints and MAC on one side, MAC and fingerprints on the other), the ceiling for any engine here;
  * dirtying guests at several rates: downtime against the limit, total time against the ideal
    size / (bandwidth - dirty rate);
  * a guest that dirties faster than a capped link: cancelled at the time limit without help,
    converging with auto-converge and with the dirty limit;
  * compression: none / lz4 / zstd on half-compressible memory;
  * post-copy (issue 17): the guest that never converges unaided, moved by post-copy, auto-converge and the dirty
    limit in turn within each repeat: total time against size / bandwidth, downtime, the guest time lost, bytes,
    pages pushed against requested, and post-copy's fault latency (exact percentiles, QEMU's 24-bucket histogram);
  * budget: the CPU cost per GB of the raw copy and of each pass the engine adds over every byte (the
    source's copy out of the guest with its fingerprints, the MAC on each side, the destination's
    fingerprints), alone and while a raw copy runs beside them, and the throughput ratio those costs allow
    on this machine's cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import mmap
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dirtylog.machine import Machine
from dirtylog.migration import migrate, preload
from dirtylog.migration.errors import MigrationError
from dirtylog.migration.keys import generate_key_file
from dirtylog.migration.payload.digest import fingerprints, gather, load_kernels
from dirtylog.migration.protocol.auth import frame_mac
from dirtylog.units import PAGE_SIZE, parse_size

CHUNK = 1 << 20
FRAME_PAGES = 1024  # pages per frame, as the engine batches them (4 MiB)


def resident_buffer(size: int) -> np.ndarray:
    """Memory like guest RAM: transparent huge pages, all allocated now. A buffer whose pages fault in during
    the timed copy (bytearray() maps zero pages lazily; 1-7 us per 4 KiB fault on these VMs) would make
    the bound a count of page faults, and 4 KiB pages against our huge-page guest RAM an unfair one."""
    region = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):
        region.madvise(mmap.MADV_HUGEPAGE)
    buffer = np.frombuffer(region, dtype=np.uint8)
    buffer[::PAGE_SIZE] = 1
    return buffer


def raw_copy_cpu(size: int, passes: bool = False) -> tuple[float, float, float]:
    """(bytes/s, sender CPU s per GB, receiver CPU s per GB) of one raw copy of ``size`` bytes.

    With ``passes``, each side also makes the engine's passes over every 4 MiB frame, and nothing else: the
    sender gathers it into a frame buffer with its fingerprints and MACs it, the receiver MACs and
    fingerprints it where it landed. That is an engine with no protocol, no Python per frame beyond a few
    calls, and one thread per side: the rate any engine making these passes could hope for here.
    """
    if passes:
        load_kernels()  # compiled or loaded now, in both processes, not in the timed copy
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    report_r, report_w = os.pipe()
    key = os.urandom(32)
    frame = FRAME_PAGES * PAGE_SIZE
    child = os.fork()
    if child == 0:
        server.close()
        buffer = resident_buffer(size)
        sock = socket.create_connection(("127.0.0.1", port))
        view, got = buffer.data, 0
        began = time.process_time()
        while got < size:
            if passes:  # a whole frame, then its MAC and fingerprints
                first, end = got, min(got + frame, size)
                while got < end:
                    got += sock.recv_into(view[got:end])
                frame_mac(key, first, view[first:end])
                fingerprints(buffer[first:end].reshape(-1, PAGE_SIZE))
            else:
                got += sock.recv_into(view[got:], min(CHUNK, size - got))
        os.write(report_w, str(time.process_time() - began).encode())
        sock.sendall(b"k")
        os._exit(0)
    conn, _ = server.accept()
    data = resident_buffer(size)
    data[:] = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    view = data.data
    pages = data.reshape(-1, PAGE_SIZE)
    out = np.ones((FRAME_PAGES, PAGE_SIZE), dtype=np.uint8)
    starts, lengths = np.zeros(1, dtype=np.uint64), np.full(1, FRAME_PAGES, dtype=np.uint32)
    cpu, start = time.process_time(), time.perf_counter()
    if passes:
        for first in range(0, pages.shape[0], FRAME_PAGES):
            gather(pages, starts + np.uint64(first), lengths, out)
            frame_mac(key, first, out.data)
            conn.sendall(out.data)
    else:
        for offset in range(0, size, CHUNK):
            conn.sendall(view[offset:offset + CHUNK])
    conn.recv(1)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu
    receiver_cpu = float(os.read(report_r, 64))
    os.waitpid(child, 0)
    for fd in (report_r, report_w):
        os.close(fd)
    conn.close()
    server.close()
    return size / elapsed, cpu / size * 1e9, receiver_cpu / size * 1e9


def raw_copy_rate(size: int) -> float:
    """Bytes/s of a plain memory -> TCP -> memory copy of ``size`` bytes to another process."""
    return raw_copy_cpu(size)[0]


def copy_traffic(seconds: float) -> list[int]:
    """Two processes copying 64 MiB over and over through a loopback socket for ``seconds``; their pids."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    pids = []
    for role in ("receiver", "sender"):
        pid = os.fork()
        if pid == 0:
            buffer = bytearray(64 << 20)
            if role == "receiver":
                server.close()
                with socket.create_connection(("127.0.0.1", port)) as sock:
                    while sock.recv_into(buffer):  # until the sender closes
                        pass
            else:
                conn, _ = server.accept()
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    conn.sendall(buffer)
                conn.close()
            os._exit(0)
        pids.append(pid)
    server.close()
    return pids


def pass_costs(memory: np.ndarray, batch_pages: int = 1024) -> dict[str, float]:
    """CPU seconds per GB of each pass the engine makes over the pages, in 4 MiB batches as it does."""
    pages = memory.reshape(-1, PAGE_SIZE)
    buffer = np.empty((batch_pages, PAGE_SIZE), dtype=np.uint8)
    key = os.urandom(32)
    starts, lengths = np.zeros(1, dtype=np.uint64), np.full(1, batch_pages, dtype=np.uint32)
    passes: dict[str, Callable[[int], object]] = {
        "gather": lambda first: gather(pages, starts + np.uint64(first), lengths, buffer),
        "mac": lambda first: frame_mac(key, first, pages[first:first + batch_pages].data),
        "fingerprints": lambda first: fingerprints(pages[first:first + batch_pages]),
    }
    costs = {}
    for name, one in passes.items():
        began = time.process_time()
        for first in range(0, pages.shape[0] - batch_pages + 1, batch_pages):
            one(first)
        costs[name] = (time.process_time() - began) / memory.size * 1e9
    return costs


def budget(size: int) -> dict[str, Any]:
    """What the raw copy and the engine's extra passes cost per GB, and the ratio that leaves on these cores."""
    load_kernels()  # not inside the first pass timed below
    rate, send_cpu, recv_cpu = raw_copy_cpu(size)
    memory = np.random.default_rng(2).integers(0, 256, size, dtype=np.uint8)
    alone = pass_costs(memory)
    # The same passes while a raw copy runs beside them, as the kernel's copies do in a migration.
    pids = copy_traffic(seconds=3.0)
    contended = pass_costs(memory)
    for pid in pids:
        os.waitpid(pid, 0)
    cores = os.cpu_count() or 1
    # Per GB: the kernel's two copies, the source's gather (copy out of the guest with fingerprints), a MAC
    # on each side, and the destination's fingerprints (it receives straight into guest memory).
    cpu = send_cpu + recv_cpu + contended["gather"] + 2 * contended["mac"] + contended["fingerprints"]
    bound = min(1.0, cores / cpu / (rate / 1e9))  # GB/s these cores can carry, over the raw rate
    return {"raw_gbps": rate / 1e9, "raw_send_cpu_s_per_gb": send_cpu, "raw_recv_cpu_s_per_gb": recv_cpu,
            "cores": cores, "alone_s_per_gb": alone, "beside_raw_copy_s_per_gb": contended,
            "ratio_bound": bound}


class Destination:
    """A `dirtylog receive` process for one migration."""

    def __init__(self, key: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dirtylog", "receive", "--listen", "127.0.0.1:0", "--key-file", key,
             "--duration", "0", "--json"], stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.address = json.loads(self.process.stdout.readline())["address"]

    def finish(self) -> dict[str, Any]:
        out, _ = self.process.communicate(timeout=300)
        events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return next((e for e in events if e["event"] in ("completed", "failed")), {})


def fill(machine: Machine, compressible: bool) -> None:
    """Write every workload page with data (random, or half random and half low-entropy)."""
    area = machine.memory[machine.workload_pages.start * PAGE_SIZE:].reshape(-1, PAGE_SIZE)
    rng = np.random.default_rng(1)
    area[:] = rng.integers(1, 256, area.shape, dtype=np.uint8)
    if compressible:
        area[::2, 16:] = 7  # every other page: 16 random bytes then a constant


def run_migration(key: str, memory: int, *, workload: str = "idle", rate: int | None = None,
                  filled: bool = True, compressible: bool = False, warmup: float = 0.5,
                  guest: dict[str, float] | None = None, **options: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """One migration to a new destination process: the source's statistics and the destination's last event.
    ``guest``, when given, receives the guest's progress (pages written, summed over vCPUs): ``rate_alone`` over
    the second half of the warm-up, and the counts ``at_start`` (migrate called), ``at_switchover`` (the guest
    paused for the switch-over) and ``at_end`` (migrate returned)."""
    destination = Destination(key)
    marks: list[tuple[float, float, float]] = []

    def mark_cpu(kind: str, record: dict[str, Any]) -> None:  # at the start of round 0 and at its end
        if kind == "setup" or (kind == "round" and len(marks) == 1):
            marks.append((time.process_time(), process_cpu(destination.process.pid), time.perf_counter()))
        if guest is not None and kind == "switchover":
            guest["at_switchover"] = machine.progress

    ring = 4096 if options.get("mode") == "ring" else 0
    with Machine(memory, vcpus=2, workload=workload, rate=rate, prefault=True, dirty_ring=ring) as machine:  # type: ignore[arg-type]
        if filled:
            fill(machine, compressible)
        machine.start()
        if guest is None:
            time.sleep(warmup)
        else:
            time.sleep(warmup / 2)
            before, began = machine.progress, time.perf_counter()
            time.sleep(warmup / 2)
            guest["at_start"] = machine.progress
            guest["rate_alone"] = (guest["at_start"] - before) / (time.perf_counter() - began)
        try:
            stats = migrate(machine, destination.address, key_file=key, progress=mark_cpu, **options).as_dict()
        except MigrationError as error:
            stats = {**(error.stats.as_dict() if error.stats else {}), "status": "failed", "error": str(error)}
        if guest is not None:
            guest["at_end"] = machine.progress
    if len(marks) == 2 and stats.get("rounds"):
        gigabytes = stats["rounds"][0]["bytes"] / 1e9
        cpu = {"source": marks[1][0] - marks[0][0], "destination": marks[1][1] - marks[0][1]}
        stats["round0_cpu_s_per_gb"] = {side: seconds / gigabytes for side, seconds in cpu.items()}
        # Busy near 100 % means that side is CPU-bound: only less work per byte there makes round 0 faster.
        stats["round0_busy"] = {side: seconds / (marks[1][2] - marks[0][2]) for side, seconds in cpu.items()}
    return stats, destination.finish()


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used, all its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def round0_rate(stats: dict[str, Any]) -> float:
    first = stats["rounds"][0]
    return float(first["bytes"] / first["seconds"])


def throughput(key: str, sizes: list[int], repeat: int) -> list[dict[str, Any]]:
    """Round 0 rates against the raw copy and the passes-only pipeline. Each repeat measures all of them in
    turn, and ratios are taken within a repeat: this machine's speed drifts by ±40 % over minutes."""
    rows = []
    for size in sizes:
        samples: list[dict[str, Any]] = []
        for _ in range(repeat):
            raw, ceiling = raw_copy_rate(size), raw_copy_cpu(size, passes=True)[0]
            for streams in (1, 2):
                stats = run_migration(key, size, streams=streams, downtime_limit="50ms")[0]
                samples.append({"streams": streams, "raw": raw, "ceiling": ceiling, "ours": round0_rate(stats),
                                "stats": stats})
        for streams in (1, 2):
            runs = [s for s in samples if s["streams"] == streams]

            def median(value: Any, runs: list[dict[str, Any]] = runs) -> float:
                return float(statistics.median(value(s) for s in runs))

            rows.append({
                "memory": size, "streams": streams, "repeat": repeat,
                "raw_gbps": median(lambda s: s["raw"]) / 1e9, "ours_gbps": median(lambda s: s["ours"]) / 1e9,
                "ratio": median(lambda s: s["ours"] / s["raw"]),
                "ratios": [round(s["ours"] / s["raw"], 3) for s in runs],
                "passes_only_gbps": median(lambda s: s["ceiling"]) / 1e9,
                "passes_only_ratio": median(lambda s: s["ceiling"] / s["raw"]),
                "downtime_ms": median(lambda s: s["stats"]["downtime_ms"]),
                "total_s": median(lambda s: s["stats"]["total_time_ms"]) / 1e3,
                "round0_cpu_s_per_gb": {side: median(lambda s, side=side: s["stats"]["round0_cpu_s_per_gb"][side])
                                        for side in ("source", "destination")},
                "round0_busy": {side: median(lambda s, side=side: s["stats"]["round0_busy"][side])
                                for side in ("source", "destination")},
            })
    return rows


def dirtying(key: str, memory: int, rates: list[int], bandwidth: float) -> list[dict[str, Any]]:
    rows = []
    for rate in rates:
        stats, _ = run_migration(key, memory, workload="random", rate=rate, downtime_limit="50ms",
                                 bandwidth=bandwidth, max_time="60s")
        # The guest dirties fewer distinct pages than it writes (repeats, and each first write after a
        # collection faults): the ideal uses the dirty rate the rounds measured.
        precopy = [r for r in stats.get("rounds", []) if not r["final"]]
        dirty_rate = statistics.mean(r["dirty_pages_rate"] for r in precopy) * PAGE_SIZE if precopy else 0.0
        ideal = memory / (bandwidth - dirty_rate) if bandwidth > dirty_rate else float("inf")
        rows.append({"rate_pages_per_vcpu": rate, "status": stats["status"], "dirty_mbps": dirty_rate / 1e6,
                     "downtime_ms": stats.get("downtime_ms"), "limit_ms": 50.0,
                     "total_s": (stats.get("total_time_ms") or 0) / 1e3, "ideal_s": ideal,
                     "rounds": len(stats.get("rounds", []))})
    return rows


def convergence(key: str, memory: int, bandwidth: str) -> list[dict[str, Any]]:
    rows = []
    cases: list[tuple[str, dict[str, Any]]] = [
        ("no aid", {}),
        ("auto-converge", {"auto_converge": True}),
        ("dirty-limit 2000 pages/s/vCPU", {"mode": "ring", "dirty_limit": 2000}),
    ]
    for name, extra in cases:
        stats, _ = run_migration(key, memory, workload="random", filled=False, warmup=1.5, downtime_limit="20ms",
                                 bandwidth=bandwidth, max_time="60s", **extra)
        rows.append({"case": name, "status": stats["status"], "total_s": (stats.get("total_time_ms") or 0) / 1e3,
                     "downtime_ms": stats.get("downtime_ms"), "rounds": len(stats.get("rounds", [])),
                     "throttle_pct": stats.get("cpu_throttle_percentage"),
                     "error": stats.get("error", "")[:80]})
    return rows


def compression(key: str, memory: int) -> list[dict[str, Any]]:
    rows = []
    for codec in ("none", "lz4", "zstd"):
        stats, _ = run_migration(key, memory, compressible=True, compression=codec, downtime_limit="50ms")
        rows.append({"codec": codec, "round0_gbps": round0_rate(stats) / 1e9,
                     "wire_bytes": stats["ram"]["transferred"], "total_s": stats["total_time_ms"] / 1e3})
    return rows


#: Post-copy against the throttles, each case once per repeat, in this order.
POSTCOPY_CASES: list[tuple[str, dict[str, Any]]] = [
    ("post-copy at once", {"postcopy": True, "postcopy_after": 0}),
    ("post-copy when pre-copy stalls", {"postcopy": True}),
    ("auto-converge", {"auto_converge": True}),
    ("dirty-limit 2000 pages/s/vCPU", {"mode": "ring", "dirty_limit": 2000}),
]
#: Fault latency with the cores free: the same memory and cap, a guest writing 500 pages/s per vCPU (it sleeps in
#: between, so its vCPUs leave the two cores to the fault path); not part of the comparison above.
QUIET_CASE = ("post-copy at once, guest at 500 pages/s/vCPU", {"postcopy": True, "postcopy_after": 0, "rate": 500})


def spread(values: list[float]) -> dict[str, float]:
    """Median, lowest and highest of ``values`` (NaN when empty)."""
    if not values:
        return {"median": float("nan"), "min": float("nan"), "max": float("nan")}
    return {"median": float(statistics.median(values)), "min": float(min(values)), "max": float(max(values))}


def guest_time_lost(elapsed: float, written: float, rate_alone: float) -> float:
    """Seconds of its own time the guest lost during ``elapsed``: it wrote ``written`` pages, which at the rate it
    keeps alone (``rate_alone`` pages/s) take ``written / rate_alone``; the rest it was stopped, throttled, or
    waiting for pages. The same measure for every method (and it includes the downtime)."""
    if rate_alone <= 0:
        return float("nan")
    return max(0.0, elapsed - written / rate_alone)


def histogram_mode(histogram: list[int]) -> tuple[int, int, float]:
    """The bucket of a QEMU latency histogram (bucket N: [2^N, 2^(N+1)) us) holding the most faults: (from us,
    to us, its share of all faults); (0, 0, 0.0) for an empty histogram."""
    total = sum(histogram)
    if not total:
        return 0, 0, 0.0
    bucket = max(range(len(histogram)), key=lambda index: histogram[index])
    return 1 << bucket, 1 << (bucket + 1), histogram[bucket] / total


def postcopy_sample(case: str, stats: dict[str, Any], received: dict[str, Any], guest: dict[str, float],
                    ideal: float) -> dict[str, Any]:
    """One run's figures: the source's totals, the destination's fault statistics, the guest's lost time."""
    elapsed = (stats.get("total_time_ms") or 0) / 1e3
    completed = stats.get("status") == "completed" and received.get("event") == "completed"
    # The guest's progress travels with it: on the destination it goes on from where the source paused it.
    written = (received["progress_at_resume"] if completed else guest["at_end"]) - guest["at_start"]
    sample: dict[str, Any] = {
        "case": case, "status": stats.get("status"), "error": stats.get("error", "")[:100],
        "total_s": elapsed, "setup_s": (stats.get("setup_time_ms") or 0) / 1e3, "ratio": elapsed / ideal,
        "downtime_ms": stats.get("downtime_ms"), "bytes": stats.get("ram", {}).get("transferred", 0),
        "rounds": len([r for r in stats.get("rounds", []) if not r["final"]]),
        "throttle_pct": stats.get("cpu_throttle_percentage"), "rate_alone": guest["rate_alone"],
        "lost_s": guest_time_lost(elapsed, written, guest["rate_alone"]),
    }
    source_postcopy = stats.get("postcopy")
    if source_postcopy:
        faults = received.get("stats", {}).get("postcopy") or {}
        sample.update(
            postcopy_started_s=(source_postcopy["started_ms"] or 0) / 1e3, pushed=source_postcopy["pages_pushed"],
            requested=source_postcopy["pages_requested"], requests=source_postcopy["postcopy_requests"],
            faults=faults.get("faults", 0), blocktime_ms=faults.get("postcopy_blocktime", 0),
            vcpu_blocktime_ms=faults.get("postcopy_vcpu_blocktime", []),
            latency_mean_us=faults.get("postcopy_latency", 0) / 1e3,
            **{f"latency_p{q}_us": faults.get(f"postcopy_latency_p{q}_us", 0.0) for q in (50, 90, 99)},
            histogram=faults.get("postcopy_latency_dist", []))
    return sample


def postcopy(key: str, memory: int, bandwidth: float, repeat: int) -> dict[str, Any]:
    """The guest that outruns the link (random pages at full speed, every page written), moved by each method of
    POSTCOPY_CASES once per repeat, in turn."""
    preload()  # the compiled passes, loaded once here rather than in the first migration's setup
    ideal = memory / bandwidth
    samples: list[dict[str, Any]] = []
    cases = [*POSTCOPY_CASES, QUIET_CASE]
    for _ in range(repeat):
        for case, extra in cases:
            guest: dict[str, float] = {}
            stats, received = run_migration(key, memory, workload="random", warmup=1.0, guest=guest,
                                            downtime_limit="50ms", bandwidth=bandwidth, max_time="60s",
                                            **{"rate": None, **extra})
            samples.append(postcopy_sample(case, stats, received, guest, ideal))
    rows = []
    for case, _ in cases:
        runs = [s for s in samples if s["case"] == case]
        done = [s for s in runs if s["status"] == "completed"]
        row: dict[str, Any] = {"case": case, "runs": len(runs), "completed": len(done),
                               "errors": sorted({s["error"] for s in runs if s["error"]})}
        for name in ("total_s", "setup_s", "ratio", "downtime_ms", "bytes", "lost_s", "rounds", "throttle_pct",
                     "postcopy_started_s", "pushed", "requested", "requests", "faults", "blocktime_ms",
                     "latency_mean_us", "latency_p50_us", "latency_p90_us", "latency_p99_us"):
            values = [float(s[name]) for s in done if s.get(name) is not None]
            if values:
                row[name] = spread(values)
        histograms = [s["histogram"] for s in done if s.get("histogram")]
        if histograms:
            row["histogram"] = [sum(column) for column in zip(*histograms, strict=True)]
        rows.append(row)
    # Each method against post-copy at once in the same repeat (the machine's speed drifts over minutes).
    per_repeat = [samples[i:i + len(cases)] for i in range(0, len(samples), len(cases))]
    for row in rows:
        ratios = [next(s for s in group if s["case"] == row["case"])["total_s"] / group[0]["total_s"]
                  for group in per_repeat
                  if group[0]["status"] == "completed" and next(s for s in group if s["case"] == row["case"])[
                      "status"] == "completed"]
        row["total_vs_postcopy"] = [round(r, 2) for r in ratios]
    return {"memory": memory, "bandwidth": bandwidth, "ideal_s": ideal, "repeat": repeat, "rows": rows,
            "samples": samples}


def print_postcopy(result: dict[str, Any]) -> None:
    def show(row: dict[str, Any], name: str, scale: float = 1.0, digits: int = 2) -> str:
        if name not in row:
            return "-"
        value = row[name]
        return (f"{value['median'] * scale:,.{digits}f} ({value['min'] * scale:,.{digits}f}-"
                f"{value['max'] * scale:,.{digits}f})")

    print(f"post-copy vs throttles ({result['memory'] >> 20} MiB, random at full speed, every page written, "
          f"{result['bandwidth'] / 1e6:.0f} MB/s cap, 50 ms limit, 60 s max; size / bandwidth "
          f"{result['ideal_s']:.2f} s; medians (ranges) of {result['repeat']})")
    for row in result["rows"]:
        print(f"  {row['case']}: {row['completed']}/{row['runs']} completed {row['errors'] or ''}")
        print(f"    total {show(row, 'total_s')} s = {show(row, 'ratio')}x size/bandwidth (setup "
              f"{show(row, 'setup_s', 1e3, 0)} ms; vs post-copy at once {row['total_vs_postcopy']}); downtime "
              f"{show(row, 'downtime_ms', 1, 1)} ms; {show(row, 'bytes', 1e-6, 0)} MB; guest time lost "
              f"{show(row, 'lost_s')} s; {show(row, 'rounds', 1, 0)} pre-copy rounds, throttle "
              f"{show(row, 'throttle_pct', 1, 0)} %")
        if "faults" in row:
            low, high, share = histogram_mode(row.get("histogram", []))
            print(f"    post-copy after {show(row, 'postcopy_started_s')} s: pages pushed {show(row, 'pushed', 1, 0)}"
                  f", requested {show(row, 'requested', 1, 0)} ({show(row, 'requests', 1, 0)} requests); "
                  f"blocktime {show(row, 'blocktime_ms', 1, 0)} ms")
            print(f"    fault latency us: median {show(row, 'latency_p50_us', 1, 0)}, mean "
                  f"{show(row, 'latency_mean_us', 1, 0)}, p90 {show(row, 'latency_p90_us', 1, 0)}, p99 "
                  f"{show(row, 'latency_p99_us', 1, 0)}; most in {low}-{high} us ({share:.0%})")
            print(f"    histogram (all runs, bucket N = [2^N, 2^(N+1)) us): {row.get('histogram')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1G,4G")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="1G only, one repeat")
    parser.add_argument("--sections", default="throughput,dirtying,convergence,compression,budget,postcopy",
                        help="comma-separated subset to run")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sizes = [parse_size(s) for s in ("1G" if args.quick else args.sizes).split(",")]
    repeat = 1 if args.quick else args.repeat
    with tempfile.TemporaryDirectory() as folder:
        key = str(generate_key_file(Path(folder) / "k"))
        sections: dict[str, Callable[[], Any]] = {
            "throughput": lambda: throughput(key, sizes, repeat),
            "dirtying": lambda: dirtying(key, parse_size("1G"), [5_000, 20_000, 50_000], bandwidth=500e6),
            "convergence": lambda: convergence(key, parse_size("128M"), "100M"),
            "compression": lambda: compression(key, parse_size("1G")),
            "budget": lambda: budget(parse_size("1G")),
            "postcopy": lambda: postcopy(key, parse_size("256M"), 100e6, repeat),
        }
        results: dict[str, Any] = {name: sections[name]() for name in args.sections.split(",")}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    if "throughput" in results:
        print("throughput of round 0 (idle guest, memory fully written) vs raw memory->socket copy, same run")
    for row in results.get("throughput", []):
        print(f"  {row['memory'] >> 30} GiB, {row['streams']} stream(s): ours {row['ours_gbps']:.2f} GB/s, "
              f"raw {row['raw_gbps']:.2f} GB/s, ratio {row['ratio']:.2f}x {row['ratios']} (the passes alone: "
              f"{row['passes_only_gbps']:.2f} GB/s, {row['passes_only_ratio']:.2f}x); "
              f"downtime {row['downtime_ms']:.1f} ms, "
              f"total {row['total_s']:.2f} s; CPU s/GB in round 0 (busy): "
              f"source {row['round0_cpu_s_per_gb']['source']:.3f} ({row['round0_busy']['source']:.0%}), "
              f"destination {row['round0_cpu_s_per_gb']['destination']:.3f} ({row['round0_busy']['destination']:.0%})")
    if "dirtying" in results:
        print("dirtying guests (1 GiB, random, 500 MB/s cap, 50 ms limit)")
    for row in results.get("dirtying", []):
        print(f"  {row['rate_pages_per_vcpu']:>6} pages/s/vCPU: {row['status']}, dirtying {row['dirty_mbps']:.0f} MB/s,"
              f" downtime {row['downtime_ms']} ms (limit 50), total {row['total_s']:.2f} s vs ideal "
              f"{row['ideal_s']:.2f} s ({row['total_s'] / row['ideal_s']:.2f}x), {row['rounds']} rounds")
    if "convergence" in results:
        print("convergence (128 MiB, random at full speed, 100 MB/s cap, 20 ms limit, 60 s max)")
    for row in results.get("convergence", []):
        print(f"  {row['case']:>30}: {row['status']}, total {row['total_s']:.2f} s, downtime {row['downtime_ms']} ms, "
              f"{row['rounds']} rounds, throttle {row['throttle_pct']}%")
    if "compression" in results:
        print("compression (1 GiB, half the pages compressible)")
    for row in results.get("compression", []):
        print(f"  {row['codec']:>5}: round 0 {row['round0_gbps']:.2f} GB/s, {row['wire_bytes'] / 1e6:,.0f} MB on "
              f"the wire, total {row['total_s']:.2f} s")
    if "budget" in results:
        b = results["budget"]
        print(f"budget (CPU s per GB; {b['cores']} cores): raw copy {b['raw_gbps']:.2f} GB/s, sender "
              f"{b['raw_send_cpu_s_per_gb']:.3f} + receiver {b['raw_recv_cpu_s_per_gb']:.3f}")
        for name in ("gather", "mac", "fingerprints"):
            print(f"  {name:>12}: {b['alone_s_per_gb'][name]:.3f} alone, {b['beside_raw_copy_s_per_gb'][name]:.3f} "
                  "beside a raw copy")
        print(f"  throughput ratio these costs allow: {b['ratio_bound']:.2f}x")
    if "postcopy" in results:
        print_postcopy(results["postcopy"])


if __name__ == "__main__":
    main()
