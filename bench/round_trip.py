"""The floor under a post-copy fault: one small message to another process and back, over loopback TCP.

    python bench/round_trip.py [--count 3000] [--busy 0,2] [--gap-us 500] [--json]

A post-copy fault needs one round trip between the two processes (the request, the answer) besides the work on
each end. This measures the round trip alone, with nothing in Python between receive and send, and with
``--busy N`` processes spinning meanwhile, as a guest's vCPUs do on the same cores. ``--gap-us`` leaves the
peers idle between messages, as faults arrive. Times are microseconds, exact percentiles of ``--count`` trips.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import socket
import time
from typing import Any

import numpy as np


def _echo(listener: socket.socket) -> None:
    peer, _ = listener.accept()
    peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while data := peer.recv(64):
        peer.sendall(data)


def _spin() -> None:
    while True:
        pass


def round_trips(count: int, busy: int, gap: float) -> dict[str, Any]:
    """``count`` round trips to an echoing process, beside ``busy`` spinning ones."""
    listener = socket.create_server(("127.0.0.1", 0))
    context = multiprocessing.get_context("fork")
    echo = context.Process(target=_echo, args=(listener,), daemon=True)
    spinners = [context.Process(target=_spin, daemon=True) for _ in range(busy)]
    for process in [echo, *spinners]:
        process.start()
    try:
        with socket.create_connection(listener.getsockname()) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            times = np.empty(count)
            for index in range(count):
                began = time.perf_counter_ns()
                sock.sendall(b"page request....")
                sock.recv(64)
                times[index] = (time.perf_counter_ns() - began) / 1e3
                time.sleep(gap)
    finally:
        for process in [echo, *spinners]:
            process.kill()
            process.join()
        listener.close()
    p50, p90, p99 = np.percentile(times, [50, 90, 99])
    return {"busy": busy, "count": count, "median_us": round(float(p50), 1), "p90_us": round(float(p90), 1),
            "p99_us": round(float(p99), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=3000)
    parser.add_argument("--busy", default="0,2", help="spinning processes beside the two peers, one run per value")
    parser.add_argument("--gap-us", type=float, default=500.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = [round_trips(args.count, int(busy), args.gap_us / 1e6) for busy in args.busy.split(",")]
    if args.json:
        print(json.dumps(rows))
        return
    print(f"loopback TCP round trip between two processes ({args.count} trips, {args.gap_us:g} us apart), us:")
    for row in rows:
        print(f"  beside {row['busy']} spinning process(es): median {row['median_us']}, p90 {row['p90_us']}, "
              f"p99 {row['p99_us']}")


if __name__ == "__main__":
    main()
