"""What a guest architecture provides, so that one :class:`~dirtylog.guest.machine.Machine` runs on x86-64 and arm64.

An :class:`Architecture` knows the guest-physical layout (control blocks, code, workload area), what to
write into RAM before the guest starts (x86: page tables; arm64: nothing, its guest runs with the MMU
off), how to set up a vCPU and save or load its state, how the guest calls the host (x86: ``out dx, al``
to a port; arm64: a store to an address outside RAM, an MMIO exit), its workload programs, and how to
show the instructions at a crash. :func:`host_architecture` picks the one the host runs; everything
above the guest layer (trackers, migration, the CLI) is the same on both.

The control block — one page of u64 fields per vCPU that the host fills before start and reads at any
time — is shared: both architectures' programs use the same offsets.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from dirtylog.errors import DirtylogError
from dirtylog.units import PAGE_SIZE

if TYPE_CHECKING:
    from dirtylog.kvm.exits import VcpuExit
    from dirtylog.kvm.system import Kvm, Vm
    from dirtylog.kvm.vcpu import Vcpu


class AsmError(DirtylogError, ValueError):
    """An instruction form the assembler does not support, a label problem, or a program that cannot be built."""


class ArchitectureError(DirtylogError):
    """The host's architecture has no guest support, or an architecture was asked for what it lacks."""


class ControlBlock(enum.IntEnum):
    """Byte offsets of the u64 fields in a vCPU's control block."""

    PROGRESS = 0  # pages written so far (guest writes)
    ITERATION = 8  # completed iterations: passes for sequential, stamp rounds for stamp (guest writes)
    AREA_BASE = 16  # guest address of the first page of this vCPU's share
    AREA_NPAGES = 24  # pages in the share
    TICKS_PER_PAGE = 32  # counter ticks between writes; 0 = as fast as possible
    PRNG_SEED = 40  # xorshift64 seed, never 0
    HOT_NPAGES = 48  # hotset: pages in the hot set (the first pages of the share)
    HOT_THRESHOLD = 56  # hotset: a write goes to the hot set when the PRNG's low 32 bits are below this
    WRITES_PER_ITERATION = 64  # stamp: pages per iteration
    SLEEP_THRESHOLD = 72  # ticks ahead of schedule above which the guest asks the host to sleep
    MAX_LAG = 80  # ticks behind schedule beyond which the guest forgets the debt (no catch-up burst)
    COUNT = 88  # count loop: iterations to run
    RATE = 96  # pages per second (0: unlimited), for guests that derive their pacing from their own clock
    COUNTER_HZ = 104  # the guest's counter frequency, written by guests that read it themselves (arm64)
    BATCH_SEQ = 112  # batch program: the host asks for batch n by writing n here; done when ITERATION == n
    BATCH_COUNT = 120  # batch program: pages in the batch
    TRACE_TABLE = 128  # trace: guest address of this vCPU's part of the trace (dirtylog.trace.DirtyTrace.guest_table)
    TSC_KHZ = 136  # the vCPUs' TSC frequency in kHz (trace: converts the recorded microseconds to ticks)
    BATCH_PAGES = 512  # batch program: their guest-physical addresses, one u64 each, to the end of the page


#: Most pages one batch of the batch program may write.
MAX_BATCH_PAGES = (4096 - ControlBlock.BATCH_PAGES) // 8


class GuestCall(enum.IntEnum):
    """The guest→host calls every workload program may make."""

    ITERATION = 0xD1  # a stamp iteration finished; ITERATION in the control block is its number
    SLEEP = 0xD2  # sleep for the argument's counter ticks
    IDLE = 0xD3  # nothing to do: park until the host wants the vCPU
    DONE = 0xD4  # a finite program finished


@dataclass(frozen=True)
class Layout:
    """Where things live in guest-physical memory; the *workload area* runs from ``workload_addr`` to the end."""

    control_addr: int
    code_addr: int
    workload_addr: int
    max_memory: int

    @property
    def max_vcpus(self) -> int:
        return (self.code_addr - self.control_addr) // PAGE_SIZE

    @property
    def max_code_bytes(self) -> int:
        return self.workload_addr - self.code_addr

    def control_block_addr(self, vcpu_index: int) -> int:
        """Guest-physical address of vCPU ``vcpu_index``'s control block."""
        return self.control_addr + vcpu_index * PAGE_SIZE


@dataclass(frozen=True)
class GuestProgram:
    """Machine code to load at the layout's code address, what it is, and (where known) its listing."""

    name: str
    code: bytes
    listing: dict[int, str] = field(default_factory=dict, compare=False)


class Architecture(ABC):
    """One guest architecture: layout, boot memory, vCPU set-up and state, guest calls, programs."""

    name: str
    layout: Layout
    #: Register names for :class:`GuestCrash` reports, and the one holding the program counter.
    pc_register: str

    @abstractmethod
    def check_memory_size(self, size: int) -> None:
        """Refuse sizes the layout cannot hold (a :class:`~dirtylog.kvm.errors.GuestMemoryError`)."""

    @abstractmethod
    def boot_memory(self, ram_size: int, page_size: str) -> dict[int, bytes]:
        """What to write into guest RAM before start, by guest-physical address (x86: page tables)."""

    @abstractmethod
    def check_page_size(self, kvm: Kvm, page_size: str) -> None:
        """Refuse a guest page size this KVM cannot offer."""

    @abstractmethod
    def setup_vcpu(self, kvm: Kvm, vm: Vm, vcpu: Vcpu, index: int) -> None:
        """Make a new vCPU ready to enter the program with its control block and index in registers."""

    @abstractmethod
    def counter_hz(self, vcpu: Vcpu) -> int:
        """The guest counter's frequency as the host can learn it (0: the guest reports it itself in
        ``ControlBlock.COUNTER_HZ`` and paces itself from ``ControlBlock.RATE``)."""

    @abstractmethod
    def registers(self, vcpu: Vcpu) -> Any:
        """The vCPU's general registers, as saved when it parks (an ABI structure)."""

    @abstractmethod
    def register_values(self, regs: Any) -> dict[str, int]:
        """``registers()`` as names and values, for crash reports."""

    @abstractmethod
    def save_state(self, vcpu: Vcpu, regs: Any) -> bytes:
        """A parked vCPU's architectural state as bytes (for migration)."""

    @abstractmethod
    def load_state(self, vcpu: Vcpu, state: bytes) -> Any:
        """Load :meth:`save_state`'s bytes into a vCPU; returns its registers as :meth:`registers` would."""

    @abstractmethod
    def guest_call(self, exit_: VcpuExit, vcpu: Vcpu) -> tuple[GuestCall, int] | None:
        """The call and its argument if ``exit_`` is a guest→host call, else None."""

    @abstractmethod
    def fault_address(self, vcpu: Vcpu) -> int:
        """The faulting address of the last guest exception, for crash reports (x86: CR2)."""

    @abstractmethod
    def build_program(self, name: str) -> GuestProgram:
        """The machine code of workload ``name`` (or ``count``, the benchmark loop)."""

    @abstractmethod
    def disassemble(self, program: GuestProgram, memory: bytes, address: int, pc: int) -> tuple[str, ...]:
        """A few instructions at ``pc`` (``memory`` is guest RAM from ``address``), for crash reports."""
