"""The floor of a whole post-copy fault: a userfaultfd fault served by another process over loopback TCP, all compiled.

    python bench/fault_floor.py [--faults 3000] [--busy 0,1,2] [--gap-us 200] [--memory 256M] [--json]

What dirtylog's post-copy does in Python, here done by Numba code (``nogil``, system calls through
:mod:`dirtylog.linux.nogil`) with no Python and no GIL anywhere between the fault and its resolution:

* the destination process maps ``--memory`` of private anonymous memory, all missing, registered with a
  userfaultfd (MISSING mode). A "vCPU" thread reads one random missing page at a time, ``--gap-us`` apart
  (asleep in between, as a vCPU between faults or ``bench/round_trip.py`` between trips), and times each read
  with CLOCK_MONOTONIC; the read blocks in the kernel until the page is installed.
* its handler thread polls the userfaultfd, reads the fault, writes the page number (8 bytes) to the source's
  TCP socket, reads the 4,096-byte answer and installs it with ``UFFDIO_COPY``, which wakes the vCPU.
* the source process reads requests and answers each with a page from its own buffer, stamped with the
  page number (the vCPU checks it: a wrong page fails the run).

Each ``--busy N`` row runs beside N processes spinning ``while True: pass``, as a guest's running vCPUs do on
the same cores. Beside the fault over TCP, each row also has the same fault answered inside the handler thread
(no socket, no source process): what userfaultfd itself costs. Times are microseconds, exact percentiles of
``--faults`` faults (after ``--warmup`` untimed ones). The clock read is a system call here; its cost (two
reads back to back) is printed and is inside every figure. The TCP faults are also grouped by how many of
their four wake-ups (handler, source, handler again, vCPU) crossed from one CPU to the other, from the CPU
each thread sampled (``getcpu``) after its step: where the three threads sit decides most of a fault's time.

Not in the loop, measured separately in this process and printed beside: one AES-256-GMAC of a 4 KiB frame
through dirtylog's ``frame_mac`` (Python calling OpenSSL), the frame MAC a compiled path would add twice per
fault (the request and the answer).
"""

from __future__ import annotations

import argparse
import json
import mmap
import multiprocessing
import os
import platform
import socket
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any, Final

import numpy as np
from numba import njit
from numpy.typing import NDArray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dirtylog.linux import nogil
from dirtylog.linux.nogil import syscall6
from dirtylog.linux.userfaultfd import Userfaultfd
from dirtylog.migration.protocol.auth import frame_mac
from dirtylog.units import PAGE_SIZE, parse_size

_ARM64: Final = platform.machine() in ("aarch64", "arm64")
#: System calls nogil.py does not wrap: (x86-64, arm64's generic table).
SYS_NANOSLEEP: Final = (35, 101)[_ARM64]
SYS_GETCPU: Final = (309, 168)[_ARM64]
ETIMEDOUT: Final = nogil.ETIMEDOUT
EPROTO: Final = 71  # a page came back with the wrong stamp
PAGE_WORDS: Final = PAGE_SIZE // 8
POLL_NS: Final = 200_000_000  # the handler's longest wait before it looks at the stop flag again
SOCKET_TIMEOUT_S: Final = 2  # SO_RCVTIMEO: a silent peer ends the run with ETIMEDOUT instead of hanging it

# control: one int64 array shared by the threads of one run and the Python that watches them.
STOP, HANDLER_STATUS, HANDLED, VCPU_STATUS, TOUCHED = range(5)
CONTROL_WORDS: Final = 5


@njit(cache=True, nogil=True)
def _getcpu(scratch: NDArray[np.int64]) -> int:
    """The CPU this thread runs on; ``scratch``: 1 int64."""
    scratch[0] = 0
    syscall6(SYS_GETCPU, scratch.ctypes.data, 0, 0, 0, 0, 0)
    return int(scratch[0] & 0xFFFF_FFFF)


@njit(cache=True, nogil=True)
def _send_all(fd: int, address: int, count: int) -> int:
    """Write ``count`` bytes from ``address`` to socket ``fd``; ``count`` or -errno."""
    done = 0
    while done < count:
        put = syscall6(nogil.SYS_WRITE, fd, address + done, count - done, 0, 0, 0)
        if put == -nogil.EINTR:
            continue
        if put < 0:
            return put
        done += put
    return done


@njit(cache=True, nogil=True)
def _recv_all(fd: int, address: int, count: int) -> int:
    """Read ``count`` bytes to ``address`` from blocking socket ``fd`` (SO_RCVTIMEO set); the bytes read (fewer:
    the peer closed), -ETIMEDOUT when it went silent part way, or -errno. 0 bytes and -EAGAIN: nothing came."""
    done = 0
    while done < count:
        got = syscall6(nogil.SYS_READ, fd, address + done, count - done, 0, 0, 0)
        if got == -nogil.EINTR:
            continue
        if got == -nogil.EAGAIN:
            return -nogil.EAGAIN if done == 0 else -ETIMEDOUT
        if got < 0:
            return got
        if got == 0:
            break
        done += got
    return done


@njit(cache=True, nogil=True)
def serve_pages(sock: int, page: NDArray[np.uint64], control: NDArray[np.int64]) -> None:
    """The source: answer each 8-byte request (a page number) with ``page`` stamped with that number + 1 (and,
    in its second word, the CPU it answers from), until the destination closes the socket, something fails
    (``control[HANDLER_STATUS]``) or ``control[STOP]``."""
    request = np.zeros(1, dtype=np.int64)
    cpu = np.zeros(1, dtype=np.int64)
    while control[STOP] == 0:
        got = _recv_all(sock, request.ctypes.data, 8)
        if got == -nogil.EAGAIN:
            continue  # no request within the timeout: the destination is between faults or done
        if got != 8:
            control[HANDLER_STATUS] = got if got < 0 else 0  # < 8 bytes: end of stream
            return
        page[0] = np.uint64(request[0] + 1)
        page[1] = np.uint64(_getcpu(cpu))
        put = _send_all(sock, page.ctypes.data, PAGE_SIZE)
        if put < 0:
            control[HANDLER_STATUS] = put
            return
        control[HANDLED] += 1


@njit(cache=True, nogil=True)
def handle_faults(uffd: int, sock: int, base: int, expected: int, control: NDArray[np.int64],
                  cpus: NDArray[np.int64]) -> None:
    """The destination's fault thread: resolve ``expected`` missing-page faults of the range at ``base``, asking
    the source on ``sock`` for each page (``sock`` < 0: answer here, stamped alike). Stops early on
    ``control[STOP]`` or an error (``control[HANDLER_STATUS]``: -errno). Row ``n`` of ``cpus`` gets, for the
    n-th fault, the CPUs the handler installed it from (column 1) and the source answered from (2)."""
    scratch = np.zeros(8, dtype=np.int64)
    messages = np.zeros(64 * nogil.UFFD_MSG_WORDS, dtype=np.uint64)
    page = np.zeros(PAGE_WORDS, dtype=np.uint64)
    request = np.zeros(1, dtype=np.int64)
    cpu = np.zeros(1, dtype=np.int64)
    handled = 0
    while handled < expected and control[STOP] == 0:
        ready = nogil.poll_in(uffd, POLL_NS, scratch)
        if ready == 0:
            continue
        if ready < 0:
            control[HANDLER_STATUS] = ready
            return
        count = nogil.read_messages(uffd, messages)
        if count < 0:
            control[HANDLER_STATUS] = count
            return
        for m in range(count):
            if np.int64(messages[m * nogil.UFFD_MSG_WORDS]) & 0xFF != nogil.UFFD_EVENT_PAGEFAULT:
                continue
            address = int(np.int64(messages[m * nogil.UFFD_MSG_WORDS + 2]) & ~np.int64(PAGE_SIZE - 1))
            number = (address - base) // PAGE_SIZE
            if sock < 0:
                page[0] = np.uint64(number + 1)
            else:
                request[0] = number
                put = _send_all(sock, request.ctypes.data, 8)
                if put < 0:
                    control[HANDLER_STATUS] = put
                    return
                got = _recv_all(sock, page.ctypes.data, PAGE_SIZE)
                if got != PAGE_SIZE:
                    control[HANDLER_STATUS] = -ETIMEDOUT if got == -nogil.EAGAIN else (got if got < 0 else -EPROTO)
                    return
            result = nogil.uffd_copy(uffd, address, page.ctypes.data, PAGE_SIZE, 0, scratch)
            if result < 0 and result != -nogil.EEXIST:
                control[HANDLER_STATUS] = result
                return
            if handled < cpus.shape[0]:
                cpus[handled, 1] = _getcpu(cpu)
                cpus[handled, 2] = cpus[handled, 1] if sock < 0 else np.int64(page[1])
            handled += 1
            control[HANDLED] = handled


@njit(cache=True, nogil=True)
def touch_pages(memory: NDArray[np.uint64], pages: NDArray[np.int64], gap_ns: int, times: NDArray[np.int64],
                control: NDArray[np.int64], cpus: NDArray[np.int64]) -> None:
    """The vCPU: read the first word of each page of ``pages``, ``gap_ns`` apart (asleep), each read's time in
    ``times`` (ns) and the CPU it woke on in ``cpus[i, 0]``; a page without its stamp stops it
    (``control[VCPU_STATUS]`` = -EPROTO)."""
    clock = np.zeros(2, dtype=np.int64)
    sleep = np.zeros(2, dtype=np.int64)
    cpu = np.zeros(1, dtype=np.int64)
    for i in range(pages.size):
        if control[STOP] != 0:
            return
        if gap_ns > 0:
            sleep[0] = gap_ns // 1_000_000_000
            sleep[1] = gap_ns % 1_000_000_000
            while syscall6(SYS_NANOSLEEP, sleep.ctypes.data, sleep.ctypes.data, 0, 0, 0, 0) == -nogil.EINTR:
                pass
        number = pages[i]
        began = nogil.monotonic_ns(clock)
        value = memory[number * PAGE_WORDS]  # blocks until the handler installs the page
        ended = nogil.monotonic_ns(clock)
        times[i] = ended - began
        cpus[i, 0] = _getcpu(cpu)
        if np.int64(value) != number + 1:
            control[VCPU_STATUS] = -EPROTO
            return
        control[TOUCHED] = i + 1


@njit(cache=True, nogil=True)
def clock_pairs(times: NDArray[np.int64]) -> None:
    """Two clock reads back to back, ``times.size`` times: what the timing adds to each fault."""
    clock = np.zeros(2, dtype=np.int64)
    for i in range(times.size):
        began = nogil.monotonic_ns(clock)
        times[i] = nogil.monotonic_ns(clock) - began


def _compile() -> None:
    """Compile (or load from the cache) every loop before any process forks or thread starts."""
    stopped = np.zeros(CONTROL_WORDS, dtype=np.int64)
    stopped[STOP] = 1
    serve_pages(-1, np.zeros(PAGE_WORDS, dtype=np.uint64), stopped)
    handle_faults(-1, -1, 0, 0, stopped, np.zeros((1, 3), dtype=np.int64))
    touch_pages(np.zeros(PAGE_WORDS, dtype=np.uint64), np.zeros(0, dtype=np.int64), 0, np.zeros(0, dtype=np.int64),
                stopped, np.zeros((1, 3), dtype=np.int64))
    clock_pairs(np.zeros(1, dtype=np.int64))


def _timeouts(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", SOCKET_TIMEOUT_S, 0))


def _source(listener: socket.socket) -> None:
    listener.settimeout(10)
    peer, _ = listener.accept()
    peer.setblocking(True)
    _timeouts(peer)
    control = np.zeros(CONTROL_WORDS, dtype=np.int64)
    serve_pages(peer.fileno(), np.full(PAGE_WORDS, 0x5A5A_5A5A_5A5A_5A5A, dtype=np.uint64), control)
    peer.close()


def _spin() -> None:
    while True:
        pass


def _status(code: int) -> str:
    return os.strerror(-int(code)) if code else "ok"


def _by_wakeups(times_ns: NDArray[np.int64], cpus: NDArray[np.int64]) -> dict[str, dict[str, float]]:
    """The faults grouped by how many of their wake-ups crossed CPUs, as far as the CPUs sampled after each step
    tell: of the four over TCP (handler, source, handler, vCPU), 0 (all three on one CPU), 2 (one pair apart)
    or 4 (both); of the two in the handler (its source column is its own CPU), 0 or 2."""
    crossings = 2 * (cpus[:, 0] != cpus[:, 1]) + 2 * (cpus[:, 1] != cpus[:, 2])
    return {str(hops): {"share": round(float(np.mean(crossings == hops)), 3),
                        **_percentiles(times_ns[crossings == hops])}
            for hops in (0, 2, 4) if np.any(crossings == hops)}


def _percentiles(times_ns: NDArray[np.int64]) -> dict[str, float]:
    p50, p90, p99 = np.percentile(times_ns / 1e3, [50, 90, 99])
    return {"median_us": round(float(p50), 1), "p90_us": round(float(p90), 1), "p99_us": round(float(p99), 1)}


def faults(count: int, warmup: int, busy: int, gap_ns: int, memory_size: int, over_tcp: bool) -> dict[str, Any]:
    """``count`` timed faults (after ``warmup``) of one vCPU thread, resolved over TCP by a source process
    (``over_tcp``) or inside the handler thread, beside ``busy`` spinning processes."""
    context = multiprocessing.get_context("fork")
    listener = socket.create_server(("127.0.0.1", 0)) if over_tcp else None
    children = [context.Process(target=_spin, daemon=True) for _ in range(busy)]
    if listener is not None:
        children.insert(0, context.Process(target=_source, args=(listener,), daemon=True))
    sock: socket.socket | None = None
    uffd: Userfaultfd | None = None
    area = mmap.mmap(-1, memory_size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    area.madvise(mmap.MADV_NOHUGEPAGE)  # guest RAM faults in 4 KiB pages in post-copy; keep it so here
    memory = np.frombuffer(area, dtype=np.uint64)
    control = np.zeros(CONTROL_WORDS, dtype=np.int64)
    pages = np.random.default_rng().choice(memory_size // PAGE_SIZE, warmup + count, replace=False).astype(np.int64)
    times = np.zeros(warmup + count, dtype=np.int64)
    cpus = np.full((warmup + count, 3), -1, dtype=np.int64)
    threads: list[threading.Thread] = []
    try:
        for child in children:
            child.start()
        if listener is not None:
            sock = socket.create_connection(listener.getsockname(), timeout=10)
            sock.setblocking(True)
            _timeouts(sock)
        uffd = Userfaultfd.create(nonblock=True)
        uffd.api(0)
        base = memory.ctypes.data
        uffd.register(base, memory_size, missing=True)
        threads = [threading.Thread(target=handle_faults, name="fault-handler", daemon=True,
                                    args=(uffd.fd, -1 if sock is None else sock.fileno(), base, pages.size, control,
                                          cpus)),
                   threading.Thread(target=touch_pages, name="vcpu", daemon=True,
                                    args=(memory, pages, gap_ns, times, control, cpus))]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30 + pages.size * (gap_ns / 1e9 + 0.01)
        while threads[1].is_alive() and time.monotonic() < deadline:
            threads[1].join(timeout=0.2)
            if not threads[0].is_alive():  # done or failed: a vCPU still waiting on a fault would wait forever
                threads[1].join(timeout=1)
                break
        if threads[1].is_alive() or control[HANDLER_STATUS] or control[VCPU_STATUS]:
            raise SystemExit(f"fault_floor: the run beside {busy} spinning process(es) failed: {control[TOUCHED]} of "
                             f"{pages.size} pages touched, handler: {_status(control[HANDLER_STATUS])}, vCPU: "
                             f"{_status(control[VCPU_STATUS])}")
    finally:
        control[STOP] = 1
        if threads:
            threads[0].join(timeout=POLL_NS / 1e9 + SOCKET_TIMEOUT_S + 1)
        if uffd is not None:
            uffd.close()  # wakes a vCPU still waiting on a fault (the page reads as zero: the run has failed)
        if threads:
            threads[1].join(timeout=5)
        if sock is not None:
            sock.close()
        for child in children:
            if child.pid is not None:
                child.kill()
                child.join()
        if listener is not None:
            listener.close()
        if not any(thread.is_alive() for thread in threads):
            del memory
            area.close()  # else leave it mapped: a thread still inside it would crash the process
    row: dict[str, Any] = {"busy": busy, "faults": count, "over_tcp": over_tcp, **_percentiles(times[warmup:])}
    row["by_cross_cpu_wakeups"] = _by_wakeups(times[warmup:], cpus[warmup:])
    return row


def gmac_us(repeat: int = 5000) -> float:
    """Median time of one ``frame_mac`` of a 4 KiB page frame (32-byte header), in µs."""
    key, frame = os.urandom(32), os.urandom(32 + PAGE_SIZE)
    frame_mac(key, 0, frame)
    times = np.empty(repeat)
    for seq in range(repeat):
        began = time.perf_counter_ns()
        frame_mac(key, seq, frame)
        times[seq] = time.perf_counter_ns() - began
    return round(float(np.median(times)) / 1e3, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--faults", type=int, default=3000)
    parser.add_argument("--warmup", type=int, default=100, help="untimed faults before the timed ones")
    parser.add_argument("--busy", default="0,1,2", help="spinning processes beside the two peers, one row per value")
    parser.add_argument("--gap-us", type=float, default=200.0, help="the vCPU's sleep between touches")
    parser.add_argument("--memory", default="256M", help="the destination's registered memory")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    memory_size = parse_size(args.memory)
    if args.faults < 1 or args.warmup < 0 or (args.faults + args.warmup) * PAGE_SIZE > memory_size:
        parser.error(f"--faults + --warmup must be at least 1 and fit in --memory ({memory_size // PAGE_SIZE} pages)")
    _compile()
    clock = np.zeros(10_000, dtype=np.int64)
    clock_pairs(clock)
    rows = []
    for busy in (int(value) for value in args.busy.split(",")):
        tcp = faults(args.faults, args.warmup, busy, int(args.gap_us * 1e3), memory_size, over_tcp=True)
        local = faults(args.faults, args.warmup, busy, int(args.gap_us * 1e3), memory_size, over_tcp=False)
        rows.append({**tcp, "local": {key: value for key, value in local.items() if key.endswith(("_us", "wakeups"))}})
    summary = {"clock_read_pair_us": round(float(np.median(clock)) / 1e3, 2), "frame_mac_4k_us": gmac_us(),
               "load_average": [round(value, 2) for value in os.getloadavg()]}
    if args.json:
        for row in rows:
            print(json.dumps(row))
        print(json.dumps(summary))
        return
    print(f"post-copy fault, compiled on both ends ({args.faults} faults, {args.gap_us:g} us apart, "
          f"{args.memory} registered), us:")
    for row in rows:
        local = row["local"]
        print(f"  beside {row['busy']} spinning process(es): over TCP median {row['median_us']}, p90 {row['p90_us']}, "
              f"p99 {row['p99_us']}; answered in the handler median {local['median_us']}, p90 {local['p90_us']}, "
              f"p99 {local['p99_us']}")
        for name, groups in (("over TCP", row["by_cross_cpu_wakeups"]),
                             ("in the handler", local["by_cross_cpu_wakeups"])):
            print(f"    {name}, by wake-ups across CPUs: " + "; ".join(
                f"{hops}: {group['share']:.1%} of faults, median {group['median_us']}, p90 {group['p90_us']}"
                for hops, group in groups.items()))
    print(f"two clock reads back to back: {summary['clock_read_pair_us']} us (inside every figure)")
    print(f"measured separately, not in the loop: one frame_mac (AES-256-GMAC, Python -> OpenSSL) of a 4 KiB frame "
          f"{summary['frame_mac_4k_us']} us; a MACed fault needs two (request and answer)")
    print(f"load average at the end: {summary['load_average']}")


if __name__ == "__main__":
    main()
