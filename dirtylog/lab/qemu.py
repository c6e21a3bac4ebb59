"""Booting the arm64 environment under ``qemu-system-aarch64`` with EL2, and running one command in it.

The machine is QEMU's ``virt`` board with the virtualization extensions on (EL2, so the guest kernel
runs KVM), a GICv3 (KVM's vGIC on arm64 needs one) and the ``max`` CPU without pointer authentication,
whose emulation otherwise takes most of the boot time. ``kvm-arm.mode=nvhe`` on the kernel command line
boots KVM in nVHE mode instead of VHE.

The console is the PL011 UART on QEMU's stdio: the command's output streams through it, and the
guest's ``/init`` ends with a marker line carrying the command's exit status, which is how the host
learns it (QEMU itself exits 0 on the guest's power-off).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from dirtylog.lab.environment import EXIT_MARKER, Environment, payload
from dirtylog.lab.errors import BootError, QemuMissingError

QEMU = "qemu-system-aarch64"
_MARKER = re.compile(re.escape(EXIT_MARKER) + r" (\d+)@@")


@dataclass(frozen=True)
class BootOptions:
    """How to boot: CPUs and memory of the emulated machine, KVM's mode, a time limit for the whole run."""

    cpus: int = 2
    memory_mib: int = 2048
    nvhe: bool = False
    timeout: float = 900.0


def find_qemu() -> str:
    """The path of ``qemu-system-aarch64``, or an error saying how to install it."""
    path = shutil.which(QEMU)
    if path is None:
        raise QemuMissingError(f"{QEMU} is not installed: the arm64 lab emulates an arm64 machine with it. "
                               "Install it with `apt-get install qemu-system-arm` (Debian/Ubuntu)")
    return path


def command_line(environment: Environment, initrd: Path, options: BootOptions, *, interactive: bool) -> list[str]:
    """The QEMU command that boots ``environment`` with ``initrd``."""
    append = "console=ttyAMA0 rdinit=/init panic=-1 loglevel=3 quiet"
    if options.nvhe:
        append += " kvm-arm.mode=nvhe"
    console = ["-nographic"] if interactive else ["-display", "none", "-monitor", "none", "-serial", "stdio"]
    return [find_qemu(), "-M", "virt,virtualization=on,gic-version=3", "-cpu", "max,pauth=off",
            "-smp", str(options.cpus), "-m", f"{options.memory_mib}M", *console, "-no-reboot",
            "-kernel", environment.kernel, "-initrd", str(initrd), "-append", append]


def run(environment: Environment, command: list[str] | None, options: BootOptions = BootOptions(),
        *, output: TextIO | None = None, guest_env: dict[str, str] | None = None) -> int:
    """Boot, run ``command`` (None: an interactive shell) and return its exit status.

    Output is streamed to ``output`` (default stdout) line by line as the guest prints it.
    """
    qemu = find_qemu()
    output = output or sys.stdout
    env = dict(guest_env or {})
    if not output.isatty():  # a log or a pipe: no colours or styles from the guest's rich
        env.setdefault("NO_COLOR", "1")
        env.setdefault("TERM", "dumb")
    env.setdefault("COLUMNS", str(shutil.get_terminal_size((120, 40)).columns))
    with tempfile.TemporaryDirectory(prefix="dirtylog-arm64-") as scratch:
        initrd = Path(scratch) / "initrd.cpio"
        with initrd.open("wb") as out:
            with open(environment.rootfs, "rb") as base:
                shutil.copyfileobj(base, out, 1 << 20)
            out.write(payload(command, environment=env))
        argv = command_line(environment, initrd, options, interactive=command is None)
        argv[0] = qemu
        if command is None:
            return _interactive(argv)
        return _stream(argv, output, options.timeout)


def _interactive(argv: list[str]) -> int:
    done = subprocess.run(argv, check=False)
    if done.returncode != 0:
        raise BootError(f"{QEMU} exited with status {done.returncode}")
    return 0


def _stream(argv: list[str], output: TextIO, timeout: float) -> int:
    process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    deadline = time.monotonic() + timeout
    status: int | None = None
    tail: list[str] = []
    try:
        os.set_blocking(process.stdout.fileno(), True)
        for raw in iter(process.stdout.readline, b""):
            line = raw.decode(errors="replace").replace("\r", "")
            match = _MARKER.search(line)
            if match:
                status = int(match.group(1))
                continue
            if status is None:
                output.write(line)
                output.flush()
                tail = [*tail[-4:], line.rstrip()]
            if time.monotonic() > deadline:
                raise BootError(f"the arm64 run took longer than {timeout:.0f} s and was stopped")
        process.wait(30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    error = process.stderr.read().decode(errors="replace").strip()
    process.stderr.close()
    process.stdout.close()
    if status is None:
        why = error.splitlines()[-1] if error else (tail[-1] if tail else "no output at all")
        raise BootError(f"the arm64 system ended without reporting the command's exit status "
                        f"({QEMU} exit status {process.returncode}; last words: {why})")
    with contextlib.suppress(ValueError):
        output.flush()
    return status
