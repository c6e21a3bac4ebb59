"""``ioctl(2)`` for KVM file descriptors."""

from __future__ import annotations

import ctypes
import fcntl


def ioctl(fd: int, request: int, arg: int | ctypes.Structure | bytearray = 0) -> int:
    """Call ``ioctl`` and return its result; structures and buffers are passed by address.

    ``fcntl.ioctl`` releases the GIL for the call, so vCPU threads in ``KVM_RUN`` run in parallel.
    Integer arguments are packed as a C ``int``: pass larger values inside a structure.
    """
    if isinstance(arg, int):
        return fcntl.ioctl(fd, request, arg)
    return fcntl.ioctl(fd, request, arg, True)  # type: ignore[no-any-return]
