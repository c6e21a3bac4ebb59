"""Cutting the received byte stream into handshake records and frames, with one copy and bounded memory.

Bytes are copied once, straight into the buffer of the unit they belong to: a frame's header, payload
and MAC land in one array allocated when its header arrives, and the payload is later handed out as a
view of it (never copied again). A length field over the limit is refused before anything is
allocated. Nothing here trusts the bytes beyond their length: MACs, sequence numbers and contents are
checked by the connection, in order, when it takes the unit.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Final, Literal, Protocol

import numpy as np
from numpy.typing import NDArray

from dirtylog.migration.protocol.codec import (
    FRAME_HEADER,
    MAC_SIZE,
    MAGIC,
    MAX_PAYLOAD,
    MAX_RECORD_BODY,
    RECORD_FIRST_BYTE,
    RECORD_PREFIX,
    VERSION,
    frame_name,
)
from dirtylog.migration.protocol.errors import (
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    TruncatedStreamError,
    VersionMismatchError,
)
from dirtylog.migration.protocol.events import BytesLike

PREFIX_SIZE: Final = FRAME_HEADER.size
_VERSION_END: Final = len(MAGIC) + 2
PEEK_SIZE: Final = 32  # payload bytes a Placer sees first (a PAGE_BATCH's fixed head)
PLACE_MIN: Final = 64 << 10  # smaller frames are not worth the extra steps


class Placer(Protocol):
    """Decides where the bulk data of a large frame is received, in two steps, before its MAC is checked.

    The bytes placed are not yet authenticated when they land: place them only where a frame that fails
    its MAC does no harm (the destination's guest memory, which is never resumed unverified).
    """

    def head_size(self, ftype: int, peek: memoryview, length: int) -> int:
        """Payload bytes before the data, given the first PEEK_SIZE of them; 0 to receive the frame whole."""
        ...

    def place(self, ftype: int, head: memoryview, length: int) -> memoryview | None:
        """Where the ``length - len(head)`` data bytes go (a writable byte view of exactly that size), or
        None to receive the frame whole."""
        ...


@dataclass(frozen=True, slots=True)
class Record:
    """A handshake record; ``raw`` (prefix and body) feeds the handshake transcript."""

    type: int
    flags: int
    body: bytes
    raw: bytes


@dataclass(frozen=True, slots=True)
class Frame:
    """A whole frame in its own buffer: 16-byte header, payload, 16-byte MAC.

    A placed frame's data went where its Placer said: ``buffer`` then holds the header, the payload's
    first ``data_at`` bytes, and the MAC at its usual place; ``data`` is the payload's rest.
    """

    buffer: NDArray[np.uint8]
    type: int
    flags: int
    reserved: int
    length: int
    seq: int
    index: int
    data: memoryview | None = None
    data_at: int = 0


class _Eof(enum.Enum):
    EOF = "EOF"


EOF: Final = _Eof.EOF
Unit = Record | Frame | None | Literal[_Eof.EOF]


class FrameReader:
    """Incremental parser: ``feed`` bytes, ``close`` at EOF, ``next_unit`` for complete units in order.

    The first ``records`` units are handshake records; later ones are frames, except that a unit
    starting with the magic's first byte is a (late REJECT) record.
    """

    def __init__(self, peer: str, records: int) -> None:
        self.peer = peer
        self.placer: Placer | None = None  # set once the receiver knows where data may go
        self.bytes_received = 0
        self._records_left = records
        self._frames = 0
        self._units: deque[Record | Frame] = deque()
        self._error: ProtocolError | None = None
        self._closed = False
        self._prefix = bytearray()
        self._is_record = False
        self._record: bytearray | None = None
        self._frame: NDArray[np.uint8] | None = None
        self._fill: memoryview | None = None  # where the current unit's remaining bytes go
        self._filled = 0
        self._done = 0  # bytes of the current unit received into earlier fills
        self._step: Literal["peek", "head", "data"] | None = None  # what the current fill is, placing a frame
        self._data_at = 0
        self._placed: memoryview | None = None

    def feed(self, data: BytesLike) -> None:
        """Take received bytes (copied into unit buffers; ``data`` may be reused afterwards)."""
        if self._closed:
            raise LocalProtocolError("receive_data() after EOF: the connection is closed")
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        self.bytes_received += len(view)
        pos, end = 0, len(view)
        while pos < end and self._error is None:
            if self._fill is None:
                pos = self._take_prefix(view, pos)
                continue
            take = min(end - pos, len(self._fill) - self._filled)
            self._fill[self._filled : self._filled + take] = view[pos : pos + take]
            self._filled += take
            pos += take
            if self._filled == len(self._fill):
                self._advance()

    def writable(self) -> memoryview | None:
        """Where the rest of the unit being received goes, for a transport that receives in place
        (asyncio's ``BufferedProtocol`` pattern); None between units, when ``feed`` must be used."""
        if self._fill is None or self._error is not None or self._closed:
            return None
        return self._fill[self._filled:]

    def wrote(self, count: int) -> None:
        """``count`` bytes arrived directly in :meth:`writable`'s view."""
        if self._fill is None or not 0 < count <= len(self._fill) - self._filled:
            raise LocalProtocolError(f"{count} bytes reported for a receive buffer that takes "
                                     f"{0 if self._fill is None else len(self._fill) - self._filled}")
        self.bytes_received += count
        self._filled += count
        if self._filled == len(self._fill):
            self._advance()

    def close(self) -> None:
        """The peer closed its side (EOF)."""
        self._closed = True

    def next_unit(self) -> Unit:
        """The next complete unit; None if more bytes are needed; EOF at a clean EOF; raises on errors."""
        if self._units:
            return self._units.popleft()
        if self._error is not None:
            raise self._error
        if self._closed:
            if self._prefix or self._fill is not None:
                raise self._truncated()
            return EOF
        return None

    @property
    def frames(self) -> int:
        """Frames completely received so far."""
        return self._frames

    @property
    def between_units(self) -> bool:
        """No byte of a unit is buffered: what follows on the wire starts a new one."""
        return self._fill is None and not self._prefix and not self._units and self._error is None

    def skipped(self, frames: int, count: int) -> None:
        """``frames`` whole frames (``count`` bytes) were received and checked elsewhere (a compiled fault lane)."""
        self._frames += frames
        self.bytes_received += count

    def _take_prefix(self, view: memoryview, pos: int) -> int:
        if not self._prefix:
            self._is_record = self._records_left > 0 or view[pos] == RECORD_FIRST_BYTE
        chunk = view[pos : pos + PREFIX_SIZE - len(self._prefix)]
        self._prefix += chunk
        pos += len(chunk)
        if self._is_record:
            self._check_record_prefix()
        if len(self._prefix) == PREFIX_SIZE and self._error is None:
            self._start_unit()
        return pos

    def _check_record_prefix(self) -> None:
        # Checked byte by byte as they come, so a peer speaking something else is told at once,
        # not after it happens to send 16 bytes.
        head = bytes(self._prefix)
        n = min(len(head), len(MAGIC))
        if head[:n] != MAGIC[:n]:
            self._error = RemoteProtocolError(
                f"the {self.peer} is not speaking the dirtylog migration stream (it sent {head!r}): "
                "check the address and port"
            )
        elif len(head) >= _VERSION_END:
            version = int.from_bytes(head[len(MAGIC) : _VERSION_END], "little")
            if version != VERSION:
                self._error = VersionMismatchError(
                    f"the {self.peer} speaks migration stream version {version}, this dirtylog speaks "
                    f"version {VERSION}: install the same dirtylog version on both hosts"
                )

    def _start_unit(self) -> None:
        if self._is_record:
            _, _, _, _, length = RECORD_PREFIX.unpack(self._prefix)
            if length > MAX_RECORD_BODY:
                self._error = RemoteProtocolError(
                    f"handshake record from the {self.peer} declares {length} bytes, over the "
                    f"{MAX_RECORD_BODY}-byte limit: the stream is corrupt"
                )
                return
            self._record = bytearray(length)
            self._fill = memoryview(self._record)
        else:
            _, _, _, length, _ = FRAME_HEADER.unpack(self._prefix)
            if length > MAX_PAYLOAD:
                # Refused before allocating: a hostile length costs us nothing.
                self._error = RemoteProtocolError(
                    f"frame {self._frames} from the {self.peer} declares a {length}-byte payload, over the "
                    f"{MAX_PAYLOAD}-byte limit: the stream is corrupt or tampered with"
                )
                return
            # np.empty, not bytearray(n): no zero-filling pass over a buffer we overwrite at once.
            self._frame = np.empty(PREFIX_SIZE + length + MAC_SIZE, dtype=np.uint8)
            self._frame[:PREFIX_SIZE] = np.frombuffer(self._prefix, dtype=np.uint8)
            self._fill = self._frame.data[PREFIX_SIZE:]
            if self.placer is not None and length >= PLACE_MIN:
                self._fill = self._frame.data[PREFIX_SIZE : PREFIX_SIZE + PEEK_SIZE]
                self._step = "peek"
        self._filled = self._done = 0
        if not len(self._fill):
            self._finish()

    def _advance(self) -> None:
        """The current fill is full: finish the unit, or take the next step of placing a frame."""
        if self._step is None:
            self._finish()
            return
        assert self._frame is not None and self.placer is not None and self._fill is not None
        step, self._step = self._step, None
        ftype, _, _, length, _ = FRAME_HEADER.unpack(self._prefix)
        payload = self._frame.data[PREFIX_SIZE : PREFIX_SIZE + length]
        self._done += len(self._fill)
        self._filled = 0
        if step == "peek":
            head = self.placer.head_size(ftype, payload[:PEEK_SIZE].toreadonly(), length)
            if not PEEK_SIZE <= head < length:
                self._fill = self._frame.data[PREFIX_SIZE + PEEK_SIZE :]  # the rest, as usual
                return
            self._data_at = head
            self._fill, self._step = payload[PEEK_SIZE:head], "head"
            if len(self._fill):
                return
            step, self._step = "head", None
        if step == "head":
            target = self.placer.place(ftype, payload[: self._data_at].toreadonly(), length)
            if target is None or len(target) != length - self._data_at:
                self._fill = self._frame.data[PREFIX_SIZE + self._data_at :]  # the rest, as usual
                return
            self._placed = self._fill = target
            self._step = "data"
        else:  # the data is in: the MAC goes to its usual place
            self._fill = self._frame.data[PREFIX_SIZE + length :]

    def _finish(self) -> None:
        if self._is_record:
            assert self._record is not None
            rtype, flags = self._prefix[10], self._prefix[11]
            body = bytes(self._record)
            self._units.append(Record(rtype, flags, body, bytes(self._prefix) + body))
            self._records_left = max(0, self._records_left - 1)
        else:
            assert self._frame is not None
            ftype, flags, reserved, length, seq = FRAME_HEADER.unpack(self._prefix)
            data_at = self._data_at if self._placed is not None else 0
            self._units.append(Frame(self._frame, ftype, flags, reserved, length, seq, self._frames,
                                     self._placed, data_at))
            self._frames += 1
        self._prefix = bytearray()
        self._record = self._frame = self._fill = self._placed = None
        self._data_at = 0

    def _truncated(self) -> TruncatedStreamError:
        what = "a handshake record" if self._is_record else f"frame {self._frames}"
        if self._fill is None:
            size = f"{len(self._prefix)} bytes of its header"
        else:
            # a record's buffer is its body; a frame's holds its header too
            if self._record is not None:
                total = len(self._prefix) + len(self._record)
            else:
                total = len(self._frame) if self._frame is not None else 0
            size = f"{len(self._prefix) + self._done + self._filled} of {total} bytes"
            if not self._is_record:
                what += f" ({frame_name(self._prefix[0])})"
        return TruncatedStreamError(
            f"the {self.peer} closed the connection in the middle of {what} ({size}): the stream is truncated"
        )
