"""The ABI layer's numbers and layouts against values known from the kernel headers."""

import ctypes

from dirtylog.kvm import abi


def test_ioctl_numbers_match_the_kernel() -> None:
    assert abi.KVM_SET_USER_MEMORY_REGION == 0x4020AE46
    assert abi.KVM_GET_DIRTY_LOG == 0x4010AE42
    assert abi.KVM_CLEAR_DIRTY_LOG == 0xC018AEC0
    assert abi.KVM_RUN == 0xAE80
    assert abi.KVM_GET_REGS == 0x8090AE81
    assert abi.KVM_SET_SREGS == 0x4138AE84
    assert abi.KVM_ENABLE_CAP == 0x4068AEA3
    assert abi.KVM_RESET_DIRTY_RINGS == 0xAEC7


def test_structure_layouts() -> None:
    assert ctypes.sizeof(abi.kvm_regs) == 144
    assert ctypes.sizeof(abi.kvm_segment) == 24
    assert ctypes.sizeof(abi.kvm_sregs) == 312
    assert ctypes.sizeof(abi.kvm_dirty_gfn) == 16
    assert ctypes.sizeof(abi.kvm_cpuid_entry2) == 40
    assert abi.kvm_run.exit.offset == 32
    assert abi.kvm_run_io.data_offset.offset == 8


def test_msr_buffer_holds_the_requested_indices() -> None:
    buffer, entries = abi.msrs_buffer([abi.MSR_IA32_TSC, 0x1B])
    assert abi.kvm_msrs.from_buffer(buffer).nmsrs == 2
    assert [entry.index for entry in entries] == [0x10, 0x1B]
    assert len(buffer) == 8 + 2 * 16


def test_arm64_ioctl_numbers_and_register_ids_match_the_kernel() -> None:
    """Values from arch/arm64/include/uapi/asm/kvm.h and include/uapi/linux/kvm.h (as QEMU and kvmtool use
    them), pinned so the arm64 lab's guests are set up with the kernel's numbers, not ours."""
    assert abi.KVM_ARM_PREFERRED_TARGET == 0x8020AEAF
    assert abi.KVM_ARM_VCPU_INIT == 0x4020AEAE
    assert abi.KVM_SET_ONE_REG == 0x4010AEAC
    assert abi.KVM_GET_ONE_REG == 0x4010AEAB
    assert abi.ARM64_REG_X[0] == 0x6030_0000_0010_0000
    assert abi.ARM64_REG_X[30] == 0x6030_0000_0010_003C
    assert abi.ARM64_REG_SP == 0x6030_0000_0010_003E
    assert abi.ARM64_REG_PC == 0x6030_0000_0010_0040
    assert abi.ARM64_REG_PSTATE == 0x6030_0000_0010_0042
    assert abi.ARM64_REG_SP_EL1 == 0x6030_0000_0010_0044
    assert abi.ARM64_REG_ESR_EL1 == 0x6030_0000_0013_C290
    assert abi.KVM_REG_ARM_TIMER_CNT == 0x6030_0000_0013_DF1A
    assert ctypes.sizeof(abi.kvm_vcpu_init) == 32
