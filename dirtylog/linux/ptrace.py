"""ptrace(2) on x86-64, one typed call per request, with errors that say why a process may not be traced.

Only what system-call injection needs: ``PTRACE_SEIZE`` (attach without stopping or signalling),
``PTRACE_INTERRUPT`` (stop now), registers, single-step, detach, and waiting for stops. ptrace is per
thread: every call about a tracee must come from the thread that attached to it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import time
from dataclasses import dataclass

from dirtylog.linux import abi, procfs
from dirtylog.linux.errors import (
    NoSuchProcessError,
    ProcessExitedError,
    PtraceError,
    PtraceNotPermittedError,
    describe_errno,
)
from dirtylog.linux.syscalls import ptrace


@dataclass(frozen=True)
class Stop:
    """What ``waitpid`` reported for a stopped tracee."""

    signal: int  # the stop signal (SIGTRAP for a single step or an event stop)
    event: int  # PTRACE_EVENT_* from status >> 16; PTRACE_EVENT_STOP for PTRACE_INTERRUPT and group stops

    @property
    def is_event_stop(self) -> bool:
        return self.event == abi.PTRACE_EVENT_STOP

    @property
    def is_trap(self) -> bool:
        """A plain SIGTRAP signal-delivery stop, as a finished single step gives."""
        return self.signal == signal.SIGTRAP and self.event == 0

    def describe(self) -> str:
        name = signal.Signals(self.signal).name if self.signal in signal.valid_signals() else str(self.signal)
        return f"{name} stop" + (f" (event {self.event})" if self.event else "")


def _call(request: int, tid: int, addr: int = 0, data: int = 0, *, what: str) -> int:
    try:
        return ptrace(request, tid, addr, data)
    except OSError as error:
        if error.errno == errno.ESRCH:
            if not procfs.process_exists(tid):
                raise ProcessExitedError(f"thread {tid} exited during {what}", error.errno) from None
            raise PtraceError(f"{what} on thread {tid}: it is not stopped under our trace (ESRCH)",
                              error.errno) from None
        if error.errno == errno.EPERM:
            raise PtraceNotPermittedError(f"may not ptrace process {tid}: {procfs.not_permitted_reason(tid)}",
                                          error.errno) from None
        raise PtraceError(f"{what} on thread {tid} failed: {describe_errno(error.errno or 0)}", error.errno) from None


def seize(tid: int) -> None:
    """Attach to ``tid`` without stopping it (``PTRACE_SEIZE``)."""
    if not procfs.process_exists(tid):
        raise NoSuchProcessError(f"no process {tid}: /proc/{tid} does not exist")
    _call(abi.PTRACE_SEIZE, tid, what="PTRACE_SEIZE")


def interrupt(tid: int) -> None:
    """Ask a seized thread to stop (``PTRACE_INTERRUPT``); :func:`wait_stop` sees the stop."""
    _call(abi.PTRACE_INTERRUPT, tid, what="PTRACE_INTERRUPT")


def get_regs(tid: int) -> abi.user_regs_struct:
    """The general registers of a stopped tracee."""
    regs = abi.user_regs_struct()
    _call(abi.PTRACE_GETREGS, tid, 0, ctypes.addressof(regs), what="PTRACE_GETREGS")
    return regs


def set_regs(tid: int, regs: abi.user_regs_struct) -> None:
    """Load general registers into a stopped tracee."""
    _call(abi.PTRACE_SETREGS, tid, 0, ctypes.addressof(regs), what="PTRACE_SETREGS")


def singlestep(tid: int, deliver: int = 0) -> None:
    """Resume a stopped tracee for one instruction (delivering signal ``deliver``, 0 for none)."""
    _call(abi.PTRACE_SINGLESTEP, tid, 0, deliver, what="PTRACE_SINGLESTEP")


def cont(tid: int, deliver: int = 0) -> None:
    """Resume a stopped tracee (delivering signal ``deliver``, 0 for none)."""
    _call(abi.PTRACE_CONT, tid, 0, deliver, what="PTRACE_CONT")


def detach(tid: int, deliver: int = 0) -> None:
    """Let a stopped tracee go (delivering signal ``deliver``, 0 for none)."""
    _call(abi.PTRACE_DETACH, tid, 0, deliver, what="PTRACE_DETACH")


def wait_stop(tid: int, timeout: float = 10.0) -> Stop:
    """Wait for the tracee's next stop; raises :class:`ProcessExitedError` if it exits instead.

    Polls with ``WNOHANG`` so that a thread that never stops (uninterruptible sleep) turns into an error
    after ``timeout`` seconds instead of a hang.
    """
    deadline = time.monotonic() + timeout
    delay = 20e-6
    while True:
        try:
            waited, status = os.waitpid(tid, abi.WALL | os.WNOHANG)
        except ChildProcessError:
            raise ProcessExitedError(f"thread {tid} is gone (waitpid: ECHILD)", errno.ECHILD) from None
        if waited:
            break
        if time.monotonic() > deadline:
            raise PtraceError(f"thread {tid} did not stop within {timeout:.0f} s (uninterruptible sleep?)")
        time.sleep(delay)
        delay = min(delay * 2, 0.005)
    if os.WIFEXITED(status):
        raise ProcessExitedError(f"process {tid} exited with status {os.WEXITSTATUS(status)}")
    if os.WIFSIGNALED(status):
        raise ProcessExitedError(f"process {tid} was killed by {signal.Signals(os.WTERMSIG(status)).name}")
    return Stop(os.WSTOPSIG(status), status >> 16)
