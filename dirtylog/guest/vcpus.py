"""vCPU threads: one host thread per vCPU in ``KVM_RUN``, and the protocol that pauses, throttles and stops them.

Pausing is the subtle part. The host asks a vCPU to leave the guest by setting ``immediate_exit`` in its
``kvm_run`` page and sending its thread a signal: a thread inside ``KVM_RUN`` returns with EINTR, a thread
about to enter returns at once because of ``immediate_exit``, so no kick is lost whatever the timing.
Before parking, the thread runs ``KVM_RUN`` once more with ``immediate_exit`` set, which completes any
half-done ``out`` (the API document's rule for consistent register state), then saves its registers.

This module knows nothing of what the guest does: every exit other than a kick goes to the machine's
``on_exit`` handler, which says whether the vCPU may go on.
"""

from __future__ import annotations

import contextlib
import enum
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dirtylog.errors import DirtylogError
from dirtylog.kvm.exits import Interrupted, VcpuExit
from dirtylog.kvm.vcpu import Vcpu

KICK_SIGNAL = signal.SIGUSR1
PAUSE_TIMEOUT = 5.0  # seconds a pause may take before the machine reports a stuck vCPU
THROTTLE_TIMESLICE = 0.01  # seconds of guest time between throttle sleeps, as QEMU's CPU_THROTTLE_TIMESLICE

#: Called on a vCPU's thread for every exit but a kick: ``(vcpu index, exit)`` → whether the vCPU goes on.
ExitHandler = Callable[[int, VcpuExit], bool]
#: Called on a vCPU's thread when it ends abnormally: ``(vcpu index, what happened)``.
FailureHandler = Callable[[int, str], None]
#: Reads a parked vCPU's registers (the architecture's: ``KVM_GET_REGS`` on x86, ``ONE_REG`` on arm64).
RegisterReader = Callable[[Vcpu], Any]


class VcpuThreadError(DirtylogError):
    """The vCPU threads cannot do what was asked (a stuck vCPU, a signal handler that cannot be installed)."""


class _Request(enum.Enum):
    RUN = 0
    PAUSE = 1
    STOP = 2


@dataclass
class _VcpuThread:
    vcpu: Vcpu
    thread: threading.Thread | None = None
    ident: int = 0
    parked: bool = False
    regs: Any = None
    wake: threading.Event = field(default_factory=threading.Event)
    delay: float = 0.0  # seconds to spend outside the guest at the next chance (throttling)
    done: threading.Event = field(default_factory=threading.Event)


def install_kick_handler() -> None:
    """Make the kick signal interrupt ``KVM_RUN`` (EINTR) instead of killing the process."""
    if signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, None):
        return
    if threading.current_thread() is not threading.main_thread():
        raise VcpuThreadError(
            f"create the first Machine from the main thread: it installs a {KICK_SIGNAL.name} handler "
            "to kick vCPUs out of KVM_RUN, and only the main thread may install signal handlers")
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)


class VcpuThreads:
    """The threads that run ``vcpus``; ``pause``/``resume``/``stop`` return when every thread has obeyed.

    ``stopped`` tells a waiting caller to give up early (a crashed guest never parks).
    """

    def __init__(self, vcpus: list[Vcpu], on_exit: ExitHandler, on_failure: FailureHandler,
                 stopped: Callable[[], bool], read_regs: RegisterReader = Vcpu.get_regs) -> None:
        self._threads = [_VcpuThread(vcpu) for vcpu in vcpus]
        self._on_exit = on_exit
        self._on_failure = on_failure
        self._stopped = stopped
        self._read_regs = read_regs
        self._request = _Request.RUN
        self._control = threading.Condition()
        self.throttle = 0.0
        self._throttle_thread: threading.Thread | None = None

    @property
    def vcpus(self) -> list[Vcpu]:
        return [entry.vcpu for entry in self._threads]

    @property
    def thread_ids(self) -> list[int]:
        """The kernel's thread id of each vCPU's thread (0 before it started): what a userfaultfd reports as the
        thread that faulted."""
        return [entry.thread.native_id or 0 if entry.thread is not None else 0 for entry in self._threads]

    def start(self, paused: bool = False) -> None:
        """One host thread per vCPU, each entering the guest at once; or, ``paused``, parking before the guest
        runs one instruction (``resume`` lets them in)."""
        self._request = _Request.PAUSE if paused else _Request.RUN
        for index, entry in enumerate(self._threads):
            entry.thread = threading.Thread(target=self._loop, args=(index,), name=f"vcpu{index}", daemon=True)
            entry.thread.start()
        if paused:
            self._wait_until(lambda: all(t.parked or t.done.is_set() for t in self._threads), "pause")

    def pause(self) -> None:
        """Park every thread outside the guest with its registers saved."""
        self._request_all(_Request.PAUSE)
        self._wait_until(lambda: all(t.parked or t.done.is_set() for t in self._threads), "pause")

    def resume(self) -> None:
        """Let every parked thread enter the guest again."""
        with self._control:
            self._request = _Request.RUN
            self._control.notify_all()
        # Wait until every thread has cleared immediate_exit, so a pause right after cannot
        # have its kick cleared by a thread still on its way out of the parked state.
        self._wait_until(lambda: not any(t.parked for t in self._threads), "resume")

    def stop(self) -> None:
        """End every thread (parked or running)."""
        self._request_all(_Request.STOP)
        for entry in self._threads:
            if entry.thread is not None:
                entry.thread.join(PAUSE_TIMEOUT)

    def saved_regs(self, index: int) -> Any:
        """Registers vCPU ``index`` saved when it last parked (or were loaded into it)."""
        return self._threads[index].regs

    def set_saved_regs(self, index: int, regs: Any) -> None:
        self._threads[index].regs = regs

    def sleep(self, index: int, seconds: float) -> None:
        """On vCPU ``index``'s own thread: wait outside the guest, cut short by a pause, stop or delay."""
        self._threads[index].wake.wait(seconds)

    def delay(self, index: int, seconds: float) -> None:
        """Hold vCPU ``index`` outside the guest for ``seconds`` at its next chance; a pause or stop cuts the
        delay short."""
        entry = self._threads[index]
        with self._control:
            entry.delay += seconds
        self._kick(entry, wake=False)

    def set_throttle(self, fraction: float) -> None:
        """Keep every vCPU out of the guest ``fraction`` of the time (QEMU's cpu-throttle: every 10 ms
        timeslice each vCPU sleeps ``fraction / (1 - fraction)`` timeslices); 0 stops throttling."""
        if not 0 <= fraction < 1:
            raise VcpuThreadError(f"throttle fraction must be in [0, 1), got {fraction}")
        self.throttle = fraction
        if fraction and (self._throttle_thread is None or not self._throttle_thread.is_alive()):
            self._throttle_thread = threading.Thread(target=self._throttle_loop, name="throttle", daemon=True)
            self._throttle_thread.start()

    # --- the protocol --------------------------------------------------------------------------------

    def _throttle_loop(self) -> None:
        while self.throttle and self._request is _Request.RUN:
            sleep = THROTTLE_TIMESLICE * self.throttle / (1 - self.throttle)
            for index in range(len(self._threads)):
                self.delay(index, sleep)
            time.sleep(THROTTLE_TIMESLICE + sleep)

    def _request_all(self, request: _Request) -> None:
        with self._control:
            self._request = request
            self._control.notify_all()
        for entry in self._threads:
            self._kick(entry)

    def _kick(self, entry: _VcpuThread, wake: bool = True) -> None:
        entry.vcpu.immediate_exit = True
        if wake:
            entry.wake.set()
        if entry.ident and not entry.done.is_set():
            # The thread may end between the check and the kill.
            with contextlib.suppress(ProcessLookupError):
                signal.pthread_kill(entry.ident, KICK_SIGNAL)

    def _wait_until(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + PAUSE_TIMEOUT
        while True:
            with self._control:
                if self._control.wait_for(condition, timeout=0.05):
                    return
            if self._stopped() or time.monotonic() > deadline:
                break
            if what == "pause":  # a thread may have been between its check and KVM_RUN: kick again
                for entry in self._threads:
                    if not entry.parked:
                        self._kick(entry)
        if self._stopped():
            return  # the caller reports why (a crash)
        stuck = [i for i, t in enumerate(self._threads) if (not t.parked) == (what == "pause")]
        raise VcpuThreadError(f"{what}() timed out after {PAUSE_TIMEOUT} s waiting for vCPU(s) {stuck}")

    def _loop(self, index: int) -> None:
        entry = self._threads[index]
        entry.ident = threading.get_ident()
        vcpu = entry.vcpu
        try:
            while True:
                if self._request is not _Request.RUN:
                    if not self._park(entry):
                        return
                    continue
                exit_ = vcpu.run()
                if isinstance(exit_, Interrupted):
                    # Clear before the loop rechecks the request: a pause that raced with this kick set
                    # its request first and immediate_exit second, so one of the two is still seen.
                    vcpu.immediate_exit = False
                    self._serve_delay(entry)
                elif not self._on_exit(index, exit_):
                    return
        except Exception as error:  # a failure in a vCPU thread must reach the user, not vanish
            self._on_failure(index, f"host error: {error}")
        finally:
            entry.done.set()
            with self._control:
                self._control.notify_all()

    def _serve_delay(self, entry: _VcpuThread) -> None:
        with self._control:
            delay, entry.delay = entry.delay, 0.0
        if delay > 0 and self._request is _Request.RUN:
            entry.wake.wait(delay)

    def _park(self, entry: _VcpuThread) -> bool:
        """Leave the guest consistently and wait; False when the machine is stopping."""
        vcpu = entry.vcpu
        vcpu.immediate_exit = True
        vcpu.run()  # completes a pending `out`; returns at once because of immediate_exit
        entry.regs = self._read_regs(vcpu)
        with self._control:
            entry.parked = True
            self._control.notify_all()
            self._control.wait_for(lambda: self._request is not _Request.PAUSE)
            if self._request is _Request.STOP:
                return False
            vcpu.immediate_exit = False
            entry.wake.clear()
            entry.parked = False
            self._control.notify_all()
        return True

    def notify(self) -> None:
        """Wake waiters of ``pause``/``resume`` (after a crash was recorded)."""
        with self._control:
            self._control.notify_all()
