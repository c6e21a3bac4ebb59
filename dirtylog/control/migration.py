"""QEMU's migration commands on dirtylog's engine: parameters, capabilities, ``migrate`` and
``migrate-incoming`` in the background, ``query-migrate`` while they run, ``migrate_cancel``, post-copy
(``migrate-start-postcopy``, ``migrate-pause``, ``migrate-recover``, ``migrate`` with ``resume``), and the
``MIGRATION`` / ``MIGRATION_PASS`` events.

Names, types and defaults are QEMU's (``qapi/migration.json``, QEMU 9.x) so that an operator's script
runs unchanged; each maps onto an argument of the engine:

=============================  =========================================================================
``downtime-limit`` (ms)        the pre-copy policy's downtime limit (default 300, as QEMU)
``max-bandwidth`` (bytes/s)    the stream's token bucket; 0 means no cap (default 128 MiB/s, as QEMU)
``multifd`` + ``multifd-channels``  parallel streams (without ``multifd``: one stream)
``multifd-compression``        per-batch compression: ``zstd``, or dirtylog's ``x-dirtylog-lz4``
``zero-page-detection``        ``none`` sends zero pages as data; ``legacy``/``multifd`` elide them
``auto-converge`` + ``cpu-throttle-*``, ``throttle-trigger-threshold``  QEMU's cpu-throttle
``dirty-limit`` + ``vcpu-dirty-limit`` (MB/s)  per-vCPU dirty-rate cap, measured from the dirty ring
``postcopy-ram``               post-copy, started by ``migrate-start-postcopy`` (its requests always take a channel
                               of their own: ``postcopy-preempt``; fault statistics always: ``postcopy-blocktime``)
``x-dirtylog-key-file``        the stream's pre-shared key (dirtylog authenticates every frame)
``x-dirtylog-mode``            which dirty log the source collects (log, clear, ring)
=============================  =========================================================================

Parameters QEMU has and dirtylog does not act on are refused with a message saying so (except their
neutral values, e.g. ``tls-creds: ""``), rather than stored and silently ignored.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, cast

from dirtylog.control.commands import CommandTable
from dirtylog.control.errors import QmpError
from dirtylog.control.json_stream import JsonValue
from dirtylog.control.migration_info import Timing, incoming_info, outgoing_info, qmp_keys, socket_address
from dirtylog.control.protocol import Event
from dirtylog.control.schema import Bool, Enum, Int, ListOf, Member, Str, Struct, Type, UInt
from dirtylog.control.vm import DIRTY_LOG_IN_USE, EventSink, RunState, VmControl
from dirtylog.errors import DirtylogError
from dirtylog.guest.machine import State
from dirtylog.machine import Machine
from dirtylog.migration import Listener, MigrationError, MigrationParameters, MigrationStatus
from dirtylog.migration.engine.destination import DestinationMigration
from dirtylog.migration.engine.source import SourceMigration
from dirtylog.migration.keys import load_key
from dirtylog.migration.policy.parameters import MAX_STREAMS
from dirtylog.migration.transports import parse_endpoint
from dirtylog.units import PAGE_SIZE

MIGRATION_ACTIVE: Final = "There's a migration process in progress"  # QEMU's QERR_MIGRATION_ACTIVE
MAX_DOWNTIME_MS: Final = 2_000_000  # QEMU's MAX_MIGRATE_DOWNTIME (2000 s)

# --- parameters ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unsupported(Type):
    """A QEMU parameter dirtylog does not implement: only its neutral values are accepted (as no-ops)."""

    reason: str
    neutral: tuple[object, ...] = ()

    def check(self, value: Any, path: str, name: str) -> Any:
        if value in self.neutral and type(value) in {type(v) for v in self.neutral}:
            return value
        raise QmpError(f"Parameter '{path}' is not supported by dirtylog: {self.reason}")


MULTIFD_COMPRESSION = Enum("MultiFDCompression", ("none", "zlib", "zstd", "qatzip", "qpl", "uadk", "x-dirtylog-lz4"))
ZERO_PAGE_DETECTION = Enum("ZeroPageDetection", ("none", "legacy", "multifd"))
TRACKING_MODE = Enum("DirtylogTrackingMode", ("log", "clear", "ring"))
_NO_TLS = "dirtylog authenticates every frame with its pre-shared key (x-dirtylog-key-file) instead of TLS"

SUPPORTED_PARAMETERS: Final = (
    Member("throttle-trigger-threshold", UInt(8), True),
    Member("cpu-throttle-initial", UInt(8), True),
    Member("cpu-throttle-increment", UInt(8), True),
    Member("max-bandwidth", UInt(64, "size"), True),
    Member("downtime-limit", UInt(64), True),
    Member("multifd-channels", UInt(8), True),
    Member("max-cpu-throttle", UInt(8), True),
    Member("multifd-compression", MULTIFD_COMPRESSION, True),
    Member("vcpu-dirty-limit", UInt(64), True),
    Member("zero-page-detection", ZERO_PAGE_DETECTION, True),
    Member("x-dirtylog-key-file", Str(), True),
    Member("x-dirtylog-mode", TRACKING_MODE, True),
)
UNSUPPORTED_PARAMETERS: Final = (
    Member("announce-initial", Unsupported("the guest has no network devices to announce"), True),
    Member("announce-max", Unsupported("the guest has no network devices to announce"), True),
    Member("announce-rounds", Unsupported("the guest has no network devices to announce"), True),
    Member("announce-step", Unsupported("the guest has no network devices to announce"), True),
    Member("cpu-throttle-tailslow", Unsupported("throttling steps by cpu-throttle-increment only", (False,)), True),
    Member("tls-creds", Unsupported(_NO_TLS, ("", None)), True),
    Member("tls-hostname", Unsupported(_NO_TLS, ("", None)), True),
    Member("tls-authz", Unsupported(_NO_TLS, ("", None)), True),
    Member("avail-switchover-bandwidth", Unsupported("the switch-over uses the rate the link has shown", (0,)), True),
    Member("x-checkpoint-delay", Unsupported("there is no COLO"), True),
    Member("xbzrle-cache-size", Unsupported("pages are sent whole or compressed, never as XBZRLE deltas"), True),
    Member("max-postcopy-bandwidth", Unsupported("post-copy shares max-bandwidth (its answers to page requests never "
                                                 "wait on it)", (0,)), True),
    Member("multifd-zlib-level", Unsupported("there is no zlib compression; use zstd"), True),
    Member("multifd-qatzip-level", Unsupported("there is no QATzip compression; use zstd"), True),
    Member("multifd-zstd-level", Unsupported("zstd runs at level 1 (the fast level)", (1,)), True),
    Member("block-bitmap-mapping", Unsupported("the guest has no block devices"), True),
    Member("x-vcpu-dirty-limit-period", Unsupported("the dirty limit is sampled every 20 ms", (20,)), True),
    Member("mode", Unsupported("only normal migration exists (no cpr)", ("normal",)), True),
    Member("direct-io", Unsupported("dirtylog migrates over sockets, not files", (False,)), True),
)
MIGRATION_PARAMETERS: Final = Struct("MigrationParameters", SUPPORTED_PARAMETERS + UNSUPPORTED_PARAMETERS)
_SUPPORTED_NAMES: Final = tuple(m.name for m in SUPPORTED_PARAMETERS)


def default_parameters(machine: Machine | None) -> dict[str, Any]:
    """QEMU's defaults (downtime-limit 300 ms, max-bandwidth 128 MiB/s, 2 channels, ...) and dirtylog's."""
    ring = machine is not None and machine.vm.dirty_ring_bytes > 0
    return {
        "throttle-trigger-threshold": 50,
        "cpu-throttle-initial": 20,
        "cpu-throttle-increment": 10,
        "max-bandwidth": 128 << 20,
        "downtime-limit": 300,
        "multifd-channels": 2,
        "max-cpu-throttle": 99,
        "multifd-compression": "none",
        "vcpu-dirty-limit": 1,
        "zero-page-detection": "multifd",
        "x-dirtylog-key-file": "",
        "x-dirtylog-mode": "ring" if ring else "log",  # a VM with dirty rings has no dirty bitmap to read
    }


def check_parameters(current: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """The parameters after ``changes``, or QmpError naming the first bad value (nothing applied)."""
    new = {**current, **{k: v for k, v in changes.items() if k in _SUPPORTED_NAMES}}

    def in_range(name: str, low: int, high: int, unit: str = "") -> None:
        if name in changes and not low <= new[name] <= high:
            raise QmpError(f"Parameter '{name}' expects an integer in the range of {low} to {high}{unit}")

    in_range("throttle-trigger-threshold", 1, 100)
    in_range("cpu-throttle-initial", 1, 99)
    in_range("cpu-throttle-increment", 1, 99)
    in_range("max-cpu-throttle", 1, 99)
    in_range("downtime-limit", 1, MAX_DOWNTIME_MS, " milliseconds (dirtylog needs a positive limit)")
    in_range("multifd-channels", 1, MAX_STREAMS, f" (dirtylog opens at most {MAX_STREAMS} streams)")
    if "vcpu-dirty-limit" in changes and new["vcpu-dirty-limit"] < 1:
        raise QmpError("Parameter 'vcpu-dirty-limit' must be at least 1 MB/s")
    if new["cpu-throttle-initial"] > new["max-cpu-throttle"]:
        raise QmpError(f"cpu-throttle-initial ({new['cpu-throttle-initial']}) must not exceed max-cpu-throttle "
                       f"({new['max-cpu-throttle']})")
    compression = new["multifd-compression"]
    if compression not in ("none", "zstd", "x-dirtylog-lz4"):
        raise QmpError(f"multifd-compression '{compression}' is not available in dirtylog: use zstd or "
                       "x-dirtylog-lz4")
    if changes.get("x-dirtylog-key-file"):
        try:
            load_key(new["x-dirtylog-key-file"])
        except DirtylogError as error:
            raise QmpError(str(error)) from None
    return new


# --- capabilities -------------------------------------------------------------------------------------

CAPABILITIES: Final = ("xbzrle", "rdma-pin-all", "auto-converge", "zero-blocks", "events", "postcopy-ram", "x-colo",
                       "release-ram", "return-path", "pause-before-switchover", "multifd", "dirty-bitmaps",
                       "postcopy-blocktime", "late-block-activate", "x-ignore-shared", "validate-uuid",
                       "background-snapshot", "zero-copy-send", "postcopy-preempt", "switchover-ack", "dirty-limit",
                       "mapped-ram")
SUPPORTED_CAPABILITIES: Final = frozenset({"auto-converge", "events", "multifd", "dirty-limit", "postcopy-ram",
                                           "postcopy-preempt", "postcopy-blocktime"})
_CAPABILITY_NOTES: Final = {
    "zero-blocks": "it encodes zero blocks of block migration, and the guest has no disks; zero pages are "
                   "elided unless zero-page-detection is 'none'",
    "xbzrle": "pages are sent whole or compressed (multifd-compression), never as XBZRLE deltas",
    "return-path": "dirtylog's stream always has a return path (the destination verifies and acknowledges)",
    "background-snapshot": "snapshots come from the snapshot tools, not from migrate",
}
MIGRATION_CAPABILITY = Enum("MigrationCapability", CAPABILITIES)
SET_CAPABILITIES_ARGUMENTS: Final = Struct("migrate-set-capabilities", (
    Member("capabilities", ListOf(Struct("MigrationCapabilityStatus", (
        Member("capability", MIGRATION_CAPABILITY), Member("state", Bool())))),),
))

# --- migrate / migrate-incoming -------------------------------------------------------------------------

MIGRATE_ARGUMENTS: Final = Struct("migrate", (
    Member("uri", Str(), True),
    Member("channels", ListOf(Type()), True),
    Member("detach", Bool(), True),
    Member("resume", Bool(), True),
))
MIGRATE_INCOMING_ARGUMENTS: Final = Struct("migrate-incoming", (
    Member("uri", Str(), True),
    Member("channels", ListOf(Type()), True),
    Member("exit-on-error", Bool(), True),
))
MIGRATE_RECOVER_ARGUMENTS: Final = Struct("migrate-recover", (Member("uri", Str()),))
POSTCOPY_STATES: Final = frozenset({"postcopy-active", "postcopy-paused", "postcopy-recover"})
#: The engines' progress records that change QEMU's post-copy status, and the status each means.
POSTCOPY_PROGRESS: Final = {"postcopy": "postcopy-active", "postcopy-resumed": "postcopy-active",
                            "postcopy-paused": "postcopy-paused", "postcopy-recover": "postcopy-recover"}
QUERY_ROUNDS_ARGUMENTS: Final = Struct("x-dirtylog-query-migrate-rounds", (Member("since", Int(), True),))


def migration_address(uri: str | None, channels: object) -> str:
    """A migration ``uri`` as the engine's address: ``tcp:HOST:PORT``, ``unix:PATH`` or ``file:PATH``, as QEMU
    spells them; QmpError for anything else."""
    if channels is not None:
        raise QmpError("dirtylog takes the migration address as 'uri'; 'channels' is not supported")
    if uri is None:
        raise QmpError("need either 'uri' or 'channels' argument")
    scheme = uri.partition(":")[0]
    if scheme not in ("tcp", "unix", "file"):
        raise QmpError(f"Parameter 'uri' expects a valid migration protocol (dirtylog supports tcp:HOST:PORT, "
                       f"unix:PATH and file:PATH; got {uri!r})")
    if scheme == "file" and "," in uri:
        raise QmpError("file: migration takes no options here (no offset=): write file:PATH")
    try:
        parse_endpoint(uri)
    except MigrationError as error:
        raise QmpError(f"Parameter 'uri' expects a valid migration address: {error}") from None
    return uri


@dataclass
class _Job:
    """One migration as query-migrate reports it."""

    status: str = "setup"
    error: str = ""
    started: float = field(default_factory=time.perf_counter)
    ended: float | None = None
    rounds: list[dict[str, Any]] = field(default_factory=list)

    @property
    def running(self) -> bool:
        return self.ended is None

    def timing(self) -> Timing:
        return Timing(self.started, self.ended, time.perf_counter())


@dataclass
class _Outgoing(_Job):
    migration: SourceMigration | None = None
    multifd: bool = False
    downtime_limit: float = 0.3
    thread: threading.Thread | None = None


@dataclass
class _Incoming(_Job):
    listener: Listener | None = None
    migration: DestinationMigration | None = None
    socket_address: list[dict[str, str]] = field(default_factory=list)
    exit_on_error: bool = True


class MigrationControl:
    """The migration commands of one monitor: outgoing on a running VM, or incoming on a waiting one."""

    def __init__(self, vm: VmControl, emit: EventSink, *, key_file: str | None = None,
                 incoming_memory: int | None = None, incoming_max_memory: int | None = None,
                 io_timeout: float = 30.0, handshake_timeout: float = 5.0,
                 on_incoming_failure: Callable[[str], None] = lambda error: None) -> None:
        self.vm = vm
        self.emit = emit
        self.parameters = default_parameters(vm.machine)
        if key_file:
            self.parameters = check_parameters(self.parameters, {"x-dirtylog-key-file": key_file})
        self.capabilities = dict.fromkeys(CAPABILITIES, False)
        self.incoming_memory = incoming_memory
        self.incoming_max_memory = incoming_max_memory
        self.io_timeout = io_timeout
        self.handshake_timeout = handshake_timeout
        self.on_incoming_failure = on_incoming_failure
        self.accepts_incoming = vm.state is RunState.INMIGRATE
        self.outgoing: _Outgoing | None = None
        self.incoming: _Incoming | None = None
        self._lock = threading.Lock()

    def register(self, table: CommandTable) -> None:
        table.add("migrate", self.migrate, MIGRATE_ARGUMENTS)
        table.add("migrate-incoming", self.migrate_incoming, MIGRATE_INCOMING_ARGUMENTS)
        table.add("migrate_cancel", self.migrate_cancel)
        table.add("migrate-start-postcopy", self.start_postcopy)
        table.add("migrate-recover", self.migrate_recover, MIGRATE_RECOVER_ARGUMENTS)
        table.add("migrate-pause", self.migrate_pause)
        table.add("query-migrate", self.query_migrate)
        table.add("migrate-set-parameters", self.set_parameters, MIGRATION_PARAMETERS)
        table.add("query-migrate-parameters", self.query_parameters)
        table.add("migrate-set-capabilities", self.set_capabilities, SET_CAPABILITIES_ARGUMENTS)
        table.add("query-migrate-capabilities", self.query_capabilities)
        table.add("x-dirtylog-query-migrate-rounds", self.query_rounds, QUERY_ROUNDS_ARGUMENTS)

    @property
    def active(self) -> bool:
        job = self.outgoing if self.outgoing is not None else self.incoming
        return job is not None and job.running

    # --- parameters and capabilities ---------------------------------------------------------------

    def set_parameters(self, args: dict[str, Any]) -> JsonValue:
        """Set migration parameters; downtime-limit and max-bandwidth also retune a running migration."""
        with self._lock:
            self.parameters = check_parameters(self.parameters, args)
            job = self.outgoing
            if job is not None and job.running and job.migration is not None:
                if "downtime-limit" in args:
                    job.downtime_limit = self.parameters["downtime-limit"] / 1e3
                    job.migration.set_downtime_limit(job.downtime_limit)
                if "max-bandwidth" in args:
                    job.migration.set_bandwidth(float(self.parameters["max-bandwidth"]) or None)
        return {}

    def query_parameters(self, args: dict[str, Any]) -> JsonValue:
        """The current parameters (the ones dirtylog implements)."""
        return dict(self.parameters)

    def set_capabilities(self, args: dict[str, Any]) -> JsonValue:
        """Turn capabilities on or off, all or none of the list (checked before any is applied)."""
        with self._lock:
            if self.active:
                raise QmpError(MIGRATION_ACTIVE)
            new = dict(self.capabilities)
            for item in args["capabilities"]:
                name, state = item["capability"], item["state"]
                if state and name not in SUPPORTED_CAPABILITIES:
                    note = _CAPABILITY_NOTES.get(name, "dirtylog does not implement it")
                    raise QmpError(f"Migration capability '{name}' is not supported by dirtylog: {note}")
                new[name] = state
            if new["dirty-limit"]:
                machine = self.vm.machine
                if machine is None or machine.vm.dirty_ring_bytes == 0:
                    raise QmpError("dirty-limit requires KVM with accelerator property 'dirty-ring-size' set "
                                   "(start dirtylog with --dirty-ring)")
                if new["auto-converge"]:
                    raise QmpError("dirty-limit conflicts with auto-converge either enabled previously or in the "
                                   "current call")
            self.capabilities = new
        return {}

    def query_capabilities(self, args: dict[str, Any]) -> JsonValue:
        """Every capability QEMU knows, with its state."""
        return [{"capability": name, "state": state} for name, state in self.capabilities.items()]

    # --- outgoing -----------------------------------------------------------------------------------

    def migrate(self, args: dict[str, Any]) -> JsonValue:
        """Start migrating the running VM to ``uri`` in the background; follow it with query-migrate."""
        with self._lock, self.vm.lock:
            if self.vm.state is RunState.INMIGRATE:
                raise QmpError("Guest is waiting for an incoming migration")
            job = self.outgoing
            if args.get("resume"):
                if job is None or job.status != "postcopy-paused" or job.migration is None:
                    raise QmpError("Cannot resume if there is no paused migration")
                to = migration_address(args.get("uri"), args.get("channels"))
                try:
                    job.migration.resume(to)
                except DirtylogError as error:
                    raise QmpError(str(error)) from None
                return {}
            if self.active:
                raise QmpError(MIGRATION_ACTIVE)
            to = migration_address(args.get("uri"), args.get("channels"))
            if self.vm.state is RunState.POSTMIGRATE:
                raise QmpError("Can't migrate the vm that was paused due to previous migration")
            machine = self.vm.machine
            if self.vm.state is not RunState.RUNNING or machine is None or machine.state is not State.RUNNING:
                raise QmpError(f"dirtylog migrates running VMs only (live); this one is {self.vm.state}: cont first")
            if machine.tracker is not None:
                raise QmpError(f"{DIRTY_LOG_IN_USE}, then migrate")
            job = _Outgoing(multifd=self.capabilities["multifd"],
                            downtime_limit=self.parameters["downtime-limit"] / 1e3)
            try:
                job.migration = self._source_migration(machine, to, job)
            except DirtylogError as error:
                raise QmpError(str(error)) from None
            job.thread = threading.Thread(target=self._run_outgoing, args=(job,), name="qmp-migrate", daemon=True)
            self.outgoing = job
            self.vm.busy = "a migration is in progress; wait for it to end, or migrate_cancel it"
            self._status_event("setup")
            job.thread.start()
        return {}

    def _source_migration(self, machine: Machine, to: str, job: _Outgoing) -> SourceMigration:
        p, caps = self.parameters, self.capabilities
        if not p["x-dirtylog-key-file"]:
            raise QmpError("migrate needs dirtylog's pre-shared key: start with --key-file FILE, or run "
                           "migrate-set-parameters x-dirtylog-key-file=FILE (create one with `dirtylog keygen FILE` "
                           "and copy it to the destination)")
        multifd = caps["multifd"]
        compression = {"none": "none", "zstd": "zstd", "x-dirtylog-lz4": "lz4"}[p["multifd-compression"]]
        params = MigrationParameters(
            postcopy=caps["postcopy-ram"], postcopy_on_request=True,  # QEMU's: only migrate-start-postcopy starts it
            downtime_limit=p["downtime-limit"] / 1e3,
            bandwidth=float(p["max-bandwidth"]) or None,
            auto_converge=caps["auto-converge"],
            throttle_initial=p["cpu-throttle-initial"] / 100,
            throttle_increment=p["cpu-throttle-increment"] / 100,
            throttle_max=p["max-cpu-throttle"] / 100,
            throttle_trigger=p["throttle-trigger-threshold"] / 100,
            dirty_limit=p["vcpu-dirty-limit"] * (1 << 20) / PAGE_SIZE if caps["dirty-limit"] else None,
            streams=p["multifd-channels"] if multifd else 1,
            zero_pages=p["zero-page-detection"] != "none",
            compression=compression if multifd else "none",  # type: ignore[arg-type]
            mode=p["x-dirtylog-mode"],
            io_timeout=self.io_timeout)
        return SourceMigration(machine, to, load_key(p["x-dirtylog-key-file"]), params,
                               lambda kind, record: self._outgoing_progress(job, kind, record))

    def _outgoing_progress(self, job: _Outgoing, kind: str, record: dict[str, Any]) -> None:
        """The engine's progress callback (migration thread)."""
        assert job.migration is not None
        stats = job.migration.stats
        if kind == "setup":
            with self._lock:
                if job.status == "setup":
                    job.status = "active"
                    self._status_event("active")
        elif kind == "round":
            job.rounds.append(qmp_keys(record))
            self._pass_event(stats.dirty_sync_count)
        elif kind == "switchover":
            self.vm.transition(RunState.FINISH_MIGRATE, "STOP")
            self._pass_event(stats.dirty_sync_count)
        elif kind in POSTCOPY_PROGRESS:
            self._postcopy_status(job, kind)

    def _run_outgoing(self, job: _Outgoing) -> None:
        assert job.migration is not None
        status, error = "completed", ""
        try:
            job.migration.run()
        except MigrationError as failure:
            status = "cancelled" if job.migration.stats.status is MigrationStatus.CANCELLED else "failed"
            error = str(failure)
        except Exception as failure:  # a bug must still end the job, visibly
            status, error = "failed", f"{type(failure).__name__}: {failure}"
        stats = job.migration.stats
        if stats.rounds and stats.rounds[-1].final:
            job.rounds.append(qmp_keys(stats.rounds[-1].as_dict(stats.page_size)))
        machine = job.migration.machine
        with self._lock, self.vm.lock:
            job.ended = time.perf_counter()
            job.status, job.error = status, error
            self.vm.busy = ""
            if machine.state is State.RUNNING:
                if self.vm.state is RunState.FINISH_MIGRATE:  # the switch-over paused it, the failure resumed it
                    self.vm.transition(RunState.RUNNING, "RESUME")
            else:  # migrated (handed off, or written to a file), or left paused after the commit
                self.vm.transition(RunState.POSTMIGRATE)
            self._status_event(status)

    def _postcopy_status(self, job: _Job, kind: str) -> None:
        """QEMU's post-copy statuses, and their MIGRATION events, from the engine's progress records."""
        status = POSTCOPY_PROGRESS[kind]
        with self._lock:
            if job.running and job.status != status:
                job.status = status
                self._status_event(status)

    def _postcopy_arrived(self, job: _Incoming) -> None:
        """The post-copy commit on the destination: the VM is this monitor's from now on, running (RESUME) unless
        told to stop before it arrived, while its pages still come (QEMU starts it in postcopy-active too)."""
        assert job.migration is not None and job.migration.machine is not None
        with self._lock, self.vm.lock:
            self.vm.machine = cast(Machine, job.migration.machine)  # the Listener builds Machines
            self.vm.transition(RunState.RUNNING if self.vm.autostart else RunState.PAUSED,
                               "RESUME" if self.vm.autostart else None)
        self._postcopy_status(job, "postcopy")

    def start_postcopy(self, args: dict[str, Any]) -> JsonValue:
        """Switch the outgoing migration to post-copy at its next batch (QEMU's migrate-start-postcopy)."""
        with self._lock:
            if not self.capabilities["postcopy-ram"]:
                raise QmpError("Enable postcopy with migrate_set_capability before the start of migration")
            job = self.outgoing
            if job is None or job.migration is None:
                raise QmpError("Postcopy must be started after migration has been started")
            job.migration.start_postcopy()  # harmless once the migration has switched over or ended, as in QEMU
        return {}

    def migrate_recover(self, args: dict[str, Any]) -> JsonValue:
        """A paused post-copy destination waits for the source at ``uri`` from now on (QEMU's migrate-recover)."""
        with self._lock:
            job = self.incoming
            if job is None or job.migration is None or job.status != "postcopy-paused":
                raise QmpError("Migrate recover can only be run when postcopy is paused.")
            address = migration_address(args.get("uri"), None)
            try:
                listening = job.migration.recover(address)
            except DirtylogError as error:
                raise QmpError(str(error)) from None
            job.socket_address = socket_address(parse_endpoint(listening))
        return {}

    def migrate_pause(self, args: dict[str, Any]) -> JsonValue:
        """Break the post-copy link on purpose, on either end; both pause, to be resumed (QEMU's migrate-pause)."""
        with self._lock:
            engine: SourceMigration | DestinationMigration | None = None
            if self.outgoing is not None and self.outgoing.status in ("postcopy-active", "postcopy-recover"):
                engine = self.outgoing.migration
            elif self.incoming is not None and self.incoming.status in ("postcopy-active", "postcopy-recover"):
                engine = self.incoming.migration
            if engine is None:
                raise QmpError("migrate-pause is currently only supported during postcopy-active or "
                               "postcopy-recover state")
            try:
                engine.pause_link()
            except DirtylogError as error:
                raise QmpError(str(error)) from None
        return {}

    def migrate_cancel(self, args: dict[str, Any]) -> JsonValue:
        """Cancel the outgoing migration (a no-op without one); the source keeps running."""
        with self._lock:
            job = self.outgoing
            if job is not None and job.running and job.status in POSTCOPY_STATES:
                raise QmpError("Postcopy migration in progress, cannot cancel: the destination runs the VM and needs "
                               "this source's pages (migrate-pause breaks the link, to be resumed)")
            if job is not None and job.running and job.status in ("setup", "active") and job.migration is not None:
                job.status = "cancelling"
                self._status_event("cancelling")
                job.migration.cancel()
        return {}

    # --- incoming -----------------------------------------------------------------------------------

    def migrate_incoming(self, args: dict[str, Any]) -> JsonValue:
        """Listen at ``uri`` and receive the VM there in the background (QEMU's -incoming defer)."""
        with self._lock:
            if self.incoming is not None:
                raise QmpError("The incoming migration has already been started")
            if not self.accepts_incoming or self.vm.state is not RunState.INMIGRATE:
                raise QmpError("'-incoming' was not specified on the command line (start the destination with "
                               "`dirtylog receive --qmp ...`)")
            address = migration_address(args.get("uri"), args.get("channels"))
            key_file = self.parameters["x-dirtylog-key-file"]
            if not key_file:
                raise QmpError("migrate-incoming needs dirtylog's pre-shared key: start with --key-file FILE, or run "
                               "migrate-set-parameters x-dirtylog-key-file=FILE first")
            try:
                listener = Listener(address, memory=self.incoming_memory, max_memory=self.incoming_max_memory,
                                    machine_class=Machine)
            except DirtylogError as error:
                raise QmpError(str(error)) from None
            job = _Incoming(listener=listener, socket_address=socket_address(parse_endpoint(listener.address)),
                            exit_on_error=args.get("exit-on-error", True))
            self.incoming = job
            self._status_event("setup")
            threading.Thread(target=self._run_incoming, args=(job, key_file), name="qmp-incoming", daemon=True).start()
        return {}

    def _run_incoming(self, job: _Incoming, key_file: str) -> None:
        assert job.listener is not None

        def progress(kind: str, record: dict[str, Any]) -> None:
            if kind == "setup":
                with self._lock:
                    job.status = "active"
                    self._status_event("active")
            elif kind == "round":
                job.rounds.append(qmp_keys(record))
            elif kind == "postcopy":
                self._postcopy_arrived(job)
            elif kind in POSTCOPY_PROGRESS:
                self._postcopy_status(job, kind)

        try:
            # As QEMU's -S: a destination told to stop before the VM arrives starts it paused, in post-copy too.
            job.migration = DestinationMigration(job.listener, load_key(key_file), io_timeout=self.io_timeout,
                                                 accept_timeout=None, handshake_timeout=self.handshake_timeout,
                                                 progress=progress, start_paused=not self.vm.autostart)
            received = job.migration.run()
        except DirtylogError as failure:
            with self._lock, self.vm.lock:
                job.ended = time.perf_counter()
                job.status, job.error = "failed", str(failure)
                if self.vm.machine is not None:  # it ran here in post-copy, and its missing pages will not come
                    self.vm.transition(RunState.INTERNAL_ERROR, "STOP")
                self._status_event("failed")
            if job.exit_on_error:
                self.on_incoming_failure(str(failure))
            return
        finally:
            job.listener.close()
        with self._lock, self.vm.lock:
            job.ended = time.perf_counter()
            job.status = "completed"
            postcopy = self.vm.machine is not None  # post-copy ran it here from the switch-over on (or paused it)
            machine = cast(Machine, received.machine)  # the Listener builds Machines (machine_class above)
            self.vm.machine = machine
            self.parameters["x-dirtylog-mode"] = default_parameters(machine)["x-dirtylog-mode"]
            self._status_event("completed")
            if postcopy:
                pass
            elif self.vm.autostart:
                self.vm.transition(RunState.RUNNING, "RESUME")
            else:
                received.machine.pause()  # QEMU would not start it at all; here it ran a moment
                self.vm.transition(RunState.PAUSED)

    # --- query-migrate ----------------------------------------------------------------------------

    def query_migrate(self, args: dict[str, Any]) -> JsonValue:
        """QEMU's MigrationInfo: {} before any migration; live figures while one runs."""
        with self._lock:
            outgoing, incoming = self.outgoing, self.incoming
            if outgoing is not None and outgoing.migration is not None:
                return outgoing_info(outgoing.status, outgoing.migration.stats, outgoing.timing(),
                                     downtime_limit=outgoing.downtime_limit, multifd=outgoing.multifd,
                                     error=outgoing.error)
            if incoming is not None:
                stats = incoming.migration.stats if incoming.migration is not None else None
                return incoming_info(incoming.status, incoming.socket_address, incoming.error, stats)
            return {}

    def query_rounds(self, args: dict[str, Any]) -> JsonValue:
        """dirtylog's per-round records of the current or last migration, from index ``since``."""
        job: _Job | None = self.outgoing if self.outgoing is not None else self.incoming
        rounds = list(job.rounds) if job is not None else []
        return rounds[max(0, args.get("since", 0)):]

    # --- events and shutdown ------------------------------------------------------------------------

    def _status_event(self, status: str) -> None:
        if self.capabilities["events"]:
            self.emit(Event.now("MIGRATION", {"status": status}))

    def _pass_event(self, count: int) -> None:
        if self.capabilities["events"]:
            self.emit(Event.now("MIGRATION_PASS", {"pass": count}))

    def close(self, timeout: float = 30.0) -> None:
        """Cancel what runs (the monitor is going away): the source keeps its VM, the listener closes."""
        outgoing, incoming = self.outgoing, self.incoming
        if outgoing is not None and outgoing.running and outgoing.migration is not None:
            outgoing.migration.cancel()
            if outgoing.thread is not None:
                outgoing.thread.join(timeout)
        if incoming is not None and incoming.running and incoming.listener is not None:
            incoming.listener.close()  # the destination polls its listener: it gives up within 50 ms
