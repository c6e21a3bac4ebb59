"""The peer of a stream written to a file: an in-process destination that answers and records nothing more.

A file cannot answer the source's handshake, Header, Complete or Commit. This channel wraps the file: what
the source sends is written to the file and fed to a sans-io DestinationConnection that uses the file's
nonce, and that connection's answers — CHALLENGE, Ready, Verified, Resumed — are what the source reads
back. It checks every frame as a destination would (MACs, rules), so a source never records a stream that
a destination would refuse. It verifies no memory (it holds none): the destination that loads the file
does, from the recorded digest. The file is kept only if the conversation reached its end.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from dirtylog.migration.protocol.connection import DestinationConnection
from dirtylog.migration.protocol.events import NEED_DATA, Commit, Complete, Header, Hello, Ready, Resumed, Verified
from dirtylog.migration.protocol.rules import Phase
from dirtylog.migration.transports.files import FileWriter


class RecordingPeer:
    """A Channel to a file whose answers come from an in-process destination connection."""

    live = False

    def __init__(self, writer: FileWriter, key: bytes) -> None:
        self.writer = writer
        self.peer = writer.peer
        self.local = writer.local
        self.replay_nonce = writer.replay_nonce
        self._conn = DestinationConnection(key, nonce=writer.replay_nonce)
        self._answers = bytearray()
        self._ready = threading.Condition()
        self._timeout: float | None = None

    def send(self, buffers: Sequence[bytes | memoryview]) -> None:
        self.writer.send(buffers)
        answers: list[bytes | memoryview] = []
        for buffer in buffers:
            self._conn.receive_data(buffer)
        while (event := self._conn.next_event()) is not NEED_DATA:
            if isinstance(event, Hello):
                answers += self._conn.accept()
            elif isinstance(event, Header):
                answers += self._conn.send(Ready())
            elif isinstance(event, Complete):
                answers += self._conn.send(Verified(event.digest))
            elif isinstance(event, Commit):
                answers += self._conn.send(Resumed())
        if answers:
            with self._ready:
                for answer in answers:
                    self._answers += answer
                self._ready.notify_all()

    def recv_into(self, view: memoryview) -> int:
        with self._ready:
            if not self._answers:
                if self._conn.phase is Phase.DONE:
                    return 0  # everything said: the peer's end of stream
                if not self._ready.wait_for(lambda: bool(self._answers), self._timeout):
                    raise TimeoutError("the recording peer has nothing to say yet")
            count = min(len(view), len(self._answers))
            view[:count] = self._answers[:count]
            del self._answers[:count]
            return count

    def settimeout(self, seconds: float | None) -> None:
        self._timeout = seconds

    def shutdown_write(self) -> None:
        pass

    def close(self) -> None:
        """Keep the file if the stream reached its end (Resumed sent), else discard it."""
        if self._conn.phase is Phase.DONE:
            self.writer.commit()
        else:
            self.writer.close()
