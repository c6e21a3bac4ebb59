"""The source after the post-copy commit: answer page requests first, push the rest, survive a broken link.

The destination runs the VM; this side is paused for good but keeps its memory, because it holds every page the
destination does not have yet. Two things go on at once until each of those pages has been sent once:

* **Answers** (a thread of their own on the post-copy channel): a PageRequest is read, its pages gathered and
  sent back on the same channel at once, never behind the background push, and never held back by the bandwidth
  cap (they are charged to it, so the push gives way instead). The push then goes on from just after the pages
  asked for, as QEMU's does: a guest that faulted on one page is likely to want its neighbours next.
* **The push** (the engine's thread, on the stream): the pages still owed, in ascending order from a cursor,
  in small frames, so that the destination's installs and the answers stay short.

Then Complete on both connections, and the destination's Verified of the whole memory digest ends it.

A broken link (a reset, an EOF, a frame that fails its MAC, silence for the I/O timeout) is not a lost VM: both
connections are dropped, the migration is ``postcopy-paused``, and the source reconnects (every half second, to
``resume_to`` or the address it migrated to, or at once when :meth:`PostcopySource.resume` says where) with the
``resume`` flag; the destination answers with the pages it still lacks, and the push starts over from those. Only
an Abort the destination means (it gave up: it cannot run the VM) or the resume timeout ends it with an error; the
source then stays paused with its memory, as the error says.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt

from dirtylog.bitmap import DirtyBitmap
from dirtylog.guest.machine import Machine
from dirtylog.migration.engine.lanes import FAILED, PEER_CLOSED, Lane
from dirtylog.migration.engine.pacer import Pacer
from dirtylog.migration.engine.streams import RECV_CHUNK, Stream, StreamFailure
from dirtylog.migration.engine.urgency import Urgency, raise_thread_priority, short_switch_interval
from dirtylog.migration.errors import MigrationError
from dirtylog.migration.payload.digest import PageDigest, gather
from dirtylog.migration.payload.pages import pfns_from_runs, runs_from_pfns
from dirtylog.migration.payload.postcopy import make_postcopy_pages
from dirtylog.migration.policy.parameters import MigrationParameters
from dirtylog.migration.policy.stats import MigrationStats, MigrationStatus, ProgressCallback
from dirtylog.migration.protocol.errors import ProtocolError
from dirtylog.migration.protocol.events import (
    CLOSED,
    NEED_DATA,
    Abort,
    AbortCode,
    Channel,
    Complete,
    Missing,
    PageRequest,
    Ready,
    Verified,
)
from dirtylog.migration.protocol.rules import Phase
from dirtylog.migration.transports import Endpoint, parse_endpoint
from dirtylog.units import PAGE_SIZE

if TYPE_CHECKING:
    from dirtylog.migration.engine.answer_lane import AnswerLane

PUSH_PAGES = 256  # pages per pushed frame (1 MiB): short installs on the destination, little per-frame cost
ANSWER_PAGES = 64  # pages per answer frame (a request for more is answered in several)
SCAN_WINDOW = 1 << 16  # pages the push looks through at a time for the next pages owed
RETRY_INTERVAL = 0.5  # seconds between attempts to reconnect a broken post-copy link
PROGRESS_INTERVAL = 0.2  # seconds between progress records
#: An Abort with these codes says a connection broke (a corrupt or forged frame): the link is resumed. Others say
#: the peer gave up the migration.
LINK_CODES = frozenset({AbortCode.PROTOCOL, AbortCode.AUTHENTICATION})


class LinkBrokenError(MigrationError):
    """The post-copy link broke; the migration pauses and resumes on a new one (caught by the phase, never
    raised to the caller)."""


class PostcopyOwner(Protocol):
    """What the post-copy phase uses of the migration that committed it (``engine/source.py``'s SourceMigration):
    named here so that this module does not import the one that imports it."""

    machine: Machine
    stats: MigrationStats
    params: MigrationParameters
    endpoint: Endpoint
    digest: PageDigest
    pacer: Pacer
    streams: list[Stream]
    postcopy_channel: Stream | None
    progress: ProgressCallback

    def open_channel(self, channel: Channel, *, resume: bool, to: Endpoint) -> Stream:
        """A new authenticated connection of ``channel``'s kind to ``to``."""
        ...


class PostcopySource:
    """Sends the pages ``pending`` (a page set of the source machine) after the post-copy commit."""

    def __init__(self, owner: PostcopyOwner, pending: DirtyBitmap) -> None:
        self.owner = owner
        self.pages = owner.machine.ram.pages
        self.stats = owner.stats
        self.unsent = np.zeros(len(pending), dtype=np.bool_)
        self.unsent[pending.pages()] = True
        self.remaining = pending.count()
        self.cursor = 0
        self.lock = threading.Lock()  # unsent, remaining, cursor, the digest, the counters
        self.stream = owner.streams[0]
        assert owner.postcopy_channel is not None
        self.channel = owner.postcopy_channel
        self._channel_lock = threading.Lock()  # answers and the channel's Complete
        self._answering = 0  # answers under way (their pages claimed, not all sent yet)
        self._channel_done = False  # the channel's Complete is sent: no more answers
        self._broken = threading.Event()
        self._why = ""
        self._stop = threading.Event()  # ends the answering thread
        self._server: threading.Thread | None = None
        self._resume_now = threading.Event()
        self.resume_to = parse_endpoint(owner.params.resume_to) if owner.params.resume_to else owner.endpoint
        self.paused = False
        self._push_buffer = np.ones((PUSH_PAGES, PAGE_SIZE), dtype=np.uint8)
        self._answer_buffer = np.ones((ANSWER_PAGES, PAGE_SIZE), dtype=np.uint8)
        self._last_progress = 0.0
        self._began = 0.0
        self.urgency = Urgency()  # answers go before the push
        self._lane: AnswerLane | None = None  # the compiled answers of this link, while it holds (answer_lane.py)
        #: Why answers are in Python on this link, if they are ("" when compiled).
        self.lane_unavailable = ""
        self._bytes_before = 0

    @property
    def streams(self) -> list[Stream]:
        """The connections of the post-copy phase now."""
        return [self.stream, self.channel]

    # --- the phase ----------------------------------------------------------------------------------------

    def run(self, broken: str = "") -> None:
        """Until the destination has verified every page; MigrationError if it gave up or the link never came back.
        ``broken``: the link broke already (right after the commit), so the phase begins paused."""
        began = self._began = time.perf_counter()
        self.owner.progress("postcopy", {"pending": self.remaining, "reason": self.stats.postcopy_reason})
        with short_switch_interval():
            if broken:
                self._pause(broken)
            while True:
                try:
                    self._serve()
                    break
                except LinkBrokenError as broken:
                    self._pause(str(broken))
        self.stats.postcopy_time = time.perf_counter() - began
        self._emit(force=True)

    def _serve(self) -> None:
        self._broken.clear()
        self._stop.clear()
        self._channel_done = False
        self.stream.channel.settimeout(self.owner.params.io_timeout)
        self.channel.channel.settimeout(0.2)  # the answering thread looks up now and then for the end
        self.lane_unavailable = "" if self.owner.params.compiled_faults else "turned off (compiled_faults)"
        self.lane_unavailable = self.lane_unavailable or Lane.unavailable(self.channel.conn)
        self.stats.fault_path = f"python: {self.lane_unavailable}" if self.lane_unavailable else "compiled"
        self._lane = None
        if not self.lane_unavailable:
            from dirtylog.migration.engine.answer_lane import AnswerLane  # Numba: only where it runs

            self._lane = AnswerLane(self.pages, self.unsent, self.owner.digest.values, answer_pages=ANSWER_PAGES,
                                    io_timeout=self.owner.params.io_timeout)
        self._server = threading.Thread(target=self._answer_loop, name="postcopy-answers", daemon=True)
        self._server.start()
        try:
            while (claimed := self._claim_push()) is not None:
                self._count_lane()
                self.urgency.yield_to_urgent()
                self._check_link()
                self._push(claimed)
                self._emit()
            self._finish()
        finally:
            self._stop.set()
            if self._lane is not None:
                self._lane.stop()
            if self._server is not None:
                self._server.join(2.0)
            self._count_lane()

    def _finish(self) -> None:
        """Everything owed was sent once: Complete on both connections, then the destination's Verified."""
        self._check_link()
        with self.lock:
            digest = self.owner.digest.digest()
        self.stats.digest = digest.hex()
        if self._lane is not None:
            self._lane.stop()  # the channel is Python's again: the Complete goes after the lane's last answer
            self._count_lane()
        try:
            while True:  # the channel's Complete follows every answer under way, never precedes one
                with self._channel_lock:
                    if not self._answering:
                        self.channel.send(Complete(digest, (self.channel.conn.frames_sent,)))
                        self._channel_done = True
                        break
                self._check_link()
                time.sleep(0.0005)
            self.stream.send(Complete(digest, (self.stream.conn.frames_sent,)))
        except MigrationError as error:
            raise self._link_error(str(error)) from None
        deadline = time.monotonic() + self.owner.params.io_timeout
        while True:
            self._check_link()
            try:
                event = self.stream.events.get(timeout=0.1)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise LinkBrokenError("no Verified from the destination within the I/O timeout") from None
                continue
            if isinstance(event, Verified):
                if event.digest != digest:
                    raise MigrationError(f"the destination verified digest {event.digest.hex()}, not the source's")
                if self._server is not None:
                    self._server.join(1.0)  # it ends at the channel's Verified
                self.stream.close()
                self.channel.close()
                return
            if isinstance(event, StreamFailure):
                raise self._link_error(event.reason, event.peer_abort)
            if isinstance(event, Abort):
                raise self._abort(event)

    # --- pushing ------------------------------------------------------------------------------------------

    def _claim_push(self) -> npt.NDArray[np.uint64] | None:
        """The next pages owed from the cursor on (up to PUSH_PAGES), marked sent; None when none is owed."""
        with self.lock:
            npages = len(self.unsent)
            scanned = 0
            while self.remaining and scanned <= npages:  # (the lane's answers make remaining an upper bound)
                end = min(self.cursor + SCAN_WINDOW, npages)
                # A copy first: the compiled answers clear pages of ``unsent`` without this lock, and NumPy's
                # nonzero counts, then fills, so a page cleared in between leaves garbage in its result.
                found = np.flatnonzero(self.unsent[self.cursor:end].copy())[:PUSH_PAGES]
                if found.size:
                    pfns = (found + self.cursor).astype(np.uint64)
                    self.unsent[pfns] = False
                    self.remaining -= int(pfns.size)
                    self.cursor = int(pfns[-1]) + 1
                    return pfns
                scanned += end - self.cursor
                self.cursor = 0 if end >= npages else end
            self.remaining = 0
            return None

    def _count_lane(self) -> None:
        """Fold what the compiled answers did since last time into the statistics, the pacer and the cursor."""
        if self._lane is None:
            return
        done = self._lane.counters()
        if not done["requests"] and not done["pages"]:
            return
        with self.lock:
            # Recounted, not decremented: a page the lane answered while the push was claiming it counts once.
            self.remaining = int(np.count_nonzero(self.unsent))
            self.stats.postcopy_requests += done["requests"]
            self.stats.pages_requested += done["pages"]
            self.stats.postcopy_bytes += done["bytes"]
            self.stats.transferred += done["bytes"]
            self.stats.remaining_pages = self.remaining
            if done["pages"]:  # the push goes on from just after the pages asked for, as in _answer_pages
                self.cursor = done["cursor"] if done["cursor"] < len(self.unsent) else 0
        self.owner.pacer.charge(done["bytes"])

    def _push(self, pfns: npt.NDArray[np.uint64]) -> None:
        starts, lengths = runs_from_pfns(pfns)
        prints = gather(self.pages, starts, lengths, self._push_buffer)
        with self.lock:
            self.owner.digest.set(pfns, prints)
        event = make_postcopy_pages(starts, lengths, self._push_buffer[:pfns.size], prints, requested=False,
                                    page_size=PAGE_SIZE)
        before = self.stream.bytes_sent
        try:
            self.stream.send(event)  # written on this thread (no sender thread): the buffer is free after
        except MigrationError as error:
            with self.lock:  # not sent: still owed (a resumed link learns what arrived from the destination anyway)
                self.unsent[pfns] = True
                self.remaining += int(pfns.size)
            raise self._link_error(str(error), peer_abort=True) from None
        with self.lock:
            self.stats.pages_pushed += int(pfns.size)
            self.stats.postcopy_bytes += self.stream.bytes_sent - before
            self.stats.transferred += self.stream.bytes_sent - before
            self.stats.remaining_pages = self.remaining

    # --- answering ----------------------------------------------------------------------------------------

    def _answer_loop(self) -> None:
        raise_thread_priority()  # a fault waits for this thread: run it before the busy threads around it
        stream = self.channel
        conn, transport = stream.conn, stream.channel
        view = memoryview(bytearray(RECV_CHUNK))
        try:
            if self._lane is not None and self._run_lane():
                return
            while not self._stop.is_set():
                try:
                    count = transport.recv_into(view)
                except TimeoutError:
                    continue
                conn.receive_data(view[:count])
                if self._take_events():
                    return
                if count == 0:
                    raise OSError("the destination closed the post-copy channel")
        except ProtocolError as error:
            stream.reply_best_effort(error.reply)
            self._break(f"post-copy channel: {error}")
        except (OSError, MigrationError) as error:
            if not self._stop.is_set():
                self._break(f"post-copy channel: {getattr(error, 'strerror', None) or error}")

    def _run_lane(self) -> bool:
        """The compiled answers until they stop; then what they left to Python. Whether the channel's
        conversation ended there (Verified, Abort)."""
        assert self._lane is not None
        conn = self.channel.conn
        result = self._lane.run(conn, self.channel.channel.fileno())  # type: ignore[attr-defined]
        if result.leftover:
            conn.receive_data(result.leftover)
        if result.outcome == FAILED:
            raise OSError(result.errno, os.strerror(result.errno))
        if result.outcome == PEER_CLOSED:
            conn.receive_data(b"")
        if self._take_events():
            return True
        if result.outcome == PEER_CLOSED:
            raise OSError("the destination closed the post-copy channel")
        return False

    def _take_events(self) -> bool:
        """Handle the events received on the channel; whether its conversation ended (Verified, Abort)."""
        stream = self.channel
        while (event := stream.conn.next_event()) is not NEED_DATA:
            if event is CLOSED:
                raise OSError("the destination closed the post-copy channel")
            if isinstance(event, PageRequest):
                with self.lock:  # every request received counts, as the destination counts every one sent
                    self.stats.postcopy_requests += 1
                if stream.conn.phase is not Phase.CHANNEL_END:  # else it crossed our Complete: sent already
                    with self.urgency.urgent():
                        self._answer(event)
            elif isinstance(event, Verified):
                return True  # the destination has every page
            elif isinstance(event, Abort):
                self._break(self._abort_reason(event), fatal=event.code not in LINK_CODES)
                return True
        return False

    def _answer(self, request: PageRequest) -> None:
        """The pages asked for, at once, on the post-copy channel, whether or not they were pushed already (a push
        in flight may be queued behind others)."""
        wanted = pfns_from_runs(request.starts, request.lengths)
        with self._channel_lock:
            if self._channel_done:
                return  # it crossed the channel's Complete: every page was sent already
            self._answering += 1
        try:
            self._answer_pages(wanted)
        finally:
            with self._channel_lock:
                self._answering -= 1

    def _answer_pages(self, wanted: npt.NDArray[np.uint64]) -> None:
        with self.lock:
            owed = self.unsent[wanted]
            self.unsent[wanted] = False
            self.remaining -= int(np.count_nonzero(owed))
            self.cursor = int(wanted[-1]) + 1 if int(wanted[-1]) + 1 < len(self.unsent) else 0
        for first in range(0, wanted.size, ANSWER_PAGES):
            pfns = wanted[first:first + ANSWER_PAGES]
            starts, lengths = runs_from_pfns(pfns)
            prints = gather(self.pages, starts, lengths, self._answer_buffer)
            event = make_postcopy_pages(starts, lengths, self._answer_buffer[:pfns.size], prints, requested=True,
                                        page_size=PAGE_SIZE)
            with self._channel_lock:
                with self.channel.lock:  # (the channel's Complete waits for this answer: see _finish)
                    buffers = self.channel.conn.send(event)
                size = sum(len(b) for b in buffers)
                self.owner.pacer.charge(size)  # the answer does not wait; the push gives way instead
                self.channel.channel.send(buffers)
                self.channel.bytes_sent += size
            with self.lock:
                self.owner.digest.set(pfns, prints)
                self.stats.pages_requested += int(pfns.size)
                self.stats.postcopy_bytes += size
                self.stats.transferred += size
                self.stats.remaining_pages = self.remaining

    # --- the link -----------------------------------------------------------------------------------------

    def break_link(self, reason: str) -> None:
        """Drop both connections now (migrate-pause); the migration pauses, to be resumed."""
        self._break(reason)
        for stream in self.streams:
            stream.channel.shutdown_write()
            stream.channel.close()

    def _break(self, reason: str, fatal: bool = False) -> None:
        if not self._broken.is_set():
            self._why = ("fatal: " if fatal else "") + reason
            self._broken.set()

    def _check_link(self) -> None:
        if self._broken.is_set():
            if self._why.startswith("fatal: "):
                raise MigrationError(self._why.removeprefix("fatal: "))
            raise LinkBrokenError(self._why)
        failure = self.stream.failure
        if failure is not None:
            raise self._link_error(failure.reason, failure.peer_abort)

    def _link_error(self, reason: str, peer_abort: bool = False) -> Exception:
        """A failure of the stream: the link broke (resume), unless the destination aborted for its own reasons."""
        if peer_abort:
            abort = next((e for e in list(self.stream.events.queue) if isinstance(e, Abort)), None)
            if abort is not None and abort.code not in LINK_CODES:
                return MigrationError(self._abort_reason(abort))
        return LinkBrokenError(reason)

    def _abort(self, abort: Abort) -> Exception:
        if abort.code in LINK_CODES:
            return LinkBrokenError(f"the destination refused a frame: {abort.reason}")
        return MigrationError(self._abort_reason(abort))

    @staticmethod
    def _abort_reason(abort: Abort) -> str:
        return f"the destination gave up in post-copy: {abort.reason}"

    def resume(self, to: Endpoint | None) -> None:
        """Reconnect now (to ``to``, from now on, when given)."""
        if to is not None:
            self.resume_to = to
        self._resume_now.set()

    def _pause(self, reason: str) -> None:
        """The link broke: drop it, then reconnect until it comes back or the resume timeout passes."""
        paused_at = time.perf_counter()
        self.paused = True
        self.stats.status = MigrationStatus.POSTCOPY_PAUSED
        for stream in self.streams:
            stream.close()
        self.owner.progress("postcopy-paused", {"reason": reason, "remaining": self.remaining})
        timeout = self.owner.params.resume_timeout
        deadline = None if timeout is None else time.monotonic() + timeout
        last = reason
        while True:
            # Asked (QMP's migrate with resume): reported as QEMU's postcopy-recover, and back to paused if it fails.
            # The retries on our own are quiet: no status flickers every half second.
            asked = self._resume_now.wait(RETRY_INTERVAL)
            self._resume_now.clear()
            self.stats.status = MigrationStatus.POSTCOPY_RECOVER
            if asked:
                self.owner.progress("postcopy-recover", {"to": str(self.resume_to)})
            try:
                self._reconnect()
                break
            except MigrationError as error:
                last = str(error)
                self.stats.status = MigrationStatus.POSTCOPY_PAUSED
            except ProtocolError as error:
                last = f"the resumed stream failed: {error}"
                self.stats.status = MigrationStatus.POSTCOPY_PAUSED
            if asked:
                self.owner.progress("postcopy-paused", {"reason": last, "remaining": self.remaining})
            if deadline is not None and time.monotonic() > deadline:
                raise MigrationError(f"the post-copy link broke ({reason}) and did not come back within "
                                     f"{timeout:g} s (last attempt: {last})")
        self.paused = False
        self.stats.recoveries += 1
        self.stats.paused_time += time.perf_counter() - paused_at
        self.stats.status = MigrationStatus.POSTCOPY_ACTIVE
        self.owner.progress("postcopy-resumed", {"remaining": self.remaining, "to": str(self.resume_to),
                                                 "paused_ms": round((time.perf_counter() - paused_at) * 1e3, 3)})

    def _reconnect(self) -> None:
        """Both connections again, with the resume flag; the destination says which pages it still lacks."""
        stream = self.owner.open_channel(Channel.STREAM, resume=True, to=self.resume_to)
        try:  # both before any answer: the destination admits them together
            channel = self.owner.open_channel(Channel.POSTCOPY, resume=True, to=self.resume_to)
        except BaseException:
            stream.close()
            raise
        try:
            missing = stream.read_until(Missing, "destination", self.owner.params.io_timeout)
            channel.read_until(Ready, "destination", self.owner.params.io_timeout)
        except BaseException:
            stream.close()
            channel.close()
            raise
        stream.start(sender=False)
        with self.lock:
            self.unsent[:] = False
            self.unsent[missing.pages.pages()] = True
            self.remaining = missing.pages.count()
            self.cursor = 0
            self.stats.remaining_pages = self.remaining
        self.stream, self.channel = stream, channel
        self.owner.streams[0] = stream
        self.owner.postcopy_channel = channel

    def _emit(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last_progress < PROGRESS_INTERVAL:
            return
        self._last_progress = now
        stats = self.stats
        stats.postcopy_timeline.append((now - self._began, self.remaining, stats.postcopy_requests))
        self.owner.progress("postcopy-progress", {
            "remaining": self.remaining, "pages_pushed": stats.pages_pushed, "pages_requested": stats.pages_requested,
            "requests": stats.postcopy_requests, "bytes": stats.postcopy_bytes, "recoveries": stats.recoveries})
