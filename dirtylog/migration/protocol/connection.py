"""The sans-io migration stream: bytes in, events out; events in, bytes out. No sockets, no threads.

A transport owns the socket and drives a connection::

    conn = SourceConnection(key)                     # or DestinationConnection(key)
    sock.sendmsg(conn.initiate())
    while (event := conn.next_event()) is NEED_DATA:
        conn.receive_data(sock.recv(1 << 20))        # b"" at EOF
    sock.sendmsg(conn.send(header))                  # a list of buffers: page data is not copied

Any ProtocolError leaves the connection in ERROR; its ``reply`` holds the bytes that tell the peer why
(send them, best effort, then close). A connection is not thread-safe: one thread drives it.
See ``rules`` for the rules and docs/migration-stream.md for the bytes.
"""

from __future__ import annotations

import dataclasses
import os
import struct
from typing import Protocol

from dirtylog.migration.protocol.acceptance import HeaderAcceptance
from dirtylog.migration.protocol.auth import (
    client_proof,
    frame_keys,
    frame_mac,
    open_frame,
    proofs_equal,
    root_key,
    seal_frame,
    server_proof,
)
from dirtylog.migration.protocol.codec import (
    AUTH_BODY,
    CHALLENGE_BODY,
    FRAME_HEADER,
    HELLO_BODY,
    HELLO_ENCRYPT,
    HELLO_FLAGS,
    HELLO_POSTCOPY,
    HELLO_RESUME,
    MAGIC,
    MAX_PAYLOAD,
    MAX_STREAMS,
    MIGRATION_ID_SIZE,
    NONCE_SIZE,
    PROOF_SIZE,
    RECORD_PREFIX,
    ROLE_SOURCE,
    VERSION,
    FrameType,
    RecordType,
    batch_data_at,
    batch_single_run,
    decode_reject,
    encode_record,
    encode_reject,
    frame_name,
)
from dirtylog.migration.protocol.errors import (
    AuthenticationError,
    HeaderMismatchError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    ReplayError,
    TruncatedStreamError,
    VersionMismatchError,
)
from dirtylog.migration.protocol.events import (
    CLOSED,
    NEED_DATA,
    Abort,
    AbortCode,
    Accepted,
    Channel,
    Event,
    Header,
    Hello,
    PageBatch,
    Role,
    Sentinel,
)
from dirtylog.migration.protocol.framing import EOF, Frame, FrameReader, Record
from dirtylog.migration.protocol.rules import (
    ABORTABLE,
    BY_EVENT,
    BY_FRAME,
    HANDSHAKE,
    POSTCOPY_LIVE,
    Phase,
    StreamState,
    check_abort,
)

#: What send(), initiate() and accept() return: buffers for ``socket.sendmsg``, in order.
Buffers = list[bytes | memoryview]

_KEY_ADVICE = "use the same --key-file on both hosts (make one with `dirtylog keygen FILE`)"



@dataclasses.dataclass(frozen=True)
class LentRequests:
    """What a compiled fault lane needs to carry a post-copy channel's requests and answers: the frame keys of each
    direction and the next sequence number of each."""

    send_key: bytes
    recv_key: bytes
    send_seq: int
    recv_seq: int

class RunPlacer(Protocol):
    """Where the data of a PageBatch that is one run of non-zero pages may be received in place.

    The bytes land before the frame's MAC is checked: place them only where a frame that then fails does
    no harm (the destination's guest memory, which is never resumed unverified).
    """

    def place_run(self, round: int, first: int, npages: int) -> memoryview | None:
        """A writable byte view of exactly ``npages`` pages from guest frame ``first`` for round ``round``'s
        data, or None to receive the frame the usual way."""
        ...


class _BatchPlacer:
    """The framing's two-step Placer for PAGE_BATCH frames: the codec reads the head, a RunPlacer says where."""

    def __init__(self, placer: RunPlacer) -> None:
        self._placer = placer

    def head_size(self, ftype: int, peek: memoryview, length: int) -> int:
        return batch_data_at(peek) if ftype == FrameType.PAGE_BATCH else 0

    def place(self, ftype: int, head: memoryview, length: int) -> memoryview | None:
        run = batch_single_run(head)
        if run is None:
            return None
        round_, first, npages = run
        target = self._placer.place_run(round_, first, npages)
        return target if target is not None and len(target) == length - len(head) else None


class Connection:
    """The core both ends share: framing, MACs, sequence numbers and the state machine."""

    def __init__(self, role: Role, key: bytes, nonce: bytes | None) -> None:
        self.role = role
        self._peer = role.peer.value
        self._root = root_key(key)
        if nonce is not None and len(nonce) != NONCE_SIZE:
            raise LocalProtocolError(f"a nonce is {NONCE_SIZE} bytes")
        # A fixed nonce is for replaying a recorded stream; a live session needs a fresh one.
        self._nonce = nonce if nonce is not None else os.urandom(NONCE_SIZE)
        self._state = StreamState()
        self._reader = FrameReader(self._peer, records=2 if role is Role.DESTINATION else 1)
        self._transcript = b""
        self._send_key: bytes | None = None
        self._recv_key: bytes | None = None
        self._send_seq = 0
        self._recv_seq = 0
        self._pending: Buffers = []  # handshake bytes that precede our next frame (the source's AUTH)
        self._failure: ProtocolError | None = None
        self._ended = ""  # why the connection stopped (an Abort), for later error messages
        self._closed = False
        self.migration_id = b""
        self.bytes_sent = 0
        #: Frames are encrypted (AES-256-GCM), not only MACed: the source's choice, in its HELLO.
        self.encrypted = False

    # -- what a transport or engine may read -------------------------------------------------------

    @property
    def phase(self) -> Phase:
        """Where the conversation is (see ``state``)."""
        return self._state.phase

    @property
    def header(self) -> Header | None:
        """The Header, once sent or received."""
        return self._state.header

    @property
    def stream_index(self) -> int:
        return self._state.stream_index

    @property
    def stream_count(self) -> int:
        return self._state.stream_count

    @property
    def primary(self) -> bool:
        """Stream 0 carries the vCPU states and the commit."""
        return self._state.primary

    @property
    def channel(self) -> Channel:
        """What this connection carries: a stream, or a migration's post-copy channel (from the HELLO)."""
        return self._state.channel

    @property
    def resume(self) -> bool:
        """The source reconnected to resume a post-copy migration (from the HELLO)."""
        return self._state.resume

    @property
    def frames_sent(self) -> int:
        """Authenticated frames sent so far (what Complete.stream_frames counts, before Complete)."""
        return self._send_seq

    @property
    def frames_received(self) -> int:
        """Authenticated frames received and verified so far."""
        return self._recv_seq

    @property
    def bytes_received(self) -> int:
        return self._reader.bytes_received

    # -- the post-copy fault lane ----------------------------------------------------------------------

    def lend_requests(self) -> LentRequests | None:
        """The keys and sequence numbers a compiled fault lane needs to exchange page requests and their answers on
        this post-copy channel in its place (:mod:`dirtylog.migration.engine.fault_lanes`); None when it cannot:
        not in phase REQUESTS, an encrypted session, or part of a frame already buffered here.

        Those two frame types leave the phase as it is, so the conversation is the same whoever carries them: the
        lane sends and takes only well-formed ones under their MACs and sequence numbers, hands anything else back
        unread, and :meth:`take_back_requests` counts what it did before this connection goes on."""
        if (self.phase is not Phase.REQUESTS or self.encrypted or self._send_key is None or self._recv_key is None
                or not self._reader.between_units or self._pending):
            return None
        return LentRequests(self._send_key, self._recv_key, self._send_seq, self._recv_seq)

    def take_back_requests(self, lent: LentRequests, *, sent: int, received: int, bytes_sent: int,
                           bytes_received: int) -> None:
        """The lane of :meth:`lend_requests` stopped after sending ``sent`` frames and taking ``received``."""
        if self.phase is not Phase.REQUESTS or (self._send_seq, self._recv_seq) != (lent.send_seq, lent.recv_seq):
            raise LocalProtocolError("the connection moved on while a fault lane held its page requests")
        self._send_seq += sent
        self._recv_seq += received
        self._state.source_frames += sent if self.role is Role.SOURCE else received  # what Complete counts
        self.bytes_sent += bytes_sent
        self._reader.skipped(received, bytes_received)

    # -- the API -------------------------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Feed bytes from the peer; ``b""`` means EOF. Nothing is parsed until ``next_event()``."""
        self._check_usable()
        try:
            if len(data) == 0:
                self._reader.close()
            else:
                self._reader.feed(data)
        except ProtocolError as exc:
            raise self._fail(exc) from None

    def receive_buffer(self) -> memoryview | None:
        """A view to receive the rest of the current frame into, sparing ``receive_data``'s copy
        (then call :meth:`received`); None when only ``receive_data`` will do (between frames)."""
        self._check_usable()
        return self._reader.writable()

    def place_runs_with(self, placer: RunPlacer | None) -> None:
        """From the next frame on, receive the data of one-run page batches where ``placer`` says (see
        :class:`RunPlacer`); None to stop. Not in an encrypted session, whose batch heads cannot be read before
        the frame is decrypted."""
        self._reader.placer = None if placer is None or self.encrypted else _BatchPlacer(placer)

    def received(self, count: int) -> None:
        """``count`` bytes were received directly into :meth:`receive_buffer`'s view."""
        self._check_usable()
        try:
            self._reader.wrote(count)
        except ProtocolError as exc:
            raise self._fail(exc) from None

    def next_event(self) -> Event | Sentinel:
        """The next event from the peer, NEED_DATA, or CLOSED at a clean end; raises ProtocolError."""
        self._check_usable()
        if self._closed:
            return CLOSED
        try:
            return self._next_event()
        except ProtocolError as exc:
            raise self._fail(exc) from None

    def send(self, event: Event) -> Buffers:
        """Bytes for ``event``, as buffers to write in order (page data is the caller's, not copied).

        The MAC is computed here, so the data must not change until the buffers are written: pass a
        gathered copy of guest pages, never a live view of a running guest.
        """
        self._check_usable()
        try:
            return self._send(event)
        except ProtocolError as exc:
            raise self._fail(exc) from None

    # -- receiving -----------------------------------------------------------------------------------

    def _next_event(self) -> Event | Sentinel:
        if self.role is Role.SOURCE and self.phase is Phase.HELLO:
            raise LocalProtocolError("call initiate() before waiting for the destination")
        if self.role is Role.DESTINATION and self.phase is Phase.CHALLENGE:
            raise LocalProtocolError("answer the Hello first: accept() it, or refuse it with send(Abort(...))")
        while True:
            unit = self._reader.next_unit()
            if unit is None:
                return NEED_DATA
            if unit is EOF:
                return self._on_eof()
            event = self._on_record(unit) if isinstance(unit, Record) else self._on_frame(unit)
            if event is not None:
                return event

    def _on_eof(self) -> Sentinel:
        if self.phase is Phase.DONE:
            self._closed = True
            return CLOSED
        if self.phase in (Phase.REQUESTS, Phase.CHANNEL_END):
            # The post-copy channel is up from the start; only the main stream knows whether the switch came.
            outcome = ("the post-copy channel broke: before the switch to post-copy the source still owns the VM; "
                       "after it, the destination runs the VM and the source holds pages it lacks: resume the "
                       "migration to finish it")
        elif self.phase in POSTCOPY_LIVE:
            outcome = ("in post-copy: the destination runs the VM and the source holds pages it lacks; resume the "
                       "migration to finish it")
        elif self.role is Role.DESTINATION:
            outcome = "the migration is incomplete: do not resume this copy of the VM"
        elif self.phase is Phase.RESUME:
            outcome = "after Commit: the destination may be running the VM, check it before resuming the source by hand"
        elif self.phase is Phase.POSTCOPY_RESUME:
            outcome = ("after the post-copy Commit: check the destination; if it runs the VM, it lacks pages the "
                       "source holds: resume the migration to finish it; if not, the source may be resumed by hand")
        else:
            outcome = "the migration did not finish: the source still owns the VM"
        raise TruncatedStreamError(
            f"the {self._peer} closed the connection in phase {self.phase.value} after {self._recv_seq} frames; "
            f"{outcome}"
        )

    def _on_record(self, record: Record) -> Event | None:
        try:
            rtype = RecordType(record.type)
        except ValueError:
            raise RemoteProtocolError(f"unknown handshake record type {record.type:#04x}") from None
        if rtype is RecordType.REJECT:
            try:
                self._state.advance(self.role.peer, "REJECT")
            except LocalProtocolError as exc:
                raise RemoteProtocolError(f"unexpected REJECT record: {exc}") from None
            self._ended = "rejected by the peer"
            raise self._rejected(*decode_reject(record.body))
        if record.flags:
            raise RemoteProtocolError(f"{rtype.name} record has unknown flags {record.flags:#x}")
        if rtype is RecordType.HELLO and self.role is Role.SOURCE:
            raise RemoteProtocolError("the peer is a source too (it sent HELLO): connect the source to a destination")
        try:
            self._state.next_phase(self.role.peer, rtype.name)
        except LocalProtocolError as exc:
            raise RemoteProtocolError(f"unexpected {rtype.name} record: {exc}") from None
        # Checked first, advanced after: a record that fails leaves us in the handshake (REJECT reply).
        event = self._on_handshake(rtype, record)
        self._state.advance(self.role.peer, rtype.name)
        if isinstance(event, Accepted):
            self._state.advance(self.role, "AUTH")  # queued: it goes out with our first frame
        return event

    def _on_handshake(self, rtype: RecordType, record: Record) -> Event | None:
        raise RemoteProtocolError(
            f"the {self._peer} sent a {rtype.name} record, which a {self.role.value} never receives"
        )

    def _rejected(self, code: int, reason: str) -> RemoteProtocolError:
        if code == AbortCode.AUTHENTICATION:
            return AuthenticationError(
                f"the {self._peer} refused our key proof, the keys differ: {_KEY_ADVICE} (it said: {reason})"
            )
        if code == AbortCode.VERSION:
            return VersionMismatchError(f"the {self._peer} does not speak our stream version: {reason}")
        name = AbortCode(code).name if code in set(AbortCode) else str(code)
        return RemoteProtocolError(f"the {self._peer} refused the migration stream ({name}): {reason}")

    def _on_frame(self, frame: Frame) -> Event:
        if self._recv_key is None:  # cannot happen: the reader takes records until the handshake is done
            raise RemoteProtocolError("a frame arrived before the handshake finished")
        buf = frame.buffer.data.toreadonly()
        end = FRAME_HEADER.size + frame.length
        name = frame_name(frame.type)
        # The claimed sequence number is the nonce: an authentic frame out of place then verifies, and is
        # refused below as a replay with a message that says so.
        if self.encrypted:  # decrypted in place in the frame's own buffer (placing is off in such a session)
            writable = frame.buffer.data
            authentic = open_frame(self._recv_key, frame.seq, writable[:FRAME_HEADER.size], bytes(buf[end:]),
                                   writable[FRAME_HEADER.size:end])
        else:
            parts = (buf[:end],) if frame.data is None else (buf[: FRAME_HEADER.size + frame.data_at], frame.data)
            authentic = proofs_equal(frame_mac(self._recv_key, frame.seq, *parts), bytes(buf[end:]))
        if not authentic:
            raise AuthenticationError(
                f"frame {self._recv_seq} from the {self._peer} failed authentication: corrupted or tampered with "
                "in transit (or a frame of another session)"
            )
        if frame.seq != self._recv_seq:
            raise ReplayError(
                f"frame {frame.seq} ({name}) from the {self._peer} arrived where frame {self._recv_seq} was expected: "
                "a replayed, dropped or reordered frame"
            )
        self._recv_seq += 1
        if frame.flags or frame.reserved:
            raise RemoteProtocolError(f"frame {frame.seq} ({name}) has unknown flags {frame.flags:#x}")
        event = self._decode(frame, buf[FRAME_HEADER.size : end])
        try:
            self._state.process(self.role.peer, event)
        except LocalProtocolError as exc:
            raise RemoteProtocolError(
                f"the {self._peer} broke the protocol in frame {frame.seq} ({name}): {exc}"
            ) from None
        if isinstance(event, Abort):
            self._ended = f"aborted by the {self._peer}: {event.reason}"
        elif isinstance(event, Header):
            self._check_header(event)
        return event

    def _decode(self, frame: Frame, payload: memoryview) -> Event:
        """The event in a verified frame's payload (arrays and data are views of the frame's buffer)."""
        kind = BY_FRAME.get(frame.type)
        if kind is None or kind.decode is None:
            raise RemoteProtocolError(f"frame {frame.seq} from the {self._peer}: unknown frame type {frame.type:#04x}")
        header = self._state.header
        try:
            event = kind.decode(payload, header.page_size if header else 0)
        except struct.error as exc:  # a payload too short for its fixed part
            raise RemoteProtocolError(
                f"frame {frame.seq} from the {self._peer}: {frame_name(frame.type)} frame of {len(payload)} bytes is "
                f"malformed: {exc}") from None
        except RemoteProtocolError as exc:
            raise RemoteProtocolError(f"frame {frame.seq} from the {self._peer}: {exc}") from None
        if frame.data is not None:  # the data was received in place (place_runs_with)
            assert isinstance(event, PageBatch)
            event = dataclasses.replace(event, data=frame.data.toreadonly())
        return event

    def _check_header(self, header: Header) -> None:
        """Destination: refuse a Header this host was not set up for (HeaderMismatchError)."""

    # -- sending -------------------------------------------------------------------------------------

    def _send(self, event: Event) -> Buffers:
        if isinstance(event, Hello | Accepted):
            raise LocalProtocolError(f"{type(event).__name__} is received, never sent: use initiate() / accept()")
        if isinstance(event, Abort) and self.phase in HANDSHAKE:
            check_abort(self._state, event)
            self._state.advance(self.role, "REJECT")
            self._ended = f"aborted by us: {event.reason}"
            return self._out([encode_reject(event.code, event.reason)])
        self._state.process(self.role, event)
        if isinstance(event, Abort):
            self._ended = f"aborted by us: {event.reason}"
        return self._seal(event)

    def _seal(self, event: Event) -> Buffers:
        assert self._send_key is not None  # only after the handshake
        kind = BY_EVENT[type(event)]
        assert kind.frame is not None and kind.encode is not None
        ftype = kind.frame
        head, data = kind.encode(event)
        length = len(head) + (len(data) if data is not None else 0)
        if length > MAX_PAYLOAD:
            raise LocalProtocolError(f"a {ftype.name} of {length} bytes does not fit a frame ({MAX_PAYLOAD} bytes)")
        seq = self._send_seq
        self._send_seq += 1
        if self.encrypted:
            return self._out(self._encrypt(ftype, length, seq, head, data))
        first = FRAME_HEADER.pack(ftype, 0, 0, length, seq) + head
        if data is None or not len(data):
            return self._out([first + frame_mac(self._send_key, seq, first)])
        # The page data is hashed in place and handed back uncopied: sendmsg writes it from the caller's buffer.
        return self._out([first, data, frame_mac(self._send_key, seq, first, data)])

    def _encrypt(self, ftype: int, length: int, seq: int, head: bytes, data: memoryview | None) -> Buffers:
        """Frame ``seq`` encrypted: its payload in place (the caller's page data included, which then holds
        ciphertext: the source's gather buffer is not read again), its header authenticated."""
        assert self._send_key is not None
        header = FRAME_HEADER.pack(ftype, 0, 0, length, seq)
        secret_head = bytearray(head)
        if data is not None and data.readonly:
            data = memoryview(bytearray(data))  # bytes (a compressed block, a vCPU state): encrypt a copy
        parts = [memoryview(secret_head)] + ([data] if data is not None and len(data) else [])
        tag = seal_frame(self._send_key, seq, header, *parts)
        return [header + bytes(secret_head), *parts[1:], tag]

    def _out(self, buffers: Buffers) -> Buffers:
        out, self._pending = self._pending + buffers, []
        self.bytes_sent += sum(len(b) for b in out)
        return out

    # -- failing -------------------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise LocalProtocolError(f"the connection failed earlier and cannot be used: {self._failure}")
        if self.phase is Phase.ERROR:
            raise LocalProtocolError(f"the connection cannot be used: it was {self._ended}")

    def _fail(self, exc: ProtocolError) -> ProtocolError:
        """Enter ERROR; attach to ``exc`` the bytes that tell the peer why, when there is anyone to tell."""
        phase = self.phase
        self._failure = exc
        self._state.phase = Phase.ERROR
        if self._ended or isinstance(exc, TruncatedStreamError):
            return exc  # the peer rejected, aborted or hung up: nobody is listening
        code = _abort_code(exc)
        reason = f"{self.role.value}: {exc}"
        if phase in HANDSHAKE:
            exc.reply = (encode_reject(code, reason),)
        elif phase in ABORTABLE and self._send_key is not None:
            # Our sending direction is intact: an authenticated Abort (after the AUTH if still pending).
            exc.reply = tuple(bytes(b) for b in self._seal(Abort(reason, code)))
        self._pending = []
        return exc


def _abort_code(exc: ProtocolError) -> AbortCode:
    if isinstance(exc, AuthenticationError):
        return AbortCode.AUTHENTICATION
    if isinstance(exc, VersionMismatchError):
        return AbortCode.VERSION
    if isinstance(exc, HeaderMismatchError):
        return AbortCode.MISMATCH
    if isinstance(exc, LocalProtocolError):
        return AbortCode.INTERNAL
    return AbortCode.PROTOCOL


class SourceConnection(Connection):
    """The sending end: ``initiate()``, wait for Accepted, send the Header, wait for Ready, stream.

    ``migration_id`` (16 bytes, random by default) ties the parallel streams of one migration
    together; each stream is its own connection, with its own handshake and keys.
    """

    def __init__(
        self,
        key: bytes,
        *,
        migration_id: bytes | None = None,
        stream_index: int = 0,
        stream_count: int = 1,
        nonce: bytes | None = None,
        encrypt: bool = False,
        channel: Channel = Channel.STREAM,
        resume: bool = False,
    ) -> None:
        super().__init__(Role.SOURCE, key, nonce)
        self.encrypted = encrypt
        self._state.channel, self._state.resume = channel, resume
        if not 1 <= stream_count <= MAX_STREAMS or not 0 <= stream_index < stream_count:
            raise LocalProtocolError(
                f"stream {stream_index} of {stream_count}: need 0 <= index < count <= {MAX_STREAMS}"
            )
        self.migration_id = migration_id if migration_id is not None else os.urandom(MIGRATION_ID_SIZE)
        if len(self.migration_id) != MIGRATION_ID_SIZE:
            raise LocalProtocolError(f"a migration id is {MIGRATION_ID_SIZE} bytes")
        self._state.stream_index, self._state.stream_count = stream_index, stream_count

    def initiate(self) -> Buffers:
        """The HELLO that opens the stream; send it first."""
        self._check_usable()
        try:
            if self.phase is not Phase.HELLO:
                raise LocalProtocolError("initiate() opens the stream and is called once")
            flags = ((HELLO_ENCRYPT if self.encrypted else 0) | (HELLO_RESUME if self.resume else 0)
                     | (HELLO_POSTCOPY if self.channel is Channel.POSTCOPY else 0))
            body = HELLO_BODY.pack(ROLE_SOURCE, flags, self.stream_index, self.stream_count, self.migration_id,
                                   self._nonce)
            record = encode_record(RecordType.HELLO, body)
            self._state.advance(Role.SOURCE, "HELLO")
            self._transcript = record
            return self._out([record])
        except ProtocolError as exc:
            raise self._fail(exc) from None

    def _on_handshake(self, rtype: RecordType, record: Record) -> Event | None:
        if rtype is not RecordType.CHALLENGE:
            return super()._on_handshake(rtype, record)
        if len(record.body) != CHALLENGE_BODY.size:
            raise RemoteProtocolError(f"CHALLENGE of {len(record.body)} bytes, expected {CHALLENGE_BODY.size}")
        _, proof = CHALLENGE_BODY.unpack(record.body)
        # The destination proves the key over everything said so far, our HELLO included.
        if not proofs_equal(proof, server_proof(self._root, self._transcript + record.raw[:-PROOF_SIZE])):
            raise AuthenticationError(
                f"the destination's key does not match ours (its proof does not verify, or the handshake was "
                f"tampered with): {_KEY_ADVICE}"
            )
        self._transcript += record.raw
        self._send_key, self._recv_key = frame_keys(self._root, self._transcript)
        # AUTH goes out with our first frame (the Header): no extra round trip.
        self._pending = [encode_record(RecordType.AUTH, client_proof(self._root, self._transcript))]
        return Accepted()


class DestinationConnection(Connection):
    """The receiving end: wait for Hello, ``accept()``, receive the Header, send Ready, receive pages.

    A Header outside ``acceptance`` fails with HeaderMismatchError before any page is accepted, and the
    source is told why as a MISMATCH.
    """

    def __init__(self, key: bytes, *, acceptance: HeaderAcceptance | None = None, nonce: bytes | None = None) -> None:
        super().__init__(Role.DESTINATION, key, nonce)
        self._acceptance = acceptance or HeaderAcceptance()

    def accept(self) -> Buffers:
        """The CHALLENGE that answers a Hello (proving we hold the key); send it."""
        self._check_usable()
        try:
            if self.phase is not Phase.CHALLENGE:
                raise LocalProtocolError("accept() answers a Hello: call it once, after next_event() returned Hello")
            prefix = RECORD_PREFIX.pack(MAGIC, VERSION, RecordType.CHALLENGE, 0, CHALLENGE_BODY.size)
            proof = server_proof(self._root, self._transcript + prefix + self._nonce)
            record = encode_record(RecordType.CHALLENGE, CHALLENGE_BODY.pack(self._nonce, proof))
            assert record.startswith(prefix)
            self._transcript += record
            self._recv_key, self._send_key = frame_keys(self._root, self._transcript)
            self._state.advance(Role.DESTINATION, "CHALLENGE")
            return self._out([record])
        except ProtocolError as exc:
            raise self._fail(exc) from None

    def _on_handshake(self, rtype: RecordType, record: Record) -> Event | None:
        if rtype is RecordType.HELLO:
            if len(record.body) != HELLO_BODY.size:
                raise RemoteProtocolError(f"HELLO of {len(record.body)} bytes, expected {HELLO_BODY.size}")
            role, flags, index, count, migration_id, _ = HELLO_BODY.unpack(record.body)
            if flags & ~HELLO_FLAGS or any(record.body[6:8]):
                raise RemoteProtocolError(f"HELLO has unknown flags {flags:#x} or reserved bytes that are not zero")
            if role != ROLE_SOURCE:
                raise RemoteProtocolError(f"the peer's HELLO says role {role}, not a source")
            if not 1 <= count <= MAX_STREAMS or index >= count:
                raise RemoteProtocolError(f"HELLO opens stream {index} of {count}, which cannot exist")
            self._transcript = record.raw
            self.migration_id = migration_id
            self.encrypted = bool(flags & HELLO_ENCRYPT)  # under the proofs: a meddler cannot turn it off
            self._state.stream_index, self._state.stream_count = index, count
            self._state.channel = Channel.POSTCOPY if flags & HELLO_POSTCOPY else Channel.STREAM
            self._state.resume = bool(flags & HELLO_RESUME)
            return Hello(migration_id=migration_id, stream_index=index, stream_count=count, encrypted=self.encrypted,
                         channel=self._state.channel, resume=self._state.resume)
        if rtype is RecordType.AUTH:
            if len(record.body) != AUTH_BODY.size or not proofs_equal(
                record.body, client_proof(self._root, self._transcript)
            ):
                raise AuthenticationError(
                    f"the source's key does not match ours (its proof does not verify, or the handshake was "
                    f"tampered with): {_KEY_ADVICE}"
                )
            return None  # nothing to report: the Header follows
        return super()._on_handshake(rtype, record)

    def _check_header(self, header: Header) -> None:
        self._acceptance.check(header)
