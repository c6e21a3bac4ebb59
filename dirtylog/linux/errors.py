"""What the Linux interfaces below the trackers refuse, said in words a user can act on.

As with KVM, the kernel answers with a bare errno whose meaning depends on the call (EPERM from
``userfaultfd()`` is a sysctl, from ``ptrace`` a permission, from ``PAGEMAP_SCAN`` an unregistered VMA), so
each wrapper picks the exception and the words; these classes let callers catch the case they can act on.
"""

from __future__ import annotations

import errno as errno_codes
import os

from dirtylog.errors import DirtylogError


class LinuxError(DirtylogError):
    """The kernel refused an operation. ``errno`` is its answer, when there was one."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


class KernelFeatureError(LinuxError):
    """The running kernel lacks an interface or a feature; the message names the kernel that has it."""


class UserfaultfdError(LinuxError):
    """A userfaultfd operation the kernel refused."""


class UserfaultfdPermissionError(UserfaultfdError):
    """``userfaultfd()`` is not allowed to this process (``vm.unprivileged_userfaultfd``, seccomp)."""


class RangeBusyError(UserfaultfdError):
    """UFFDIO_REGISTER on memory another userfaultfd already has registered (EBUSY)."""


class PagemapError(LinuxError):
    """``PAGEMAP_SCAN`` or a ``/proc/PID/pagemap`` read the kernel refused."""


class NotRegisteredError(PagemapError):
    """``PAGEMAP_SCAN`` with ``PM_SCAN_CHECK_WPASYNC`` met memory not registered for async write-protect."""


class ProcessError(LinuxError):
    """A process that cannot be inspected or acted on."""


class NoSuchProcessError(ProcessError):
    """The pid names no process (it never existed, or it is gone)."""


class ProcessExitedError(ProcessError):
    """The process exited while we were working on it."""


class PtraceError(ProcessError):
    """ptrace refused, or the traced thread did something we did not expect."""


class PtraceNotPermittedError(PtraceError):
    """We may not ptrace the process: another user's process, Yama's ptrace_scope, or no CAP_SYS_PTRACE."""


class InjectionError(PtraceError):
    """A system call injected into a process failed or could not be run."""


def describe_errno(code: int) -> str:
    """``EPERM (Operation not permitted)`` for an errno value."""
    return f"{errno_codes.errorcode.get(code, str(code))} ({os.strerror(code)})"
