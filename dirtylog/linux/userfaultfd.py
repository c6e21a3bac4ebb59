"""userfaultfd(2): one object per fd, one method per ioctl, fault messages as NumPy records.

A userfaultfd lets a process handle page faults of memory ranges registered with it:

* **missing** mode (``register(..., missing=True)``): a thread touching a page that is not there blocks
  in the kernel until the handler installs one (:meth:`Userfaultfd.copy`, :meth:`Userfaultfd.zeropage`)
  or :meth:`Userfaultfd.wake` s it. Post-copy migration and lazy restore are built on it (QEMU's
  postcopy registers guest RAM this way; a vCPU touching a missing page waits in KVM).
* **write-protect** mode (``wp=True``) with :meth:`Userfaultfd.writeprotect`: a write to a protected page
  blocks until the handler removes the protection (``protect=False``, which wakes the writer); live
  snapshots save the old page first. With the ``WP_ASYNC`` feature (Linux 6.7) the kernel resolves such
  faults itself, only clearing the page's protection, and ``PAGEMAP_SCAN`` reads and re-arms them: dirty
  tracking without a handler thread (:mod:`dirtylog.tracking.process`).

The fd acts on the memory of the process that *created* it, whoever holds it later: a tracker may hold
one created inside another process (:meth:`Userfaultfd.adopt`, with the fd from ``pidfd_getfd``).

Before anything else an fd needs the API handshake (:meth:`Userfaultfd.api`), once, naming the
features wanted; a missing feature is refused with the kernel version that has it.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import select
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import numpy as np
import numpy.typing as npt

from dirtylog.linux import abi
from dirtylog.linux.errors import (
    KernelFeatureError,
    ProcessExitedError,
    RangeBusyError,
    UserfaultfdError,
    UserfaultfdPermissionError,
    describe_errno,
)
from dirtylog.linux.syscalls import userfaultfd
from dirtylog.units import PAGE_SIZE

Buffer = bytes | bytearray | memoryview | npt.NDArray[np.uint8]


def feature_names(features: int) -> list[str]:
    """``UFFD_FEATURE_*`` names of the bits set in ``features``."""
    return [name for bit, (name, _) in abi.UFFD_FEATURES.items() if features & bit]


def ioctl_names(ioctls: int) -> list[str]:
    """``UFFDIO_*`` names of the bits set in an ``ioctls`` answer of UFFDIO_API or UFFDIO_REGISTER."""
    return [name for bit, name in abi.UFFD_IOCTL_NAMES.items() if ioctls >> bit & 1]


def _missing_features_message(missing: int) -> str:
    parts = [f"UFFD_FEATURE_{name} (Linux {since})" for bit, (name, since) in abi.UFFD_FEATURES.items()
             if missing & bit]
    unknown = missing & ~sum(abi.UFFD_FEATURES)
    if unknown:
        parts.append(f"unknown feature bits {unknown:#x}")
    return (f"this kernel (Linux {os.uname().release}) lacks userfaultfd feature(s) " + ", ".join(parts)
            + "; run on a kernel that has them")


@dataclass(frozen=True)
class PageFault:
    """A ``UFFD_EVENT_PAGEFAULT`` message: a thread waits on ``address`` until the handler resolves it."""

    address: int  # the faulting address, rounded down to its page unless EXACT_ADDRESS was asked for
    write: bool  # a write fault
    wp: bool  # a write to a write-protected page (WP mode), not a missing page
    minor: bool  # a minor fault (MINOR mode)
    thread_id: int  # the faulting thread, when THREAD_ID was asked for (else 0)

    @property
    def page(self) -> int:
        return self.address & ~(PAGE_SIZE - 1)


@dataclass(frozen=True)
class ApiInfo:
    """The answer to the API handshake."""

    features: int  # what the fd now does: the features asked for (and those they imply)
    available: int  # what this kernel offers
    ioctls: int  # which ioctls the fd accepts

    @property
    def feature_names(self) -> list[str]:
        return feature_names(self.features)


def available_features() -> int:
    """Every userfaultfd feature this kernel offers (asked on a throwaway fd)."""
    with Userfaultfd.create(user_mode_only=True) as probe:
        request = abi.uffdio_api(api=abi.UFFD_API, features=0)
        probe._ioctl(abi.UFFDIO_API, request, "UFFDIO_API")
        return int(request.features)


class Userfaultfd:
    """An open userfaultfd. Create one with :meth:`create` (for this process's memory) or :meth:`adopt`."""

    def __init__(self, fd: int, *, owner: str = "this process") -> None:
        self.fd = fd
        self.owner = owner  # whose memory the fd acts on, for messages
        self.info: ApiInfo | None = None

    # --- creation ---------------------------------------------------------------------------------

    @classmethod
    def create(cls, *, cloexec: bool = True, nonblock: bool = True, user_mode_only: bool = False) -> Self:
        """A new userfaultfd for this process's memory.

        ``user_mode_only`` (Linux 5.11) handles faults from user space only; it is what an unprivileged
        process may create when ``vm.unprivileged_userfaultfd`` is 0. Faults the kernel takes on the
        process's behalf — a ``read()`` into registered memory, KVM touching guest RAM — then fail with
        EFAULT instead of waiting (asynchronous write-protect is resolved before that rule applies, so
        dirty tracking sees them either way). ``nonblock`` makes :meth:`read_messages` return at once.
        """
        flags = (os.O_CLOEXEC if cloexec else 0) | (os.O_NONBLOCK if nonblock else 0)
        flags |= abi.UFFD_USER_MODE_ONLY if user_mode_only else 0
        try:
            return cls(userfaultfd(flags))
        except OSError as error:
            if error.errno == errno.ENOSYS:
                raise KernelFeatureError(f"this kernel (Linux {os.uname().release}) has no userfaultfd "
                                         "(CONFIG_USERFAULTFD is off)", error.errno) from None
            if error.errno != errno.EPERM:
                raise UserfaultfdError(f"userfaultfd() failed: {describe_errno(error.errno or 0)}",
                                       error.errno) from None
        fd = cls._from_device(flags & ~abi.UFFD_USER_MODE_ONLY)
        if fd is not None:
            return cls(fd)
        raise UserfaultfdPermissionError(
            "userfaultfd() is not permitted to this process: vm.unprivileged_userfaultfd is 0 and it lacks "
            "CAP_SYS_PTRACE" + ("" if user_mode_only else "; pass user_mode_only=True (user-space faults only)")
            + ", give it read-write access to /dev/userfaultfd, or `sysctl vm.unprivileged_userfaultfd=1`; "
            "a seccomp filter (containers) can also forbid the call", errno.EPERM)

    @staticmethod
    def _from_device(flags: int) -> int | None:
        """A userfaultfd from ``/dev/userfaultfd`` (Linux 6.1), where its permissions allow; else None."""
        try:
            device = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            return fcntl.ioctl(device, abi.USERFAULTFD_IOC_NEW, flags)
        except OSError:
            return None
        finally:
            os.close(device)

    @classmethod
    def adopt(cls, fd: int, *, owner: str) -> Self:
        """Take ownership of an fd that is already a userfaultfd (e.g. from ``pidfd_getfd``), whose memory is
        ``owner``'s (words for messages: "process 1234")."""
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError as error:
            raise UserfaultfdError(f"fd {fd} is not open: {describe_errno(error.errno or 0)}", error.errno) from None
        if link != "anon_inode:[userfaultfd]":
            raise UserfaultfdError(f"fd {fd} is {link}, not a userfaultfd")
        return cls(fd, owner=owner)

    # --- handshake --------------------------------------------------------------------------------

    def api(self, features: int = 0) -> ApiInfo:
        """The API handshake, once per fd, enabling ``features`` (``UFFD_FEATURE_*`` bits).

        Features this kernel lacks raise :class:`KernelFeatureError` naming each with the first kernel
        that has it, and leave the fd unconfigured.
        """
        if self.info is not None:
            raise UserfaultfdError("the userfaultfd API handshake was already done on this fd; it is allowed once")
        available = available_features()
        missing = features & ~available
        if missing:
            raise KernelFeatureError(_missing_features_message(missing))
        request = abi.uffdio_api(api=abi.UFFD_API, features=features)
        self._ioctl(abi.UFFDIO_API, request, "UFFDIO_API")
        self.info = ApiInfo(int(request.features), available, int(request.ioctls))
        return self.info

    # --- ranges -----------------------------------------------------------------------------------

    def register(self, start: int, length: int, *, missing: bool = False, wp: bool = False,
                 minor: bool = False) -> int:
        """Register ``[start, start + length)`` (page-aligned) in the given modes; returns the bitmask of
        ioctls the range now accepts (see :func:`ioctl_names`)."""
        mode = ((abi.UFFDIO_REGISTER_MODE_MISSING if missing else 0) | (abi.UFFDIO_REGISTER_MODE_WP if wp else 0)
                | (abi.UFFDIO_REGISTER_MODE_MINOR if minor else 0))
        if not mode:
            raise UserfaultfdError("register() needs a mode: missing=True, wp=True or minor=True")
        self._check_range(start, length, "register")
        request = abi.uffdio_register(range=abi.uffdio_range(start, length), mode=mode)
        try:
            self._ioctl(abi.UFFDIO_REGISTER, request, "UFFDIO_REGISTER")
        except UserfaultfdError as error:
            if error.errno == errno.EBUSY:
                raise RangeBusyError(f"memory {start:#x}-{start + length:#x} of {self.owner} is already registered "
                                     "with another userfaultfd (a memory range can belong to one only)",
                                     errno.EBUSY) from None
            if error.errno == errno.EINVAL:
                raise UserfaultfdError(f"UFFDIO_REGISTER refused {start:#x}-{start + length:#x} of {self.owner} "
                                       "(EINVAL): a range with no mapping, or memory of a kind this mode does not "
                                       "support (device or PFN mappings; for WP without WP_ASYNC, memory that is "
                                       "not anonymous)", errno.EINVAL) from None
            raise
        return int(request.ioctls)

    def unregister(self, start: int, length: int) -> None:
        """Unregister the range; pages it write-protected become writable again."""
        self._check_range(start, length, "unregister")
        self._ioctl(abi.UFFDIO_UNREGISTER, abi.uffdio_range(start, length), "UFFDIO_UNREGISTER")

    def writeprotect(self, start: int, length: int, *, protect: bool = True, dontwake: bool = False) -> None:
        """Write-protect the range (``protect=True``) or remove the protection, which also wakes threads
        waiting on a write fault there unless ``dontwake``."""
        self._check_range(start, length, "writeprotect")
        mode = (abi.UFFDIO_WRITEPROTECT_MODE_WP if protect else 0) | (
            abi.UFFDIO_WRITEPROTECT_MODE_DONTWAKE if dontwake else 0)
        request = abi.uffdio_writeprotect(range=abi.uffdio_range(start, length), mode=mode)
        self._ioctl(abi.UFFDIO_WRITEPROTECT, request, "UFFDIO_WRITEPROTECT")

    def copy(self, dst: int, src: Buffer, *, dontwake: bool = False, wp: bool = False) -> int:
        """Install the pages of ``src`` (whole pages) at ``dst`` in missing memory and wake the threads
        waiting there (unless ``dontwake``); ``wp`` maps them write-protected. Returns bytes copied.

        Raises :class:`UserfaultfdError` with errno EEXIST where a page is already present."""
        data = np.frombuffer(src, dtype=np.uint8) if not isinstance(src, np.ndarray) else src
        if not data.flags.c_contiguous:
            data = np.ascontiguousarray(data)
        self._check_range(dst, data.size, "copy")
        mode = (abi.UFFDIO_COPY_MODE_DONTWAKE if dontwake else 0) | (abi.UFFDIO_COPY_MODE_WP if wp else 0)
        return self._copy_from(dst, data.ctypes.data, data.size, mode, skip_present=False)

    def copy_missing(self, dst: int, src: Buffer, *, dontwake: bool = False) -> int:
        """:meth:`copy`, except that pages already present at ``dst`` are left as they are instead of refused:
        the pages of ``src`` fill only the holes. Returns the bytes installed. For a handler that races with
        another installer of the same pages (the first copy of a page wins)."""
        data = np.frombuffer(src, dtype=np.uint8) if not isinstance(src, np.ndarray) else src
        if not data.flags.c_contiguous:
            data = np.ascontiguousarray(data)
        self._check_range(dst, data.size, "copy")
        mode = abi.UFFDIO_COPY_MODE_DONTWAKE if dontwake else 0
        return self._copy_from(dst, data.ctypes.data, data.size, mode, skip_present=True)

    def _copy_from(self, dst: int, src: int, length: int, mode: int, *, skip_present: bool) -> int:
        # The kernel copies page by page; stopped part way (EAGAIN: the address space changed, or a page it met
        # was present), it says how far it got in ``copy``: go on from there, skipping a present page if allowed.
        installed = done = 0
        for _ in range(100 + length // PAGE_SIZE):
            if done >= length:
                return installed
            request = abi.uffdio_copy(dst=dst + done, src=src + done, len=length - done, mode=mode)
            try:
                self._ioctl(abi.UFFDIO_COPY, request, "UFFDIO_COPY")
                return installed + length - done
            except UserfaultfdError as error:
                progress = max(int(request.copy), 0)
                installed, done = installed + progress, done + progress
                if error.errno == errno.EEXIST and skip_present:
                    done += PAGE_SIZE
                elif error.errno != errno.EAGAIN:
                    raise
        raise UserfaultfdError("UFFDIO_COPY kept failing with EAGAIN (the mapping keeps changing)", errno.EAGAIN)

    def zeropage(self, start: int, length: int, *, dontwake: bool = False) -> int:
        """Map zero pages over missing memory and wake its waiters (unless ``dontwake``); returns bytes mapped."""
        self._check_range(start, length, "zeropage")
        mode = abi.UFFDIO_ZEROPAGE_MODE_DONTWAKE if dontwake else 0
        mapped = done = 0
        for _ in range(100 + length // PAGE_SIZE):
            if done >= length:
                return mapped
            request = abi.uffdio_zeropage(range=abi.uffdio_range(start + done, length - done), mode=mode)
            try:
                self._ioctl(abi.UFFDIO_ZEROPAGE, request, "UFFDIO_ZEROPAGE")
                return mapped + length - done
            except UserfaultfdError as error:
                progress = max(int(request.zeropage), 0)  # part of the range done before the kernel stopped
                mapped, done = mapped + progress, done + progress
                if error.errno != errno.EAGAIN:
                    raise
        raise UserfaultfdError("UFFDIO_ZEROPAGE kept failing with EAGAIN (the mapping keeps changing)", errno.EAGAIN)

    def wake(self, start: int, length: int) -> None:
        """Wake the threads waiting on faults in the range (after resolving them with ``dontwake``)."""
        self._check_range(start, length, "wake")
        self._ioctl(abi.UFFDIO_WAKE, abi.uffdio_range(start, length), "UFFDIO_WAKE")

    # --- messages ---------------------------------------------------------------------------------

    def wait(self, timeout: float | None) -> bool:
        """Whether a message is ready within ``timeout`` seconds (None: wait for one)."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        return bool(poller.poll(None if timeout is None else int(timeout * 1000)))

    def read_messages(self, max_messages: int = 64) -> npt.NDArray[np.void]:
        """Pending ``uffd_msg`` records as a NumPy structured array (:data:`abi.UFFD_MSG_DTYPE`); empty when
        none is pending (non-blocking fd) — a blocking fd waits for the first."""
        try:
            data = os.read(self.fd, max_messages * abi.UFFD_MSG_SIZE)
        except BlockingIOError:
            data = b""
        return np.frombuffer(data, dtype=abi.UFFD_MSG_DTYPE)

    def read_faults(self, max_messages: int = 64) -> list[PageFault]:
        """Pending page-fault messages as :class:`PageFault` (other events are skipped)."""
        messages = self.read_messages(max_messages)
        faults = messages[messages["event"] == abi.UFFD_EVENT_PAGEFAULT]
        return [PageFault(int(address), bool(flags & abi.UFFD_PAGEFAULT_FLAG_WRITE),
                          bool(flags & abi.UFFD_PAGEFAULT_FLAG_WP), bool(flags & abi.UFFD_PAGEFAULT_FLAG_MINOR),
                          int(arg2) & 0xFFFF_FFFF)
                for flags, address, arg2 in zip(faults["arg0"].tolist(), faults["arg1"].tolist(),
                                                faults["arg2"].tolist(), strict=True)]

    # --- plumbing ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the fd; the kernel unregisters its ranges and wakes any waiting thread."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def _check_range(self, start: int, length: int, what: str) -> None:
        if start % PAGE_SIZE or length % PAGE_SIZE or length <= 0:
            raise UserfaultfdError(f"{what}: range {start:#x} + {length:#x} must be whole pages "
                                   f"(start and length multiples of {PAGE_SIZE}, length > 0)")

    def _ioctl(self, request: int, arg: ctypes.Structure, what: str) -> None:
        if self.fd < 0:
            raise UserfaultfdError(f"{what} on a closed userfaultfd")
        try:
            fcntl.ioctl(self.fd, request, arg, True)
        except OSError as error:
            code = error.errno or 0
            if code == errno.ESRCH:
                raise ProcessExitedError(f"{what}: {self.owner} has exited (its memory is gone)", code) from None
            raise UserfaultfdError(f"{what} failed: {describe_errno(code)}", code) from None
