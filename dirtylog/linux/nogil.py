"""System calls from compiled code that never takes the GIL: the one way to serve userfaultfd faults from Python.

A userfaultfd handler written in Python deadlocks as soon as any *other* Python thread touches a page the
handler must resolve: that thread blocks inside the page fault while holding the GIL, and the handler needs
the GIL to resolve it. In dirtylog every host-side access to guest RAM (``machine.progress``, ``m.memory``,
``m.write``) is such a touch. So the loops that resolve faults (lazy restore, live snapshots) are compiled
with Numba in ``nogil`` mode and make their system calls here, without ctypes and without the GIL.

:func:`syscall6` is a Numba intrinsic that emits the architecture's system-call instruction (``syscall`` on
x86-64, ``svc #0`` on arm64) as inline assembly, so compiled code that uses it is cached on disk like any
other (ctypes function pointers would make Numba refuse the cache: their addresses change per process).
It returns what the kernel returns: a result, or ``-errno``. The helpers below wrap the calls the fault
loops need; every one returns ``-errno`` on failure, never raises.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from typing import Any, Final, cast

import llvmlite.binding
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from dirtylog.linux import abi

# Numba initialises LLVM's code generator but not its assembly parser, which inline assembly needs.
llvmlite.binding.initialize_native_asmparser()

_MACHINE: Final = platform.machine()
#: System call numbers: (x86-64, arm64's generic table).
_NUMBERS: Final = {"read": (0, 63), "write": (1, 64), "pread64": (17, 67), "pwrite64": (18, 68), "pwritev": (296, 70),
                   "ioctl": (16, 29),
                   "ppoll": (271, 73), "getpid": (39, 172), "clock_gettime": (228, 113)}
_ARM64: Final = _MACHINE in ("aarch64", "arm64")
if _MACHINE not in ("x86_64", "aarch64", "arm64"):  # pragma: no cover - the hosts dirtylog runs on
    raise ImportError(f"dirtylog.linux.nogil knows the system calls of x86-64 and arm64, not {_MACHINE}")

SYS_READ: Final = _NUMBERS["read"][_ARM64]
SYS_WRITE: Final = _NUMBERS["write"][_ARM64]
SYS_PREAD64: Final = _NUMBERS["pread64"][_ARM64]
SYS_PWRITE64: Final = _NUMBERS["pwrite64"][_ARM64]
SYS_PWRITEV: Final = _NUMBERS["pwritev"][_ARM64]
SYS_IOCTL: Final = _NUMBERS["ioctl"][_ARM64]
SYS_PPOLL: Final = _NUMBERS["ppoll"][_ARM64]
SYS_GETPID: Final = _NUMBERS["getpid"][_ARM64]
SYS_CLOCK_GETTIME: Final = _NUMBERS["clock_gettime"][_ARM64]
CLOCK_MONOTONIC: Final = 1  # time.monotonic()'s clock

if _ARM64:
    _ASM, _CONSTRAINTS = "svc #0", "={x0},{x8},{x0},{x1},{x2},{x3},{x4},{x5},~{memory}"
else:
    _ASM, _CONSTRAINTS = "syscall", "={rax},{rax},{rdi},{rsi},{rdx},{r10},{r8},{r9},~{rcx},~{r11},~{memory}"

EAGAIN: Final = 11
EINTR: Final = 4
EEXIST: Final = 17
ETIMEDOUT: Final = 110
POLLIN: Final = 1
POLLOUT: Final = 4

UFFDIO_COPY: Final = abi.UFFDIO_COPY
UFFDIO_ZEROPAGE: Final = abi.UFFDIO_ZEROPAGE
UFFDIO_WRITEPROTECT: Final = abi.UFFDIO_WRITEPROTECT
UFFDIO_WAKE: Final = abi.UFFDIO_WAKE
UFFD_EVENT_PAGEFAULT: Final = abi.UFFD_EVENT_PAGEFAULT
UFFD_MSG_WORDS: Final = abi.UFFD_MSG_SIZE // 8
_RETRIES: Final = 1000


def _syscall6(typingctx: Any, nr: Any, a: Any, b: Any, c: Any, d: Any, e: Any, f: Any) -> Any:
    signature = types.int64(*([types.int64] * 7))

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        i64 = ir.IntType(64)
        args = [context.cast(builder, value, argtype, types.int64) for value, argtype in zip(args, sig.args,
                                                                                             strict=True)]
        return builder.asm(ir.FunctionType(i64, [i64] * 7), _ASM, _CONSTRAINTS, args, side_effect=True)

    return signature, codegen


#: ``syscall6(nr, a, b, c, d, e, f)``: the system call as one instruction, for compiled code only; int64
#: arguments; returns the kernel's result or -errno.
syscall6 = cast(Callable[[int, int, int, int, int, int, int], int], intrinsic(_syscall6))


@njit(cache=True, nogil=True)
def getpid() -> int:
    """The process id, through :func:`syscall6` (what the tests pin the intrinsic with)."""
    return syscall6(SYS_GETPID, 0, 0, 0, 0, 0, 0)


def _store_fence(typingctx: Any) -> Any:
    signature = types.void()

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        builder.fence("release")
        return context.get_dummy_value()

    return signature, codegen


#: ``store_fence()``: stores before it are visible before stores after it (compiled code only): a record
#: written, then the counter that publishes it to a thread reading both without a lock.
store_fence = cast(Callable[[], None], intrinsic(_store_fence))


def _peek_u64(typingctx: Any, address: Any) -> Any:
    signature = types.uint64(types.int64)

    def codegen(context: Any, builder: Any, sig: Any, args: Any) -> Any:
        address = context.cast(builder, args[0], sig.args[0], types.int64)
        return builder.load(builder.inttoptr(address, ir.IntType(64).as_pointer()))

    return signature, codegen


#: ``peek_u64(address)``: the 64-bit word at ``address`` (compiled code only): reads arrays that live in
#: mappings of their own (a snapshot file's index) without building a container of them.
peek_u64 = cast(Callable[[int], int], intrinsic(_peek_u64))


@njit(cache=True, nogil=True)
def monotonic_ns(scratch: np.ndarray) -> int:
    """CLOCK_MONOTONIC in nanoseconds, the clock of Python's ``time.monotonic_ns()``; ``scratch``: 2 int64."""
    syscall6(SYS_CLOCK_GETTIME, CLOCK_MONOTONIC, scratch.ctypes.data, 0, 0, 0, 0)
    return int(scratch[0] * 1_000_000_000 + scratch[1])


@njit(cache=True, nogil=True)
def pread(fd: int, address: int, count: int, offset: int) -> int:
    """Read ``count`` bytes at file ``offset`` to ``address``, retrying short reads and EINTR; returns the
    bytes read (fewer only at end of file) or -errno."""
    done = 0
    while done < count:
        got = syscall6(SYS_PREAD64, fd, address + done, count - done, offset + done, 0, 0)
        if got == -EINTR:
            continue
        if got < 0:
            return got
        if got == 0:
            break
        done += got
    return done


@njit(cache=True, nogil=True)
def pwrite(fd: int, address: int, count: int, offset: int) -> int:
    """Write ``count`` bytes from ``address`` at file ``offset``, retrying short writes and EINTR; returns
    ``count`` or -errno (ENOSPC, EFBIG, EIO: what the disk said)."""
    done = 0
    while done < count:
        put = syscall6(SYS_PWRITE64, fd, address + done, count - done, offset + done, 0, 0)
        if put == -EINTR:
            continue
        if put < 0:
            return put
        done += put
    return done


@njit(cache=True, nogil=True)
def pwritev(fd: int, iovecs: np.ndarray, count: int, offset: int) -> int:
    """Write the ``count`` buffers of ``iovecs`` (int64 pairs: address, length, as ``struct iovec``) one after
    the other at file ``offset``, retrying short writes and EINTR; returns the bytes written or -errno. The
    entries are consumed (adjusted in place) as they are written."""
    total = 0
    first = 0
    while first < count:
        put = syscall6(SYS_PWRITEV, fd, iovecs.ctypes.data + 16 * first, count - first, offset + total, 0, 0)
        if put == -EINTR:
            continue
        if put < 0:
            return put
        total += put
        while first < count and put >= iovecs[2 * first + 1]:  # skip the buffers written whole
            put -= iovecs[2 * first + 1]
            first += 1
        if first < count and put:
            iovecs[2 * first] += put
            iovecs[2 * first + 1] -= put
    return total


@njit(cache=True, nogil=True)
def poll_in(fd: int, timeout_ns: int, scratch: np.ndarray) -> int:
    """Whether ``fd`` is readable within ``timeout_ns`` (0: now): 1, 0, or -errno. ``scratch``: 4 int64."""
    return poll_for(fd, POLLIN, timeout_ns, scratch)


@njit(cache=True, nogil=True)
def poll_for(fd: int, events: int, timeout_ns: int, scratch: np.ndarray) -> int:
    """Whether ``fd`` is ready for ``events`` (POLLIN, POLLOUT) within ``timeout_ns``, or has hung up or failed
    (POLLHUP, POLLERR are always reported): 1, 0, or -errno. ``scratch``: 4 int64."""
    scratch[0] = fd | (events << 32)  # struct pollfd {int fd; short events; short revents}
    scratch[1] = timeout_ns // 1_000_000_000
    scratch[2] = timeout_ns % 1_000_000_000
    address = scratch.ctypes.data
    while True:
        ready = syscall6(SYS_PPOLL, address, 1, address + 8, 0, 8, 0)
        if ready != -EINTR:
            return ready


@njit(cache=True, nogil=True)
def read_messages(fd: int, messages: np.ndarray) -> int:
    """Read pending ``uffd_msg`` records into ``messages`` (uint64, 4 words each); returns how many (0 when
    none is pending on a non-blocking fd), or -errno."""
    got = syscall6(SYS_READ, fd, messages.ctypes.data, messages.size * 8, 0, 0, 0)
    if got == -EAGAIN:
        return 0
    if got < 0:
        return got
    return got // (UFFD_MSG_WORDS * 8)


@njit(cache=True, nogil=True)
def uffd_copy(fd: int, dst: int, src: int, length: int, mode: int, scratch: np.ndarray) -> int:
    """UFFDIO_COPY ``length`` bytes from ``src`` to missing memory at ``dst``; 0 or -errno. ``scratch``: 5 int64."""
    done = 0
    for _ in range(_RETRIES):  # EAGAIN: the address space changed under the call; go on from where it stopped
        scratch[0] = dst + done
        scratch[1] = src + done
        scratch[2] = length - done
        scratch[3] = mode
        scratch[4] = 0
        result = syscall6(SYS_IOCTL, fd, UFFDIO_COPY, scratch.ctypes.data, 0, 0, 0)
        if scratch[4] > 0:
            done += scratch[4]
        if result == 0 or done == length:
            return 0
        if result != -EAGAIN:
            return result
    return -EAGAIN


@njit(cache=True, nogil=True)
def uffd_zeropage(fd: int, start: int, length: int, scratch: np.ndarray) -> int:
    """UFFDIO_ZEROPAGE: map the zero page over missing memory ``[start, start + length)``; 0 or -errno."""
    done = 0
    for _ in range(_RETRIES):
        scratch[0] = start + done
        scratch[1] = length - done
        scratch[2] = 0
        scratch[3] = 0
        result = syscall6(SYS_IOCTL, fd, UFFDIO_ZEROPAGE, scratch.ctypes.data, 0, 0, 0)
        if scratch[3] > 0:
            done += scratch[3]
        if result == 0 or done == length:
            return 0
        if result != -EAGAIN:
            return result
    return -EAGAIN


@njit(cache=True, nogil=True)
def uffd_writeprotect(fd: int, start: int, length: int, protect: bool, scratch: np.ndarray) -> int:
    """UFFDIO_WRITEPROTECT the range, or lift its protection (which wakes its waiters); 0 or -errno."""
    scratch[0] = start
    scratch[1] = length
    scratch[2] = 1 if protect else 0  # UFFDIO_WRITEPROTECT_MODE_WP
    for _ in range(_RETRIES):
        result = syscall6(SYS_IOCTL, fd, UFFDIO_WRITEPROTECT, scratch.ctypes.data, 0, 0, 0)
        if result != -EAGAIN:
            return result
    return -EAGAIN


@njit(cache=True, nogil=True)
def uffd_wake(fd: int, start: int, length: int, scratch: np.ndarray) -> int:
    """UFFDIO_WAKE the threads waiting on faults in the range; 0 or -errno."""
    scratch[0] = start
    scratch[1] = length
    return syscall6(SYS_IOCTL, fd, UFFDIO_WAKE, scratch.ctypes.data, 0, 0, 0)


@njit(cache=True, nogil=True)
def read_some(fd: int, address: int, count: int) -> int:
    """Read up to ``count`` bytes from ``fd`` to ``address``: the bytes read (0 at end of file), -EAGAIN when a
    non-blocking fd has none, or -errno; retries EINTR."""
    while True:
        got = syscall6(SYS_READ, fd, address, count, 0, 0, 0)
        if got != -EINTR:
            return got


@njit(cache=True, nogil=True)
def write_all(fd: int, address: int, count: int, timeout_ns: int, scratch: np.ndarray) -> int:
    """Write ``count`` bytes from ``address`` to ``fd`` (a socket, blocking or not), waiting up to ``timeout_ns``
    each time it is full; ``count``, -ETIMEDOUT, or -errno. ``scratch``: 4 int64."""
    done = 0
    while done < count:
        put = syscall6(SYS_WRITE, fd, address + done, count - done, 0, 0, 0)
        if put == -EINTR:
            continue
        if put == -EAGAIN:
            ready = poll_for(fd, POLLOUT, timeout_ns, scratch)
            if ready == 0:
                return -ETIMEDOUT
            if ready < 0:
                return ready
            continue
        if put < 0:
            return put
        done += put
    return done
