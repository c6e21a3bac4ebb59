"""A stream whose connection the peer has just ended: the sender learns it as a MigrationError (a broken link the
engine can pause on and resume), even before the reader has recorded the failure; a send out of its place stays
the bug it is."""

from __future__ import annotations

import socket

import numpy as np
import pytest

from dirtylog.migration.engine.streams import Stream
from dirtylog.migration.errors import MigrationError
from dirtylog.migration.payload.postcopy import make_postcopy_pages
from dirtylog.migration.protocol.connection import Connection
from dirtylog.migration.protocol.errors import LocalProtocolError
from dirtylog.migration.protocol.events import Abort, AbortCode, PostcopyPages, Ready
from dirtylog.migration.protocol.rules import Phase
from dirtylog.migration.transports.sockets import SocketChannel
from tests.migration.protocol.test_postcopy_stream import MEMORY, PAGE, collect, switched


def stream_of(source: Connection) -> tuple[Stream, socket.socket]:
    ours, theirs = socket.socketpair()
    return Stream(0, SocketChannel(ours, "destination"), source), theirs


def pushed_pages() -> PostcopyPages:
    return make_postcopy_pages(np.array([5], dtype=np.uint64), np.array([1], dtype=np.uint64), MEMORY[5:6],
                               np.zeros(1, dtype=np.uint64), requested=False, page_size=PAGE)


def test_a_send_after_the_peers_abort_is_a_migration_error_not_a_protocol_bug() -> None:
    pair = switched()
    collect(pair.src, pair.dst.send(Abort("frame 42 failed authentication", AbortCode.AUTHENTICATION)))
    assert pair.src.phase is Phase.ERROR
    stream, peer = stream_of(pair.src)
    assert stream.failure is None  # the reader thread has not said so yet: the race the engine met
    with pytest.raises(MigrationError, match="aborted by the destination: frame 42 failed authentication"):
        stream.send(pushed_pages())
    peer.close()
    stream.channel.close()


def test_a_send_out_of_its_place_stays_a_protocol_error() -> None:
    stream, peer = stream_of(switched().src)
    with pytest.raises(LocalProtocolError):
        stream.send(Ready())  # the destination's event, sent by the source: our bug
    peer.close()
    stream.channel.close()
