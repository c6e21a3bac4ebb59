"""A runnable machine: guest RAM, a workload program, its vCPUs, and its lifecycle.

The machine loads the guest (boot memory such as page tables, program, control blocks), answers the guest's
calls to the host, saves and loads vCPU state, and moves through its states::

    CREATED --start()--> RUNNING <--pause()/resume()--> PAUSED --hand_off()--> HANDED_OFF
        any state --stop()--> STOPPED

HANDED_OFF is a paused machine whose VM now runs elsewhere (a migration committed): it can only be
stopped, never resumed, so the VM never runs twice. The threads that run the vCPUs, and the protocol that
pauses and throttles them, are :mod:`dirtylog.guest.vcpus`; what differs between x86-64 and arm64 (layout,
vCPU set-up and state, how the guest calls the host, its programs) is :mod:`dirtylog.guest.arch`, chosen
from the host.
"""

from __future__ import annotations

import ctypes
import enum
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, Self

import numpy as np
import numpy.typing as npt

from dirtylog.errors import DirtylogError
from dirtylog.guest.arch import (
    Architecture,
    ArchitectureError,
    ControlBlock,
    GuestCall,
    GuestProgram,
)
from dirtylog.guest.host import host_architecture
from dirtylog.guest.memory import GuestMemory
from dirtylog.guest.trace_tables import TraceTables
from dirtylog.guest.vcpus import VcpuThreads, install_kick_handler
from dirtylog.kvm import abi
from dirtylog.kvm.exits import DirtyRingFull, IoOut, Mmio, VcpuExit
from dirtylog.kvm.system import Kvm, Vm
from dirtylog.kvm.vcpu import Vcpu
from dirtylog.trace import DirtyTrace
from dirtylog.units import PAGE_SIZE, parse_size
from dirtylog.workload import WorkloadName, WorkloadSpec

SLEEP_THRESHOLD_SECONDS = 0.001  # a rate-limited guest further ahead than this sleeps in the host
MAX_LAG_SECONDS = 0.05  # a guest further behind than this restarts its schedule instead of bursting
DEFAULT_RING_ENTRIES = 65536  # 1 MiB per vCPU: the host maximum here (QEMU defaults to 4096)
HugePage = Literal["2M", "1G"]


class MachineError(DirtylogError):
    """The machine cannot do what was asked in its current state."""


@dataclass(frozen=True)
class GuestCrash:
    """What a vCPU left behind when the guest stopped unexpectedly."""

    vcpu: int
    exit: str
    registers: dict[str, int]
    cr2: int  # the faulting address: CR2 on x86, FAR_EL1 on arm64
    code: tuple[str, ...]
    fault_name: str = "cr2"

    def describe(self) -> str:
        regs = " ".join(f"{name}={value:#x}" for name, value in self.registers.items())
        lines = [f"vCPU {self.vcpu} stopped with {self.exit}; registers: {regs}; {self.fault_name}={self.cr2:#x}"]
        lines += [f"  {line}" for line in self.code]
        return "\n".join(lines)


class GuestCrashError(MachineError):
    """The guest crashed (triple fault, failed entry, unexpected exit); the message has its registers."""

    def __init__(self, crash: GuestCrash) -> None:
        super().__init__(crash.describe())
        self.crash = crash


def control_block(spec: WorkloadSpec, index: int, tsc_khz: int = 0,
                  extra: dict[ControlBlock, int] | None = None) -> npt.NDArray[np.uint64]:
    """vCPU ``index``'s control block for workload ``spec``, as its program reads it (fields in TSC ticks when
    ``tsc_khz`` is known; ``extra`` fields on top): what a Machine writes, and any other host running our
    programs (bench/qemu_guest.py) writes too."""
    share = spec.share(index)
    block = np.zeros(PAGE_SIZE // 8, dtype=np.uint64)
    fields = {
        ControlBlock.AREA_BASE: share.start * PAGE_SIZE,
        ControlBlock.AREA_NPAGES: len(share),
        ControlBlock.PRNG_SEED: (spec.seed * (index + 1)) % (2**64 - 1) or 1,
        ControlBlock.HOT_NPAGES: max(1, int(len(share) * spec.hot_fraction)),
        ControlBlock.HOT_THRESHOLD: int(spec.hot_weight * 2**32),
        ControlBlock.WRITES_PER_ITERATION: spec.writes_per_iteration or len(share),
        ControlBlock.RATE: spec.rate or 0,
    }
    if tsc_khz and spec.rate:
        fields[ControlBlock.TICKS_PER_PAGE] = max(1, tsc_khz * 1000 // spec.rate)
    if tsc_khz:
        fields[ControlBlock.SLEEP_THRESHOLD] = int(tsc_khz * 1000 * SLEEP_THRESHOLD_SECONDS)
        fields[ControlBlock.MAX_LAG] = int(tsc_khz * 1000 * MAX_LAG_SECONDS)
        fields[ControlBlock.TSC_KHZ] = tsc_khz
    fields.update(extra or {})
    for offset, value in fields.items():
        block[offset // 8] = value
    return block


class State(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    HANDED_OFF = "handed-off"  # paused for good: a migration gave the VM to its destination
    STOPPED = "stopped"


class Machine:
    """A KVM virtual machine running a guest workload on ``vcpus`` threads.

    ``memory`` is a size (``"1G"``) and ``rate`` pages per second per vCPU (None: unlimited);
    ``dirty_ring`` gives each vCPU a dirty ring (True: the default size, or a number of entries; KVM
    allows rings only before vCPUs exist, and ``dirty_log("ring")`` before :meth:`start` does the same);
    ``prefault`` allocates host memory up front (a first guest touch then costs ~3 us instead of ~24 us
    here; see docs/performance.md); ``huge_aligned`` puts guest RAM on a 2 MiB host boundary so KVM may map
    it with 2 MiB stage-2 blocks where the host backs it with huge pages; ``arch`` overrides the host's
    guest architecture (:mod:`dirtylog.guest.arch`); ``trace`` (with ``workload="trace"``) is a recorded trace or
    its file, replayed by every vCPU from tables at the top of guest RAM (see :mod:`dirtylog.trace`). The
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
        arch: Architecture | None = None,
        huge_aligned: bool = False,
        trace: DirtyTrace | str | os.PathLike[str] | None = None,
    ) -> None:
        size = parse_size(memory)
        self.arch = arch or host_architecture()
        layout = self.arch.layout
        self.arch.check_memory_size(size)
        if not 1 <= vcpus <= layout.max_vcpus:
            raise MachineError(f"vcpus must be between 1 and {layout.max_vcpus}, got {vcpus}")
        install_kick_handler()
        self.blank = blank
        self.state = State.CREATED
        self.crash: GuestCrash | None = None
        self.on_dirty_ring_full: Callable[[int], None] | None = None
        self.on_iteration: Callable[[int, int], None] | None = None
        self.tracker: object | None = None
        self.handed_off_to = ""  # where the VM runs now, once HANDED_OFF
        self.kvm = Kvm(kvm_device)
        try:
            self._check_vcpus(vcpus)
            self.vm: Vm = self.kvm.create_vm()
            self.ram = GuestMemory(size, slots, huge_aligned=huge_aligned)
            if prefault:
                self.ram.prefault()
            self.ram.register(self.vm)
            if dirty_ring:
                self.enable_dirty_ring(None if dirty_ring is True else int(dirty_ring))
            # A blank machine (a migration destination) gets the trace's tables with the rest of memory.
            if not blank and (workload == "trace") != (trace is not None):
                raise MachineError("the trace workload replays a recorded trace: give both workload='trace' and "
                                   "trace=FILE (record one with `dirtylog track --record FILE`)")
            self.trace = TraceTables.plan(trace, vcpus, size) if trace is not None else None
            first = layout.workload_addr // PAGE_SIZE
            self.spec = WorkloadSpec(
                workload, first, self.ram.npages - first - (self.trace.npages if self.trace else 0), vcpus, rate,
                hot_fraction, hot_weight, writes_per_iteration)
            if self.trace:
                self.trace.check_fits(self.spec)
            self.program = program or self.arch.build_program(workload)
            try:
                self.arch.check_page_size(self.kvm, page_size)
            except ArchitectureError as error:
                raise MachineError(str(error)) from None
            self.page_size: HugePage = page_size
            if not blank:  # a migration destination gets every byte from the stream instead
                self._load()
        except BaseException:
            self.close()
            raise
        self._runner: VcpuThreads | None = None  # made with the vCPUs
        self._states_loaded = False
        self._crash_lock = threading.Lock()
        self._transition = threading.Lock()
        self.done_at: dict[int, float] = {}

    def _check_vcpus(self, vcpus: int) -> None:
        limit = min(self.arch.layout.max_vcpus, self.kvm.max_vcpus)
        if not 1 <= vcpus <= limit:
            raise MachineError(f"vcpus must be between 1 and {limit} (this layout's and this KVM's limit), got {vcpus}")

    # --- what the guest sees -----------------------------------------------------------------------

    def _load(self) -> None:
        """Boot memory (x86: page tables), program and control blocks, written the way any host write is:
        tracked."""
        for address, data in self.arch.boot_memory(self.ram.size, self.page_size).items():
            self.ram.write(address, data)
        self.ram.write(self.arch.layout.code_addr, self.program.code)
        for index in range(self.spec.vcpus):
            self.ram.write(self.control_block_addr(index), self._control_block(index).view(np.uint8))
        if self.trace:
            for address, table in zip(self.trace.addresses, self.trace.tables, strict=True):
                self.ram.write(address, table)

    def control_block_addr(self, vcpu: int) -> int:
        """Guest-physical address of ``vcpu``'s control block."""
        return self.arch.layout.control_block_addr(vcpu)

    def _control_block(self, index: int, tsc_khz: int = 0) -> npt.NDArray[np.uint64]:
        extra = self.trace.control_fields(index) if self.trace else {}
        return control_block(self.spec, index, tsc_khz, extra)

    def assume_workload(self, workload: WorkloadName, vcpus: int, rate: int | None = None, *, hot_fraction: float = 0.1,
                        hot_weight: float = 0.9, writes_per_iteration: int = 0) -> None:
        """Take on the workload a blank machine's memory will hold, and its vCPU count: for a VM prepared before
        it was known what would arrive (a migration destination). Only before the vCPUs exist."""
        if not self.blank or self.state is not State.CREATED or self._runner is not None:
            raise MachineError("only a new blank machine without vCPUs can take on a workload")
        self._check_vcpus(vcpus)
        self.spec = WorkloadSpec(workload, self.spec.first_page, self.spec.npages, vcpus, rate, hot_fraction,
                                 hot_weight, writes_per_iteration)
        self.program = self.arch.build_program(workload)

    def set_control(self, vcpu: int, offset: ControlBlock, value: int) -> None:
        """Set a control-block field of ``vcpu`` (before start, or for fields the guest rereads)."""
        self.ram.write(self.control_block_addr(vcpu) + offset, np.array([value], dtype=np.uint64).view(np.uint8))

    def control(self, vcpu: int, offset: ControlBlock) -> int:
        """A control-block field of ``vcpu``, read from guest memory while the guest runs."""
        return int(self.ram.words[(self.control_block_addr(vcpu) + offset) // 8])

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
        return self._runner.vcpus if self._runner is not None else []

    @property
    def vcpu_thread_ids(self) -> list[int]:
        """The kernel's thread id of each vCPU's host thread (0 until it runs)."""
        return self._runner.thread_ids if self._runner is not None else []

    @property
    def throttle(self) -> float:
        """Fraction of the time every vCPU is held outside the guest (:meth:`set_throttle`)."""
        return self._runner.throttle if self._runner is not None else 0.0

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
        if self._runner is not None:
            return
        if self.state is not State.CREATED:
            raise MachineError(f"vCPUs are created before start(); this machine is {self.state.value}")
        vcpus: list[Vcpu] = []
        for index in range(self.spec.vcpus):
            vcpu = self.vm.create_vcpu(index)
            self.arch.setup_vcpu(self.kvm, self.vm, vcpu, index)
            vcpus.append(vcpu)
        self._runner = VcpuThreads(vcpus, self._handle_exit, self._record_crash, lambda: self.crash is not None,
                                   self.arch.registers)
        self.tsc_hz = self.arch.counter_hz(vcpus[0])  # 0: the guest reads its counter's frequency itself

    def _write_timing(self) -> None:
        """Control-block fields in counter ticks, now that the counter's frequency is known (x86's TSC; an
        arm64 guest computes these from ``RATE`` and its own ``cntfrq_el0``)."""
        if not self.tsc_hz:
            return
        for index in range(self.spec.vcpus):
            block = self._control_block(index, self.tsc_hz // 1000)
            for offset in (ControlBlock.TICKS_PER_PAGE, ControlBlock.SLEEP_THRESHOLD, ControlBlock.MAX_LAG,
                           ControlBlock.TSC_KHZ):
                self.set_control(index, offset, int(block[offset // 8]))

    def load_vcpu_states(self, vcpu_states: list[bytes]) -> None:
        """Create the vCPUs of a new machine and load ``vcpu_states`` (from :meth:`vcpu_state` of a paused
        machine) into them, so that :meth:`start` continues where that machine stopped. KVM checks each state
        here: a migration destination loads them before it accepts the VM."""
        with self._transition:
            self._load_states(vcpu_states)

    def _load_states(self, vcpu_states: list[bytes]) -> None:
        if self.state is not State.CREATED:
            raise MachineError(f"vCPU states are loaded into a new machine; this one is {self.state.value}")
        if len(vcpu_states) != self.spec.vcpus:
            raise MachineError(f"{len(vcpu_states)} vCPU states given for {self.spec.vcpus} vCPUs")
        self.create_vcpus()
        # A migrated guest continues: its registers, TSC and control blocks come from the source.
        for index, state in enumerate(vcpu_states):
            self.load_vcpu_state(index, state)
        self._states_loaded = True

    def start(self, vcpu_states: list[bytes] | None = None, *, paused: bool = False) -> None:
        """Create the vCPUs and run the guest, one host thread per vCPU; with ``vcpu_states`` (or after
        :meth:`load_vcpu_states`) the vCPUs continue where a paused machine stopped. ``paused``: the threads
        start parked, before the guest runs (QEMU's ``-S``); :meth:`resume` runs it."""
        with self._transition:
            if self.state is not State.CREATED:
                raise MachineError(f"start() needs a new machine; this one is {self.state.value}")
            if vcpu_states is not None:
                self._load_states(vcpu_states)
            self.create_vcpus()
            if not self._states_loaded:
                self._write_timing()
            self._threads().start(paused)
            self.state = State.PAUSED if paused else State.RUNNING

    def pause(self) -> None:
        """Stop every vCPU outside the guest with its registers saved; returns when all are parked."""
        with self._transition:
            self._raise_if_crashed()
            if self.state is State.PAUSED:
                return
            if self.state is not State.RUNNING:
                raise MachineError(f"pause() needs a running machine; this one is {self.state.value}")
            self._threads().pause()
            self._raise_if_crashed()
            self.state = State.PAUSED

    def resume(self) -> None:
        """Continue every vCPU exactly where :meth:`pause` stopped it."""
        with self._transition:
            self._raise_if_crashed()
            if self.state is State.RUNNING:
                return
            if self.state is State.HANDED_OFF:
                raise MachineError(f"this machine was migrated to {self.handed_off_to}, which runs it now; "
                                   "resuming the old copy would run the VM twice")
            if self.state is not State.PAUSED:
                raise MachineError(f"resume() needs a paused machine; this one is {self.state.value}")
            self._threads().resume()
            self.state = State.RUNNING

    def hand_off(self, to: str) -> None:
        """Mark a paused machine as migrated to ``to``: the VM runs there now, so this copy never resumes."""
        with self._transition:
            if self.state is not State.PAUSED:
                raise MachineError(f"only a paused machine can be handed off; this one is {self.state.value}")
            self.handed_off_to = to
            self.state = State.HANDED_OFF

    def stop(self) -> None:
        """Stop the guest and free the vCPUs, the VM and guest memory."""
        with self._transition:
            if self.state in (State.RUNNING, State.PAUSED, State.HANDED_OFF):
                self._threads().stop()
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

    def saved_regs(self, vcpu: int) -> Any:
        """Registers of a paused vCPU, as saved when it parked (x86: ``kvm_regs``; arm64: by name, ``regs.pc``)."""
        regs = self._threads().saved_regs(vcpu)
        if self.state is not State.PAUSED or regs is None:
            raise MachineError("registers are saved only while the machine is paused")
        return regs

    def vcpu_state(self, vcpu: int) -> bytes:
        """A paused vCPU's architectural state (x86: registers, segment registers, TSC; arm64: core registers
        and the virtual counter) as bytes."""
        return self.arch.save_state(self.vcpus[vcpu], self.saved_regs(vcpu))

    def load_vcpu_state(self, vcpu: int, state: bytes) -> None:
        """Load state from :meth:`vcpu_state` into a paused or new vCPU."""
        target = self._threads().vcpus[vcpu]
        self._threads().set_saved_regs(vcpu, self.arch.load_state(target, state))

    # --- running the vCPUs -------------------------------------------------------------------------

    def _threads(self) -> VcpuThreads:
        if self._runner is None:
            raise MachineError("this machine has no vCPUs yet: start() creates them")
        return self._runner

    def delay_vcpu(self, vcpu: int, seconds: float) -> None:
        """Hold ``vcpu`` outside the guest for ``seconds`` at its next chance (throttling); a pause
        or stop cuts the delay short."""
        self._threads().delay(vcpu, seconds)

    def set_throttle(self, fraction: float) -> None:
        """Keep every vCPU out of the guest ``fraction`` of the time (QEMU's cpu-throttle: every 10 ms
        timeslice each vCPU sleeps ``fraction / (1 - fraction)`` timeslices); 0 stops throttling."""
        if not 0 <= fraction < 1:
            raise MachineError(f"throttle fraction must be in [0, 1), got {fraction}")
        self._threads().set_throttle(fraction)

    def _handle_exit(self, index: int, exit_: VcpuExit) -> bool:
        """React to a guest exit, on the vCPU's thread; False when the vCPU must end (crash)."""
        call = self.arch.guest_call(exit_, self.vcpus[index]) if isinstance(exit_, IoOut | Mmio) else None
        if call is not None:
            kind, argument = call
            if kind is GuestCall.ITERATION:
                if self.on_iteration is not None:
                    self.on_iteration(index, self.control(index, ControlBlock.ITERATION))
                return True
            if kind is GuestCall.SLEEP:
                hz = self.tsc_hz or self.control(index, ControlBlock.COUNTER_HZ) or 1
                self._threads().sleep(index, min(argument / hz, 0.05))
                return True
            if kind is GuestCall.DONE:
                self.done_at[index] = time.perf_counter()
            self._threads().sleep(index, 0.5)  # IDLE or DONE
            return True
        if isinstance(exit_, DirtyRingFull):
            if self.on_dirty_ring_full is None:
                self._record_crash(index, "DIRTY_RING_FULL with no tracker to harvest the ring")
                return False
            self.on_dirty_ring_full(index)
            return True
        if isinstance(exit_, IoOut):
            what = f"unexpected out to port {exit_.port:#x}"
        elif isinstance(exit_, Mmio):
            what = f"unexpected MMIO {'write' if exit_.is_write else 'read'} at {exit_.phys_addr:#x}"
        else:
            what = exit_.name
        self._record_crash(index, what)
        return False

    def _record_crash(self, index: int, what: str) -> None:
        vcpu = self.vcpus[index]
        try:
            registers = self.arch.register_values(self.arch.registers(vcpu))
            fault = self.arch.fault_address(vcpu)
        except DirtylogError:
            registers, fault = {}, 0
        pc = registers.get(self.arch.pc_register, 0)
        code: tuple[str, ...] = ()
        if 0 <= pc < self.ram.size - 16:
            code = self.arch.disassemble(self.program, self.ram.bytes[pc:pc + 32].tobytes(), pc, pc)
        with self._crash_lock:
            if self.crash is None:
                self.crash = GuestCrash(index, what, registers, fault, code,
                                        "cr2" if self.arch.pc_register == "rip" else "far_el1")
        self._threads().notify()

    def _raise_if_crashed(self) -> None:
        if self.crash is not None:
            raise GuestCrashError(self.crash)
