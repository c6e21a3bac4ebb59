"""Taking snapshots of a running machine: full, incremental, live; transactional.

A machine that takes snapshots keeps a :class:`SnapshotChain`: a dirty log left enabled between snapshots (any
mode: ``log``, ``clear``, ``ring``, or ``uffd``, which also sees raw host writes), the fingerprint of every
page as of the last snapshot (so each snapshot's memory digest costs one hash over them, as in migration),
the identity of that snapshot, and the pages *owed*: collected from the dirty log for a snapshot that then
failed.

One snapshot:

1. pause the vCPUs; collect the dirty log (the pages written since the last snapshot; everything for a full
   one, which starts the chain again); save each vCPU's state;
2. *not live*: write the pages from guest memory while the guest stays paused, then resume; *live*:
   write-protect guest RAM with a userfaultfd (synchronous write-protect), resume at once, and let the
   compiled save loop write the pages while the guest runs — a block the guest writes is saved before its
   protection is lifted, so the file holds memory as it was at the pause;
3. write the index and metadata, flush, rename ``PATH.partial`` to ``PATH``; only then is the chain advanced.

If anything fails — the disk is full, the file size limit is hit, an I/O error — the partial file is removed,
the guest runs on, and the collected pages stay owed: the next snapshot on the same parent holds them too, so
nothing is lost (Firecracker #4545). Host writes through ``Machine.write`` are in every mode's log; raw writes
through ``m.memory`` only in the ``uffd`` mode's.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import xxhash

from dirtylog.bitmap import DirtyBitmap
from dirtylog.errors import DirtylogError
from dirtylog.guest.machine import Machine, State
from dirtylog.linux import abi as linux_abi
from dirtylog.linux.userfaultfd import Userfaultfd
from dirtylog.migration.payload.digest import MULTIPLIERS
from dirtylog.migration.payload.vm import header_of
from dirtylog.snapshot import _kernels
from dirtylog.snapshot.errors import SnapshotChainError, SnapshotError, SnapshotWriteError
from dirtylog.snapshot.format import SUFFIX, short
from dirtylog.snapshot.layer import Layer
from dirtylog.snapshot.writer import LayerWriter
from dirtylog.tracking.base import DIRTY_LOG_MODES, DirtyLogMode
from dirtylog.tracking.modes import open_tracker

#: userfaultfd features of a live snapshot: write-protect faults, and protection of pages never touched yet
#: (Linux 6.4), whose first write must also wait until the zero page they held is recorded.
LIVE_FEATURES = linux_abi.UFFD_FEATURE_PAGEFAULT_FLAG_WP | linux_abi.UFFD_FEATURE_WP_UNPOPULATED


@dataclass(frozen=True)
class Snapshot:
    """A snapshot just taken: its file, what it holds, and what it cost the guest."""

    path: Path
    identity: bytes
    parent: bytes | None  # the identity of the snapshot it was taken on; None for a full snapshot
    live: bool
    mode: str
    pages: int  # pages the layer holds
    zero_pages: int  # of which all zero (not written: holes)
    file_bytes: int
    disk_bytes: int  # what the file occupies on disk
    pause_seconds: float  # how long the vCPUs were paused
    seconds: float  # from the call to the file on disk
    write_seconds: float  # saving the pages (while paused, or in the background when live)
    live_faults: int = 0  # guest writes that waited for their block to be saved (live)
    live_wait_seconds: float = 0.0  # their total wait
    live_wait_max_seconds: float = 0.0

    @property
    def kind(self) -> str:
        return "full" if self.parent is None else "incremental"

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "kind": self.kind, "identity": self.identity.hex(),
                "parent": None if self.parent is None else self.parent.hex(), "live": self.live, "mode": self.mode,
                "pages": self.pages, "zero_pages": self.zero_pages, "file_bytes": self.file_bytes,
                "disk_bytes": self.disk_bytes, "pause_ms": round(self.pause_seconds * 1e3, 3),
                "write_ms": round(self.write_seconds * 1e3, 3), "total_ms": round(self.seconds * 1e3, 3),
                "live_faults": self.live_faults, "live_wait_ms": round(self.live_wait_seconds * 1e3, 3),
                "live_wait_max_ms": round(self.live_wait_max_seconds * 1e3, 3)}


def identity_of(parent: Snapshot | str | os.PathLike[str]) -> tuple[bytes, str]:
    """The identity of ``parent`` (a Snapshot or a snapshot file) and its file name."""
    if isinstance(parent, Snapshot):
        return parent.identity, parent.path.name
    with Layer.open(parent) as layer:
        return layer.identity, layer.name


class SnapshotChain:
    """What a machine keeps between its snapshots: the dirty log, the fingerprints, the last snapshot, the debt."""

    def __init__(self, machine: Machine, mode: DirtyLogMode = "log") -> None:
        if mode not in DIRTY_LOG_MODES:
            raise SnapshotError(f"unknown dirty-log mode {mode!r}; choose one of {', '.join(DIRTY_LOG_MODES)}")
        _kernels.load_kernels()  # now, not inside the first snapshot's pause
        self.machine = machine
        self.mode = mode
        self.tracker = open_tracker(machine, mode)
        self.fingerprints: npt.NDArray[np.uint64] | None = None  # every page's, as of the last snapshot
        self.identity: bytes | None = None  # of the last snapshot taken (or restored)
        self.path: Path | None = None
        self.owed = DirtyBitmap.empty(machine.ram.npages)
        self.sequence = 0  # layers since the last full snapshot

    def start_from(self, identity: bytes, path: Path, sequence: int) -> None:
        """Continue a chain restored from ``path`` (whose fingerprints arrive with the restore)."""
        self.identity, self.path, self.sequence = identity, path, sequence
        self.tracker.enable()

    def close(self) -> None:
        """Stop the dirty log the chain keeps."""
        self.tracker.disable()

    # --- taking one ------------------------------------------------------------------------------------------

    def take(self, path: str | os.PathLike[str], parent: Snapshot | str | os.PathLike[str] | None = None,
             live: bool = False) -> Snapshot:
        """Write a snapshot of the machine to ``path``: everything, or the pages written since ``parent`` (which
        must be the last snapshot of this machine); ``live`` keeps the guest running while it is written."""
        machine = self.machine
        if machine.state not in (State.RUNNING, State.PAUSED):
            raise SnapshotError(f"only a running or paused machine can be snapshotted; this one is "
                                f"{machine.state.value}")
        path = Path(path)
        parent_identity: bytes | None = None
        parent_name: str | None = None
        if parent is not None:
            parent_identity, parent_name = identity_of(parent)
            self._check_parent(parent_identity, parent_name)
            if self.path is not None and path.resolve() == self.path.resolve():
                raise SnapshotChainError(f"{path} is the parent of the snapshot asked for: give the layer a new name")
        if live and self.mode == "uffd":
            raise SnapshotError("a live snapshot write-protects guest RAM with a userfaultfd of its own, and the "
                                "'uffd' dirty-log mode holds guest RAM's: keep this chain in mode log, clear or ring")
        began = time.perf_counter()
        if not self.tracker.enabled:
            # Before the pause, not in it (write-protecting all of guest RAM takes a while); the collection in
            # the pause below then starts the count from the snapshot.
            self.tracker.enable()
        running = machine.state is State.RUNNING
        if running:
            machine.pause()
        paused_at = time.perf_counter()
        resumed_at: float | None = None
        collected: DirtyBitmap | None = None
        writer: LayerWriter | None = None
        uffd: Userfaultfd | None = None
        saver: _LoopThread | None = None
        control = np.zeros(_kernels.CONTROL_SIZE, dtype=np.int64)
        try:
            collected = self.tracker.collect()
            held = None if parent is None else self.owed | collected
            states = tuple(machine.vcpu_state(index) for index in range(machine.spec.vcpus))
            progress = machine.vcpu_progress
            writer = LayerWriter(path, machine.ram.npages, None if held is None else held.words)
            stats = np.zeros(_kernels.STATS_SIZE, dtype=np.int64)
            arguments = (machine.ram.words.reshape(-1, 512), writer.held, writer.ranks, writer.fd, writer.fps,
                         writer.zero, writer.saved, MULTIPLIERS, control, stats)
            write_began = time.perf_counter()
            if live:
                uffd = _register(machine)
                fd = uffd.fd
                saver = _LoopThread(lambda: _kernels.save_layer(fd, *arguments), stats)
                saver.wait_running()  # guest RAM is write-protected now, by a loop that needs no GIL
                if running:
                    machine.resume()
                    resumed_at = time.perf_counter()
                status = saver.join(control)
            else:
                status = _kernels.save_layer(-1, *arguments)
            write_seconds = time.perf_counter() - write_began
            if uffd is not None:
                uffd.close()  # everything is saved and unprotected by now; this unregisters guest RAM
                uffd = None
            if running and resumed_at is None:
                machine.resume()
                resumed_at = time.perf_counter()
            if status != _kernels.DONE:
                raise _save_failure(writer, stats)
            fingerprints, digest = self._digest(writer, held)
            info = {"created": time.time(), "sequence": 0 if parent is None else self.sequence + 1,
                    "mode": self.mode, "live": live, "parent": parent_name,
                    "vcpu_progress": progress, "pages": writer.count, "zero_pages": int(stats[_kernels.S_ZERO_PAGES]),
                    "pause_ms": round(((resumed_at or paused_at) - paused_at) * 1e3, 3)}
            head = writer.finish(header_of(machine), states, digest, info, parent_identity)
            writer.commit()
        except BaseException as error:
            if saver is not None:  # the loop uses the userfaultfd and the file: it ends before they close
                control[_kernels.CONTROL_STOP] = 1
                saver.thread.join()
            if uffd is not None:
                uffd.close()  # lifts every protection: writers waiting on it go on
            if writer is not None:
                writer.abort()
            if collected is not None:
                self.owed |= collected  # the dirty log forgot these pages: the next snapshot must not
            if running and resumed_at is None and machine.state is State.PAUSED:
                machine.resume()
            raise self._failure(error, path, parent_identity) from (None if isinstance(error, DirtylogError)
                                                                   else error)
        # The file is whole and named: only now does the chain move on.
        self.owed = DirtyBitmap.empty(machine.ram.npages)
        self.fingerprints, self.identity, self.path = fingerprints, head.identity, path
        self.sequence = 0 if parent is None else self.sequence + 1
        done = time.perf_counter()
        status_ = os.stat(path)
        return Snapshot(path, head.identity, parent_identity, live, self.mode, writer.count,
                        int(stats[_kernels.S_ZERO_PAGES]), status_.st_size, status_.st_blocks * 512,
                        (resumed_at or done) - paused_at if running else 0.0, done - began, write_seconds,
                        int(stats[_kernels.S_FAULTS]), float(stats[_kernels.S_FAULT_NS]) / 1e9,
                        float(stats[_kernels.S_FAULT_MAX_NS]) / 1e9)

    def _check_parent(self, identity: bytes, name: str) -> None:
        if self.identity is None:
            raise SnapshotChainError("an incremental snapshot holds the pages written since its parent, and this "
                                     "machine's dirty log counts from no snapshot: take a full one first "
                                     "(m.snapshot(path)), then layers on it")
        if identity != self.identity:
            last = self.path.name if self.path is not None else short(self.identity)
            raise SnapshotChainError(f"{name} is not the last snapshot of this machine ({last}), which its dirty log "
                                     f"counts from: take the incremental on {last}, or a full snapshot")

    def _digest(self, writer: LayerWriter, held: DirtyBitmap | None) -> tuple[npt.NDArray[np.uint64], bytes]:
        """Every page's fingerprint after this snapshot, and the memory digest they make."""
        if held is None:
            fingerprints = writer.fps
        else:
            assert self.fingerprints is not None
            fingerprints = self.fingerprints.copy()
            fingerprints[held.pages()] = writer.fps
        return fingerprints, xxhash.xxh3_128_digest(fingerprints.data)

    def _failure(self, error: BaseException, path: Path, parent: bytes | None) -> BaseException:
        """The error for the caller: what failed, and that nothing was lost."""
        if isinstance(error, SnapshotChainError | KeyboardInterrupt):
            return error
        why = str(error) if isinstance(error, DirtylogError) else f"{type(error).__name__}: {error}"
        owed = self.owed.count()
        kept = (f"; the {owed} pages written since {self.path.name if self.path else 'the last snapshot'} are kept "
                "for the next snapshot" if parent is not None or self.identity is not None else "")
        cls = SnapshotWriteError if isinstance(error, SnapshotWriteError | OSError) else SnapshotError
        return cls(f"{why}; no snapshot was saved at {path}, the guest runs on{kept}")


def _register(machine: Machine) -> Userfaultfd:
    """A userfaultfd over all of guest RAM in write-protect mode (synchronous: writers will wait for the save
    loop, which protects the memory itself once it runs)."""
    ram = machine.ram
    # Not user-mode-only: KVM's writes to guest RAM are kernel faults, and they must wait like any other.
    uffd = Userfaultfd.create(nonblock=True)
    try:
        uffd.api(LIVE_FEATURES)
        uffd.register(ram.address, ram.size, wp=True)
    except BaseException:
        uffd.close()
        raise
    return uffd


class _LoopThread:
    """A compiled loop on a thread of its own, and the wait until it runs without the GIL.

    Until a loop that serves faults is running, nothing may touch the memory it serves: a Python thread that
    faulted there would hold the GIL, and the loop could never start (it needs the GIL to be called)."""

    def __init__(self, loop: Callable[[], int], stats: npt.NDArray[np.int64]) -> None:
        self.stats = stats
        self.result: list[int] = []
        self.failure: list[BaseException] = []
        stats[_kernels.S_STATUS] = _kernels.NOT_STARTED
        self.thread = threading.Thread(target=self._run, args=(loop,), name="snapshot-loop", daemon=True)
        self.thread.start()

    def _run(self, loop: Callable[[], int]) -> None:
        try:
            self.result.append(loop())
        except BaseException as error:  # reported by join()
            self.failure.append(error)

    def wait_running(self) -> None:
        """Return once the loop runs (or has already ended)."""
        while self.stats[_kernels.S_STATUS] == _kernels.NOT_STARTED and self.thread.is_alive():
            time.sleep(0.0001)

    def join(self, control: npt.NDArray[np.int64]) -> int:
        """The loop's status; an interrupted wait stops the loop first."""
        try:
            self.thread.join()
        except BaseException:
            control[_kernels.CONTROL_STOP] = 1
            self.thread.join()
            raise
        if self.failure:
            raise self.failure[0]
        return self.result[0]


def _save_failure(writer: LayerWriter, stats: npt.NDArray[np.int64]) -> SnapshotError:
    status = int(stats[_kernels.S_STATUS])
    if status == _kernels.IO_ERROR:
        return writer.error(int(stats[_kernels.S_ERRNO]))
    if status == _kernels.UFFD_ERROR:
        return SnapshotError(f"the live snapshot's userfaultfd failed: {os.strerror(int(stats[_kernels.S_ERRNO]))}")
    return SnapshotError(f"the snapshot was stopped before it was whole (status {status})")


def layer_name(index: int) -> str:
    """``snap-0007.dlsnap``: the name the tools give the ``index``-th snapshot of a run."""
    return f"snap-{index:04d}{SUFFIX}"

