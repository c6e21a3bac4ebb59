"""x86-64 long mode at CPL3: the guest's physical layout, page tables, segments and first registers.

Guest programs run in 64-bit user mode (CPL3) on an identity map of all of RAM: under PVM that is the
mode that runs natively, and on VMX/SVM it is just as valid. RFLAGS.IOPL = 3 lets ``out dx, al`` reach
the host as KVM_EXIT_IO without a fault. There is no IDT: any exception is a triple fault, which KVM
reports as a shutdown and the machine reports as a crash with registers.

Physical layout (the *system area* is the first 2 MiB; the rest is the workload area)::

    0x001000  PML4
    0x002000  PDPT
    0x003000  page directories, one per GiB of RAM (2 MiB pages)
    0x110000  control blocks, one 4 KiB page per vCPU (see programs.ControlBlock)
    0x180000  program code
    0x200000  workload area
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Literal

import numpy as np

from dirtylog.guest.arch import Layout
from dirtylog.kvm import abi
from dirtylog.kvm.errors import GuestMemoryError, VcpuError
from dirtylog.units import PAGE_SIZE, format_size

PML4_ADDR = 0x1000
PDPT_ADDR = 0x2000
PD_ADDR = 0x3000
CONTROL_ADDR = 0x110000
CODE_ADDR = 0x180000
WORKLOAD_ADDR = 0x200000

MAX_VCPUS = (CODE_ADDR - CONTROL_ADDR) // PAGE_SIZE
MAX_CODE_BYTES = WORKLOAD_ADDR - CODE_ADDR
MAX_MEMORY = 256 << 30  # one page directory per GiB, between PD_ADDR and CONTROL_ADDR

# Page-table entry bits.
PTE_PRESENT, PTE_WRITABLE, PTE_USER = 1 << 0, 1 << 1, 1 << 2
PTE_ACCESSED, PTE_DIRTY, PTE_LARGE = 1 << 5, 1 << 6, 1 << 7

# Control registers and EFER.
CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_AM, CR0_PG = 1, 1 << 1, 1 << 4, 1 << 5, 1 << 16, 1 << 18, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 5, 1 << 9, 1 << 10
EFER_SCE, EFER_LME, EFER_LMA = 1, 1 << 8, 1 << 10

USER_CODE_SELECTOR = 0x2B  # GDT index 5, RPL 3, as Linux's __USER_CS
USER_DATA_SELECTOR = 0x23  # GDT index 4, RPL 3, as Linux's __USER_DS
RFLAGS_IOPL3 = 0x3002  # IOPL 3 and the always-one bit 1

HugePage = Literal["2M", "1G"]


@dataclass(frozen=True)
class PageTables:
    """What :func:`page_tables` built: its pages and how RAM is mapped."""

    page_size: HugePage
    table_pages: int  # 4 KiB pages the tables occupy, from PML4_ADDR


def check_memory_size(size: int) -> None:
    """Refuse sizes the layout cannot hold."""
    if size <= WORKLOAD_ADDR:
        raise GuestMemoryError(f"guest memory of {format_size(size)} leaves no workload area: the first "
                               f"{format_size(WORKLOAD_ADDR)} hold page tables and programs; give more")
    if size > MAX_MEMORY:
        raise GuestMemoryError(f"guest memory of {format_size(size)} is more than the {format_size(MAX_MEMORY)} "
                               "this guest layout maps")


def page_tables(ram: np.ndarray | int, page_size: HugePage = "2M") -> tuple[PageTables, dict[int, np.ndarray]]:
    """Identity-map all of ``ram`` (guest RAM, or its size in bytes) with 2 MiB or 1 GiB pages (user,
    writable, accessed, dirty).

    Returns the layout and the table contents by guest-physical address, for the caller to write
    through guest memory (so the host-dirty record sees them).
    """
    size = ram if isinstance(ram, int) else ram.size
    check_memory_size(size)
    gib = -(-size // (1 << 30))
    # Accessed and dirty are set up front: the CPU then never writes them back, so the page tables
    # stay clean in the dirty log and only the workload area and the control blocks are ever written.
    flags = PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_ACCESSED
    leaf = flags | PTE_DIRTY | PTE_LARGE
    pml4 = np.zeros(512, dtype=np.uint64)
    pml4[0] = PDPT_ADDR | flags
    pdpt = np.zeros(512, dtype=np.uint64)
    tables: dict[int, np.ndarray] = {PML4_ADDR: pml4, PDPT_ADDR: pdpt}
    if page_size == "1G":
        pdpt[:gib] = (np.arange(gib, dtype=np.uint64) << np.uint64(30)) | np.uint64(leaf)
        return PageTables(page_size, 2), tables
    pdpt[:gib] = (PD_ADDR + np.arange(gib, dtype=np.uint64) * PAGE_SIZE) | np.uint64(flags)
    large = -(-size // (1 << 21))
    directories = np.zeros(gib * 512, dtype=np.uint64)
    directories[:large] = (np.arange(large, dtype=np.uint64) << np.uint64(21)) | np.uint64(leaf)
    tables[PD_ADDR] = directories
    return PageTables(page_size, 2 + gib), tables


def _segment(selector: int, code: bool) -> abi.kvm_segment:
    segment = abi.kvm_segment()
    segment.base, segment.limit, segment.selector = 0, 0xFFFFFFFF, selector
    segment.type = 0xB if code else 0x3  # execute/read or read/write, accessed
    segment.present, segment.dpl, segment.s, segment.g = 1, 3, 1, 1
    segment.l, segment.db = (1, 0) if code else (0, 1)
    return segment


def long_mode_sregs(sregs: abi.kvm_sregs) -> abi.kvm_sregs:
    """``sregs`` (as read from a fresh vCPU) switched to 64-bit mode at CPL3 on our page tables."""
    sregs.cs = _segment(USER_CODE_SELECTOR, code=True)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, _segment(USER_DATA_SELECTOR, code=False))
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG
    sregs.cr3 = PML4_ADDR
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sregs.efer = EFER_SCE | EFER_LME | EFER_LMA
    return sregs


def entry_regs(control_block: int, vcpu_index: int) -> abi.kvm_regs:
    """First registers of a vCPU: RIP at the program, RDI its control block, RSI its index."""
    if vcpu_index >= MAX_VCPUS:
        raise VcpuError(f"vCPU {vcpu_index}: this guest layout has control blocks for {MAX_VCPUS} vCPUs")
    regs = abi.kvm_regs()
    regs.rip = CODE_ADDR
    regs.rdi = control_block
    regs.rsi = vcpu_index
    regs.rsp = control_block + PAGE_SIZE  # top of the control block page; our programs push nothing
    regs.rflags = RFLAGS_IOPL3
    return regs


def control_block_addr(vcpu_index: int) -> int:
    """Guest-physical address of vCPU ``vcpu_index``'s control block."""
    return CONTROL_ADDR + vcpu_index * PAGE_SIZE


def supports_1g_pages(cpuid: bytearray) -> bool:
    """Whether a ``kvm_cpuid2`` buffer offers 1 GiB pages (CPUID 0x80000001 EDX bit 26, Page1GB)."""
    count = abi.kvm_cpuid2.from_buffer(cpuid).nent
    entries = (abi.kvm_cpuid_entry2 * count).from_buffer(cpuid, ctypes.sizeof(abi.kvm_cpuid2))
    return any(entry.function == 0x8000_0001 and entry.edx >> 26 & 1 for entry in entries)


LAYOUT = Layout(CONTROL_ADDR, CODE_ADDR, WORKLOAD_ADDR, MAX_MEMORY)
