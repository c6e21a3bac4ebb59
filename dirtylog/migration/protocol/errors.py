"""Errors of the migration stream: ours (Local) or the peer's (Remote), h11 style.

Every error leaves the connection in the ERROR phase. Errors the connection raises carry ``reply``: the
bytes that tell the peer why (an authenticated Abort frame, or a REJECT record during the handshake), so
the transport can send them, best effort, before it closes the socket instead of leaving the peer with a
bare EOF.
"""

from __future__ import annotations

from dirtylog.errors import DirtylogError


class ProtocolError(DirtylogError):
    """The migration stream cannot go on; the message says what was wrong and what to do."""

    #: Buffers to send the peer before closing (possibly empty); set by the connection.
    reply: tuple[bytes, ...] = ()


class LocalProtocolError(ProtocolError):
    """We tried something the protocol forbids in our current phase, or an event we built is invalid."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that are corrupt, unexpected in this phase, or invalid."""


class AuthenticationError(RemoteProtocolError):
    """The peer does not hold our key, or a frame's MAC does not verify (corrupted or tampered with)."""


class ReplayError(RemoteProtocolError):
    """An authentic frame arrived out of sequence: replayed, dropped or reordered."""


class VersionMismatchError(RemoteProtocolError):
    """The peer speaks another version of the migration stream."""


class HeaderMismatchError(RemoteProtocolError):
    """The source's memory layout or page size differs from what this destination was set up for."""


class TruncatedStreamError(RemoteProtocolError):
    """The peer closed the connection before the migration stream reached a clean end."""
