"""Why ``KVM_RUN`` returned, as values: one frozen dataclass per exit reason, carrying its payload.

Like rust-vmm's ``VcpuExit`` enum: a caller matches on the type (``case IoOut(port=0x10)``) instead of
reading the shared ``kvm_run`` page, which the next ``KVM_RUN`` overwrites.
"""

from __future__ import annotations

from dataclasses import dataclass

from dirtylog.kvm import abi


@dataclass(frozen=True)
class VcpuExit:
    """Base of every exit; ``reason`` is the kernel's KVM_EXIT_* number."""

    @property
    def name(self) -> str:
        return type(self).__name__


@dataclass(frozen=True)
class IoOut(VcpuExit):
    """The guest executed ``out``: a call to the host on ``port`` with ``data`` (size * count bytes)."""

    port: int
    size: int
    data: bytes


@dataclass(frozen=True)
class IoIn(VcpuExit):
    """The guest executed ``in`` on ``port``; our guests never do, so callers treat it as a crash."""

    port: int
    size: int


@dataclass(frozen=True)
class Mmio(VcpuExit):
    """The guest touched a guest-physical address outside every memory slot."""

    phys_addr: int
    data: bytes
    is_write: bool


@dataclass(frozen=True)
class Hlt(VcpuExit):
    """The guest halted."""


@dataclass(frozen=True)
class Shutdown(VcpuExit):
    """Triple fault: the guest took an exception it could not deliver."""


@dataclass(frozen=True)
class Interrupted(VcpuExit):
    """``KVM_RUN`` returned early because of a signal or ``immediate_exit``; the guest is intact."""


@dataclass(frozen=True)
class DirtyRingFull(VcpuExit):
    """This vCPU's dirty ring is full: harvest and reset it before running again."""


@dataclass(frozen=True)
class FailEntry(VcpuExit):
    """The hardware refused to enter the guest (invalid guest state)."""

    hardware_entry_failure_reason: int
    cpu: int


@dataclass(frozen=True)
class InternalError(VcpuExit):
    """KVM could not handle something the guest did (e.g. an instruction it failed to emulate)."""

    suberror: int
    data: tuple[int, ...]


@dataclass(frozen=True)
class SystemEvent(VcpuExit):
    """The guest asked for a reset, shutdown or crash report."""

    type: int


@dataclass(frozen=True)
class UnknownExit(VcpuExit):
    """An exit reason this package does not decode."""

    exit_reason: int

    @property
    def name(self) -> str:
        return abi.EXIT_REASON_NAMES.get(self.exit_reason, f"exit {self.exit_reason}")


def decode_exit(run: abi.kvm_run, page: memoryview) -> VcpuExit:
    """The typed exit described by the ``kvm_run`` page after ``KVM_RUN`` returned normally."""
    reason = run.exit_reason
    if reason == abi.KVM_EXIT_IO:
        io = run.exit.io
        if io.direction == abi.KVM_EXIT_IO_OUT:
            length = io.size * io.count
            return IoOut(io.port, io.size, bytes(page[io.data_offset : io.data_offset + length]))
        return IoIn(io.port, io.size)
    if reason == abi.KVM_EXIT_HLT:
        return Hlt()
    if reason == abi.KVM_EXIT_SHUTDOWN:
        return Shutdown()
    if reason == abi.KVM_EXIT_INTR:
        return Interrupted()
    if reason == abi.KVM_EXIT_DIRTY_RING_FULL:
        return DirtyRingFull()
    if reason == abi.KVM_EXIT_MMIO:
        mmio = run.exit.mmio
        return Mmio(mmio.phys_addr, bytes(mmio.data)[: mmio.len], bool(mmio.is_write))
    if reason == abi.KVM_EXIT_FAIL_ENTRY:
        fail = run.exit.fail_entry
        return FailEntry(fail.hardware_entry_failure_reason, fail.cpu)
    if reason == abi.KVM_EXIT_INTERNAL_ERROR:
        internal = run.exit.internal
        return InternalError(internal.suberror, tuple(internal.data[: min(internal.ndata, 16)]))
    if reason == abi.KVM_EXIT_SYSTEM_EVENT:
        return SystemEvent(run.exit.system_event.type)
    return UnknownExit(reason)
