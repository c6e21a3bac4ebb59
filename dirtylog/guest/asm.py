"""A small, readable front end to the iced-x86 encoder: 64-bit instructions by mnemonic, with labels.

iced-x86's Python package encodes ``Instruction.create_*`` values and resolves branches with
``BlockEncoder``, but has no assembler syntax. This module adds just enough of one for our guest
programs (``a.mov(RAX, Mem(R15, 8))``, ``a.jb("loop")``) and leaves encoding to iced. Its ``Decoder``
and ``Formatter`` also give :func:`disassemble`, used in crash reports and as a test oracle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from iced_x86 import (
    BlockEncoder,
    Code,
    Decoder,
    Formatter,
    FormatterSyntax,
    Instruction,
    MemoryOperand,
    Register,
)

from dirtylog.guest.arch import AsmError

if TYPE_CHECKING:
    from iced_x86._iced_x86_py import Code as CodeId
    from iced_x86._iced_x86_py import Register as Reg
else:
    CodeId = Reg = int

RAX, RBX, RCX, RDX = Register.RAX, Register.RBX, Register.RCX, Register.RDX
RSI, RDI, RSP, RBP = Register.RSI, Register.RDI, Register.RSP, Register.RBP
R8, R9, R10, R11 = Register.R8, Register.R9, Register.R10, Register.R11
R12, R13, R14, R15 = Register.R12, Register.R13, Register.R14, Register.R15
EAX, R11D, DX, AL = Register.EAX, Register.R11D, Register.DX, Register.AL

# Branch targets are matched by instruction address; labels get addresses from a range no real
# instruction uses, and BlockEncoder rewrites them to the final layout.
_LABEL_BASE = 0x7FFF_0000_0000

__all__ = ["AsmError", "Assembler", "Mem", "disassemble"]


@dataclass(frozen=True)
class Mem:
    """A 64-bit memory operand ``[base + displacement]``."""

    base: Reg
    disp: int = 0

    def operand(self) -> MemoryOperand:
        return MemoryOperand(self.base, Register.NONE, 1, self.disp, 8 if self.disp else 0)


Operand = Reg | Mem  # a register or memory; immediates go in `imm` arguments


class Assembler:
    """Collects instructions and labels; :meth:`assemble` returns machine code for a load address."""

    def __init__(self) -> None:
        self._instructions: list[Instruction] = []
        self._labels: dict[str, int] = {}
        self._pending: list[str] = []
        self._branches: list[str] = []

    # --- labels and branches ------------------------------------------------------------------------

    def label(self, name: str) -> None:
        """Mark the next instruction as ``name``."""
        if name in self._labels:
            raise AsmError(f"label {name!r} defined twice")
        self._labels[name] = _LABEL_BASE + 16 * len(self._labels)
        self._pending.append(name)

    def _emit(self, instruction: Instruction) -> None:
        if self._pending:
            instruction.ip = self._labels[self._pending[0]]
            # Several labels on one instruction share its address.
            for alias in self._pending[1:]:
                self._labels[alias] = instruction.ip
            self._pending.clear()
        self._instructions.append(instruction)

    def _branch(self, code: CodeId, target: str) -> None:
        self._branches.append(target)
        instruction = Instruction.create_branch(code, 0)
        instruction.near_branch64 = 0  # patched in assemble(), once every label is known
        self._emit(instruction)

    def jmp(self, target: str) -> None:
        self._branch(Code.JMP_REL32_64, target)

    def jb(self, target: str) -> None:
        self._branch(Code.JB_REL32_64, target)

    def jae(self, target: str) -> None:
        self._branch(Code.JAE_REL32_64, target)

    def jbe(self, target: str) -> None:
        self._branch(Code.JBE_REL32_64, target)

    def ja(self, target: str) -> None:
        self._branch(Code.JA_REL32_64, target)

    def jz(self, target: str) -> None:
        self._branch(Code.JE_REL32_64, target)

    def jnz(self, target: str) -> None:
        self._branch(Code.JNE_REL32_64, target)

    def jle(self, target: str) -> None:
        """Jump if less or equal, signed."""
        self._branch(Code.JLE_REL32_64, target)

    # --- data movement and arithmetic ---------------------------------------------------------------

    def mov(self, dst: Operand, src: Operand) -> None:
        """``mov dst, src`` between registers and memory (use :meth:`mov_imm` for constants)."""
        if isinstance(dst, Mem) and isinstance(src, Mem):
            raise AsmError("mov cannot move memory to memory")
        if isinstance(dst, Mem):
            assert not isinstance(src, Mem)
            self._emit(Instruction.create_mem_reg(Code.MOV_RM64_R64, dst.operand(), src))
        elif isinstance(src, Mem):
            self._emit(Instruction.create_reg_mem(Code.MOV_R64_RM64, dst, src.operand()))
        else:
            self._emit(Instruction.create_reg_reg(Code.MOV_R64_RM64, dst, src))

    def mov_imm(self, dst: Operand, value: int) -> None:
        """``mov dst, value``: any 64-bit value into a register, a sign-extended 32-bit one into memory."""
        if isinstance(dst, Mem):
            self._emit(Instruction.create_mem_i32(Code.MOV_RM64_IMM32, dst.operand(), _imm32(value)))
        else:
            self._emit(Instruction.create_reg_u64(Code.MOV_R64_IMM64, dst, value & (2**64 - 1)))

    def mov32(self, dst: Reg, src: Reg) -> None:
        """``mov r32, r32``: the low half of ``src``, zero-extended (pass the 32-bit register names)."""
        self._emit(Instruction.create_reg_reg(Code.MOV_R32_RM32, dst, src))

    def _alu(self, name: str, dst: Operand, src: Operand | None, imm: int | None) -> None:
        if imm is not None:
            code = getattr(Code, f"{name}_RM64_IMM32")
            if isinstance(dst, Mem):
                self._emit(Instruction.create_mem_i32(code, dst.operand(), _imm32(imm)))
            else:
                self._emit(Instruction.create_reg_i32(code, dst, _imm32(imm)))
        elif isinstance(dst, Mem):
            if isinstance(src, Mem) or src is None:
                raise AsmError(f"{name.lower()} needs a register source for a memory destination")
            self._emit(Instruction.create_mem_reg(getattr(Code, f"{name}_RM64_R64"), dst.operand(), src))
        elif isinstance(src, Mem):
            self._emit(Instruction.create_reg_mem(getattr(Code, f"{name}_R64_RM64"), dst, src.operand()))
        elif src is not None:
            self._emit(Instruction.create_reg_reg(getattr(Code, f"{name}_R64_RM64"), dst, src))
        else:
            raise AsmError(f"{name.lower()} needs a source or an immediate")

    def add(self, dst: Operand, src: Operand | None = None, *, imm: int | None = None) -> None:
        self._alu("ADD", dst, src, imm)

    def sub(self, dst: Operand, src: Operand | None = None, *, imm: int | None = None) -> None:
        self._alu("SUB", dst, src, imm)

    def xor(self, dst: Operand, src: Operand | None = None, *, imm: int | None = None) -> None:
        self._alu("XOR", dst, src, imm)

    def or_(self, dst: Operand, src: Operand | None = None, *, imm: int | None = None) -> None:
        self._alu("OR", dst, src, imm)

    def cmp(self, dst: Operand, src: Operand | None = None, *, imm: int | None = None) -> None:
        self._alu("CMP", dst, src, imm)

    def test(self, dst: Reg, src: Reg) -> None:
        self._emit(Instruction.create_reg_reg(Code.TEST_RM64_R64, dst, src))

    def shl(self, dst: Reg, count: int) -> None:
        self._emit(Instruction.create_reg_i32(Code.SHL_RM64_IMM8, dst, count))

    def shr(self, dst: Reg, count: int) -> None:
        self._emit(Instruction.create_reg_i32(Code.SHR_RM64_IMM8, dst, count))

    def _unary(self, code: CodeId, operand: Operand) -> None:
        if isinstance(operand, Mem):
            self._emit(Instruction.create_mem(code, operand.operand()))
        else:
            self._emit(Instruction.create_reg(code, operand))

    def inc(self, operand: Operand) -> None:
        self._unary(Code.INC_RM64, operand)

    def dec(self, operand: Operand) -> None:
        self._unary(Code.DEC_RM64, operand)

    def neg(self, operand: Operand) -> None:
        self._unary(Code.NEG_RM64, operand)

    def mul(self, operand: Operand) -> None:
        """``rdx:rax = rax * operand`` (unsigned)."""
        self._unary(Code.MUL_RM64, operand)

    def div(self, operand: Operand) -> None:
        """``rax = rdx:rax / operand``, ``rdx`` = the remainder (unsigned; faults if the quotient overflows)."""
        self._unary(Code.DIV_RM64, operand)

    def load32(self, dst: Reg, src: Mem) -> None:
        """``mov r32, dword [src]``: a 32-bit load, zero-extended (pass the 32-bit register name)."""
        self._emit(Instruction.create_reg_mem(Code.MOV_R32_RM32, dst, src.operand()))

    # --- system ------------------------------------------------------------------------------------

    def rdtsc(self) -> None:
        """``edx:eax = TSC``."""
        self._emit(Instruction.create(Code.RDTSC))

    def pause(self) -> None:
        self._emit(Instruction.create(Code.PAUSE))

    def out_dx_al(self) -> None:
        """``out dx, al``: with IOPL 3 this exits to the host as KVM_EXIT_IO, our guest→host call."""
        self._emit(Instruction.create_reg_reg(Code.OUT_DX_AL, DX, AL))

    # --- output ------------------------------------------------------------------------------------

    def assemble(self, ip: int) -> bytes:
        """Machine code for loading at guest address ``ip``."""
        if self._pending:
            raise AsmError(f"label(s) {self._pending} mark no instruction")
        targets = iter(self._branches)
        for instruction in self._instructions:
            if instruction.is_jcc_short_or_near or instruction.is_jmp_short_or_near:
                name = next(targets)
                if name not in self._labels:
                    raise AsmError(f"branch to undefined label {name!r}")
                instruction.near_branch64 = self._labels[name]
        encoder = BlockEncoder(64)
        encoder.add_many(self._instructions)
        code: bytes = encoder.encode(ip)
        return code


def _imm32(value: int) -> int:
    if not -(2**31) <= value < 2**31:
        raise AsmError(f"immediate {value:#x} does not fit a sign-extended 32-bit field; load it into a register")
    return value


def disassemble(code: bytes, ip: int, count: int | None = None) -> list[str]:
    """``address: instruction`` lines (Intel syntax) for ``code`` loaded at ``ip``."""
    decoder = Decoder(64, code, ip=ip)
    formatter = Formatter(FormatterSyntax.INTEL)
    lines = []
    for instruction in decoder:
        if instruction.is_invalid:
            break
        lines.append(f"{instruction.ip:#x}: {formatter.format(instruction)}")
        if count is not None and len(lines) >= count:
            break
    return lines
