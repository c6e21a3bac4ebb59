"""A process for the tracker to watch: threads stamp pages of several kinds of mapping in a known pattern.

Run as ``python stamp_target.py FILE [options]`` (FILE backs the private file mapping). It prints one
JSON line describing its areas, waits for ``go`` on stdin, runs, prints a JSON line with a checksum of its
results, and waits for ``exit``. Kinds of memory stamped, each split between the writer threads so that
every page has exactly one writer:

* ``heap``: a bytearray in the brk heap (the test starts us with ``MALLOC_MMAP_THRESHOLD_`` raised and one
  malloc arena, so it is not given its own mapping);
* ``anon``: an anonymous private ``mmap``;
* ``file``: a writable private mapping of FILE (copy-on-write: the file itself is never changed);
* ``stack``: the far end of each writer thread's own stack (its stack pointer stays near the other end).

Iteration ``i`` of a thread writes ``i`` into the first 8 bytes of ``--per-iteration`` pages of its share,
chosen by its own seeded generator, then publishes ``i`` in its slot of the control page: a reader that
sees ``i`` there knows every stamp up to ``i`` is in memory (x86 keeps stores in order). The pattern does
not depend on timing, so the checksum of the areas at the end must not either: tracked or not.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import mmap
import os
import random
import sys
import threading
import time

PAGE = 4096
_libc = ctypes.CDLL(None)
_libc.pthread_self.restype = ctypes.c_ulong


def address_of(buffer: bytearray | mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buffer))


def inner_pages(start: int, size: int) -> tuple[int, int]:
    """The whole pages inside ``[start, start + size)``: malloc may write the partial ones at the edges."""
    first = -(-start // PAGE) * PAGE
    return first, (start + size - first) // PAGE


def own_stack_low() -> int:
    """The lowest usable address of the calling thread's stack."""
    attr = (ctypes.c_char * 64)()
    _libc.pthread_getattr_np(ctypes.c_ulong(_libc.pthread_self()), attr)
    address, size = ctypes.c_void_p(), ctypes.c_size_t()
    _libc.pthread_attr_getstack(attr, ctypes.byref(address), ctypes.byref(size))
    _libc.pthread_attr_destroy(attr)
    return int(address.value or 0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("file")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--pages", type=int, default=128, help="pages per area per thread")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--per-iteration", type=int, default=24)
    parser.add_argument("--pause", type=float, default=0.002, help="seconds between iterations")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    threads, pages = args.threads, args.pages
    share = threads * pages * PAGE

    heap = bytearray(share + 2 * PAGE)  # the heap's slack: whole inner pages only
    heap_start, _ = inner_pages(address_of(heap), len(heap))
    anon = mmap.mmap(-1, share, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with open(args.file, "r+b") as backing:
        file_map = mmap.mmap(backing.fileno(), share, mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
    control = mmap.mmap(-1, PAGE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    control_address = address_of(control)
    for area in (anon, file_map):
        area[::PAGE] = bytes(share // PAGE)  # touch every page before tracking starts
    heap[::PAGE] = bytes(len(range(0, len(heap), PAGE)))

    areas: list[dict[str, int | str]] = []
    for kind, start in (("heap", heap_start), ("anon", address_of(anon)), ("file", address_of(file_map))):
        for thread in range(threads):
            areas.append({"kind": kind, "thread": thread, "start": start + thread * pages * PAGE, "npages": pages})

    stacks: dict[int, int] = {}
    ready = threading.Barrier(threads + 1)
    finished = threading.Barrier(threads + 1)
    go, leave = threading.Event(), threading.Event()
    stop_pages = 24  # the stack area starts this far above the guard, far below the stack pointer

    def writer(thread: int) -> None:
        low = own_stack_low() + stop_pages * PAGE
        stacks[thread] = low
        ctypes.memset(low, 0, pages * PAGE)
        ready.wait()
        go.wait()
        mine = [area for area in areas if area["thread"] == thread]
        targets = [int(area["start"]) + i * PAGE for area in mine for i in range(int(area["npages"]))]
        targets += [low + i * PAGE for i in range(pages)]
        rng = random.Random(args.seed * 1000 + thread)
        slot = control_address + thread * 8
        for iteration in range(1, args.iterations + 1):
            stamp = iteration.to_bytes(8, "little")
            for address in rng.sample(targets, args.per_iteration):
                ctypes.memmove(address, stamp, 8)
            ctypes.memmove(slot, stamp, 8)  # after the stamps: a reader seeing it sees them
            if args.pause:
                time.sleep(args.pause)
        finished.wait()
        leave.wait()  # keep the stack mapped until the checksum is taken and the tracker is done

    threading.stack_size(4 << 20)
    workers = [threading.Thread(target=writer, args=(t,), name=f"writer{t}") for t in range(threads)]
    for worker in workers:
        worker.start()
    ready.wait()
    for thread, low in sorted(stacks.items()):
        areas.append({"kind": "stack", "thread": thread, "start": low, "npages": pages})
    print(json.dumps({"pid": os.getpid(), "control": control_address, "areas": areas}), flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    began = time.perf_counter()
    go.set()
    finished.wait()
    digest = hashlib.sha256()
    for area in areas:
        digest.update(ctypes.string_at(int(area["start"]), int(area["npages"]) * PAGE))
    print(json.dumps({"checksum": digest.hexdigest(), "seconds": time.perf_counter() - began}), flush=True)
    sys.stdin.readline()  # "exit": the tracker may collect once more while we are still here
    leave.set()
    for worker in workers:
        worker.join()


if __name__ == "__main__":
    main()
