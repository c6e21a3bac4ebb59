"""Parsing /proc/PID/maps and reading what /proc says about processes."""

from __future__ import annotations

import mmap
import os
import threading

import numpy as np

from dirtylog.linux import procfs
from dirtylog.linux.userfaultfd import Userfaultfd
from dirtylog.units import PAGE_SIZE

SAMPLE = b"""\
55d0c1a00000-55d0c1a21000 rw-p 00000000 00:00 0                          [heap]
7f0000000000-7f0000100000 rw-p 00000000 00:00 0
7f0000100000-7f0000200000 rw-p 00002000 fe:00 4242                       /tmp/a file with spaces (deleted)
7f0000200000-7f0000201000 r-xp 00000000 00:00 0                          [vdso]
7ffc00000000-7ffc00021000 rw-p 00000000 00:00 0                          [stack]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
"""


def test_parse_maps_keeps_the_kernel_names() -> None:
    mappings = procfs.parse_maps(SAMPLE)
    assert [m.name for m in mappings] == ["[heap]", "anon", "/tmp/a file with spaces (deleted)", "[vdso]",
                                          "[stack]", "[vsyscall]"]
    assert [m.kind for m in mappings] == ["heap", "anon", "file", "special", "stack", "special"]
    heap, anon, file, vdso = mappings[:4]
    assert (heap.start, heap.end, heap.npages) == (0x55D0C1A00000, 0x55D0C1A21000, 0x21)
    assert file.offset == 0x2000 and file.inode == 4242 and file.dev == "fe:00"
    assert anon.writable and anon.private and not anon.executable and vdso.executable
    assert mappings[-1].end == 0xFFFFFFFFFF601000
    assert [m.name for m in procfs.parse_maps(SAMPLE, writable_private_only=True)] == [
        "[heap]", "anon", "/tmp/a file with spaces (deleted)", "[stack]"]
    assert heap.label == "[heap]@0x55d0c1a00000"


def test_read_maps_finds_a_fresh_mapping() -> None:
    area = mmap.mmap(-1, 3 * PAGE_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = np.frombuffer(area, dtype=np.uint8).ctypes.data
    [mapping] = [m for m in procfs.read_maps("self") if m.start <= start < m.end]
    assert mapping.writable and mapping.private and mapping.name == "anon"
    reader = procfs.MapsReader(os.getpid())
    first = reader.mappings(writable_private_only=True)
    second = reader.mappings(writable_private_only=True)
    assert first == second and all(a is b for a, b in zip(first, second, strict=True))  # parsed once
    reader.close()


def test_status_threads_and_userfaultfds_of_this_process() -> None:
    assert procfs.status("self")["Tgid"] == str(os.getpid())
    event = threading.Event()
    thread = threading.Thread(target=event.wait)
    thread.start()
    try:
        tids = procfs.threads(os.getpid())
        assert tids[0] == os.getpid() and thread.native_id in tids
    finally:
        event.set()
        thread.join()
    with Userfaultfd.create() as uffd:
        assert uffd.fd in procfs.userfaultfd_fds("self")
    assert procfs.process_exists(os.getpid()) and not procfs.process_exists(2**22 + 1)


def test_memory_reader_reads_this_process() -> None:
    data = np.frombuffer(b"dirty pages!", dtype=np.uint8)
    assert procfs.read_memory("self", data.ctypes.data, 12) == b"dirty pages!"
