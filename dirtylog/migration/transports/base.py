"""How migration bytes travel: one small interface over TCP, Unix sockets and files.

A :class:`Channel` is a connected byte stream to the peer; a :class:`ChannelListener` hands them out. The
engine sees nothing else of the transport, and the protocol (``migration.protocol``) sees only bytes.
Addresses are URIs, as QEMU writes them::

    host:port, tcp:host:port   TCP; a listener binds to loopback unless a host is named
    unix:PATH                  a Unix socket; the listener creates it mode 0600
    file:PATH                  a file: the source writes the stream, the destination reads it back
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

from dirtylog.migration.errors import MigrationError

Scheme = Literal["tcp", "unix", "file"]
SCHEMES: tuple[Scheme, ...] = ("tcp", "unix", "file")


class ListenerExhaustedError(MigrationError):
    """No connection can come any more (a file holds one stream, and it was taken)."""


class Channel(Protocol):
    """A connected, ordered byte stream to the peer."""

    #: The peer's address, for messages.
    peer: str
    #: True when the peer can take the VM over (a live destination); False for a file, which only records.
    live: bool
    #: True when the bytes never leave this host (loopback TCP, a Unix socket); a file is not local: it rests
    #: on a disk. Streams that are not local are encrypted by default.
    local: bool
    #: The destination nonce the stream was recorded with, when replaying a recorded stream (a file).
    replay_nonce: bytes | None

    def send(self, buffers: Sequence[bytes | memoryview]) -> None:
        """Write all of ``buffers`` in order; OSError when the peer is gone."""
        ...

    def recv_into(self, view: memoryview) -> int:
        """Read at most ``len(view)`` bytes into ``view``; 0 at the peer's end of stream; TimeoutError when
        nothing came within the timeout."""
        ...

    def settimeout(self, seconds: float | None) -> None:
        """Bound each later send and receive."""
        ...

    def shutdown_write(self) -> None:
        """Nothing more goes out (the peer reads an end of stream after what was sent)."""
        ...

    def close(self) -> None:
        """Release the channel (idempotent)."""
        ...


class ChannelListener(Protocol):
    """Where a destination waits for sources."""

    #: The address to give sources (with the port the kernel chose, for ``:0``).
    address: str

    def accept(self, timeout: float | None) -> Channel:
        """The next source's channel; TimeoutError when none came in time, ListenerExhaustedError when none
        ever will."""
        ...

    def close(self) -> None:
        ...


@dataclass(frozen=True)
class Endpoint:
    """A parsed address: ``scheme`` and, for TCP, ``host``/``port``, else ``path``."""

    scheme: Scheme
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"{host}:{self.port}"
        return f"{self.scheme}:{self.path}"


DEFAULT_HOST = "127.0.0.1"


def parse_endpoint(text: str, *, default_host: str = DEFAULT_HOST) -> Endpoint:
    """``host:port``, ``tcp:host:port``, ``[v6]:port``, ``:port``, ``unix:PATH`` or ``file:PATH``."""
    scheme, sep, rest = text.partition(":")
    if sep and scheme in ("unix", "file"):
        if not rest:
            raise MigrationError(f"address {text!r} names no path; write {scheme}:/path/to/{scheme}")
        return Endpoint("unix" if scheme == "unix" else "file", path=rest)
    if sep and scheme == "tcp":
        text = rest
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or default_host
    try:
        number = int(port)
    except ValueError:
        raise MigrationError(f"address {text!r} has no port number; write host:port (e.g. 127.0.0.1:7000), "
                             "unix:PATH or file:PATH") from None
    if not 0 <= number <= 65535:
        raise MigrationError(f"port {number} in {text!r} is out of range 0..65535")
    return Endpoint("tcp", host=host, port=number)
