"""Transports of the migration stream: TCP, Unix sockets and files behind one small interface (``base``).

``connect(address)`` gives a source its channel and ``listen(address)`` a destination its listener; the
scheme of the address chooses the transport.
"""

from __future__ import annotations

from dirtylog.migration.transports.base import (
    Channel,
    ChannelListener,
    Endpoint,
    ListenerExhaustedError,
    parse_endpoint,
)
from dirtylog.migration.transports.files import FileListener, FileWriter
from dirtylog.migration.transports.sockets import SocketListener, connect_socket

__all__ = ["Channel", "ChannelListener", "Endpoint", "ListenerExhaustedError", "connect", "listen", "parse_endpoint"]


def connect(endpoint: Endpoint, timeout: float) -> Channel:
    """A channel to ``endpoint`` (for ``file:``, a new file the stream is written to)."""
    if endpoint.scheme == "file":
        return FileWriter(endpoint.path)
    return connect_socket(endpoint, timeout)


def listen(endpoint: Endpoint) -> ChannelListener:
    """A listener at ``endpoint`` (for ``file:``, the stream recorded in that file)."""
    if endpoint.scheme == "file":
        return FileListener(endpoint.path)
    return SocketListener(endpoint)
