"""The Linux ABI layer's numbers and layouts against the kernel's headers (userfaultfd.h, fs.h, ptrace.h,
user_64.h, syscall_64.tbl), pinned so that a layout slip shows as a wrong number, not as corrupted memory."""

import ctypes

from dirtylog.linux import abi


def test_userfaultfd_ioctl_numbers_match_the_kernel() -> None:
    assert abi.UFFDIO_API == 0xC018AA3F
    assert abi.UFFDIO_REGISTER == 0xC020AA00
    assert abi.UFFDIO_UNREGISTER == 0x8010AA01
    assert abi.UFFDIO_WAKE == 0x8010AA02
    assert abi.UFFDIO_COPY == 0xC028AA03
    assert abi.UFFDIO_ZEROPAGE == 0xC020AA04
    assert abi.UFFDIO_WRITEPROTECT == 0xC018AA06
    assert abi.UFFDIO_CONTINUE == 0xC020AA07
    assert abi.USERFAULTFD_IOC_NEW == 0xAA00


def test_userfaultfd_structures_and_flags() -> None:
    assert ctypes.sizeof(abi.uffdio_api) == 24
    assert ctypes.sizeof(abi.uffdio_range) == 16
    assert ctypes.sizeof(abi.uffdio_register) == 32
    assert ctypes.sizeof(abi.uffdio_copy) == 40
    assert ctypes.sizeof(abi.uffdio_zeropage) == 32
    assert ctypes.sizeof(abi.uffdio_writeprotect) == 24
    assert abi.UFFD_MSG_DTYPE.itemsize == abi.UFFD_MSG_SIZE == 32
    assert abi.UFFD_MSG_DTYPE.fields is not None and abi.UFFD_MSG_DTYPE.fields["arg1"][1] == 16  # pagefault.address
    assert abi.UFFD_API == 0xAA and abi.UFFD_USER_MODE_ONLY == 1
    assert abi.UFFD_FEATURE_WP_ASYNC == 1 << 15 and abi.UFFD_FEATURE_WP_UNPOPULATED == 1 << 13
    assert abi.UFFD_FEATURE_THREAD_ID == 1 << 8 and abi.UFFD_FEATURE_MOVE == 1 << 16
    assert (abi.UFFDIO_REGISTER_MODE_MISSING, abi.UFFDIO_REGISTER_MODE_WP, abi.UFFDIO_REGISTER_MODE_MINOR) == (1, 2, 4)
    assert (abi.UFFDIO_WRITEPROTECT_MODE_WP, abi.UFFDIO_WRITEPROTECT_MODE_DONTWAKE) == (1, 2)
    assert abi.UFFD_EVENT_PAGEFAULT == 0x12 and abi.UFFD_PAGEFAULT_FLAG_WP == 2
    assert abi.UFFD_FEATURES[abi.UFFD_FEATURE_WP_ASYNC] == ("WP_ASYNC", "6.7")


def test_pagemap_scan_layout_and_flags() -> None:
    assert abi.PAGEMAP_SCAN == 0xC0606610
    assert ctypes.sizeof(abi.pm_scan_arg) == 96  # 12 u64
    assert [name for name, _ in abi.pm_scan_arg._fields_] == [
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages", "category_inverted",
        "category_mask", "category_anyof_mask", "return_mask"]
    assert ctypes.sizeof(abi.page_region) == abi.PAGE_REGION_DTYPE.itemsize == 24
    assert (abi.PM_SCAN_WP_MATCHING, abi.PM_SCAN_CHECK_WPASYNC) == (1, 2)
    assert (abi.PAGE_IS_WPALLOWED, abi.PAGE_IS_WRITTEN, abi.PAGE_IS_FILE, abi.PAGE_IS_PRESENT) == (1, 2, 4, 8)
    assert (abi.PAGE_IS_SWAPPED, abi.PAGE_IS_PFNZERO, abi.PAGE_IS_HUGE, abi.PAGE_IS_SOFT_DIRTY) == (16, 32, 64, 128)
    assert abi.PM_PRESENT == 1 << 63 and abi.PM_SOFT_DIRTY == 1 << 55 and abi.PM_UFFD_WP == 1 << 57


def test_ptrace_and_syscall_numbers() -> None:
    assert ctypes.sizeof(abi.user_regs_struct) == 27 * 8
    assert abi.user_regs_struct.orig_ax.offset == 15 * 8 and abi.user_regs_struct.ip.offset == 16 * 8
    assert (abi.PTRACE_SEIZE, abi.PTRACE_INTERRUPT, abi.PTRACE_EVENT_STOP) == (0x4206, 0x4207, 128)
    assert (abi.PTRACE_GETREGS, abi.PTRACE_SETREGS, abi.PTRACE_SINGLESTEP, abi.PTRACE_DETACH) == (12, 13, 9, 17)
    assert (abi.SYS_userfaultfd, abi.SYS_pidfd_open, abi.SYS_pidfd_getfd) == (323, 434, 438)
    assert bytes([0x0F, 0x05]) == abi.SYSCALL_INSTRUCTION
