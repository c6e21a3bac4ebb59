"""arm64 guests: EL1 with the MMU off on guest-physical RAM, set up with ``KVM_ARM_VCPU_INIT`` and ``ONE_REG``.

The program runs at EL1 (``PSTATE`` = EL1h, every exception masked) with stage 1 off, so its addresses
are guest-physical and nothing needs to be written into RAM before start: stage 2, the translation
dirty logging works on, is KVM's alone. The guest calls the host by storing to a page outside every
memory slot (:data:`CALL_PAGE`), which KVM reports as KVM_EXIT_MMIO with the address and the value.

With the MMU off, the guest's data accesses are of the Device type. QEMU's emulation has no caches, so
the host sees every guest store; on hardware without FEAT_S2FWB (forced write-back at stage 2) a host
could read stale cache lines of memory such a guest wrote, which matters only to the stamp verifier.

Physical layout (as on x86, so the same workload area and control blocks)::

    0x110000  control blocks, one 4 KiB page per vCPU
    0x180000  program code
    0x200000  workload area
    0xF000000000  the guest-call page (no memory slot: MMIO), inside the default 40-bit IPA space
"""

from __future__ import annotations

import struct
from typing import Any

from dirtylog.guest import programs_arm64
from dirtylog.guest.a64 import disassemble
from dirtylog.guest.arch import Architecture, ArchitectureError, GuestCall, GuestProgram, Layout
from dirtylog.kvm import abi
from dirtylog.kvm.errors import GuestMemoryError, VcpuError
from dirtylog.kvm.exits import Mmio, VcpuExit
from dirtylog.kvm.system import Kvm, Vm
from dirtylog.kvm.vcpu import Vcpu
from dirtylog.units import format_size

CONTROL_ADDR = 0x110000
CODE_ADDR = 0x180000
WORKLOAD_ADDR = 0x200000
CALL_PAGE = 0xF0_0000_0000
MAX_MEMORY = 256 << 30
LAYOUT = Layout(CONTROL_ADDR, CODE_ADDR, WORKLOAD_ADDR, MAX_MEMORY)

#: The registers a parked vCPU saves, in this order: x0-x30, sp, pc, pstate, sp_el1, elr_el1, spsr_el1.
REGISTER_NAMES = (*(f"x{n}" for n in range(31)), "sp", "pc", "pstate", "sp_el1", "elr_el1", "spsr_el1")
REGISTER_IDS = (*abi.ARM64_REG_X, abi.ARM64_REG_SP, abi.ARM64_REG_PC, abi.ARM64_REG_PSTATE, abi.ARM64_REG_SP_EL1,
                abi.ARM64_REG_ELR_EL1, abi.ARM64_REG_SPSR_EL1)
_STATE = struct.Struct(f"<{len(REGISTER_IDS) + 1}Q")  # the registers, then the virtual counter
_CALLS = {CALL_PAGE + programs_arm64.call_offset(call): call for call in GuestCall}


class Arm64Registers(dict[str, int]):
    """A parked vCPU's registers by name (``x0``..``x30``, ``sp``, ``pc``, ...); ``regs.pc`` reads as ``regs["pc"]``."""

    def __getattr__(self, name: str) -> int:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class Arm64(Architecture):
    """arm64 guests at EL1, MMU off; a store to the guest-call page calls the host."""

    name = "aarch64"
    layout = LAYOUT
    pc_register = "pc"

    def __init__(self) -> None:
        self._target: abi.kvm_vcpu_init | None = None

    def check_memory_size(self, size: int) -> None:
        if size <= WORKLOAD_ADDR:
            raise GuestMemoryError(f"guest memory of {format_size(size)} leaves no workload area: the first "
                                   f"{format_size(WORKLOAD_ADDR)} hold control blocks and programs; give more")
        if size > MAX_MEMORY:
            raise GuestMemoryError(f"guest memory of {format_size(size)} is more than the {format_size(MAX_MEMORY)} "
                                   "this guest layout maps")

    def boot_memory(self, ram_size: int, page_size: str) -> dict[int, bytes]:
        return {}  # stage 1 is off: no page tables

    def check_page_size(self, kvm: Kvm, page_size: str) -> None:
        if page_size != "2M":
            raise ArchitectureError(f"arm64 guests run with stage 1 off; page_size {page_size!r} means nothing "
                                    "there (the host's backing decides stage-2 block sizes)")

    def setup_vcpu(self, kvm: Kvm, vm: Vm, vcpu: Vcpu, index: int) -> None:
        if self._target is None:
            self._target = vm.arm_preferred_target()
        init = abi.kvm_vcpu_init()
        init.target = self._target.target
        init.features[0] = 1 << abi.KVM_ARM_VCPU_PSCI_0_2
        vcpu.arm_vcpu_init(init)
        vcpu.set_one_reg(abi.ARM64_REG_PC, CODE_ADDR)
        vcpu.set_one_reg(abi.ARM64_REG_PSTATE, abi.PSR_MODE_EL1H | abi.PSR_DAIF_MASKED)
        vcpu.set_one_reg(abi.ARM64_REG_SP_EL1, LAYOUT.control_block_addr(index) + 4096)
        vcpu.set_one_reg(abi.ARM64_REG_X[0], LAYOUT.control_block_addr(index))
        vcpu.set_one_reg(abi.ARM64_REG_X[1], index)

    def counter_hz(self, vcpu: Vcpu) -> int:
        return 0  # the guest reads cntfrq_el0 itself

    def registers(self, vcpu: Vcpu) -> Arm64Registers:
        return Arm64Registers(zip(REGISTER_NAMES, (vcpu.get_one_reg(reg) for reg in REGISTER_IDS), strict=True))

    def register_values(self, regs: Any) -> dict[str, int]:
        return dict(regs)

    def save_state(self, vcpu: Vcpu, regs: Any) -> bytes:
        values = [regs[name] for name in REGISTER_NAMES]
        return _STATE.pack(*values, vcpu.get_one_reg(abi.KVM_REG_ARM_TIMER_CNT))

    def load_state(self, vcpu: Vcpu, state: bytes) -> Arm64Registers:
        if len(state) != _STATE.size:
            raise VcpuError(f"arm64 vCPU state of {len(state)} bytes is not the {_STATE.size} expected")
        *values, counter = _STATE.unpack(state)
        for reg, value in zip(REGISTER_IDS, values, strict=True):
            vcpu.set_one_reg(reg, value)
        vcpu.set_one_reg(abi.KVM_REG_ARM_TIMER_CNT, counter)
        return Arm64Registers(zip(REGISTER_NAMES, values, strict=True))

    def guest_call(self, exit_: VcpuExit, vcpu: Vcpu) -> tuple[GuestCall, int] | None:
        if not isinstance(exit_, Mmio) or not exit_.is_write or exit_.phys_addr not in _CALLS:
            return None
        return _CALLS[exit_.phys_addr], int.from_bytes(exit_.data, "little")

    def fault_address(self, vcpu: Vcpu) -> int:
        return vcpu.get_one_reg(abi.ARM64_REG_FAR_EL1)

    def build_program(self, name: str) -> GuestProgram:
        return programs_arm64.build_program(name, CODE_ADDR, CALL_PAGE, LAYOUT.max_code_bytes)

    def disassemble(self, program: GuestProgram, memory: bytes, address: int, pc: int) -> tuple[str, ...]:
        return tuple(disassemble(program.listing, memory, address, pc))
