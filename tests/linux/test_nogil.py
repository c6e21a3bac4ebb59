"""System calls from compiled code without the GIL: the intrinsic pinned against the kernel, the helpers, and
the point of it all — a fault of a thread that holds the GIL resolved by a compiled loop."""

from __future__ import annotations

import errno
import mmap
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from numba import njit

from dirtylog.linux import nogil
from dirtylog.linux.userfaultfd import Userfaultfd
from dirtylog.units import PAGE_SIZE


def test_the_intrinsic_makes_a_real_system_call() -> None:
    assert nogil.getpid() == os.getpid()


def test_pread_and_pwrite_round_trip_and_report_errno(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        data = np.arange(10000, dtype=np.uint8)
        assert nogil.pwrite(fd, data.ctypes.data, data.size, 123) == data.size
        back = np.zeros(data.size + 50, dtype=np.uint8)
        assert nogil.pread(fd, back.ctypes.data, back.size, 123) == data.size  # short only at end of file
        assert (back[:data.size] == data).all()
        assert os.pread(fd, 5, 123) == bytes(data[:5])
    finally:
        os.close(fd)
    assert nogil.pread(fd, back.ctypes.data, 8, 0) == -errno.EBADF
    assert nogil.pwrite(fd, back.ctypes.data, 8, 0) == -errno.EBADF


def test_pwritev_gathers_buffers_into_one_stretch_of_the_file(tmp_path: Path) -> None:
    parts = [np.full(size, value, dtype=np.uint8) for size, value in ((4096, 1), (100, 2), (70000, 3))]
    iovecs = np.array([[part.ctypes.data, part.size] for part in parts], dtype=np.int64).ravel()
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert nogil.pwritev(fd, iovecs, len(parts), 8192) == sum(part.size for part in parts)
        assert os.pread(fd, 80000, 8192) == b"".join(part.tobytes() for part in parts)
        assert os.pread(fd, 8192, 0) == bytes(8192)  # a hole before it
    finally:
        os.close(fd)
    assert nogil.pwritev(fd, iovecs, 1, 0) == -errno.EBADF


def test_poll_sees_a_readable_pipe_and_a_timeout() -> None:
    scratch = np.zeros(4, dtype=np.int64)
    reader, writer = os.pipe()
    try:
        assert nogil.poll_in(reader, 1_000_000, scratch) == 0
        os.write(writer, b"x")
        assert nogil.poll_in(reader, 0, scratch) == 1
    finally:
        os.close(reader)
        os.close(writer)


def test_the_clock_is_time_monotonic() -> None:
    before = time.monotonic_ns()
    now = nogil.monotonic_ns(np.zeros(2, dtype=np.int64))
    assert before <= now <= time.monotonic_ns()


def test_peek_reads_a_word_at_an_address() -> None:
    words = np.array([3, 1 << 63, 7], dtype=np.uint64)

    @njit
    def second(address: int) -> int:
        return nogil.peek_u64(address + 8)

    assert second(words.ctypes.data) == 1 << 63


@njit(nogil=True)
def _serve_one_fault(uffd: int, source: np.ndarray, scratch: np.ndarray, messages: np.ndarray,
                     running: np.ndarray) -> int:
    """Wait for one missing-page fault and install ``source`` there; returns 0 or -errno."""
    running[0] = 1
    ready = nogil.poll_in(uffd, 5_000_000_000, scratch)
    if ready <= 0:
        return -errno.ETIMEDOUT if ready == 0 else ready
    count = nogil.read_messages(uffd, messages)
    if count <= 0:
        return -errno.EIO if count == 0 else count
    page = int(messages[2]) & ~(PAGE_SIZE - 1)
    return nogil.uffd_copy(uffd, page, source.ctypes.data, PAGE_SIZE, 0, scratch)


def test_a_compiled_loop_serves_a_fault_of_a_thread_that_holds_the_gil() -> None:
    """The deadlock this module exists to avoid: the main thread reads a missing page with NumPy (holding the
    GIL); a Python handler could never run, the compiled one does."""
    area = mmap.mmap(-1, 4 * PAGE_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory = np.frombuffer(area, dtype=np.uint8)
    source = np.full(PAGE_SIZE, 0x5A, dtype=np.uint8)
    with Userfaultfd.create() as uffd:
        uffd.api(0)
        uffd.register(memory.ctypes.data, memory.size, missing=True)
        result: list[int] = []
        running = np.zeros(1, dtype=np.int64)
        server = threading.Thread(target=lambda: result.append(_serve_one_fault(
            uffd.fd, source, np.zeros(8, dtype=np.int64), np.zeros(4 * 64, dtype=np.uint64), running)), daemon=True)
        server.start()
        while not running[0]:  # until then the loop needs the GIL (to be compiled and called)
            time.sleep(0.001)
        assert int(memory[PAGE_SIZE + 17]) == 0x5A  # faults here, with the GIL held
        server.join(5)
        assert result == [0]
    del memory
    area.close()


def test_uffd_helpers_report_errno_for_a_closed_fd() -> None:
    scratch = np.zeros(8, dtype=np.int64)
    assert nogil.uffd_copy(-1, 0, 0, PAGE_SIZE, 0, scratch) == -errno.EBADF
    assert nogil.uffd_zeropage(-1, 0, PAGE_SIZE, scratch) == -errno.EBADF
    assert nogil.uffd_writeprotect(-1, 0, PAGE_SIZE, True, scratch) == -errno.EBADF
    assert nogil.uffd_wake(-1, 0, PAGE_SIZE, scratch) == -errno.EBADF


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_system_call_numbers_are_the_kernels(machine: str) -> None:
    # Pinned from arch/x86/entry/syscalls/syscall_64.tbl and include/uapi/asm-generic/unistd.h.
    expected = {"x86_64": {"read": 0, "write": 1, "pread64": 17, "pwrite64": 18, "pwritev": 296, "ioctl": 16,
                           "ppoll": 271, "getpid": 39, "clock_gettime": 228},
                "aarch64": {"read": 63, "write": 64, "pread64": 67, "pwrite64": 68, "pwritev": 70, "ioctl": 29,
                            "ppoll": 73, "getpid": 172, "clock_gettime": 113}}[machine]
    column = 1 if machine == "aarch64" else 0
    assert {name: numbers[column] for name, numbers in nogil._NUMBERS.items()} == expected
