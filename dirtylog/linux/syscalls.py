"""System calls Python's ``os`` module does not offer, through libc's ``syscall(2)`` with ``c_long`` arguments.

``ctypes`` would otherwise pass Python ints as C ``int``, truncating addresses; every argument here is a
``c_long`` and the result is checked the way libc reports it (-1 and ``errno``).
"""

from __future__ import annotations

import ctypes
import os

from dirtylog.linux import abi

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def syscall(number: int, *args: int) -> int:
    """Call system call ``number`` with integer ``args``; raises :class:`OSError` with the kernel's errno."""
    result = int(_syscall(ctypes.c_long(number), *(ctypes.c_long(arg) for arg in args)))
    if result == -1:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    return result


def userfaultfd(flags: int) -> int:
    """``userfaultfd(flags)``: a new userfaultfd for this process's memory."""
    return syscall(abi.SYS_userfaultfd, flags)


def pidfd_open(pid: int) -> int:
    """A pidfd for ``pid`` (Linux 5.3); it becomes readable when the process exits."""
    return os.pidfd_open(pid)


def pidfd_getfd(pidfd: int, target_fd: int) -> int:
    """A duplicate, in this process, of file descriptor ``target_fd`` of the process behind ``pidfd``
    (Linux 5.6; needs ptrace access to it). The new fd is close-on-exec."""
    return syscall(abi.SYS_pidfd_getfd, pidfd, target_fd, 0)


def ptrace(request: int, pid: int, addr: int = 0, data: int = 0) -> int:
    """The raw ``ptrace`` system call (not glibc's wrapper, whose PEEK requests differ)."""
    return syscall(abi.SYS_ptrace, request, pid, addr, data)


def process_madvise(pidfd: int, iovec: int, count: int, advice: int) -> int:
    """``process_madvise(pidfd, iovec, count, advice, 0)`` (Linux 5.10; every advice on one's own memory since
    6.13): ``count`` ``struct iovec`` at address ``iovec``; returns the bytes advised."""
    return syscall(abi.SYS_process_madvise, pidfd, iovec, count, advice, 0)
