"""Throughput of the migration stream's encode and decode paths, against a plain memcpy of the same bytes.

    python bench/wire.py [--seconds 0.4] [--memory 256M] [--batch-pages 256] [--json]

Batches of ``--batch-pages`` 4 KiB pages (1 MiB by default) cycle through a working set larger than the
CPU caches, as guest memory does; every other page is random, the others low-entropy (small int32
values, like counters and indices). Each figure is the median of three timed runs in this one process.

* memcpy: ``np.copyto`` of one batch's bytes, from the working set into one buffer.
* encode: ``make_page_batch`` (runs; compression for lz4/zstd) and ``send`` (header, MAC over the
  pages in place); the page data is not copied.
* decode: ``receive_data`` in 64 KiB pieces (as ``recv`` hands them over; our one copy), ``next_event``
  (MAC check, parsing, validation against the layout) and ``decode_pages`` (decompression or a view).

GB/s are of guest page bytes, whatever went on the wire.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from blake3 import blake3
from numpy.typing import NDArray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dirtylog.kvm.memslot import SlotLayout
from dirtylog.migration.payload.digest import fingerprints
from dirtylog.migration.payload.pages import compress, decode_pages, decompress, make_page_batch
from dirtylog.migration.protocol.auth import frame_mac
from dirtylog.migration.protocol.connection import DestinationConnection, SourceConnection
from dirtylog.migration.protocol.events import Codec, Header, PageBatch, Ready
from dirtylog.migration.protocol.loopback import collect, join
from dirtylog.units import PAGE_SIZE

PAGE = PAGE_SIZE
KEY = bytes(range(32))
RECV = 64 << 10


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def working_set(nbytes: int, seed: int = 0) -> np.ndarray:
    """Guest-like pages: even pages random, odd pages small int32 values."""
    rng = np.random.default_rng(seed)
    pages = nbytes // PAGE
    mem = np.empty((pages, PAGE), np.uint8)
    mem[0::2] = rng.integers(0, 256, (len(mem[0::2]), PAGE), dtype=np.uint8)
    low = rng.integers(0, 1000, (len(mem[1::2]), PAGE // 4), dtype=np.int32)
    mem[1::2] = low.view(np.uint8).reshape(-1, PAGE)
    return mem


def _compress_batch(codec: Codec, batches: list[NDArray[np.uint8]], i: int) -> bytes:
    return compress(codec, batches[i].data)


def _decompress_block(codec: Codec, blocks: list[bytes], size: int, i: int) -> bytes:
    return decompress(codec, blocks[i], size)


def rate(work: Callable[[int], object], nbytes: int, seconds: float, count: int) -> float:
    """Median GB/s of three runs of ``work(i)`` over ``seconds`` each (``nbytes`` per call)."""
    work(0)
    runs = []
    for _ in range(3):
        calls, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            work(calls % count)
            calls += 1
        runs.append(calls * nbytes / elapsed / 1e9)
    return statistics.median(runs)


def streaming_pair(codec: Codec, pages: int) -> tuple[SourceConnection, DestinationConnection, list[bytes]]:
    """A pair past Header and Ready, with fixed nonces so its frames can be fed again to a fresh
    receiver; returns the source's preamble bytes (HELLO, then AUTH + Header) for that."""
    src = SourceConnection(KEY, nonce=b"s" * 32, migration_id=b"m" * 16)
    dst = DestinationConnection(KEY, nonce=b"d" * 32)
    preamble = [join(src.initiate())]
    collect(dst, preamble[0])
    collect(src, dst.accept())
    preamble.append(join(src.send(Header(PAGE, (SlotLayout.of_pages(0, 0, pages),), vcpus=1, codec=codec))))
    collect(dst, preamble[1])
    collect(src, dst.send(Ready()))
    return src, dst, preamble


def fresh_receiver(preamble: list[bytes]) -> DestinationConnection:
    """A destination in the same session as ``streaming_pair``'s, ready for its first batch."""
    dst = DestinationConnection(KEY, nonce=b"d" * 32)
    collect(dst, preamble[0])
    dst.accept()
    collect(dst, preamble[1])
    dst.send(Ready())
    return dst


def releases_gil(work: Callable[[], object]) -> float:
    """How much of its time a spinning Python thread keeps while ``work`` runs (1.0: GIL released)."""

    def spin(counter: list[int], stop: threading.Event) -> None:
        while not stop.is_set():
            counter[0] += 1

    def spins_per_second(during: Callable[[], object]) -> float:
        counter, stop = [0], threading.Event()
        thread = threading.Thread(target=spin, args=(counter, stop))
        thread.start()
        time.sleep(0.02)
        before, start = counter[0], time.perf_counter()
        during()
        after, elapsed = counter[0], time.perf_counter() - start
        stop.set()
        thread.join()
        return (after - before) / elapsed

    idle = spins_per_second(lambda: time.sleep(0.1))
    busy = spins_per_second(lambda: [work() for _ in range(100)])
    return busy / idle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.4, help="per timed run (three per figure)")
    parser.add_argument("--memory", default="256M", help="working set the batches cycle through")
    parser.add_argument("--batch-pages", type=int, default=256)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    mem = working_set(parse_size(args.memory))
    per = args.batch_pages
    count = len(mem) // per
    nbytes = per * PAGE
    batches = [mem[i * per : (i + 1) * per] for i in range(count)]
    pfns = [np.arange(i * per, (i + 1) * per, dtype=np.uint64) for i in range(count)]
    no_zero = np.zeros(per, bool)
    out = np.empty((per, PAGE), np.uint8)
    key = bytes(32)
    seconds = args.seconds

    result: dict[str, object] = {
        "batch_bytes": nbytes,
        "working_set_bytes": mem.nbytes,
        "memcpy_gbps": rate(lambda i: np.copyto(out, batches[i]), nbytes, seconds, count),
        "gmac_frame_mac_gbps": rate(lambda i: frame_mac(key, i, batches[i].data), nbytes, seconds, count),
        "blake3_mac_gbps": rate(lambda i: blake3(batches[i].data, key=key).digest(16), nbytes, seconds, count),
        "page_fingerprints_gbps": rate(lambda i: fingerprints(batches[i].reshape(-1, PAGE)), nbytes, seconds, count),
        "gmac_releases_gil": round(releases_gil(lambda: frame_mac(key, 0, batches[0].data)), 2),
    }
    memcpy = float(result["memcpy_gbps"])  # type: ignore[arg-type]
    codecs: dict[str, dict[str, float]] = {}
    for codec in ("none", "lz4", "zstd"):
        row: dict[str, float] = {}
        if codec != "none":
            blocks = [compress(codec, b.data) for b in batches]
            row["ratio"] = sum(len(b) for b in blocks) / mem.nbytes
            row["compress_gbps"] = rate(functools.partial(_compress_batch, codec, batches), nbytes, seconds, count)
            row["decompress_gbps"] = rate(functools.partial(_decompress_block, codec, blocks, nbytes), nbytes, seconds,
                                          count)
        src, _, _ = streaming_pair(codec, len(mem))

        def encode(i: int, c: Codec = codec, s: SourceConnection = src) -> None:
            s.send(make_page_batch(0, pfns[i], no_zero, batches[i], page_size=PAGE, codec=c))

        row["encode_gbps"] = rate(encode, nbytes, seconds, count)
        # Decode what a source sends: encode every batch once, then feed the frames round and round,
        # to a fresh receiver in the same session per lap (sequence numbers only go up).
        src, _, preamble = streaming_pair(codec, len(mem))
        frames = [
            join(src.send(make_page_batch(0, pfns[i], no_zero, batches[i], page_size=PAGE, codec=codec)))
            for i in range(count)
        ]
        row["wire_ratio"] = sum(len(f) for f in frames) / mem.nbytes
        receiver = [fresh_receiver(preamble)]

        def decode(
            i: int,
            frames: list[bytes] = frames,
            receiver: list[DestinationConnection] = receiver,
            pre: list[bytes] = preamble,
        ) -> None:
            if i == 0 and receiver[0].frames_received > 1:
                receiver[0] = fresh_receiver(pre)
            conn, frame = receiver[0], memoryview(frames[i])  # pieces as views: only our copy counts
            for at in range(0, len(frame), RECV):
                conn.receive_data(frame[at : at + RECV])
            event = conn.next_event()
            assert isinstance(event, PageBatch)
            decode_pages(event)

        row["decode_gbps"] = rate(decode, nbytes, seconds, count)
        row["encode_vs_memcpy"] = row["encode_gbps"] / memcpy
        row["decode_vs_memcpy"] = row["decode_gbps"] / memcpy
        codecs[codec] = {k: round(v, 3) for k, v in row.items()}
    result["codecs"] = codecs

    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(
        f"migration stream: {per}-page ({nbytes >> 10} KiB) batches cycling through {mem.nbytes >> 20} MiB, "
        "half random / half low-entropy pages"
    )
    print(
        f"  memcpy {memcpy:6.2f} GB/s   frame MAC (AES-GMAC) {result['gmac_frame_mac_gbps']:.2f} GB/s "
        f"(GIL released: {result['gmac_releases_gil']:.0%} of a spinning thread kept)   "
        f"keyed BLAKE3 {result['blake3_mac_gbps']:.2f} GB/s   "
        f"page fingerprints {result['page_fingerprints_gbps']:.2f} GB/s"
    )
    print(
        f"  {'codec':6} {'ratio':>6} {'compress':>9} {'decompress':>11} {'encode':>8} {'x memcpy':>8} "
        f"{'decode':>8} {'x memcpy':>8}   (GB/s of pages)"
    )
    for codec, row in codecs.items():
        print(
            f"  {codec:6} {row.get('wire_ratio', 1):6.2f} {row.get('compress_gbps', float('nan')):9.2f} "
            f"{row.get('decompress_gbps', float('nan')):11.2f} {row['encode_gbps']:8.2f} "
            f"{row['encode_vs_memcpy']:8.2f} {row['decode_gbps']:8.2f} {row['decode_vs_memcpy']:8.2f}"
        )


if __name__ == "__main__":
    main()
