"""Guest workloads as A64 machine code, built with :mod:`dirtylog.guest.a64` (checked against binutils).

The same workloads as the x86 programs (:mod:`dirtylog.guest.programs`), over the same control block.
Every program starts at EL1 with the MMU off, X0 = its control block and X1 = its vCPU index, and keeps
its state in callee-saved registers::

    x19 control block      x20 first byte of this vCPU's share     x21 pages in the share
    x24 progress counter   x22 xorshift64 PRNG state                x23 counter ticks per page (0: no limit)
    x25 deadline of the next write (rate limiting)                  x26 stamp iteration, x27 loop counter
    x28 the guest-call page (outside RAM: a store there is an MMIO exit)      x9-x12 scratch

Unlike x86's TSC, the generic timer's frequency is architectural state the guest can read
(``cntfrq_el0``), so the program reports it in ``COUNTER_HZ`` and derives its own pacing from
``RATE`` with ``udiv``; the host never needs to know it in advance.

A call to the host is ``str xN, [x28, #8 * call]``: the store's syndrome is complete, so KVM exits with
KVM_EXIT_MMIO carrying the address (the call) and the value (its argument), and skips the instruction
on the next KVM_RUN.
"""

from __future__ import annotations

from collections.abc import Callable

from dirtylog.guest.a64 import XZR, A64Assembler, Reg, X
from dirtylog.guest.arch import AsmError, ControlBlock, GuestCall, GuestProgram

CB, BASE, NPAGES, PRNG, TICKS, PROGRESS, DEADLINE, STAMP, LOOP, CALLS = (
    X[19], X[20], X[21], X[22], X[23], X[24], X[25], X[26], X[27], X[28])
T0, T1, T2, T3 = X[9], X[10], X[11], X[12]


def call_offset(call: GuestCall) -> int:
    """Byte offset of ``call`` in the guest-call page."""
    return 8 * (call - GuestCall.ITERATION)


def _call(a: A64Assembler, call: GuestCall, argument: Reg = XZR) -> None:
    a.str_(argument, CALLS, call_offset(call))


def _prologue(a: A64Assembler, call_page: int) -> None:
    a.mov(CB, X[0])
    a.mov_imm(CALLS, call_page)
    a.ldr(BASE, CB, ControlBlock.AREA_BASE)
    a.ldr(NPAGES, CB, ControlBlock.AREA_NPAGES)
    a.ldr(PRNG, CB, ControlBlock.PRNG_SEED)
    a.ldr(PROGRESS, CB, ControlBlock.PROGRESS)
    # Pacing from the counter's own frequency: ticks per page, 1 ms to sleep on, 50 ms of lag forgiven.
    a.mrs(T0, "cntfrq_el0")
    a.str_(T0, CB, ControlBlock.COUNTER_HZ)
    a.ldr(T1, CB, ControlBlock.RATE)
    a.udiv(TICKS, T0, T1)  # a rate of 0 divides to 0: no limit
    a.str_(TICKS, CB, ControlBlock.TICKS_PER_PAGE)
    a.movz(T1, 1000)
    a.udiv(T2, T0, T1)
    a.str_(T2, CB, ControlBlock.SLEEP_THRESHOLD)
    a.movz(T1, 20)
    a.udiv(T2, T0, T1)
    a.str_(T2, CB, ControlBlock.MAX_LAG)
    a.mrs(DEADLINE, "cntvct_el0")


def xorshift(a: A64Assembler) -> None:
    """Advance the PRNG (xorshift64, Marsaglia 13/7/17): one ``eor`` with a shifted operand per step."""
    a.eor(PRNG, PRNG, PRNG, "lsl", 13)
    a.eor(PRNG, PRNG, PRNG, "lsr", 7)
    a.eor(PRNG, PRNG, PRNG, "lsl", 17)


def _page_address(a: A64Assembler, pages: Reg) -> None:
    """T0 = address of page ``PRNG * pages >> 64`` of the share (a uniform pick without division)."""
    a.umulh(T0, PRNG, pages)
    a.add(T0, BASE, T0, "lsl", 12)


def _after_write(a: A64Assembler, tag: str) -> None:
    """Count the write, publish progress, and hold the write rate to TICKS per page."""
    a.add_imm(PROGRESS, PROGRESS, 1)
    a.str_(PROGRESS, CB, ControlBlock.PROGRESS)
    a.cbz(TICKS, f"{tag}_paced")
    a.add(DEADLINE, DEADLINE, TICKS)
    a.label(f"{tag}_wait")
    a.mrs(T0, "cntvct_el0")
    a.subs(T1, DEADLINE, T0)  # ticks until the deadline; <= 0 when on time or late
    a.b_cond("le", f"{tag}_late")
    a.ldr(T2, CB, ControlBlock.SLEEP_THRESHOLD)
    a.cmp(T1, T2)
    a.b_cond("lo", f"{tag}_spin")
    _call(a, GuestCall.SLEEP, T1)
    a.b(f"{tag}_wait")
    a.label(f"{tag}_spin")
    a.yield_()
    a.b(f"{tag}_wait")
    a.label(f"{tag}_late")
    a.neg(T1, T1)  # ticks behind schedule
    a.ldr(T2, CB, ControlBlock.MAX_LAG)
    a.cmp(T1, T2)
    a.b_cond("ls", f"{tag}_paced")
    a.mov(DEADLINE, T0)  # too far behind (e.g. after a pause): restart the schedule from now
    a.label(f"{tag}_paced")


def _sequential(a: A64Assembler) -> None:
    a.label("pass")
    a.movz(LOOP, 0)
    a.label("next")
    a.add(T0, BASE, LOOP, "lsl", 12)
    a.str_(PROGRESS, T0)
    _after_write(a, "w")
    a.add_imm(LOOP, LOOP, 1)
    a.cmp(LOOP, NPAGES)
    a.b_cond("lo", "next")
    a.ldr(T0, CB, ControlBlock.ITERATION)
    a.add_imm(T0, T0, 1)
    a.str_(T0, CB, ControlBlock.ITERATION)
    a.b("pass")


def _random(a: A64Assembler) -> None:
    a.label("next")
    xorshift(a)
    _page_address(a, NPAGES)
    a.str_(PROGRESS, T0)
    _after_write(a, "w")
    a.b("next")


def _hotset(a: A64Assembler) -> None:
    a.label("next")
    xorshift(a)
    a.mov(T3.w, PRNG.w)  # the PRNG's low half picks hot or cold; its high half picks the page
    a.ldr(T2, CB, ControlBlock.HOT_THRESHOLD)
    a.cmp(T3, T2)
    a.b_cond("hs", "cold")
    a.ldr(T2, CB, ControlBlock.HOT_NPAGES)
    _page_address(a, T2)
    a.b("write")
    a.label("cold")
    _page_address(a, NPAGES)
    a.label("write")
    a.str_(PROGRESS, T0)
    _after_write(a, "w")
    a.b("next")


def _stamp(a: A64Assembler) -> None:
    a.ldr(STAMP, CB, ControlBlock.ITERATION)
    a.add_imm(STAMP, STAMP, 1)  # the iteration being written; 0 in a page means "never stamped"
    a.label("iteration")
    a.ldr(LOOP, CB, ControlBlock.WRITES_PER_ITERATION)
    a.label("next")
    xorshift(a)
    _page_address(a, NPAGES)
    a.str_(STAMP, T0)
    _after_write(a, "w")
    a.subs_imm(LOOP, LOOP, 1)
    a.b_cond("ne", "next")
    # arm64 may make stores visible out of order: a store-release of ITERATION = k is observed only
    # after every stamp <= k, so a host that reads k sees them all (x86 gives this order for free).
    a.add_imm(T0, CB, ControlBlock.ITERATION)
    a.stlr(STAMP, T0)
    a.add_imm(STAMP, STAMP, 1)
    _call(a, GuestCall.ITERATION)
    a.b("iteration")


def _batch(a: A64Assembler) -> None:
    """Write exactly the pages the host lists, once per request: a guest whose accesses are a schedule.

    The host writes the addresses and their count, then bumps BATCH_SEQ; the guest writes BATCH_SEQ into
    each listed page in order and publishes it in ITERATION with a store-release. Between batches it asks
    the host to sleep 1 ms at a time. Its only other accesses are instruction fetches from the code page
    and loads and that one store on its control block, which the model of a schedule replays too.
    """
    a.label("wait")
    a.ldr(T0, CB, ControlBlock.BATCH_SEQ)
    a.ldr(T1, CB, ControlBlock.ITERATION)
    a.cmp(T0, T1)
    a.b_cond("ne", "work")
    a.ldr(T2, CB, ControlBlock.SLEEP_THRESHOLD)
    _call(a, GuestCall.SLEEP, T2)
    a.b("wait")
    a.label("work")
    a.ldr(LOOP, CB, ControlBlock.BATCH_COUNT)
    a.add_imm(T2, CB, ControlBlock.BATCH_PAGES)
    a.label("next")
    a.cbz(LOOP, "done")
    a.ldr(T3, T2)
    a.str_(T0, T3)
    a.add_imm(T2, T2, 8)
    a.sub_imm(LOOP, LOOP, 1)
    a.b("next")
    a.label("done")
    a.add_imm(T1, CB, ControlBlock.ITERATION)
    a.stlr(T0, T1)
    a.b("wait")


def _idle(a: A64Assembler) -> None:
    a.label("idle")
    _call(a, GuestCall.IDLE)
    a.b("idle")


def _count(a: A64Assembler) -> None:
    """COUNT iterations of a two-instruction loop, then DONE: measures execution speed."""
    a.ldr(T0, CB, ControlBlock.COUNT)
    a.label("loop")
    a.subs_imm(T0, T0, 1)
    a.b_cond("ne", "loop")
    _call(a, GuestCall.DONE)
    _idle(a)


_BODIES: dict[str, Callable[[A64Assembler], None]] = {
    "sequential": _sequential,
    "random": _random,
    "hotset": _hotset,
    "stamp": _stamp,
    "idle": _idle,
    "count": _count,
    "batch": _batch,
}


def program_source(name: str, call_page: int) -> A64Assembler:
    """The assembler holding workload ``name``, before assembly (the tests read its GNU source)."""
    try:
        body = _BODIES[name]
    except KeyError:
        raise AsmError(f"no guest program {name!r}; choose one of {', '.join(_BODIES)}") from None
    a = A64Assembler()
    if name in ("idle", "count"):
        a.mov(CB, X[0])
        a.mov_imm(CALLS, call_page)
    else:
        _prologue(a, call_page)
    body(a)
    return a


def build_program(name: str, code_addr: int, call_page: int, max_bytes: int) -> GuestProgram:
    """The machine code and listing of workload ``name`` for loading at ``code_addr``."""
    code, listing = program_source(name, call_page).assemble(code_addr)
    if len(code) > max_bytes:
        raise AsmError(f"program {name} is {len(code)} bytes; at most {max_bytes} fit")
    return GuestProgram(name, code, listing)
