"""Run a system call inside another process, by ptrace: CRIU's parasite idea, without the parasite.

Some kernel objects act on the process that creates them — a userfaultfd works on the memory of the
process that called ``userfaultfd()`` — so a tool that wants one for another process must make *that*
process make the call. :class:`RemoteSyscalls` does it the way CRIU's compel prepares its parasite:

1. ``PTRACE_SEIZE`` one thread of the target and ``PTRACE_INTERRUPT`` it (the other threads run on);
2. save its registers;
3. point its instruction pointer at a ``syscall`` instruction that already exists in the target — the
   vDSO has one on x86-64 (its fallback path to the real system call), so no byte of the target is ever
   written — load the call's number and arguments, and single-step it;
4. read the result from ``rax``, repeat for further calls;
5. restore the saved registers and detach — also on every error path (``__exit__``).

A thread interrupted inside a blocking system call holds ``-ERESTART*`` in ``rax`` and the call's number in
``orig_rax``; restoring both makes the kernel restart that call when the thread resumes, so the target
never sees an early return. Injected calls run with ``orig_rax = -1`` so that no restart logic applies
to them. Signals that arrive for the thread while we hold it are kept and delivered at detach.

What this cannot survive: the tracer dying by ``SIGKILL`` in the millisecond between steps 3 and 5 (the
kernel then detaches the thread with the injected registers). Catchable termination signals are held
back for that millisecond.
"""

from __future__ import annotations

import contextlib
import errno
import signal
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Self

from dirtylog.linux import abi, procfs, ptrace
from dirtylog.linux.errors import InjectionError, NoSuchProcessError, ProcessError, describe_errno
from dirtylog.linux.syscalls import syscall

_HELD_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT}
_MAX_ERRNO = 4095  # a raw syscall result in [-4095, -1] is -errno


def find_syscall_instruction(pid: int, mappings: list[procfs.Mapping] | None = None) -> int:
    """The address of a ``syscall`` instruction (0f 05) in ``pid``'s executable memory.

    Looks in the vDSO first (the same few pages in every process, always present on x86-64), then in
    the executable mappings of files (libc has hundreds).
    """
    mappings = procfs.read_maps(pid) if mappings is None else mappings
    candidates = sorted((m for m in mappings if m.executable and m.perms[0] == "r"),
                        key=lambda m: (m.path != "[vdso]", m.kind != "file"))
    memory = procfs.MemoryReader(pid)
    try:
        for mapping in candidates:
            try:
                code = memory.read(mapping.start, min(mapping.size, 1 << 20))
            except OSError:
                continue  # e.g. a mapping the kernel will not let /proc/PID/mem read
            offset = code.find(abi.SYSCALL_INSTRUCTION)
            if offset >= 0:
                return mapping.start + offset
    finally:
        memory.close()
    raise InjectionError(f"found no syscall instruction in the executable memory of process {pid} "
                         "(no vDSO, no readable code)")


@contextlib.contextmanager
def _termination_held() -> Iterator[None]:
    """Hold back catchable termination signals, so the tracer does not die with a tracee mid-injection."""
    if threading.current_thread() is not threading.main_thread():
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
        try:
            yield
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return
    # On the main thread Python's own handlers only set a flag (the exception comes at the next bytecode,
    # inside our try/finally); the default-action ones would kill us at once, so catch those for now.
    caught: list[int] = []
    defaulted = [signum for signum in _HELD_SIGNALS if signal.getsignal(signum) in (signal.SIG_DFL, None)]
    for signum in defaulted:
        signal.signal(signum, lambda received, frame: caught.append(received))
    try:
        yield
    finally:
        for signum in defaulted:
            signal.signal(signum, signal.SIG_DFL)
        for received in caught:
            signal.raise_signal(received)


class RemoteSyscalls:
    """A ptrace session on one thread of ``pid`` in which :meth:`call` runs system calls as that process.

    Use as a context manager; leaving it restores the thread's registers and detaches, whatever happened.
    """

    def __init__(self, pid: int, *, stop_timeout: float = 10.0) -> None:
        self.pid = pid
        self.stop_timeout = stop_timeout
        self.tid = 0
        self.calls = 0
        self._saved: abi.user_regs_struct | None = None
        self._syscall_at = 0
        self._pending_signals: list[int] = []
        self._attached = False
        self._held: contextlib.ExitStack | None = None

    def __enter__(self) -> Self:
        self._check_target()
        self._held = contextlib.ExitStack()
        self._held.enter_context(_termination_held())
        try:
            self._attach()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._release()

    # --- attach and release ----------------------------------------------------------------------

    def _check_target(self) -> None:
        fields = procfs.status(self.pid)
        if fields.get("Tgid") != str(self.pid):
            raise ProcessError(f"{self.pid} is a thread of process {fields.get('Tgid')}, not a process; "
                               f"give the process id {fields.get('Tgid')}")
        if fields.get("Seccomp") == "1":
            raise InjectionError(f"process {self.pid} runs in strict seccomp mode, which kills it on any system "
                                 "call but read, write and exit; it cannot be asked to make one")
        state = fields.get("State", "")
        if state.startswith(("Z", "X")):
            raise NoSuchProcessError(f"process {self.pid} has exited (state {state})")

    def _pick_thread(self) -> int:
        """The thread-group leader, unless it has exited (a process whose main thread called pthread_exit)."""
        for tid in procfs.threads(self.pid):
            with contextlib.suppress(NoSuchProcessError):
                if not procfs.status(tid).get("State", "Z").startswith(("Z", "X")):
                    return tid
        raise NoSuchProcessError(f"process {self.pid} has no live thread")

    def _attach(self) -> None:
        self.tid = self._pick_thread()
        ptrace.seize(self.tid)
        self._attached = True
        ptrace.interrupt(self.tid)
        while True:
            stop = ptrace.wait_stop(self.tid, self.stop_timeout)
            if stop.is_event_stop:
                break
            # A signal arrived before the interrupt took effect: keep it for later, keep waiting.
            self._pending_signals.append(stop.signal)
            self._resume_suppressed()
        regs = ptrace.get_regs(self.tid)
        if regs.cs != abi.USER_CS_64:
            raise InjectionError(f"process {self.pid} is a 32-bit program (cs={regs.cs:#x}); only 64-bit "
                                 "x86-64 processes are supported")
        self._saved = regs
        self._syscall_at = find_syscall_instruction(self.pid)

    def _resume_suppressed(self) -> None:
        # Continue with no signal: the interrupt is still pending and stops the thread again at once.
        ptrace.cont(self.tid)

    def _release(self) -> None:
        try:
            if self._attached:
                self._attached = False
                try:
                    if self._saved is not None and self.calls:
                        ptrace.set_regs(self.tid, self._saved)
                    first = self._pending_signals[0] if self._pending_signals else 0
                    ptrace.detach(self.tid, first)
                    for signum in self._pending_signals[1:]:
                        _tgkill(self.pid, self.tid, signum)
                except ProcessError:
                    if procfs.process_exists(self.tid):
                        raise
        finally:
            if self._held is not None:
                self._held.close()
                self._held = None

    # --- calls -----------------------------------------------------------------------------------

    def call(self, number: int, *args: int) -> int:
        """Run system call ``number`` with up to six integer ``args`` in the target; returns its raw result
        (``-errno`` on failure, as the kernel gives it)."""
        if not self._attached or self._saved is None:
            raise InjectionError("RemoteSyscalls.call outside its `with` block")
        if len(args) > 6:
            raise InjectionError(f"a system call takes at most 6 arguments, got {len(args)}")
        regs = abi.user_regs_struct.from_buffer_copy(self._saved)
        regs.ip = self._syscall_at
        regs.ax = number
        regs.orig_ax = 2**64 - 1  # -1: not inside a system call, so the kernel applies no restart logic
        for name, value in zip(("di", "si", "dx", "r10", "r8", "r9"), args, strict=False):
            setattr(regs, name, value & (2**64 - 1))
        ptrace.set_regs(self.tid, regs)
        self.calls += 1
        done_at = self._syscall_at + len(abi.SYSCALL_INSTRUCTION)
        deliver = 0
        while True:
            ptrace.singlestep(self.tid, deliver)
            stop = ptrace.wait_stop(self.tid, self.stop_timeout)
            if stop.is_trap:
                after = ptrace.get_regs(self.tid)
                if after.ip == done_at:
                    result = int(after.ax)
                    return result - 2**64 if result >= 2**63 else result
            if not stop.is_event_stop and not stop.is_trap:
                self._pending_signals.append(stop.signal)  # not ours: deliver it at detach, not now
            deliver = 0

    def checked_call(self, number: int, *args: int, what: str) -> int:
        """:meth:`call`, raising :class:`InjectionError` naming ``what`` when the call fails."""
        result = self.call(number, *args)
        if -_MAX_ERRNO <= result < 0:
            raise InjectionError(f"{what} in process {self.pid} failed: {describe_errno(-result)}", -result)
        return result


def _tgkill(pid: int, tid: int, signum: int) -> None:
    """Send ``signum`` to thread ``tid`` of ``pid`` again (it arrived while we held the thread)."""
    try:
        syscall(abi.SYS_tgkill, pid, tid, signum)
    except OSError as error:
        if error.errno != errno.ESRCH:
            raise
