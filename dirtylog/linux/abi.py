"""The Linux userspace ABI beyond KVM: userfaultfd, the pagemap ioctl, ptrace on x86-64, syscall numbers.

Mirrors, and nothing more, the kernel's own headers:

* ``include/uapi/linux/userfaultfd.h`` — ``uffdio_*`` structures, ``UFFD_FEATURE_*``, ``UFFDIO_*`` ioctls,
  ``struct uffd_msg``;
* ``include/uapi/linux/fs.h`` — ``PAGEMAP_SCAN``, ``struct pm_scan_arg``, ``struct page_region``,
  ``PAGE_IS_*`` categories and ``PM_SCAN_*`` flags (Linux 6.7);
* ``Documentation/admin-guide/mm/pagemap.rst`` — the bits of a ``/proc/PID/pagemap`` entry;
* ``include/uapi/linux/ptrace.h`` and ``arch/x86/include/asm/user_64.h`` — ptrace requests and
  ``struct user_regs_struct``;
* ``arch/x86/entry/syscalls/syscall_64.tbl`` — the syscall numbers we call or inject.

Ioctl numbers are computed from ``ctypes.sizeof`` of the structure they carry, as the kernel's ``_IOWR``
macros do, so a wrong layout shows up as a wrong number in ``tests/linux/test_abi.py``.
"""

from __future__ import annotations

import ctypes

import numpy as np

# --- ioctl number encoding (asm-generic/ioctl.h) -------------------------------------------------

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _ioc(direction: int, kind: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (kind << 8) | nr


def _iowr(kind: int, nr: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, kind, nr, ctypes.sizeof(struct))


def _ior(kind: int, nr: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_READ, kind, nr, ctypes.sizeof(struct))


u32, u64, s64 = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int64

# --- syscall numbers, x86-64 (arch/x86/entry/syscalls/syscall_64.tbl) ----------------------------

SYS_close = 3
SYS_getpid = 39
SYS_ptrace = 101
SYS_tgkill = 234
SYS_userfaultfd = 323
SYS_pidfd_open = 434
SYS_pidfd_getfd = 438
SYS_process_madvise = 440

MADV_DONTNEED = 4  # include/uapi/asm-generic/mman-common.h

# The two bytes of x86-64 ``syscall`` (0f 05): what injection executes inside a target.
SYSCALL_INSTRUCTION = b"\x0f\x05"

# --- userfaultfd (include/uapi/linux/userfaultfd.h) ----------------------------------------------

UFFD_API = 0xAA
UFFDIO = 0xAA
UFFD_USER_MODE_ONLY = 1  # userfaultfd(2) flag: handle user-mode faults only (Linux 5.11)

UFFD_FEATURE_PAGEFAULT_FLAG_WP = 1 << 0
UFFD_FEATURE_EVENT_FORK = 1 << 1
UFFD_FEATURE_EVENT_REMAP = 1 << 2
UFFD_FEATURE_EVENT_REMOVE = 1 << 3
UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4
UFFD_FEATURE_MISSING_SHMEM = 1 << 5
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
UFFD_FEATURE_SIGBUS = 1 << 7
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_FEATURE_MINOR_HUGETLBFS = 1 << 9
UFFD_FEATURE_MINOR_SHMEM = 1 << 10
UFFD_FEATURE_EXACT_ADDRESS = 1 << 11
UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_POISON = 1 << 14
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFD_FEATURE_MOVE = 1 << 16

# Feature bit -> (name, first mainline kernel that reports it), for messages that say what to upgrade to.
UFFD_FEATURES: dict[int, tuple[str, str]] = {
    UFFD_FEATURE_PAGEFAULT_FLAG_WP: ("PAGEFAULT_FLAG_WP", "5.7"),
    UFFD_FEATURE_EVENT_FORK: ("EVENT_FORK", "4.11"),
    UFFD_FEATURE_EVENT_REMAP: ("EVENT_REMAP", "4.11"),
    UFFD_FEATURE_EVENT_REMOVE: ("EVENT_REMOVE", "4.11"),
    UFFD_FEATURE_MISSING_HUGETLBFS: ("MISSING_HUGETLBFS", "4.11"),
    UFFD_FEATURE_MISSING_SHMEM: ("MISSING_SHMEM", "4.11"),
    UFFD_FEATURE_EVENT_UNMAP: ("EVENT_UNMAP", "4.11"),
    UFFD_FEATURE_SIGBUS: ("SIGBUS", "4.14"),
    UFFD_FEATURE_THREAD_ID: ("THREAD_ID", "4.14"),
    UFFD_FEATURE_MINOR_HUGETLBFS: ("MINOR_HUGETLBFS", "5.13"),
    UFFD_FEATURE_MINOR_SHMEM: ("MINOR_SHMEM", "5.14"),
    UFFD_FEATURE_EXACT_ADDRESS: ("EXACT_ADDRESS", "5.18"),
    UFFD_FEATURE_WP_HUGETLBFS_SHMEM: ("WP_HUGETLBFS_SHMEM", "6.0"),
    UFFD_FEATURE_WP_UNPOPULATED: ("WP_UNPOPULATED", "6.4"),
    UFFD_FEATURE_POISON: ("POISON", "6.6"),
    UFFD_FEATURE_WP_ASYNC: ("WP_ASYNC", "6.7"),
    UFFD_FEATURE_MOVE: ("MOVE", "6.8"),
}

UFFDIO_REGISTER_MODE_MISSING = 1 << 0
UFFDIO_REGISTER_MODE_WP = 1 << 1
UFFDIO_REGISTER_MODE_MINOR = 1 << 2

UFFDIO_COPY_MODE_DONTWAKE = 1 << 0
UFFDIO_COPY_MODE_WP = 1 << 1
UFFDIO_ZEROPAGE_MODE_DONTWAKE = 1 << 0
UFFDIO_WRITEPROTECT_MODE_WP = 1 << 0
UFFDIO_WRITEPROTECT_MODE_DONTWAKE = 1 << 1

_UFFDIO_REGISTER = 0x00
_UFFDIO_UNREGISTER = 0x01
_UFFDIO_WAKE = 0x02
_UFFDIO_COPY = 0x03
_UFFDIO_ZEROPAGE = 0x04
_UFFDIO_MOVE = 0x05
_UFFDIO_WRITEPROTECT = 0x06
_UFFDIO_CONTINUE = 0x07
_UFFDIO_POISON = 0x08
_UFFDIO_API = 0x3F

UFFD_EVENT_PAGEFAULT = 0x12
UFFD_EVENT_FORK = 0x13
UFFD_EVENT_REMAP = 0x14
UFFD_EVENT_REMOVE = 0x15
UFFD_EVENT_UNMAP = 0x16

UFFD_PAGEFAULT_FLAG_WRITE = 1 << 0
UFFD_PAGEFAULT_FLAG_WP = 1 << 1
UFFD_PAGEFAULT_FLAG_MINOR = 1 << 2


class uffdio_api(ctypes.Structure):
    _fields_ = [("api", u64), ("features", u64), ("ioctls", u64)]


class uffdio_range(ctypes.Structure):
    _fields_ = [("start", u64), ("len", u64)]


class uffdio_register(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", u64), ("ioctls", u64)]


class uffdio_copy(ctypes.Structure):
    _fields_ = [("dst", u64), ("src", u64), ("len", u64), ("mode", u64), ("copy", s64)]


class uffdio_zeropage(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", u64), ("zeropage", s64)]


class uffdio_writeprotect(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", u64)]


class uffdio_continue(ctypes.Structure):
    _fields_ = [("range", uffdio_range), ("mode", u64), ("mapped", s64)]


UFFDIO_API = _iowr(UFFDIO, _UFFDIO_API, uffdio_api)
UFFDIO_REGISTER = _iowr(UFFDIO, _UFFDIO_REGISTER, uffdio_register)
UFFDIO_UNREGISTER = _ior(UFFDIO, _UFFDIO_UNREGISTER, uffdio_range)  # _IOR by a historical slip, kept
UFFDIO_WAKE = _ior(UFFDIO, _UFFDIO_WAKE, uffdio_range)
UFFDIO_COPY = _iowr(UFFDIO, _UFFDIO_COPY, uffdio_copy)
UFFDIO_ZEROPAGE = _iowr(UFFDIO, _UFFDIO_ZEROPAGE, uffdio_zeropage)
UFFDIO_WRITEPROTECT = _iowr(UFFDIO, _UFFDIO_WRITEPROTECT, uffdio_writeprotect)
UFFDIO_CONTINUE = _iowr(UFFDIO, _UFFDIO_CONTINUE, uffdio_continue)
USERFAULTFD_IOC_NEW = _ioc(_IOC_NONE, UFFDIO, 0x00, 0)  # on /dev/userfaultfd (Linux 6.1)

# Bits of uffdio_register.ioctls / uffdio_api.ioctls: which ioctls the range or the fd accepts.
UFFD_IOCTL_NAMES = {_UFFDIO_REGISTER: "REGISTER", _UFFDIO_UNREGISTER: "UNREGISTER", _UFFDIO_WAKE: "WAKE",
                    _UFFDIO_COPY: "COPY", _UFFDIO_ZEROPAGE: "ZEROPAGE", _UFFDIO_MOVE: "MOVE",
                    _UFFDIO_WRITEPROTECT: "WRITEPROTECT", _UFFDIO_CONTINUE: "CONTINUE", _UFFDIO_POISON: "POISON",
                    _UFFDIO_API: "API"}

# struct uffd_msg is packed, 32 bytes: event, three reserved fields, then a 24-byte union. For a page
# fault the union is {flags, address, ptid}; NumPy reads a whole read() of messages in one view.
UFFD_MSG_DTYPE = np.dtype([("event", "u1"), ("reserved1", "u1"), ("reserved2", "<u2"), ("reserved3", "<u4"),
                           ("arg0", "<u8"), ("arg1", "<u8"), ("arg2", "<u8")])
UFFD_MSG_SIZE = 32

# --- PAGEMAP_SCAN (include/uapi/linux/fs.h, Linux 6.7) -------------------------------------------

PROCFS_IOCTL_MAGIC = ord("f")

PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1  # the page is *not* uffd write-protected: written since protection, or never protected
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3
PAGE_IS_SWAPPED = 1 << 4
PAGE_IS_PFNZERO = 1 << 5
PAGE_IS_HUGE = 1 << 6
PAGE_IS_SOFT_DIRTY = 1 << 7
PAGE_IS_GUARD = 1 << 8  # Linux 6.14

PM_SCAN_WP_MATCHING = 1 << 0  # write-protect the pages that match, in the same walk that reports them
PM_SCAN_CHECK_WPASYNC = 1 << 1  # fail (EPERM) on a VMA that is not registered for async write-protect


class page_region(ctypes.Structure):
    _fields_ = [("start", u64), ("end", u64), ("categories", u64)]


class pm_scan_arg(ctypes.Structure):
    _fields_ = [(name, u64) for name in ("size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
                                         "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


PAGEMAP_SCAN = _iowr(PROCFS_IOCTL_MAGIC, 16, pm_scan_arg)
PAGE_REGION_DTYPE = np.dtype([("start", "<u8"), ("end", "<u8"), ("categories", "<u8")])

# Bits of a /proc/PID/pagemap entry (one u64 per page; Documentation/admin-guide/mm/pagemap.rst).
PM_PFRAME_MASK = (1 << 55) - 1
PM_SOFT_DIRTY = 1 << 55
PM_MMAP_EXCLUSIVE = 1 << 56
PM_UFFD_WP = 1 << 57
PM_FILE = 1 << 61
PM_SWAP = 1 << 62
PM_PRESENT = 1 << 63

# --- ptrace (include/uapi/linux/ptrace.h, arch/x86/include/asm/user_64.h) ------------------------

PTRACE_CONT = 7
PTRACE_SINGLESTEP = 9
PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_EVENT_STOP = 128  # the event in (status >> 16) of a stop caused by PTRACE_INTERRUPT or a group stop

WALL = 0x40000000  # __WALL: wait for any kind of child, including threads (waitpid option)

USER_CS_64 = 0x33  # __USER_CS: the code segment of a 64-bit process; 0x23 means a 32-bit (ia32) one


class user_regs_struct(ctypes.Structure):
    _fields_ = [(name, ctypes.c_ulong) for name in (
        "r15", "r14", "r13", "r12", "bp", "bx", "r11", "r10", "r9", "r8", "ax", "cx", "dx", "si", "di", "orig_ax",
        "ip", "cs", "flags", "sp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs")]


# Syscall errors a stopped thread may hold in ax; the kernel restarts the call after the stop.
ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 513, 514, 516
