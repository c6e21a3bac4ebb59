"""Two connections back to back in memory, for tests of the stream and of the engine built on it."""

from __future__ import annotations

from collections.abc import Iterable

from dirtylog.migration.protocol.connection import Buffers, Connection, DestinationConnection, SourceConnection
from dirtylog.migration.protocol.events import CLOSED, NEED_DATA, Abort, Event, Hello


def join(buffers: Iterable[bytes | memoryview]) -> bytes:
    """The bytes a transport would write for ``buffers``."""
    return b"".join(bytes(b) for b in buffers)


def collect(conn: Connection, data: bytes | Buffers = b"", chunk: int = 0) -> list[Event]:
    """Feed ``data`` to ``conn`` (in ``chunk``-byte pieces if given) and return the events it yields.

    Stops at NEED_DATA or CLOSED, and after a Hello (which must be answered) or an Abort (after which
    the connection is unusable).
    """
    raw = data if isinstance(data, bytes) else join(data)
    step = chunk or len(raw) or 1
    for at in range(0, len(raw), step):
        conn.receive_data(raw[at : at + step])
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if event is NEED_DATA or event is CLOSED:
            return events
        events.append(event)
        if isinstance(event, Hello | Abort):
            return events


def connect(
    key: bytes, source: SourceConnection | None = None, destination: DestinationConnection | None = None
) -> tuple[SourceConnection, DestinationConnection]:
    """A source and a destination through the handshake: the source's next send() carries its AUTH."""
    src = source if source is not None else SourceConnection(key)
    dst = destination if destination is not None else DestinationConnection(key)
    hello = collect(dst, src.initiate())
    assert len(hello) == 1 and isinstance(hello[0], Hello), hello
    accepted = collect(src, dst.accept())
    assert len(accepted) == 1, accepted
    return src, dst
