"""The destination side: accept authenticated streams, rebuild guest memory, verify, take the VM over.

A destination never resumes a partial VM. It builds a blank machine from the source's Header, applies
page batches as they come (a page sent in two rounds on two streams keeps the later round's copy), and
only when every stream has completed, the memory digest matches the source's, and the source has
committed does it load the vCPU states and run the guest. Any failure before that discards the copy.

A post-copy migration (PostcopyStart instead of Complete) hands the VM over before all of its memory: the pages
kept are verified, the owed ones dropped and put under userfaultfd (``engine/postcopy_destination.py``), the
source commits, and the guest runs while the rest arrives, on demand and pushed. A broken link then pauses the
migration instead of failing it: the destination listens for the source to resume (on its listener, or where
:meth:`DestinationMigration.recover` says), tells it which pages it still lacks, and goes on.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dirtylog.bitmap import DirtyBitmap
from dirtylog.errors import DirtylogError
from dirtylog.guest.host import host_architecture
from dirtylog.guest.machine import Machine, State
from dirtylog.guest.memory import host_memory_bytes, plan_slots
from dirtylog.kvm.system import Kvm
from dirtylog.migration.engine.admission import Admission, Resumption
from dirtylog.migration.engine.lanes import compiled_unavailable
from dirtylog.migration.engine.postcopy_destination import LINK_CODES, PostcopyDestination
from dirtylog.migration.engine.streams import Stream, close_aborted
from dirtylog.migration.engine.urgency import short_switch_interval
from dirtylog.migration.errors import MigrationError
from dirtylog.migration.keys import load_key
from dirtylog.migration.payload.digest import load_kernels
from dirtylog.migration.payload.memory import DestinationMemory
from dirtylog.migration.payload.vm import workload_arguments
from dirtylog.migration.policy.stats import MigrationStats, MigrationStatus, ProgressCallback
from dirtylog.migration.protocol.acceptance import HeaderAcceptance
from dirtylog.migration.protocol.errors import ProtocolError
from dirtylog.migration.protocol.events import (
    CLOSED,
    NEED_DATA,
    Abort,
    AbortCode,
    Channel,
    Commit,
    Complete,
    Header,
    Missing,
    PageBatch,
    PostcopyPages,
    PostcopyStart,
    Ready,
    Resumed,
    RoundEnd,
    VcpuState,
    Verified,
)
from dirtylog.migration.transports import ChannelListener, Endpoint, listen, parse_endpoint
from dirtylog.units import PAGE_SIZE

SCRATCH_BYTES = 4096
PROGRESS_INTERVAL = 0.2  # seconds between progress records in post-copy


@dataclass
class Received:
    """A migrated VM now running here, and what its migration looked like from this side."""

    machine: Machine
    stats: MigrationStats
    rounds: list[dict[str, Any]] = field(default_factory=list)


class Listener:
    """Where incoming migrations arrive: ``host:port`` (loopback unless a host is named), ``unix:PATH``, or
    ``file:PATH`` (a stream written earlier by ``migrate(..., "file:PATH")``).

    A listener is ready before any source connects: the compiled passes are loaded, and with ``memory`` the
    VM and its guest memory (prefaulted) exist already, so a source's setup is only its connection and
    handshake. ``memory`` is then the one size accepted; without it a Header may claim up to ``max_memory``
    (default half of this host's RAM), and memory is allocated as pages arrive, not before.
    """

    def __init__(self, address: str, *, memory: int | None = None, max_memory: int | None = None,
                 prefault: bool = True, machine_class: type[Machine] = Machine) -> None:
        endpoint = parse_endpoint(address)
        # The compiled fingerprint pass first (0.2 s, or 2-4 s when it compiles on a first run): not in the
        # first round, and not while a source waits, since the source times its handshake as the round trip
        # that it subtracts from the downtime.
        load_kernels()
        if not compiled_unavailable():  # post-copy's compiled fault path: loaded now, not at the first fault
            from dirtylog.migration.engine.fault_lane import load_kernels as load_fault_lane

            load_fault_lane()
        with Kvm() as kvm:  # what this host can run, for the Header's acceptance
            self.max_vcpus = min(kvm.max_vcpus, host_architecture().layout.max_vcpus)
        self.memory = memory
        self.max_memory = max_memory if max_memory is not None else host_memory_bytes()[0] // 2
        #: What the machines it receives are (``dirtylog.Machine`` through the top-level ``receive``).
        self.machine_class = machine_class
        self.prepared: Machine | None = None
        if memory is not None:
            self.prepared = machine_class(memory, 1, "idle", blank=True, prefault=prefault)
        try:
            self.transport: ChannelListener = listen(endpoint)
        except BaseException:
            self.close()
            raise
        self.address = self.transport.address
        #: Said to the operator when the address is reachable from other hosts (see exposure_warning).
        self.warning = exposure_warning(endpoint)

    @property
    def port(self) -> int:
        """The TCP port listened on (0 for other transports)."""
        return int(getattr(self.transport, "port", 0))

    def acceptance(self) -> HeaderAcceptance:
        """What this listener's destination takes from a source."""
        return HeaderAcceptance(page_size=PAGE_SIZE, memory_bytes=self.memory, max_memory_bytes=self.max_memory,
                                max_vcpus=self.max_vcpus, plan_slots=plan_slots)

    def take_machine(self) -> Machine | None:
        """The prepared VM, once (the migration that takes it owns it)."""
        machine, self.prepared = self.prepared, None
        return machine

    def close(self) -> None:
        if getattr(self, "transport", None) is not None:
            self.transport.close()
        if self.prepared is not None:
            self.prepared.close()
            self.prepared = None


def exposure_warning(endpoint: Endpoint) -> str | None:
    """A warning for an address other hosts can reach: who may connect, and what they would get."""
    if endpoint.scheme != "tcp":
        return None
    try:
        loopback = ipaddress.ip_address(endpoint.host).is_loopback
    except ValueError:  # a host name: whatever it resolves to may be reachable
        loopback = endpoint.host == "localhost"
    if loopback:
        return None
    return (f"listening on {endpoint}, reachable from other hosts: anyone there can connect, and any host "
            "holding the key can send this host a VM to run (its memory travels encrypted unless --no-encrypt)")


def receive(listen_on: str | Listener, *, key_file: str, memory: int | None = None, max_memory: int | None = None,
            io_timeout: float = 30.0, accept_timeout: float | None = None, handshake_timeout: float = 5.0,
            progress: ProgressCallback | None = None, before_resume: Callable[[Machine], None] | None = None,
            machine_class: type[Machine] = Machine, start_paused: bool = False, resume_timeout: float | None = None,
            resume_listen: str | None = None, compiled_faults: bool = True) -> Received:
    """Accept one migration at ``listen_on`` and return the running machine (a ``machine_class``, which a
    Listener given here already chose).

    ``memory``, when given, is the only guest memory size accepted, and the VM is prepared before a source
    connects; ``max_memory`` bounds what a Header may claim otherwise. Connections that do not authenticate
    within ``handshake_timeout`` (or at all) are refused, reported through ``progress("refused", ...)``, and
    the listener goes on until a source authenticates or ``accept_timeout`` passes. Raises
    :class:`MigrationError` if the migration fails; nothing is resumed here then, and the source keeps the VM.
    ``before_resume`` sees the verified machine after the source committed and before its vCPUs run (to
    inspect or copy the memory exactly as migrated; not called in post-copy, whose memory is not all there yet).
    ``start_paused``: the VM arrives paused (QEMU's ``-S``), and its pages still come in post-copy. After a post-copy
    link broke, the destination waits up to ``resume_timeout`` (None: for as long as it lives) for the source to
    resume, at ``listen_on``, or at ``resume_listen`` when given. ``compiled_faults``: post-copy's faults are
    served by compiled code where this host can (False: by the interpreter, to compare).
    """
    key = load_key(key_file)
    if isinstance(listen_on, Listener) and (memory is not None or max_memory is not None):
        raise MigrationError("give memory and max_memory to the Listener, which prepares for them")
    listener = listen_on if isinstance(listen_on, Listener) else Listener(listen_on, memory=memory,
                                                                           max_memory=max_memory,
                                                                           machine_class=machine_class)
    try:
        return DestinationMigration(listener, key, io_timeout=io_timeout, accept_timeout=accept_timeout,
                                    handshake_timeout=handshake_timeout, progress=progress,
                                    before_resume=before_resume, start_paused=start_paused,
                                    resume_timeout=resume_timeout, resume_listen=resume_listen,
                                    compiled_faults=compiled_faults).run()
    finally:
        if not isinstance(listen_on, Listener):
            listener.close()


class DestinationMigration:
    """One incoming migration."""

    def __init__(self, listener: Listener, key: bytes, *, io_timeout: float, accept_timeout: float | None,
                 handshake_timeout: float, progress: ProgressCallback | None,
                 before_resume: Callable[[Machine], None] | None = None, start_paused: bool = False,
                 resume_timeout: float | None = None, resume_listen: str | None = None,
                 compiled_faults: bool = True) -> None:
        self.listener = listener
        self.compiled_faults = compiled_faults
        self.start_paused = start_paused
        self.resume_timeout = resume_timeout
        self.resume_listen = resume_listen
        self.channel: Stream | None = None  # the post-copy channel
        self.postcopy: PostcopyDestination | None = None
        self._postcopy_start: PostcopyStart | None = None
        self._recover_at: ChannelListener | None = None  # set by recover(): where to wait for the source
        self._recover_lock = threading.Lock()
        self.paused = False
        self.key = key
        self.io_timeout = io_timeout
        self.accept_timeout = accept_timeout
        self.handshake_timeout = handshake_timeout
        self.progress = progress or (lambda kind, record: None)
        self.before_resume = before_resume
        self.streams: list[Stream] = []
        self.machine: Machine | None = None
        self.memory: DestinationMemory | None = None
        self.header: Header | None = None
        self.stats = MigrationStats()
        self.rounds: list[dict[str, Any]] = []
        self._vcpu_states: dict[int, bytes] = {}
        self._completes: dict[int, Complete] = {}
        self._done = threading.Condition()
        self._failure: str | None = None
        self._verified = False
        self._committed = False
        self._connected_at = time.perf_counter()
        self._readers: list[threading.Thread] = []

    def run(self) -> Received:
        start = time.perf_counter()
        try:
            admission = Admission(self.listener.transport, self.key, self.listener.acceptance(),
                                  io_timeout=self.io_timeout, handshake_timeout=self.handshake_timeout,
                                  on_refused=self._refused)
            admitted = admission.run(self.accept_timeout)
            self._connected_at = admission.connected_at
            self.streams = [entry.stream for entry in admitted if entry.hello.channel is Channel.STREAM]
            self.channel = next((e.stream for e in admitted if e.hello.channel is Channel.POSTCOPY), None)
            self.migration_id = admitted[0].hello.migration_id
            self.header = admitted[0].header
            phases = {"admission": time.perf_counter()}
            self._build_machine()
            phases["build"] = time.perf_counter()
            if len(self.streams) == 1:  # with several, a later round of a page may land first
                assert self.memory is not None
                self.streams[0].conn.place_runs_with(self.memory)
            for stream in self.streams:
                stream.send(Ready())
            if self.channel is not None:
                self.channel.send(Ready())
            phases["ready"] = time.perf_counter()
            self.stats.setup_time = phases["ready"] - self._connected_at
            marks = [self._connected_at, *phases.values()]
            self.stats.setup_phases = {name: end - begin for name, begin, end in zip(phases, marks, marks[1:],
                                                                                      strict=False)}
            self.stats.status = MigrationStatus.ACTIVE
            self.progress("setup", {"setup_time_ms": round(self.stats.setup_time * 1e3, 3),
                                    "setup_phases_ms": self.stats.as_dict()["setup_phases_ms"]})
            for stream in self.streams:
                stream.start(reader=False)
                reader = threading.Thread(target=self._read, args=(stream,), name=f"recv{stream.index}", daemon=True)
                reader.start()
                self._readers.append(reader)
            self._await_completion()
            received = self._take_over(start) if self._postcopy_start is None else self._take_over_postcopy()
        except BaseException as error:
            self._discard(error)
            raise self._as_error(error) from (None if isinstance(error, DirtylogError) else error)
        return received

    def _refused(self, peer: str, reason: str) -> None:
        self.progress("refused", {"peer": peer, "reason": reason})

    def _build_machine(self) -> None:
        """The VM the stream fills: the listener's prepared one, or one made now for the Header's memory (its
        pages allocated as they arrive: a size the operator did not prepare is not committed up front)."""
        header = self.header
        assert header is not None
        description = workload_arguments(header)
        try:
            machine = self.listener.take_machine()
            if machine is None:
                machine = self.listener.machine_class(header.memory_bytes, header.vcpus, slots=len(header.slots),
                                                      blank=True,
                                  **description)
            else:
                machine.assume_workload(vcpus=header.vcpus, **description)
        except DirtylogError as error:
            raise MigrationError(f"cannot build the destination VM: {error}") from None
        self.machine = machine
        machine.create_vcpus()  # now, not in the downtime
        self.memory = DestinationMemory(machine.ram.pages)
        self.stats = MigrationStats(page_size=header.page_size, total_pages=header.total_pages,
                                    streams=header.streams, compression=header.codec,
                                    encrypted=self.streams[0].conn.encrypted)

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
                    count = stream.channel.recv_into(target)
                    if count:
                        with stream.lock:
                            conn.received(count)
                else:
                    count = stream.channel.recv_into(scratch)
                    with stream.lock:
                        conn.receive_data(scratch[:count])
                if count == 0:
                    with stream.lock:
                        conn.receive_data(b"")
                while True:
                    with stream.lock:  # the main thread may be sending Verified or Resumed on this connection
                        event = conn.next_event()
                    if event is NEED_DATA:
                        break
                    if not self._handle(stream, event):
                        return
                    if isinstance(event, Complete | PostcopyStart) and stream.index == 0:
                        # A live source says nothing more until our Verified; a recorded one (a file) must not
                        # run ahead of it either, or its Commit would arrive before we had verified.
                        self._wait(lambda: self._verified)
                if count == 0:
                    raise MigrationError(f"stream {stream.index}: the source closed the connection")
        except TimeoutError:
            self._stream_failed(stream, f"stream {stream.index}: the source sent nothing for {self.io_timeout:.0f} s")
        except ProtocolError as error:
            stream.reply_best_effort(error.reply)
            self._stream_failed(stream, str(error))
        except (DirtylogError, OSError) as error:
            self._stream_failed(stream, str(error))
        except Exception as error:  # a failing progress callback, say: the migration fails, nothing hangs
            self._fail(f"{type(error).__name__}: {error}")

    def _stream_failed(self, stream: Stream, reason: str) -> None:
        """A stream ended abnormally: before the post-copy commit the migration fails; after it the link broke."""
        postcopy = self.postcopy
        if postcopy is None or not self._committed:
            self._fail(reason)
        elif self.streams and stream is self.streams[0]:  # a stream of an earlier link has nothing more to say
            postcopy.break_link(reason)

    def _handle(self, stream: Stream, event: object) -> bool:
        """Act on one event; False when this stream has nothing more to say."""
        if event is CLOSED:
            return False
        if isinstance(event, PageBatch):
            self._apply(event)
        elif isinstance(event, RoundEnd):
            if stream.index == 0:
                # The source's own figures go under their own key: they cannot pass for ours.
                record = {"round": event.round, "pages": event.pages, "source_stats": dict(event.stats)}
                self.rounds.append(record)
                self.progress("round", record)
        elif isinstance(event, VcpuState):
            self._vcpu_states[event.index] = event.state
        elif isinstance(event, PostcopyPages):
            assert self.postcopy is not None  # the rules allow them only after the post-copy commit
            self.postcopy.install(event)
        elif isinstance(event, PostcopyStart):
            with self._done:
                self._postcopy_start = event
                self._done.notify_all()
        elif isinstance(event, Complete) and self.postcopy is not None:
            self.postcopy.complete("stream", event)  # every page owed was sent: Verified once all are here
        elif isinstance(event, Complete):
            with self._done:
                self._completes[stream.index] = event
                self._done.notify_all()
            return stream.index == 0  # the primary goes on to Verified / Commit
        elif isinstance(event, Commit):
            with self._done:
                self._committed = True
                self._done.notify_all()
            return self.postcopy is not None  # in post-copy the pages follow
        elif isinstance(event, Abort):
            if self.postcopy is not None and self._committed:
                if event.code in LINK_CODES:
                    self.postcopy.break_link(f"the source refused a frame: {event.reason}")
                else:
                    self.postcopy.give_up(f"the source gave up in post-copy: {event.reason}")
            else:
                self._fail(f"the source aborted the migration: {event.reason}")
            return False
        elif event is not None and not isinstance(event, Verified | Resumed):
            self._fail(f"unexpected {type(event).__name__} from the source")
            return False
        return True

    def _apply(self, batch: PageBatch) -> None:
        """Write a batch into guest memory, keeping for each page the copy of the latest round."""
        assert self.memory is not None
        applied = self.memory.apply(batch)
        self.stats.transferred += applied.wire_bytes
        self.stats.normal_pages += applied.normal
        self.stats.duplicate_pages += applied.zero

    def _fail(self, reason: str) -> None:
        with self._done:
            if self._failure is None:
                self._failure = reason
            self._done.notify_all()

    # --- taking over --------------------------------------------------------------------------------

    def _wait(self, condition: Callable[[], bool]) -> None:
        """Wait for ``condition``. A silent source is caught by the readers' socket timeouts, and a reader that
        ends says why (``_fail``); should every reader end without a word, the wait ends too."""
        with self._done:
            while not condition():
                if self._failure is not None:
                    raise MigrationError(self._failure)
                if self._readers and not any(reader.is_alive() for reader in self._readers):
                    raise MigrationError("every stream ended before the migration did")
                self._done.wait(0.5)
            if self._failure is not None:
                raise MigrationError(self._failure)

    def _await_completion(self) -> None:
        count = len(self.streams)
        self._wait(lambda: all(i in self._completes for i in range(count)) or self._postcopy_start is not None)
        if self._postcopy_start is not None:
            return
        frames = {c.stream_frames for c in self._completes.values()}
        if len(frames) != 1:
            raise MigrationError("the streams disagree on how many frames each carried: frames were lost")

    def _take_over(self, start: float) -> Received:
        assert self.machine is not None and self.memory is not None
        primary = next(s for s in self.streams if s.index == 0)
        digest = self.memory.digest()
        expected = self._completes[0].digest
        if digest != expected:
            raise _VerifyFailedError(f"memory digest mismatch: ours {digest.hex()}, the source's {expected.hex()}; "
                                "the copy is discarded and the source keeps the VM")
        # KVM checks the vCPU state now, before we say Verified: a state it refuses fails the migration while the
        # source still owns the VM, instead of after the commit, when neither side could run it.
        try:
            self.machine.load_vcpu_states([self._vcpu_states[i] for i in range(self.machine.spec.vcpus)])
        except DirtylogError as error:
            raise _ResumeRefusedError(f"KVM refused the source's vCPU state: {error}") from None
        primary.send(Verified(digest))
        with self._done:
            self._verified = True
            self._done.notify_all()
        self._wait(lambda: self._committed)
        if self.before_resume is not None:
            self.before_resume(self.machine)
        try:
            self.machine.start(paused=self.start_paused)
        except DirtylogError as error:  # after the commit: tell the source, which then resumes its copy
            raise _ResumeRefusedError(f"the VM could not start here after the commit: {error}") from None
        primary.send(Resumed())
        primary.drain(self.io_timeout)
        self.stats.digest = digest.hex()
        self.stats.status = MigrationStatus.COMPLETED
        self.stats.total_time = time.perf_counter() - self._connected_at
        for stream in self.streams:
            stream.close()
        if self.channel is not None:  # pre-copy finished it: the post-copy channel was never needed
            self.channel.close()
        return Received(self.machine, self.stats, self.rounds)

    # --- post-copy ----------------------------------------------------------------------------------------

    def _take_over_postcopy(self) -> Received:
        """The post-copy switch: verify what we keep, drop what is owed, commit, run, then take the rest."""
        assert self.machine is not None and self.memory is not None and self._postcopy_start is not None
        switch = self._postcopy_start
        primary = self.streams[0]
        if self.channel is None:
            raise MigrationError("the source switched to post-copy without a post-copy channel")
        owed = switch.pending.pages()
        kept = self.memory.digest_as_zero(owed)
        if kept != switch.digest:
            raise _VerifyFailedError(f"the digest of the pages kept differs from the source's ({kept.hex()} against "
                                     f"{switch.digest.hex()}); the copy is discarded and the source keeps the VM")
        try:
            self.machine.load_vcpu_states([self._vcpu_states[i] for i in range(self.machine.spec.vcpus)])
        except DirtylogError as error:
            raise _ResumeRefusedError(f"KVM refused the source's vCPU state: {error}") from None
        self.postcopy = PostcopyDestination(self.machine, self.memory, switch.pending, self.stats,
                                            io_timeout=self.io_timeout, compiled_faults=self.compiled_faults)
        self.postcopy.prepare()  # owed pages dropped, guest RAM under userfaultfd, the fault handler waiting
        self.stats.postcopy, self.stats.postcopy_pending = True, len(owed)
        self.stats.faults = self.postcopy.faults
        primary.send(Verified(kept))
        with self._done:
            self._verified = True
            self._done.notify_all()
        self._wait(lambda: self._committed)
        self.postcopy.attach(self.channel)
        try:
            self.machine.start(paused=self.start_paused)
        except DirtylogError as error:
            raise _ResumeRefusedError(f"the VM could not start here after the commit: {error}") from None
        primary.send(Resumed())
        committed_at = time.perf_counter()
        self.stats.status = MigrationStatus.POSTCOPY_ACTIVE
        self.progress("postcopy", {"pending": len(owed)})
        with short_switch_interval():
            while (outcome := self.postcopy.wait(timeout=PROGRESS_INTERVAL)) != "done":
                if outcome == "broken":
                    self._resume_link()
                else:
                    record = self.postcopy.progress_record()
                    self.stats.postcopy_timeline.append((time.perf_counter() - committed_at, int(record["remaining"]),
                                                         int(record["requests"])))
                    self.progress("postcopy-progress", record)
        digest = self.memory.digest()
        if digest != self.postcopy.digest_claimed:
            raise MigrationError(f"memory digest mismatch after post-copy: ours {digest.hex()}, the source's "
                                 f"{(self.postcopy.digest_claimed or b'').hex()}: a page arrived other than the source "
                                 "sent it, and the guest may have read it")
        self.postcopy.close()  # every page is here: the handler's work and the channel's are over
        self.streams[0].send(Verified(digest))
        self.channel.send(Verified(digest))
        self.streams[0].drain(self.io_timeout)
        self.stats.postcopy_time = time.perf_counter() - committed_at
        self.stats.digest = digest.hex()
        self.stats.status = MigrationStatus.COMPLETED
        self.stats.total_time = time.perf_counter() - self._connected_at
        for stream in [*self.streams, self.channel]:
            stream.close()
        self._close_recovery()
        self.progress("postcopy-completed", self.stats.postcopy_dict())
        return Received(self.machine, self.stats, self.rounds)

    def recover(self, address: str) -> str:
        """Wait for the source to resume at ``address`` from now on (QMP's migrate-recover); only while paused.
        Returns the address listened on (with the port the kernel chose for port 0)."""
        if not self.paused:
            raise MigrationError("Migrate recover can only be run when postcopy is paused.")
        transport = listen(parse_endpoint(address))
        with self._recover_lock:
            old, self._recover_at = self._recover_at, transport
        if old is not None:
            old.close()
        return transport.address

    def _close_recovery(self) -> None:
        with self._recover_lock:
            transport, self._recover_at = self._recover_at, None
        if transport is not None:
            transport.close()

    def pause_link(self) -> None:
        """Break the post-copy link on purpose (QMP's migrate-pause)."""
        if self.postcopy is None or not self._committed or self.paused:
            raise MigrationError("migrate-pause is only possible in post-copy, while its link is up")
        self.postcopy.break_link("paused on request (migrate-pause)")

    def _resume_link(self) -> None:
        """The link broke: drop it, wait for the source to come back, tell it what we lack, attach the new link."""
        assert self.postcopy is not None and self.header is not None
        postcopy = self.postcopy
        paused_at = time.perf_counter()
        self.paused = True
        self.stats.status = MigrationStatus.POSTCOPY_PAUSED
        postcopy.detach()
        reason = postcopy.broken
        for stream in [*self.streams, *([self.channel] if self.channel else [])]:
            stream.close()
        if self.resume_listen is not None and self._recover_at is None:
            self._recover_at = listen(parse_endpoint(self.resume_listen))
        self.progress("postcopy-paused", {"reason": reason, "remaining": postcopy.remaining})
        deadline = None if self.resume_timeout is None else time.monotonic() + self.resume_timeout
        waited = Resumption(self.migration_id, self.header)
        while True:
            with self._recover_lock:
                transport = self._recover_at or self.listener.transport
            admission = Admission(transport, self.key, self.listener.acceptance(), io_timeout=self.io_timeout,
                                  handshake_timeout=self.handshake_timeout, on_refused=self._refused,
                                  resumption=waited)
            try:
                admitted = admission.run(1.0)
                break
            except MigrationError as error:
                if deadline is not None and time.monotonic() > deadline:
                    raise MigrationError(f"the post-copy link broke ({reason}) and the source did not resume within "
                                         f"{self.resume_timeout:g} s ({error})") from None
                if postcopy.fatal:
                    raise MigrationError(postcopy.fatal) from None
        self.stats.status = MigrationStatus.POSTCOPY_RECOVER
        self.progress("postcopy-recover", {})
        stream = next(e.stream for e in admitted if e.hello.channel is Channel.STREAM)
        channel = next(e.stream for e in admitted if e.hello.channel is Channel.POSTCOPY)
        with postcopy.lock:
            missing = DirtyBitmap.from_pages(np.flatnonzero(postcopy.missing), len(postcopy.missing))
        stream.send(Missing(missing))
        channel.send(Ready())
        self.streams, self.channel = [stream], channel
        stream.start(reader=False)
        reader = threading.Thread(target=self._read, args=(stream,), name="recv0", daemon=True)
        reader.start()
        self._readers = [reader]
        postcopy.attach(channel)
        self.paused = False
        self.stats.recoveries += 1
        self.stats.paused_time += time.perf_counter() - paused_at
        self.stats.status = MigrationStatus.POSTCOPY_ACTIVE
        self.progress("postcopy-resumed", {"missing": missing.count(),
                                           "paused_ms": round((time.perf_counter() - paused_at) * 1e3, 3)})

    def _discard(self, error: BaseException) -> None:
        """Tell the source, drop the streams and the unfinished VM (never resumed)."""
        code = AbortCode.INTERNAL
        if isinstance(error, _VerifyFailedError):
            code = AbortCode.VERIFY_FAILED
        elif isinstance(error, _ResumeRefusedError):
            code = AbortCode.RESUME_FAILED
        elif isinstance(error, ProtocolError):
            code = AbortCode.PROTOCOL
        streams = [*self.streams, *([self.channel] if self.channel is not None else [])]
        for stream in streams:
            stream.abort(str(error), code)
        if self.postcopy is not None:
            self.postcopy.close()
        self._close_recovery()
        if self.machine is not None and self.machine.state is State.CREATED:
            self.machine.close()  # never run: the VM is the source's
        elif self.machine is not None and self.postcopy is not None and self._committed:
            self.machine.stop()  # it ran here without all of its pages, which will not come now: it is lost
        close_aborted(streams)
        self.stats.status = MigrationStatus.FAILED
        self.stats.error = str(error)

    def _as_error(self, error: BaseException) -> MigrationError:
        if isinstance(error, MigrationError):
            why = str(error)
        elif isinstance(error, ProtocolError):
            why = f"the migration stream failed: {error}"
        else:
            why = f"{type(error).__name__}: {error}"
        if self.postcopy is not None and self._committed:
            return MigrationError(f"{why}. The VM ran here in post-copy and lacked pages the source holds; it is "
                                  "stopped here (the source keeps its memory as of the switch-over)")
        return MigrationError(f"{why} (nothing was resumed here)")


class _VerifyFailedError(MigrationError):
    """The memory digest did not match."""


class _ResumeRefusedError(MigrationError):
    """KVM refused the vCPU state, or the VM did not start."""
