"""A QMP monitor for one machine: the command table, the server, and an orderly end.

``Monitor(address, machine=m)`` serves a running machine (``dirtylog run --qmp``);
``Monitor(address, machine=None, incoming=True)`` serves a destination that waits for
``migrate-incoming`` (``dirtylog receive --qmp``, QEMU's ``-incoming defer``). The process that owns the
monitor calls :meth:`Monitor.wait` on its main thread: it returns when a client sent ``quit``, a
signal arrived (SIGINT, SIGTERM: QEMU's ``host-signal``) or an incoming migration failed with
``exit-on-error``; then :meth:`Monitor.close` cancels what runs, says SHUTDOWN and stops the machine.

Each tool adds its commands with one ``table.add(...)`` each (``vm``, ``migration``, ``rate``; snapshots
will be one more ``register``).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

from dirtylog.control.commands import CommandTable, Dispatcher
from dirtylog.control.json_stream import MAX_MESSAGE_BYTES
from dirtylog.control.migration import MigrationControl
from dirtylog.control.protocol import Event
from dirtylog.control.rate import RateControl
from dirtylog.control.server import QmpServer
from dirtylog.control.vm import ShutdownCause, VmControl, version_info
from dirtylog.guest.vcpus import install_kick_handler
from dirtylog.machine import Machine


class Monitor:
    """QMP for one machine; see the module docstring for the lifecycle."""

    def __init__(self, address: str, *, machine: Machine | None, incoming: bool = False, key_file: str | None = None,
                 incoming_memory: int | None = None, incoming_max_memory: int | None = None, io_timeout: float = 30.0,
                 handshake_timeout: float = 5.0, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        if incoming and threading.current_thread() is threading.main_thread():
            # The incoming VM is built on the incoming thread; vCPU kicks need their signal handler, which
            # only the main thread may install (a Machine built here would do it too).
            install_kick_handler()
        self.table = CommandTable()
        self.dispatcher = Dispatcher(self.table)
        self.server = QmpServer(address, self.dispatcher, version_info(), max_message_bytes=max_message_bytes)
        self.vm = VmControl(machine, self.server.broadcast, incoming=incoming)
        self.vm.on_shutdown = self.request_shutdown
        self.server.on_tick = self.vm.poll
        self.migration = MigrationControl(self.vm, self.server.broadcast, key_file=key_file,
                                          incoming_memory=incoming_memory, incoming_max_memory=incoming_max_memory,
                                          io_timeout=io_timeout, handshake_timeout=handshake_timeout,
                                          on_incoming_failure=self._incoming_failed)
        self.rate = RateControl(self.vm, self.migration)
        self.vm.register(self.table)
        self.migration.register(self.table)
        self.rate.register(self.table)
        self.cause: ShutdownCause | None = None
        self.exit_code = 0
        self.failure: str | None = None  # why the incoming migration failed, when that ended the monitor
        self._shutdown = threading.Event()
        self._lock = threading.Lock()

    @property
    def address(self) -> str:
        return str(self.server.address)

    def start(self) -> None:
        self.server.start()

    def request_shutdown(self, cause: ShutdownCause | None, exit_code: int = 0) -> None:
        """End the monitor (from any thread): SHUTDOWN goes to every client unless ``cause`` is None."""
        with self._lock:
            if self._shutdown.is_set():
                return
            self.cause, self.exit_code = cause, exit_code
            self._shutdown.set()
        final = None if cause is None else Event.now("SHUTDOWN", {"guest": False, "reason": str(cause)})
        self.server.close(final)

    def _incoming_failed(self, error: str) -> None:
        # QEMU's -incoming ends the process when the load fails; its reason must not end with it.
        self.failure = error
        self.request_shutdown(None, exit_code=1)

    def wait(self) -> int:
        """Block until the monitor should end (call from the main thread: it handles SIGINT and SIGTERM);
        returns the process exit status."""
        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.request_shutdown(ShutdownCause.HOST_SIGNAL)

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while not self._shutdown.wait(0.2):
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.exit_code

    def close(self) -> None:
        """Cancel migrations, finish the server (SHUTDOWN delivered), and stop the machine."""
        self.migration.close()
        self.rate.close()
        if not self._shutdown.is_set():
            self.request_shutdown(None)
        self.server.closed.wait(5.0)
        self.server.join(1.0)
        with self.vm.lock:
            machine = self.vm.machine
            self.vm.machine = None
        if machine is not None:
            machine.stop()
