"""The source side of a live migration: pre-copy rounds over authenticated streams, then switch-over.

The source owns the VM until it sends Commit. Before that, any failure (a dead peer, a corrupt frame,
a refused key, the time limit) ends the same way: Abort to the destination, the tracker and throttle
off, the vCPUs resumed if switch-over had paused them, and a :class:`MigrationError`. Guest memory is
only ever read here, so it is intact. After Commit the destination owns the VM and the source never
resumes its copy (two-phase commit: see ``state.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from dirtylog.bitmap import DirtyBitmap, load_kernels
from dirtylog.guest.machine import State
from dirtylog.machine import Machine, TrackingMode
from dirtylog.migration.connection import SourceConnection
from dirtylog.migration.digest import PageDigest, gather
from dirtylog.migration.digest import load_kernels as load_digest_kernels
from dirtylog.migration.errors import ProtocolError
from dirtylog.migration.events import (
    AbortCode,
    Accepted,
    Codec,
    Commit,
    Complete,
    Header,
    MemorySlot,
    PageBatch,
    Ready,
    Resumed,
    RoundEnd,
    VcpuState,
    Verified,
)
from dirtylog.migration.keys import load_key
from dirtylog.migration.pages import make_page_batch, pfns_from_runs
from dirtylog.migration.precopy import (
    Action,
    DirtyLimiter,
    MigrationError,
    PrecopyController,
    PrecopyPolicy,
    RoundStats,
    TimeoutPolicy,
)
from dirtylog.migration.stats import MigrationStats
from dirtylog.migration.streams import QUEUE_DEPTH, Stream, close_aborted
from dirtylog.migration.transport import Pacer, connect, parse_address
from dirtylog.tracking.base import Tracker
from dirtylog.tracking.kvm_ring import RingTracker
from dirtylog.units import PAGE_SIZE, parse_duration, parse_rate

ProgressCallback = Callable[[str, dict[str, Any]], None]
DIRTY_LIMIT_PERIOD = 0.02  # seconds between dirty-limit samples of the rings


@dataclass(frozen=True)
class MigrationOptions:
    """How to migrate, beyond the pre-copy policy."""

    streams: int = 1
    zero_pages: bool = True  # elide zero pages (not sent in round 0, markers later)
    compression: Codec = "none"
    mode: TrackingMode = "log"
    batch_pages: int = 1024  # 4 MiB of pages per frame: fewer per-frame costs (bench/migration.py)
    connect_timeout: float = 10.0
    io_timeout: float = 30.0


def migrate(machine: Machine, to: str, *, key_file: str, downtime_limit: str | float = "300ms",
            bandwidth: str | float | None = None, max_time: str | float | None = None,
            on_timeout: TimeoutPolicy = "cancel", streams: int = 1, zero_pages: bool = True,
            compression: Codec = "none", mode: TrackingMode = "log", auto_converge: bool = False,
            dirty_limit: float | None = None, progress: ProgressCallback | None = None,
            connect_timeout: float = 10.0, io_timeout: float = 30.0) -> MigrationStats:
    """Live-migrate a running ``machine`` to ``dirtylog receive`` listening at ``to`` (``host:port``).

    Returns QEMU-style statistics when the destination runs the VM. Raises :class:`MigrationError`
    otherwise, with the source still running and its memory intact (unless the message says the
    commit was sent, in which case the destination may own the VM and the source stays paused).
    """
    policy = PrecopyPolicy(
        downtime_limit=parse_duration(downtime_limit),
        bandwidth=None if bandwidth is None else float(parse_rate(bandwidth) if isinstance(bandwidth, str)
                                                     else bandwidth),
        max_time=None if max_time is None else parse_duration(max_time),
        on_timeout=on_timeout, auto_converge=auto_converge, dirty_limit=dirty_limit)
    options = MigrationOptions(streams=streams, zero_pages=zero_pages, compression=compression, mode=mode,
                               connect_timeout=connect_timeout, io_timeout=io_timeout)
    return SourceMigration(machine, to, load_key(key_file), policy, options, progress).run()


class SourceMigration:
    """One migration attempt from a running machine."""

    def __init__(self, machine: Machine, to: str, key: bytes, policy: PrecopyPolicy, options: MigrationOptions,
                 progress: ProgressCallback | None = None) -> None:
        if machine.state is not State.RUNNING:
            raise MigrationError(f"only a running machine can be migrated live; this one is {machine.state.value}")
        if not 1 <= options.streams <= 64:
            raise MigrationError(f"streams must be between 1 and 64, got {options.streams}")
        if policy.dirty_limit and options.mode != "ring":
            raise MigrationError("the dirty limit measures each vCPU's dirty rate with the dirty ring: use mode 'ring'")
        if options.mode == "ring" and machine.vm.dirty_ring_bytes == 0:
            raise MigrationError("mode 'ring' needs a machine created with a dirty ring (Machine(..., dirty_ring="
                                 "True)); KVM allows rings only before vCPUs exist. Or use mode 'log' or 'clear'")
        self.machine = machine
        self.to = to
        self.address = parse_address(to)
        self.key = key
        self.policy = policy
        self.options = options
        self.progress = progress or (lambda kind, record: None)
        self.streams: list[Stream] = []
        self.stats = MigrationStats(page_size=PAGE_SIZE, total_pages=machine.ram.npages, streams=options.streams,
                                    compression=options.compression, mode=options.mode)
        self.controller = PrecopyController(policy)
        self.tracker: Tracker | None = None
        self.digest = PageDigest(machine.ram.npages)
        self.pacer = Pacer(policy.bandwidth)
        self.pacer_lock = threading.Lock()
        self.rtt = 0.0
        self.committed = False
        self.paused_by_us = False
        self._limiter_stop = threading.Event()
        self._limiter: threading.Thread | None = None
        self._cancel = threading.Event()  # [control hook] set by cancel() from another thread
        self._next_stream = self._last_stream = 0
        # One stream is written from this thread, several by a sender thread each (see streams.py).
        self._sender_threads = options.streams > 1
        # Batch buffers in flight: each stream's queue, the one being written, the one being filled.
        count = options.streams * (QUEUE_DEPTH + 1) + 1 if self._sender_threads else 1
        self._buffers: queue.SimpleQueue[npt.NDArray[np.uint8]] = queue.SimpleQueue()  # C: cheap per frame
        for _ in range(count):
            # np.ones, not np.zeros: its pages are allocated now, not on first use inside round 0.
            self._buffers.put(np.ones((options.batch_pages, PAGE_SIZE), dtype=np.uint8))
        self._no_zero_pages = np.zeros(options.batch_pages, dtype=np.bool_)
        self._no_zero_pages.flags.writeable = False  # shared by every batch that has no zero page

    # --- the whole migration ------------------------------------------------------------------------

    def run(self) -> MigrationStats:
        """Migrate; return the statistics, or raise MigrationError with the source intact."""
        start = time.perf_counter()
        try:
            self._connect()
            self.tracker = self.machine.dirty_log(self.options.mode)
            self.tracker.enable()
            self.stats.setup_time = time.perf_counter() - start
            self.stats.status = "active"
            self.progress("setup", {"setup_time_ms": round(self.stats.setup_time * 1e3, 3)})
            pending = self._precopy(start)
            self._switchover(pending, start)
        except BaseException as error:
            self._fail(error, start)
            failure = self._as_migration_error(error)
            failure.stats = self.stats
            raise failure from (None if isinstance(error, MigrationError) else error)
        finally:
            self._stop_helpers()
        self.stats.total_time = time.perf_counter() - start
        self.stats.status = "completed"
        return self.stats

    # --- connecting ---------------------------------------------------------------------------------

    def _connect(self) -> None:
        """Open every stream: handshake, then the Header at once (the destination builds the VM from the
        first stream's Header before it accepts the next stream), then wait for every Ready."""
        header = self._header()
        migration_id = os.urandom(16)
        count = self.options.streams
        for index in range(count):
            sock = connect(self.address, self.options.connect_timeout)
            sock.settimeout(self.options.io_timeout)
            conn = SourceConnection(self.key, migration_id=migration_id, stream_index=index, stream_count=count)
            stream = Stream(index, sock, conn, self._pace if self.policy.bandwidth else None)
            self.streams.append(stream)
            began = time.perf_counter()
            stream.write_now(conn.initiate())
            stream.read_until(Accepted, "destination", self.options.io_timeout)
            self.rtt = time.perf_counter() - began if index == 0 else min(self.rtt, time.perf_counter() - began)
            stream.send(header)
        load_kernels()  # while the destination builds its VM, so that no round pays for them
        load_digest_kernels()
        for stream in self.streams:
            stream.read_until(Ready, "destination", self.options.io_timeout)
        for stream in self.streams:
            stream.start(sender=self._sender_threads)

    def _pace(self, nbytes: int) -> None:
        with self.pacer_lock:
            self.pacer.wait(nbytes)

    def _header(self) -> Header:
        spec = self.machine.spec
        return Header(
            page_size=PAGE_SIZE,
            slots=tuple(MemorySlot(s.slot, s.base_gfn, s.npages, 0) for s in self.machine.vm.slots.values()),
            vcpus=spec.vcpus,
            workload={"name": spec.name, "rate": spec.rate, "hot_fraction": spec.hot_fraction,
                      "hot_weight": spec.hot_weight, "writes_per_iteration": spec.writes_per_iteration},
            codec=self.options.compression,
            streams=self.options.streams,
        )

    # --- pre-copy -----------------------------------------------------------------------------------

    def _precopy(self, start: float) -> DirtyBitmap:
        """Send rounds until the controller says switch over; return the pages still to send."""
        assert self.tracker is not None
        npages = self.machine.ram.npages
        pending = DirtyBitmap.full(npages)  # round 0: everything (zero pages are elided, not sent)
        round_ = 0
        while True:
            began = time.perf_counter()
            pages, zero, wire = self._send_round(round_, pending, final=False)
            dirty = self.tracker.collect()
            self.stats.dirty_sync_count += 1
            self.stats.remaining_pages = dirty.count()  # [control hook] live query-migrate 'remaining'
            round_stats = RoundStats(round_, began - start, time.perf_counter() - began, pages, zero, wire,
                                     dirty.count(), self.controller.throttle, self.controller.dirty_limited)
            decision = self.controller.after_round(round_stats, time.perf_counter() - start)
            self.stats.rounds.append(round_stats)
            self.stats.expected_downtime = decision.expected_downtime
            self._apply_convergence(decision.throttle, decision.dirty_limited)
            self.progress("round", {**round_stats.as_dict(PAGE_SIZE),
                                    "expected_downtime_ms": round(decision.expected_downtime * 1e3, 3),
                                    "action": decision.action.value, "reason": decision.reason})
            if decision.action is Action.CANCEL:
                self.stats.status = "cancelled"
                raise MigrationError(f"migration cancelled: {decision.reason}; the source keeps running. "
                                     "Raise --max-time or the downtime limit, or use --auto-converge")
            if decision.action is Action.SWITCHOVER:
                return dirty
            self._raise_if_cancelled()
            pending = dirty
            round_ += 1

    def _send_round(self, round_: int, pending: DirtyBitmap, final: bool) -> tuple[int, int, int]:
        """Send ``pending`` as round ``round_``; returns pages, zero pages, wire bytes."""
        sent_before = sum(s.bytes_sent for s in self.streams)  # every queue is drained between rounds
        transferred_before = self.stats.transferred
        self.stats.remaining_pages = pending.count()
        pages_total = zero_total = 0
        per_stream = [0] * len(self.streams)
        for starts, lengths in pending.batches(self.options.batch_pages):
            self._raise_if_cancelled()
            buffer = self._buffers.get()
            sent, zeros = self._send_batch(round_, starts, lengths.astype(np.uint32, copy=False), buffer)
            if sent:
                per_stream[self._last_stream] += sent
            pages_total += sent
            zero_total += zeros
            # [control hook] live statistics for query-migrate: a round of 1 GiB takes a second or more.
            self.stats.remaining_pages -= int(lengths.sum())
            self.stats.transferred = transferred_before + sum(s.bytes_sent for s in self.streams) - sent_before
        stats = {"final": final}
        for stream, count in zip(self.streams, per_stream, strict=True):
            stream.send(RoundEnd(round_, count, stats))
        # A round ends when its bytes are on the wire, not in our queues: otherwise its rate is flattered
        # and the switch-over would wait for data the controller thought was sent.
        for stream in self.streams:
            stream.drain(self.options.io_timeout)
        self.stats.duplicate_pages += zero_total
        wire = sum(s.bytes_sent for s in self.streams) - sent_before
        self.stats.transferred = transferred_before + wire
        return pages_total, zero_total, wire

    def _send_batch(self, round_: int, starts: npt.NDArray[np.uint64], lengths: npt.NDArray[np.uint32],
                    buffer: npt.NDArray[np.uint8]) -> tuple[int, int]:
        """Copy one batch of pages into ``buffer``, fingerprint it and queue it; returns (pages on the wire,
        zero pages). ``buffer`` goes back to the pool once the socket has taken it."""
        # A private copy: the guest keeps writing, and the MAC covers what send() saw. Its fingerprints,
        # taken in the same pass, feed the digest and find zero pages (a fingerprint of 0 is confirmed by
        # looking at the page).
        prints = gather(self.machine.ram.pages, starts, lengths, buffer)
        pages = buffer[:prints.size]
        if starts.size == 1 and prints.all():
            # The usual batch, one run with no zero page (a zero page's fingerprint is 0; not every page
            # fingerprinted 0 is zero, but those go the careful way below). Per-frame Python costs here
            # ~10-20 us a NumPy call, with the cache full of page data: slices and ints, no page arrays.
            self.digest.set_run(int(starts[0]), prints)
            batch = make_page_batch(round_, None, self._no_zero_pages[:prints.size], pages, page_size=PAGE_SIZE,
                                    codec=self.options.compression, runs=(starts, lengths))
            self._queue(batch, buffer)
            self.stats.normal_pages += prints.size
            return prints.size, 0
        pfns = pfns_from_runs(starts, lengths)
        zero = prints == 0
        if zero.any():
            zero[zero] = ~pages[zero].view(np.uint64).any(axis=1)
        if not self.options.zero_pages:
            zero[:] = False
        runs: tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint32]] | None = (starts, lengths)
        zeros = int(np.count_nonzero(zero))
        if round_ == 0 and zeros:
            # The destination starts zeroed: round 0 need not mention zero pages at all.
            if zeros == pfns.size:
                self._buffers.put(buffer)
                return 0, zeros
            keep = ~zero
            pfns, pages, prints, zero, runs = pfns[keep], pages[keep], prints[keep], zero[keep], None
        data = pages if not zero.any() else pages[~zero]
        self.digest.set(pfns, prints)
        batch = make_page_batch(round_, pfns, zero, data, page_size=PAGE_SIZE, codec=self.options.compression,
                                runs=runs)
        self._queue(batch, buffer)
        self.stats.normal_pages += int(pfns.size - np.count_nonzero(zero))
        return int(pfns.size), zeros

    def _queue(self, batch: PageBatch, buffer: npt.NDArray[np.uint8]) -> None:
        """Send ``batch`` on the next stream; ``buffer``, which holds its data, returns to the pool once sent."""
        index = self._last_stream = self._next_stream
        self._next_stream = (index + 1) % len(self.streams)
        self.streams[index].send(batch, on_sent=functools.partial(self._buffers.put, buffer))

    # --- [control hooks] cancelling and retuning from another thread (QMP migrate_cancel and
    # migrate-set-parameters during a migration); to be ported into the restructured engine --------

    def cancel(self) -> None:
        """Ask the migration to stop at the next batch; it then fails with status 'cancelled' and the source
        keeps running. Too late once Commit is sent (the destination owns the VM then): no effect."""
        self._cancel.set()

    def _raise_if_cancelled(self) -> None:
        if self._cancel.is_set():
            self.stats.status = "cancelled"
            raise MigrationError("migration cancelled on request; the source keeps running")

    def set_downtime_limit(self, seconds: float) -> None:
        """A new downtime limit for a running migration, used from the next round's decision."""
        self.policy = self.controller.policy = dataclasses.replace(self.policy, downtime_limit=seconds)

    def set_bandwidth(self, bytes_per_second: float | None) -> None:
        """A new bandwidth cap (None: none) for a running migration, from the next write on."""
        self.policy = self.controller.policy = dataclasses.replace(self.policy, bandwidth=bytes_per_second)
        # Not under pacer_lock: a write may be sleeping off its tokens there. It finishes on the old bucket.
        self.pacer = Pacer(bytes_per_second)
        for stream in self.streams:
            stream.pace = self._pace

    # --- convergence aids ---------------------------------------------------------------------------

    def _apply_convergence(self, throttle: float, dirty_limited: bool) -> None:
        if throttle != self.machine.throttle:
            self.machine.set_throttle(throttle)
            self.stats.throttle = throttle
        if dirty_limited and self._limiter is None:
            self.stats.dirty_limited = True
            self._limiter = threading.Thread(target=self._dirty_limit_loop, name="dirty-limit", daemon=True)
            self._limiter.start()

    def _dirty_limit_loop(self) -> None:
        """Every period: harvest the rings, and make each vCPU sleep off what it dirtied above the limit."""
        tracker = self.tracker
        assert isinstance(tracker, RingTracker) and self.policy.dirty_limit
        limiter = DirtyLimiter(self.policy.dirty_limit)
        last, last_time = tracker.sample(), time.perf_counter()
        while not self._limiter_stop.wait(DIRTY_LIMIT_PERIOD):
            counts, now = tracker.sample(), time.perf_counter()
            dirtied = {vcpu: counts.get(vcpu, 0) - last.get(vcpu, 0) for vcpu in counts}
            for vcpu, seconds in limiter.sleep_for(dirtied, now - last_time).items():
                self.machine.delay_vcpu(vcpu, seconds)
            last, last_time = counts, now

    def _stop_helpers(self) -> None:
        self._limiter_stop.set()
        if self._limiter is not None:
            self._limiter.join(1.0)
        if self.machine.throttle:
            self.machine.set_throttle(0.0)

    # --- switch-over --------------------------------------------------------------------------------

    def _switchover(self, pending: DirtyBitmap, start: float) -> None:
        assert self.tracker is not None
        self._stop_helpers()
        paused_at = time.perf_counter()
        self.machine.pause()
        self.paused_by_us = True
        phases = {"pause": time.perf_counter()}
        final = pending | self.tracker.collect()
        self.stats.dirty_sync_count += 1
        began = phases["final_collect"] = time.perf_counter()
        pages, zero, wire = self._send_round(len(self.stats.rounds), final, final=True)
        primary = self.streams[0]
        for vcpu in range(self.machine.spec.vcpus):
            primary.send(VcpuState(vcpu, self.machine.vcpu_state(vcpu)))
        digest = self.digest.digest()  # every page dirtied since its last send went in the final round
        self.stats.digest = digest.hex()
        frames = tuple(stream.conn.frames_sent for stream in self.streams)
        for stream in reversed(self.streams):  # secondaries first: the primary's Complete is the last word
            stream.send(Complete(digest, frames))
        for stream in self.streams:
            stream.drain(self.options.io_timeout)
        phases["final_send"] = time.perf_counter()
        self.stats.rounds.append(RoundStats(len(self.stats.rounds), began - start, time.perf_counter() - began,
                                            pages, zero, wire, 0, self.controller.throttle,
                                            self.controller.dirty_limited, final=True))
        self.progress("switchover", {"pages": pages, "bytes": wire,
                                     "paused_ms": round((time.perf_counter() - paused_at) * 1e3, 3)})
        verified = primary.next_event(self.options.io_timeout, "Verified")
        if not isinstance(verified, Verified) or verified.digest != digest:
            raise MigrationError(f"the destination answered {type(verified).__name__} instead of verifying the digest")
        phases["verify"] = time.perf_counter()
        self._raise_if_cancelled()  # the last moment a cancel can still leave the VM here
        primary.send(Commit())
        primary.drain(self.options.io_timeout)
        self.committed = True
        self.machine.handed_off_to = self.to
        resumed = primary.next_event(self.options.io_timeout, "Resumed")
        if not isinstance(resumed, Resumed):
            raise MigrationError(f"the destination answered {type(resumed).__name__} instead of Resumed")
        phases["commit_resume"] = time.perf_counter()
        self.stats.downtime = max(0.0, phases["commit_resume"] - paused_at - self.rtt / 2)
        marks = [paused_at, *phases.values()]
        self.stats.switchover = {name: round((end - begin) * 1e3, 3)
                                 for name, begin, end in zip(phases, marks, marks[1:], strict=False)}
        self.tracker.disable()
        for stream in self.streams:
            stream.close()

    # --- failure ------------------------------------------------------------------------------------

    def _fail(self, error: BaseException, start: float) -> None:
        """Leave the source as it was: peer told, tracker off, vCPUs running (unless committed)."""
        self.stats.total_time = time.perf_counter() - start
        if self.stats.status != "cancelled":
            self.stats.status = "failed"
        self.stats.error = str(error)
        code = AbortCode.CANCELLED if self.stats.status == "cancelled" else AbortCode.INTERNAL
        if isinstance(error, ProtocolError):
            code = AbortCode.PROTOCOL
        for stream in self.streams:
            stream.abort(str(error) or type(error).__name__, code)
        if self.tracker is not None and self.tracker.enabled:
            # The machine must be resumed even if KVM refuses this.
            with contextlib.suppress(Exception):
                self.tracker.disable()
        if not self.committed and self.machine.state is State.PAUSED and self.paused_by_us:
            self.machine.resume()
        close_aborted(self.streams)  # the guest runs again: now let the Abort arrive

    def _as_migration_error(self, error: BaseException) -> MigrationError:
        if self.committed:
            return MigrationError(
                f"{error}. The commit was sent: the destination may be running the VM, so the source stays "
                "paused; check the destination before resuming anything")
        if isinstance(error, MigrationError):
            text = str(error)
        elif isinstance(error, ProtocolError):
            text = f"migration stream failed: {error}"
        elif isinstance(error, KeyboardInterrupt):
            text = "migration interrupted"
        else:
            text = f"migration failed: {type(error).__name__}: {error}"
        return MigrationError(text if "keeps running" in text else f"{text}; the source keeps running")
