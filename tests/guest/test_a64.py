"""The A64 encoder against binutils: every instruction form and every workload program must assemble to the
same bytes with ``aarch64-linux-gnu-as`` (Debian's binutils-aarch64-linux-gnu; .ci/run installs it)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from dirtylog.guest.a64 import WZR, XZR, A64Assembler, X, disassemble
from dirtylog.guest.arch import AsmError
from dirtylog.guest.arm64 import CALL_PAGE, CODE_ADDR
from dirtylog.guest.programs_arm64 import _BODIES, build_program, program_source

AS, OBJCOPY = "aarch64-linux-gnu-as", "aarch64-linux-gnu-objcopy"
binutils = pytest.mark.skipif(shutil.which(AS) is None or shutil.which(OBJCOPY) is None,
                              reason=f"{AS} is not installed (apt-get install binutils-aarch64-linux-gnu)")


def gnu_assemble(source: str) -> bytes:
    """Bytes binutils makes of ``source`` (a .text section, flat)."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch)
        (path / "p.s").write_text(source)
        subprocess.run([AS, "-o", str(path / "p.o"), str(path / "p.s")], check=True, capture_output=True)
        subprocess.run([OBJCOPY, "-O", "binary", "-j", ".text", str(path / "p.o"), str(path / "p.bin")], check=True)
        return (path / "p.bin").read_bytes()


def every_form() -> A64Assembler:
    a = A64Assembler()
    a.label("top")
    for rd, rn, rm in ((X[0], X[1], X[2]), (X[30], X[19], X[28]), (X[9], X[9], X[9])):
        a.add(rd, rn, rm)
        a.add(rd, rn, rm, "lsl", 12)
        a.sub(rd, rn, rm, "lsr", 7)
        a.subs(rd, rn, rm, "asr", 63)
        a.eor(rd, rn, rm, "lsl", 13)
        a.eor(rd, rn, rm, "lsr", 17)
        a.orr(rd, rn, rm)
        a.umulh(rd, rn, rm)
        a.udiv(rd, rn, rm)
        a.cmp(rn, rm)
        a.mov(rd, rm)
        a.neg(rd, rm)
        a.mov(rd.w, rm.w)
        a.add_imm(rd, rn, 1)
        a.add_imm(rd, rn, 0xFFF)
        a.add_imm(rd, rn, 0x5000)
        a.sub_imm(rd, rn, 8)
        a.subs_imm(rd, rn, 1)
        a.ldr(rd, rn, 0)
        a.ldr(rd, rn, 104)
        a.ldr(rd, rn, 32760)
        a.str_(rd, rn, 8)
        a.str_(XZR, rn, 24)
        a.stlr(rd, rn)
        a.cbz(rd, "top")
        a.cbnz(rd, "end")
        a.mrs(rd, "cntvct_el0")
        a.mrs(rd, "cntfrq_el0")
    a.mov_imm(X[28], CALL_PAGE)
    a.mov_imm(X[3], 0xFFFF_0000_1234_0000)
    a.mov_imm(X[4], 0)
    a.movz(X[5], 0xBEEF, 48)
    a.movk(X[5], 0x1, 16)
    a.mov(X[6].w, WZR)
    for condition in ("eq", "ne", "hs", "lo", "hi", "ls", "ge", "lt", "gt", "le"):
        a.b_cond(condition, "top")
    a.yield_()
    a.dmb_ish()
    a.b("top")
    a.label("end")
    a.b("end")
    return a


@binutils
def test_every_instruction_form_encodes_as_binutils_does() -> None:
    a = every_form()
    code, listing = a.assemble(0)
    reference = gnu_assemble(a.source())
    assert len(code) == len(reference)
    wrong = [(listing[at], code[at:at + 4].hex(), reference[at:at + 4].hex())
             for at in range(0, len(code), 4) if code[at:at + 4] != reference[at:at + 4]]
    assert not wrong, wrong


@binutils
@pytest.mark.parametrize("name", sorted(_BODIES))
def test_each_workload_program_is_what_binutils_assembles(name: str) -> None:
    a = program_source(name, CALL_PAGE)
    code, listing = a.assemble(CODE_ADDR)
    assert code == gnu_assemble(a.source())
    assert len(listing) == len(code) // 4
    assert build_program(name, CODE_ADDR, CALL_PAGE, 1 << 16).code == code


@pytest.mark.parametrize(
    ("emit", "message"),
    [
        (lambda a: a.ldr(X[0], X[1], 4), "multiple of 8"),
        (lambda a: a.movz(X[0], 1 << 16), "does not fit 16"),
        (lambda a: a.movz(X[0], 1, 8), "must be 0, 16, 32 or 48"),
        (lambda a: a.add_imm(X[0], X[1], 0x1001), "does not fit 12"),
        (lambda a: a.add(X[0], X[1], X[2], "ror", 1), "lsl, lsr, asr"),
        (lambda a: a.mrs(X[0], "sctlr_el1"), "not one of"),
        (lambda a: a.b_cond("always", "x"), "unknown condition"),
        (lambda a: a.str_(X[0], XZR), "must be an x register"),
    ],
)
def test_forms_it_cannot_encode_are_refused_by_name(emit: object, message: str) -> None:
    with pytest.raises(AsmError, match=message):
        emit(A64Assembler())  # type: ignore[operator]


def test_branches_to_unknown_labels_are_refused() -> None:
    a = A64Assembler()
    a.b("nowhere")
    with pytest.raises(AsmError, match="undefined label 'nowhere'"):
        a.assemble(0)


def test_the_listing_names_the_instruction_at_an_address() -> None:
    program = build_program("random", CODE_ADDR, CALL_PAGE, 1 << 16)
    lines = disassemble(program.listing, program.code, CODE_ADDR, CODE_ADDR, count=2)
    assert lines == [f"{CODE_ADDR:#x}: orr x19, xzr, x0", f"{CODE_ADDR + 4:#x}: movz x28, #0xf0, lsl #32"]
    assert disassemble({}, b"\x1f\x20\x03\xd5", 0x10, 0x10) == ["0x10: .inst 0xd503201f"]
