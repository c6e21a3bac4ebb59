"""Kvm and Vm wrappers on the real /dev/kvm, and their errors."""

from __future__ import annotations

import mmap

import pytest

from dirtylog.kvm import abi
from dirtylog.kvm.errors import KvmUnavailableError, MemorySlotError
from dirtylog.kvm.system import Kvm

pytestmark = pytest.mark.kvm
MiB = 1 << 20


def test_missing_device_says_there_is_no_kvm(tmp_path: object) -> None:
    with pytest.raises(KvmUnavailableError, match="does not exist: this host has no KVM"):
        Kvm("/nonexistent/kvm")


def test_a_device_that_is_not_kvm_is_named() -> None:
    with pytest.raises(KvmUnavailableError, match="/dev/null is not a KVM device"):
        Kvm("/dev/null")


def test_capabilities_needed_for_dirty_logging() -> None:
    with Kvm() as kvm:
        assert kvm.api_version == 12
        assert kvm.check_extension(abi.KVM_CAP_USER_MEMORY) == 1
        assert kvm.max_memslots >= 32
        assert kvm.max_vcpus >= 2
        assert kvm.host_type in {"PVM", "VMX", "SVM"}


@pytest.fixture
def vm_and_memory():  # type: ignore[no-untyped-def]
    kvm = Kvm()
    vm = kvm.create_vm()
    memory = mmap.mmap(-1, 8 * MiB)
    import ctypes

    address = ctypes.addressof(ctypes.c_char.from_buffer(memory))
    yield vm, address
    vm.close()
    kvm.close()


def test_slots_are_added_moved_flagged_and_deleted(vm_and_memory) -> None:  # type: ignore[no-untyped-def]
    vm, address = vm_and_memory
    slot = vm.add_slot(0, 0, 4 * MiB, address)
    assert (slot.base_gfn, slot.npages, slot.bitmap_bytes) == (0, 1024, 128)
    vm.add_slot(1, 4 * MiB, 4 * MiB, address + 4 * MiB)
    assert vm.set_slot_flags(1, abi.KVM_MEM_LOG_DIRTY_PAGES).logging
    assert vm.move_slot(0, 16 * MiB).guest_phys_addr == 16 * MiB
    vm.delete_slot(0)
    assert sorted(vm.slots) == [1]


def test_overlapping_slots_are_refused_with_both_ranges(vm_and_memory) -> None:  # type: ignore[no-untyped-def]
    vm, address = vm_and_memory
    vm.add_slot(0, 0, 4 * MiB, address)
    with pytest.raises(MemorySlotError, match="overlaps slot 0"):
        vm.add_slot(1, 2 * MiB, 4 * MiB, address + 4 * MiB)


def test_misaligned_slot_size_names_the_page_size(vm_and_memory) -> None:  # type: ignore[no-untyped-def]
    vm, address = vm_and_memory
    with pytest.raises(MemorySlotError, match="size 0x1001 is not a multiple of the 4096-byte page size"):
        vm.add_slot(0, 0, 4097, address)


def test_slot_number_beyond_the_limit_names_the_limit(vm_and_memory) -> None:  # type: ignore[no-untyped-def]
    vm, address = vm_and_memory
    with pytest.raises(MemorySlotError, match="too large: this KVM allows"):
        vm.add_slot(vm.kvm.max_memslots + 5, 0, 4 * MiB, address)


def test_deleting_an_unknown_slot_lists_the_slots(vm_and_memory) -> None:  # type: ignore[no-untyped-def]
    vm, address = vm_and_memory
    vm.add_slot(3, 0, 4 * MiB, address)
    with pytest.raises(MemorySlotError, match=r"slot 7 does not exist; slots are \[3\]"):
        vm.delete_slot(7)
