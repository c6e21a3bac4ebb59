"""A runnable machine: guest RAM, a workload program, and one host thread per vCPU in ``KVM_RUN``.

Pausing is the subtle part. The host asks a vCPU to leave the guest by setting ``immediate_exit`` in its
``kvm_run`` page and sending its thread a signal: a thread inside ``KVM_RUN`` returns with EINTR, a thread
about to enter returns at once because of ``immediate_exit``, so no kick is lost whatever the timing.
Before parking, the thread runs ``KVM_RUN`` once more with ``immediate_exit`` set, which completes any
half-done ``out`` (the API document's rule for consistent register state), then saves its registers.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import signal
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import numpy as np
import numpy.typing as npt

from dirtylog.errors import DirtylogError
from dirtylog.guest.asm import disassemble
from dirtylog.guest.memory import GuestMemory
from dirtylog.guest.programs import ControlBlock, GuestProgram, Port, build_program
from dirtylog.guest.x86 import (
    CODE_ADDR,
    MAX_VCPUS,
    WORKLOAD_ADDR,
    HugePage,
    check_memory_size,
    control_block_addr,
    entry_regs,
    long_mode_sregs,
    page_tables,
    supports_1g_pages,
)
from dirtylog.kvm import abi
from dirtylog.kvm.errors import VcpuError
from dirtylog.kvm.exits import DirtyRingFull, Interrupted, IoOut, VcpuExit
from dirtylog.kvm.system import Kvm, Vm
from dirtylog.kvm.vcpu import Vcpu
from dirtylog.units import PAGE_SIZE, parse_size
from dirtylog.workload import WorkloadName, WorkloadSpec

KICK_SIGNAL = signal.SIGUSR1
PAUSE_TIMEOUT = 5.0  # seconds a pause may take before the machine reports a stuck vCPU
SLEEP_THRESHOLD_SECONDS = 0.001  # a rate-limited guest further ahead than this sleeps in the host
MAX_LAG_SECONDS = 0.05  # a guest further behind than this restarts its schedule instead of bursting
DEFAULT_RING_ENTRIES = 65536  # 1 MiB per vCPU: the host maximum here (QEMU defaults to 4096)
THROTTLE_TIMESLICE = 0.01  # seconds of guest time between throttle sleeps, as QEMU's CPU_THROTTLE_TIMESLICE
_REGS_FORMAT = "<18Q"


class MachineError(DirtylogError):
    """The machine cannot do what was asked in its current state."""


@dataclass(frozen=True)
class GuestCrash:
    """What a vCPU left behind when the guest stopped unexpectedly."""

    vcpu: int
    exit: str
    registers: dict[str, int]
    cr2: int
    code: tuple[str, ...]

    def describe(self) -> str:
        regs = " ".join(f"{name}={value:#x}" for name, value in self.registers.items())
        lines = [f"vCPU {self.vcpu} stopped with {self.exit}; registers: {regs}; cr2={self.cr2:#x}"]
        lines += [f"  {line}" for line in self.code]
        return "\n".join(lines)


class GuestCrashError(MachineError):
    """The guest crashed (triple fault, failed entry, unexpected exit); the message has its registers."""

    def __init__(self, crash: GuestCrash) -> None:
        super().__init__(crash.describe())
        self.crash = crash


class State(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


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
    regs: abi.kvm_regs | None = None
    wake: threading.Event = field(default_factory=threading.Event)
    delay: float = 0.0  # seconds to spend outside the guest at the next chance (throttling)
    done: threading.Event = field(default_factory=threading.Event)


def _install_kick_handler() -> None:
    """Make the kick signal interrupt ``KVM_RUN`` (EINTR) instead of killing the process."""
    if signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, None):
        return
    if threading.current_thread() is not threading.main_thread():
        raise MachineError(
            f"create the first Machine from the main thread: it installs a {KICK_SIGNAL.name} handler "
            "to kick vCPUs out of KVM_RUN, and only the main thread may install signal handlers")
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)


class Machine:
    """A KVM virtual machine running a guest workload on ``vcpus`` threads.

    ``memory`` is a size (``"1G"``) and ``rate`` pages per second per vCPU (None: unlimited);
    ``dirty_ring`` gives each vCPU a dirty ring (True: the default size, or a number of entries; KVM
    allows rings only before vCPUs exist, and ``dirty_log("ring")`` before :meth:`start` does the same);
    ``prefault`` allocates host memory up front (a first guest touch then costs ~3 us instead of ~24 us
    here; see docs/performance.md). The
    machine is created stopped; :meth:`start` runs it. Use it as a context manager so that everything
    is freed even when an exception escapes.
    """

    def __init__(
        self,
        memory: str | int = "1G",
        vcpus: int = 1,
        workload: WorkloadName = "random",
        rate: int | None = None,
        *,
        slots: int = 1,
        hot_fraction: float = 0.1,
        hot_weight: float = 0.9,
        writes_per_iteration: int = 0,
        page_size: HugePage = "2M",
        prefault: bool = False,
        program: GuestProgram | None = None,
        blank: bool = False,
        dirty_ring: int | bool = False,
        kvm_device: str | None = None,
    ) -> None:
        size = parse_size(memory)
        check_memory_size(size)
        if not 1 <= vcpus <= MAX_VCPUS:
            raise MachineError(f"vcpus must be between 1 and {MAX_VCPUS}, got {vcpus}")
        _install_kick_handler()
        self.state = State.CREATED
        self.crash: GuestCrash | None = None
        self.on_dirty_ring_full: Callable[[int], None] | None = None
        self.on_iteration: Callable[[int, int], None] | None = None
        self.tracker: object | None = None
        self.handed_off_to = ""  # set by a migration once the destination owns the VM
        self.throttle = 0.0
        self._throttle_thread: threading.Thread | None = None
        self.kvm = Kvm(kvm_device)
        try:
            if vcpus > self.kvm.max_vcpus:
                raise MachineError(f"this KVM allows {self.kvm.max_vcpus} vCPUs per VM; asked for {vcpus}")
            self.vm: Vm = self.kvm.create_vm()
            self.ram = GuestMemory(size, slots)
            if prefault:
                self.ram.prefault()
            self.ram.register(self.vm)
            if dirty_ring:
                self.enable_dirty_ring(None if dirty_ring is True else int(dirty_ring))
            first = WORKLOAD_ADDR // PAGE_SIZE
            self.spec = WorkloadSpec(
                workload, first, self.ram.npages - first, vcpus, rate, hot_fraction, hot_weight,
                writes_per_iteration)
            self.program = program or build_program(workload)
            if page_size == "1G" and not supports_1g_pages(self.kvm.supported_cpuid()):
                raise MachineError(f"this KVM ({self.kvm.host_type}) does not offer 1 GiB pages to guests "
                                   "(CPUID Page1GB); use page_size='2M'")
            self.page_size: HugePage = page_size
            if not blank:  # a migration destination gets every byte from the stream instead
                self._load()
        except BaseException:
            self.close()
            raise
        self._threads: list[_VcpuThread] = []
        self._request = _Request.RUN
        self._control = threading.Condition()
        self._transition = threading.Lock()
        self.done_at: dict[int, float] = {}

    # --- what the guest sees -----------------------------------------------------------------------

    def _load(self) -> None:
        """Page tables, program and control blocks, written the way any host write is: tracked."""
        _, tables = page_tables(self.ram.bytes, self.page_size)
        for address, entries in tables.items():
            self.ram.write(address, entries.view(np.uint8))
        self.ram.write(CODE_ADDR, self.program.code)
        for index in range(self.spec.vcpus):
            self.ram.write(control_block_addr(index), self._control_block(index).view(np.uint8))

    def _control_block(self, index: int, tsc_khz: int = 0) -> npt.NDArray[np.uint64]:
        spec = self.spec
        share = spec.share(index)
        block = np.zeros(PAGE_SIZE // 8, dtype=np.uint64)
        fields = {
            ControlBlock.AREA_BASE: share.start * PAGE_SIZE,
            ControlBlock.AREA_NPAGES: len(share),
            ControlBlock.PRNG_SEED: (spec.seed * (index + 1)) % (2**64 - 1) or 1,
            ControlBlock.HOT_NPAGES: max(1, int(len(share) * spec.hot_fraction)),
            ControlBlock.HOT_THRESHOLD: int(spec.hot_weight * 2**32),
            ControlBlock.WRITES_PER_ITERATION: spec.writes_per_iteration or len(share),
        }
        if tsc_khz and spec.rate:
            fields[ControlBlock.TICKS_PER_PAGE] = max(1, tsc_khz * 1000 // spec.rate)
        if tsc_khz:
            fields[ControlBlock.SLEEP_THRESHOLD] = int(tsc_khz * 1000 * SLEEP_THRESHOLD_SECONDS)
            fields[ControlBlock.MAX_LAG] = int(tsc_khz * 1000 * MAX_LAG_SECONDS)
        for offset, value in fields.items():
            block[offset // 8] = value
        return block

    def set_control(self, vcpu: int, offset: ControlBlock, value: int) -> None:
        """Set a control-block field of ``vcpu`` (before start, or for fields the guest rereads)."""
        self.ram.write(control_block_addr(vcpu) + offset, np.array([value], dtype=np.uint64).view(np.uint8))

    def control(self, vcpu: int, offset: ControlBlock) -> int:
        """A control-block field of ``vcpu``, read from guest memory while the guest runs."""
        return int(self.ram.words[(control_block_addr(vcpu) + offset) // 8])

    @property
    def memory(self) -> npt.NDArray[np.uint8]:
        """Guest RAM as bytes, guest-physical address 0 first. Host writes here are not dirty-logged:
        use :meth:`write` for writes a tracker must see."""
        return self.ram.bytes

    def write(self, guest_phys_addr: int, data: bytes | npt.NDArray[np.uint8]) -> None:
        """Write into guest RAM from the host; trackers include these pages in their next collection."""
        self.ram.write(guest_phys_addr, data)

    @property
    def workload_pages(self) -> range:
        """Guest page frame numbers the workload writes."""
        return self.spec.pages

    @property
    def vcpu_progress(self) -> list[int]:
        """Pages written so far by each vCPU."""
        return [self.control(index, ControlBlock.PROGRESS) for index in range(self.spec.vcpus)]

    @property
    def progress(self) -> int:
        """Pages written so far, summed over vCPUs."""
        return sum(self.vcpu_progress)

    @property
    def iterations(self) -> list[int]:
        """Completed iterations of each vCPU (passes for ``sequential``, rounds for ``stamp``)."""
        return [self.control(index, ControlBlock.ITERATION) for index in range(self.spec.vcpus)]

    # --- lifecycle ---------------------------------------------------------------------------------

    def attach_tracker(self, tracker: object) -> None:
        """Claim the machine's slot flags for ``tracker``: only one tracker may log at a time."""
        if self.tracker is not None and self.tracker is not tracker:
            raise MachineError(f"the machine already has an enabled {getattr(self.tracker, 'mode', '?')!r} tracker; "
                               "disable it before enabling another")
        self.tracker = tracker

    def detach_tracker(self, tracker: object) -> None:
        """Release the claim of :meth:`attach_tracker`."""
        if self.tracker is tracker:
            self.tracker = None

    @property
    def vcpus(self) -> list[Vcpu]:
        """The vCPUs (created by :meth:`start`)."""
        return [entry.vcpu for entry in self._threads]

    def enable_dirty_ring(self, entries: int | None = None) -> None:
        """Give each vCPU a dirty ring of ``entries`` entries (default: the largest the host allows, up
        to 65536, so that harvesting, not ring-full exits, sets the pace); only possible before start."""
        if self.state is not State.CREATED:
            raise MachineError("the dirty ring must be chosen before the machine starts (KVM allows it only "
                               "before vCPUs exist): call dirty_log('ring') before start()")
        entry = ctypes.sizeof(abi.kvm_dirty_gfn)
        if entries is None:
            entries = min(DEFAULT_RING_ENTRIES, self.vm.dirty_ring_max_bytes // entry) or DEFAULT_RING_ENTRIES
        self.vm.enable_dirty_ring(entries * entry)

    def create_vcpus(self) -> None:
        """Create and set up the vCPUs without running them (``start()`` does it if not done yet).

        A migration destination calls this early, so the switch-over only loads registers."""
        if self._threads:
            return
        if self.state is not State.CREATED:
            raise MachineError(f"vCPUs are created before start(); this machine is {self.state.value}")
        cpuid = self.kvm.supported_cpuid()
        for index in range(self.spec.vcpus):
            vcpu = self.vm.create_vcpu(index)
            vcpu.set_cpuid(cpuid)
            vcpu.set_sregs(long_mode_sregs(vcpu.get_sregs()))
            vcpu.set_regs(entry_regs(control_block_addr(index), index))
            self._threads.append(_VcpuThread(vcpu))
        self.tsc_hz = self._threads[0].vcpu.tsc_khz * 1000

    def _write_timing(self) -> None:
        """Control-block fields in TSC ticks, now that the vCPUs' TSC frequency is known."""
        for index in range(self.spec.vcpus):
            block = self._control_block(index, self.tsc_hz // 1000)
            for offset in (ControlBlock.TICKS_PER_PAGE, ControlBlock.SLEEP_THRESHOLD, ControlBlock.MAX_LAG):
                self.set_control(index, offset, int(block[offset // 8]))

    def start(self, vcpu_states: list[bytes] | None = None) -> None:
        """Create the vCPUs and run the guest, one host thread per vCPU; with ``vcpu_states`` (from
        :meth:`vcpu_state` of a paused machine) the vCPUs continue where that machine stopped."""
        with self._transition:
            if self.state is not State.CREATED:
                raise MachineError(f"start() needs a new machine; this one is {self.state.value}")
            if vcpu_states is not None and len(vcpu_states) != self.spec.vcpus:
                raise MachineError(f"{len(vcpu_states)} vCPU states given for {self.spec.vcpus} vCPUs")
            self.create_vcpus()
            if vcpu_states is None:
                self._write_timing()
            else:
                # A migrated guest continues: its registers, TSC and control blocks come from the source.
                for index, state in enumerate(vcpu_states):
                    self.load_vcpu_state(index, state)
            self._request = _Request.RUN
            for index, entry in enumerate(self._threads):
                entry.thread = threading.Thread(target=self._vcpu_loop, args=(index,), name=f"vcpu{index}",
                                                daemon=True)
                entry.thread.start()
            self.state = State.RUNNING

    def pause(self) -> None:
        """Stop every vCPU outside the guest with its registers saved; returns when all are parked."""
        with self._transition:
            self._raise_if_crashed()
            if self.state is State.PAUSED:
                return
            if self.state is not State.RUNNING:
                raise MachineError(f"pause() needs a running machine; this one is {self.state.value}")
            self._request_all(_Request.PAUSE)
            self._wait_until(lambda: all(t.parked or t.done.is_set() for t in self._threads), "pause")
            self._raise_if_crashed()
            self.state = State.PAUSED

    def resume(self) -> None:
        """Continue every vCPU exactly where :meth:`pause` stopped it."""
        with self._transition:
            self._raise_if_crashed()
            if self.state is State.RUNNING:
                return
            if self.handed_off_to:
                raise MachineError(f"this machine was migrated to {self.handed_off_to}, which runs it now; "
                                   "resuming the old copy would run the VM twice")
            if self.state is not State.PAUSED:
                raise MachineError(f"resume() needs a paused machine; this one is {self.state.value}")
            with self._control:
                self._request = _Request.RUN
                self._control.notify_all()
            # Wait until every thread has cleared immediate_exit, so a pause right after cannot
            # have its kick cleared by a thread still on its way out of the parked state.
            self._wait_until(lambda: not any(t.parked for t in self._threads), "resume")
            self.state = State.RUNNING

    def stop(self) -> None:
        """Stop the guest and free the vCPUs, the VM and guest memory."""
        with self._transition:
            if self.state in (State.RUNNING, State.PAUSED):
                self._request_all(_Request.STOP)
                for entry in self._threads:
                    if entry.thread is not None:
                        entry.thread.join(PAUSE_TIMEOUT)
            self.state = State.STOPPED
        self.close()

    def close(self) -> None:
        """Free kernel objects and memory (``stop()`` calls this)."""
        if getattr(self, "vm", None) is not None:
            self.vm.close()
        if getattr(self, "ram", None) is not None:
            self.ram.close()
        self.kvm.close()

    def check(self) -> None:
        """Raise :class:`GuestCrashError` if a vCPU crashed."""
        self._raise_if_crashed()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- vCPU state --------------------------------------------------------------------------------

    def saved_regs(self, vcpu: int) -> abi.kvm_regs:
        """Registers of a paused vCPU, as saved when it parked."""
        regs = self._threads[vcpu].regs
        if self.state is not State.PAUSED or regs is None:
            raise MachineError("registers are saved only while the machine is paused")
        return regs

    def vcpu_state(self, vcpu: int) -> bytes:
        """A paused vCPU's architectural state (registers, segment registers, TSC) as bytes."""
        regs = self.saved_regs(vcpu)
        target = self._threads[vcpu].vcpu
        sregs = target.get_sregs()
        tsc = target.get_msrs([abi.MSR_IA32_TSC])[abi.MSR_IA32_TSC]
        return bytes(regs) + bytes(sregs) + struct.pack("<Q", tsc)

    def load_vcpu_state(self, vcpu: int, state: bytes) -> None:
        """Load state from :meth:`vcpu_state` into a paused or new vCPU."""
        regs_size, sregs_size = struct.calcsize(_REGS_FORMAT), len(bytes(abi.kvm_sregs()))
        if len(state) != regs_size + sregs_size + 8:
            raise VcpuError(f"vCPU state of {len(state)} bytes is not the {regs_size + sregs_size + 8} expected")
        target = self._threads[vcpu].vcpu
        regs = abi.kvm_regs.from_buffer_copy(state[:regs_size])
        sregs = abi.kvm_sregs.from_buffer_copy(state[regs_size:regs_size + sregs_size])
        (tsc,) = struct.unpack("<Q", state[regs_size + sregs_size:])
        target.set_sregs(sregs)
        target.set_regs(regs)
        target.set_msrs({abi.MSR_IA32_TSC: tsc})
        self._threads[vcpu].regs = regs

    # --- the vCPU threads --------------------------------------------------------------------------

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
            if self.crash is not None or time.monotonic() > deadline:
                break
            if what == "pause":  # a thread may have been between its check and KVM_RUN: kick again
                for entry in self._threads:
                    if not entry.parked:
                        self._kick(entry)
        self._raise_if_crashed()
        stuck = [i for i, t in enumerate(self._threads) if (not t.parked) == (what == "pause")]
        raise MachineError(f"{what}() timed out after {PAUSE_TIMEOUT} s waiting for vCPU(s) {stuck}")

    def _vcpu_loop(self, index: int) -> None:
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
                elif not self._handle_exit(index, entry, exit_):
                    return
        except Exception as error:  # a failure in a vCPU thread must reach the user, not vanish
            self._record_crash(index, f"host error: {error}")
        finally:
            entry.done.set()
            with self._control:
                self._control.notify_all()

    def delay_vcpu(self, vcpu: int, seconds: float) -> None:
        """Hold ``vcpu`` outside the guest for ``seconds`` at its next chance (throttling); a pause
        or stop cuts the delay short."""
        entry = self._threads[vcpu]
        with self._control:
            entry.delay += seconds
        self._kick(entry, wake=False)

    def set_throttle(self, fraction: float) -> None:
        """Keep every vCPU out of the guest ``fraction`` of the time (QEMU's cpu-throttle: every 10 ms
        timeslice each vCPU sleeps ``fraction / (1 - fraction)`` timeslices); 0 stops throttling."""
        if not 0 <= fraction < 1:
            raise MachineError(f"throttle fraction must be in [0, 1), got {fraction}")
        self.throttle = fraction
        if fraction and (self._throttle_thread is None or not self._throttle_thread.is_alive()):
            self._throttle_thread = threading.Thread(target=self._throttle_loop, name="throttle", daemon=True)
            self._throttle_thread.start()

    def _throttle_loop(self) -> None:
        while self.throttle and self.state is State.RUNNING:
            sleep = THROTTLE_TIMESLICE * self.throttle / (1 - self.throttle)
            for index in range(len(self._threads)):
                self.delay_vcpu(index, sleep)
            time.sleep(THROTTLE_TIMESLICE + sleep)

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
        entry.regs = vcpu.get_regs()
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

    def _handle_exit(self, index: int, entry: _VcpuThread, exit_: VcpuExit) -> bool:
        """React to a guest exit; False when the vCPU must end (crash)."""
        if isinstance(exit_, IoOut):
            if exit_.port == Port.ITERATION:
                if self.on_iteration is not None:
                    self.on_iteration(index, self.control(index, ControlBlock.ITERATION))
                return True
            if exit_.port == Port.SLEEP:
                ticks = entry.vcpu.get_regs().rcx
                entry.wake.wait(min(ticks / self.tsc_hz, 0.05))
                return True
            if exit_.port in (Port.IDLE, Port.DONE):
                if exit_.port == Port.DONE:
                    self.done_at[index] = time.perf_counter()
                entry.wake.wait(0.5)
                return True
        if isinstance(exit_, DirtyRingFull):
            if self.on_dirty_ring_full is None:
                self._record_crash(index, "DIRTY_RING_FULL with no tracker to harvest the ring")
                return False
            self.on_dirty_ring_full(index)
            return True
        self._record_crash(index, exit_.name if not isinstance(exit_, IoOut) else f"unexpected out to port "
                           f"{exit_.port:#x}")
        return False

    def _record_crash(self, index: int, what: str) -> None:
        vcpu = self._threads[index].vcpu
        try:
            regs = vcpu.get_regs()
            registers = {field[0]: getattr(regs, field[0]) for field in abi.kvm_regs._fields_}
            cr2 = vcpu.get_sregs().cr2
        except DirtylogError:
            registers, cr2 = {}, 0
        rip = registers.get("rip", 0)
        code: tuple[str, ...] = ()
        if 0 <= rip < self.ram.size - 16:
            code = tuple(disassemble(self.ram.bytes[rip:rip + 32].tobytes(), rip, count=3))
        with self._control:
            if self.crash is None:
                self.crash = GuestCrash(index, what, registers, cr2, code)
            self._control.notify_all()

    def _raise_if_crashed(self) -> None:
        if self.crash is not None:
            raise GuestCrashError(self.crash)
