"""QEMU's dirty-rate commands on :mod:`dirtylog.rate`: ``calc-dirty-rate`` / ``query-dirty-rate`` and the
``set-`` / ``query-`` / ``cancel-vcpu-dirty-limit`` family, with QEMU's arguments, units and answers.

QEMU's rates are "MB/s" that are MiB/s (2**20 bytes) and whole numbers; dirtylog's are pages/s, so
1 MB/s here is 256 pages/s. Modes map ``page-sampling`` -> ``sampling``, ``dirty-bitmap`` -> ``bitmap``,
``dirty-ring`` -> ``ring``. A measurement runs in the background (``calc-dirty-rate`` returns at once,
``query-dirty-rate`` says ``measuring`` until it is ``measured``), as in QEMU.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from dirtylog.control.commands import CommandTable
from dirtylog.control.errors import QmpError
from dirtylog.control.json_stream import JsonValue
from dirtylog.control.migration import MigrationControl
from dirtylog.control.schema import Enum, Int, Member, Struct, UInt
from dirtylog.control.vm import VmControl
from dirtylog.errors import DirtylogError
from dirtylog.guest.machine import State
from dirtylog.machine import Machine
from dirtylog.rate.limit import DirtyLimitController
from dirtylog.units import PAGE_SIZE

PAGES_PER_MB: Final = (1 << 20) // PAGE_SIZE  # QEMU's MB/s are MiB/s
MIN_CALC_TIME_MS: Final = 50  # QEMU's limits on calc-time
MAX_CALC_TIME_MS: Final = 60_000
MIN_SAMPLE_PAGES: Final = 128  # QEMU's limits on sample-pages (per GiB)
MAX_SAMPLE_PAGES: Final = 4096
DEFAULT_SAMPLE_PAGES: Final = 512

MEASURE_MODE = Enum("DirtyRateMeasureMode", ("page-sampling", "dirty-ring", "dirty-bitmap"))
TIME_UNIT = Enum("TimeUnit", ("second", "millisecond"))
_METHODS: Final = {"page-sampling": "sampling", "dirty-ring": "ring", "dirty-bitmap": "bitmap"}

CALC_DIRTY_RATE_ARGUMENTS: Final = Struct("calc-dirty-rate", (
    Member("calc-time", Int()),
    Member("calc-time-unit", TIME_UNIT, True),
    Member("sample-pages", Int(), True),
    Member("mode", MEASURE_MODE, True),
))
QUERY_DIRTY_RATE_ARGUMENTS: Final = Struct("query-dirty-rate", (Member("calc-time-unit", TIME_UNIT, True),))
SET_LIMIT_ARGUMENTS: Final = Struct("set-vcpu-dirty-limit", (
    Member("cpu-index", Int(), True),
    Member("dirty-rate", UInt(64)),
))
CANCEL_LIMIT_ARGUMENTS: Final = Struct("cancel-vcpu-dirty-limit", (Member("cpu-index", Int(), True),))


@dataclass
class _Measurement:
    """One calc-dirty-rate: what was asked, and what came out."""

    mode: str
    calc_time_ms: int
    unit: str
    sample_pages: int
    start_time: int  # seconds since the epoch, as QEMU's start-time
    status: str = "measuring"
    mib_per_s: int | None = None
    vcpu_mib_per_s: list[int] | None = None
    pages_per_s: float | None = None
    error: str = ""


class RateControl:
    """The dirty-rate and dirty-limit commands of one monitor."""

    def __init__(self, vm: VmControl, migration: MigrationControl) -> None:
        self.vm = vm
        self.migration = migration
        self.measurement: _Measurement | None = None
        self.limit: DirtyLimitController | None = None  # the controller set-vcpu-dirty-limit started
        self._limited: Machine | None = None  # ... and the machine it limits
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def register(self, table: CommandTable) -> None:
        table.add("calc-dirty-rate", self.calc_dirty_rate, CALC_DIRTY_RATE_ARGUMENTS)
        table.add("query-dirty-rate", self.query_dirty_rate, QUERY_DIRTY_RATE_ARGUMENTS)
        table.add("set-vcpu-dirty-limit", self.set_vcpu_dirty_limit, SET_LIMIT_ARGUMENTS)
        table.add("cancel-vcpu-dirty-limit", self.cancel_vcpu_dirty_limit, CANCEL_LIMIT_ARGUMENTS)
        table.add("query-vcpu-dirty-limit", self.query_vcpu_dirty_limit)

    # --- calc-dirty-rate / query-dirty-rate ---------------------------------------------------------

    def calc_dirty_rate(self, args: dict[str, Any]) -> JsonValue:
        """Start measuring the dirty rate over ``calc-time``; query-dirty-rate gives the result."""
        with self._lock:
            if self.measurement is not None and self.measurement.status == "measuring":
                raise QmpError("the dirty rate is already being measured.")
            unit = args.get("calc-time-unit", "second")
            calc_time_ms = args["calc-time"] * (1000 if unit == "second" else 1)
            if not MIN_CALC_TIME_MS <= calc_time_ms <= MAX_CALC_TIME_MS:
                raise QmpError(f"Calculation time is out of range [{MIN_CALC_TIME_MS}ms, {MAX_CALC_TIME_MS}ms].")
            mode = args.get("mode", "page-sampling")
            if "sample-pages" in args and mode != "page-sampling":
                raise QmpError("sample-pages is used only in page-sampling mode")
            sample_pages = args.get("sample-pages", DEFAULT_SAMPLE_PAGES if mode == "page-sampling" else 0)
            if mode == "page-sampling" and not MIN_SAMPLE_PAGES <= sample_pages <= MAX_SAMPLE_PAGES:
                raise QmpError(f"sample-pages is out of range[{MIN_SAMPLE_PAGES}, {MAX_SAMPLE_PAGES}].")
            machine = self._running_machine("calc-dirty-rate")
            ring = machine.vm.dirty_ring_bytes > 0
            if (mode == "dirty-ring") != ring and mode != "page-sampling":
                raise QmpError(f"mode {mode} is not enabled, use other method instead.")
            if mode != "page-sampling" and self.migration.active:
                raise QmpError(f"mode {mode} needs the dirty log, which the running migration holds; use "
                               "page-sampling, or measure after the migration")
            measurement = _Measurement(mode, calc_time_ms, unit, sample_pages, int(time.time()))
            self.measurement = measurement
            self._thread = threading.Thread(target=self._measure, args=(machine, measurement), name="qmp-dirty-rate",
                                            daemon=True)
            self._thread.start()
        return {}

    def _measure(self, machine: Machine, measurement: _Measurement) -> None:
        options: dict[str, Any] = {}
        if measurement.mode == "page-sampling":
            options["sample_pages"] = measurement.sample_pages
        try:
            result = machine.dirty_rate(measurement.calc_time_ms / 1e3, _METHODS[measurement.mode], **options)
        except Exception as error:  # a DirtylogError, or a machine stopped under it: said, never lost
            measurement.error = str(error) if isinstance(error, DirtylogError) else f"{type(error).__name__}: {error}"
            measurement.status = "unstarted"  # QEMU's states have no "failed"; the error says why
            return
        measurement.mib_per_s = int(result.mib_per_s)
        measurement.pages_per_s = result.pages_per_s
        if result.vcpu_pages_per_s is not None:
            measurement.vcpu_mib_per_s = [int(rate / PAGES_PER_MB) for rate in result.vcpu_pages_per_s]
        measurement.status = "measured"

    def query_dirty_rate(self, args: dict[str, Any]) -> JsonValue:
        """QEMU's DirtyRateInfo of the last calc-dirty-rate (``unstarted`` before any)."""
        measurement = self.measurement
        unit = args.get("calc-time-unit")
        if measurement is None:
            unit = unit or "second"
            return {"status": "unstarted", "start-time": 0, "calc-time": 0, "calc-time-unit": unit,
                    "sample-pages": DEFAULT_SAMPLE_PAGES, "mode": "page-sampling"}
        unit = unit or measurement.unit
        info: dict[str, Any] = {
            "status": measurement.status, "start-time": measurement.start_time,
            "calc-time": measurement.calc_time_ms // (1000 if unit == "second" else 1), "calc-time-unit": unit,
            "sample-pages": measurement.sample_pages, "mode": measurement.mode}
        if measurement.status == "measured":
            info["dirty-rate"] = measurement.mib_per_s
            info["x-dirtylog-pages-per-second"] = round(measurement.pages_per_s or 0.0, 1)
            if measurement.vcpu_mib_per_s is not None:
                info["vcpu-dirty-rate"] = [{"id": index, "dirty-rate": rate}
                                           for index, rate in enumerate(measurement.vcpu_mib_per_s)]
        if measurement.error:
            info["x-dirtylog-error"] = measurement.error
        return info

    def close(self) -> None:
        """Let a measurement in flight end (at most its window) before the machine goes away."""
        thread, measurement = self._thread, self.measurement
        if thread is not None and measurement is not None:
            thread.join(measurement.calc_time_ms / 1e3 + 5.0)

    # --- the dirty limit ----------------------------------------------------------------------------

    def set_vcpu_dirty_limit(self, args: dict[str, Any]) -> JsonValue:
        """Cap a vCPU (``cpu-index``) or all at ``dirty-rate`` MB/s; 0 lifts the cap, as in QEMU."""
        machine = self._ring_machine()
        index = self._cpu_index(machine, args)
        if not args["dirty-rate"]:
            return self.cancel_vcpu_dirty_limit(args)
        if self.migration.active:
            raise QmpError("a migration is running (it may cap vCPUs itself with the dirty-limit capability); set "
                           "the vCPU dirty limit before or after it")
        self.limit = self._call(lambda: machine.dirty_limit(args["dirty-rate"] * PAGES_PER_MB, index))
        self._limited = machine
        return {}

    def cancel_vcpu_dirty_limit(self, args: dict[str, Any]) -> JsonValue:
        """Lift the cap of one vCPU (``cpu-index``) or all; nothing to lift is fine, as in QEMU."""
        machine = self.vm.machine
        if machine is None:
            return {}
        index = self._cpu_index(machine, args)
        if self._controller(machine) is not None:
            self._call(lambda: machine.dirty_limit(None, index))
        return {}

    def query_vcpu_dirty_limit(self, args: dict[str, Any]) -> JsonValue:
        """Each vCPU's cap and measured rate in MB/s; [] while no cap is set, as in QEMU."""
        machine = self.vm.machine
        controller = None if machine is None else self._controller(machine)
        if controller is None or not controller.limiter.active:
            return []
        return [{"cpu-index": entry.cpu_index, "limit-rate": round((entry.limit_rate or 0) / PAGES_PER_MB),
                 "current-rate": round(entry.current_rate / PAGES_PER_MB)} for entry in controller.query()]

    # --- helpers ----------------------------------------------------------------------------------

    def _running_machine(self, command: str) -> Machine:
        machine = self.vm.machine
        if machine is None or machine.state not in (State.RUNNING, State.PAUSED):
            raise QmpError(f"{command} needs a VM here; this monitor has none running ({self.vm.state})")
        return machine

    def _ring_machine(self) -> Machine:
        machine = self._running_machine("set-vcpu-dirty-limit")
        if machine.vm.dirty_ring_bytes == 0:
            raise QmpError("dirty page limit feature requires KVM with accelerator property 'dirty-ring-size' set "
                           "(start dirtylog with --dirty-ring)")
        return machine

    @staticmethod
    def _cpu_index(machine: Machine, args: dict[str, Any]) -> int | None:
        index = args.get("cpu-index")
        if index is not None and not 0 <= index < machine.spec.vcpus:
            raise QmpError("incorrect cpu index specified")
        return index if index is None else int(index)

    def _controller(self, machine: Machine) -> DirtyLimitController | None:
        """The limit this monitor set on ``machine`` (a migrated-in machine starts with none)."""
        return self.limit if self._limited is machine else None

    @staticmethod
    def _call(action: Callable[[], DirtyLimitController]) -> DirtyLimitController:
        try:
            return action()
        except DirtylogError as error:
            raise QmpError(str(error)) from None
