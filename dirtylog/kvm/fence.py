"""A load-acquire fence for reading memory the kernel publishes with a store-release (the dirty rings).

KVM publishes a dirty-ring entry by writing its slot and offset and then setting DIRTY in ``flags`` with a
store-release; the reader must not let its loads of slot and offset be satisfied before its load of
``flags`` (api.rst, KVM_CAP_DIRTY_LOG_RING_ACQ_REL). x86 never reorders loads with other loads, so there a
fence is nothing. arm64 may, and NumPy has no acquire load, so :func:`load_acquire_fence` executes a real
``dmb ishld`` (loads before it are ordered before every load and store after it): two A64 instructions in
a page mapped executable, called through ctypes. The words are checked against binutils in
``tests/kvm/test_fence.py``.
"""

from __future__ import annotations

import ctypes
import mmap
import platform
from collections.abc import Callable

DMB_ISHLD = 0xD50339BF  # dmb ishld
RET = 0xD65F03C0  # ret
_PAGES: list[mmap.mmap] = []


def _arm64_fence() -> Callable[[], None]:
    code = b"".join(word.to_bytes(4, "little") for word in (DMB_ISHLD, RET))
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(code)
    address = ctypes.addressof(ctypes.c_char.from_buffer(page))
    _PAGES.append(page)  # the code lives as long as the process
    function: Callable[[], None] = ctypes.CFUNCTYPE(None)(address)
    return function


def _nothing() -> None:
    """x86-64: loads are not reordered with older loads (and the GIL's own atomics order the rest)."""


load_acquire_fence: Callable[[], None] = _arm64_fence() if platform.machine() == "aarch64" else _nothing
