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

from collections.abc import Callable
from typing import TYPE_CHECKING

from dirtylog.guest.arch import ControlBlock, GuestCall, GuestProgram
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
    RBP,
    RBX,
    RCX,
    RDI,
    RDX,
    RSI,
    AsmError,
    Assembler,
    Mem,
)
from dirtylog.guest.x86 import CODE_ADDR, MAX_CODE_BYTES
from dirtylog.workload import WorkloadName

if TYPE_CHECKING:
    from iced_x86._iced_x86_py import Register as Reg

__all__ = ["ControlBlock", "GuestProgram", "Port", "build_program"]


Port = GuestCall  # the x86 programs call the host with ``out dx, al``, the call number as the port


def _checked(program: GuestProgram) -> GuestProgram:
    if len(program.code) > MAX_CODE_BYTES:
        raise AsmError(f"program {program.name} is {len(program.code)} bytes; at most {MAX_CODE_BYTES} fit")
    return program


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


def _trace(a: Assembler) -> None:
    """Replay a recorded trace: each window's pages are written once its recorded time has come.

    The table (see ``DirtyTrace.guest_table``) holds the window count, then (end in microseconds, page
    count) per window, then the u32 page numbers. Registers: RSI the next window's entry, RDI the next
    page number, R8 windows left, R14 the TSC when this replay began, RBP TSC kHz, R13 the current
    window's deadline in ticks, R9 the stamp (replay number), RCX pages left in the window. After the
    last window the replay reports an iteration and starts again, on a new clock.
    """
    a.mov(RBP, Mem(R15, ControlBlock.TSC_KHZ))
    a.mov(R9, Mem(R15, ControlBlock.ITERATION))
    a.inc(R9)
    a.label("replay")
    a.mov(RSI, Mem(R15, ControlBlock.TRACE_TABLE))
    a.mov(R8, Mem(RSI))
    a.mov(RDI, R8)
    a.shl(RDI, 4)
    a.add(RDI, RSI)
    a.add(RDI, imm=8)  # the page numbers follow the header and the window entries
    a.add(RSI, imm=8)
    _read_tsc(a)
    a.mov(R14, RAX)
    a.test(R8, R8)
    a.jz("replayed")
    a.label("window")
    a.mov(RAX, Mem(RSI))  # the window's end, microseconds since the replay began
    a.mul(RBP)
    a.mov_imm(RCX, 1000)
    a.div(RCX)  # ticks = us * kHz / 1000
    a.add(RAX, R14)
    a.mov(R13, RAX)
    a.label("wait")
    _read_tsc(a)
    a.mov(RCX, R13)
    a.sub(RCX, RAX)  # ticks until the window's time; <= 0 once it has come
    a.jle("due")
    a.cmp(RCX, Mem(R15, ControlBlock.SLEEP_THRESHOLD))
    a.jb("spin")
    a.mov_imm(RDX, Port.SLEEP)
    a.out_dx_al()
    a.jmp("wait")
    a.label("spin")
    a.pause()
    a.jmp("wait")
    a.label("due")
    a.mov(RCX, Mem(RSI, 8))
    a.label("page")
    a.test(RCX, RCX)
    a.jz("window_done")
    a.load32(EAX, Mem(RDI))
    a.shl(RAX, 12)
    a.add(RAX, RBX)
    a.mov(Mem(RAX), R9)
    a.inc(R10)
    a.mov(Mem(R15, ControlBlock.PROGRESS), R10)
    a.add(RDI, imm=4)
    a.dec(RCX)
    a.jmp("page")
    a.label("window_done")
    a.add(RSI, imm=16)
    a.dec(R8)
    a.jnz("window")
    a.label("replayed")
    a.mov(Mem(R15, ControlBlock.ITERATION), R9)
    a.inc(R9)
    a.mov_imm(RDX, Port.ITERATION)
    a.out_dx_al()
    a.jmp("replay")


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
    "trace": _trace,
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
    return _checked(GuestProgram(name, a.assemble(CODE_ADDR)))
