"""A small blocking QMP client (what ``dirtylog ctl`` speaks): connect, negotiate, execute, read events.

It talks to dirtylog's monitor and to QEMU alike. Server output is parsed with the same streamer as the
server's input, so a message split across reads, or several in one, is handled.
"""

from __future__ import annotations

import collections
import itertools
import socket
import time
from typing import Any

from dirtylog.control.errors import ControlError, ErrorClass, QmpError
from dirtylog.control.json_stream import JsonError, JsonStreamer, JsonValue
from dirtylog.control.protocol import encode


def connect_address(text: str) -> tuple[int, Any]:
    """``unix:PATH``, ``tcp:HOST:PORT``, ``HOST:PORT`` or a path, as (family, sockaddr)."""
    if text.startswith("unix:"):
        return socket.AF_UNIX, text[5:]
    body = text[4:] if text.startswith("tcp:") else text
    host, sep, port = body.rpartition(":")
    if sep and port.isdigit() and (text.startswith("tcp:") or "/" not in body):
        host = host.strip("[]") or "127.0.0.1"
        return (socket.AF_INET6 if ":" in host else socket.AF_INET), (host, int(port))
    return socket.AF_UNIX, text


class QmpClient:
    """One QMP session. ``with QmpClient("unix:/path") as qmp: qmp.execute("query-status")``."""

    def __init__(self, address: str, *, timeout: float = 30.0, negotiate: bool = True) -> None:
        family, target = connect_address(address)
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(target)
        except OSError as error:
            self.sock.close()
            raise ControlError(f"cannot connect to QMP at {address}: {error.strerror or error}; is "
                               "`dirtylog run --qmp ...` (or QEMU with -qmp) running there?") from None
        self._streamer = JsonStreamer()
        self._inbox: collections.deque[dict[str, Any]] = collections.deque()
        self.events: collections.deque[dict[str, Any]] = collections.deque()
        self._ids = itertools.count(1)
        greeting = self._next_message()
        if "QMP" not in greeting:
            raise ControlError(f"{address} did not greet with QMP: {greeting}")
        self.greeting: dict[str, Any] = greeting["QMP"]
        if negotiate:
            self.execute("qmp_capabilities")

    def __enter__(self) -> QmpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> JsonValue:
        """Run ``command``; its ``return`` value, or QmpError with the server's class and description."""
        request_id = f"dirtylog-{next(self._ids)}"
        message: dict[str, Any] = {"execute": command, "id": request_id}
        if arguments:
            message["arguments"] = arguments
        self.sock.sendall(encode(message))
        while True:
            reply = self._next_message()
            if "event" in reply:
                self.events.append(reply)
                continue
            if reply.get("id") != request_id:
                if "error" in reply and "id" not in reply:
                    raise QmpError(reply["error"].get("desc", "error"), _error_class(reply["error"]))
                continue  # an answer to someone else's id: QMP says drop it
            if "error" in reply:
                raise QmpError(reply["error"].get("desc", ""), _error_class(reply["error"]))
            return reply.get("return")

    def wait_event(self, timeout: float) -> dict[str, Any] | None:
        """The next event, waiting up to ``timeout`` seconds; None if none came."""
        if self.events:
            return self.events.popleft()
        deadline = time.monotonic() + timeout
        while not self.events:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            message = self._next_message(remaining)
            if message is None:
                return None
            if "event" in message:
                self.events.append(message)
        return self.events.popleft()

    def _next_message(self, timeout: float | None = None) -> Any:
        previous = self.sock.gettimeout()
        if timeout is not None:
            self.sock.settimeout(timeout)
        try:
            while not self._inbox:
                try:
                    data = self.sock.recv(1 << 16)
                except TimeoutError:
                    if timeout is not None:
                        return None
                    raise ControlError("the QMP server stopped answering") from None
                if not data:
                    raise ControlError("the QMP server closed the connection")
                for value in self._streamer.feed(data):
                    if isinstance(value, JsonError) or not isinstance(value, dict):
                        raise ControlError(f"the QMP server sent something that is not a QMP message: {value}")
                    self._inbox.append(value)
            return self._inbox.popleft()
        finally:
            self.sock.settimeout(previous)


def _error_class(error: dict[str, Any]) -> ErrorClass:
    try:
        return ErrorClass(error.get("class", "GenericError"))
    except ValueError:
        return ErrorClass.GENERIC
