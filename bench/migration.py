"""Live migration throughput, downtime and convergence against the bounds measured in the same run.

    python bench/migration.py [--sizes 1G,4G] [--quick] [--json] [--sections throughput,...,qemu,encryption]

Each migration goes to a separate, ready `dirtylog receive --memory` process over loopback. Measures:
  * qemu (not run by default): dirtylog against QEMU on the same 1 GiB, one-vCPU guest (bench/qemu_guest.py),
    in turn, QEMU first in even repeats: an idle guest whose memory the host filled, and a filled guest
    rewriting a 256 MiB working set (uniformly random page writes over the first 256 MiB of its workload area,
    ``--qemu-rate`` pages/s). QEMU to QEMU: the destination waits with ``-incoming defer`` and preallocated
    memory; over QMP ``migrate-incoming``, ``migrate-set-parameters`` (downtime-limit 300 ms, max-bandwidth 0,
    which is no limit in QEMU 7.2) and ``migrate``, polled with ``query-migrate`` until completed. dirtylog to
    a ready `dirtylog receive --memory 1G`, the source running and ``preload()``ed before the timed migration,
    limit 300 ms. Totals, setup (dirtylog's phases on both sides), downtime against the limit, CPU per GB;
    ratios within a repeat;
  * encryption (not run by default): round 0 of a filled idle 1 GiB guest, one stream, to a ready destination,
    with encrypt=False and True in turn: throughput and CPU per GB;
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from dirtylog.guest.x86 import WORKLOAD_ADDR
from dirtylog.machine import Machine
from dirtylog.migration import migrate, preload
from dirtylog.migration.errors import MigrationError
from dirtylog.migration.keys import generate_key_file
from dirtylog.migration.payload.digest import fingerprints, gather, load_kernels
from dirtylog.migration.protocol.auth import frame_mac
from dirtylog.units import PAGE_SIZE, parse_size
from dirtylog.workload import WorkloadName

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
    """A `dirtylog receive` process for one migration; with ``memory`` a ready one (``--memory``: its VM and
    guest memory exist before it says it listens, so before the source connects)."""

    def __init__(self, key: str, memory: int | None = None, fault_path: str = "compiled") -> None:
        ready = ["--memory", str(memory)] if memory is not None else []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dirtylog", "receive", "--listen", "127.0.0.1:0", "--key-file", key,
             "--duration", "0", "--json", "--fault-path", fault_path, *ready], stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.address = json.loads(self.process.stdout.readline())["address"]

    def finish(self) -> dict[str, Any]:
        """The destination's last word (its ``completed`` or ``failed`` event), with its ``received-setup``
        event under ``setup``."""
        out, _ = self.process.communicate(timeout=300)
        events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        result: dict[str, Any] = next((e for e in events if e["event"] in ("completed", "failed")), {})
        return {**result, "setup": next((e for e in events if e["event"] == "received-setup"), {})}


def fill(machine: Machine, compressible: bool) -> None:
    """Write every workload page with data (random, or half random and half low-entropy)."""
    area = machine.memory[machine.workload_pages.start * PAGE_SIZE:].reshape(-1, PAGE_SIZE)
    rng = np.random.default_rng(1)
    area[:] = rng.integers(1, 256, area.shape, dtype=np.uint8)
    if compressible:
        area[::2, 16:] = 7  # every other page: 16 random bytes then a constant


def run_migration(key: str, memory: int, *, workload: str = "idle", rate: int | None = None,
                  filled: bool = True, compressible: bool = False, warmup: float = 0.5, ready: bool = True,
                  guest: dict[str, float] | None = None, **options: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """One migration of a fresh machine to a `dirtylog receive` process; (source stats, destination's word).
    The destination is ready (``--memory``: its guest memory allocated before the source connects) unless
    ``ready`` is False: without it, memory is allocated as pages arrive, inside round 0, and round 0 measures
    this host's page allocation (bench/compare_trees.py shows both). ``guest``, when given, receives the guest's
    progress (pages written, summed over vCPUs): ``rate_alone`` over the second half of the warm-up, and the
    counts ``at_start`` (migrate called), ``at_switchover`` (the guest paused for the switch-over) and
    ``at_end`` (migrate returned)."""
    destination = Destination(key, memory if ready else None,
                              "compiled" if options.get("compiled_faults", True) else "python")
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


def non_vcpu_cpu(pid: int) -> float:
    """CPU seconds QEMU process ``pid`` has used outside its vCPU threads ("CPU n/KVM"): its main loop, its
    migration thread and helpers, including threads that have ended (the process's total keeps them)."""
    vcpus = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):
            if (task / "comm").read_text().startswith("CPU "):
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                vcpus += int(fields[11]) + int(fields[12])
    return process_cpu(pid) - vcpus / os.sysconf("SC_CLK_TCK")


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


# --- dirtylog against QEMU on the same guest (issue 11) ------------------------------------------------------

QEMU_LIMIT_MS = 300  # QEMU's default downtime limit, given to both
WORKING_SET = 256 << 20
WARMUP_S = 1.0


@dataclass(frozen=True)
class GuestShape:
    """A guest both systems run the same way: one vCPU, memory fully written by the host, then a workload.

    ``working_set`` confines random writes to that many bytes at the start of the workload area: the
    ``hotset`` program with every write hot (``hot_weight`` 1, ``hot_fraction`` the working set's share).
    """

    name: str
    workload: WorkloadName
    rate: int | None = None
    working_set: int | None = None

    def workload_args(self, memory: int) -> dict[str, Any]:
        """The workload arguments of :class:`Machine` and of ``QemuGuest``."""
        args: dict[str, Any] = {"workload": self.workload, "rate": self.rate}
        if self.working_set is not None:
            area = (memory - WORKLOAD_ADDR) // PAGE_SIZE
            # + 0.5: both compute the hot set as int(area * fraction); this makes it exactly the working set
            args |= {"hot_fraction": (self.working_set // PAGE_SIZE + 0.5) / area, "hot_weight": 1.0}
        return args

    def describe(self) -> str:
        if self.working_set is None:
            return f"{self.workload}, fully written"
        rate = f"{self.rate:,} pages/s" if self.rate else "full speed"
        return f"fully written, then random writes over {self.working_set >> 20} MiB at {rate}"


def fill_pages(memory: npt.NDArray[np.uint8], first_page: int) -> None:
    """Write every page from ``first_page`` on: a 16 MiB random block over and over (a whole GiB from the
    generator takes seconds), each page made distinct by its number in its first 8 bytes; no zero page."""
    pages = memory[first_page * PAGE_SIZE:].reshape(-1, PAGE_SIZE)
    block = np.random.default_rng(1).integers(1, 256, (4096, PAGE_SIZE), dtype=np.uint8)
    for first in range(0, pages.shape[0], block.shape[0]):
        part = pages[first:first + block.shape[0]]
        part[:] = block[:part.shape[0]]
    pages.view(np.uint64)[:, 0] = np.arange(first_page, first_page + pages.shape[0], dtype=np.uint64)


def dirtylog_vs_ready(key: str, memory: int, shape: GuestShape) -> dict[str, Any]:
    """One dirtylog migration to a ready destination: `dirtylog receive --memory` started first, then the
    source machine built, filled, started and preloaded; the migration is timed after the warm-up."""
    destination = Destination(key, memory)
    marks: list[tuple[float, float, float]] = []

    def mark_cpu(kind: str, record: dict[str, Any]) -> None:  # on the migration's thread: its own CPU time
        if kind == "setup" or (kind == "round" and len(marks) == 1):
            marks.append((time.thread_time(), process_cpu(destination.process.pid), time.perf_counter()))

    with Machine(memory, vcpus=1, prefault=True, **shape.workload_args(memory)) as machine:
        fill_pages(machine.memory, machine.workload_pages.start)
        machine.start()
        preload()
        time.sleep(WARMUP_S)
        began = (time.thread_time(), process_cpu(destination.process.pid))
        written, started = machine.progress, time.perf_counter()
        try:
            stats = migrate(machine, destination.address, key_file=key, progress=mark_cpu,
                            downtime_limit=QEMU_LIMIT_MS / 1e3).as_dict()
        except MigrationError as error:
            stats = {**(error.stats.as_dict() if error.stats else {}), "status": "failed", "error": str(error)}
        cpu = (time.thread_time() - began[0], process_cpu(destination.process.pid) - began[1])
        guest_rate = (machine.progress - written) / (time.perf_counter() - started)  # paused at the switch-over
    received = destination.finish()
    gigabytes = stats.get("ram", {}).get("transferred", 0) / 1e9 or float("nan")
    rounds = stats.get("rounds", [])
    busy = {}
    if len(marks) == 2:  # share of round 0's wall time each side spent on a CPU: ~100 % bounds the rate
        wall = marks[1][2] - marks[0][2]
        busy = {"source": (marks[1][0] - marks[0][0]) / wall, "destination": (marks[1][1] - marks[0][1]) / wall}
    return {
        "status": stats["status"], "error": stats.get("error", ""),
        "total_ms": stats.get("total_time_ms"), "setup_ms": stats.get("setup_time_ms"),
        "setup_phases_ms": stats.get("setup_phases_ms", {}),
        "destination_setup_phases_ms": received.get("setup", {}).get("setup_phases_ms", {}),
        "downtime_ms": stats.get("downtime_ms"), "switchover_ms": stats.get("switchover_ms", {}),
        "rounds": len(rounds), "round0_gbps": round0_rate(stats) / 1e9 if rounds else None,
        "final_round_mb": rounds[-1]["bytes"] / 1e6 if rounds else None,
        "transferred_mb": stats.get("ram", {}).get("transferred", 0) / 1e6, "round0_busy": busy,
        # the migration's thread here (its vCPU threads apart) and the whole destination process
        "cpu_s_per_gb": {"source": cpu[0] / gigabytes, "destination": cpu[1] / gigabytes},
        "guest_pages_per_s": guest_rate,
    }


def qemu_vs_qemu(memory: int, shape: GuestShape, idle_halts: bool = True) -> dict[str, Any]:
    """One QEMU migration of the same guest: source booted and filled, destination QEMU started with
    `-incoming defer` and prealloc'd memory, then driven over QMP (bench/qemu_guest.py: migrate).
    ``idle_halts``: see bench/qemu_guest.py's QemuOptions."""
    from qemu_guest import QemuError, QemuGuest, QemuOptions
    from qemu_guest import migrate as qemu_migrate

    options = QemuOptions(idle_halts=idle_halts)
    with QemuGuest(memory, 1, **shape.workload_args(memory), options=options) as source:
        fill_pages(source.memory, WORKLOAD_ADDR // PAGE_SIZE)  # after boot: the firmware is done with RAM
        with source.destination() as destination:
            time.sleep(WARMUP_S)
            assert source.process is not None and destination.process is not None
            pids = (source.process.pid, destination.process.pid)
            before = [non_vcpu_cpu(pid) for pid in pids]
            written, started = source.progress, time.perf_counter()
            try:
                result = qemu_migrate(source, destination, downtime_limit_ms=QEMU_LIMIT_MS, max_bandwidth=0)
            except QemuError as error:
                return {"status": "failed", "error": str(error)[:300]}
            cpu = [non_vcpu_cpu(pid) - was for pid, was in zip(pids, before, strict=True)]
            guest_rate = (source.progress - written) / (time.perf_counter() - started)  # stopped at the switch-over
    ram = result.info["ram"]
    gigabytes = ram["transferred"] / 1e9
    return {"status": result.info["status"], "error": "", "total_ms": result.total_ms, "setup_ms": result.setup_ms,
            "cpu_s_per_gb": {"source": cpu[0] / gigabytes, "destination": cpu[1] / gigabytes},
            "guest_pages_per_s": guest_rate,
            "downtime_ms": result.downtime_ms, "stop_to_resume_ms": result.stop_to_resume_ms,
            "dirty_sync_count": ram["dirty-sync-count"], "downtime_mb": ram.get("downtime-bytes", 0) / 1e6,
            "transferred_mb": ram["transferred"] / 1e6, "mbps": ram["mbps"],
            "max_bandwidth": result.parameters["max-bandwidth"],
            "downtime_limit_ms": result.parameters["downtime-limit"]}


def against_qemu(key: str, memory: int, shapes: list[GuestShape], repeat: int,
                 idle_halts: bool = True) -> dict[str, Any]:
    """Each shape migrated by QEMU and by dirtylog in turn, ``repeat`` times, the order swapped every repeat;
    ratios are taken within a repeat."""
    from qemu_guest import qemu_unavailable_reason

    reason = qemu_unavailable_reason()
    if reason is not None:
        return {"skipped": reason}
    load_before = os.getloadavg()
    runs: list[dict[str, Any]] = []
    for index in range(repeat):
        for shape in shapes:
            order = ("qemu", "dirtylog") if index % 2 == 0 else ("dirtylog", "qemu")
            for system in order:
                run = (qemu_vs_qemu(memory, shape, idle_halts) if system == "qemu"
                       else dirtylog_vs_ready(key, memory, shape))
                runs.append({"shape": shape.name, "repeat": index, "system": system, "load": os.getloadavg()[0],
                             **run})
    summary = {shape.name: summarize_against_qemu(shape, [r for r in runs if r["shape"] == shape.name])
               for shape in shapes}
    return {"memory": memory, "limit_ms": QEMU_LIMIT_MS, "qemu_idle": "halt" if idle_halts else "exits",
            "load_before": load_before, "load_after": os.getloadavg(),
            "shapes": {shape.name: shape.describe() for shape in shapes}, "runs": runs, "summary": summary}


#: Goals of issue 11: dirtylog's total time over QEMU's, per shape.
TOTAL_RATIO_GOALS = {"idle": 0.5, "working-set": 0.7}
SETUP_GOAL_MS = 50.0


def summarize_against_qemu(shape: GuestShape, runs: list[dict[str, Any]]) -> dict[str, Any]:
    ours = {r["repeat"]: r for r in runs if r["system"] == "dirtylog" and r["status"] == "completed"}
    theirs = {r["repeat"]: r for r in runs if r["system"] == "qemu" and r["status"] == "completed"}
    pairs = sorted(i for i in set(ours) & set(theirs) if theirs[i]["total_ms"])
    ratios = [ours[i]["total_ms"] / theirs[i]["total_ms"] for i in pairs]

    def median(values: list[float]) -> float | None:
        return float(statistics.median(values)) if values else None

    failed = [r for r in runs if r["status"] != "completed"]
    goal = TOTAL_RATIO_GOALS.get(shape.name)
    our_downtimes = [r["downtime_ms"] for r in ours.values()]
    return {
        "pairs": len(pairs), "failed": len(failed), "ratios": [round(x, 3) for x in ratios],
        "ratio": median(ratios), "ratio_goal": goal,
        "dirtylog_total_ms": median([r["total_ms"] for r in ours.values()]),
        "qemu_total_ms": median([r["total_ms"] for r in theirs.values()]),
        "dirtylog_setup_ms": median([r["setup_ms"] for r in ours.values()]),
        "dirtylog_setup_max_ms": max((r["setup_ms"] for r in ours.values()), default=None),
        "qemu_setup_ms": median([r["setup_ms"] for r in theirs.values()]),
        "dirtylog_downtimes_ms": our_downtimes,
        "qemu_downtimes_ms": [r["downtime_ms"] for r in theirs.values()],
        "qemu_stop_to_resume_ms": [r["stop_to_resume_ms"] for r in theirs.values()],
        **{f"{system}_cpu_s_per_gb": {side: median([r["cpu_s_per_gb"][side] for r in chosen.values()])
                                      for side in ("source", "destination")}
           for system, chosen in (("dirtylog", ours), ("qemu", theirs))},
        **{f"{system}_guest_pages_per_s": median([r["guest_pages_per_s"] for r in chosen.values()])
           for system, chosen in (("dirtylog", ours), ("qemu", theirs))},
        "goals": {
            "setup": bool(ours) and all(r["setup_ms"] <= SETUP_GOAL_MS for r in ours.values()),
            "total": goal is not None and bool(ratios) and max(ratios) <= goal,
            "total_median": goal is not None and bool(ratios) and float(statistics.median(ratios)) <= goal,
            "downtime": bool(ours) and not failed and all(d <= QEMU_LIMIT_MS for d in our_downtimes),
        },
    }


# --- encryption: AES-256-GCM frames against authenticated clear frames ------------------------------------


def encryption(key: str, memory: int, repeat: int) -> dict[str, Any]:
    """Round 0 of a filled, idle guest, one stream, to a ready destination, with encrypt=False and True in
    turn (the order swapped every repeat); ratios within a repeat."""
    load_before = os.getloadavg()
    runs = []
    for index in range(repeat):
        for encrypt in (False, True) if index % 2 == 0 else (True, False):
            stats, _ = run_migration(key, memory, streams=1, downtime_limit="50ms", encrypt=encrypt)
            runs.append({"repeat": index, "encrypt": encrypt, "encrypted": stats.get("encrypted"),
                         "status": stats["status"], "round0_gbps": round0_rate(stats) / 1e9,
                         "total_ms": stats["total_time_ms"], "downtime_ms": stats["downtime_ms"],
                         "cpu_s_per_gb": stats.get("round0_cpu_s_per_gb"), "busy": stats.get("round0_busy"),
                         "load": os.getloadavg()[0]})
    by_repeat = {(r["repeat"], r["encrypt"]): r for r in runs}
    ratios = [by_repeat[(i, True)]["round0_gbps"] / by_repeat[(i, False)]["round0_gbps"] for i in range(repeat)]
    summary: dict[str, Any] = {"ratios": [round(x, 3) for x in ratios], "ratio": float(statistics.median(ratios))}
    for encrypt in (False, True):
        chosen = [r for r in runs if r["encrypt"] == encrypt and r["cpu_s_per_gb"]]
        name = "encrypted" if encrypt else "clear"
        summary[name] = {
            "round0_gbps": float(statistics.median(r["round0_gbps"] for r in chosen)),
            **{f"{side}_cpu_s_per_gb": float(statistics.median(r["cpu_s_per_gb"][side] for r in chosen))
               for side in ("source", "destination")},
            **{f"{side}_busy": float(statistics.median(r["busy"][side] for r in chosen))
               for side in ("source", "destination")},
        }
    return {"memory": memory, "load_before": load_before, "load_after": os.getloadavg(), "runs": runs,
            "summary": summary}


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.1f}"


def _cpu(run: dict[str, Any]) -> str:
    cpu = run["cpu_s_per_gb"]
    return (f"source {cpu['source']:.2f} + destination {cpu['destination']:.2f}; guest wrote "
            f"{run['guest_pages_per_s']:,.0f} pages/s")


def print_against_qemu(result: dict[str, Any]) -> None:
    if "skipped" in result:
        print(f"against QEMU: skipped ({result['skipped']})")
        return
    print(f"against QEMU ({result['memory'] >> 30} GiB, 1 vCPU, loopback, downtime limit {result['limit_ms']} ms, "
          f"QEMU's idle vCPU: {result['qemu_idle']}; load average {result['load_before'][0]:.2f} -> "
          f"{result['load_after'][0]:.2f})")
    for name, description in result["shapes"].items():
        print(f"  {name}: {description}")
        for run in (r for r in result["runs"] if r["shape"] == name):
            head = f"    #{run['repeat']} {run['system']:>8} (load {run['load']:.1f}): "
            if run["status"] != "completed":
                print(head + f"{run['status']}: {run['error'][:120]}")
            elif run["system"] == "qemu":
                print(head + f"total {_ms(run['total_ms'])} ms, setup {_ms(run['setup_ms'])} ms, downtime "
                      f"{_ms(run['downtime_ms'])} ms (STOP to RESUME {_ms(run['stop_to_resume_ms'])} ms; "
                      f"{run['downtime_mb']:,.0f} MB sent paused), {run['dirty_sync_count']} syncs, "
                      f"{run['transferred_mb']:,.0f} MB, CPU s/GB {_cpu(run)}")
            else:
                phases = ", ".join(f"{k} {v:.1f}" for k, v in run["setup_phases_ms"].items())
                there = ", ".join(f"{k} {v:.1f}" for k, v in run["destination_setup_phases_ms"].items())
                print(head + f"total {_ms(run['total_ms'])} ms, setup {_ms(run['setup_ms'])} ms ({phases}; "
                      f"destination: {there}), downtime {_ms(run['downtime_ms'])} ms, {run['rounds']} rounds "
                      f"(round 0 {run['round0_gbps']:.2f} GB/s, busy: engine thread "
                      f"{run['round0_busy'].get('source', 0):.0%}, destination "
                      f"{run['round0_busy'].get('destination', 0):.0%}; final {run['final_round_mb']:,.0f} MB), "
                      f"{run['transferred_mb']:,.0f} MB, CPU s/GB {_cpu(run)}")
        summary = result["summary"][name]
        print(f"    medians: dirtylog {_ms(summary['dirtylog_total_ms'])} ms / QEMU {_ms(summary['qemu_total_ms'])} "
              f"ms = {summary['ratio'] or 0:.2f}x {summary['ratios']} (goal <= {summary['ratio_goal']}x); setup "
              f"dirtylog {_ms(summary['dirtylog_setup_ms'])} ms (max {_ms(summary['dirtylog_setup_max_ms'])}; goal "
              f"<= {SETUP_GOAL_MS:.0f}), QEMU {_ms(summary['qemu_setup_ms'])} ms; downtimes dirtylog "
              f"{summary['dirtylog_downtimes_ms']}, QEMU {summary['qemu_downtimes_ms']}; goals {summary['goals']}")


def print_encryption(result: dict[str, Any]) -> None:
    summary = result["summary"]
    print(f"encryption ({result['memory'] >> 30} GiB filled idle guest, 1 stream, round 0; load average "
          f"{result['load_before'][0]:.2f} -> {result['load_after'][0]:.2f})")
    for run in result["runs"]:
        cpu = run["cpu_s_per_gb"] or {}
        print(f"    #{run['repeat']} encrypt={run['encrypt']!s:>5}: {run['round0_gbps']:.2f} GB/s, CPU s/GB source "
              f"{cpu.get('source', 0):.3f}, destination {cpu.get('destination', 0):.3f}; downtime "
              f"{_ms(run['downtime_ms'])} ms")
    for name in ("clear", "encrypted"):
        one = summary[name]
        print(f"  {name:>9}: {one['round0_gbps']:.2f} GB/s, CPU s/GB source {one['source_cpu_s_per_gb']:.3f} "
              f"({one['source_busy']:.0%} busy), destination {one['destination_cpu_s_per_gb']:.3f} "
              f"({one['destination_busy']:.0%})")
    print(f"  encrypted / clear throughput: {summary['ratio']:.2f}x {summary['ratios']}")


#: Post-copy against the throttles, each case once per repeat, in this order.
POSTCOPY_CASES: list[tuple[str, dict[str, Any]]] = [
    ("post-copy at once", {"postcopy": True, "postcopy_after": 0}),
    ("post-copy at once, fault path in Python", {"postcopy": True, "postcopy_after": 0, "compiled_faults": False}),
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


def postcopy(key: str, memory: int, bandwidth: float, repeat: int, only: str = "") -> dict[str, Any]:
    """The guest that outruns the link (random pages at full speed, every page written), moved by each method of
    POSTCOPY_CASES once per repeat, in turn (``only``: the cases whose names hold one of these comma-separated
    words)."""
    preload()  # the compiled passes, loaded once here rather than in the first migration's setup
    ideal = memory / bandwidth
    samples: list[dict[str, Any]] = []
    cases = [(case, extra) for case, extra in [*POSTCOPY_CASES, QUIET_CASE]
             if not only or any(word in case for word in only.split(",") if word)]
    for _ in range(repeat):
        for case, extra in cases:
            guest: dict[str, float] = {}
            # ready=False: a destination that builds its VM when the source connects, as measured for issue 17
            stats, received = run_migration(key, memory, workload="random", warmup=1.0, guest=guest, ready=False,
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
                        help="comma-separated subset to run; also qemu and encryption")
    parser.add_argument("--qemu-rate", type=int, default=50_000,
                        help="qemu section: pages/s of the working-set writer (default 50000)")
    parser.add_argument("--qemu-shapes", default="idle,working-set", help="qemu section: which guests")
    parser.add_argument("--qemu-idle", choices=("halt", "exits"), default="halt",
                        help="qemu section: QEMU's idle vCPU halts (as an idle OS; default) or runs the idle "
                             "program, an exit to QEMU's userspace per loop")
    parser.add_argument("--postcopy-cases", default="", metavar="WORDS",
                        help="postcopy section: only the cases whose names hold one of these comma-separated words "
                             "(e.g. 'at once' for the two fault-path cases)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    sizes = [parse_size(s) for s in ("1G" if args.quick else args.sizes).split(",")]
    repeat = 1 if args.quick else args.repeat
    shapes = [shape for shape in (GuestShape("idle", "idle"),
                                  GuestShape("working-set", "hotset", args.qemu_rate, WORKING_SET))
              if shape.name in args.qemu_shapes.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        key = str(generate_key_file(Path(folder) / "k"))
        sections: dict[str, Callable[[], Any]] = {
            "qemu": lambda: against_qemu(key, parse_size("1G"), shapes, repeat, args.qemu_idle == "halt"),
            "encryption": lambda: encryption(key, parse_size("1G"), repeat),
            "throughput": lambda: throughput(key, sizes, repeat),
            "dirtying": lambda: dirtying(key, parse_size("1G"), [5_000, 20_000, 50_000], bandwidth=500e6),
            "convergence": lambda: convergence(key, parse_size("128M"), "100M"),
            "compression": lambda: compression(key, parse_size("1G")),
            "budget": lambda: budget(parse_size("1G")),
            "postcopy": lambda: postcopy(key, parse_size("256M"), 100e6, repeat, args.postcopy_cases),
        }
        results: dict[str, Any] = {name: sections[name]() for name in args.sections.split(",")}
    if args.json:
        print(json.dumps(results, indent=2))
        return
    if "qemu" in results:
        print_against_qemu(results["qemu"])
    if "encryption" in results:
        print_encryption(results["encryption"])
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
