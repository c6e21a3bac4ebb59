"""A migration stream in a file (``file:PATH``): the source writes it, a destination loads it later.

The file is a 48-byte head, then exactly the bytes a source sent on its stream::

    magic "DIRTYLOG-FILE" (13 bytes) | version u8 | reserved u16 | destination nonce (32 bytes) | stream

Nobody answers a file, so the source's engine answers itself with a recording peer (see
``engine/recording.py``) whose nonce goes into the head. A loading destination replays the stream with
that nonce: the handshake then verifies as it did when it was written, and every frame's MAC with it, so
a file altered or written with another key is refused like a tampered stream, and the memory digest is
checked before anything runs. The file is written as ``PATH.partial`` and renamed to ``PATH`` only when
the stream is complete, so a failed or cancelled migration never leaves a file that looks whole.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Sequence
from typing import Final

from dirtylog.migration.errors import MigrationError
from dirtylog.migration.transports.base import ListenerExhaustedError

MAGIC: Final = b"DIRTYLOG-FILE"
VERSION: Final = 1
HEAD: Final = struct.Struct("<13sBH32s")
NONCE_SIZE: Final = 32
assert HEAD.size == 48


class FileWriter:
    """The source's end of a file stream: what is sent goes to ``PATH.partial``; ``commit`` names it ``PATH``."""

    live = False
    local = False  # at rest on a disk: encrypted by default

    def __init__(self, path: str) -> None:
        self.path = path
        self.peer = f"file:{path}"
        nonce = os.urandom(NONCE_SIZE)  # the recording peer's, replayed by whoever loads the file
        self.replay_nonce: bytes | None = nonce
        self._partial = f"{path}.partial"
        try:
            # Mode 0600: the file holds a whole VM's memory.
            fd = os.open(self._partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as error:
            raise MigrationError(f"cannot write the migration stream to {self._partial}: {error.strerror}") from None
        self._fd: int | None = fd
        self.send([HEAD.pack(MAGIC, VERSION, 0, nonce)])

    def send(self, buffers: Sequence[bytes | memoryview]) -> None:
        assert self._fd is not None
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        while views:
            written = os.writev(self._fd, views[:512])
            while written:
                if written >= len(views[0]):
                    written -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][written:]
                    written = 0

    def recv_into(self, view: memoryview) -> int:
        raise OSError("a file stream has no reader on the other side")

    def settimeout(self, seconds: float | None) -> None:
        pass

    def shutdown_write(self) -> None:
        pass

    def commit(self) -> None:
        """The stream is whole: flush it to disk and give it its name."""
        assert self._fd is not None
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        os.replace(self._partial, self.path)

    def close(self) -> None:
        """Without ``commit``: discard what was written."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
            with contextlib.suppress(OSError):
                os.unlink(self._partial)


class FileReader:
    """A destination's end of a file stream: the recorded bytes; what it sends goes nowhere."""

    live = False
    local = False

    def __init__(self, path: str) -> None:
        self.peer = f"file:{path}"
        try:
            self._file = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by close())
        except OSError as error:
            raise MigrationError(f"cannot read the migration stream {path}: {error.strerror}") from None
        head = self._file.read(HEAD.size)
        if len(head) < HEAD.size or not head.startswith(MAGIC):
            self._file.close()
            raise MigrationError(f"{path} is not a dirtylog migration stream (no {MAGIC.decode()} head)")
        _, version, _, nonce = HEAD.unpack(head)
        if version != VERSION:
            self._file.close()
            raise MigrationError(f"{path} is a version {version} stream file; this dirtylog reads version {VERSION}")
        self.replay_nonce: bytes | None = nonce

    def send(self, buffers: Sequence[bytes | memoryview]) -> None:
        pass  # the source that wrote the file heard its answers when it wrote it

    def recv_into(self, view: memoryview) -> int:
        return self._file.readinto(view) or 0

    def settimeout(self, seconds: float | None) -> None:
        pass

    def shutdown_write(self) -> None:
        pass

    def close(self) -> None:
        self._file.close()


class FileListener:
    """``listen("file:PATH")``: hands out the one stream the file holds."""

    def __init__(self, path: str) -> None:
        if not os.path.isfile(path):
            raise MigrationError(f"no migration stream file {path}; write one with `dirtylog migrate --to file:{path}`")
        self.path = path
        self.address = f"file:{path}"
        self._taken = False

    def accept(self, timeout: float | None) -> FileReader:
        if self._taken:
            raise ListenerExhaustedError(f"file:{self.path} holds one stream, already read")
        self._taken = True
        return FileReader(self.path)

    def close(self) -> None:
        pass
