"""The assembler front end, checked by disassembling what it encodes."""

import pytest

from dirtylog.guest.asm import R15, RAX, RBX, AsmError, Assembler, Mem, disassemble
from dirtylog.guest.programs import build_program
from dirtylog.workload import WORKLOADS


def test_labels_resolve_forward_and_backward() -> None:
    a = Assembler()
    a.label("top")
    a.add(RBX, imm=4096)
    a.cmp(RBX, Mem(R15, 24))
    a.jb("top")
    a.jmp("end")
    a.mov(Mem(RAX), RBX)
    a.label("end")
    a.out_dx_al()
    lines = disassemble(a.assemble(0x1000), 0x1000)
    assert lines[0] == "0x1000: add rbx,1000h"
    assert lines[1] == "0x1007: cmp rbx,[r15+18h]"
    assert lines[2].endswith("jb short 0000000000001000h")
    end = lines[-1].split(":")[0]
    assert lines[3].endswith(f"jmp short {int(end, 16):016X}h")
    assert lines[-1].endswith("out dx,al")


def test_undefined_label_and_huge_immediate_are_refused() -> None:
    a = Assembler()
    a.jmp("nowhere")
    with pytest.raises(AsmError, match="undefined label 'nowhere'"):
        a.assemble(0)
    with pytest.raises(AsmError, match="does not fit"):
        Assembler().add(RAX, imm=1 << 40)


@pytest.mark.parametrize("name", [*WORKLOADS, "count"])
def test_every_workload_assembles_and_calls_the_host_only_by_out(name: str) -> None:
    program = build_program(name)
    text = disassemble(program.code, 0x180000)
    assert sum(len(line) for line in text) > 0
    privileged = ("hlt", "cli", "sti", "mov cr", "lgdt", "wrmsr", "in ")
    assert not [line for line in text if any(f" {p}" in line.split(":", 1)[1] for p in privileged)]
