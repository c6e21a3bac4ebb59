"""The QMP wire protocol, server side, as a state machine with no I/O (in the manner of h11).

Theory of operation (``docs/interop/qmp-spec.rst`` in QEMU):

* On connect the server sends a **greeting** ``{"QMP": {"version": ..., "capabilities": [...]}}`` and
  the session is in **capabilities negotiation** mode: only ``qmp_capabilities`` runs, every other
  command is answered ``CommandNotFound`` ("Expecting capabilities negotiation with
  'qmp_capabilities'"), and no events are delivered. A successful ``qmp_capabilities`` switches the
  session to **command** mode for good.
* Input is a stream of JSON values (:mod:`dirtylog.control.json_stream` finds where each ends). A value
  that is not a well-formed request gets an error answer at once: broken JSON ("JSON parse error, ...",
  never with an ``id``: it could not be read), a non-object ("QMP input must be a JSON object"), an
  unknown member ("QMP input member 'x' is unexpected"), a missing ``execute``. A well-formed one
  becomes a :class:`Request` for the dispatcher.
* Every answer echoes the request's ``id`` when it had one (any JSON value). Output is one JSON object
  per line, ASCII only, ended by CRLF.
* **Events** carry ``{"seconds", "microseconds"}`` since the epoch; they are dropped for a session
  still negotiating.

The transport feeds bytes with :meth:`QmpConnection.receive_data` and writes what the ``answer`` /
``event`` / ``greeting`` methods return; nothing here blocks or touches a socket.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Final

from dirtylog.control.errors import ErrorClass, QmpError
from dirtylog.control.json_stream import MAX_MESSAGE_BYTES, JsonError, JsonStreamer, JsonValue


class _NoId:
    """The request had no ``id`` (distinct from ``"id": null``, which is echoed)."""

    def __repr__(self) -> str:
        return "NO_ID"


NO_ID: Final = _NoId()


@dataclass(frozen=True)
class Request:
    """A well-formed ``{"execute": name, "arguments": {...}, "id": ...}``."""

    command: str
    arguments: dict[str, Any]
    id: JsonValue | _NoId = NO_ID


@dataclass(frozen=True)
class Refusal:
    """Input answered with an error before any command runs (bad JSON, not a request)."""

    error: QmpError
    id: JsonValue | _NoId = NO_ID


def encode(message: dict[str, Any]) -> bytes:
    """One QMP message on the wire: JSON, ASCII only (QEMU's output encoding), CRLF-terminated."""
    try:
        text = json.dumps(message, ensure_ascii=True, allow_nan=False)
    except RecursionError:  # an ``id`` nested ~1000 deep (the input limit is 1024): echo it all the same
        text = _encode_deep(message)
    return text.encode("ascii") + b"\r\n"


def _encode_deep(value: Any) -> str:
    """json.dumps without recursion, for values nested deeper than Python's recursion limit."""
    out: list[str] = []
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, _Text):
            out.append(item)
        elif isinstance(item, dict):
            stack.append(_Text("}"))
            for index, (key, member) in reversed(list(enumerate(item.items()))):
                stack += [member, _Text(json.dumps(str(key)) + ": ")]
                if index:
                    stack.append(_Text(", "))
            stack.append(_Text("{"))
        elif isinstance(item, list):
            stack.append(_Text("]"))
            for index, member in reversed(list(enumerate(item))):
                stack.append(member)
                if index:
                    stack.append(_Text(", "))
            stack.append(_Text("["))
        else:
            out.append(json.dumps(item, ensure_ascii=True, allow_nan=False))
    return "".join(out)


class _Text(str):
    """Already-encoded JSON text on :func:`_encode_deep`'s stack."""


def check_request(value: JsonValue) -> Request | Refusal:
    """A parsed JSON value as a request, or the refusal QEMU's ``qmp_dispatch`` gives it."""
    if not isinstance(value, dict):
        return Refusal(QmpError("QMP input must be a JSON object"))
    request_id = value.get("id", NO_ID)
    for key, member in value.items():
        if key == "execute":
            if not isinstance(member, str):
                return Refusal(QmpError("QMP input member 'execute' must be a string"), request_id)
        elif key == "arguments":
            if not isinstance(member, dict):
                return Refusal(QmpError("QMP input member 'arguments' must be an object"), request_id)
        elif key == "exec-oob":
            # Out-of-band execution is a capability this server does not offer, so, as QEMU does when
            # it is not enabled, the member is just not part of the language.
            return Refusal(QmpError("QMP input member 'exec-oob' is unexpected"), request_id)
        elif key != "id":
            return Refusal(QmpError(f"QMP input member '{key}' is unexpected"), request_id)
    if "execute" not in value:
        return Refusal(QmpError("QMP input lacks member 'execute'"), request_id)
    return Request(value["execute"], value.get("arguments", {}), request_id)


class QmpConnection:
    """One client's QMP session, server side."""

    def __init__(self, version: dict[str, Any], capabilities: tuple[str, ...] = (), *,
                 max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.version = version
        self.capabilities = capabilities
        self.negotiated = False
        self._streamer = JsonStreamer(max_bytes=max_message_bytes)

    def greeting(self) -> bytes:
        return encode({"QMP": {"version": self.version, "capabilities": list(self.capabilities)}})

    def receive_data(self, data: bytes) -> list[Request | Refusal]:
        """Feed bytes from the client; returns the requests (and refusals) they complete, in order."""
        out: list[Request | Refusal] = []
        for value in self._streamer.feed(data):
            if isinstance(value, JsonError):
                out.append(Refusal(QmpError(value.message)))  # no id: the message could not be read
            else:
                out.append(check_request(value))
        return out

    def negotiate(self) -> None:
        """``qmp_capabilities`` succeeded: from now on commands run and events are delivered."""
        self.negotiated = True

    def answer(self, request_id: JsonValue | _NoId, result: JsonValue | QmpError) -> bytes:
        """The success (``return``) or error answer to a request."""
        message: dict[str, Any]
        if isinstance(result, QmpError):
            message = {"error": {"class": str(result.error_class), "desc": result.desc}}
        else:
            message = {"return": result}
        if not isinstance(request_id, _NoId):
            message["id"] = request_id
        return encode(message)

    def event(self, event: Event) -> bytes:
        """An event for this session, or nothing while it is still negotiating."""
        return event.encoded if self.negotiated else b""


@dataclass(frozen=True)
class Event:
    """An asynchronous event, timestamped when it happened."""

    name: str
    data: dict[str, Any] | None = None
    timestamp: float = 0.0

    @classmethod
    def now(cls, name: str, data: dict[str, Any] | None = None) -> Event:
        return cls(name, data, time.time())

    @property
    def encoded(self) -> bytes:
        seconds = int(self.timestamp)
        message: dict[str, Any] = {"event": self.name}
        if self.data is not None:
            message["data"] = self.data
        message["timestamp"] = {"seconds": seconds, "microseconds": int((self.timestamp - seconds) * 1e6)}
        return encode(message)


__all__ = ["NO_ID", "ErrorClass", "Event", "QmpConnection", "QmpError", "Refusal", "Request", "check_request",
           "encode"]
