"""QEMU's snapshot jobs on :mod:`dirtylog.snapshot`: ``snapshot-save``, ``snapshot-load``, ``snapshot-delete``,
``query-jobs``, ``job-dismiss`` and the ``JOB_STATUS_CHANGE`` events, with QEMU's names, arguments and answers.

QEMU keeps a snapshot (tag) inside the qcow2 images named by ``devices`` and ``vmstate``; a dirtylog machine has
no block devices, so a tag is a file, ``TAG.dlsnap``, in the directory ``dirtylog run --snapshot-dir DIR`` gave.
``vmstate`` and ``devices`` are accepted (a QEMU script sends them) and ignored. A save is an incremental layer
on the previous snapshot this machine saved or loaded (its dirty log counts from it) while that file is there,
and a full snapshot otherwise or with ``x-dirtylog-full``; ``x-dirtylog-live`` saves while the guest runs.

Each command creates a job that runs on a worker thread, one job at a time, as QEMU runs them one at a time on
its main loop: ``created``, ``running``, then ``waiting``, ``pending``, ``concluded`` (or ``aborting``,
``concluded`` with an ``error``), and the job stays in ``query-jobs`` until ``job-dismiss`` (QEMU creates these
jobs with auto-finalize on and auto-dismiss off). A load builds the restored machine beside the running one and
checks every page of the chain before it swaps them, so a corrupt or foreign file fails the job and the VM runs
on as it was.
"""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from dirtylog.control.commands import CommandTable
from dirtylog.control.errors import QmpError
from dirtylog.control.json_stream import JsonValue
from dirtylog.control.migration import MIGRATION_ACTIVE, MigrationControl
from dirtylog.control.protocol import Event
from dirtylog.control.rate import RateControl
from dirtylog.control.schema import Bool, ListOf, Member, Str, Struct
from dirtylog.control.vm import DIRTY_LOG_IN_USE, EventSink, RunState, VmControl
from dirtylog.errors import DirtylogError
from dirtylog.guest.machine import State
from dirtylog.machine import Machine
from dirtylog.snapshot.errors import SnapshotError, SnapshotFormatError
from dirtylog.snapshot.format import MAX_CHAIN, SUFFIX
from dirtylog.snapshot.layer import Layer
from dirtylog.tracking.base import DirtyLogMode

#: QEMU's ``id_wellformed``: a letter, then letters, digits, '-', '.', '_'.
_JOB_ID: Final = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")
#: Tags become file names here: no separators, no hidden files, nothing a shell or a path would reinterpret.
_TAG: Final = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]{0,127}\Z")

SNAPSHOT_SAVE_ARGUMENTS: Final = Struct("snapshot-save", (
    Member("job-id", Str()),
    Member("tag", Str()),
    Member("vmstate", Str(), True),
    Member("devices", ListOf(Str()), True),
    Member("x-dirtylog-live", Bool(), True),
    Member("x-dirtylog-full", Bool(), True),
))
SNAPSHOT_LOAD_ARGUMENTS: Final = Struct("snapshot-load", (
    Member("job-id", Str()),
    Member("tag", Str()),
    Member("vmstate", Str(), True),
    Member("devices", ListOf(Str()), True),
))
SNAPSHOT_DELETE_ARGUMENTS: Final = Struct("snapshot-delete", (
    Member("job-id", Str()),
    Member("tag", Str()),
    Member("devices", ListOf(Str()), True),
))
JOB_ID_ARGUMENTS: Final = Struct("job-dismiss", (Member("id", Str()),))


class JobError(DirtylogError):
    """A snapshot job could not do its work: the job concludes with this error, and nothing changed."""


@dataclass
class Job:
    """One job as query-jobs reports it (QEMU's JobInfo)."""

    id: str
    type: str  # QEMU's JobType: snapshot-save, snapshot-load, snapshot-delete
    work: Callable[[Job], dict[str, Any] | None]
    status: str = "created"
    error: str | None = None
    current_progress: int = 0
    total_progress: int = 1
    result: dict[str, Any] | None = None  # what a successful save made (x-dirtylog-snapshot)
    done: threading.Event = field(default_factory=threading.Event)

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {"current-progress": self.current_progress, "status": self.status,
                                "total-progress": self.total_progress, "type": self.type, "id": self.id}
        if self.error is not None:
            info["error"] = self.error
        if self.result is not None:
            info["x-dirtylog-snapshot"] = self.result
        return info


def tag_path(folder: Path, tag: str) -> Path:
    """The file of ``tag`` in ``folder``; JobError for a tag that cannot be a file name."""
    if not _TAG.match(tag):
        raise JobError(f"Snapshot tag {tag!r} cannot name a file here: use up to 128 letters, digits, '.', '_', "
                         "'+' and '-', not starting with '.'")
    return folder / f"{tag}{SUFFIX}"


def snapshot_directory(path: str | Path) -> Path:
    """``--snapshot-dir``, created if missing; DirtylogError naming the option when it cannot be."""
    folder = Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DirtylogError(f"cannot use --snapshot-dir {folder}: {error.strerror}") from None
    return folder


def snapshot_mode(machine: Machine) -> DirtyLogMode:
    """The dirty log a QMP snapshot chain keeps: the dirty ring on a machine that has one (it has no bitmap)."""
    return "ring" if machine.vm.dirty_ring_bytes else "log"


class SnapshotControl:
    """The snapshot jobs of one monitor, and the directory their tags live in."""

    def __init__(self, vm: VmControl, emit: EventSink, migration: MigrationControl, rate: RateControl, *,
                 snapshot_dir: str | Path | None = None, live: bool = False) -> None:
        self.vm = vm
        self.emit = emit
        self.migration = migration
        self.rate = rate
        self.folder = snapshot_directory(snapshot_dir) if snapshot_dir else None
        self.live_default = live
        self.jobs: dict[str, Job] = {}  # newest last; query-jobs lists newest first, as QEMU
        # The snapshot the machine's dirty log counts from (saved or loaded), the machine, and the layers under it.
        self.last: tuple[Machine, Path, int] | None = None
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None

    def register(self, table: CommandTable) -> None:
        table.add("snapshot-save", self.snapshot_save, SNAPSHOT_SAVE_ARGUMENTS)
        table.add("snapshot-load", self.snapshot_load, SNAPSHOT_LOAD_ARGUMENTS)
        table.add("snapshot-delete", self.snapshot_delete, SNAPSHOT_DELETE_ARGUMENTS)
        table.add("query-jobs", self.query_jobs)
        table.add("job-dismiss", self.job_dismiss, JOB_ID_ARGUMENTS)
        table.add("x-dirtylog-end-snapshot-chain", self.end_chain)

    # --- commands -------------------------------------------------------------------------------------

    def snapshot_save(self, args: dict[str, Any]) -> JsonValue:
        """Save the VM as ``tag``: a job; an incremental layer on the last snapshot when it can be."""
        live = args.get("x-dirtylog-live", self.live_default)
        full = args.get("x-dirtylog-full", False)
        self._create(args["job-id"], "snapshot-save", lambda job: self._save(args["tag"], live, full))
        return {}

    def snapshot_load(self, args: dict[str, Any]) -> JsonValue:
        """Bring the VM back to ``tag``: a job; the VM runs on from the snapshot if it was running."""
        self._create(args["job-id"], "snapshot-load", lambda job: self._load(args["tag"]))
        return {}

    def snapshot_delete(self, args: dict[str, Any]) -> JsonValue:
        """Delete ``tag``: a job, refused while layers depend on it."""
        self._create(args["job-id"], "snapshot-delete", lambda job: self._delete(args["tag"]))
        return {}

    def query_jobs(self, args: dict[str, Any]) -> JsonValue:
        """Every job not yet dismissed, newest first (QEMU's JobInfo)."""
        with self._lock:
            return [job.info() for job in reversed(self.jobs.values())]

    def job_dismiss(self, args: dict[str, Any]) -> JsonValue:
        """Forget a concluded job (JOB_STATUS_CHANGE null)."""
        with self._lock:
            job = self.jobs.get(args["id"])
            if job is None:
                raise QmpError("Job not found")
            if job.status != "concluded":
                raise QmpError(f"Job '{job.id}' in state '{job.status}' cannot accept command verb 'dismiss'")
            del self.jobs[job.id]
            self._transition(job, "null")
        return {}

    def end_chain(self, args: dict[str, Any]) -> JsonValue:
        """Stop the dirty log kept for incremental snapshots (it blocks migrate and the dirty-log modes of
        calc-dirty-rate); the next snapshot-save is a full one."""
        with self._lock:
            if any(job.status in ("created", "running") for job in self.jobs.values()):
                raise QmpError("a snapshot job is running: wait for it to conclude (query-jobs)")
            with self.vm.lock:
                machine = self.vm.machine
                if machine is not None and machine.state not in (State.STOPPED, State.HANDED_OFF):
                    machine.end_snapshots()
            self.last = None
        return {}

    # --- jobs -----------------------------------------------------------------------------------------

    def _create(self, job_id: str, job_type: str, work: Callable[[Job], dict[str, Any] | None]) -> None:
        with self._lock:
            if not _JOB_ID.match(job_id):
                raise QmpError(f"Invalid job ID '{job_id}'")
            if job_id in self.jobs:
                raise QmpError(f"Job ID '{job_id}' already in use")
            job = Job(job_id, job_type, work)
            self.jobs[job_id] = job
            self.emit(Event.now("JOB_STATUS_CHANGE", {"status": "created", "id": job_id}))
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve, name="qmp-snapshot-jobs", daemon=True)
                self._worker.start()
        self._queue.put(job)

    def _serve(self) -> None:
        while (job := self._queue.get()) is not None:
            self._run(job)

    def _run(self, job: Job) -> None:
        with self._lock:
            self._transition(job, "running")
        try:
            result = job.work(job)
        except DirtylogError as failure:
            error: str | None = str(failure)
        except Exception as failure:  # a bug must still conclude the job, visibly
            error = f"{type(failure).__name__}: {failure}"
        else:
            error = None
        with self._lock:
            job.current_progress = job.total_progress
            if error is None:
                job.result = result
                for status in ("waiting", "pending", "concluded"):
                    self._transition(job, status)
            else:
                job.error = error
                for status in ("aborting", "concluded"):
                    self._transition(job, status)
        job.done.set()

    def _transition(self, job: Job, status: str) -> None:
        job.status = status
        self.emit(Event.now("JOB_STATUS_CHANGE", {"status": status, "id": job.id}))

    # --- the work (worker thread) -----------------------------------------------------------------------

    def _folder(self, command: str) -> Path:
        if self.folder is None:
            raise JobError(f"{command} needs a directory for its snapshot files, and this VM has none: start it "
                             "with `dirtylog run --qmp ... --snapshot-dir DIR`")
        return self.folder

    def _machine(self, command: str) -> tuple[Machine, bool]:
        """The machine to save or load, and whether it runs; JobError when it cannot be touched now."""
        if self.migration.active:
            raise JobError(MIGRATION_ACTIVE)
        machine, state = self.vm.machine, self.vm.state
        if machine is None or state not in (RunState.RUNNING, RunState.PAUSED) or \
                machine.state not in (State.RUNNING, State.PAUSED):
            raise JobError(f"{command} needs a running or paused VM; this one is {state}")
        return machine, state is RunState.RUNNING

    def _save(self, tag: str, live: bool, full: bool) -> dict[str, Any]:
        path = tag_path(self._folder("snapshot-save"), tag)
        if path.exists():
            raise JobError(f"Snapshot '{tag}' already exists ({path}): snapshot-delete it first, or choose "
                             "another tag")
        with self.vm.lock:
            machine, running = self._machine("snapshot-save")
            parent, depth = self._parent(machine, full)
            self.vm.busy = "a snapshot job is running; wait for it to conclude (query-jobs)"
            if running and not live:  # QEMU's save stops the VM (STOP ... RESUME); a live one keeps it running
                self.vm.transition(RunState.PAUSED, "STOP")
        try:
            mode = None if parent is not None else snapshot_mode(machine)  # a layer keeps its chain's mode
            snap = machine.snapshot(path, parent, live=live, mode=mode)
        finally:
            with self.vm.lock:
                self.vm.busy = ""
                if running and not live:
                    self.vm.transition(RunState.RUNNING, "RESUME")
        self.last = (machine, path, depth)
        return {"file": str(path), "kind": snap.kind, "live": live, "parent": None if parent is None else parent.stem,
                "pages": snap.pages, "zero-pages": snap.zero_pages, "disk-bytes": snap.disk_bytes,
                "pause-ms": round(snap.pause_seconds * 1e3, 3), "total-ms": round(snap.seconds * 1e3, 3)}

    def _parent(self, machine: Machine, full: bool) -> tuple[Path | None, int]:
        """The snapshot to take a layer on (None: a full one), and the layer's depth in its chain."""
        last = self.last
        if full or last is None or last[0] is not machine or not last[1].exists() or last[2] + 1 >= MAX_CHAIN:
            return None, 0
        return last[1], last[2] + 1

    def _load(self, tag: str) -> None:
        path = tag_path(self._folder("snapshot-load"), tag)
        if not path.exists():
            raise JobError(f"Snapshot '{tag}' does not exist (no {path})")
        machine, _ = self._machine("snapshot-load")
        if machine.tracker is not None and (self.last is None or self.last[0] is not machine):
            raise JobError(DIRTY_LOG_IN_USE)
        measurement = self.rate.measurement
        if measurement is not None and measurement.status == "measuring":
            raise JobError("a dirty-rate measurement is running: wait for query-dirty-rate to say measured")
        mode = snapshot_mode(machine)
        try:
            with Layer.open(path) as layer:
                header, depth = layer.meta.header, int(layer.info.get("sequence", 0))
            ours = sorted((slot.guest_phys_addr, slot.memory_size) for slot in machine.vm.slots.values())
            theirs = sorted((slot.guest_phys_addr, slot.memory_size) for slot in header.slots)
            if (ours, machine.spec.vcpus) != (theirs, header.vcpus):
                raise JobError(f"Snapshot '{tag}' is of another VM ({header.vcpus} vCPUs, memory slots {theirs}; "
                                 f"this one has {machine.spec.vcpus} vCPUs, {ours}): it cannot be loaded here")
            # Everything read and checked before the guest runs (lazy=False): a corrupt chain fails here, with the
            # running VM untouched.
            restored = Machine.restore(path, lazy=False, track=mode, resume=False)
        except SnapshotFormatError as error:
            raise JobError(f"Snapshot '{tag}' cannot be loaded: {error}; the VM runs on as it was") from None
        except SnapshotError as error:
            raise JobError(f"{error}; the VM runs on as it was") from None
        with self.vm.lock:
            try:
                machine, running = self._machine("snapshot-load")  # the VM may have changed meanwhile
            except JobError:
                restored.stop()
                raise
            if running:
                machine.pause()
                self.vm.transition(RunState.PAUSED, "STOP")
            try:
                restored.start()
                if not running:
                    restored.pause()  # QEMU leaves a paused VM paused (it ran for a moment here)
            except BaseException:
                restored.stop()
                if running:
                    machine.resume()
                    self.vm.transition(RunState.RUNNING, "RESUME")
                raise
            self.vm.machine = restored
            self.last = (restored, path, depth)
            if running:
                self.vm.transition(RunState.RUNNING, "RESUME")
        machine.stop()
        return None

    def _delete(self, tag: str) -> None:
        folder = self._folder("snapshot-delete")
        path = tag_path(folder, tag)
        if not path.exists():
            return None  # as in QEMU: deleting a tag that no device has is no error
        try:
            with Layer.open(path) as layer:
                identity = layer.identity
        except SnapshotFormatError:
            identity = None  # not a readable snapshot: nothing can depend on it
        if identity is not None:
            dependents, twins = [], 0
            for other in sorted(folder.glob(f"*{SUFFIX}")):
                if other == path:
                    continue
                try:
                    with Layer.open(other) as layer:
                        twins += layer.identity == identity
                        if layer.parent == identity:
                            dependents.append(other.name.removesuffix(SUFFIX))
                except SnapshotFormatError:
                    continue
            if dependents and not twins:
                names = ", ".join(dependents)
                raise JobError(f"Snapshot '{tag}' cannot be deleted: {len(dependents)} incremental layer(s) are "
                                 f"taken on it ({names}) and would not restore; delete those first, or merge one "
                                 "into a full snapshot (`dirtylog snapshot merge`)")
        try:
            path.unlink()
        except OSError as error:
            raise JobError(f"cannot delete {path}: {error.strerror}") from None
        last = self.last
        if last is not None and last[1] == path:
            self.last = None  # the next save cannot be a layer on a file that is gone: it is a full one
        return None

    # --- shutdown -------------------------------------------------------------------------------------

    def close(self, timeout: float = 60.0) -> None:
        """Let the job in progress end (its snapshot is whole or absent), before the machine goes away."""
        worker = self._worker
        if worker is None:
            return
        with self._lock:
            pending = [job for job in self.jobs.values() if job.status in ("created", "running")]
        for job in pending:
            job.done.wait(timeout)
        self._queue.put(None)
        worker.join(timeout)
