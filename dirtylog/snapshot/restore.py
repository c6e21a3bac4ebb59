"""Restoring a machine from a chain: running before its memory is in, never on a page that failed its check.

:func:`restore` opens and checks the chain (heads, metadata, identities, held bitmaps: no page data), builds a
blank machine of the recorded layout, registers its guest RAM — all missing — with a userfaultfd, starts the
compiled serve loop (``_kernels.serve_restore``) on a thread, loads the vCPU states and runs the guest. The
guest's first touches fault; the loop installs the faulting block from the newest layer holding each page,
after checking the index chunk and every page's fingerprint, and meanwhile installs the other blocks in
address order. When all of memory is in, the userfaultfd is closed (the machine is an ordinary one from then
on, its memory its own: the files may go) and the chain's merged fingerprints are checked against the memory
digest its top layer recorded.

A block that fails a check is never installed: the loop stops, the vCPUs are paused (a vCPU waiting for that
block leaves its fault on the kick), and the machine refuses to run again (``check()`` and ``resume()`` raise
the error). So the guest never sees a byte that is not the snapshot's. With ``lazy=False`` all of this
happens before the guest runs: slower, but a corrupt chain is refused with nothing started.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import numpy.typing as npt

from dirtylog.errors import DirtylogError
from dirtylog.guest.host import host_architecture
from dirtylog.guest.machine import Machine, State
from dirtylog.guest.memory import plan_slots
from dirtylog.linux.userfaultfd import Userfaultfd
from dirtylog.migration.payload.vm import machine_arguments
from dirtylog.migration.protocol.acceptance import HeaderAcceptance
from dirtylog.migration.protocol.events import Header
from dirtylog.snapshot import _kernels
from dirtylog.snapshot.chain import Chain, ChainArrays, loop_failure, open_chain
from dirtylog.snapshot.errors import SnapshotError
from dirtylog.snapshot.format import BLOCK_PAGES
from dirtylog.snapshot.session import SnapshotChain
from dirtylog.tracking.base import DIRTY_LOG_MODES, DirtyLogMode
from dirtylog.units import PAGE_SIZE

#: The machine class a restore builds (the facade passes its own: ``dirtylog.machine.Machine``).
M = TypeVar("M", bound=Machine)


@dataclass(frozen=True)
class RestoreStats:
    """How a restore went, in seconds from the call (None: not reached)."""

    path: str
    layers: int
    pages: int
    lazy: bool
    open_seconds: float  # the chain opened and checked
    build_seconds: float  # the blank machine built
    running_seconds: float | None  # the vCPUs in the guest (restore() returned)
    first_fault_seconds: float | None  # the guest's first touch of memory
    first_served_seconds: float | None  # its block in: the guest runs from here
    resident_seconds: float | None  # all of memory in
    faults: int
    blocks: int
    zero_blocks: int
    fault_wait_seconds: float  # total time between reading faults and resolving them
    fault_wait_max_seconds: float
    digest_checked: bool

    def as_dict(self) -> dict[str, Any]:
        def ms(value: float | None) -> float | None:
            return None if value is None else round(value * 1e3, 3)

        return {"path": self.path, "layers": self.layers, "pages": self.pages, "lazy": self.lazy,
                "open_ms": ms(self.open_seconds), "build_ms": ms(self.build_seconds),
                "running_ms": ms(self.running_seconds), "first_fault_ms": ms(self.first_fault_seconds),
                "first_served_ms": ms(self.first_served_seconds), "resident_ms": ms(self.resident_seconds),
                "faults": self.faults, "blocks": self.blocks, "zero_blocks": self.zero_blocks,
                "fault_wait_ms": ms(self.fault_wait_seconds), "fault_wait_max_ms": ms(self.fault_wait_max_seconds),
                "digest_checked": self.digest_checked}


class Restoring:
    """A machine's memory arriving from a chain, and the thread that brings it."""

    def __init__(self, machine: Machine, chain: Chain, began_ns: int, lazy: bool) -> None:
        self.machine = machine
        self.chain = chain
        self.path = str(chain.top.path)
        self.lazy = lazy
        self.began_ns = began_ns
        self.marks: dict[str, int] = {}
        self.arrays = ChainArrays.of(chain)
        self.present = np.zeros(machine.ram.npages // BLOCK_PAGES, dtype=np.uint8)
        self.control = np.zeros(_kernels.CONTROL_SIZE, dtype=np.int64)
        self.stats = np.zeros(_kernels.STATS_SIZE, dtype=np.int64)
        self.error: SnapshotError | None = None
        self.fingerprints: npt.NDArray[np.uint64] | None = None
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        ram = machine.ram
        # Not user-mode-only: the vCPUs' touches of guest RAM are KVM's, kernel faults, and must wait too.
        self.uffd: Userfaultfd | None = Userfaultfd.create(nonblock=True)
        try:
            self.uffd.api(0)
            self.uffd.register(ram.address, ram.size, missing=True)
        except BaseException:
            self.uffd.close()
            raise

    def mark(self, name: str) -> None:
        self.marks[name] = time.monotonic_ns()

    def start(self) -> None:
        """Serve on a thread of its own; returns once the loop runs without the GIL, so that guest RAM may be
        touched from then on, by the guest or by any Python thread."""
        self.stats[_kernels.S_STATUS] = _kernels.NOT_STARTED
        self._thread = threading.Thread(target=self._run, name="restore", daemon=True)
        self._thread.start()
        while self.stats[_kernels.S_STATUS] == _kernels.NOT_STARTED and not self.done.is_set():
            time.sleep(0.0001)

    def prefetch(self) -> None:
        """Bring in the blocks nobody asked for yet, too (from now on, in address order)."""
        self.control[_kernels.CONTROL_PREFETCH] = 1

    def run_now(self) -> None:
        """Bring all of memory in and check it here, before the guest runs; raises what failed."""
        self.prefetch()
        self._run()
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        status = _kernels.DONE
        try:
            assert self.uffd is not None
            arrays = self.arrays
            status = _kernels.serve_restore(self.uffd.fd, self.machine.ram.address, arrays.held, arrays.ranks,
                                            arrays.zero_addresses, arrays.fps_addresses, arrays.fds, arrays.checks,
                                            arrays.checked, self.present, arrays.multipliers, self.control,
                                            self.stats)
            if status == _kernels.DONE:
                self._close_uffd()  # every page is in: nothing can fault any more
                fingerprints = self.chain.merged_fingerprints()
                self.chain.check_digest(fingerprints)
                self.fingerprints = fingerprints
            elif status != _kernels.STOPPED:
                failure = loop_failure(self.chain, self.stats, status)
                raise type(failure)(f"{failure}. It was never installed: the guest did not see it, and the restored "
                                    "machine will not run")
        except SnapshotError as error:
            self._fail(error)
        except Exception as error:  # a failure on this thread must reach the user, not vanish
            self._fail(SnapshotError(f"the restore of {self.path} failed: {type(error).__name__}: {error}"))
        finally:
            if status != _kernels.STOPPED:
                self.chain.close()
            self.done.set()

    def _fail(self, error: SnapshotError) -> None:
        """Stop the guest before it can see what failed, and keep it from running again."""
        with self._lock:
            self.error = error
        machine = self.machine
        try:
            if machine.state is State.RUNNING:
                machine.pause()  # a vCPU waiting on a block that will never come leaves its fault on the kick
        except DirtylogError:
            return  # a vCPU may still wait on the userfaultfd: keep it, so nothing runs on missing pages
        if machine.state is not State.RUNNING:
            # The guest will not run again: let host threads that wait for pages go on (they read zeros).
            self._close_uffd()

    def _close_uffd(self) -> None:
        with self._lock:
            if self.uffd is not None:
                self.uffd.close()
                self.uffd = None

    def wait(self, timeout: float | None = None) -> RestoreStats:
        """Wait until all of memory is in and checked; raises what failed (a TimeoutError after ``timeout``)."""
        if not self.done.wait(timeout):
            raise TimeoutError(f"the restore of {self.path} is not done after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result()

    def result(self) -> RestoreStats:
        """How it went so far."""
        stats = self.stats

        def since(ns: int | None) -> float | None:
            return None if not ns else (ns - self.began_ns) / 1e9

        return RestoreStats(
            self.path, len(self.chain), self.machine.ram.npages, self.lazy, since(self.marks.get("open")) or 0.0,
            since(self.marks.get("build")) or 0.0, since(self.marks.get("running")),
            since(int(stats[_kernels.S_FIRST_FAULT_NS])), since(int(stats[_kernels.S_FIRST_SERVED_NS])),
            since(int(stats[_kernels.S_DONE_NS])), int(stats[_kernels.S_FAULTS]), int(stats[_kernels.S_BLOCKS]),
            int(stats[_kernels.S_ZERO_BLOCKS]), float(stats[_kernels.S_FAULT_NS]) / 1e9,
            float(stats[_kernels.S_FAULT_MAX_NS]) / 1e9, self.fingerprints is not None)

    def close(self) -> None:
        """Stop serving (the machine is stopping) and release the userfaultfd and the files."""
        self.control[_kernels.CONTROL_STOP] = 1
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._close_uffd()
        self.chain.close()


def restore(cls: type[M], path: str | os.PathLike[str], *, lazy: bool = True, track: DirtyLogMode | None = None,
            resume: bool = True, into: M | None = None) -> tuple[M, Restoring, SnapshotChain | None]:
    """A running machine restored from the snapshot ``path`` and its parents (see the module docstring), the
    restore still bringing its memory in, and the snapshot chain it continues (with ``track``).

    The compiled loops are loaded first, once per process (from Numba's cache: ~0.1-0.3 s); the restore's
    timings count from after that. ``into`` is a blank machine built beforehand with the snapshot's memory size
    and slot count (nothing written to it, no vCPUs yet): the restore then skips building one — on this
    host's KVM (PVM, shadow paging) creating a memory slot costs ~0.5 ms per GiB, for the reverse map KVM
    allocates with it."""
    _kernels.load_kernels()
    host_architecture()  # imports the guest's assembler: code loaded once per process, like the loops
    began = time.monotonic_ns()
    if track is not None and track not in DIRTY_LOG_MODES:
        raise SnapshotError(f"unknown dirty-log mode {track!r}; choose one of {', '.join(DIRTY_LOG_MODES)}")
    if track == "uffd" and lazy:
        raise SnapshotError("the 'uffd' dirty log needs guest RAM's userfaultfd, which a lazy restore holds until "
                            "all memory is in: restore with lazy=False, or track with log, clear or ring")
    chain = open_chain(path)
    try:
        header = chain.header
        try:
            HeaderAcceptance(page_size=PAGE_SIZE, plan_slots=plan_slots).check(header)
        except DirtylogError as error:
            raise SnapshotError(f"{chain.top.name} cannot be restored here: {error}") from None
        opened = time.monotonic_ns()
        machine = _prepared(into, header, track) if into is not None else cls(
            **machine_arguments(header), blank=True, dirty_ring=track == "ring")
    except BaseException:
        chain.close()
        raise
    try:
        restoring = Restoring(machine, chain, began, lazy)
    except BaseException:
        chain.close()
        machine.stop()
        raise
    restoring.marks["open"] = opened
    restoring.mark("build")
    snapshots: SnapshotChain | None = None
    try:
        if lazy:
            restoring.start()
        else:
            restoring.run_now()
        machine.load_vcpu_states(list(chain.top.meta.vcpu_states))
        if track is not None:
            snapshots = SnapshotChain(machine, track)
            snapshots.start_from(chain.top.identity, chain.top.path, int(chain.top.info.get("sequence", 0)))
        if not resume:  # the caller starts it; memory arrives meanwhile (a host read of a page brings it first)
            restoring.prefetch()
            return machine, restoring, snapshots
        with restoring._lock:
            if restoring.error is not None:
                raise restoring.error
            machine.start()
        restoring.mark("running")
        restoring.prefetch()
    except BaseException:
        machine.stop()
        raise
    return machine, restoring, snapshots


def _prepared(machine: M, header: Header, track: DirtyLogMode | None) -> M:
    """``machine``, a blank machine prepared for a restore, after checking it fits ``header``."""
    if not machine.blank or machine.state is not State.CREATED or machine.vcpus:
        raise SnapshotError("a machine to restore into must be new and blank (Machine(..., blank=True)), without "
                            "vCPUs: its memory must be untouched")
    ours = sorted((slot.guest_phys_addr, slot.memory_size) for slot in machine.vm.slots.values())
    theirs = sorted((slot.guest_phys_addr, slot.memory_size) for slot in header.slots)
    if ours != theirs:
        raise SnapshotError(f"the machine to restore into has memory slots {ours}, the snapshot {theirs}: prepare "
                            "it with the snapshot's memory size and slot count")
    arguments = machine_arguments(header)
    machine.assume_workload(arguments["workload"], arguments["vcpus"], arguments["rate"],
                            hot_fraction=arguments["hot_fraction"], hot_weight=arguments["hot_weight"],
                            writes_per_iteration=arguments["writes_per_iteration"])
    if track == "ring" and not machine.vm.dirty_ring_bytes:
        machine.enable_dirty_ring()
    return machine
