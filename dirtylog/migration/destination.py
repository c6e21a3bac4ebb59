"""The destination side: accept authenticated streams, rebuild guest memory, verify, take the VM over.

A destination never resumes a partial VM. It builds a blank machine from the source's Header, applies
page batches as they come (a page sent in two rounds on two streams keeps the later round's copy), and
only when every stream has completed, the memory digest matches the source's, and the source has
committed does it load the vCPU states and run the guest. Any failure before that discards the copy.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from dirtylog.errors import DirtylogError
from dirtylog.machine import Machine
from dirtylog.migration.connection import DestinationConnection
from dirtylog.migration.digest import PageDigest, load_kernels
from dirtylog.migration.errors import ProtocolError
from dirtylog.migration.events import (
    CLOSED,
    NEED_DATA,
    Abort,
    AbortCode,
    Commit,
    Complete,
    Header,
    Hello,
    PageBatch,
    Ready,
    Resumed,
    RoundEnd,
    VcpuState,
    Verified,
)
from dirtylog.migration.keys import load_key
from dirtylog.migration.pages import batch_pages, pfns_from_runs
from dirtylog.migration.precopy import MigrationError
from dirtylog.migration.stats import MigrationStats
from dirtylog.migration.streams import Stream, close_aborted
from dirtylog.migration.transport import listen, parse_address
from dirtylog.migration.wire import FrameType, batch_data_at, batch_single_run
from dirtylog.units import PAGE_SIZE

ProgressCallback = Callable[[str, dict[str, Any]], None]
SCRATCH_BYTES = 4096


@dataclass
class Received:
    """A migrated VM now running here, and what its migration looked like from this side."""

    machine: Machine
    stats: MigrationStats
    rounds: list[dict[str, Any]] = field(default_factory=list)


class Listener:
    """A listening socket for incoming migrations (loopback unless an address says otherwise)."""

    def __init__(self, address: str) -> None:
        self.address = parse_address(address)
        # The compiled fingerprint pass first (0.2 s, or 2-4 s when it compiles on a first run): not in the
        # first round, and not while a source waits, since the source times its handshake as the round trip
        # that it subtracts from the downtime.
        load_kernels()
        self.sock = listen(self.address)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


def receive(listen_on: str | Listener, *, key_file: str, memory: int | None = None, io_timeout: float = 30.0,
            accept_timeout: float | None = None, progress: ProgressCallback | None = None,
            prefault: bool = True, before_resume: Callable[[Machine], None] | None = None) -> Received:
    """Accept one migration at ``listen_on`` and return the running machine.

    ``memory``, when given, is the only guest memory size accepted. ``prefault`` allocates guest memory
    before pages arrive: one populate call costs ~0.13 s/GiB here, against ~7 us per page when the first
    write of each page faults it in. Raises :class:`MigrationError` if the migration fails; nothing is
    resumed here then, and the source keeps the VM. ``before_resume`` sees the verified machine after the
    source committed and before its vCPUs run (to inspect or copy the memory exactly as migrated).
    """
    listener = listen_on if isinstance(listen_on, Listener) else Listener(listen_on)
    try:
        return DestinationMigration(listener, load_key(key_file), memory, io_timeout, accept_timeout,
                                    progress, prefault, before_resume).run()
    finally:
        if not isinstance(listen_on, Listener):
            listener.close()


class DestinationMigration:
    """One incoming migration."""

    def __init__(self, listener: Listener, key: bytes, memory: int | None, io_timeout: float,
                 accept_timeout: float | None, progress: ProgressCallback | None, prefault: bool,
                 before_resume: Callable[[Machine], None] | None = None) -> None:
        self.listener = listener
        self.key = key
        self.memory = memory
        self.io_timeout = io_timeout
        self.accept_timeout = accept_timeout
        self.progress = progress or (lambda kind, record: None)
        self.prefault = prefault
        self.before_resume = before_resume
        self.streams: list[Stream] = []
        self.machine: Machine | None = None
        self.header: Header | None = None
        self.stats = MigrationStats()
        self.rounds: list[dict[str, Any]] = []
        self._apply_lock = threading.Lock()
        self._page_round: np.ndarray = np.zeros(0, dtype=np.int64)
        self._digest: PageDigest | None = None
        self._vcpu_states: dict[int, bytes] = {}
        self._completes: dict[int, Complete] = {}
        self._done = threading.Condition()
        self._failure: str | None = None
        self._committed = False
        self._connected_at = time.perf_counter()
        self._readers: list[threading.Thread] = []

    def run(self) -> Received:
        start = time.perf_counter()
        try:
            first = self._accept_stream(None)
            self._build_machine(first)
            for _ in range(1, first.conn.stream_count):
                self._accept_stream(first.conn.migration_id)
            if len(self.streams) == 1:  # with several, a later round of a page may land first
                first.conn.place_data_with(_IntoGuestMemory(self))
            for stream in self.streams:
                stream.send(Ready())
            self.stats.setup_time = time.perf_counter() - self._connected_at
            self.stats.status = "active"
            # [control hook] tells a QMP monitor the incoming migration went from setup to active
            self.progress("setup", {"setup_time_ms": round(self.stats.setup_time * 1e3, 3)})
            for stream in self.streams:
                stream.start(reader=False)
                reader = threading.Thread(target=self._read, args=(stream,), name=f"recv{stream.index}", daemon=True)
                reader.start()
                self._readers.append(reader)
            self._await_completion()
            received = self._take_over(start)
        except BaseException as error:
            self._discard(error)
            raise self._as_error(error) from (None if isinstance(error, DirtylogError) else error)
        return received

    # --- streams ------------------------------------------------------------------------------------

    def _accept_stream(self, migration_id: bytes | None) -> Stream:
        self.listener.sock.settimeout(self.accept_timeout if migration_id is None else self.io_timeout)
        try:
            sock, peer = self.listener.sock.accept()
            if migration_id is None:
                self._connected_at = time.perf_counter()
        except TimeoutError:
            raise MigrationError("no source connected in time" if migration_id is None else
                                 "a parallel stream of the migration never connected") from None
        sock.settimeout(self.io_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = DestinationConnection(self.key, page_size=PAGE_SIZE)
        stream = Stream(len(self.streams), sock, conn)
        self.streams.append(stream)
        hello = stream.read_until(Hello, "source", self.io_timeout)
        if migration_id is not None and hello.migration_id != migration_id:
            raise MigrationError("a connection from another migration arrived while streams of this one were "
                                 "expected; one migration at a time")
        stream.index = hello.stream_index
        stream.write_now(conn.accept())
        header = stream.read_until(Header, "source", self.io_timeout)
        if self.memory is not None and header.memory_bytes != self.memory:
            raise MigrationError(
                f"the source's guest has {header.memory_bytes >> 20} MiB of memory, this destination accepts "
                f"{self.memory >> 20} MiB (--memory): give both sides the same size")
        if self.header is not None and header != self.header:
            raise MigrationError(f"stream {hello.stream_index} sent a different Header than stream 0")
        self.header = header
        del peer
        return stream

    def _build_machine(self, first: Stream) -> None:
        header = self.header
        assert header is not None
        workload = header.workload
        try:
            machine = Machine(header.memory_bytes, header.vcpus, workload.get("name", "idle"), workload.get("rate"),
                              slots=len(header.slots), hot_fraction=workload.get("hot_fraction", 0.1),
                              hot_weight=workload.get("hot_weight", 0.9),
                              writes_per_iteration=workload.get("writes_per_iteration", 0), blank=True,
                              prefault=self.prefault)
        except DirtylogError as error:
            raise MigrationError(f"cannot build the destination VM: {error}") from None
        self.machine = machine
        ours = sorted((s.base_gfn, s.npages) for s in machine.vm.slots.values())
        theirs = sorted((s.base_gfn, s.npages) for s in header.slots)
        if ours != theirs:
            raise MigrationError(f"the source's memory slots {theirs} differ from what this destination builds {ours}")
        machine.create_vcpus()  # now, not in the downtime
        self._page_round = np.full(machine.ram.npages, -1, dtype=np.int64)
        self._digest = PageDigest(machine.ram.npages)  # a blank machine: every fingerprint is the zero page's
        self.stats = MigrationStats(page_size=header.page_size, total_pages=header.total_pages,
                                    streams=header.streams, compression=header.codec)

    # --- receiving ----------------------------------------------------------------------------------

    def _read(self, stream: Stream) -> None:
        # Frame headers and small frames land in a scratch buffer; the rest of a page batch is received
        # straight into the frame's own buffer, sparing a copy of every page.
        scratch = memoryview(bytearray(SCRATCH_BYTES))
        conn = stream.conn
        try:
            while True:
                with stream.lock:
                    target = conn.receive_buffer()
                if target is not None:
                    count = stream.sock.recv_into(target)
                    if count:
                        with stream.lock:
                            conn.received(count)
                else:
                    count = stream.sock.recv_into(scratch)
                    with stream.lock:
                        conn.receive_data(scratch[:count])
                if count == 0:
                    with stream.lock:
                        conn.receive_data(b"")
                with stream.lock:  # the main thread may be sending Verified or Resumed on this connection
                    while (event := conn.next_event()) is not NEED_DATA:
                        if not self._handle(stream, event):
                            return
                if count == 0:
                    raise MigrationError(f"stream {stream.index}: the source closed the connection")
        except TimeoutError:
            self._fail(f"stream {stream.index}: the source sent nothing for {self.io_timeout:.0f} s")
        except ProtocolError as error:
            stream.reply_best_effort(error.reply)
            self._fail(str(error))
        except (DirtylogError, OSError) as error:
            self._fail(str(error))

    def _handle(self, stream: Stream, event: object) -> bool:
        """Act on one event; False when this stream has nothing more to say."""
        if event is CLOSED:
            return False
        if isinstance(event, PageBatch):
            self._apply(event)
        elif isinstance(event, RoundEnd):
            if stream.index == 0:
                record = {"round": event.round, "pages": event.pages, **event.stats}
                self.rounds.append(record)
                self.progress("round", record)
        elif isinstance(event, VcpuState):
            self._vcpu_states[event.index] = event.state
        elif isinstance(event, Complete):
            with self._done:
                self._completes[stream.index] = event
                self._done.notify_all()
            return stream.index == 0  # the primary goes on to Verified / Commit
        elif isinstance(event, Commit):
            with self._done:
                self._committed = True
                self._done.notify_all()
            return False
        elif isinstance(event, Abort):
            self._fail(f"the source aborted the migration: {event.reason}")
            return False
        elif event is not None and not isinstance(event, Verified | Resumed):
            self._fail(f"unexpected {type(event).__name__} from the source")
            return False
        return True

    def _apply(self, batch: PageBatch) -> None:
        """Write a batch into guest memory, keeping for each page the copy of the latest round."""
        data = batch_pages(batch)  # before taking the lock: streams decompress in parallel
        one_run = batch.starts.size == 1 and len(data) == batch.npages  # and no zero page
        if one_run and self._apply_run(batch.round, int(batch.starts[0]), data):
            normal, zeros = len(data), 0
        else:
            normal, zeros = self._apply_pages(batch, data)
        self.stats.transferred += len(batch.data)
        self.stats.normal_pages += normal
        self.stats.duplicate_pages += zeros

    def _apply_run(self, round_: int, first: int, data: NDArray[np.uint8]) -> bool:
        """Pages ``first``, ``first + 1``, ... now hold ``data``: the usual batch, one run with no zero page,
        applied with slices instead of per-page arrays (each NumPy call costs ~10-20 us with the cache full
        of page data). False, with nothing applied, when a later round of one of them already arrived."""
        assert self.machine is not None and self._digest is not None
        pages = self.machine.ram.pages
        with self._apply_lock:
            rounds = self._page_round[first:first + len(data)]
            if rounds.max() > round_:
                return False
            if data.ctypes.data != pages[first].ctypes.data:  # not received in place (_IntoGuestMemory)
                pages[first:first + len(data)] = data
            rounds[:] = round_
            self._digest.update_run(first, data)
        return True

    def _apply_pages(self, batch: PageBatch, data: NDArray[np.uint8]) -> tuple[int, int]:
        """Any batch, page by page: zero pages, several runs, pages a later round already brought. Returns
        the pages applied with data and as zero pages."""
        assert self.machine is not None and self._digest is not None
        pfns, zero = pfns_from_runs(batch.starts, batch.lengths), batch.zero
        pages = self.machine.ram.pages
        with self._apply_lock:
            newer = self._page_round[pfns] <= batch.round
            if not newer.all():  # a later round of this page already arrived on another stream
                data, zero, pfns = data[newer[~zero]], zero[newer], pfns[newer]
            pages[pfns[~zero]] = data
            if zero.any():
                pages[pfns[zero]] = 0
            self._page_round[pfns] = batch.round
            self._digest.update(pfns[~zero], data)
            self._digest.zero(pfns[zero])
        zeros = int(np.count_nonzero(zero))
        return int(pfns.size) - zeros, zeros

    def _fail(self, reason: str) -> None:
        with self._done:
            if self._failure is None:
                self._failure = reason
            self._done.notify_all()

    # --- taking over --------------------------------------------------------------------------------

    def _wait(self, condition: Callable[[], bool]) -> None:
        """Wait for ``condition``; a silent source is caught by the readers' socket timeouts."""
        with self._done:
            while not condition():
                if self._failure is not None:
                    raise MigrationError(self._failure)
                self._done.wait(1.0)
            if self._failure is not None:
                raise MigrationError(self._failure)

    def _await_completion(self) -> None:
        count = len(self.streams)
        self._wait(lambda: all(i in self._completes for i in range(count)))
        frames = {c.stream_frames for c in self._completes.values()}
        if len(frames) != 1:
            raise MigrationError("the streams disagree on how many frames each carried: frames were lost")

    def _take_over(self, start: float) -> Received:
        assert self.machine is not None and self._digest is not None
        primary = next(s for s in self.streams if s.index == 0)
        with self._apply_lock:
            digest = self._digest.digest()
        expected = self._completes[0].digest
        if digest != expected:
            raise _VerifyFailedError(f"memory digest mismatch: ours {digest.hex()}, the source's {expected.hex()}; "
                                "the copy is discarded and the source keeps the VM")
        primary.send(Verified(digest))
        self._wait(lambda: self._committed)
        states = [self._vcpu_states[i] for i in range(self.machine.spec.vcpus)]
        if self.before_resume is not None:
            self.before_resume(self.machine)
        self.machine.start(states)
        primary.send(Resumed())
        primary.drain(self.io_timeout)
        self.stats.digest = digest.hex()
        self.stats.status = "completed"
        self.stats.total_time = time.perf_counter() - self._connected_at
        for stream in self.streams:
            stream.close()
        return Received(self.machine, self.stats, self.rounds)

    def _discard(self, error: BaseException) -> None:
        """Tell the source, drop the streams and the unfinished VM (never resumed)."""
        code = AbortCode.VERIFY_FAILED if isinstance(error, _VerifyFailedError) else AbortCode.INTERNAL
        if isinstance(error, ProtocolError):
            code = AbortCode.PROTOCOL
        for stream in self.streams:
            stream.abort(str(error), code)
        if self.machine is not None and self.machine.state.value == "created":
            self.machine.close()
        close_aborted(self.streams)
        self.stats.status = "failed"
        self.stats.error = str(error)

    def _as_error(self, error: BaseException) -> MigrationError:
        if isinstance(error, MigrationError):
            return MigrationError(f"{error} (nothing was resumed here)")
        if isinstance(error, ProtocolError):
            return MigrationError(f"migration stream failed: {error} (nothing was resumed here)")
        return MigrationError(f"incoming migration failed: {type(error).__name__}: {error} (nothing was resumed "
                              "here)")


class _IntoGuestMemory:
    """Receives the data of a PageBatch of one run of non-zero pages straight into guest memory, sparing
    the copy from the frame buffer (a Placer: see dirtylog.migration.framing).

    The bytes land before the frame's MAC is checked; a frame that then fails it fails the migration, and
    this machine, never resumed, is discarded with whatever landed. Only for a single stream, whose
    batches arrive in the order they were sent; a batch older than a page's last applied round is not
    placed (it cannot happen on one stream) and goes the usual way.
    """

    def __init__(self, migration: DestinationMigration) -> None:
        self._migration = migration

    def head_size(self, ftype: int, peek: memoryview, length: int) -> int:
        return batch_data_at(peek) if ftype == FrameType.PAGE_BATCH else 0

    def place(self, ftype: int, head: memoryview, length: int) -> memoryview | None:
        run = batch_single_run(head)
        machine = self._migration.machine
        if run is None or machine is None:
            return None
        round_, first, npages = run
        pages = machine.ram.pages
        if first + npages > pages.shape[0] or length - len(head) != npages * pages.shape[1]:
            return None
        with self._migration._apply_lock:
            if (self._migration._page_round[first:first + npages] > round_).any():
                return None
        return pages[first:first + npages].data.cast("B")


class _VerifyFailedError(MigrationError):
    """The memory digest did not match."""
