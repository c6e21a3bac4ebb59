"""A small A64 (arm64) assembler for the guest workloads: the few instructions they need, with labels.

dirtylog must build its arm64 guest programs *inside* the arm64 lab too, where no assembler is
installed, so this is pure Python: each method encodes one instruction form from the ARM ARM's tables
and records the same instruction as GNU assembler text. ``tests/guest/test_a64.py`` assembles that text
with binutils' ``aarch64-linux-gnu-as`` and requires identical bytes, form by form and for every whole
workload program, so no encoding here is unchecked. The text doubles as the listing that crash reports
show for the faulting address (:func:`disassemble`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dirtylog.guest.arch import AsmError

INSTRUCTION_BYTES = 4

CONDITIONS = {"eq": 0, "ne": 1, "hs": 2, "lo": 3, "mi": 4, "pl": 5, "vs": 6, "vc": 7, "hi": 8, "ls": 9,
              "ge": 10, "lt": 11, "gt": 12, "le": 13}

#: System registers the programs read, as (op0, op1, CRn, CRm, op2).
SYSTEM_REGISTERS = {"cntvct_el0": (3, 3, 14, 0, 2), "cntfrq_el0": (3, 3, 14, 0, 0)}


@dataclass(frozen=True)
class Reg:
    """A general-purpose register: ``number`` 0-30, or 31 for the zero register (``xzr``/``wzr``)."""

    number: int
    wide: bool = True  # x (64-bit) or w (32-bit)

    def __str__(self) -> str:
        if self.number == 31:
            return "xzr" if self.wide else "wzr"
        return f"{'x' if self.wide else 'w'}{self.number}"

    @property
    def w(self) -> Reg:
        """The 32-bit view of this register."""
        return Reg(self.number, wide=False)


X = [Reg(n) for n in range(31)]
XZR = Reg(31)
WZR = Reg(31, wide=False)


@dataclass
class _Instruction:
    word: int
    text: str
    branch: tuple[str, str] | None = None  # (kind, label) for instructions patched once labels are known


@dataclass
class A64Assembler:
    """Collects instructions and labels; :meth:`assemble` returns the machine code and a listing."""

    _code: list[_Instruction] = field(default_factory=list)
    _labels: dict[str, int] = field(default_factory=dict)

    # --- labels and branches ------------------------------------------------------------------------

    def label(self, name: str) -> None:
        """Mark the next instruction as ``name``."""
        if name in self._labels:
            raise AsmError(f"label {name!r} defined twice")
        self._labels[name] = len(self._code)

    def b(self, target: str) -> None:
        self._code.append(_Instruction(0x14000000, f"b {target}", ("b", target)))

    def b_cond(self, condition: str, target: str) -> None:
        """``b.<condition> target`` (eq, ne, hs, lo, hi, ls, ge, lt, gt, le, ...)."""
        if condition not in CONDITIONS:
            raise AsmError(f"unknown condition {condition!r}; use one of {', '.join(CONDITIONS)}")
        self._code.append(_Instruction(0x54000000 | CONDITIONS[condition], f"b.{condition} {target}",
                                       ("imm19", target)))

    def cbz(self, rt: Reg, target: str) -> None:
        self._code.append(_Instruction(_sf(rt) | 0x34000000 | rt.number, f"cbz {rt}, {target}", ("imm19", target)))

    def cbnz(self, rt: Reg, target: str) -> None:
        self._code.append(_Instruction(_sf(rt) | 0x35000000 | rt.number, f"cbnz {rt}, {target}", ("imm19", target)))

    # --- moves and arithmetic -------------------------------------------------------------------------

    def _emit(self, word: int, text: str) -> None:
        self._code.append(_Instruction(word, text))

    def movz(self, rd: Reg, imm16: int, shift: int = 0) -> None:
        self._emit(_sf(rd) | 0x52800000 | _hw(rd, shift) << 21 | _u(imm16, 16) << 5 | rd.number,
                   f"movz {rd}, #{imm16:#x}" + (f", lsl #{shift}" if shift else ""))

    def movk(self, rd: Reg, imm16: int, shift: int = 0) -> None:
        self._emit(_sf(rd) | 0x72800000 | _hw(rd, shift) << 21 | _u(imm16, 16) << 5 | rd.number,
                   f"movk {rd}, #{imm16:#x}" + (f", lsl #{shift}" if shift else ""))

    def mov_imm(self, rd: Reg, value: int) -> None:
        """Any 64-bit constant: a ``movz`` and a ``movk`` per further non-zero 16-bit piece."""
        value &= (1 << 64) - 1
        pieces = [(value >> shift) & 0xFFFF for shift in range(0, 64, 16)]
        first = next((i for i, piece in enumerate(pieces) if piece), 0)
        self.movz(rd, pieces[first], 16 * first)
        for index in range(first + 1, 4):
            if pieces[index]:
                self.movk(rd, pieces[index], 16 * index)

    def _add_sub_imm(self, base: int, name: str, rd: Reg, rn: Reg, imm: int) -> None:
        if rn.number == 31 or (rd.number == 31 and not name.endswith("s")):
            raise AsmError(f"{name} with an immediate treats register 31 as sp, which these programs never use")
        shift = 0
        if imm >= 1 << 12 and imm % (1 << 12) == 0:
            imm, shift = imm >> 12, 1
        self._emit(_sf(rd) | base | shift << 22 | _u(imm, 12) << 10 | rn.number << 5 | rd.number,
                   f"{name} {rd}, {rn}, #{imm:#x}" + (", lsl #12" if shift else ""))

    def add_imm(self, rd: Reg, rn: Reg, imm: int) -> None:
        self._add_sub_imm(0x11000000, "add", rd, rn, imm)

    def sub_imm(self, rd: Reg, rn: Reg, imm: int) -> None:
        self._add_sub_imm(0x51000000, "sub", rd, rn, imm)

    def subs_imm(self, rd: Reg, rn: Reg, imm: int) -> None:
        self._add_sub_imm(0x71000000, "subs", rd, rn, imm)

    def _shifted(self, base: int, name: str, rd: Reg, rn: Reg, rm: Reg, shift: str, amount: int) -> None:
        kinds = {"lsl": 0, "lsr": 1, "asr": 2}
        if shift not in kinds:
            raise AsmError(f"shift {shift!r} is not one of lsl, lsr, asr")
        if not 0 <= amount < (64 if rd.wide else 32):
            raise AsmError(f"shift amount {amount} is out of range for {rd}")
        suffix = f", {shift} #{amount}" if amount else ""
        self._emit(_sf(rd) | base | kinds[shift] << 22 | rm.number << 16 | amount << 10 | rn.number << 5 | rd.number,
                   f"{name} {rd}, {rn}, {rm}{suffix}")

    def add(self, rd: Reg, rn: Reg, rm: Reg, shift: str = "lsl", amount: int = 0) -> None:
        self._shifted(0x0B000000, "add", rd, rn, rm, shift, amount)

    def sub(self, rd: Reg, rn: Reg, rm: Reg, shift: str = "lsl", amount: int = 0) -> None:
        self._shifted(0x4B000000, "sub", rd, rn, rm, shift, amount)

    def subs(self, rd: Reg, rn: Reg, rm: Reg, shift: str = "lsl", amount: int = 0) -> None:
        self._shifted(0x6B000000, "subs", rd, rn, rm, shift, amount)

    def cmp(self, rn: Reg, rm: Reg) -> None:
        """``cmp rn, rm`` (``subs xzr, rn, rm``)."""
        self._shifted(0x6B000000, "subs", XZR if rn.wide else WZR, rn, rm, "lsl", 0)

    def orr(self, rd: Reg, rn: Reg, rm: Reg, shift: str = "lsl", amount: int = 0) -> None:
        self._shifted(0x2A000000, "orr", rd, rn, rm, shift, amount)

    def eor(self, rd: Reg, rn: Reg, rm: Reg, shift: str = "lsl", amount: int = 0) -> None:
        self._shifted(0x4A000000, "eor", rd, rn, rm, shift, amount)

    def mov(self, rd: Reg, rm: Reg) -> None:
        """``mov rd, rm`` (``orr rd, zr, rm``); with ``w`` registers it zero-extends the low half."""
        self.orr(rd, XZR if rd.wide else WZR, rm)

    def neg(self, rd: Reg, rm: Reg) -> None:
        """``neg rd, rm`` (``sub rd, zr, rm``)."""
        self.sub(rd, XZR if rd.wide else WZR, rm)

    def umulh(self, rd: Reg, rn: Reg, rm: Reg) -> None:
        """High 64 bits of the unsigned 128-bit product."""
        self._emit(0x9BC07C00 | rm.number << 16 | rn.number << 5 | rd.number, f"umulh {rd}, {rn}, {rm}")

    def udiv(self, rd: Reg, rn: Reg, rm: Reg) -> None:
        """Unsigned division; a zero divisor gives 0 (no trap on arm64)."""
        self._emit(_sf(rd) | 0x1AC00800 | rm.number << 16 | rn.number << 5 | rd.number, f"udiv {rd}, {rn}, {rm}")

    # --- memory ---------------------------------------------------------------------------------------

    def ldr(self, rt: Reg, rn: Reg, offset: int = 0) -> None:
        """``ldr xt, [xn, #offset]``: a 64-bit load at a non-negative multiple of 8."""
        self._emit(0xF9400000 | _scaled(offset) << 10 | _base(rn) << 5 | rt.number, f"ldr {rt}, [{_sp(rn)}, #{offset}]")

    def str_(self, rt: Reg, rn: Reg, offset: int = 0) -> None:
        """``str xt, [xn, #offset]``: a 64-bit store. Its syndrome is complete (ISV), so a store outside
        guest RAM reaches the host as KVM_EXIT_MMIO with the value: our guest→host call."""
        self._emit(0xF9000000 | _scaled(offset) << 10 | _base(rn) << 5 | rt.number, f"str {rt}, [{_sp(rn)}, #{offset}]")

    def stlr(self, rt: Reg, rn: Reg) -> None:
        """Store-release: every earlier load and store is observed before this store."""
        self._emit(0xC89FFC00 | _base(rn) << 5 | rt.number, f"stlr {rt}, [{_sp(rn)}]")

    # --- system ---------------------------------------------------------------------------------------

    def mrs(self, rt: Reg, register: str) -> None:
        """Read a system register (``cntvct_el0``: the virtual counter; ``cntfrq_el0``: its frequency)."""
        try:
            op0, op1, crn, crm, op2 = SYSTEM_REGISTERS[register]
        except KeyError:
            raise AsmError(f"system register {register!r} is not one of {', '.join(SYSTEM_REGISTERS)}") from None
        self._emit(0xD5200000 | op0 << 19 | op1 << 16 | crn << 12 | crm << 8 | op2 << 5 | rt.number,
                   f"mrs {rt}, {register}")

    def yield_(self) -> None:
        """A spin-loop hint, as x86's ``pause``."""
        self._emit(0xD503203F, "yield")

    def dmb_ish(self) -> None:
        self._emit(0xD5033BBF, "dmb ish")

    # --- output ---------------------------------------------------------------------------------------

    def assemble(self, address: int) -> tuple[bytes, dict[int, str]]:
        """Machine code for loading at ``address``, and its listing (address -> GNU assembler text)."""
        words = []
        for index, instruction in enumerate(self._code):
            word = instruction.word
            if instruction.branch is not None:
                kind, target = instruction.branch
                if target not in self._labels:
                    raise AsmError(f"branch to undefined label {target!r}")
                if self._labels[target] >= len(self._code):
                    raise AsmError(f"label {target!r} marks no instruction")
                delta = self._labels[target] - index
                word |= (delta & 0x3FFFFFF) if kind == "b" else (delta & 0x7FFFF) << 5
            words.append(word)
        code = b"".join(word.to_bytes(INSTRUCTION_BYTES, "little") for word in words)
        return code, {address + INSTRUCTION_BYTES * i: ins.text for i, ins in enumerate(self._code)}

    def source(self) -> str:
        """The program as GNU assembler source, labels included (what the tests feed binutils)."""
        names: dict[int, list[str]] = {}
        for name, index in self._labels.items():
            names.setdefault(index, []).append(name)
        lines = []
        for index, instruction in enumerate(self._code):
            lines += [f"{name}:" for name in names.get(index, [])]
            lines.append(f"    {instruction.text}")
        return "\n".join(lines) + "\n"


def _sf(reg: Reg) -> int:
    return 0x80000000 if reg.wide else 0


def _u(value: int, bits: int) -> int:
    if not 0 <= value < 1 << bits:
        raise AsmError(f"immediate {value:#x} does not fit {bits} unsigned bits")
    return value


def _hw(reg: Reg, shift: int) -> int:
    if shift % 16 or not 0 <= shift < (64 if reg.wide else 32):
        raise AsmError(f"move-wide shift {shift} must be 0, 16, 32 or 48 (0 or 16 for a w register)")
    return shift // 16


def _scaled(offset: int) -> int:
    if offset % 8 or not 0 <= offset < 8 << 12:
        raise AsmError(f"load/store offset {offset} must be a multiple of 8 in 0..{(8 << 12) - 8}")
    return offset // 8


def _base(reg: Reg) -> int:
    if not reg.wide or reg.number == 31:
        raise AsmError(f"a load/store base must be an x register, not {reg}")
    return reg.number


def _sp(reg: Reg) -> str:
    return str(reg)


def disassemble(listing: dict[int, str], code: bytes, address: int, start: int, count: int = 3) -> list[str]:
    """``address: text`` lines from ``start`` on, from a program's listing; words it does not know show as
    ``.inst``."""
    lines = []
    start -= start % INSTRUCTION_BYTES
    for at in range(start, start + count * INSTRUCTION_BYTES, INSTRUCTION_BYTES):
        offset = at - address
        if not 0 <= offset <= len(code) - INSTRUCTION_BYTES:
            break
        word = int.from_bytes(code[offset:offset + INSTRUCTION_BYTES], "little")
        lines.append(f"{at:#x}: {listing.get(at, f'.inst {word:#010x}')}")
    return lines
