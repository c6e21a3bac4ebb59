"""What QMP costs: the input lexer, a command's round trip, and a migration watched by a client polling
query-migrate at 100 Hz, against the same migration left alone.

    python bench/qmp.py [--memory 256M] [--repeat 3] [--json]

* lexer: one 63 MiB message fed to :class:`JsonStreamer` in 64 KiB pieces (as ``recv`` hands them over),
  against ``json.loads`` of the same bytes at once (the C parser, no framing): MB/s and their ratio.
* round trip: ``query-status`` over a unix socket while a 2-vCPU guest writes (so the server thread shares
  the GIL with vCPU exits): median and 99th percentile.
* watched: migrations of a fresh ``hotset`` guest between two monitors in this process, alternately with a
  client polling ``query-migrate`` every 10 ms and without; the throughput of each (query-migrate's final
  ``mbps``: bytes over the time after setup; the number of rounds varies run to run, the rate much less),
  and the median ratio watched/alone within the run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dirtylog.control.client import QmpClient
from dirtylog.control.json_stream import JsonStreamer
from dirtylog.control.monitor import Monitor
from dirtylog.machine import Machine
from dirtylog.migration.keys import generate_key_file
from dirtylog.units import parse_size

PIECE = 64 << 10


def lexer() -> dict[str, float]:
    body = b"A" * (63 << 20)
    message = b'{"execute": "x", "arguments": {"text": "' + body + b'"}}\n'
    began = time.perf_counter()
    streamer = JsonStreamer()
    view = memoryview(message)
    out: list[Any] = []
    for offset in range(0, len(message), PIECE):
        out += streamer.feed(bytes(view[offset:offset + PIECE]))
    ours = time.perf_counter() - began
    assert len(out) == 1 and isinstance(out[0], dict)
    began = time.perf_counter()
    json.loads(message)
    stdlib = time.perf_counter() - began
    size = len(message) / 1e6
    return {"streamer_mb_s": round(size / ours), "json_loads_mb_s": round(size / stdlib),
            "ratio": round(stdlib / ours, 2)}


def round_trips(folder: Path, count: int = 500) -> dict[str, float]:
    with Machine("128M", vcpus=2, workload="random", rate=20000) as machine:
        machine.start()
        monitor = Monitor(f"unix:{folder / 'rtt.sock'}", machine=machine)
        monitor.start()
        try:
            with QmpClient(f"unix:{folder / 'rtt.sock'}") as client:
                times = []
                for _ in range(count):
                    began = time.perf_counter()
                    client.execute("query-status")
                    times.append(time.perf_counter() - began)
        finally:
            monitor.request_shutdown(None)
            monitor.close()
    times.sort()
    return {"median_us": round(statistics.median(times) * 1e6), "p99_us": round(times[int(count * 0.99)] * 1e6)}


def migration(folder: Path, key: str, memory: str, watched: bool, index: int) -> float:
    """Throughput (MB/s) of one migration of a fresh guest, from query-migrate's final mbps."""
    machine = Machine(memory, vcpus=2, workload="hotset", rate=20000)
    machine.start()
    time.sleep(0.5)
    source = Monitor(f"unix:{folder / f's{index}.sock'}", machine=machine, key_file=key)
    destination = Monitor(f"unix:{folder / f'd{index}.sock'}", machine=None, incoming=True, key_file=key)
    for monitor in (source, destination):
        monitor.start()
    stop = threading.Event()
    try:
        with QmpClient(f"unix:{folder / f'd{index}.sock'}") as qd, QmpClient(f"unix:{folder / f's{index}.sock'}") as qs:
            qd.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
            info = qd.execute("query-migrate")
            assert isinstance(info, dict)
            port = info["socket-address"][0]["port"]
            qs.execute("migrate-set-parameters", {"max-bandwidth": 0})
            poller = threading.Thread(target=poll, args=(folder / f"s{index}.sock", stop), daemon=True)
            if watched:
                poller.start()
            qs.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            while True:
                info = qs.execute("query-migrate")
                assert isinstance(info, dict)
                if info["status"] not in ("setup", "active"):
                    break
                time.sleep(0.2)
            assert info["status"] == "completed", info
            return float(info["ram"]["mbps"]) / 8
    finally:
        stop.set()
        for monitor in (source, destination):
            monitor.request_shutdown(None)
            monitor.close()


def poll(path: Path, stop: threading.Event) -> None:
    with QmpClient(f"unix:{path}") as client:
        while not stop.is_set():
            client.execute("query-migrate")
            time.sleep(0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memory", default="256M")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    parse_size(args.memory)
    results: dict[str, Any] = {"lexer": lexer()}
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        key = str(generate_key_file(folder / "k"))
        results["round_trip"] = round_trips(folder)
        alone: list[float] = []
        watched: list[float] = []
        for index in range(args.repeat):
            order = (False, True) if index % 2 == 0 else (True, False)
            for with_poller in order:
                rate = migration(folder, key, args.memory, with_poller, index * 2 + int(with_poller))
                (watched if with_poller else alone).append(rate)
        ratios = [w / a for w, a in zip(watched, alone, strict=True)]
        results["watched"] = {"alone_mb_s": [round(r) for r in alone], "watched_mb_s": [round(r) for r in watched],
                              "ratio_median": round(statistics.median(ratios), 3)}
    if args.json:
        print(json.dumps(results))
        return
    lex = results["lexer"]
    print(f"lexer: {lex['streamer_mb_s']} MB/s in 64 KiB pieces vs json.loads {lex['json_loads_mb_s']} MB/s "
          f"at once ({lex['ratio']}x)")
    rtt = results["round_trip"]
    print(f"query-status round trip with a writing guest: median {rtt['median_us']} us, p99 {rtt['p99_us']} us")
    w = results["watched"]
    print(f"migration throughput alone {w['alone_mb_s']} MB/s, polled at 100 Hz {w['watched_mb_s']} MB/s: "
          f"watched/alone median {w['ratio_median']}x")


if __name__ == "__main__":
    main()
