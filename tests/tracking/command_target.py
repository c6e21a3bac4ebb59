"""A process driven line by line on stdin, for tests of mappings that come and go under a tracker.

Commands (each answered by one line on stdout):

* ``map N`` — a new anonymous private mapping of N pages, untouched; answers its address;
* ``mapshared N`` — the same, shared (``MAP_SHARED | MAP_ANONYMOUS``);
* ``write ADDR N`` — write the first 8 bytes of N pages from ADDR; answers ``ok``;
* ``unmap ADDR N`` / ``remap ADDR N`` — unmap it / unmap it and map fresh memory at the same place;
* ``churn ADDR N`` — start a thread that maps fresh memory over the mapping again and again, as fast as it
  can, writing its first page each time (a heap top that malloc trims and grows back behaves so); answers
  ``ok``; ``calm`` stops it and answers how many times it replaced the mapping;
* ``grow N`` — grow the brk heap by N pages and write them; answers the address of the new pages;
* ``thread N`` — start a thread that writes N pages of its own stack and then waits; answers the address;
* ``uffd`` — create a userfaultfd of our own (and keep it); answers its fd;
* ``exit``.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading

PAGE = 4096
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
libc.sbrk.restype = ctypes.c_void_p
libc.sbrk.argtypes = [ctypes.c_long]
libc.syscall.restype = ctypes.c_long
libc.pthread_self.restype = ctypes.c_ulong
PROT_RW, MAP_PRIVATE_ANON, MAP_SHARED_ANON, MAP_FIXED = 3, 0x22, 0x21, 0x10


def write_pages(address: int, count: int) -> None:
    for page in range(count):
        ctypes.memmove(address + page * PAGE, (page + 1).to_bytes(8, "little"), 8)


def stack_low() -> int:
    attr = (ctypes.c_char * 64)()
    libc.pthread_getattr_np(ctypes.c_ulong(libc.pthread_self()), attr)
    address, size = ctypes.c_void_p(), ctypes.c_size_t()
    libc.pthread_attr_getstack(attr, ctypes.byref(address), ctypes.byref(size))
    return int(address.value or 0) + 16 * PAGE


def stack_writer(count: int, where: list[int], started: threading.Event, release: threading.Event) -> None:
    """Write ``count`` pages of this thread's own stack, say where, and wait."""
    low = stack_low()
    write_pages(low, count)
    where.append(low)
    started.set()
    release.wait()


def churn(address: int, count: int, stop: threading.Event, replaced: list[int]) -> None:
    """Replace ``[address, address + count pages)`` with fresh memory until ``stop`` is set."""
    while not stop.is_set():
        libc.mmap(address, count * PAGE, PROT_RW, MAP_PRIVATE_ANON | MAP_FIXED, -1, 0)
        ctypes.memmove(address, b"churned!", 8)
        replaced[0] += 1


def main() -> None:
    keep: list[object] = []
    churning: list[tuple[threading.Thread, threading.Event, list[int]]] = []
    print("ready", flush=True)
    for line in sys.stdin:
        command, *args = line.split()
        numbers = [int(arg, 0) for arg in args]
        if command == "map":
            reply = str(libc.mmap(None, numbers[0] * PAGE, PROT_RW, MAP_PRIVATE_ANON, -1, 0))
        elif command == "mapshared":
            reply = str(libc.mmap(None, numbers[0] * PAGE, PROT_RW, MAP_SHARED_ANON, -1, 0))
        elif command == "write":
            write_pages(numbers[0], numbers[1])
            reply = "ok"
        elif command == "unmap":
            libc.munmap(numbers[0], numbers[1] * PAGE)
            reply = "ok"
        elif command == "remap":
            libc.munmap(numbers[0], numbers[1] * PAGE)
            reply = str(libc.mmap(numbers[0], numbers[1] * PAGE, PROT_RW, MAP_PRIVATE_ANON | MAP_FIXED, -1, 0))
        elif command == "churn":
            stop, replaced = threading.Event(), [0]
            churner = threading.Thread(target=churn, args=(numbers[0], numbers[1], stop, replaced), daemon=True)
            churner.start()
            churning.append((churner, stop, replaced))
            reply = "ok"
        elif command == "calm":
            churner, stop, replaced = churning.pop()
            stop.set()
            churner.join()
            reply = str(replaced[0])
        elif command == "grow":
            start = libc.sbrk(numbers[0] * PAGE)
            write_pages(start, numbers[0])
            reply = str(start)
        elif command == "thread":
            started, release = threading.Event(), threading.Event()
            where: list[int] = []
            threading.stack_size(1 << 20)
            worker = threading.Thread(target=stack_writer, args=(numbers[0], where, started, release), daemon=True)
            worker.start()
            started.wait()
            keep.append(release)
            reply = str(where[0])
        elif command == "uffd":
            fd = libc.syscall(323, os.O_CLOEXEC | 1)  # userfaultfd(UFFD_USER_MODE_ONLY)
            reply = str(fd)
        elif command == "exit":
            return
        else:
            reply = f"unknown command {command}"
        print(reply, flush=True)


if __name__ == "__main__":
    main()
