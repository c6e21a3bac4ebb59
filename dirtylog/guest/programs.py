"""Guest workloads as x86-64 machine code, assembled with iced-x86.

Every program starts with RDI = its vCPU's control block (a page of u64 fields the host fills before
start and reads at any time) and keeps its hot state in registers::

    r15 control block      rbx first byte of this vCPU's share     r12 pages in the share
    r10 progress counter   r11 xorshift64 PRNG state                r13 TSC ticks per page (0: no limit)
    r14 TSC deadline of the next write (rate limiting)              r9  stamp iteration, r8 loop counter

After each page write the program stores the progress counter to the control block, so the host sees
progress without stopping the guest. Rate limiting follows a TSC deadline: when the guest is far ahead
it asks the host to sleep (``out`` to PORT_SLEEP with the ticks in RCX) instead of spinning, which
leaves host CPUs to the collector and the migration stream.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dirtylog.guest.asm import (
    EAX,
    R8,
    R9,
    R10,
    R11,
    R11D,
    R12,
    R13,
    R14,
    R15,
    RAX,
    RBX,
    RCX,
    RDI,
    RDX,
    AsmError,
    Assembler,
    Mem,
)
from dirtylog.guest.x86 import CODE_ADDR, MAX_CODE_BYTES
from dirtylog.workload import WorkloadName

if TYPE_CHECKING:
    from iced_x86._iced_x86_py import Register as Reg


class ControlBlock(enum.IntEnum):
    """Byte offsets of the u64 fields in a vCPU's control block."""

    PROGRESS = 0  # pages written so far (guest writes)
    ITERATION = 8  # completed iterations: passes for sequential, stamp rounds for stamp (guest writes)
    AREA_BASE = 16  # guest address of the first page of this vCPU's share
    AREA_NPAGES = 24  # pages in the share
    TICKS_PER_PAGE = 32  # TSC ticks between writes; 0 = as fast as possible
    PRNG_SEED = 40  # xorshift64 seed, never 0
    HOT_NPAGES = 48  # hotset: pages in the hot set (the first pages of the share)
    HOT_THRESHOLD = 56  # hotset: a write goes to the hot set when the PRNG's low 32 bits are below this
    WRITES_PER_ITERATION = 64  # stamp: pages per iteration
    SLEEP_THRESHOLD = 72  # ticks ahead of schedule above which the guest asks the host to sleep
    MAX_LAG = 80  # ticks behind schedule beyond which the guest forgets the debt (no catch-up burst)
    COUNT = 88  # count loop: iterations to run


class Port(enum.IntEnum):
    """I/O ports of the guest→host calls (``out dx, al``)."""

    ITERATION = 0xD1  # a stamp iteration finished; ITERATION in the control block is its number
    SLEEP = 0xD2  # sleep RCX TSC ticks
    IDLE = 0xD3  # nothing to do: park until the host wants the vCPU
    DONE = 0xD4  # a finite program finished


@dataclass(frozen=True)
class GuestProgram:
    """Machine code to load at :data:`CODE_ADDR`, and what it is."""

    name: str
    code: bytes

    def __post_init__(self) -> None:
        if len(self.code) > MAX_CODE_BYTES:
            raise AsmError(f"program {self.name} is {len(self.code)} bytes; at most {MAX_CODE_BYTES} fit")


def _prologue(a: Assembler) -> None:
    a.mov(R15, RDI)
    a.mov(RBX, Mem(R15, ControlBlock.AREA_BASE))
    a.mov(R12, Mem(R15, ControlBlock.AREA_NPAGES))
    a.mov(R11, Mem(R15, ControlBlock.PRNG_SEED))
    a.mov(R13, Mem(R15, ControlBlock.TICKS_PER_PAGE))
    a.mov(R10, Mem(R15, ControlBlock.PROGRESS))
    _read_tsc(a)
    a.mov(R14, RAX)


def _read_tsc(a: Assembler) -> None:
    """RAX = TSC (clobbers RDX)."""
    a.rdtsc()
    a.shl(RDX, 32)
    a.or_(RAX, RDX)


def xorshift(a: Assembler) -> None:
    """Advance the PRNG in R11 (xorshift64, Marsaglia 13/7/17); clobbers RAX."""
    for shift, left in ((13, True), (7, False), (17, True)):
        a.mov(RAX, R11)
        if left:
            a.shl(RAX, shift)
        else:
            a.shr(RAX, shift)
        a.xor(R11, RAX)


def _page_address(a: Assembler, pages: Reg | Mem) -> None:
    """RAX = address of page ``R11 * pages >> 64`` of the share (a uniform pick without division)."""
    a.mov(RAX, R11)
    a.mul(pages)
    a.mov(RAX, RDX)
    a.shl(RAX, 12)
    a.add(RAX, RBX)


def _after_write(a: Assembler, tag: str) -> None:
    """Count the write, publish progress, and hold the write rate to R13 ticks per page."""
    a.inc(R10)
    a.mov(Mem(R15, ControlBlock.PROGRESS), R10)
    a.test(R13, R13)
    a.jz(f"{tag}_paced")
    a.add(R14, R13)
    a.label(f"{tag}_wait")
    _read_tsc(a)
    a.mov(RCX, R14)
    a.sub(RCX, RAX)  # ticks until the deadline; <= 0 when on time or late
    a.jle(f"{tag}_late")
    a.cmp(RCX, Mem(R15, ControlBlock.SLEEP_THRESHOLD))
    a.jb(f"{tag}_spin")
    a.mov_imm(RDX, Port.SLEEP)
    a.out_dx_al()
    a.jmp(f"{tag}_wait")
    a.label(f"{tag}_spin")
    a.pause()
    a.jmp(f"{tag}_wait")
    a.label(f"{tag}_late")
    a.neg(RCX)  # ticks behind schedule
    a.cmp(RCX, Mem(R15, ControlBlock.MAX_LAG))
    a.jbe(f"{tag}_paced")
    a.mov(R14, RAX)  # too far behind (e.g. after a pause): restart the schedule from now
    a.label(f"{tag}_paced")


def _sequential(a: Assembler) -> None:
    a.label("pass")
    a.mov_imm(R8, 0)
    a.label("next")
    a.mov(RAX, R8)
    a.shl(RAX, 12)
    a.add(RAX, RBX)
    a.mov(Mem(RAX), R10)
    _after_write(a, "w")
    a.inc(R8)
    a.cmp(R8, R12)
    a.jb("next")
    a.inc(Mem(R15, ControlBlock.ITERATION))
    a.jmp("pass")


def _random(a: Assembler) -> None:
    a.label("next")
    xorshift(a)
    _page_address(a, R12)
    a.mov(Mem(RAX), R10)
    _after_write(a, "w")
    a.jmp("next")


def _hotset(a: Assembler) -> None:
    a.label("next")
    xorshift(a)
    a.mov32(EAX, R11D)  # the PRNG's low half picks hot or cold; its high half picks the page
    a.cmp(RAX, Mem(R15, ControlBlock.HOT_THRESHOLD))
    a.jae("cold")
    _page_address(a, Mem(R15, ControlBlock.HOT_NPAGES))
    a.jmp("write")
    a.label("cold")
    _page_address(a, R12)
    a.label("write")
    a.mov(Mem(RAX), R10)
    _after_write(a, "w")
    a.jmp("next")


def _stamp(a: Assembler) -> None:
    a.mov(R9, Mem(R15, ControlBlock.ITERATION))
    a.inc(R9)  # the iteration being written; 0 in a page means "never stamped"
    a.label("iteration")
    a.mov(R8, Mem(R15, ControlBlock.WRITES_PER_ITERATION))
    a.label("next")
    xorshift(a)
    _page_address(a, R12)
    a.mov(Mem(RAX), R9)
    _after_write(a, "w")
    a.dec(R8)
    a.jnz("next")
    # x86 stores become visible in order: a host that reads ITERATION = k sees every stamp <= k.
    a.mov(Mem(R15, ControlBlock.ITERATION), R9)
    a.inc(R9)
    a.mov_imm(RDX, Port.ITERATION)
    a.out_dx_al()
    a.jmp("iteration")


def _idle(a: Assembler) -> None:
    a.label("idle")
    a.mov_imm(RDX, Port.IDLE)
    a.out_dx_al()
    a.jmp("idle")


def _count(a: Assembler) -> None:
    """COUNT iterations of a two-instruction loop, then DONE: measures native execution speed."""
    a.mov(RCX, Mem(R15, ControlBlock.COUNT))
    a.label("loop")
    a.dec(RCX)
    a.jnz("loop")
    a.mov_imm(RDX, Port.DONE)
    a.out_dx_al()
    _idle(a)


_BODIES: dict[str, Callable[[Assembler], None]] = {
    "sequential": _sequential,
    "random": _random,
    "hotset": _hotset,
    "stamp": _stamp,
    "idle": _idle,
    "count": _count,
}


def build_program(name: WorkloadName | str) -> GuestProgram:
    """The machine code of workload ``name`` (or ``count``, the benchmark loop)."""
    try:
        body = _BODIES[name]
    except KeyError:
        raise AsmError(f"no guest program {name!r}; choose one of {', '.join(_BODIES)}") from None
    a = Assembler()
    if name in ("idle", "count"):
        a.mov(R15, RDI)
    else:
        _prologue(a)
    body(a)
    return GuestProgram(name, a.assemble(CODE_ADDR))
