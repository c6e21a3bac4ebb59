"""Which guest architecture this host's KVM runs: its own (KVM does not emulate another)."""

from __future__ import annotations

import platform

from dirtylog.guest.arch import Architecture, ArchitectureError


def host_machine() -> str:
    """The host's machine name as the architectures know it (``x86_64``, ``aarch64``)."""
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def host_architecture() -> Architecture:
    """The guest architecture of this host: KVM runs guests of the host's own architecture."""
    machine = host_machine()
    if machine == "x86_64":
        from dirtylog.guest.x86_64 import X86_64

        return X86_64()
    if machine == "aarch64":
        from dirtylog.guest.arm64 import Arm64

        return Arm64()
    raise ArchitectureError(f"dirtylog has guest programs for x86_64 and aarch64 hosts, not {machine}; "
                            "run on one of those (or try `dirtylog arm64` to boot an emulated arm64 host)")
