"""One exception family for everything KVM refuses, with messages that say what was wrong and what to do.

The kernel answers with a bare errno; the same errno means different things for different ioctls
(EINVAL from KVM_GET_DIRTY_LOG is "no such slot", from KVM_SET_USER_MEMORY_REGION "misaligned"), so
each wrapper in :mod:`dirtylog.kvm.system` chooses the exception and the words, and these classes let
callers catch the case they can act on.
"""

from __future__ import annotations

import errno as errno_codes
import os

from dirtylog.errors import DirtylogError


class KvmError(DirtylogError):
    """KVM refused an operation. ``errno`` is the kernel's answer, when there was one."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class KvmUnavailableError(KvmError):
    """``/dev/kvm`` cannot be used: missing, not permitted, or not a KVM device."""


class KvmCapabilityError(KvmError):
    """The host's KVM lacks a capability the operation needs."""


class GuestMemoryError(KvmError):
    """Guest memory that cannot be created or backed (size, alignment, host memory)."""


class MemorySlotError(KvmError):
    """A memory slot the kernel refused: overlap, alignment, slot number, too many slots."""


class VcpuError(KvmError):
    """A vCPU could not be created, set up or run."""


class DirtyLogError(KvmError):
    """A dirty-log operation the kernel refused."""


class NoSuchSlotError(DirtyLogError):
    """KVM_GET_DIRTY_LOG / KVM_CLEAR_DIRTY_LOG on a slot that does not exist (EINVAL, or ENOENT on
    kernels since the memslot rework)."""


class LoggingNotEnabledError(DirtyLogError):
    """A dirty-log operation on a slot without KVM_MEM_LOG_DIRTY_PAGES (ENOENT)."""


class DirtyLogRangeError(DirtyLogError):
    """KVM_CLEAR_DIRTY_LOG with a range the kernel does not accept (misaligned or past the slot)."""


class BadBufferError(DirtyLogError):
    """The kernel could not copy the dirty bitmap to or from the given buffer (EFAULT)."""


def describe_errno(code: int) -> str:
    """``EINVAL (Invalid argument)`` for an errno value."""
    return f"{errno_codes.errorcode.get(code, str(code))} ({os.strerror(code)})"
