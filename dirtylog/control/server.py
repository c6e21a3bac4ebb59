"""The QMP server's transport: a listening socket, many clients, one thread, no protocol logic.

Everything QMP-shaped lives in :mod:`~dirtylog.control.protocol` (one :class:`QmpConnection` per client)
and :mod:`~dirtylog.control.commands`; this module moves bytes with a selector loop. Events from other
threads (a migration's progress) go through a queue and a wake-up socket, and are written to every
negotiated client before the answer of any command run after them — so the STOP of a ``stop`` precedes
its ``{"return": {}}``, as in QEMU.

QMP has no authentication: whoever can connect can stop, migrate or end the VM. So ``unix:PATH``
sockets are created mode 0600 (bound in a private directory, then renamed into place: no window where
others could connect), and ``tcp:`` addresses must be loopback.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import queue
import selectors
import socket
import stat
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from dirtylog.control.commands import Dispatcher
from dirtylog.control.errors import ControlError, QmpError, report_internal_error
from dirtylog.control.json_stream import MAX_MESSAGE_BYTES
from dirtylog.control.protocol import Event, QmpConnection, Refusal

RECV_BYTES = 1 << 16
MAX_OUTPUT_BYTES = 64 << 20  # a client that lets this much pile up unread is dropped
TICK_SECONDS = 0.25  # how often on_tick runs (guest-crash detection)
FLUSH_SECONDS = 1.0  # how long a closing server tries to deliver what it still holds


@dataclass(frozen=True)
class Address:
    """Where a QMP server listens: ``unix:PATH`` or ``tcp:HOST:PORT``."""

    kind: str  # "unix" or "tcp"
    path: str = ""
    host: str = ""
    port: int = 0

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.kind == "unix" else f"tcp:{self.host}:{self.port}"


def parse_address(text: str, *, loopback_only: bool = True) -> Address:
    """``unix:PATH`` or ``tcp:HOST:PORT`` (QEMU's chardev spelling); a bare path means ``unix:``."""
    if text.startswith("tcp:"):
        host, sep, port = text[4:].rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise ControlError(f"QMP address {text!r} is not tcp:HOST:PORT, e.g. tcp:127.0.0.1:4444")
        if loopback_only and not _is_loopback(host):
            raise ControlError(f"QMP address {text!r} is not loopback: QMP has no authentication, so anyone who "
                               "reaches the socket controls the VM. Use tcp:127.0.0.1:PORT or unix:PATH")
        return Address("tcp", host=host, port=int(port))
    path = text[5:] if text.startswith("unix:") else text
    if not path or ("," in path and text.startswith("unix:")):
        raise ControlError(f"QMP address {text!r} has no socket path; write unix:/path/to/vm.sock "
                           "(chardev options such as ',server=on' are implied here)")
    return Address("unix", path=path)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class _Client:
    sock: socket.socket
    connection: QmpConnection
    output: bytearray = field(default_factory=bytearray)


class QmpServer:
    """Serves QMP on ``address`` from a thread of its own (:meth:`start`); :meth:`close` ends it."""

    def __init__(self, address: str | Address, dispatcher: Dispatcher, version: dict[str, object], *,
                 max_message_bytes: int = MAX_MESSAGE_BYTES, on_tick: Callable[[], None] | None = None) -> None:
        self.address = address if isinstance(address, Address) else parse_address(address)
        self.dispatcher = dispatcher
        self.version = version
        self.max_message_bytes = max_message_bytes
        self.on_tick = on_tick
        self._events: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._clients: dict[int, _Client] = {}
        self._closing = threading.Event()
        self._final: Event | None = None
        self._thread: threading.Thread | None = None
        self.closed = threading.Event()
        self._socket_inode = 0  # of our unix socket file: only that file is removed at the end
        self._listener = self._listen()
        self._wake_read, self._wake_write = socket.socketpair()
        for sock in (self._wake_read, self._wake_write):
            sock.setblocking(False)

    # --- the socket ---------------------------------------------------------------------------------

    def _listen(self) -> socket.socket:
        address = self.address
        if address.kind == "tcp":
            family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((address.host, address.port))
            except OSError as error:
                sock.close()
                raise ControlError(f"cannot listen for QMP on {address}: {error.strerror}") from None
            sock.listen(16)
            self.address = Address("tcp", host=address.host, port=sock.getsockname()[1])
            return sock
        return self._listen_unix(Path(address.path))

    def _listen_unix(self, path: Path) -> socket.socket:
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise ControlError(f"{path} exists and is not a socket; choose another QMP socket path")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                path.unlink()  # a socket nobody serves: left behind by a process that died
            else:
                raise ControlError(f"another process serves QMP on {path}; choose another path")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Bound inside a fresh 0700 directory, made 0600, then renamed into place: at no moment can
            # another user connect, and no process-wide umask is touched.
            private = tempfile.mkdtemp(prefix=".qmp-", dir=path.parent)
            try:
                staging = os.path.join(private, "s")
                sock.bind(staging)
                os.chmod(staging, 0o600)
                self._socket_inode = os.stat(staging).st_ino
                os.rename(staging, path)
            finally:
                os.rmdir(private)
        except OSError as error:
            sock.close()
            raise ControlError(f"cannot create the QMP socket {path}: {error.strerror}") from None
        sock.listen(16)
        return sock

    # --- public, thread-safe --------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._serve, name="qmp-server", daemon=True)
        self._thread.start()

    def broadcast(self, event: Event) -> None:
        """Send ``event`` to every client in command mode (from any thread)."""
        self._events.put(event)
        self._wake()

    def close(self, final_event: Event | None = None) -> None:
        """Stop serving: deliver ``final_event`` (SHUTDOWN) and what is pending, then close (from any thread)."""
        if not self._closing.is_set():
            self._final = final_event
            self._closing.set()
        self._wake()
        if self._thread is None:
            self._shutdown_sockets()
            self.closed.set()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_write.send(b"\0")

    # --- the loop (server thread only) ---------------------------------------------------------

    def _serve(self) -> None:
        selector = selectors.DefaultSelector()
        self._listener.setblocking(False)
        selector.register(self._listener, selectors.EVENT_READ, None)
        selector.register(self._wake_read, selectors.EVENT_READ, None)
        next_tick = time.monotonic() + TICK_SECONDS
        try:
            while not self._closing.is_set():
                self._update_interest(selector)
                for key, mask in selector.select(max(0.0, next_tick - time.monotonic())):
                    if key.fileobj is self._listener:
                        self._accept(selector)
                    elif key.fileobj is self._wake_read:
                        with contextlib.suppress(BlockingIOError):
                            self._wake_read.recv(4096)
                    else:
                        client = self._clients.get(key.fd)
                        if client is None:
                            continue
                        if mask & selectors.EVENT_READ:
                            self._read(selector, client)
                        if mask & selectors.EVENT_WRITE and key.fd in self._clients:
                            self._write(selector, client)
                self._deliver_events()
                if time.monotonic() >= next_tick:
                    next_tick = time.monotonic() + TICK_SECONDS
                    if self.on_tick is not None:
                        try:
                            self.on_tick()
                        except Exception:  # a bug: the monitor goes on
                            report_internal_error("the monitor's periodic check")
            self._deliver_events()
            if self._final is not None:
                self._send_to_all(self._final)
            self._flush_all(selector)
        finally:
            selector.close()
            self._shutdown_sockets()
            self.closed.set()

    def _accept(self, selector: selectors.BaseSelector) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # e.g. too many open files: try again on the next readiness
            sock.setblocking(False)
            connection = QmpConnection(self.version, max_message_bytes=self.max_message_bytes)
            client = _Client(sock, connection, bytearray(connection.greeting()))
            self._clients[sock.fileno()] = client
            selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, None)

    def _read(self, selector: selectors.BaseSelector, client: _Client) -> None:
        try:
            data = client.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(selector, client)
            return
        for item in client.connection.receive_data(data):
            if isinstance(item, Refusal):
                answer = client.connection.answer(item.id, item.error)
            else:
                result = self.dispatcher.dispatch(client.connection, item)
                self._deliver_events()  # what the command caused goes out before its answer
                try:
                    answer = client.connection.answer(item.id, result)
                except ValueError as error:  # a bug: a value JSON cannot carry (NaN, infinity)
                    report_internal_error(f"the answer to {item.command}")
                    answer = client.connection.answer(item.id, QmpError(
                        f"internal error in {item.command}: its answer is not JSON: {error}"))
            client.output += answer
            if self._closing.is_set():
                break  # quit: nothing after it runs

    def _write(self, selector: selectors.BaseSelector, client: _Client) -> None:
        if not client.output:
            return
        try:
            sent = client.sock.send(client.output)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(selector, client)
            return
        del client.output[:sent]

    def _update_interest(self, selector: selectors.BaseSelector) -> None:
        for client in list(self._clients.values()):
            if len(client.output) > MAX_OUTPUT_BYTES:
                self._drop(selector, client)  # it stopped reading; holding more would only grow memory
                continue
            selector.modify(client.sock, selectors.EVENT_READ | (selectors.EVENT_WRITE if client.output else 0), None)

    def _deliver_events(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            self._send_to_all(event)

    def _send_to_all(self, event: Event) -> None:
        try:
            messages = [(client, client.connection.event(event)) for client in self._clients.values()]
        except ValueError:  # a bug: a value JSON cannot carry; that event is lost, not the monitor
            report_internal_error(f"the event {event.name}")
            return
        for client, message in messages:
            client.output += message

    def _flush_all(self, selector: selectors.BaseSelector) -> None:
        deadline = time.monotonic() + FLUSH_SECONDS
        while any(c.output for c in self._clients.values()) and time.monotonic() < deadline:
            for client in list(self._clients.values()):
                self._write(selector, client)
            time.sleep(0.001)

    def _drop(self, selector: selectors.BaseSelector, client: _Client) -> None:
        self._clients.pop(client.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError):
            selector.unregister(client.sock)
        client.sock.close()

    def _shutdown_sockets(self) -> None:
        for client in list(self._clients.values()):
            client.sock.close()
        self._clients.clear()
        self._listener.close()
        if self.address.kind == "unix":
            with contextlib.suppress(OSError):
                if os.lstat(self.address.path).st_ino == self._socket_inode:
                    os.unlink(self.address.path)
        for sock in (self._wake_read, self._wake_write):
            sock.close()
