"""Typed wrappers over the KVM file descriptors: :class:`Kvm` (``/dev/kvm``) and :class:`Vm` (a VM fd).

Each object owns one file descriptor and offers one method per ioctl, as rust-vmm's ``kvm-ioctls``
does. Errors come back as :mod:`dirtylog.kvm.errors` exceptions whose messages name the slot, size or
capability at fault and what to do about it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Self

import numpy as np
import numpy.typing as npt

from dirtylog.kvm import abi
from dirtylog.kvm.errors import (
    BadBufferError,
    DirtyLogRangeError,
    GuestMemoryError,
    KvmCapabilityError,
    KvmError,
    KvmUnavailableError,
    LoggingNotEnabledError,
    MemorySlotError,
    NoSuchSlotError,
    VcpuError,
    describe_errno,
)
from dirtylog.kvm.ioctl import ioctl
from dirtylog.kvm.memslot import MemorySlot
from dirtylog.kvm.vcpu import Vcpu
from dirtylog.units import PAGE_SIZE

DEFAULT_DEVICE = "/dev/kvm"
_VENDOR_MODULES = {"kvm_pvm": "PVM", "kvm_intel": "VMX", "kvm_amd": "SVM"}


class Kvm:
    """The KVM subsystem: ``/dev/kvm``, its API version and capabilities, and the VMs it creates."""

    def __init__(self, device: str | None = None) -> None:
        self.device = device or os.environ.get("DIRTYLOG_KVM_DEVICE", DEFAULT_DEVICE)
        try:
            self.fd = os.open(self.device, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailableError(
                f"{self.device} does not exist: this host has no KVM. Run on a machine with hardware "
                "virtualization (or PVM) and the kvm module loaded (`modprobe kvm_intel` / `kvm_amd`).",
                errno.ENOENT,
            ) from None
        except PermissionError:
            raise KvmUnavailableError(
                f"permission denied opening {self.device}: run as root or add your user to the group "
                f"that owns it (`ls -l {self.device}`; usually `kvm`).",
                errno.EACCES,
            ) from None
        except OSError as error:
            raise KvmUnavailableError(
                f"cannot open {self.device}: {describe_errno(error.errno or 0)}", error.errno
            ) from None
        try:
            self.api_version = ioctl(self.fd, abi.KVM_GET_API_VERSION)
        except OSError as error:
            os.close(self.fd)
            raise KvmUnavailableError(
                f"{self.device} is not a KVM device (KVM_GET_API_VERSION failed: "
                f"{describe_errno(error.errno or 0)}); point at /dev/kvm.",
                error.errno,
            ) from None
        if self.api_version != abi.KVM_API_VERSION:
            os.close(self.fd)
            raise KvmUnavailableError(
                f"KVM API version {self.api_version} is not the stable version {abi.KVM_API_VERSION}; "
                "this kernel's KVM is not supported."
            )
        self.vcpu_mmap_size = ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE)

    def check_extension(self, capability: int) -> int:
        """``KVM_CHECK_EXTENSION``: 0 when absent, otherwise a capability-specific value."""
        return ioctl(self.fd, abi.KVM_CHECK_EXTENSION, capability)

    @property
    def host_type(self) -> str:
        """How this KVM runs guests: ``PVM`` (paravirtual, no VMX/SVM), ``VMX`` (Intel), ``SVM`` (AMD) or ``arm64``."""
        for module, name in _VENDOR_MODULES.items():
            if Path("/sys/module", module).exists():
                return name
        if platform.machine() == "aarch64":
            return "arm64"
        return "unknown"

    @property
    def max_vcpus(self) -> int:
        """Most vCPUs one VM may have."""
        return self.check_extension(abi.KVM_CAP_MAX_VCPUS) or self.check_extension(abi.KVM_CAP_NR_VCPUS) or 4

    @property
    def max_memslots(self) -> int:
        """Most memory slots one VM may have."""
        return self.check_extension(abi.KVM_CAP_NR_MEMSLOTS) or 32

    def supported_cpuid(self) -> bytearray:
        """``KVM_GET_SUPPORTED_CPUID`` as a ``kvm_cpuid2`` buffer ready for ``KVM_SET_CPUID2``."""
        nent = 64
        while True:
            buffer, _ = abi.cpuid_buffer(nent)
            try:
                ioctl(self.fd, abi.KVM_GET_SUPPORTED_CPUID, buffer)
            except OSError as error:
                if error.errno == errno.E2BIG and nent < 4096:
                    nent *= 2
                    continue
                raise KvmError(f"KVM_GET_SUPPORTED_CPUID failed: {describe_errno(error.errno or 0)}") from None
            used = abi.kvm_cpuid2.from_buffer(buffer).nent
            return buffer[: ctypes.sizeof(abi.kvm_cpuid2) + used * ctypes.sizeof(abi.kvm_cpuid_entry2)]

    def create_vm(self) -> Vm:
        """A new, empty virtual machine."""
        try:
            fd = ioctl(self.fd, abi.KVM_CREATE_VM, 0)
        except OSError as error:
            raise KvmError(
                f"KVM_CREATE_VM failed: {describe_errno(error.errno or 0)}; is another hypervisor holding "
                "the virtualization extensions, or is the process out of file descriptors?",
                error.errno,
            ) from None
        return Vm(self, fd)

    def close(self) -> None:
        """Close ``/dev/kvm``; VMs already created keep working."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class Vm:
    """A virtual machine: its memory slots, dirty log, dirty rings and vCPUs."""

    def __init__(self, kvm: Kvm, fd: int) -> None:
        self.kvm = kvm
        self.fd = fd
        self.slots: dict[int, MemorySlot] = {}
        self.vcpus: list[Vcpu] = []
        self.dirty_ring_bytes = 0
        self.dirty_ring_with_bitmap = False  # rings backed by per-slot bitmaps (KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP)
        self.manual_protect = False

    # --- memory slots ------------------------------------------------------------------------------

    def add_slot(self, slot: int, guest_phys_addr: int, memory_size: int, userspace_addr: int,
                 flags: int = 0) -> MemorySlot:
        """Create memory slot ``slot``; sizes and addresses must be page-aligned and not overlap."""
        if slot in self.slots:
            raise MemorySlotError(f"memory slot {slot} already exists; delete it first or pick another number")
        if memory_size <= 0:
            raise MemorySlotError(f"memory slot {slot}: size {memory_size} must be positive; to delete a "
                                  "slot use delete_slot()")
        for name, value in (("size", memory_size), ("guest address", guest_phys_addr),
                            ("host address", userspace_addr)):
            if value % PAGE_SIZE:
                raise MemorySlotError(f"memory slot {slot}: {name} {value:#x} is not a multiple of the "
                                      f"{PAGE_SIZE}-byte page size; round it to whole pages")
        new = MemorySlot(slot, guest_phys_addr, memory_size, userspace_addr, flags)
        for other in self.slots.values():
            if new.guest_phys_addr < other.guest_phys_addr + other.memory_size and \
                    other.guest_phys_addr < new.guest_phys_addr + new.memory_size:
                raise MemorySlotError(
                    f"memory slot {slot} at {guest_phys_addr:#x}..{guest_phys_addr + memory_size:#x} overlaps "
                    f"slot {other.slot} at {other.guest_phys_addr:#x}.."
                    f"{other.guest_phys_addr + other.memory_size:#x}; choose a free guest-physical range",
                    errno.EEXIST,
                )
        self._set_region(new)
        self.slots[slot] = new
        return new

    def set_slot_flags(self, slot: int, flags: int) -> MemorySlot:
        """Change a slot's flags, e.g. switch dirty logging on or off while vCPUs run."""
        changed = replace(self._slot(slot), flags=flags)
        self._set_region(changed)
        self.slots[slot] = changed
        return changed

    def move_slot(self, slot: int, guest_phys_addr: int) -> MemorySlot:
        """Move a slot to another guest-physical address (KVM_MR_MOVE); contents stay."""
        current = self._slot(slot)
        if guest_phys_addr % PAGE_SIZE:
            raise MemorySlotError(f"memory slot {slot}: guest address {guest_phys_addr:#x} is not page-aligned")
        moved = replace(current, guest_phys_addr=guest_phys_addr)
        for other in self.slots.values():
            if other.slot != slot and moved.guest_phys_addr < other.guest_phys_addr + other.memory_size \
                    and other.guest_phys_addr < moved.guest_phys_addr + moved.memory_size:
                raise MemorySlotError(f"cannot move memory slot {slot} to {guest_phys_addr:#x}: it would "
                                      f"overlap slot {other.slot}")
        self._set_region(moved)
        self.slots[slot] = moved
        return moved

    def delete_slot(self, slot: int) -> None:
        """Remove a slot (a region of size 0); its host memory is untouched."""
        current = self._slot(slot)
        self._set_region(replace(current, memory_size=0, flags=0))
        del self.slots[slot]

    def _slot(self, slot: int) -> MemorySlot:
        try:
            return self.slots[slot]
        except KeyError:
            raise MemorySlotError(
                f"memory slot {slot} does not exist; slots are {sorted(self.slots) or 'none'}",
                errno.EINVAL,
            ) from None

    def _set_region(self, slot: MemorySlot) -> None:
        region = abi.kvm_userspace_memory_region(
            slot.slot, slot.flags, slot.guest_phys_addr, slot.memory_size, slot.userspace_addr
        )
        try:
            ioctl(self.fd, abi.KVM_SET_USER_MEMORY_REGION, region)
        except OSError as error:
            code = error.errno or 0
            if code == errno.EEXIST:
                raise MemorySlotError(f"memory slot {slot.slot} overlaps another slot in the kernel's view",
                                      code) from None
            if code == errno.EINVAL and slot.slot >= self.kvm.max_memslots:
                raise MemorySlotError(f"memory slot number {slot.slot} is too large: this KVM allows "
                                      f"{self.kvm.max_memslots} slots (0..{self.kvm.max_memslots - 1})",
                                      code) from None
            if code == errno.ENOMEM:
                raise GuestMemoryError(f"the host cannot back memory slot {slot.slot} "
                                       f"({slot.memory_size >> 20} MiB): give the guest less memory", code) from None
            raise MemorySlotError(
                f"KVM_SET_USER_MEMORY_REGION for slot {slot.slot} (guest {slot.guest_phys_addr:#x}, "
                f"{slot.memory_size:#x} bytes, flags {slot.flags:#x}) failed: {describe_errno(code)}", code
            ) from None

    # --- capabilities ------------------------------------------------------------------------------

    def check_extension(self, capability: int) -> int:
        """``KVM_CHECK_EXTENSION`` on this VM (some answers depend on the VM type)."""
        return ioctl(self.fd, abi.KVM_CHECK_EXTENSION, capability)

    def enable_cap(self, capability: int, *args: int) -> None:
        """``KVM_ENABLE_CAP`` with up to four arguments."""
        request = abi.kvm_enable_cap(cap=capability)
        for index, value in enumerate(args):
            request.args[index] = value
        try:
            ioctl(self.fd, abi.KVM_ENABLE_CAP, request)
        except OSError as error:
            raise KvmCapabilityError(
                f"KVM_ENABLE_CAP({capability}, {list(args)}) failed: {describe_errno(error.errno or 0)}",
                error.errno,
            ) from None

    # --- dirty log ---------------------------------------------------------------------------------

    def enable_manual_protect(self, initially_set: bool = False) -> None:
        """Split KVM_GET_DIRTY_LOG into read and KVM_CLEAR_DIRTY_LOG (``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2``).

        With ``initially_set`` a newly logged slot starts with every bit set and nothing write-protected,
        so enabling logging on a large slot is cheap; pages are protected as they are cleared.
        """
        supported = self.check_extension(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
        wanted = abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | (abi.KVM_DIRTY_LOG_INITIALLY_SET if initially_set else 0)
        if supported & wanted != wanted:
            raise KvmCapabilityError(
                f"this KVM does not offer KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with flags {wanted:#x} "
                f"(it offers {supported:#x}); use mode 'log' instead of 'clear'"
            )
        self.enable_cap(abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, wanted)
        self.manual_protect = True

    def get_dirty_log(self, slot: int, bitmap: npt.NDArray[np.uint64]) -> None:
        """``KVM_GET_DIRTY_LOG`` of ``slot`` into ``bitmap`` (whole u64 words, one bit per page).

        Without manual protect, the kernel also clears its log and write-protects the reported pages;
        with it, the log is only read and :meth:`clear_dirty_log` re-protects.
        """
        self._check_bitmap(slot, bitmap, "KVM_GET_DIRTY_LOG")
        request = abi.kvm_dirty_log(slot=slot, dirty_bitmap=bitmap.ctypes.data)
        try:
            ioctl(self.fd, abi.KVM_GET_DIRTY_LOG, request)
        except OSError as error:
            raise self._dirty_log_error("KVM_GET_DIRTY_LOG", slot, error.errno or 0) from None

    def clear_dirty_log(self, slot: int, first_page: int, num_pages: int,
                        bitmap: npt.NDArray[np.uint64]) -> None:
        """``KVM_CLEAR_DIRTY_LOG``: clear and re-protect the pages set in ``bitmap`` within the range.

        ``first_page`` (relative to the slot) must be a multiple of 64, and ``num_pages`` too unless the
        range reaches the end of the slot; ``bitmap`` bit 0 is ``first_page``.
        """
        current = self.slots.get(slot)
        if current is not None:
            if first_page % 64:
                raise DirtyLogRangeError(
                    f"KVM_CLEAR_DIRTY_LOG on slot {slot}: first_page {first_page} is not a multiple of 64; "
                    f"use {first_page - first_page % 64}", errno.EINVAL)
            end = first_page + num_pages
            if end > current.npages:
                raise DirtyLogRangeError(
                    f"KVM_CLEAR_DIRTY_LOG on slot {slot}: pages {first_page}..{end} run past the slot's "
                    f"{current.npages} pages; num_pages can be at most {current.npages - first_page}",
                    errno.EINVAL)
            if num_pages % 64 and end != current.npages:
                raise DirtyLogRangeError(
                    f"KVM_CLEAR_DIRTY_LOG on slot {slot}: num_pages {num_pages} is not a multiple of 64 and "
                    f"does not reach the slot's end ({current.npages}); use {num_pages - num_pages % 64} or "
                    f"{current.npages - first_page}", errno.EINVAL)
            if bitmap.nbytes * 8 < num_pages:
                raise BadBufferError(f"KVM_CLEAR_DIRTY_LOG on slot {slot}: bitmap of {bitmap.nbytes} bytes is "
                                     f"too small for {num_pages} pages")
        request = abi.kvm_clear_dirty_log(slot=slot, num_pages=num_pages, first_page=first_page,
                                          dirty_bitmap=bitmap.ctypes.data)
        try:
            ioctl(self.fd, abi.KVM_CLEAR_DIRTY_LOG, request)
        except OSError as error:
            raise self._dirty_log_error("KVM_CLEAR_DIRTY_LOG", slot, error.errno or 0) from None

    def _check_bitmap(self, slot: int, bitmap: npt.NDArray[np.uint64], operation: str) -> None:
        current = self.slots.get(slot)
        if current is not None and bitmap.nbytes < current.bitmap_bytes:
            raise BadBufferError(f"{operation} on slot {slot}: bitmap of {bitmap.nbytes} bytes is too small; "
                                 f"the slot's {current.npages} pages need {current.bitmap_bytes} bytes")
        if not bitmap.flags.c_contiguous or not bitmap.flags.writeable:
            raise BadBufferError(f"{operation} on slot {slot}: bitmap must be a writable contiguous array")

    def _dirty_log_error(self, operation: str, slot: int, code: int) -> KvmError:
        """The exception for a dirty-log errno. Today's kernels answer ENOENT both for a slot that
        does not exist and for one without logging, and EINVAL for a slot number out of range (the
        seed patch answered EINVAL for any bad slot): the slot table tells the cases apart."""
        logging = sorted(s.slot for s in self.slots.values() if s.logging)
        choice = f"slots with logging are {logging}" if logging else "no slot has logging enabled yet"
        if code == errno.EINVAL:
            return NoSuchSlotError(
                f"{operation}: memory slot {slot} is not a valid slot (EINVAL); this KVM has slots "
                f"0..{self.kvm.max_memslots - 1} and this VM uses {sorted(self.slots)}", code)
        if code == errno.ENOENT and slot not in self.slots:
            return NoSuchSlotError(
                f"{operation}: memory slot {slot} does not exist (ENOENT); this VM's slots are "
                f"{sorted(self.slots)}, {choice}", code)
        if code == errno.ENOENT:
            return LoggingNotEnabledError(
                f"{operation}: dirty logging is not enabled on memory slot {slot} (ENOENT); set "
                f"KVM_MEM_LOG_DIRTY_PAGES on it first (tracker.enable()); {choice}", code)
        if code == errno.EFAULT:
            return BadBufferError(f"{operation} on slot {slot}: the kernel could not access the bitmap "
                                  "buffer (EFAULT); pass a writable buffer of the slot's bitmap size", code)
        return KvmError(f"{operation} on slot {slot} failed: {describe_errno(code)}", code)

    # --- dirty ring --------------------------------------------------------------------------------

    @property
    def dirty_ring_max_bytes(self) -> int:
        """The largest dirty ring per vCPU this KVM offers, in bytes (0: no dirty ring)."""
        return (self.check_extension(abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL)
                or self.check_extension(abi.KVM_CAP_DIRTY_LOG_RING))

    def enable_dirty_ring(self, ring_bytes: int) -> None:
        """Give every vCPU a dirty ring of ``ring_bytes`` (``KVM_CAP_DIRTY_LOG_RING[_ACQ_REL]``).

        Must happen before any vCPU exists; the size must be a power of two within the host's maximum.
        """
        if self.vcpus:
            raise KvmCapabilityError("the dirty ring must be enabled before any vCPU is created; "
                                     "create the machine with the ring mode instead")
        capability = abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL
        maximum = self.check_extension(capability)
        if not maximum:
            capability = abi.KVM_CAP_DIRTY_LOG_RING
            maximum = self.check_extension(capability)
        if not maximum:
            raise KvmCapabilityError("this KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING); use mode 'log' or 'clear'")
        entry = ctypes.sizeof(abi.kvm_dirty_gfn)
        if ring_bytes & (ring_bytes - 1) or not PAGE_SIZE <= ring_bytes <= maximum:
            raise KvmCapabilityError(
                f"dirty ring size {ring_bytes} bytes ({ring_bytes // entry} entries) must be a power of two "
                f"between {PAGE_SIZE} and {maximum} bytes")
        self.enable_cap(capability, ring_bytes)
        self.dirty_ring_bytes = ring_bytes
        if capability == abi.KVM_CAP_DIRTY_LOG_RING_ACQ_REL and self.check_extension(
                abi.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP):
            self._enable_ring_bitmap()

    def _enable_ring_bitmap(self) -> None:
        """``KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP`` (arm64): slots keep a dirty bitmap beside the rings.

        The kernel offers it where pages can be dirtied outside any vCPU's context, and arm64 needs it for
        more than that: its fault path decides whether a slot is logging by the slot's ``dirty_bitmap``
        (``memslot_is_logging``), so with rings alone a write fault on a huge-page-backed slot maps a
        writable 2 MiB block and logs one page of it; the other 511 are written unseen (found with the
        stamp verifier on Debian's 6.12; see docs/arm64.md). The capability is refused once a slot exists,
        so existing slots are deleted and created again around it (their memory is untouched; nothing has
        run yet, since rings come before vCPUs).
        """
        slots = list(self.slots.values())
        for memslot in slots:
            self.delete_slot(memslot.slot)
        self.enable_cap(abi.KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP, 1)
        self.dirty_ring_with_bitmap = True
        for memslot in slots:
            self.add_slot(memslot.slot, memslot.guest_phys_addr, memslot.memory_size, memslot.userspace_addr,
                          memslot.flags)

    def reset_dirty_rings(self) -> int:
        """``KVM_RESET_DIRTY_RINGS``: re-protect harvested entries; returns how many were reset."""
        try:
            return ioctl(self.fd, abi.KVM_RESET_DIRTY_RINGS)
        except OSError as error:
            raise KvmError(f"KVM_RESET_DIRTY_RINGS failed: {describe_errno(error.errno or 0)}") from None

    # --- vCPUs -------------------------------------------------------------------------------------

    def arm_preferred_target(self) -> abi.kvm_vcpu_init:
        """``KVM_ARM_PREFERRED_TARGET``: the CPU type vCPUs of this VM should be initialized as (arm64)."""
        init = abi.kvm_vcpu_init()
        try:
            ioctl(self.fd, abi.KVM_ARM_PREFERRED_TARGET, init)
        except OSError as error:
            raise VcpuError(f"KVM_ARM_PREFERRED_TARGET failed: {describe_errno(error.errno or 0)}; is this an "
                            "arm64 KVM?", error.errno) from None
        return init

    def create_vcpu(self, vcpu_id: int | None = None) -> Vcpu:
        """A new vCPU (ids count up from 0 unless given)."""
        vcpu_id = len(self.vcpus) if vcpu_id is None else vcpu_id
        if vcpu_id >= self.kvm.max_vcpus:
            raise VcpuError(f"vCPU {vcpu_id} is beyond this KVM's limit of {self.kvm.max_vcpus} vCPUs per VM")
        try:
            fd = ioctl(self.fd, abi.KVM_CREATE_VCPU, vcpu_id)
        except OSError as error:
            raise VcpuError(f"KVM_CREATE_VCPU {vcpu_id} failed: {describe_errno(error.errno or 0)}",
                            error.errno) from None
        vcpu = Vcpu(fd, vcpu_id, self.kvm.vcpu_mmap_size, self.dirty_ring_bytes)
        self.vcpus.append(vcpu)
        return vcpu

    def close(self) -> None:
        """Close every vCPU and the VM."""
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
