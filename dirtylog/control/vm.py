"""The machine as QMP sees it: QEMU's run states, ``query-status`` / ``stop`` / ``cont`` / ``quit``,
``query-version``, and the ``STOP`` / ``RESUME`` events those transitions cause.

dirtylog's :class:`~dirtylog.machine.Machine` knows created / running / paused / stopped; QMP clients
know QEMU's ``RunState`` (``qapi/run-state.json``), which also says *why* a VM is not running: paused by
``stop``, ``finish-migrate`` while a migration's switch-over holds it, ``postmigrate`` after another
host took it over, ``inmigrate`` while a destination waits for its memory, ``internal-error`` after a
guest crash. :class:`VmControl` keeps that state next to the machine and changes it only with the
machine, under one lock, so ``query-status`` never disagrees with the events already sent.
"""

from __future__ import annotations

import enum
import threading
from collections.abc import Callable
from typing import Any

from dirtylog import __version__
from dirtylog.control.commands import CommandTable
from dirtylog.control.errors import QmpError
from dirtylog.control.json_stream import JsonValue
from dirtylog.control.protocol import Event
from dirtylog.errors import DirtylogError
from dirtylog.guest.machine import State
from dirtylog.machine import Machine

EventSink = Callable[[Event], None]

#: Why a command that needs the VM's dirty log cannot have it, and what frees it.
DIRTY_LOG_IN_USE = ("the VM's dirty log is in use (a vCPU dirty limit, a dirty-rate measurement, or the snapshot chain "
                    "that snapshot-save keeps): cancel-vcpu-dirty-limit, wait for query-dirty-rate to say measured, "
                    "or x-dirtylog-end-snapshot-chain")


class RunState(enum.StrEnum):
    """The members of QEMU's RunState that a dirtylog machine can be in."""

    INMIGRATE = "inmigrate"
    INTERNAL_ERROR = "internal-error"
    PAUSED = "paused"
    POSTMIGRATE = "postmigrate"
    PRELAUNCH = "prelaunch"
    FINISH_MIGRATE = "finish-migrate"
    RUNNING = "running"
    SHUTDOWN = "shutdown"


class ShutdownCause(enum.StrEnum):
    """QEMU's ShutdownCause values a dirtylog monitor reports."""

    HOST_QMP_QUIT = "host-qmp-quit"
    HOST_SIGNAL = "host-signal"
    HOST_ERROR = "host-error"


def version_info() -> dict[str, Any]:
    """QEMU's VersionInfo, filled with dirtylog's own version (the ``qemu`` member is what QMP clients read)."""
    parts = [int(p) for p in [*__version__.split("."), "0", "0"][:3]]
    return {"qemu": {"major": parts[0], "minor": parts[1], "micro": parts[2]}, "package": f"dirtylog {__version__}"}


class VmControl:
    """Run state and lifecycle commands of one machine (or of a destination still waiting for one)."""

    def __init__(self, machine: Machine | None, emit: EventSink, *, incoming: bool = False) -> None:
        self.machine = machine
        self.emit = emit
        self.lock = threading.RLock()
        self.autostart = True  # what an incoming VM does when its migration completes (QEMU: -S, stop, cont)
        self.busy = ""  # why stop/cont are refused right now (an outgoing migration owns the vCPUs)
        self.on_shutdown: Callable[[ShutdownCause], None] = lambda cause: None
        if incoming:
            self.state = RunState.INMIGRATE
        elif machine is not None and machine.state is State.RUNNING:
            self.state = RunState.RUNNING
        elif machine is not None and machine.state is State.PAUSED:
            self.state = RunState.PAUSED
        else:
            self.state = RunState.PRELAUNCH

    def register(self, table: CommandTable) -> None:
        table.add("query-status", self.query_status)
        table.add("query-version", self.query_version)
        table.add("stop", self.stop)
        table.add("cont", self.cont)
        table.add("quit", self.quit)
        table.add("x-dirtylog-query-progress", self.query_progress)

    # --- commands -----------------------------------------------------------------------------------

    def query_status(self, args: dict[str, Any]) -> JsonValue:
        """Whether the vCPUs run, and QEMU's run state."""
        with self.lock:
            self.poll()
            return {"running": self.state is RunState.RUNNING, "status": str(self.state)}

    def query_version(self, args: dict[str, Any]) -> JsonValue:
        """dirtylog's version, in QEMU's VersionInfo shape."""
        return version_info()

    def stop(self, args: dict[str, Any]) -> JsonValue:
        """Pause every vCPU (STOP event); on a waiting destination, do not start the VM when it arrives."""
        with self.lock:
            if self.state is RunState.INMIGRATE:
                self.autostart = False
                return {}
            self._refuse_if_busy("stop")
            if self.state is not RunState.RUNNING:
                return {}  # QEMU's vm_stop of a stopped VM changes nothing and says nothing
            self._machine_call(self._machine().pause)
            self._set(RunState.PAUSED, "STOP")
            return {}

    def cont(self, args: dict[str, Any]) -> JsonValue:
        """Resume the vCPUs (RESUME event); on a waiting destination, start the VM when it arrives."""
        with self.lock:
            if self.state is RunState.INMIGRATE:
                self.autostart = True
                return {}
            if self.state is RunState.FINISH_MIGRATE:
                raise QmpError("Migration is not finalized yet")
            if self.state is RunState.INTERNAL_ERROR:
                raise QmpError("Resetting the Virtual Machine is required (the guest crashed: "
                               f"{self._crash_summary()})")
            self._refuse_if_busy("cont")
            if self.state is RunState.RUNNING:
                return {}
            self._machine_call(self._machine().resume)
            self._set(RunState.RUNNING, "RESUME")
            return {}

    def quit(self, args: dict[str, Any]) -> JsonValue:
        """End the VM and the process: the answer goes out first, then the SHUTDOWN event."""
        self.on_shutdown(ShutdownCause.HOST_QMP_QUIT)
        return {}

    def query_progress(self, args: dict[str, Any]) -> JsonValue:
        """dirtylog's guest counters: pages written (in all and per vCPU) and completed iterations."""
        with self.lock:
            machine = self._machine()
            if machine.state is State.STOPPED:
                raise QmpError("the VM is stopped: its memory is gone")
            return {"progress": machine.progress, "vcpu-progress": machine.vcpu_progress,
                    "iterations": machine.iterations}

    # --- transitions other components cause -------------------------------------------------------

    def transition(self, state: RunState, event: str | None = None) -> None:
        """Enter ``state`` (a migration paused, resumed or handed off the VM), emitting ``event`` if given."""
        with self.lock:
            self._set(state, event)

    def poll(self) -> None:
        """Notice a guest crash: QEMU's internal-error, with a STOP event (the server calls this periodically)."""
        with self.lock:
            machine = self.machine
            if machine is not None and machine.crash is not None and self.state is RunState.RUNNING:
                self._set(RunState.INTERNAL_ERROR, "STOP")

    # --- helpers ----------------------------------------------------------------------------------

    def _set(self, state: RunState, event: str | None) -> None:
        self.state = state
        if event is not None:
            self.emit(Event.now(event))

    def _machine(self) -> Machine:
        if self.machine is None:
            raise QmpError("there is no VM yet: this destination waits for an incoming migration")
        return self.machine

    def _refuse_if_busy(self, command: str) -> None:
        if self.busy:
            raise QmpError(f"{command} is refused while {self.busy}")

    @staticmethod
    def _machine_call(action: Callable[[], None]) -> None:
        try:
            action()
        except DirtylogError as error:
            raise QmpError(str(error)) from None

    def _crash_summary(self) -> str:
        crash = self.machine.crash if self.machine is not None else None
        return f"vCPU {crash.vcpu} stopped with {crash.exit}" if crash is not None else "unknown"
