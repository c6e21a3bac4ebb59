"""The source side of a live migration: pre-copy rounds over authenticated streams, then switch-over.

The source owns the VM until it sends Commit. Before that, any failure (a dead peer, a corrupt frame,
a refused key, the time limit) ends the same way: Abort to the destination, the tracker and throttle
off, the vCPUs resumed if switch-over had paused them, and a :class:`MigrationError`. Guest memory is
only ever read here, so it is intact. After Commit the destination owns the VM and the source machine is
handed off: it never resumes (two-phase commit: see ``protocol/rules.py``). A stream to a file has no
destination to take the VM over: the machine stays paused, and may be resumed or stopped.

With post-copy allowed (``postcopy=True``) the source also opens the migration's post-copy channel at setup, and
when pre-copy is told to stop (after some rounds, when it does not converge, or on request) it hands the VM over
before all of its memory (:meth:`SourceMigration._switch_postcopy`), then sends the rest
(``engine/postcopy_source.py``), paused for good but keeping its memory until the destination has every page.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import queue
import threading
import time
from typing import Any

import numpy as np
import numpy.typing as npt

from dirtylog.bitmap import DirtyBitmap, load_kernels
from dirtylog.guest.machine import Machine, State
from dirtylog.migration.engine.lanes import compiled_unavailable
from dirtylog.migration.engine.pacer import Pacer
from dirtylog.migration.engine.postcopy_source import PostcopySource
from dirtylog.migration.engine.recording import RecordingPeer
from dirtylog.migration.engine.streams import QUEUE_DEPTH, Stream, close_aborted
from dirtylog.migration.errors import MigrationError
from dirtylog.migration.keys import load_key
from dirtylog.migration.payload.digest import PageDigest, gather
from dirtylog.migration.payload.digest import load_kernels as load_digest_kernels
from dirtylog.migration.payload.pages import make_page_batch, pfns_from_runs
from dirtylog.migration.payload.vm import header_of
from dirtylog.migration.policy.parameters import MigrationParameters
from dirtylog.migration.policy.precopy import Action, PrecopyController, RoundStats
from dirtylog.migration.policy.stats import MigrationStats, MigrationStatus, ProgressCallback, ms
from dirtylog.migration.protocol.connection import SourceConnection
from dirtylog.migration.protocol.errors import ProtocolError
from dirtylog.migration.protocol.events import (
    Abort,
    AbortCode,
    Accepted,
    Channel,
    Commit,
    Complete,
    Header,
    PageBatch,
    PostcopyStart,
    Ready,
    Resumed,
    RoundEnd,
    VcpuState,
    Verified,
)
from dirtylog.migration.transports import Channel as Transport
from dirtylog.migration.transports import Endpoint, connect, parse_endpoint
from dirtylog.migration.transports.files import FileWriter
from dirtylog.rate.limit import DirtyLimitController
from dirtylog.tracking.base import Tracker
from dirtylog.tracking.kvm_ring import RingTracker
from dirtylog.tracking.modes import open_tracker
from dirtylog.units import PAGE_SIZE


def preload() -> None:
    """Load the compiled passes a migration uses (0.3-1 s once per process, seconds when they compile on a first
    run), so that no migration's setup pays for them: call it while a VM warms up or a control socket starts."""
    load_kernels()
    load_digest_kernels()
    load_answer_lane()


def load_answer_lane() -> None:
    """Load post-copy's compiled answers where this host can run them (0.3 s; 5 s when they compile on a first
    run, which must not happen while a destination waits: a migration that may switch to post-copy calls this
    before it connects)."""
    if not compiled_unavailable():
        from dirtylog.migration.engine.answer_lane import load_kernels as load_lane

        load_lane()


def migrate(machine: Machine, to: str, *, key_file: str, parameters: MigrationParameters | None = None,
            progress: ProgressCallback | None = None, **changes: Any) -> MigrationStats:
    """Live-migrate a running ``machine`` to ``to``: a ``dirtylog receive`` listening at ``host:port`` or
    ``unix:PATH``, or a file (``file:PATH``) that ``dirtylog receive --listen file:PATH`` loads later.

    ``parameters`` (default :class:`MigrationParameters`'s defaults) with ``changes`` by name, e.g.
    ``downtime_limit="50ms"``, ``bandwidth="1G"``, ``streams=2``. Returns QEMU-style statistics when the
    destination runs the VM (or the file is whole). Raises :class:`MigrationError` otherwise, with the
    source still running and its memory intact (unless the message says the commit was sent, in which case
    the destination may own the VM and the source stays paused).
    """
    params = MigrationParameters.parse(parameters, **changes)
    return SourceMigration(machine, to, load_key(key_file), params, progress).run()


class SourceMigration:
    """One migration attempt from a running machine."""

    def __init__(self, machine: Machine, to: str, key: bytes, params: MigrationParameters,
                 progress: ProgressCallback | None = None) -> None:
        if machine.state is not State.RUNNING:
            raise MigrationError(f"only a running machine can be migrated live; this one is {machine.state.value}")
        if params.mode == "ring" and machine.vm.dirty_ring_bytes == 0:
            raise MigrationError("mode 'ring' needs a machine created with a dirty ring (Machine(..., dirty_ring="
                                 "True)); KVM allows rings only before vCPUs exist. Or use mode 'log' or 'clear'")
        self.machine = machine
        self.to = to
        self.endpoint = parse_endpoint(to)
        if self.endpoint.scheme == "file" and params.streams != 1:
            raise MigrationError(f"a migration to {to} writes one stream; use streams=1")
        if self.endpoint.scheme == "file" and params.postcopy:
            raise MigrationError(f"post-copy needs a destination that runs the VM and asks for pages; {to} is a file")
        self.key = key
        self.params = params
        self.progress = progress or (lambda kind, record: None)
        self.streams: list[Stream] = []
        self.stats = MigrationStats(page_size=PAGE_SIZE, total_pages=machine.ram.npages, streams=params.streams,
                                    compression=params.compression, mode=params.mode)
        self.controller = PrecopyController(params)
        self.tracker: Tracker | None = None
        self.digest = PageDigest(machine.ram.npages)
        self.pacer = Pacer(params.bandwidth)
        self.rtt = 0.0
        self.committed = False
        self.refused_after_commit = False
        self.paused_by_us = False
        self._limiter: DirtyLimitController | None = None
        self._cancel = threading.Event()  # set by cancel() from another thread
        self._start_postcopy = threading.Event()  # set by start_postcopy() (QMP's migrate-start-postcopy)
        self.migration_id = os.urandom(16)
        self.header: Header | None = None
        #: The post-copy channel (requests and their answers), opened at setup when post-copy is allowed.
        self.postcopy_channel: Stream | None = None
        self.postcopy: PostcopySource | None = None  # the phase after the post-copy commit
        self.link_broken = ""  # why the link broke between the post-copy commit and Resumed
        self._next_stream = self._last_stream = 0
        # One stream is written from this thread, several by a sender thread each (see streams.py).
        self._sender_threads = params.streams > 1
        # Batch buffers in flight: each stream's queue, the one being written, the one being filled.
        count = params.streams * (QUEUE_DEPTH + 1) + 1 if self._sender_threads else 1
        self._buffers: queue.SimpleQueue[npt.NDArray[np.uint8]] = queue.SimpleQueue()  # C: cheap per frame
        for _ in range(count):
            # np.ones, not np.zeros: its pages are allocated now, not on first use inside round 0.
            self._buffers.put(np.ones((params.batch_pages, PAGE_SIZE), dtype=np.uint8))

    # --- the whole migration ------------------------------------------------------------------------

    def run(self) -> MigrationStats:
        """Migrate; return the statistics, or raise MigrationError with the source intact."""
        start = time.perf_counter()
        try:
            phases = self._connect()
            began = time.perf_counter()
            self.tracker = open_tracker(self.machine, self.params.mode)
            self.tracker.enable()
            phases["enable_logging"] = time.perf_counter() - began
            self.stats.setup_time = time.perf_counter() - start
            self.stats.setup_phases = phases
            self.stats.status = MigrationStatus.ACTIVE
            self.progress("setup", {"setup_time_ms": round(self.stats.setup_time * 1e3, 3),
                                    "setup_phases_ms": self.stats.as_dict()["setup_phases_ms"]})
            pending, action = self._precopy(start)
            if action is Action.POSTCOPY:
                self._switch_postcopy(pending, start)
            else:
                self._switchover(pending, start)
        except BaseException as error:
            self._fail(error, start)
            failure = self._as_migration_error(error)
            failure.stats = self.stats
            raise failure from (None if isinstance(error, MigrationError) else error)
        finally:
            self._stop_helpers()
        self.stats.total_time = time.perf_counter() - start
        self.stats.status = MigrationStatus.COMPLETED
        return self.stats

    # --- connecting ---------------------------------------------------------------------------------

    def _connect(self) -> dict[str, float]:
        """Open every stream: handshake, then the Header at once (the destination builds the VM from the
        first stream's Header before it accepts the next stream), then wait for every Ready. Returns when each
        setup phase took (connect, handshake, kernels, ready), for the statistics."""
        phases: dict[str, float] = {"connect": 0.0, "handshake": 0.0}
        if self.params.postcopy:  # before anyone waits for us (loaded once per process)
            began = time.perf_counter()
            load_answer_lane()
            phases["kernels"] = time.perf_counter() - began
        header = self.header = header_of(self.machine, codec=self.params.compression, streams=self.params.streams,
                                         postcopy=self.params.postcopy)
        migration_id = self.migration_id
        count = self.params.streams
        pace = self._pace if self.params.bandwidth else None
        for index in range(count):
            began = time.perf_counter()
            channel: Transport = connect(self.endpoint, self.params.connect_timeout)
            phases["connect"] += time.perf_counter() - began
            if isinstance(channel, FileWriter):
                channel = RecordingPeer(channel, self.key)  # nobody answers a file: answer ourselves
            channel.settimeout(self.params.io_timeout)
            if index == 0:  # guest memory is private: encrypted whenever it leaves this host, unless told
                self.stats.encrypted = self.params.encrypt if self.params.encrypt is not None else not channel.local
            conn = SourceConnection(self.key, migration_id=migration_id, stream_index=index, stream_count=count,
                                    encrypt=self.stats.encrypted)
            stream = Stream(index, channel, conn, pace)
            self.streams.append(stream)
            began = time.perf_counter()
            stream.write_now(conn.initiate())
            stream.read_until(Accepted, "destination", self.params.io_timeout)
            self.rtt = time.perf_counter() - began if index == 0 else min(self.rtt, time.perf_counter() - began)
            phases["handshake"] += time.perf_counter() - began
            stream.send(header)
        if self.params.postcopy:
            # Before any Ready: the destination admits the channel with the streams, and builds the VM after.
            began = time.perf_counter()
            self.postcopy_channel = self.open_channel(Channel.POSTCOPY, resume=False, to=self.endpoint)
            phases["handshake"] += time.perf_counter() - began
        began = time.perf_counter()
        load_kernels()  # while the destination builds its VM, so that no round pays for them (free once loaded)
        load_digest_kernels()
        phases["kernels"] = phases.get("kernels", 0.0) + time.perf_counter() - began
        began = time.perf_counter()
        for stream in self.streams:
            stream.read_until(Ready, "destination", self.params.io_timeout)
        if self.postcopy_channel is not None:
            self.postcopy_channel.read_until(Ready, "destination", self.params.io_timeout)
        phases["ready"] = time.perf_counter() - began
        for stream in self.streams:
            stream.start(sender=self._sender_threads)
        return phases

    def open_channel(self, channel: Channel, *, resume: bool, to: Endpoint) -> Stream:
        """A connection of this migration (the same id and key) through its handshake and Header, no threads yet:
        the post-copy channel, or, when resuming a broken post-copy, the stream again."""
        assert self.header is not None
        transport = connect(to, self.params.connect_timeout)
        transport.settimeout(self.params.io_timeout)
        conn = SourceConnection(self.key, migration_id=self.migration_id, encrypt=self.stats.encrypted,
                                channel=channel, resume=resume)
        stream = Stream(0, transport, conn, self._pace if self.params.bandwidth else None)
        try:
            stream.write_now(conn.initiate())
            stream.read_until(Accepted, "destination", self.params.io_timeout)
            stream.send(self.header)
        except BaseException:
            transport.close()
            raise
        return stream

    # --- pre-copy -----------------------------------------------------------------------------------

    def _precopy(self, start: float) -> tuple[DirtyBitmap, Action]:
        """Send rounds until the controller says switch over (or switch to post-copy); return the pages still to
        send and which it is."""
        assert self.tracker is not None
        npages = self.machine.ram.npages
        pending = DirtyBitmap.full(npages)  # round 0: everything (zero pages are elided, not sent)
        at_once = self.controller.before_rounds()
        if at_once is not None:
            self.stats.postcopy_reason = at_once.reason
            return pending, at_once.action
        round_ = 0
        stop_at = None if self.params.max_time is None else start + self.params.max_time
        while True:
            began = time.perf_counter()
            pages, zero, wire, unsent = self._send_round(round_, pending, final=False, stop_at=stop_at)
            dirty = self.tracker.collect()
            if unsent is not None:  # the time limit fell inside the round: what it did not send is still owed
                dirty |= unsent
            self.stats.dirty_sync_count += 1
            self.stats.remaining_pages = dirty.count()
            round_stats = RoundStats(round_, began - start, time.perf_counter() - began, pages, zero, wire,
                                     self.stats.remaining_pages, self.controller.throttle,
                                     self.controller.dirty_limited)
            decision = self.controller.after_round(round_stats, time.perf_counter() - start,
                                                   start_postcopy=self._start_postcopy.is_set())
            self.stats.rounds.append(round_stats)
            self.stats.expected_downtime = decision.expected_downtime
            self._apply_convergence(decision.throttle, decision.dirty_limited)
            self.progress("round", {**round_stats.as_dict(PAGE_SIZE),
                                    "expected_downtime_ms": ms(decision.expected_downtime),
                                    "action": decision.action.value, "reason": decision.reason})
            if decision.action is Action.CANCEL:
                self.stats.status = MigrationStatus.CANCELLED
                raise MigrationError(f"migration cancelled: {decision.reason}. Raise --max-time or the downtime "
                                     "limit, or use --auto-converge")
            if decision.action is Action.SWITCHOVER:
                return dirty, decision.action
            if decision.action is Action.POSTCOPY:
                self.stats.postcopy_reason = decision.reason
                return dirty, decision.action
            self._raise_if_cancelled()
            pending = dirty
            round_ += 1

    def _send_round(self, round_: int, pending: DirtyBitmap, final: bool, stop_at: float | None = None,
                    ) -> tuple[int, int, int, DirtyBitmap | None]:
        """Send ``pending`` as round ``round_``; returns pages, zero pages, wire bytes, and the pages left unsent
        because ``stop_at`` (a ``perf_counter`` time) came first (None when the round was whole)."""
        sent_before = sum(s.bytes_sent for s in self.streams)  # every queue is drained between rounds
        transferred_before = self.stats.transferred
        pages_total = zero_total = 0
        per_stream = [0] * len(self.streams)
        unsent: DirtyBitmap | None = None
        self.stats.remaining_pages = pending.count()
        for starts, lengths in pending.batches(self.params.batch_pages_for(PAGE_SIZE)):
            if (stop_at is not None and time.perf_counter() >= stop_at) or (
                    not final and self.params.postcopy and self._start_postcopy.is_set()):
                unsent = self._rest_of(pending, int(starts[0]))
                break
            self._raise_if_cancelled()
            buffer = self._buffers.get()
            sent, zeros, covered = self._send_batch(round_, starts, lengths.astype(np.uint32, copy=False), buffer)
            if sent:
                per_stream[self._last_stream] += sent
            pages_total += sent
            zero_total += zeros
            self.stats.remaining_pages -= covered
            # Live for query-migrate: a round of a GiB takes a second or more.
            self.stats.transferred = transferred_before + sum(s.bytes_sent for s in self.streams) - sent_before
        stats = {"final": final}
        for stream, count in zip(self.streams, per_stream, strict=True):
            stream.send(RoundEnd(round_, count, stats))
        # A round ends when its bytes are on the wire, not in our queues: otherwise its rate is flattered
        # and the switch-over would wait for data the controller thought was sent.
        for stream in self.streams:
            stream.drain(self.params.io_timeout)
        self.stats.duplicate_pages += zero_total
        wire = sum(s.bytes_sent for s in self.streams) - sent_before
        self.stats.transferred = transferred_before + wire
        return pages_total, zero_total, wire, unsent

    @staticmethod
    def _rest_of(pending: DirtyBitmap, first: int) -> DirtyBitmap:
        """The pages of ``pending`` from page ``first`` on (batches go in ascending page order)."""
        before = DirtyBitmap.empty(len(pending))
        before.set_range(0, first)
        return pending - before

    def _send_batch(self, round_: int, starts: npt.NDArray[np.uint64], lengths: npt.NDArray[np.uint32],
                    buffer: npt.NDArray[np.uint8]) -> tuple[int, int, int]:
        """Copy one batch of pages into ``buffer``, fingerprint it and queue it; returns (pages on the wire,
        zero pages, pages the batch covered). ``buffer`` goes back to the pool once the channel has taken it."""
        # A private copy: the guest keeps writing, and the MAC covers what send() saw. Its fingerprints,
        # taken in the same pass, feed the digest and find zero pages (a fingerprint of 0 is confirmed by
        # looking at the page).
        prints = gather(self.machine.ram.pages, starts, lengths, buffer)
        pages = buffer[:prints.size]
        if starts.size == 1 and prints.all():
            # The usual batch, one run with no zero page, decided here where it is made: no zero mask, so
            # PageBatch.run tells every later step (a zero page's fingerprint is 0; not every page
            # fingerprinted 0 is zero, but those go the careful way below). Per-frame Python costs here
            # ~10-20 us a NumPy call, with the cache full of page data: slices and ints, no page arrays.
            self.digest.set_run(int(starts[0]), prints)
            batch = make_page_batch(round_, None, None, pages, page_size=PAGE_SIZE,
                                    codec=self.params.compression, runs=(starts, lengths))
            self._queue(batch, buffer)
            self.stats.normal_pages += prints.size
            return prints.size, 0, prints.size
        pfns = pfns_from_runs(starts, lengths)
        covered = int(pfns.size)
        zero = prints == 0
        if zero.any():
            zero[zero] = ~pages[zero].view(np.uint64).any(axis=1)
        if not self.params.zero_pages:
            zero[:] = False
        runs: tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint32]] | None = (starts, lengths)
        zeros = int(np.count_nonzero(zero))
        if round_ == 0 and zeros:
            # The destination starts zeroed: round 0 need not mention zero pages at all.
            if zeros == pfns.size:
                self._buffers.put(buffer)
                return 0, zeros, covered
            keep = ~zero
            pfns, pages, prints, zero, runs = pfns[keep], pages[keep], prints[keep], zero[keep], None
        data = pages if not zero.any() else pages[~zero]
        self.digest.set(pfns, prints)
        batch = make_page_batch(round_, pfns, zero, data, page_size=PAGE_SIZE, codec=self.params.compression,
                                runs=runs)
        self._queue(batch, buffer)
        self.stats.normal_pages += int(pfns.size - np.count_nonzero(zero))
        return int(pfns.size), zeros, covered

    def _queue(self, batch: PageBatch, buffer: npt.NDArray[np.uint8]) -> None:
        """Send ``batch`` on the next stream; ``buffer``, which holds its data, returns to the pool once sent."""
        index = self._last_stream = self._next_stream
        self._next_stream = (index + 1) % len(self.streams)
        self.streams[index].send(batch, on_sent=functools.partial(self._buffers.put, buffer))

    # --- convergence aids ---------------------------------------------------------------------------

    def _apply_convergence(self, throttle: float, dirty_limited: bool) -> None:
        if throttle != self.machine.throttle:
            self.machine.set_throttle(throttle)
            self.stats.throttle = throttle
        if dirty_limited and self._limiter is None:
            # The dirty limit of dirtylog.rate, on the migration's own ring tracker: a second tracker on the
            # same rings would find them already harvested.
            assert isinstance(self.tracker, RingTracker) and self.params.dirty_limit
            self.stats.dirty_limited = True
            self._limiter = DirtyLimitController(self.machine, self.tracker)
            self._limiter.set_limit(self.params.dirty_limit)

    def _stop_helpers(self) -> None:
        if self._limiter is not None:
            self._limiter.stop()
        if self.machine.throttle:
            self.machine.set_throttle(0.0)

    # --- cancelling and retuning from another thread (QMP's migrate_cancel, and
    # migrate-set-parameters during a migration, as QEMU allows for downtime-limit and max-bandwidth) --------

    def cancel(self) -> None:
        """Stop at the next batch (or before the commit): the migration then fails with status CANCELLED and
        the source keeps running. Too late once Commit is sent (the destination owns the VM, and in post-copy
        needs the pages this source still holds): no effect."""
        self._cancel.set()

    def start_postcopy(self) -> None:
        """Switch to post-copy at the next batch (QMP's migrate-start-postcopy); needs ``postcopy=True``. Harmless
        once the migration has switched over or ended."""
        self._start_postcopy.set()

    def resume(self, to: str | None = None) -> None:
        """Reconnect a post-copy migration whose link broke, now, to ``to`` (default: where it reconnects anyway);
        QMP's ``migrate`` with ``resume: true``. MigrationError when nothing is paused."""
        if self.postcopy is None or not self.postcopy.paused:
            raise MigrationError("Cannot resume if there is no paused migration")
        self.postcopy.resume(parse_endpoint(to) if to else None)

    def pause_link(self) -> None:
        """Break the post-copy link on purpose (QMP's migrate-pause): both sides pause, to be resumed."""
        if self.postcopy is None or self.postcopy.paused:
            raise MigrationError("migrate-pause is only possible in post-copy, while its link is up")
        self.postcopy.break_link("paused on request (migrate-pause)")

    def _raise_if_cancelled(self) -> None:
        if self._cancel.is_set():
            self.stats.status = MigrationStatus.CANCELLED
            raise MigrationError("migration cancelled on request")

    def set_downtime_limit(self, seconds: float) -> None:
        """A new downtime limit for this migration, used from the next round's decision."""
        self.params = dataclasses.replace(self.params, downtime_limit=seconds)
        self.controller.policy = self.params

    def set_bandwidth(self, bytes_per_second: float | None) -> None:
        """A new bandwidth cap (None: none) for this migration, from the next write on."""
        self.params = dataclasses.replace(self.params, bandwidth=bytes_per_second)
        self.controller.policy = self.params
        self.pacer = Pacer(bytes_per_second)  # a write sleeping on the old bucket finishes there
        for stream in self.streams:
            stream.pace = self._pace

    def _pace(self, nbytes: int) -> None:
        self.pacer.wait(nbytes)

    # --- switch-over --------------------------------------------------------------------------------

    def _switchover(self, pending: DirtyBitmap, start: float) -> None:
        assert self.tracker is not None
        self._stop_helpers()
        paused_at = time.perf_counter()
        # The guest is paused from here: no step may keep it so for the whole I/O timeout. Past the deadline the
        # source resumes it and fails (before the commit), or says it cannot know (after).
        deadline = paused_at + self.params.switchover_deadline
        self.machine.pause()
        self.paused_by_us = True
        try:
            self._switch(pending, start, paused_at, deadline)
        except MigrationError as error:
            if time.perf_counter() < deadline:
                raise
            # Whatever wait ran out, the deadline is why: say that, not which socket noticed.
            raise MigrationError(f"the switch-over took longer than its {self.params.switchover_deadline:.1f} s "
                                 f"deadline (the destination is slow or stalled: {error})") from None

    def _switch(self, pending: DirtyBitmap, start: float, paused_at: float, deadline: float) -> None:
        """The switch-over with the guest paused: the final round, the vCPUs, the two-phase commit."""
        assert self.tracker is not None
        for stream in self.streams:
            stream.channel.settimeout(self._left(deadline))
        phases = {"pause": time.perf_counter()}
        final = pending | self.tracker.collect()
        self.stats.dirty_sync_count += 1
        began = phases["final_collect"] = time.perf_counter()
        pages, zero, wire, _ = self._send_round(len(self.stats.rounds), final, final=True)
        primary = self.streams[0]
        for vcpu in range(self.machine.spec.vcpus):
            primary.send(VcpuState(vcpu, self.machine.vcpu_state(vcpu)))
        digest = self.digest.digest()  # every page dirtied since its last send went in the final round
        self.stats.digest = digest.hex()
        frames = tuple(stream.conn.frames_sent for stream in self.streams)
        for stream in reversed(self.streams):  # secondaries first: the primary's Complete is the last word
            stream.send(Complete(digest, frames))
        for stream in self.streams:
            stream.drain(self._left(deadline))
        phases["final_send"] = time.perf_counter()
        self.stats.rounds.append(RoundStats(len(self.stats.rounds), began - start, time.perf_counter() - began,
                                            pages, zero, wire, 0, self.controller.throttle,
                                            self.controller.dirty_limited, final=True))
        self.progress("switchover", {"pages": pages, "bytes": wire,
                                     "paused_ms": round((time.perf_counter() - paused_at) * 1e3, 3)})
        verified = primary.next_event(self._left(deadline), "Verified")
        if isinstance(verified, Abort):
            raise MigrationError(f"the destination refused the migration: {verified.reason}")
        if not isinstance(verified, Verified) or verified.digest != digest:
            raise MigrationError(f"the destination answered {type(verified).__name__} instead of verifying the digest")
        phases["verify"] = time.perf_counter()
        self._raise_if_cancelled()  # the last moment a cancel can still leave the VM here
        primary.send(Commit())
        primary.drain(self._left(deadline))
        self.committed = True
        answer = primary.next_event(self._left(deadline), "Resumed")
        if isinstance(answer, Abort):  # it said so: it will not run the VM, so the source may
            self.refused_after_commit = True
            raise MigrationError(f"the destination could not run the VM after the commit: {answer.reason}")
        if not isinstance(answer, Resumed):
            raise MigrationError(f"the destination answered {type(answer).__name__} instead of Resumed")
        if primary.channel.live:
            self.machine.hand_off(self.to)  # the destination runs the VM from now on
        phases["commit_resume"] = time.perf_counter()
        self.stats.downtime = max(0.0, phases["commit_resume"] - paused_at - self.rtt / 2)
        marks = [paused_at, *phases.values()]
        self.stats.switchover = {name: round((end - begin) * 1e3, 3)
                                 for name, begin, end in zip(phases, marks, marks[1:], strict=False)}
        self.tracker.disable()
        self.stats.remaining_pages = 0
        for stream in self.streams:
            stream.close()
        if self.postcopy_channel is not None:  # pre-copy finished the migration: the channel was never needed
            self.postcopy_channel.close()

    def _switch_postcopy(self, pending: DirtyBitmap, start: float) -> None:
        """Hand the VM over before all of its memory, then send the rest: the post-copy switch."""
        self._stop_helpers()
        self.stats.postcopy = True
        self.stats.status = MigrationStatus.POSTCOPY_ACTIVE
        paused_at = time.perf_counter()
        deadline = paused_at + self.params.switchover_deadline
        self.machine.pause()
        self.paused_by_us = True
        try:
            owed = self._handover(pending, start, paused_at, deadline)
        except MigrationError as error:
            if time.perf_counter() < deadline or self.committed:
                raise
            raise MigrationError(f"the switch-over took longer than its {self.params.switchover_deadline:.1f} s "
                                 f"deadline (the destination is slow or stalled: {error})") from None
        self.postcopy = PostcopySource(self, owed)
        self.postcopy.run(broken=self.link_broken)
        self.stats.remaining_pages = 0

    def _handover(self, pending: DirtyBitmap, start: float, paused_at: float, deadline: float) -> DirtyBitmap:
        """With the guest paused: what the host itself reads, the vCPUs, the pages still owed, the two-phase commit.
        Returns the pages owed (the destination fetches them on demand meanwhile)."""
        assert self.tracker is not None
        for stream in self.streams:
            stream.channel.settimeout(self._left(deadline))
        phases = {"pause": time.perf_counter()}
        final = pending | self.tracker.collect()
        self.stats.dirty_sync_count += 1
        self.tracker.disable()  # the source never runs again once it commits; before that a failure resumes it
        began = phases["final_collect"] = time.perf_counter()
        # The host reads pages of the system area (page tables, the program, the vCPUs' control blocks) while the
        # guest runs; on the destination a host thread must never wait for a page, since it would wait holding
        # the GIL that the fault handler needs. They go now, within the downtime: a few pages.
        system = DirtyBitmap.empty(len(final))
        system.set_range(0, self.machine.workload_pages.start)
        eager = final & system
        owed = final - eager
        pages, zero, wire, _ = self._send_round(len(self.stats.rounds), eager, final=True)
        primary = self.streams[0]
        for vcpu in range(self.machine.spec.vcpus):
            primary.send(VcpuState(vcpu, self.machine.vcpu_state(vcpu)))
        kept = self.digest.digest_as_zero(owed.pages())
        primary.send(PostcopyStart(owed, kept, (primary.conn.frames_sent,)))
        primary.drain(self._left(deadline))
        phases["final_send"] = time.perf_counter()
        self.stats.rounds.append(RoundStats(len(self.stats.rounds), began - start, time.perf_counter() - began,
                                            pages, zero, wire, owed.count(), self.controller.throttle,
                                            self.controller.dirty_limited, final=True))
        self.stats.postcopy_pending = self.stats.remaining_pages = owed.count()
        self.progress("switchover", {"pages": pages, "bytes": wire, "postcopy": True, "pending": owed.count(),
                                     "paused_ms": round((time.perf_counter() - paused_at) * 1e3, 3)})
        verified = primary.next_event(self._left(deadline), "Verified")
        if isinstance(verified, Abort):
            raise MigrationError(f"the destination refused the post-copy switch: {verified.reason}")
        if not isinstance(verified, Verified) or verified.digest != kept:
            raise MigrationError(f"the destination answered {type(verified).__name__} instead of verifying the pages "
                                 "it keeps")
        phases["verify"] = time.perf_counter()
        self._raise_if_cancelled()  # the last moment a cancel can still leave the VM here
        primary.send(Commit())
        primary.drain(self._left(deadline))
        self.committed = True
        try:
            answer = primary.next_event(self._left(deadline), "Resumed")
        except MigrationError as error:
            # The link broke after the commit: the destination runs the VM (or will), and needs our pages. Not a
            # failure: post-copy begins paused and resumes.
            self.machine.hand_off(self.to)
            self.link_broken = str(error)
            self.stats.postcopy_started = time.perf_counter() - start
            self.stats.postcopy_pending = owed.count()
            return owed
        if isinstance(answer, Abort):
            self.refused_after_commit = True
            raise MigrationError(f"the destination could not run the VM after the commit: {answer.reason}")
        if not isinstance(answer, Resumed):
            raise MigrationError(f"the destination answered {type(answer).__name__} instead of Resumed")
        self.machine.hand_off(self.to)  # paused for good; its memory stays until the destination has every page
        phases["commit_resume"] = time.perf_counter()
        self.stats.downtime = max(0.0, phases["commit_resume"] - paused_at - self.rtt / 2)
        self.stats.postcopy_started = phases["commit_resume"] - start
        marks = [paused_at, *phases.values()]
        self.stats.switchover = {name: round((end - begin) * 1e3, 3)
                                 for name, begin, end in zip(phases, marks, marks[1:], strict=False)}
        return owed

    @staticmethod
    def _left(deadline: float) -> float:
        """Seconds to the switch-over deadline; MigrationError once it has passed."""
        left = deadline - time.perf_counter()
        if left <= 0:
            raise MigrationError("no time left")
        return left

    # --- failure ------------------------------------------------------------------------------------

    def _fail(self, error: BaseException, start: float) -> None:
        """Leave the source as it was: peer told, tracker off, vCPUs running (unless committed)."""
        self.stats.total_time = time.perf_counter() - start
        cancelled = self.stats.status is MigrationStatus.CANCELLED
        if not cancelled:
            self.stats.status = MigrationStatus.FAILED
        self.stats.error = str(error)
        code = AbortCode.CANCELLED if cancelled else AbortCode.INTERNAL
        if isinstance(error, ProtocolError):
            code = AbortCode.PROTOCOL
        channels = self.streams if self.postcopy is None else self.postcopy.streams
        if self.postcopy_channel is not None and self.postcopy is None:
            channels = [*channels, self.postcopy_channel]
        for stream in channels:
            stream.abort(str(error) or type(error).__name__, code)
        if self.tracker is not None and self.tracker.enabled:
            # The machine must be resumed even if KVM refuses this.
            with contextlib.suppress(Exception):
                self.tracker.disable()
        if self.machine.state is State.PAUSED and self.paused_by_us and self.source_owns_vm:
            self.machine.resume()
        close_aborted(channels)  # the guest runs again: now let the Abort arrive

    def _as_migration_error(self, error: BaseException) -> MigrationError:
        """The error for the caller: why, then what became of the source VM."""
        if isinstance(error, MigrationError):
            why = str(error)
        elif isinstance(error, ProtocolError):
            why = f"migration stream failed: {error}"
        elif isinstance(error, KeyboardInterrupt):
            why = "migration interrupted"
        else:
            why = f"migration failed: {type(error).__name__}: {error}"
        if not self.source_owns_vm and self.postcopy is not None:
            owed = self.postcopy.remaining
            return MigrationError(
                f"{why}. This was post-copy: the destination has run the VM since the switch-over and lacks {owed:,} "
                "of its pages, which this source keeps, paused (the VM as it was at the switch-over). Neither copy is "
                "whole: do not resume the source unless the destination is gone for good, which rolls the VM back to "
                "the switch-over")
        if not self.source_owns_vm:
            return MigrationError(f"{why}. The commit was sent and the destination went silent: it may be running the "
                                  "VM, so the source stays paused; check the destination before resuming anything")
        return MigrationError(f"{why}; the source keeps running")

    @property
    def source_owns_vm(self) -> bool:
        """Whether the VM is still the source's to run: before the commit, or when the destination said after it
        that it could not run the VM."""
        return not self.committed or self.refused_after_commit
