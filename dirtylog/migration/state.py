"""The rules of the migration stream: which message may come next, and the bookkeeping behind them.

Theory of operation
===================

A migration stream is one connection between a *source* (which owns a running VM and sends its memory)
and a *destination* (which builds a copy and takes the VM over at the end). Both ends run the same
state machine over the same sequence of messages, so each can tell, at every point, whose turn it is
and what may be said. The machine is pure: it sees messages as values; the connection feeds it the
events we send (a violation is our bug: LocalProtocolError) and the events we receive (a violation is
the peer's: RemoteProtocolError).

The conversation is lock-step: in every phase exactly one side may speak (except Abort, see below)::

    phase       who speaks    what                                   next phase
    ---------   -----------   ------------------------------------   --------------------------------
    HELLO       source        HELLO record (initiate())              CHALLENGE
    CHALLENGE   destination   CHALLENGE record (accept())            AUTH
    AUTH        source        AUTH record (sent with its Header)     HEADER
    HEADER      source        Header                                 READY
    READY       destination   Ready                                  STREAMING
    STREAMING   source        PageBatch | VcpuState | RoundEnd       STREAMING
                source        Complete                               VERIFY (DONE on a secondary stream)
    VERIFY      destination   Verified                               COMMIT
    COMMIT      source        Commit                                 RESUME
    RESUME      destination   Resumed                                DONE
    any live    either        Abort frame (REJECT record in the      ERROR
                              handshake)
    DONE        nobody; the peer's EOF is the clean end (next_event() → CLOSED)
    ERROR       nobody; every further call raises

Why these rules:

* **Handshake first, nothing unauthenticated after it.** Before AUTH only records fly, and the only
  trusted thing in them is what the proofs cover; after it every frame is MACed and sequenced.
* **Ready before pages.** The destination may refuse the Header (memory size, page size): Abort
  instead of Ready. One round trip is cheap next to pouring a guest's memory into a refusal.
* **Rounds.** A batch belongs to the open round; a round opens with its first batch and closes with
  RoundEnd, whose page count must equal what this stream carried in it. Round numbers only grow
  (a stream may skip rounds in which it had nothing to send). Complete needs the last round closed.
* **vCPU state** goes on the primary stream (index 0) only, exactly once per vCPU, and Complete on the
  primary requires every vCPU's: a destination never holds a VM without all its registers.
* **Complete counts frames.** ``stream_frames[i]`` must equal the frames this stream carried, so a
  secondary stream that lost its tail is detected; the engine compares the other streams' counts.
* **Two-phase commit, so the VM never runs twice.** The destination answers Complete with Verified
  only when its memory digest matches; the source answers Verified with Commit, after which it must
  never resume its copy; only then does the destination resume (and say Resumed). If the connection
  dies before Commit the destination discards its copy and the source stays the owner; if it dies
  after Commit the source must not resume on its own (the destination may be running). A secondary
  stream ends at Complete: the commit runs on the primary.
* **Abort** is legal from either side in every live phase, even when it is not that side's turn
  (it races with the peer's frames); afterwards the connection is in ERROR and refuses further use.
"""

from __future__ import annotations

import enum
from typing import Final

from dirtylog.migration.errors import LocalProtocolError
from dirtylog.migration.events import (
    Abort,
    Complete,
    Event,
    Header,
    PageBatch,
    Role,
    RoundEnd,
    VcpuState,
    Verified,
)
from dirtylog.migration.validate import (
    LayoutIndex,
    check_abort,
    check_batch,
    check_complete,
    check_header,
    check_round_end,
    check_vcpu_state,
    check_verified,
)


class Phase(enum.Enum):
    """Where the conversation is; names say what comes next."""

    HELLO = "HELLO"
    CHALLENGE = "CHALLENGE"
    AUTH = "AUTH"
    HEADER = "HEADER"
    READY = "READY"
    STREAMING = "STREAMING"
    VERIFY = "VERIFY"
    COMMIT = "COMMIT"
    RESUME = "RESUME"
    DONE = "DONE"
    ERROR = "ERROR"


SOURCE, DESTINATION = Role.SOURCE, Role.DESTINATION

#: (phase, sender, message) → next phase. Messages are handshake record names or event class names.
RULES: Final[dict[tuple[Phase, Role, str], Phase]] = {
    (Phase.HELLO, SOURCE, "HELLO"): Phase.CHALLENGE,
    (Phase.CHALLENGE, DESTINATION, "CHALLENGE"): Phase.AUTH,
    (Phase.AUTH, SOURCE, "AUTH"): Phase.HEADER,
    (Phase.HEADER, SOURCE, "Header"): Phase.READY,
    (Phase.READY, DESTINATION, "Ready"): Phase.STREAMING,
    (Phase.STREAMING, SOURCE, "PageBatch"): Phase.STREAMING,
    (Phase.STREAMING, SOURCE, "VcpuState"): Phase.STREAMING,
    (Phase.STREAMING, SOURCE, "RoundEnd"): Phase.STREAMING,
    (Phase.STREAMING, SOURCE, "Complete"): Phase.VERIFY,
    (Phase.VERIFY, DESTINATION, "Verified"): Phase.COMMIT,
    (Phase.COMMIT, SOURCE, "Commit"): Phase.RESUME,
    (Phase.RESUME, DESTINATION, "Resumed"): Phase.DONE,
}

HANDSHAKE: Final = frozenset({Phase.HELLO, Phase.CHALLENGE, Phase.AUTH})
#: Phases in which an authenticated Abort frame may be sent or received.
ABORTABLE: Final = frozenset({Phase.HEADER, Phase.READY, Phase.STREAMING, Phase.VERIFY, Phase.COMMIT, Phase.RESUME})
#: Phases in which an (unauthenticated) REJECT record may arrive: the handshake, and, at the source,
#: the round trip after its pipelined AUTH + Header, where the destination may refuse the AUTH.
REJECTABLE: Final = HANDSHAKE | {Phase.HEADER, Phase.READY}


class StreamState:
    """Phase and per-stream bookkeeping of one connection; ``process`` enforces the rules above."""

    def __init__(self) -> None:
        self.phase = Phase.HELLO
        self.stream_index = 0
        self.stream_count = 1
        self.header: Header | None = None
        self.layout: LayoutIndex | None = None
        #: Frames the source sent after the handshake, before its Complete.
        self.source_frames = 0
        self.open_round: int | None = None
        self.next_round = 0
        self.round_pages = 0
        self.vcpus_seen: set[int] = set()
        self.digest: bytes | None = None

    @property
    def primary(self) -> bool:
        return self.stream_index == 0

    def next_phase(self, sender: Role, message: str) -> Phase:
        """The phase after ``message`` from ``sender``, or LocalProtocolError if it is illegal now."""
        if message in ("Abort", "REJECT"):
            if self.phase not in (ABORTABLE if message == "Abort" else REJECTABLE):
                raise LocalProtocolError(f"{sender.value} cannot send {message} in phase {self.phase.value}")
            return Phase.ERROR
        nxt = RULES.get((self.phase, sender, message))
        if nxt is None:
            raise LocalProtocolError(
                f"{sender.value} cannot send {message} in phase {self.phase.value} ({self.expected()})"
            )
        if nxt is Phase.VERIFY and not self.primary:
            return Phase.DONE  # the commit runs on the primary stream only
        return nxt

    def advance(self, sender: Role, message: str) -> None:
        """Move to the next phase for ``message`` from ``sender``, or LocalProtocolError if illegal."""
        self.phase = self.next_phase(sender, message)

    def expected(self) -> str:
        """What may come next, for messages."""
        options = [f"{role.value} {msg}" for (phase, role, msg) in RULES if phase is self.phase]
        return "expected " + " or ".join(options) if options else "the stream is over"

    def process(self, sender: Role, event: Event) -> None:
        """Apply the rules to an event ``sender`` sends; LocalProtocolError if it breaks one."""
        name = type(event).__name__
        if isinstance(event, Abort):
            check_abort(event)
            self.advance(sender, name)
            return
        header = self.header
        if isinstance(event, Header):
            self.layout = check_header(event)
            if event.streams != self.stream_count:
                raise LocalProtocolError(
                    f"Header says {event.streams} streams but the handshake opened stream "
                    f"{self.stream_index} of {self.stream_count}"
                )
            header = event
        elif isinstance(event, PageBatch | VcpuState | RoundEnd | Complete) and self.phase is Phase.STREAMING:
            assert header is not None and self.layout is not None  # set with the Header before STREAMING
            self._check_stream(event, header, self.layout)
        elif isinstance(event, Verified) and self.phase is Phase.VERIFY:
            check_verified(event)
            if event.digest != self.digest:
                raise LocalProtocolError(
                    f"Verified digest {event.digest.hex()} is not the one the source sent "
                    f"({self.digest.hex() if self.digest else 'none'})"
                )
        self.advance(sender, name)
        self.header = header
        if sender is SOURCE and not isinstance(event, Complete):
            self.source_frames += 1

    def _check_stream(
        self, event: PageBatch | VcpuState | RoundEnd | Complete, header: Header, layout: LayoutIndex
    ) -> None:
        if isinstance(event, PageBatch):
            npages = check_batch(event, header, layout)
            if self.open_round is None:
                if event.round < self.next_round:
                    raise LocalProtocolError(f"batch of round {event.round} after round {self.next_round - 1} ended")
                self.open_round = event.round
            elif event.round != self.open_round:
                raise LocalProtocolError(
                    f"batch of round {event.round} while round {self.open_round} is open: end it with RoundEnd first"
                )
            self.round_pages += npages
        elif isinstance(event, VcpuState):
            check_vcpu_state(event, header)
            if not self.primary:
                raise LocalProtocolError(f"vCPU state on secondary stream {self.stream_index}: send it on stream 0")
            if event.index in self.vcpus_seen:
                raise LocalProtocolError(f"state of vCPU {event.index} sent twice")
            self.vcpus_seen.add(event.index)
        elif isinstance(event, RoundEnd):
            check_round_end(event)
            if self.open_round is not None and event.round != self.open_round:
                raise LocalProtocolError(f"RoundEnd of round {event.round} while round {self.open_round} is open")
            if self.open_round is None and event.round < self.next_round:
                raise LocalProtocolError(f"RoundEnd of round {event.round} after round {self.next_round - 1} ended")
            if event.pages != self.round_pages:
                raise LocalProtocolError(
                    f"RoundEnd of round {event.round} counts {event.pages} pages, the stream carried {self.round_pages}"
                )
            self.open_round, self.next_round, self.round_pages = None, event.round + 1, 0
        else:
            check_complete(event, header.streams)
            if self.open_round is not None:
                raise LocalProtocolError(f"Complete while round {self.open_round} has no RoundEnd")
            if self.primary and len(self.vcpus_seen) != header.vcpus:
                missing = sorted(set(range(header.vcpus)) - self.vcpus_seen)
                raise LocalProtocolError(
                    f"Complete without the state of vCPU {', '.join(map(str, missing[:8]))}"
                    f"{' ...' if len(missing) > 8 else ''}"
                )
            if event.stream_frames[self.stream_index] != self.source_frames:
                raise LocalProtocolError(
                    f"Complete counts {event.stream_frames[self.stream_index]} frames on stream {self.stream_index}, "
                    f"it carried {self.source_frames}: frames were lost"
                )
            self.digest = event.digest
