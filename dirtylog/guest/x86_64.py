"""The x86-64 guest architecture: long mode at CPL3 (``x86``), programs assembled with iced-x86 (``programs``),
and the host's view of its vCPUs: registers, state, and ``out dx, al`` as the call to the host."""

from __future__ import annotations

import ctypes
import struct
from typing import Any

from dirtylog.guest.arch import Architecture, ArchitectureError, GuestCall, GuestProgram
from dirtylog.guest.asm import disassemble
from dirtylog.guest.programs import build_program
from dirtylog.guest.x86 import (
    LAYOUT,
    check_memory_size,
    control_block_addr,
    entry_regs,
    long_mode_sregs,
    page_tables,
    supports_1g_pages,
)
from dirtylog.kvm import abi
from dirtylog.kvm.errors import GuestMemoryError, VcpuError
from dirtylog.kvm.exits import IoOut, VcpuExit
from dirtylog.kvm.system import Kvm, Vm
from dirtylog.kvm.vcpu import Vcpu

_REGS_FORMAT = "<18Q"


class X86_64(Architecture):
    """x86-64 guests: long mode at CPL3 on identity-mapped huge pages; ``out dx, al`` calls the host."""

    name = "x86_64"
    layout = LAYOUT
    pc_register = "rip"

    def check_memory_size(self, size: int) -> None:
        check_memory_size(size)

    def boot_memory(self, ram_size: int, page_size: str) -> dict[int, bytes]:
        if page_size not in ("2M", "1G"):
            raise GuestMemoryError(f"x86-64 guests map RAM with 2M or 1G pages, not {page_size!r}")
        _, tables = page_tables(ram_size, "1G" if page_size == "1G" else "2M")
        return {address: entries.tobytes() for address, entries in tables.items()}

    def check_page_size(self, kvm: Kvm, page_size: str) -> None:
        if page_size == "1G" and not supports_1g_pages(kvm.supported_cpuid()):
            raise ArchitectureError(f"this KVM ({kvm.host_type}) does not offer 1 GiB pages to guests (CPUID Page1GB); "
                            "use page_size='2M'")

    def setup_vcpu(self, kvm: Kvm, vm: Vm, vcpu: Vcpu, index: int) -> None:
        if self._cpuid is None:
            self._cpuid = kvm.supported_cpuid()
        vcpu.set_cpuid(self._cpuid)
        vcpu.set_sregs(long_mode_sregs(vcpu.get_sregs()))
        vcpu.set_regs(entry_regs(control_block_addr(index), index))

    _cpuid: bytearray | None = None

    def counter_hz(self, vcpu: Vcpu) -> int:
        return vcpu.tsc_khz * 1000

    def registers(self, vcpu: Vcpu) -> abi.kvm_regs:
        return vcpu.get_regs()

    def register_values(self, regs: Any) -> dict[str, int]:
        return {field[0]: getattr(regs, field[0]) for field in abi.kvm_regs._fields_}

    def save_state(self, vcpu: Vcpu, regs: Any) -> bytes:
        sregs = vcpu.get_sregs()
        tsc = vcpu.get_msrs([abi.MSR_IA32_TSC])[abi.MSR_IA32_TSC]
        return bytes(regs) + bytes(sregs) + struct.pack("<Q", tsc)

    def load_state(self, vcpu: Vcpu, state: bytes) -> abi.kvm_regs:
        regs_size, sregs_size = struct.calcsize(_REGS_FORMAT), ctypes.sizeof(abi.kvm_sregs)
        if len(state) != regs_size + sregs_size + 8:
            raise VcpuError(f"vCPU state of {len(state)} bytes is not the {regs_size + sregs_size + 8} expected")
        regs = abi.kvm_regs.from_buffer_copy(state[:regs_size])
        sregs = abi.kvm_sregs.from_buffer_copy(state[regs_size:regs_size + sregs_size])
        (tsc,) = struct.unpack("<Q", state[regs_size + sregs_size:])
        vcpu.set_sregs(sregs)
        vcpu.set_regs(regs)
        vcpu.set_msrs({abi.MSR_IA32_TSC: tsc})
        return regs

    def guest_call(self, exit_: VcpuExit, vcpu: Vcpu) -> tuple[GuestCall, int] | None:
        if not isinstance(exit_, IoOut) or exit_.port not in _CALLS:
            return None
        call = GuestCall(exit_.port)
        return call, (int(vcpu.get_regs().rcx) if call is GuestCall.SLEEP else 0)

    def fault_address(self, vcpu: Vcpu) -> int:
        return int(vcpu.get_sregs().cr2)

    def build_program(self, name: str) -> GuestProgram:
        return build_program(name)

    def disassemble(self, program: GuestProgram, memory: bytes, address: int, pc: int) -> tuple[str, ...]:
        return tuple(disassemble(memory, address, count=3))


_CALLS = frozenset(int(call) for call in GuestCall)
