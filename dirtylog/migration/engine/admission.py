"""Who gets in: a destination keeps listening until one migration's streams have all authenticated.

Anything may connect to a listening port: a port scan, an HTTP probe, a peer with another key, a slowloris
that sends a byte a second. None of them may end or stall the wait for the real source. Every connection
gets its own handshake thread with a short deadline (HELLO, CHALLENGE, then AUTH and the Header); one that
fails is told why when the protocol allows (a REJECT), closed, and reported with its address and reason,
and the listener goes on. The first connection that authenticates names the migration (its id and stream
count); its other streams must follow within the I/O timeout, each index once. Streams of another migration,
and a second claim to an index, are refused at once.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from dirtylog.errors import DirtylogError
from dirtylog.migration.engine.streams import Stream
from dirtylog.migration.errors import MigrationError
from dirtylog.migration.protocol.acceptance import HeaderAcceptance
from dirtylog.migration.protocol.connection import DestinationConnection
from dirtylog.migration.protocol.errors import ProtocolError
from dirtylog.migration.protocol.events import AbortCode, Header, Hello
from dirtylog.migration.protocol.events import Channel as Carries
from dirtylog.migration.transports import Channel, ChannelListener, ListenerExhaustedError

#: Handshakes in progress at once; more connections than this are closed on arrival (and reported).
MAX_PENDING = 32
POLL = 0.05  # seconds between looks at the listener while handshakes run

#: Told of every connection refused: ``(peer address, reason)``.
RefusalCallback = Callable[[str, str], None]


@dataclass
class Admitted:
    """A stream whose source proved the key and sent an acceptable Header."""

    stream: Stream
    hello: Hello
    header: Header


@dataclass(frozen=True)
class Resumption:
    """The paused post-copy migration an admission waits for: its id and its Header."""

    migration_id: bytes
    header: Header


@dataclass
class _Refused:
    peer: str
    reason: str


class Admission:
    """Accept connections on ``transport`` until every stream of one migration is in."""

    def __init__(self, transport: ChannelListener, key: bytes, acceptance: HeaderAcceptance, *, io_timeout: float,
                 handshake_timeout: float, on_refused: RefusalCallback, resumption: Resumption | None = None) -> None:
        self.resumption = resumption
        self.transport = transport
        self.key = key
        self.acceptance = acceptance
        self.io_timeout = io_timeout
        self.handshake_timeout = handshake_timeout
        self.on_refused = on_refused
        self._results: queue.SimpleQueue[Admitted | _Refused] = queue.SimpleQueue()
        self._pending: dict[threading.Thread, Channel] = {}  # handshakes under way
        self._lock = threading.Lock()
        self._exhausted = False
        self._last_refusal = ""
        self._stop = threading.Event()
        self._failure: str | None = None  # the listener itself failed
        self.connected_at = 0.0  # when the first admitted stream connected (perf_counter)

    def run(self, accept_timeout: float | None) -> list[Admitted]:
        """The streams of the first migration to authenticate, by index; MigrationError if none came in time
        (``accept_timeout``; None waits for ever) or its other streams never came."""
        waited_since = time.monotonic()
        admitted: dict[tuple[Carries, int], Admitted] = {}
        first: Admitted | None = None
        first_at = 0.0
        # Connections are accepted on a thread of their own, so that a stream admitted is taken at once, not
        # after the listener's next poll (which would add up to POLL to every migration's setup).
        acceptor = threading.Thread(target=self._accept_loop, name="accept", daemon=True)
        acceptor.start()
        try:
            while first is None or len(admitted) < _needed(first):
                now = time.monotonic()
                if first is None and accept_timeout is not None and now - waited_since > accept_timeout:
                    raise MigrationError(f"no source authenticated within {accept_timeout:g} s")
                if first is not None and now - first_at > self.io_timeout:
                    missing = sorted(set(range(first.hello.stream_count)) - {i for c, i in admitted
                                                                             if c is Carries.STREAM})
                    if missing:
                        raise MigrationError(f"parallel stream(s) {missing} of the migration never connected")
                    raise MigrationError("the post-copy channel of the migration never connected")
                if self._failure is not None:
                    raise MigrationError(self._failure)
                if self._exhausted:
                    with self._lock:
                        busy = list(self._pending)
                    if not busy and self._results.empty():
                        raise MigrationError(self._last_refusal or "no stream came")
                timeout = POLL
                while True:
                    try:
                        result = self._results.get(timeout=timeout)
                    except queue.Empty:
                        break
                    timeout = 0
                    if isinstance(result, _Refused):
                        self._last_refusal = result.reason
                        self.on_refused(result.peer, result.reason)
                        continue
                    reason = self._refusal(result, first, admitted)
                    if reason is not None:
                        self._refuse(result.stream, reason)
                        continue
                    if first is None:
                        first, first_at = result, time.monotonic()
                    admitted[_key(result)] = result
        except BaseException:
            for entry in admitted.values():
                entry.stream.abort("the destination gave up waiting for the migration's streams", AbortCode.INTERNAL)
                entry.stream.close()
            raise
        finally:
            self._end_handshakes()  # the acceptor ends by itself within POLL; what it accepts meanwhile is closed
        return [admitted[key] for key in sorted(admitted, key=lambda k: (k[0] is Carries.POSTCOPY, k[1]))]

    def _accept_loop(self) -> None:
        while not self._stop.is_set() and not self._exhausted:
            try:
                self._accept_one()
            except MigrationError as error:
                self._failure = str(error)
                return

    def _end_handshakes(self) -> None:
        """Stop admitting; close the connections still in their handshake (their threads then end), and wait for
        the threads."""
        with self._lock:
            self._stop.set()
            pending = dict(self._pending)
        for channel in pending.values():
            channel.close()
        for thread in pending:
            thread.join(1.0)
        while True:  # streams admitted after the migration's own were complete: nobody will read them
            try:
                late = self._results.get_nowait()
            except queue.Empty:
                break
            if isinstance(late, Admitted):
                late.stream.abort("the destination is no longer admitting streams", AbortCode.PROTOCOL)
                late.stream.close()

    def _refusal(self, result: Admitted, first: Admitted | None,
                 admitted: dict[tuple[Carries, int], Admitted]) -> str | None:
        """Why an authenticated stream cannot join the migration being received, or None."""
        hello, waited = result.hello, self.resumption
        if waited is None and hello.resume:
            return "there is no paused post-copy migration to resume here"
        if waited is not None:
            if not hello.resume or hello.migration_id != waited.migration_id:
                return "this destination waits for a paused post-copy migration to resume; no other migration"
            if result.header != waited.header:
                return "the resumed migration's Header differs from the one it began with"
        if first is None:
            return None
        if hello.migration_id != first.hello.migration_id:
            return "another migration is being received here; one at a time"
        what = "post-copy channel" if hello.channel is Carries.POSTCOPY else f"stream {hello.stream_index}"
        if _key(result) in admitted:
            return f"the {what} of this migration is already connected"
        if result.header != first.header:
            return f"the {what} sent a different Header than stream {first.hello.stream_index}"
        return None

    def _refuse(self, stream: Stream, reason: str) -> None:
        self.on_refused(stream.channel.peer, reason)
        stream.abort(reason, AbortCode.PROTOCOL)
        stream.close()

    def _accept_one(self) -> None:
        try:
            channel = self.transport.accept(POLL)
        except TimeoutError:
            return
        except ListenerExhaustedError:
            self._exhausted = True
            return
        except OSError as error:
            raise MigrationError(f"the listener failed: {error.strerror or error}") from None
        thread = threading.Thread(target=self._handshake, args=(channel, time.perf_counter()), name="handshake",
                                  daemon=True)
        with self._lock:
            if self._stop.is_set():  # admission is over: no new handshake
                channel.close()
                return
            crowded = len(self._pending) >= MAX_PENDING
            if not crowded:
                self._pending[thread] = channel
        if crowded:
            self.on_refused(channel.peer, f"{MAX_PENDING} handshakes already in progress")
            channel.close()
            return
        thread.start()

    def _handshake(self, channel: Channel, connected_at: float) -> None:
        """HELLO, CHALLENGE, AUTH and the Header within the handshake deadline, on this connection's thread."""
        deadline = time.monotonic() + self.handshake_timeout
        conn = DestinationConnection(self.key, acceptance=self.acceptance, nonce=channel.replay_nonce)
        stream = Stream(-1, channel, conn)
        try:
            channel.settimeout(self.handshake_timeout)
            hello = stream.read_until(Hello, "source", _left(deadline))
            stream.write_now(conn.accept())
            header = stream.read_until(Header, "source", _left(deadline))
            stream.index = hello.stream_index
            channel.settimeout(self.io_timeout)
        except ProtocolError as error:  # the connection already told the peer (a REJECT or an Abort)
            stream.close()
            self._publish(_Refused(channel.peer, str(error)))
        except (DirtylogError, OSError) as error:
            reason = str(error) or type(error).__name__
            stream.abort(f"the destination refused the connection: {reason}", AbortCode.PROTOCOL)
            stream.close()
            self._publish(_Refused(channel.peer, reason))
        else:
            if not self._publish(Admitted(stream, hello, header), connected_at):
                stream.abort("the destination is no longer admitting streams", AbortCode.PROTOCOL)
                stream.close()

    def _publish(self, result: Admitted | _Refused, connected_at: float = 0.0) -> bool:
        """Hand this thread's result to ``run``; False when admission has ended meanwhile.

        Leaving ``_pending`` and publishing are one step under the lock: ``_end_handshakes`` closes the channels
        still pending, and an admitted stream must never be among them."""
        with self._lock:
            self._pending.pop(threading.current_thread(), None)
            if self._stop.is_set():
                return False
            if isinstance(result, Admitted) and not self.connected_at:
                self.connected_at = connected_at
            self._results.put(result)
            return True


def _key(entry: Admitted) -> tuple[Carries, int]:
    return entry.hello.channel, entry.hello.stream_index


def _needed(first: Admitted) -> int:
    """Connections the migration of ``first`` opens: its streams, and its post-copy channel if it may need one."""
    return first.hello.stream_count + (1 if first.header.postcopy else 0)


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise MigrationError("the handshake took longer than its deadline (--handshake-timeout)")
    return left
