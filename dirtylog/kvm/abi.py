"""The KVM userspace ABI: ctypes structures, ioctl numbers, capabilities and exit reasons.

Mirrors ``include/uapi/linux/kvm.h``, ``arch/x86/include/uapi/asm/kvm.h`` (x86-64) and
``arch/arm64/include/uapi/asm/kvm.h`` (arm64; its names carry ``arm64`` where x86 has the same one), nothing more:
no behaviour lives here. Ioctl numbers are computed from ``ctypes.sizeof`` of the structure they carry,
as the kernel's ``_IOW``/``_IOR`` macros do, so a wrong field layout shows up as a wrong number in
``tests/kvm/test_abi.py`` rather than as memory corruption.
"""

from __future__ import annotations

import ctypes

# --- ioctl number encoding (asm-generic/ioctl.h) -------------------------------------------------

_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _iow(nr: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_WRITE, nr, ctypes.sizeof(struct))


def _ior(nr: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_READ, nr, ctypes.sizeof(struct))


def _iowr(nr: int, struct: type[ctypes.Structure]) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ctypes.sizeof(struct))


u8, u16, u32, u64 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32, ctypes.c_uint64

# --- structures ----------------------------------------------------------------------------------


class kvm_userspace_memory_region(ctypes.Structure):
    _fields_ = [
        ("slot", u32),
        ("flags", u32),
        ("guest_phys_addr", u64),
        ("memory_size", u64),
        ("userspace_addr", u64),
    ]


class kvm_dirty_log(ctypes.Structure):
    _fields_ = [("slot", u32), ("padding1", u32), ("dirty_bitmap", u64)]


class kvm_clear_dirty_log(ctypes.Structure):
    _fields_ = [("slot", u32), ("num_pages", u32), ("first_page", u64), ("dirty_bitmap", u64)]


class kvm_enable_cap(ctypes.Structure):
    _fields_ = [("cap", u32), ("flags", u32), ("args", u64 * 4), ("pad", u8 * 64)]


class kvm_regs(ctypes.Structure):
    _fields_ = [
        (name, u64)
        for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12",
                     "r13", "r14", "r15", "rip", "rflags")
    ]


class kvm_segment(ctypes.Structure):
    _fields_ = [
        ("base", u64),
        ("limit", u32),
        ("selector", u16),
        ("type", u8),
        ("present", u8),
        ("dpl", u8),
        ("db", u8),
        ("s", u8),
        ("l", u8),
        ("g", u8),
        ("avl", u8),
        ("unusable", u8),
        ("padding", u8),
    ]


class kvm_dtable(ctypes.Structure):
    _fields_ = [("base", u64), ("limit", u16), ("padding", u16 * 3)]


KVM_NR_INTERRUPTS = 256


class kvm_sregs(ctypes.Structure):
    _fields_ = [
        *[(name, kvm_segment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")],
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        *[(name, u64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base")],
        ("interrupt_bitmap", u64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_msr_entry(ctypes.Structure):
    _fields_ = [("index", u32), ("reserved", u32), ("data", u64)]


class kvm_msrs(ctypes.Structure):
    """Header only: the kernel reads ``nmsrs`` entries that follow it (see :func:`msrs_buffer`)."""

    _fields_ = [("nmsrs", u32), ("pad", u32)]


class kvm_cpuid_entry2(ctypes.Structure):
    _fields_ = [
        ("function", u32),
        ("index", u32),
        ("flags", u32),
        ("eax", u32),
        ("ebx", u32),
        ("ecx", u32),
        ("edx", u32),
        ("padding", u32 * 3),
    ]


class kvm_cpuid2(ctypes.Structure):
    """Header only: ``nent`` entries of :class:`kvm_cpuid_entry2` follow it."""

    _fields_ = [("nent", u32), ("padding", u32)]


class kvm_dirty_gfn(ctypes.Structure):
    """One dirty-ring entry; ``flags`` is the handshake word between KVM and userspace."""

    _fields_ = [("flags", u32), ("slot", u32), ("offset", u64)]


class kvm_run_io(ctypes.Structure):
    _fields_ = [("direction", u8), ("size", u8), ("port", u16), ("count", u32), ("data_offset", u64)]


class kvm_run_fail_entry(ctypes.Structure):
    _fields_ = [("hardware_entry_failure_reason", u64), ("cpu", u32)]


class kvm_run_internal(ctypes.Structure):
    _fields_ = [("suberror", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_mmio(ctypes.Structure):
    _fields_ = [("phys_addr", u64), ("data", u8 * 8), ("len", u32), ("is_write", u8)]


class kvm_run_system_event(ctypes.Structure):
    _fields_ = [("type", u32), ("ndata", u32), ("data", u64 * 16)]


class kvm_run_exit(ctypes.Union):
    _fields_ = [
        ("hardware_exit_reason", u64),
        ("fail_entry", kvm_run_fail_entry),
        ("io", kvm_run_io),
        ("mmio", kvm_run_mmio),
        ("internal", kvm_run_internal),
        ("system_event", kvm_run_system_event),
        ("padding", ctypes.c_char * 256),
    ]


class kvm_run(ctypes.Structure):
    """The head of the shared ``kvm_run`` page; the kernel's sync-regs tail is not used."""

    _fields_ = [
        ("request_interrupt_window", u8),
        ("immediate_exit", u8),
        ("padding1", u8 * 6),
        ("exit_reason", u32),
        ("ready_for_interrupt_injection", u8),
        ("if_flag", u8),
        ("flags", u16),
        ("cr8", u64),
        ("apic_base", u64),
        ("exit", kvm_run_exit),
    ]


# --- ioctl numbers ---------------------------------------------------------------------------------

# /dev/kvm
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, kvm_cpuid2)
# VM
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, kvm_dirty_log)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, kvm_userspace_memory_region)
KVM_ENABLE_CAP = _iow(0xA3, kvm_enable_cap)
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, kvm_clear_dirty_log)
KVM_RESET_DIRTY_RINGS = _io(0xC7)
# vCPU
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, kvm_regs)
KVM_SET_REGS = _iow(0x82, kvm_regs)
KVM_GET_SREGS = _ior(0x83, kvm_sregs)
KVM_SET_SREGS = _iow(0x84, kvm_sregs)
KVM_GET_MSRS = _iowr(0x88, kvm_msrs)
KVM_SET_MSRS = _iow(0x89, kvm_msrs)
KVM_SET_CPUID2 = _iow(0x90, kvm_cpuid2)
KVM_GET_TSC_KHZ = _io(0xA3)

KVM_API_VERSION = 12

# --- capabilities ----------------------------------------------------------------------------------

KVM_CAP_USER_MEMORY = 3
KVM_CAP_NR_VCPUS = 9
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_MAX_VCPUS = 66
KVM_CAP_READONLY_MEM = 81
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168
KVM_CAP_DIRTY_LOG_RING = 192
KVM_CAP_DIRTY_LOG_RING_ACQ_REL = 223
KVM_CAP_DIRTY_LOG_RING_WITH_BITMAP = 225

# KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 arguments
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1

# memory slot flags
KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1

# dirty ring
KVM_DIRTY_LOG_PAGE_OFFSET = 64  # in pages of the vCPU mmap (x86)
KVM_DIRTY_GFN_F_DIRTY = 1 << 0
KVM_DIRTY_GFN_F_RESET = 1 << 1

# --- exits -----------------------------------------------------------------------------------------

KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_DIRTY_RING_FULL = 31

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

EXIT_REASON_NAMES = {
    value: name.removeprefix("KVM_EXIT_")
    for name, value in globals().items()
    if name.startswith("KVM_EXIT_") and not name.startswith("KVM_EXIT_IO_")
}

# --- arm64 (arch/arm64/include/uapi/asm/kvm.h) -------------------------------------------------------


class kvm_vcpu_init(ctypes.Structure):
    """``KVM_ARM_VCPU_INIT``'s argument: the target CPU type and feature bits."""

    _fields_ = [("target", u32), ("features", u32 * 7)]


class kvm_one_reg(ctypes.Structure):
    """``KVM_GET/SET_ONE_REG``'s argument: a register id and the address of its value."""

    _fields_ = [("id", u64), ("addr", u64)]


class user_pt_regs(ctypes.Structure):
    _fields_ = [("regs", u64 * 31), ("sp", u64), ("pc", u64), ("pstate", u64)]


class user_fpsimd_state(ctypes.Structure):
    _fields_ = [("vregs", u64 * 64), ("fpsr", u32), ("fpcr", u32), ("reserved", u32 * 2)]


class kvm_regs_arm64(ctypes.Structure):
    """arm64's ``struct kvm_regs``: never passed whole (arm64 has no KVM_GET_REGS); its field offsets are the
    ids of the core registers for ``ONE_REG``."""

    _fields_ = [("regs", user_pt_regs), ("sp_el1", u64), ("elr_el1", u64), ("spsr", u64 * 5),
                ("pad", u64),  # fp_regs holds __uint128_t vregs: C aligns it to 16 bytes
                ("fp_regs", user_fpsimd_state)]


KVM_REG_ARM64 = 0x6000_0000_0000_0000
KVM_REG_SIZE_U64 = 0x0030_0000_0000_0000
KVM_REG_ARM_CORE = 0x0010 << 16
KVM_REG_ARM64_SYSREG = 0x0013 << 16


def arm64_core_reg(offset: int) -> int:
    """ONE_REG id of the 64-bit core register at byte ``offset`` of arm64's ``struct kvm_regs``."""
    return KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM_CORE | offset // 4


def arm64_sysreg(op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    """ONE_REG id of a system register, by its encoding (``ARM64_SYS_REG``)."""
    return (KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM64_SYSREG
            | op0 << 14 | op1 << 11 | crn << 7 | crm << 3 | op2)


_PT_REGS = kvm_regs_arm64.regs.offset
ARM64_REG_X = [arm64_core_reg(_PT_REGS + 8 * n) for n in range(31)]
ARM64_REG_SP = arm64_core_reg(_PT_REGS + user_pt_regs.sp.offset)
ARM64_REG_PC = arm64_core_reg(_PT_REGS + user_pt_regs.pc.offset)
ARM64_REG_PSTATE = arm64_core_reg(_PT_REGS + user_pt_regs.pstate.offset)
ARM64_REG_SP_EL1 = arm64_core_reg(kvm_regs_arm64.sp_el1.offset)
ARM64_REG_ELR_EL1 = arm64_core_reg(kvm_regs_arm64.elr_el1.offset)
ARM64_REG_SPSR_EL1 = arm64_core_reg(kvm_regs_arm64.spsr.offset)
ARM64_REG_ESR_EL1 = arm64_sysreg(3, 0, 5, 2, 0)
ARM64_REG_FAR_EL1 = arm64_sysreg(3, 0, 6, 0, 0)
ARM64_REG_VBAR_EL1 = arm64_sysreg(3, 0, 12, 0, 0)
KVM_REG_ARM_TIMER_CNT = arm64_sysreg(3, 3, 14, 3, 2)  # the guest's virtual counter (CNTVCT_EL0)

# PSTATE: EL1 using SP_EL1, with debug, SError, IRQ and FIQ masked.
PSR_MODE_EL1H = 0x5
PSR_DAIF_MASKED = 0xF << 6

KVM_ARM_VCPU_PSCI_0_2 = 2

KVM_ARM_VCPU_INIT = _iow(0xAE, kvm_vcpu_init)
KVM_ARM_PREFERRED_TARGET = _ior(0xAF, kvm_vcpu_init)
KVM_GET_ONE_REG = _iow(0xAB, kvm_one_reg)
KVM_SET_ONE_REG = _iow(0xAC, kvm_one_reg)

# --- x86 MSRs ---------------------------------------------------------------------------------------

MSR_IA32_TSC = 0x10


def msrs_buffer(indices: list[int]) -> tuple[bytearray, ctypes.Array[kvm_msr_entry]]:
    """A ``kvm_msrs`` header followed by entries for ``indices``, and a view of those entries."""
    header = ctypes.sizeof(kvm_msrs)
    buffer = bytearray(header + len(indices) * ctypes.sizeof(kvm_msr_entry))
    kvm_msrs.from_buffer(buffer).nmsrs = len(indices)
    entries = (kvm_msr_entry * len(indices)).from_buffer(buffer, header)
    for entry, index in zip(entries, indices, strict=True):
        entry.index = index
    return buffer, entries


def cpuid_buffer(nent: int) -> tuple[bytearray, ctypes.Array[kvm_cpuid_entry2]]:
    """A ``kvm_cpuid2`` header with room for ``nent`` entries, and a view of those entries."""
    header = ctypes.sizeof(kvm_cpuid2)
    buffer = bytearray(header + nent * ctypes.sizeof(kvm_cpuid_entry2))
    kvm_cpuid2.from_buffer(buffer).nent = nent
    return buffer, (kvm_cpuid_entry2 * nent).from_buffer(buffer, header)
