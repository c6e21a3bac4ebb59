"""A virtual CPU: its shared ``kvm_run`` page, registers, MSRs, dirty ring, and ``KVM_RUN``."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

import numpy as np
import numpy.typing as npt

from dirtylog.kvm import abi
from dirtylog.kvm.errors import KvmCapabilityError, VcpuError, describe_errno
from dirtylog.kvm.exits import Interrupted, VcpuExit, decode_exit
from dirtylog.kvm.ioctl import ioctl
from dirtylog.units import PAGE_SIZE

# One dirty-ring entry as NumPy sees it (struct kvm_dirty_gfn).
DIRTY_GFN_DTYPE = np.dtype([("flags", "<u4"), ("slot", "<u4"), ("offset", "<u8")])


class Vcpu:
    """One vCPU file descriptor with its mmap'd ``kvm_run`` page (and dirty ring, when the VM has one)."""

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int, dirty_ring_bytes: int = 0) -> None:
        self.fd = fd
        self.id = vcpu_id
        self._run_map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._run_page = memoryview(self._run_map)
        self.run_state = abi.kvm_run.from_buffer(self._run_map)
        self._ring_map: mmap.mmap | None = None
        self.dirty_ring: npt.NDArray[np.void] | None = None
        if dirty_ring_bytes:
            self._ring_map = mmap.mmap(fd, dirty_ring_bytes, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                                       offset=abi.KVM_DIRTY_LOG_PAGE_OFFSET * PAGE_SIZE)
            self.dirty_ring = np.frombuffer(self._ring_map, dtype=DIRTY_GFN_DTYPE)

    # --- running -----------------------------------------------------------------------------------

    def run(self) -> VcpuExit:
        """``KVM_RUN`` until the guest exits; a signal or ``immediate_exit`` gives :class:`Interrupted`."""
        try:
            ioctl(self.fd, abi.KVM_RUN)
        except InterruptedError:
            return Interrupted()
        except OSError as error:
            raise VcpuError(f"KVM_RUN on vCPU {self.id} failed: {describe_errno(error.errno or 0)}",
                            error.errno) from None
        return decode_exit(self.run_state, self._run_page)

    @property
    def immediate_exit(self) -> bool:
        """When set, ``KVM_RUN`` returns at once (after completing a pending I/O) instead of entering the guest."""
        return bool(self.run_state.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self.run_state.immediate_exit = int(value)

    # --- state -------------------------------------------------------------------------------------

    def get_regs(self) -> abi.kvm_regs:
        """General-purpose registers, RIP and RFLAGS."""
        regs = abi.kvm_regs()
        self._call(abi.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return regs

    def set_regs(self, regs: abi.kvm_regs) -> None:
        """Load general-purpose registers, RIP and RFLAGS."""
        self._call(abi.KVM_SET_REGS, regs, "KVM_SET_REGS")

    def get_sregs(self) -> abi.kvm_sregs:
        """Segment, control and descriptor-table registers."""
        sregs = abi.kvm_sregs()
        self._call(abi.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
        return sregs

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        """Load segment, control and descriptor-table registers."""
        self._call(abi.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """Values of the model-specific registers ``indices``."""
        buffer, entries = abi.msrs_buffer(indices)
        done = self._call(abi.KVM_GET_MSRS, buffer, "KVM_GET_MSRS")
        if done != len(indices):
            raise VcpuError(f"KVM_GET_MSRS on vCPU {self.id} read {done} of MSRs {[hex(i) for i in indices]}")
        return {entry.index: entry.data for entry in entries}

    def set_msrs(self, values: dict[int, int]) -> None:
        """Load model-specific registers."""
        buffer, entries = abi.msrs_buffer(list(values))
        for entry in entries:
            entry.data = values[entry.index]
        done = self._call(abi.KVM_SET_MSRS, buffer, "KVM_SET_MSRS")
        if done != len(values):
            raise VcpuError(f"KVM_SET_MSRS on vCPU {self.id} set {done} of MSRs {[hex(i) for i in values]}")

    def set_cpuid(self, cpuid: bytearray) -> None:
        """``KVM_SET_CPUID2`` with a ``kvm_cpuid2`` buffer (e.g. :meth:`Kvm.supported_cpuid`)."""
        self._call(abi.KVM_SET_CPUID2, bytearray(cpuid), "KVM_SET_CPUID2")

    # --- arm64 ---------------------------------------------------------------------------------------

    def arm_vcpu_init(self, init: abi.kvm_vcpu_init) -> None:
        """``KVM_ARM_VCPU_INIT``: reset the vCPU to ``init.target`` with its features (arm64)."""
        self._call(abi.KVM_ARM_VCPU_INIT, init, "KVM_ARM_VCPU_INIT")

    def get_one_reg(self, reg_id: int) -> int:
        """``KVM_GET_ONE_REG`` of a 64-bit register."""
        value = ctypes.c_uint64()
        self._call(abi.KVM_GET_ONE_REG, abi.kvm_one_reg(reg_id, ctypes.addressof(value)),
                   f"KVM_GET_ONE_REG {reg_id:#x}")
        return value.value

    def set_one_reg(self, reg_id: int, value: int) -> None:
        """``KVM_SET_ONE_REG`` of a 64-bit register."""
        holder = ctypes.c_uint64(value)
        self._call(abi.KVM_SET_ONE_REG, abi.kvm_one_reg(reg_id, ctypes.addressof(holder)),
                   f"KVM_SET_ONE_REG {reg_id:#x}")

    @property
    def tsc_khz(self) -> int:
        """The guest's TSC frequency in kHz (``KVM_GET_TSC_KHZ``)."""
        try:
            return ioctl(self.fd, abi.KVM_GET_TSC_KHZ)
        except OSError as error:
            raise KvmCapabilityError(f"KVM_GET_TSC_KHZ failed: {describe_errno(error.errno or 0)}") from None

    def _call(self, request: int, arg: ctypes.Structure | bytearray, name: str) -> int:
        try:
            return ioctl(self.fd, request, arg)
        except OSError as error:
            code = error.errno or 0
            hint = "; the guest state is invalid for this KVM" if code == errno.EINVAL else ""
            raise VcpuError(f"{name} on vCPU {self.id} failed: {describe_errno(code)}{hint}", code) from None

    def close(self) -> None:
        """Unmap the shared pages and close the vCPU."""
        if self.fd < 0:
            return
        del self.run_state
        self._run_page.release()
        self._run_map.close()
        if self._ring_map is not None:
            self.dirty_ring = None
            self._ring_map.close()
        os.close(self.fd)
        self.fd = -1
