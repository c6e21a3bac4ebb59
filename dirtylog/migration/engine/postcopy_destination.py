"""The destination after the post-copy switch: guest RAM under userfaultfd, pages on demand, pushed pages installed.

Before the vCPUs run (:meth:`PostcopyDestination.prepare`), the pages the source still owes are dropped from guest
RAM (``MADV_DONTNEED``: the stale copies pre-copy brought) and the workload area is registered with a
userfaultfd in missing mode; every other page is present and verified. Then:

* **A vCPU that touches a page not there** blocks in the kernel; the fault handler (one thread, waiting on the
  userfaultfd and the post-copy channel at once) reads the fault, asks the source for the page on the post-copy
  channel, and installs the answer (``UFFDIO_COPY``, which wakes the vCPU) as soon as it arrives. A fault on a
  page that is not owed is a zero page never sent (pre-copy elides them): it is mapped at once
  (``UFFDIO_ZEROPAGE``), with nothing asked. The other vCPUs run on.
* **Pages the source pushes** arrive on the stream and are installed by its reader thread the same way. The first
  copy of a page wins; a later one finds it present (the guest may have written it since) and is dropped, so a
  page the guest wrote is never overwritten.
* Every page is checked against the fingerprint the source sent with it before it is installed.

The host itself never reads the workload area meanwhile: a host thread waiting on a missing page would hold the
GIL the handler needs (the system area, which the host does read, is never owed: the source sends it in the
downtime). A broken link leaves the handler collecting faults and the faulting vCPUs waiting; when a resumed
channel is attached, the pages waited for are asked for again.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from dirtylog.bitmap import DirtyBitmap
from dirtylog.errors import DirtylogError
from dirtylog.guest.machine import Machine
from dirtylog.linux import abi as linux_abi
from dirtylog.linux.errors import UserfaultfdError
from dirtylog.linux.userfaultfd import Userfaultfd
from dirtylog.migration.engine.lanes import (
    FAILED,
    FAULT,
    HANDED_BACK,
    IDLE,
    INSTALLED,
    PEER_CLOSED,
    STOPPED,
    ZERO_FAULT,
    Lane,
)
from dirtylog.migration.engine.streams import RECV_CHUNK, Stream
from dirtylog.migration.engine.urgency import Urgency, raise_thread_priority
from dirtylog.migration.errors import MigrationError
from dirtylog.migration.payload.memory import DestinationMemory
from dirtylog.migration.payload.pages import runs_from_pfns
from dirtylog.migration.payload.postcopy import postcopy_pages
from dirtylog.migration.policy.postcopy import FaultStats
from dirtylog.migration.policy.stats import MigrationStats
from dirtylog.migration.protocol.errors import ProtocolError
from dirtylog.migration.protocol.events import (
    CLOSED,
    NEED_DATA,
    Abort,
    AbortCode,
    Complete,
    PageRequest,
    PostcopyPages,
)
from dirtylog.units import PAGE_SIZE

if TYPE_CHECKING:
    from dirtylog.migration.engine.fault_lane import FaultLane

#: Abort codes that say a connection broke (a corrupt or forged frame), not that the peer gave up.
LINK_CODES = frozenset({AbortCode.PROTOCOL, AbortCode.AUTHENTICATION})
POLL_MS = 100
LANE_POLL = 0.02  # the compiled fault path returns this often when idle, for the handler's own checks


class PostcopyDestination:
    """Pages owed to ``machine`` after the post-copy switch, their faults, and their installation."""

    def __init__(self, machine: Machine, memory: DestinationMemory, pending: DirtyBitmap, stats: MigrationStats, *,
                 io_timeout: float, compiled_faults: bool = True) -> None:
        self.machine = machine
        self.compiled_faults = compiled_faults
        self._lane: FaultLane | None = None  # the compiled fault path of the channel now (fault_lane.py)
        self._lane_declined: Stream | None = None  # a channel the lane handed back for good
        #: Why faults are served in Python on this channel, if they are ("" when compiled).
        self.lane_unavailable = ""
        self.memory = memory
        self.stats = stats
        self.io_timeout = io_timeout
        ram = machine.ram
        if len(pending) != ram.npages:
            raise MigrationError(f"the pending pages span {len(pending)} pages, guest memory {ram.npages}")
        self.first = machine.workload_pages.start  # the system area below it is never owed (see the module doc)
        owed = pending.pages()
        if owed.size and int(owed[0]) < self.first:
            raise MigrationError(f"the source left page {int(owed[0]):#x}, which the host reads, to post-copy; it must "
                                 "send the system area before the switch")
        self.owed = owed
        self.owed_mask = np.zeros(ram.npages, dtype=np.bool_)
        self.owed_mask[owed] = True
        self.missing = np.zeros(ram.npages, dtype=np.bool_)
        self.missing[owed] = True
        self.remaining = int(owed.size)
        self.requested = np.zeros(ram.npages, dtype=np.bool_)
        self.faults = FaultStats(machine.spec.vcpus, start=time.perf_counter())
        self.lock = threading.Lock()  # missing, requested, remaining, faults, counters
        self.changed = threading.Condition(self.lock)  # an install, a Complete, a break
        self.uffd: Userfaultfd | None = None
        self.channel: Stream | None = None
        self.completes: set[str] = set()  # "stream", "channel": the source's Completes seen on this link
        self.digest_claimed: bytes | None = None
        self.broken = ""  # why the link broke (empty while it holds)
        self.fatal = ""  # why the migration cannot go on
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._vcpu_of: dict[int, int] = {}
        self._zero = np.zeros(PAGE_SIZE, dtype=np.uint8)
        self._last_heard = time.monotonic()
        self.urgency = Urgency()  # the fault handler goes before installing pushed pages
        self._lane_requests_counted = 0
        self._recount_next = False

    # --- set-up and end -----------------------------------------------------------------------------------

    def prepare(self) -> None:
        """Drop the owed pages, register the workload area, start the fault handler: before the vCPUs run.
        MigrationError when this host cannot (no userfaultfd for this process, say): the source keeps the VM."""
        ram = self.machine.ram
        try:
            uffd = Userfaultfd.create()
            uffd.api(linux_abi.UFFD_FEATURE_THREAD_ID)
        except DirtylogError as error:
            raise MigrationError(f"this destination cannot take post-copy: {error}") from None
        self.uffd = uffd
        ram.huge_pages(False)
        starts, lengths = runs_from_pfns(self.owed)
        ram.discard(starts, lengths.astype(np.uint64))
        try:
            uffd.register(ram.address + self.first * PAGE_SIZE, ram.size - self.first * PAGE_SIZE, missing=True)
        except DirtylogError as error:
            uffd.close()
            raise MigrationError(f"this destination cannot take post-copy: {error}") from None
        self.faults.start = time.perf_counter()
        self._thread = threading.Thread(target=self._handle_faults, name="postcopy-faults", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop the handler and unregister guest RAM (every page is present by then, or the VM is lost)."""
        self._stop.set()
        self._stop_lane()
        if self._thread is not None:
            self._thread.join(2.0)
        with self.lock:
            self._fold_lane()  # what the lane did after the last fold (a request for a page a push brought since)
        if self.uffd is not None:
            self.uffd.close()
            self.uffd = None
        self.machine.ram.huge_pages(True)

    def progress_record(self) -> dict[str, Any]:
        """What the live view shows of post-copy here."""
        with self.lock:
            self._fold_lane()
            faults = self.faults
            return {"remaining": self.remaining, "pages_pushed": self.stats.pages_pushed,
                    "pages_requested": self.stats.pages_requested, "requests": self.stats.postcopy_requests,
                    "faults": faults.faults, "waiting": len(faults.pages_waited_for),
                    "latency_mean_us": round(faults.mean_latency * 1e6, 1),
                    "latency_median_us": round(faults.median_latency() * 1e6, 1),
                    "blocktime_ms": round(faults.blocktime * 1e3, 1)}

    @property
    def done(self) -> bool:
        """Every owed page is here."""
        return self.remaining == 0

    # --- the link -----------------------------------------------------------------------------------------

    def attach(self, channel: Stream) -> None:
        """A (new) post-copy channel: ask again for every page a fault waits for (its answer may have been lost)."""
        self._stop_lane()
        with self.lock:
            self._fold_lane()
            self._lane = self._new_lane(channel)
            self.channel = channel
            self.completes.clear()
            self.broken = ""
            self._last_heard = time.monotonic()
            waited = [page for page in self.faults.pages_waited_for if self.missing[page]]
            self.requested[:] = False
            self.requested[waited] = True
        if waited:
            self._request(np.array(sorted(waited), dtype=np.uint64))

    def detach(self) -> None:
        """The link broke: no channel until :meth:`attach`."""
        self._stop_lane()  # before anyone closes its socket: the lane uses the fd number
        with self.lock:
            self.channel = None

    def break_link(self, reason: str) -> None:
        """The link broke (a stream's reader, or the handler, noticed): the migration pauses."""
        with self.changed:
            if not self.broken:
                self.broken = reason
            self.changed.notify_all()

    def give_up(self, reason: str) -> None:
        with self.changed:
            self.fatal = self.fatal or reason
            self.changed.notify_all()

    def complete(self, where: str, event: Complete) -> None:
        """The source's Complete on the stream or the channel: it has sent every page once."""
        with self.changed:
            self.completes.add(where)
            if where == "stream":
                self.digest_claimed = event.digest
            self.changed.notify_all()

    def wait(self, timeout: float | None = None) -> str:
        """Until every page is here and the source said Complete on both connections ("done"), or the link broke
        ("broken"), or ``timeout`` passed ("waiting"); MigrationError when the migration cannot go on."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.changed:
            while True:
                self._fold_lane()
                if self.fatal:
                    raise MigrationError(self.fatal)
                if self.broken:
                    return "broken"
                if self.completes == {"stream", "channel"}:
                    if self.remaining:
                        raise MigrationError(f"the source says it sent every page, yet {self.remaining:,} never "
                                             "arrived")
                    return "done"
                if deadline is not None and time.monotonic() >= deadline:
                    return "waiting"
                self.changed.wait(0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic())))

    # --- installing ---------------------------------------------------------------------------------------

    def install(self, event: PostcopyPages) -> None:
        """Check and install pages the source sent (pushed or requested); pages already present stay as they are.
        RemoteProtocolError for a page whose fingerprint does not match (nothing of the frame is installed)."""
        if not event.requested:
            self.urgency.yield_to_urgent()
        received = postcopy_pages(event)
        uffd = self.uffd
        assert uffd is not None
        pfns, zero = received.pfns, received.zero
        address = self.machine.ram.address
        first, count = int(pfns[0]), int(pfns.size)
        with self.lock:
            # A copy, not a view: the compiled fault path clears pages of ``missing`` without this lock, and a
            # boolean mask that changes under NumPy's count-then-fill indexing yields garbage.
            wanted = self.missing[pfns] if event.zero is not None or len(event.starts) != 1 else \
                self.missing[first:first + count].copy()
            whole = event.zero is None and len(event.starts) == 1 and bool(wanted.all())
        try:
            if whole:  # the usual answer or push: one run of non-zero pages, all still missing: one ioctl
                uffd.copy_missing(address + first * PAGE_SIZE, received.data)
            else:
                self._install_pieces(uffd, received.data, pfns, zero, wanted)
        except UserfaultfdError as error:
            raise MigrationError(f"installing post-copy pages failed: {error}") from None
        now = time.perf_counter()
        installed = pfns if whole else pfns[wanted]
        with self.changed:
            self._fold_lane()  # the lane's faults first: a page pushed now may be one they wait for
            fresh = installed[self.missing[installed]]
            self.missing[fresh] = False
            self.remaining -= int(fresh.size)
            self.faults.installed(fresh.tolist(), now)
            if event.requested:
                self.stats.pages_requested += int(fresh.size)
            else:
                self.stats.pages_pushed += int(fresh.size)
            self.stats.postcopy_bytes += len(event.data)
            self.stats.remaining_pages = self.remaining
            if not self.remaining:  # the waiter wants the end only: a wake-up per frame costs the fault path
                self.changed.notify_all()  # (the GIL and a cross-CPU wake-up, ~30 % of the handler's GIL time)
        self.memory.installed(pfns, received.fingerprints)

    def _install_pieces(self, uffd: Userfaultfd, data: npt.NDArray[np.uint8], pfns: npt.NDArray[np.uint64],
                        zero: npt.NDArray[np.bool_], wanted: npt.NDArray[np.bool_]) -> None:
        """Any frame: segments of consecutive pages that are all wanted and all of one kind, one ioctl each."""
        address = self.machine.ram.address
        data_index = np.cumsum(~zero) - 1  # row of each non-zero page in the frame's data
        breaks = np.flatnonzero((np.diff(pfns.astype(np.int64)) != 1) | (zero[1:] != zero[:-1])
                                | (wanted[1:] != wanted[:-1])) + 1
        for begin, end in zip(np.r_[0, breaks].tolist(), np.r_[breaks, pfns.size].tolist(), strict=True):
            if not wanted[begin]:
                continue
            target = address + int(pfns[begin]) * PAGE_SIZE
            if zero[begin]:
                self._zero_fill(uffd, target, end - begin)
            else:
                uffd.copy_missing(target, data[int(data_index[begin]):int(data_index[end - 1]) + 1])

    def _zero_fill(self, uffd: Userfaultfd, address: int, npages: int) -> None:
        """Zero pages where they are still missing (a page the guest faulted in meanwhile stays)."""
        try:
            uffd.zeropage(address, npages * PAGE_SIZE)
        except UserfaultfdError as error:
            if error.errno != 17:  # EEXIST: one of them is present; do them one by one
                raise
            for page in range(npages):
                with contextlib.suppress(UserfaultfdError):
                    uffd.zeropage(address + page * PAGE_SIZE, PAGE_SIZE)

    # --- the compiled fault path ----------------------------------------------------------------------------

    def _new_lane(self, channel: Stream) -> FaultLane | None:
        self._lane_declined = None
        self._lane_requests_counted = 0
        self.lane_unavailable = "" if self.compiled_faults else "turned off (compiled_faults)"
        self.lane_unavailable = self.lane_unavailable or Lane.unavailable(channel.conn)
        self.stats.fault_path = f"python: {self.lane_unavailable}" if self.lane_unavailable else "compiled"
        if self.lane_unavailable or self.uffd is None:
            return None
        from dirtylog.migration.engine.fault_lane import FaultLane  # Numba: only where it runs

        return FaultLane(self.uffd.fd, self.machine.ram.address, self.missing, self.requested, self.owed_mask,
                         self.memory.fingerprints, io_timeout=self.io_timeout, poll_interval=LANE_POLL)

    def _stop_lane(self) -> None:
        lane = self._lane
        if lane is not None:
            lane.stop()

    def _fold_lane(self) -> None:
        """Fold the lane's event log into the statistics and recount the pages missing (caller holds the lock)."""
        lane = self._lane
        if lane is None:
            return
        sent = lane.requests_sent  # read once: the lane goes on counting meanwhile (a request may also follow the
        self.stats.postcopy_requests += sent - self._lane_requests_counted  # fold that took its fault's record)
        self._lane_requests_counted = sent
        records = lane.take_events()
        recount, self._recount_next = bool(records.size) or self._recount_next, bool(records.size)
        if not recount:  # the lane installed nothing since the fold after its last record
            return
        installed = 0
        for kind, page, thread, ns in records.tolist():
            if kind == FAULT:
                if not self.faults.pages_waited_for:  # silence counts from the first request waiting
                    self._last_heard = max(self._last_heard, ns / 1e9)
                self.faults.fault(page, self._vcpu(thread), ns / 1e9)
            elif kind == INSTALLED:
                self.faults.installed([page], ns / 1e9)
                installed += 1
            elif kind == ZERO_FAULT:
                self.faults.zero_fault()
        # A fault logged after a push's installer folded the log, on a page that push then installed: resolved
        # by that install (which woke its vCPU), though its record came late. (Timed from now: a little long.)
        settled = [page for page in self.faults.pages_waited_for if not self.missing[page]]
        if settled:
            self.faults.installed(settled, time.perf_counter())
        self.stats.pages_requested += installed
        # Recounted, not decremented: a page the lane and a push both installed counts once. (Also at the fold after
        # the last record: the lane clears ``missing`` just after logging the install.)
        self.remaining = int(np.count_nonzero(self.missing))
        self.stats.remaining_pages = self.remaining
        if not self.remaining:
            self.changed.notify_all()

    def _run_lane(self, lane: FaultLane, channel: Stream, fd: int) -> None:
        """The compiled fault path until it returns; then what it left to Python."""
        result = lane.run(channel.conn, fd)
        with self.lock:
            self._fold_lane()
            heard = lane.last_heard_ns / 1e9
            if heard > self._last_heard:
                self._last_heard = heard
        if result.outcome in (IDLE, STOPPED):
            if result.leftover:
                channel.conn.receive_data(result.leftover)
            return
        assert result.outcome in (HANDED_BACK, FAILED, PEER_CLOSED)
        self._lane_declined = channel  # the rest of this channel is Python's
        with self._channel_errors(channel):
            if result.leftover:
                channel.conn.receive_data(result.leftover)
            if result.outcome == FAILED:
                raise OSError(result.errno, os.strerror(result.errno))
            if result.outcome == PEER_CLOSED:
                channel.conn.receive_data(b"")
            self._take_channel_events(channel)

    @contextlib.contextmanager
    def _channel_errors(self, channel: Stream) -> Iterator[None]:
        """What the channel's failures mean: a broken link (the migration pauses), or the end of the migration."""
        try:
            yield
        except TimeoutError:
            return
        except ProtocolError as error:
            channel.reply_best_effort(error.reply)
            self.detach()
            self.break_link(f"post-copy channel: {error}")
        except OSError as error:
            self.detach()
            self.break_link(f"post-copy channel: {error.strerror or error}")
        except MigrationError as error:
            self.give_up(str(error))

    # --- the fault handler --------------------------------------------------------------------------------

    def _handle_faults(self) -> None:
        raise_thread_priority()  # woken by a vCPU's fault: run it before the vCPUs still running
        uffd = self.uffd
        assert uffd is not None
        poller = select.poll()
        poller.register(uffd.fd, select.POLLIN)
        watched: Stream | None = None
        # The number registered, not the channel's fileno() now: a channel closed since says -1, and its old number
        # may already belong to a resumed link's other socket, whose data must not send us reading this channel.
        watched_fd = -1
        view = memoryview(bytearray(RECV_CHUNK))
        while not self._stop.is_set():
            channel = self.channel
            if channel is not watched:
                if watched_fd >= 0:
                    with contextlib.suppress(KeyError, ValueError, OSError):
                        poller.unregister(watched_fd)
                watched_fd = -1
                if channel is not None:
                    watched_fd = channel.channel.fileno()  # type: ignore[attr-defined]
                    poller.register(watched_fd, select.POLLIN)
                watched = channel
            lane = self._lane
            if lane is not None and channel is not None and channel is not self._lane_declined:
                self._run_lane(lane, channel, watched_fd)
                self._check_silence()
                continue
            try:
                ready = poller.poll(POLL_MS)
            except InterruptedError:
                continue
            with self.urgency.urgent():
                for fd, _ in ready:
                    if fd == uffd.fd:
                        self._on_faults(uffd)
                    elif channel is not None and fd == watched_fd:
                        self._on_channel(channel, view)
            self._check_silence()

    def _on_faults(self, uffd: Userfaultfd) -> None:
        messages = uffd.read_messages(256)
        messages = messages[messages["event"] == linux_abi.UFFD_EVENT_PAGEFAULT]
        if not messages.size:
            return
        now = time.perf_counter()
        base = self.machine.ram.address
        pages = ((messages["arg1"] - np.uint64(base)) // np.uint64(PAGE_SIZE)).tolist()
        threads = (messages["arg2"] & np.uint64(0xFFFF_FFFF)).tolist()
        ask: list[int] = []
        zero: list[int] = []
        present: list[int] = []
        with self.lock:
            if not self.faults.pages_waited_for:
                self._last_heard = time.monotonic()  # silence counts from the first request waiting
            for page, thread in zip(pages, threads, strict=True):
                if not self.missing[page]:
                    # Not owed: a zero page pre-copy never sent; or installed since the fault was queued.
                    (present if self.owed_mask[page] else zero).append(page)
                    continue
                self.faults.fault(page, self._vcpu(thread), now)
                if not self.requested[page]:
                    self.requested[page] = True
                    ask.append(page)
            for _ in zero:
                self.faults.zero_fault()
        for page in zero:
            with contextlib.suppress(UserfaultfdError):  # EEXIST: another fault on it was served first
                uffd.zeropage(base + page * PAGE_SIZE, PAGE_SIZE)
        for page in present:
            uffd.wake(base + page * PAGE_SIZE, PAGE_SIZE)
        if ask:
            self._request(np.array(sorted(set(ask)), dtype=np.uint64))

    def _request(self, pages: npt.NDArray[np.uint64]) -> None:
        channel = self.channel
        if channel is None:
            return  # asked again when a channel is attached
        starts, lengths = runs_from_pfns(pages)
        try:
            with channel.lock:
                buffers = channel.conn.send(PageRequest(starts, lengths))
            channel.channel.send(buffers)
        except (OSError, ProtocolError, MigrationError) as error:
            self.detach()
            self.break_link(f"post-copy channel: sending a page request failed: {error}")
            return
        with self.lock:
            self.stats.postcopy_requests += 1

    def _on_channel(self, channel: Stream, view: memoryview) -> None:
        conn = channel.conn
        with self._channel_errors(channel):
            count = channel.channel.recv_into(view)
            with channel.lock:
                conn.receive_data(view[:count])
            self._last_heard = time.monotonic()
            if self._take_channel_events(channel) and count == 0:
                raise OSError("the source closed the post-copy channel")

    def _take_channel_events(self, channel: Stream) -> bool:
        """Handle the events received on the channel; False when an Abort ended it."""
        conn = channel.conn
        while True:
            with channel.lock:
                event = conn.next_event()
            if event is NEED_DATA:
                return True
            if event is CLOSED:
                raise OSError("the source closed the post-copy channel")
            if isinstance(event, PostcopyPages):
                self.install(event)
            elif isinstance(event, Complete):
                self.complete("channel", event)
            elif isinstance(event, Abort):
                self.detach()
                if event.code in LINK_CODES:
                    self.break_link(f"the source refused a frame: {event.reason}")
                else:
                    self.give_up(f"the source gave up in post-copy: {event.reason}")
                return False

    def _check_silence(self) -> None:
        """A link that went silent with faults waiting (no reset, no FIN) broke too."""
        with self.lock:
            if self.channel is None or not self.faults.pages_waited_for:
                return
        if time.monotonic() - self._last_heard > self.io_timeout:
            self.detach()
            self.break_link(f"post-copy channel: no answer for {self.io_timeout:g} s while faults wait")

    def _vcpu(self, thread_id: int) -> int | None:
        if thread_id not in self._vcpu_of:
            self._vcpu_of = {tid: index for index, tid in enumerate(self.machine.vcpu_thread_ids) if tid}
        return self._vcpu_of.get(thread_id)
