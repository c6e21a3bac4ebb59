"""One migration stream on a channel: the sans-io connection, a reader thread, and a sender thread or not.

The engine builds frames on its own thread (``conn.send`` computes the MAC there). With a sender thread
it hands the buffers to it through a bounded queue, so that several streams' sockets are written at once;
without one it writes them itself, which a single stream on a machine with few cores prefers (the frame is
still in cache when the kernel copies it, and no third thread competes for the cores: +7-18 % round 0 on 2
cores, ``docs/performance.md``). The reader thread turns whatever the peer says into events on a queue. A
lock serializes use of the connection object between the threads.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from dirtylog.migration.errors import MigrationError
from dirtylog.migration.protocol.connection import Connection
from dirtylog.migration.protocol.errors import ProtocolError
from dirtylog.migration.protocol.events import CLOSED, NEED_DATA, Abort, AbortCode, Event
from dirtylog.migration.protocol.rules import Phase
from dirtylog.migration.transports import Channel

RECV_CHUNK = 1 << 20
E = TypeVar("E", bound=Event)
QUEUE_DEPTH = 8
ABORT_LINGER = 2.0  # seconds an aborting side waits for the peer to hear why and close


@dataclass(frozen=True)
class StreamFailure:
    """What ended a stream abnormally, as the reader or sender saw it."""

    stream: int
    reason: str
    peer_abort: bool = False


class Stream:
    """A connection bound to a channel, with a sender and a reader thread."""

    def __init__(self, index: int, channel: Channel, conn: Connection,
                 pace: Callable[[int], None] | None = None) -> None:
        self.index = index
        self.channel = channel
        self.conn = conn
        self.pace = pace  # called with each write's size before it goes out (bandwidth cap)
        self.lock = threading.Lock()
        self.events: queue.Queue[Event | StreamFailure] = queue.Queue()
        self.bytes_sent = 0
        self._outbox: queue.Queue[tuple[Sequence[bytes | memoryview], Callable[[], None] | None] | None] = \
            queue.Queue(QUEUE_DEPTH)
        self._sender: threading.Thread | None = None
        self._reader: threading.Thread | None = None
        self.failure: StreamFailure | None = None
        self._closed = False

    # --- sending -----------------------------------------------------------------------------------

    def start(self, *, reader: bool = True, sender: bool = True) -> None:
        """Start the threads (after the handshake, which the engine does synchronously)."""
        if sender:
            self._sender = threading.Thread(target=self._send_loop, name=f"stream{self.index}-send", daemon=True)
            self._sender.start()
        if reader:
            self._reader = threading.Thread(target=self._read_loop, name=f"stream{self.index}-read", daemon=True)
            self._reader.start()

    def send(self, event: Event, on_sent: Callable[[], None] | None = None) -> None:
        """Frame ``event`` now and queue it for the channel (blocks while the queue is full).

        ``on_sent`` runs once the frame's bytes are written (or given up): the caller may then reuse
        the memory the event's data lives in.
        """
        if self.failure is not None:
            raise MigrationError(self.failure.reason)
        with self.lock:
            # Ended before this send: the reader has just seen the link fail (an Abort, a bad frame) and not yet
            # said so in ``failure``. Otherwise a refusal is an event out of its place: our bug, to be seen as one.
            ended = self.conn.phase is Phase.ERROR
            try:
                buffers = self.conn.send(event)
            except ProtocolError as error:
                if not ended:
                    raise
                raise MigrationError(str(error)) from None
        if self._sender is None:
            try:
                self._write(buffers)
            except OSError as error:
                raise MigrationError(self._write_failed(error).reason) from None
            finally:
                if on_sent is not None:
                    on_sent()
            return
        while True:
            try:
                self._outbox.put((buffers, on_sent), timeout=0.5)
                return
            except queue.Full:
                if self.failure is not None:
                    raise MigrationError(self.failure.reason) from None

    def drain(self, timeout: float) -> None:
        """Wait until every queued frame is on the channel."""
        deadline = time.monotonic() + timeout
        while self._outbox.unfinished_tasks:
            if self.failure is not None:
                raise MigrationError(self.failure.reason)
            if time.monotonic() > deadline:
                raise MigrationError(f"stream {self.index}: the peer took no data for {timeout:.0f} s")
            time.sleep(0.001)

    def _write(self, buffers: Sequence[bytes | memoryview]) -> None:
        size = sum(len(b) for b in buffers)
        if self.pace is not None:
            self.pace(size)
        self.channel.send(buffers)
        self.bytes_sent += size

    def _send_loop(self) -> None:
        while True:
            try:
                item = self._outbox.get(timeout=0.5)
            except queue.Empty:
                if self._closed:
                    return
                continue
            if item is None:
                self._outbox.task_done()
                return
            buffers, on_sent = item
            try:
                if self.failure is None:
                    self._write(buffers)
            except OSError as error:
                self._write_failed(error)
            finally:
                if on_sent is not None:
                    on_sent()
                self._outbox.task_done()

    def _write_failed(self, error: OSError) -> StreamFailure:
        """Record why writing failed: the peer's Abort if the reader has it (the peer usually says why
        before it closes, so give the reader a moment), else the socket error."""
        if self._reader is not None:
            self._reader.join(0.5)
        self._fail(f"stream {self.index}: sending failed: {error.strerror or error}")
        assert self.failure is not None
        return self.failure

    # --- receiving ---------------------------------------------------------------------------------

    def _read_loop(self) -> None:
        buffer = bytearray(RECV_CHUNK)
        view = memoryview(buffer)
        while not self._closed:
            try:
                count = self.channel.recv_into(view)
            except TimeoutError:
                continue
            except OSError as error:
                if not self._closed:
                    self._fail(f"stream {self.index}: connection lost: {error.strerror or error}")
                return
            try:
                with self.lock:
                    self.conn.receive_data(view[:count])
                    while (event := self.conn.next_event()) is not NEED_DATA:
                        if event is CLOSED:
                            return
                        assert not isinstance(event, type(NEED_DATA))
                        self.events.put(event)
                        if isinstance(event, Abort):
                            self._fail(f"the peer aborted: {event.reason}", peer_abort=True)
                            return
            except ProtocolError as error:
                self.reply_best_effort(error.reply)
                self._fail(str(error))
                return
            if count == 0:
                return

    def read_until(self, wanted: type[E], peer: str, timeout: float) -> E:
        """Read on the caller's thread until the peer sends ``wanted`` (the handshake, before the threads
        start). Errors are told to the peer (a REJECT record or an Abort) before they are raised."""
        buffer = bytearray(1 << 16)
        deadline = time.monotonic() + timeout
        while True:
            try:
                event = self.conn.next_event()
            except ProtocolError as error:
                self.reply_best_effort(error.reply)
                raise
            if isinstance(event, wanted):
                return event
            if isinstance(event, Abort):
                raise MigrationError(f"the {peer} refused the migration: {event.reason}")
            if event is not NEED_DATA:
                raise MigrationError(f"stream {self.index}: unexpected {type(event).__name__} from the {peer} "
                                     f"while waiting for {wanted.__name__}")
            try:
                self.channel.settimeout(max(0.001, deadline - time.monotonic()))
                count = self.channel.recv_into(memoryview(buffer))
            except TimeoutError:
                raise MigrationError(f"the {peer} sent nothing for {timeout:.0f} s") from None
            except OSError as error:
                raise MigrationError(f"connection to the {peer} lost: {error.strerror or error}") from None
            finally:
                self.channel.settimeout(timeout)
            try:
                self.conn.receive_data(memoryview(buffer)[:count])
            except ProtocolError as error:
                self.reply_best_effort(error.reply)
                raise

    def next_event(self, timeout: float, what: str) -> Event:
        """The next event from the peer, or MigrationError after ``timeout`` or a failure."""
        try:
            item = self.events.get(timeout=timeout)
        except queue.Empty:
            raise MigrationError(f"stream {self.index}: no {what} from the peer within {timeout:.0f} s") from None
        if isinstance(item, StreamFailure):
            raise MigrationError(item.reason)
        return item

    # --- ending ------------------------------------------------------------------------------------

    def _fail(self, reason: str, peer_abort: bool = False) -> None:
        if self.failure is None:
            self.failure = StreamFailure(self.index, reason, peer_abort)
            self.events.put(self.failure)

    def write_now(self, buffers: Sequence[bytes | memoryview]) -> None:
        """Write on the caller's thread (the handshake, before the threads start)."""
        try:
            self.channel.send(buffers)
        except OSError as error:
            raise MigrationError(f"stream {self.index}: connection lost: {error.strerror or error}") from None

    def reply_best_effort(self, buffers: Sequence[bytes | memoryview]) -> None:
        """Tell the peer why we stop, if the channel still takes it."""
        try:
            self.channel.settimeout(1.0)
            self.channel.send(buffers)
        except OSError:
            pass

    def abort(self, reason: str, code: AbortCode) -> None:
        """Send an Abort (best effort) and half-close: nothing more goes out; ``close`` ends the rest."""
        try:
            with self.lock:
                buffers = self.conn.send(Abort(reason[:900], code))
            self.reply_best_effort(buffers)
        except (ProtocolError, OSError):
            pass
        self._closed = True
        self.channel.shutdown_write()

    def close(self, linger_until: float | None = None) -> None:
        """Stop the threads and close the channel.

        With ``linger_until`` (a ``time.monotonic()`` deadline; after ``abort``), first read and drop what
        the peer still sends until it closes too: closing with unread bytes queued sends a RST instead of
        a FIN, and a RST can overtake our Abort, so the peer (or a relay on the way) would see "connection
        reset" instead of the reason."""
        self._closed = True
        if self._sender is not None and self._sender.is_alive():
            with contextlib.suppress(queue.Full):
                self._outbox.put_nowait(None)
        if linger_until is not None and self.channel.live:
            with contextlib.suppress(OSError):
                sink = memoryview(bytearray(RECV_CHUNK))
                while (left := linger_until - time.monotonic()) > 0:
                    self.channel.settimeout(left)
                    if self.channel.recv_into(sink) == 0:
                        break
        self.channel.close()


def close_aborted(streams: Sequence[Stream]) -> None:
    """Close streams after ``abort``, giving their peers ABORT_LINGER seconds in all to hear why and close."""
    linger_until = time.monotonic() + ABORT_LINGER
    for stream in streams:
        stream.close(linger_until)
