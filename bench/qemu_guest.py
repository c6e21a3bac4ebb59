"""QEMU side by side: a tiny guest of our own, no OS, run by QEMU with KVM and driven over QMP.

The benchmarks compare dirtylog with QEMU on the same guest shape (bench/dirty_rate.py: QEMU's
``calc-dirty-rate``; later the migration bench: QEMU to QEMU over QMP). The guest runs *our* workload
programs (dirtylog/guest/programs.py), so everything dirtylog knows about its own guests holds here too:
the same control blocks, the same progress counters, the same deterministic writes, hence the same
ground truth (dirtylog/rate/truth.py).

How it boots: QEMU's ``-kernel`` loads a multiboot (v1) image built here with iced-x86. The bootstrap
processor enters it in 32-bit protected mode without paging, copies a real-mode trampoline below 1 MiB
and wakes the other vCPUs with INIT-SIPI-SIPI; every vCPU then loads the image's page tables, enters long
mode, and drops to 64-bit user mode (CPL3, IOPL3) at the workload program with RDI = its control block,
by ``iretq``. Ring 0 runs only those few dozen instructions: on this host's KVM (PVM) ring-0 code is
emulated at ~1 us per instruction while CPL3 runs natively. Interrupts stay off and there is no IDT.

Memory: guest RAM is a shared file in /dev/shm (``memory-backend-file,share=on``) that this process maps
too, so it reads the guest's counters and pages without QEMU's help. QEMU's pc machine puts RAM above
``max-ram-below-4g`` (set to 2 GiB here) at 4 GiB; the guest's page tables map virtual addresses to guest
physical ones so that a virtual address *is* the offset in the RAM file, hence the page frame numbers of
the truth are file pages. The guest's ``out`` calls to the host (sleep, iteration, idle) go to QEMU's
unassigned I/O ports, which ignore them: a rate-limited guest spins instead of sleeping.

Parameters (workload, rate, vCPUs, memory) are written into the image's control blocks. QEMU comes from
Debian (``apt-get install -y qemu-system-x86``); QMP through the ``qemu.qmp`` package's QMPClient
(``pip install -e '.[test]'``).
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypeVar

import numpy as np
import numpy.typing as npt
from iced_x86 import BlockEncoder, Code, Instruction, MemoryOperand, Register, RepPrefixKind

from dirtylog.errors import DirtylogError
from dirtylog.guest.machine import control_block
from dirtylog.guest.programs import ControlBlock, build_program
from dirtylog.guest.x86 import (
    CODE_ADDR,
    CONTROL_ADDR,
    CR0_PG,
    CR4_OSFXSR,
    CR4_OSXMMEXCPT,
    CR4_PAE,
    PTE_ACCESSED,
    PTE_DIRTY,
    PTE_LARGE,
    PTE_PRESENT,
    PTE_USER,
    PTE_WRITABLE,
    RFLAGS_IOPL3,
    USER_CODE_SELECTOR,
    USER_DATA_SELECTOR,
    WORKLOAD_ADDR,
    control_block_addr,
)
from dirtylog.units import PAGE_SIZE, format_size, parse_size
from dirtylog.workload import WorkloadName, WorkloadSpec

QEMU_BINARY = "qemu-system-x86_64"
INSTALL_HINT = "apt-get install -y qemu-system-x86"
MAX_RAM_BELOW_4G = 2 << 30  # -machine max-ram-below-4g: RAM beyond this sits at 4 GiB
MAX_MEMORY = 48 << 30  # the page directories must fit between TABLES_ADDR and the workload area
BOOT_TIMEOUT = 60.0

# The image, loaded by multiboot at 1 MiB; each piece at a fixed address so that far jumps are constants.
IMAGE_ADDR = 0x100000
BOOTED_ADDR = 0x100020  # a u64 after the multiboot header: each vCPU adds 1 when it has left the firmware
ENTRY32_ADDR = 0x100040  # the bootstrap processor's multiboot entry (32-bit, no paging)
COMMON32_ADDR = 0x100400  # every vCPU: enable long mode
LONG64_ADDR = 0x100800  # every vCPU: ring 0, 64-bit: drop to the workload at CPL3
GDT_ADDR = 0x100C00
TRAMPOLINE_SRC = 0x100D00  # real-mode start of the other vCPUs, copied to TRAMPOLINE_ADDR
TRAMPOLINE_ADDR = 0x8000  # below 1 MiB and page aligned: SIPI vector 0x08
TABLES_ADDR = 0x1C0000  # PML4, PDPT, then one page directory per GiB
APIC_ICR_LOW = 0xFEE00300
APIC_SVR = 0xFEE000F0
MULTIBOOT_MAGIC = 0x1BADB002
MULTIBOOT_AOUT_KLUDGE = 1 << 16

KERNEL_CS, KERNEL_DS, KERNEL_CS32 = 0x08, 0x10, 0x18

T = TypeVar("T")


class QemuError(DirtylogError):
    """QEMU is missing, failed to start, or the guest did not come up."""


def qemu_binary() -> str:
    """The path of qemu-system-x86_64, or a QemuError that says how to install it."""
    path = shutil.which(QEMU_BINARY)
    if path is None:
        raise QemuError(f"{QEMU_BINARY} is not installed; install it with: {INSTALL_HINT}")
    return path


def qemu_unavailable_reason() -> str | None:
    """Why a QEMU guest cannot run here (for test skips), or None."""
    try:
        qemu_binary()
    except QemuError as error:
        return str(error)
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not usable"
    try:
        import qemu.qmp  # noqa: F401
    except ImportError:
        return "the qemu.qmp package is missing: pip install -e '.[test]'"
    return None


# --- the image ----------------------------------------------------------------------------------------


class _Code:
    """Instructions of one bitness with labels (as dirtylog.guest.asm: a label is an address BlockEncoder
    rewrites), encoded for a fixed address."""

    _LABEL_BASE = 0x7000_0000

    def __init__(self, bitness: int) -> None:
        self.bitness = bitness
        self.instructions: list[Instruction] = []
        self.labels: dict[str, int] = {}
        self._pending: str | None = None

    def label(self, name: str) -> None:
        self.labels[name] = self._LABEL_BASE + 16 * len(self.labels)
        self._pending = name

    def __call__(self, instruction: Instruction) -> None:
        if self._pending is not None:
            instruction.ip = self.labels[self._pending]
            self._pending = None
        self.instructions.append(instruction)

    def branch(self, code: Any, label: str) -> None:
        self(Instruction.create_branch(code, self.labels[label]))

    def encode(self, ip: int) -> bytes:
        encoder = BlockEncoder(self.bitness)
        encoder.add_many(self.instructions)
        code: bytes = encoder.encode(ip)
        return code


def _abs32(address: int) -> MemoryOperand:
    return MemoryOperand(Register.NONE, Register.NONE, 1, address, 4)


def _entry32(vcpus: int) -> bytes:
    """Multiboot entry of the bootstrap processor: our GDT, the trampoline, INIT-SIPI-SIPI, then long mode."""
    c = _Code(32)
    c(Instruction.create(Code.CLI))
    c(Instruction.create_mem(Code.LGDT_M1632, _abs32(GDT_ADDR + 0x80)))
    c(Instruction.create_far_branch(Code.JMP_PTR1632, KERNEL_CS32, ENTRY32_ADDR + 0x40))
    tail = _Code(32)  # at ENTRY32_ADDR + 0x40, with CS reloaded
    tail(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.EAX, KERNEL_DS))
    for segment in (Register.DS, Register.ES, Register.SS):
        tail(Instruction.create_reg_reg(Code.MOV_SREG_R32M16, segment, Register.EAX))
    if vcpus > 1:
        tail(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.ESI, TRAMPOLINE_SRC))
        tail(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.EDI, TRAMPOLINE_ADDR))
        tail(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.ECX, 0x100))
        tail(Instruction.create_movsb(32, Register.NONE, RepPrefixKind.REPE))  # rep movsb
        tail(Instruction.create_mem_u32(Code.OR_RM32_IMM32, _abs32(APIC_SVR), 0x100))  # APIC software enable
        # INIT (level assert), then two SIPIs with vector 0x08, to all but self (shorthand 11).
        for icr in (0x000C4500, 0x000C4600 | TRAMPOLINE_ADDR >> 12, 0x000C4600 | TRAMPOLINE_ADDR >> 12):
            tail(Instruction.create_mem_u32(Code.MOV_RM32_IMM32, _abs32(APIC_ICR_LOW), icr))
    tail(Instruction.create_far_branch(Code.JMP_PTR1632, KERNEL_CS32, COMMON32_ADDR))
    head = c.encode(ENTRY32_ADDR)
    assert len(head) <= 0x40
    return head.ljust(0x40, b"\x90") + tail.encode(ENTRY32_ADDR + 0x40)


def _common32() -> bytes:
    """Every vCPU, 32-bit protected mode, flat segments: PAE, our page tables, EFER.LME, paging on."""
    c = _Code(32)
    c(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.EAX, KERNEL_DS))
    for segment in (Register.DS, Register.ES, Register.SS):
        c(Instruction.create_reg_reg(Code.MOV_SREG_R32M16, segment, Register.EAX))
    c(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.EAX, CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT))
    c(Instruction.create_reg_reg(Code.MOV_CR_R32, Register.CR4, Register.EAX))
    c(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.EAX, TABLES_ADDR))
    c(Instruction.create_reg_reg(Code.MOV_CR_R32, Register.CR3, Register.EAX))
    c(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.ECX, 0xC0000080))  # EFER
    c(Instruction.create(Code.RDMSR))
    c(Instruction.create_reg_u32(Code.OR_EAX_IMM32, Register.EAX, 0x101))  # LME | SCE
    c(Instruction.create(Code.WRMSR))
    c(Instruction.create_reg_reg(Code.MOV_R32_CR, Register.EAX, Register.CR0))
    c(Instruction.create_reg_u32(Code.OR_EAX_IMM32, Register.EAX, CR0_PG | 1 << 16 | 1))  # PG | WP | PE
    c(Instruction.create_reg_reg(Code.MOV_CR_R32, Register.CR0, Register.EAX))
    c(Instruction.create_far_branch(Code.JMP_PTR1632, KERNEL_CS, LONG64_ADDR))
    return c.encode(COMMON32_ADDR)


def _long64(vcpus: int) -> bytes:
    """Every vCPU, ring 0, 64-bit: find its index (APIC ID), then iretq to the workload at CPL3. With
    ``vcpus`` 0 every vCPU halts here instead (an idle guest)."""
    c = _Code(64)
    c(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.EAX, BOOTED_ADDR))
    booted = Instruction.create_mem(Code.INC_RM64, MemoryOperand(Register.RAX))
    booted.has_lock_prefix = True
    c(booted)
    c(Instruction.create_reg_u32(Code.MOV_R32_IMM32, Register.EAX, 1))
    c(Instruction.create(Code.CPUID))
    c(Instruction.create_reg_i32(Code.SHR_RM32_IMM8, Register.EBX, 24))  # initial APIC ID = vCPU index here
    c(Instruction.create_reg_u32(Code.CMP_RM32_IMM32, Register.EBX, vcpus))  # with 0, every index parks
    c.label("park")  # defined below; a label is an address, so forward use needs it known first
    park = c.labels["park"]
    c._pending = None
    c(Instruction.create_branch(Code.JAE_REL32_64, park))
    c(Instruction.create_reg_reg(Code.MOV_R64_RM64, Register.RDI, Register.RBX))
    c(Instruction.create_reg_i32(Code.SHL_RM64_IMM8, Register.RDI, 12))
    c(Instruction.create_reg_i32(Code.ADD_RM64_IMM32, Register.RDI, CONTROL_ADDR))
    c(Instruction.create_reg_mem(Code.LEA_R64_M, Register.RSP, MemoryOperand(Register.RDI, Register.NONE, 1,
                                                                             PAGE_SIZE, 8)))
    c(Instruction.create_reg_reg(Code.MOV_R64_RM64, Register.RAX, Register.RSP))
    c(Instruction.create_i32(Code.PUSHQ_IMM32, USER_DATA_SELECTOR))  # SS
    c(Instruction.create_reg(Code.PUSH_R64, Register.RAX))  # RSP: the top of its control block page
    c(Instruction.create_i32(Code.PUSHQ_IMM32, RFLAGS_IOPL3))  # IOPL 3, interrupts off
    c(Instruction.create_i32(Code.PUSHQ_IMM32, USER_CODE_SELECTOR))  # CS
    c(Instruction.create_i32(Code.PUSHQ_IMM32, CODE_ADDR))  # RIP
    c(Instruction.create_reg_reg(Code.XOR_R32_RM32, Register.ESI, Register.ESI))
    c(Instruction.create(Code.IRETQ))
    c._pending = "park"
    c(Instruction.create(Code.CLI))
    c(Instruction.create(Code.HLT))
    c.branch(Code.JMP_REL32_64, "park")
    return c.encode(LONG64_ADDR)


def _trampoline() -> bytes:
    """Real-mode start of the other vCPUs (at TRAMPOLINE_ADDR): our GDT, protection on, to common32."""
    c = _Code(16)
    c(Instruction.create(Code.CLI))
    c(Instruction.create_reg_reg(Code.XOR_R32_RM32, Register.EAX, Register.EAX))
    c(Instruction.create_reg_reg(Code.MOV_SREG_RM16, Register.DS, Register.AX))
    c(Instruction.create_mem(Code.LGDT_M1632, MemoryOperand(Register.NONE, Register.NONE, 1, TRAMPOLINE_ADDR + 0x80,
                                                             2)))
    c(Instruction.create_reg_reg(Code.MOV_R32_CR, Register.EAX, Register.CR0))
    c(Instruction.create_reg_u32(Code.OR_EAX_IMM32, Register.EAX, 1))
    c(Instruction.create_reg_reg(Code.MOV_CR_R32, Register.CR0, Register.EAX))
    c(Instruction.create_far_branch(Code.JMP_PTR1632, KERNEL_CS32, COMMON32_ADDR))
    code = c.encode(TRAMPOLINE_ADDR)
    assert len(code) <= 0x80
    return code.ljust(0x80, b"\x90") + _gdt_pointer()


def _gdt() -> bytes:
    """Null, kernel code64 (0x08), kernel data (0x10), kernel code32 (0x18), user data (0x23), user code64
    (0x2B), as dirtylog.guest.x86's selectors expect."""
    entries = [0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF, 0x00CF9A000000FFFF, 0x00CFF2000000FFFF,
               0x00AFFA000000FFFF]
    return np.array(entries, dtype="<u8").tobytes()


def _gdt_pointer() -> bytes:
    return np.array([len(_gdt()) - 1], dtype="<u2").tobytes() + np.array([GDT_ADDR], dtype="<u4").tobytes()


def lowmem_size(memory: int) -> int:
    """Bytes of RAM QEMU's pc machine maps below 4 GiB (the rest sits at 4 GiB)."""
    return min(memory, MAX_RAM_BELOW_4G)


def page_tables(memory: int) -> dict[int, npt.NDArray[np.uint64]]:
    """Tables mapping virtual address V in [0, memory) to the guest-physical address of RAM-file offset V
    (2 MiB pages, user, writable, accessed and dirty preset)."""
    gib = -(-memory // (1 << 30))
    flags = PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_ACCESSED
    pml4 = np.zeros(512, dtype=np.uint64)
    pml4[0] = (TABLES_ADDR + PAGE_SIZE) | flags
    pdpt = np.zeros(512, dtype=np.uint64)
    pdpt[:gib] = (TABLES_ADDR + 2 * PAGE_SIZE + np.arange(gib, dtype=np.uint64) * PAGE_SIZE) | np.uint64(flags)
    virtual = np.arange(-(-memory // (2 << 20)), dtype=np.uint64) << np.uint64(21)
    low = np.uint64(lowmem_size(memory))
    physical = np.where(virtual < low, virtual, virtual - low + np.uint64(4 << 30))
    directories = np.zeros(gib * 512, dtype=np.uint64)
    directories[:virtual.size] = physical | np.uint64(flags | PTE_DIRTY | PTE_LARGE)
    return {TABLES_ADDR: pml4, TABLES_ADDR + PAGE_SIZE: pdpt, TABLES_ADDR + 2 * PAGE_SIZE: directories}


def control_blocks(spec: WorkloadSpec, tsc_hz: int) -> dict[int, npt.NDArray[np.uint64]]:
    """Each vCPU's control block by address, as a Machine fills it (dirtylog.guest.machine.control_block)."""
    return {control_block_addr(index): control_block(spec, index, tsc_hz // 1000) for index in range(spec.vcpus)}


def build_image(memory: int, spec: WorkloadSpec, tsc_hz: int, *, idle_halts: bool = True) -> bytes:
    """The multiboot image: boot code, GDT, trampoline, control blocks, the workload program, page tables."""
    tables = page_tables(memory)
    end = max(address + table.nbytes for address, table in tables.items())
    image = np.zeros(end - IMAGE_ADDR, dtype=np.uint8)

    def put(address: int, data: bytes | npt.NDArray[Any]) -> None:
        raw = np.frombuffer(data if isinstance(data, bytes) else data.tobytes(), dtype=np.uint8)
        image[address - IMAGE_ADDR:address - IMAGE_ADDR + raw.size] = raw

    checksum = (-(MULTIBOOT_MAGIC + MULTIBOOT_AOUT_KLUDGE)) & 0xFFFFFFFF
    # magic, flags, checksum, then (a.out kludge) header, load, load end, bss end and entry addresses
    header = np.array([MULTIBOOT_MAGIC, MULTIBOOT_AOUT_KLUDGE, checksum, IMAGE_ADDR, IMAGE_ADDR, end, 0,
                       ENTRY32_ADDR], dtype="<u4")
    put(IMAGE_ADDR, header.tobytes())
    put(ENTRY32_ADDR, _entry32(spec.vcpus))
    put(COMMON32_ADDR, _common32())
    # An idle guest halts (interrupts off) unless told otherwise: see QemuOptions.idle_halts. (dirtylog's own
    # idle vCPUs sleep in the host on the idle program's `out`.)
    put(LONG64_ADDR, _long64(0 if spec.name == "idle" and idle_halts else spec.vcpus))
    put(GDT_ADDR, _gdt())
    put(GDT_ADDR + 0x80, _gdt_pointer())
    put(TRAMPOLINE_SRC, _trampoline())
    for address, block in control_blocks(spec, tsc_hz).items():
        put(address, block)
    put(CODE_ADDR, build_program(spec.name).code)
    for address, table in tables.items():
        put(address, table)
    return image.tobytes()


def host_tsc_hz() -> int:
    """The TSC frequency KVM gives guests by default (QEMU's too, without tsc-frequency)."""
    from dirtylog.kvm.system import Kvm

    kvm = Kvm()
    try:
        vm = kvm.create_vm()
        try:
            return vm.create_vcpu(0).tsc_khz * 1000
        finally:
            vm.close()
    finally:
        kvm.close()


# --- QMP ------------------------------------------------------------------------------------------------


class Qmp:
    """A synchronous face on qemu.qmp's asyncio QMPClient: its own event loop in a thread."""

    def __init__(self, socket_path: str, timeout: float = 10.0, connect_timeout: float = 60.0) -> None:
        from qemu.qmp import QMPClient

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="qmp", daemon=True)
        self._thread.start()
        self.client = QMPClient("dirtylog-bench")
        # QEMU answers only once its memory is allocated (prealloc): seconds for a large guest.
        self.timeout = connect_timeout
        self._run(self.client.connect(socket_path))
        self.timeout = timeout

    def _run(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(self.timeout)

    def __call__(self, command: str, **arguments: Any) -> Any:
        """Execute a QMP command (arguments with '-' in their names: pass them with '_')."""
        args = {key.replace("_", "-"): value for key, value in arguments.items()}
        return self._run(self.client.execute(command, args or None))

    def events(self) -> list[dict[str, Any]]:
        """The QMP events received since the last call, oldest first (each with QEMU's ``timestamp``)."""
        async def drain() -> list[dict[str, Any]]:
            return [dict(event) for event in self.client.events.clear()]

        return self._run(drain())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._run(self.client.disconnect())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(2.0)
        self._loop.close()


# --- the guest ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QemuOptions:
    """How to run QEMU beyond the guest's shape."""

    dirty_ring: int = 0  # entries per vCPU (-accel kvm,dirty-ring-size=N*16 bytes... QEMU takes entries)
    prealloc: bool = True
    # An idle guest halts its vCPUs, as an idle OS does; False runs the idle program, whose `out` per loop exits
    # to QEMU's userspace, where each exit takes QEMU's global lock (which its migration needs too).
    idle_halts: bool = True
    incoming: bool = False  # a migration destination: -incoming defer, waiting for QMP's migrate-incoming
    extra_args: Sequence[str] = ()


class QemuGuest:
    """A QEMU/KVM guest running one of our workloads, its RAM shared with this process.

    ``memory``, ``vcpus``, ``workload``, ``rate`` (pages/s per vCPU) and the workload's shape as for
    :class:`dirtylog.Machine`. Use as a context manager; :attr:`memory` is guest RAM as bytes (file
    offsets, which the guest's virtual addresses equal), :meth:`qmp` runs QMP commands.
    """

    def __init__(self, memory: str | int = "1G", vcpus: int = 1, workload: WorkloadName = "random",
                 rate: int | None = None, *, hot_fraction: float = 0.1, hot_weight: float = 0.9,
                 options: QemuOptions | None = None) -> None:
        self.size = parse_size(memory)
        if not WORKLOAD_ADDR < self.size <= MAX_MEMORY or self.size % (2 << 20):
            raise QemuError(f"QEMU guest memory of {format_size(self.size)}: give a multiple of 2 MiB up to "
                            f"{format_size(MAX_MEMORY)}")
        self.options = options or QemuOptions()
        self.vcpus = vcpus
        first = WORKLOAD_ADDR // PAGE_SIZE
        self.spec = WorkloadSpec(workload, first, self.size // PAGE_SIZE - first, vcpus, rate, hot_fraction,
                                 hot_weight)
        self.binary = qemu_binary()
        self.tsc_hz = host_tsc_hz()
        self._dir = tempfile.mkdtemp(prefix="dirtylog-qemu-")
        self.ram_path = f"/dev/shm/dirtylog-qemu-{os.getpid()}-{id(self):x}"
        self.process: subprocess.Popen[bytes] | None = None
        self.qmp: Qmp | None = None
        self._map: mmap.mmap | None = None
        self.memory: npt.NDArray[np.uint8] = np.zeros(0, dtype=np.uint8)

    @property
    def npages(self) -> int:
        return self.size // PAGE_SIZE

    @property
    def words(self) -> npt.NDArray[np.uint64]:
        return self.memory.view(np.uint64)

    def command(self) -> list[str]:
        kernel = Path(self._dir) / "guest.mb"
        accel = "kvm" + (f",dirty-ring-size={self.options.dirty_ring}" if self.options.dirty_ring else "")
        backend = (f"memory-backend-file,id=ram,size={self.size},mem-path={self.ram_path},share=on"
                   + (",prealloc=on" if self.options.prealloc else ""))
        return [self.binary, "-accel", accel, "-machine", f"pc,memory-backend=ram,max-ram-below-4g={MAX_RAM_BELOW_4G}",
                "-m", f"{self.size >> 20}M", "-smp", str(self.vcpus), "-object", backend,
                "-kernel", str(kernel), "-nodefaults", "-display", "none", "-no-reboot",
                "-name", "dirtylog-guest,debug-threads=on",  # vCPU threads named "CPU n/KVM", to tell them apart
                "-qmp", f"unix:{self._dir}/qmp.sock,server=on,wait=off",
                *(("-incoming", "defer") if self.options.incoming else ()), *self.options.extra_args]

    def start(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Boot QEMU and wait until every vCPU has left the firmware and, unless the guest is idle, written (its
        progress counter moved). A destination (``incoming``) only waits for its QMP socket."""
        (Path(self._dir) / "guest.mb").write_bytes(build_image(self.size, self.spec, self.tsc_hz,
                                                                  idle_halts=self.options.idle_halts))
        with open(self.ram_path, "wb") as ram:
            ram.truncate(self.size)
        log = open(Path(self._dir) / "qemu.log", "wb")  # noqa: SIM115 (QEMU writes it for its lifetime)
        self.process = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()
        with open(self.ram_path, "r+b") as ram:
            self._map = mmap.mmap(ram.fileno(), self.size, mmap.MAP_SHARED)
        self.memory = np.frombuffer(self._map, dtype=np.uint8)
        deadline = time.monotonic() + timeout
        while not os.path.exists(f"{self._dir}/qmp.sock"):
            self._check_alive()
            if time.monotonic() > deadline:
                raise QemuError(f"QEMU did not open its QMP socket within {timeout} s")
            time.sleep(0.01)
        try:
            self.qmp = Qmp(f"{self._dir}/qmp.sock", connect_timeout=max(1.0, deadline - time.monotonic()))
        except Exception as error:
            raise QemuError(f"cannot talk QMP to QEMU ({error}); QEMU's log: {self.log()[-600:]}") from error
        if self.options.incoming:  # no guest until a migration brings one
            return
        # The firmware (SeaBIOS) runs from the top of RAM until it starts our image: nothing may write guest
        # memory before every vCPU has left it.
        while self.booted < self.vcpus:
            self._check_alive()
            if time.monotonic() > deadline:
                raise QemuError(f"the QEMU guest did not boot within {timeout} s ({self.booted} of {self.vcpus} "
                                f"vCPUs); QEMU's log: {self.log()[-400:]!r}")
            time.sleep(0.01)
        while self.spec.name != "idle" and not all(self.vcpu_progress):
            self._check_alive()
            if time.monotonic() > deadline:
                raise QemuError(f"the QEMU guest did not start writing within {timeout} s (progress "
                                f"{self.vcpu_progress}); QEMU's log: {self.log()[-400:]!r}")
            time.sleep(0.01)

    def destination(self, options: QemuOptions | None = None) -> QemuGuest:
        """A QEMU of the same shape (memory backend, vCPUs, the same image, so the same ROMs) to migrate this
        guest into: started with ``-incoming defer``, it waits for :func:`migrate`. Not started yet."""
        twin = QemuGuest(self.size, self.vcpus, self.spec.name, self.spec.rate, hot_fraction=self.spec.hot_fraction,
                         hot_weight=self.spec.hot_weight,
                         options=replace(options or self.options, incoming=True))
        twin.tsc_hz = self.tsc_hz  # the same image, byte for byte
        return twin

    def log(self) -> str:
        return (Path(self._dir) / "qemu.log").read_text(errors="replace")

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise QemuError(f"QEMU exited with status {self.process.returncode}: {self.log()[-600:]}")

    def control(self, vcpu: int, offset: ControlBlock) -> int:
        return int(self.words[(control_block_addr(vcpu) + offset) // 8])

    @property
    def booted(self) -> int:
        """vCPUs that have reached our image's 64-bit code (the firmware is done with guest memory then)."""
        return int(self.words[BOOTED_ADDR // 8])

    @property
    def vcpu_progress(self) -> list[int]:
        return [self.control(v, ControlBlock.PROGRESS) for v in range(self.vcpus)]

    @property
    def progress(self) -> int:
        return sum(self.vcpu_progress)

    def calc_dirty_rate(self, seconds: int, mode: str = "page-sampling", sample_pages: int | None = None,
                        poll: float = 0.05) -> dict[str, Any]:
        """QEMU's ``calc-dirty-rate`` (``mode``: page-sampling, dirty-bitmap, dirty-ring), waited for; the
        ``query-dirty-rate`` answer."""
        assert self.qmp is not None
        arguments: dict[str, Any] = {"calc_time": seconds, "mode": mode}
        if sample_pages is not None:
            arguments["sample_pages"] = sample_pages
        self.qmp("calc-dirty-rate", **arguments)
        deadline = time.monotonic() + seconds + 30
        while True:
            time.sleep(poll)
            answer: dict[str, Any] = self.qmp("query-dirty-rate")
            if answer.get("status") == "measured":
                return answer
            if time.monotonic() > deadline:
                raise QemuError(f"calc-dirty-rate did not finish: {answer}")

    def stop(self) -> None:
        """Quit QEMU and remove its files."""
        if self.qmp is not None:
            with contextlib.suppress(Exception):
                self.qmp("quit")
            self.qmp.close()
            self.qmp = None
        if self.process is not None:
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
            self.process = None
        self.memory = np.zeros(0, dtype=np.uint8)
        if self._map is not None:
            with contextlib.suppress(BufferError):
                self._map.close()
            self._map = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.ram_path)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


# --- migration ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QemuMigration:
    """One QEMU-to-QEMU migration as QEMU's users see it.

    ``info`` is the source's last ``query-migrate`` answer (``total-time``, ``setup-time`` and ``downtime`` in
    ms, ``ram``); ``parameters`` its ``query-migrate-parameters`` when it started. QEMU's ``downtime`` ends
    on the source once it has sent the last byte; ``stop_to_resume_ms`` is the guest's pause seen from
    outside: the source's STOP event to the destination's RESUME event (both QMP timestamps from this host's
    clock), None when either event was missed.
    """

    info: dict[str, Any]
    parameters: dict[str, Any]
    stop_to_resume_ms: float | None

    @property
    def total_ms(self) -> float:
        return float(self.info["total-time"])

    @property
    def setup_ms(self) -> float:
        return float(self.info["setup-time"])

    @property
    def downtime_ms(self) -> float:
        return float(self.info["downtime"])


def _event_time(event: dict[str, Any]) -> float:
    stamp = event["timestamp"]
    return float(stamp["seconds"]) + float(stamp["microseconds"]) / 1e6


def migrate(source: QemuGuest, destination: QemuGuest, *, downtime_limit_ms: int = 300, max_bandwidth: int = 0,
            host: str = "127.0.0.1", poll: float = 0.05, timeout: float = 300.0) -> QemuMigration:
    """Live-migrate ``source`` into ``destination`` (a QEMU waiting with ``-incoming defer``, e.g.
    :meth:`QemuGuest.destination`, started) over TCP, driven over QMP as QEMU's users do.

    On the destination ``migrate-incoming tcp:HOST:0`` (the port it bound is read back from its
    ``query-migrate``); on the source ``migrate-set-parameters`` with ``downtime-limit`` (ms) and
    ``max-bandwidth`` (bytes/s; 0 is no limit in QEMU 7.2, whose default is 32 MiB/s), then ``migrate``, and
    ``query-migrate`` every ``poll`` seconds until it ends. Returns once the destination runs the guest;
    raises :class:`QemuError` when the migration fails or takes longer than ``timeout``.
    """
    if source.qmp is None or destination.qmp is None:
        raise QemuError("start both QEMUs before migrating")
    if not destination.options.incoming:
        raise QemuError("the destination QEMU must wait for a migration: QemuGuest.destination() makes one")
    destination.qmp("migrate-incoming", uri=f"tcp:{host}:0")
    addresses = destination.qmp("query-migrate").get("socket-address", [])
    if not addresses:
        raise QemuError(f"the destination QEMU did not say where it listens: {destination.log()[-400:]}")
    uri = f"tcp:{host}:{addresses[0]['port']}"
    source.qmp("migrate-set-parameters", downtime_limit=downtime_limit_ms, max_bandwidth=max_bandwidth)
    parameters: dict[str, Any] = source.qmp("query-migrate-parameters")
    source.qmp.events()  # only this migration's events from here on
    destination.qmp.events()
    source.qmp("migrate", uri=uri)
    deadline = time.monotonic() + timeout
    while True:
        time.sleep(poll)
        info: dict[str, Any] = source.qmp("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            break
        if time.monotonic() > deadline:
            source.qmp("migrate_cancel")
            raise QemuError(f"QEMU's migration did not end within {timeout:.0f} s: {info}")
    if info["status"] != "completed":
        raise QemuError(f"QEMU's migration {info['status']}: {info.get('error-desc', '')}; "
                        f"destination log: {destination.log()[-400:]}")
    # QEMU says "completed" before its migration thread has computed total-time and downtime (0 until then).
    while not info.get("total-time"):
        if time.monotonic() > deadline:
            raise QemuError(f"QEMU's completed migration never reported its total time: {info}")
        time.sleep(0.01)
        info = source.qmp("query-migrate")
    while destination.qmp("query-status")["status"] != "running":
        destination._check_alive()
        if time.monotonic() > deadline:
            raise QemuError("the destination QEMU did not run the guest after the migration")
        time.sleep(0.01)
    stops = [_event_time(e) for e in source.qmp.events() if e["event"] == "STOP"]
    resumes = [_event_time(e) for e in destination.qmp.events() if e["event"] == "RESUME"]
    pause = (resumes[-1] - stops[-1]) * 1e3 if stops and resumes else None
    return QemuMigration(info, parameters, pause)
