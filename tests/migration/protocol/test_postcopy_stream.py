"""Post-copy on the sans-io stream: the conversation on the stream, on the post-copy channel and on a resumed
stream; every rule, both ways (we may not send it, we refuse to receive it); malformed payloads; the bytes of a
whole post-copy conversation mutated, and nothing altered ever delivered."""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass

import numpy as np
import pytest

from dirtylog.bitmap import DirtyBitmap
from dirtylog.migration.payload.digest import fingerprints
from dirtylog.migration.payload.pages import make_page_batch
from dirtylog.migration.payload.postcopy import make_postcopy_pages, postcopy_pages
from dirtylog.migration.protocol.auth import frame_keys, frame_mac, root_key
from dirtylog.migration.protocol.codec import (
    FRAME_HEADER,
    HELLO_BODY,
    PAGESET_HEAD,
    POSTCOPY_PAGES_HEAD,
    FrameType,
    RecordType,
    encode_record,
)
from dirtylog.migration.protocol.connection import Connection, DestinationConnection, SourceConnection
from dirtylog.migration.protocol.errors import (
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    TruncatedStreamError,
)
from dirtylog.migration.protocol.events import (
    CLOSED,
    NEED_DATA,
    Abort,
    Channel,
    Commit,
    Complete,
    Event,
    Header,
    Hello,
    Missing,
    PageRequest,
    PostcopyPages,
    PostcopyStart,
    Ready,
    Resumed,
    RoundEnd,
    VcpuState,
    Verified,
)
from dirtylog.migration.protocol.loopback import collect, join
from dirtylog.migration.protocol.rules import KINDS, Phase
from tests.migration.protocol.recorded import KEY, PAGE, SLOTS

DIGEST = bytes(range(16))
END = 72  # SLOTS span gfns 0..72, with a hole at 32..64
HEADER = Header(PAGE, SLOTS, vcpus=1, postcopy=True)
RNG = np.random.default_rng(11)
MEMORY = RNG.integers(1, 256, (END, PAGE), dtype=np.uint8)
MEMORY[[3, 66]] = 0  # two zero pages


def pages(pfns: list[int], requested: bool = False) -> PostcopyPages:
    """The pages ``pfns`` (consecutive) of MEMORY, as the source sends them after the switch."""
    rows = MEMORY[pfns].copy()
    starts, lengths = np.array([pfns[0]], np.uint64), np.array([len(pfns)], np.uint32)
    return make_postcopy_pages(starts, lengths, rows, fingerprints(rows), requested=requested, page_size=PAGE)


def pageset(pfns: list[int], npages: int = END) -> DirtyBitmap:
    return DirtyBitmap.from_pages(np.array(pfns, np.uint64), npages)


def request(*pfns: int) -> PageRequest:
    return PageRequest(np.array(pfns, np.uint64), np.ones(len(pfns), np.uint32))


@dataclass
class Pair:
    src: SourceConnection
    dst: DestinationConnection
    transcript: bytes

    def forge(self, sender: str, event: Event) -> bytes:
        """``event`` framed by ``sender``, without the rules our connections apply before sending."""
        from dirtylog.migration.protocol.rules import BY_EVENT

        kind = BY_EVENT[type(event)]
        assert kind.frame is not None and kind.encode is not None
        head, data = kind.encode(event)
        return self.seal_raw(kind.frame, head + (bytes(data) if data is not None else b""), sender)

    def seal_raw(self, ftype: int, payload: bytes, sender: str = "source") -> bytes:
        conn: Connection = self.src if sender == "source" else self.dst
        key = frame_keys(root_key(KEY), self.transcript)[0 if sender == "source" else 1]
        seq = conn.frames_sent
        head = FRAME_HEADER.pack(ftype, 0, 0, len(payload), seq)
        return head + payload + frame_mac(key, seq, head + payload)


def handshaken(channel: Channel = Channel.STREAM, resume: bool = False) -> Pair:
    src = SourceConnection(KEY, channel=channel, resume=resume)
    dst = DestinationConnection(KEY)
    hello_bytes = join(src.initiate())
    (hello,) = collect(dst, hello_bytes)
    assert isinstance(hello, Hello) and hello.channel is channel and hello.resume is resume
    challenge = join(dst.accept())
    collect(src, challenge)
    return Pair(src, dst, hello_bytes + challenge)


def exchange(pair: Pair, *steps: Event) -> None:
    """Each step sent by whoever sends it, and received as sent."""
    for event in steps:
        sender, receiver = ((pair.dst, pair.src) if isinstance(event, Ready | Verified | Resumed | PageRequest
                                                                           | Missing) else (pair.src, pair.dst))
        got = collect(receiver, sender.send(event))
        assert len(got) == 1 and type(got[0]) is type(event), got


def committed(vcpus: int = 1) -> Pair:
    """A stream whose source sent the post-copy Commit, and no Resumed came yet; pages 5..9 and 66 owed."""
    pair = handshaken()
    exchange(pair, Header(PAGE, SLOTS, vcpus=vcpus, postcopy=True), Ready(),
             make_page_batch(0, np.arange(5), None, MEMORY[:5], page_size=PAGE), RoundEnd(0, 5),
             *[VcpuState(i, b"regs") for i in range(vcpus)],
             PostcopyStart(pageset([5, 6, 7, 8, 9, 66]), DIGEST, (3 + vcpus,)), Verified(DIGEST), Commit())
    return pair


def switched(vcpus: int = 1) -> Pair:
    """A stream past the post-copy commit: the guest runs on the destination, pages 5..9 and 66 owed."""
    pair = committed(vcpus)
    exchange(pair, Resumed())
    return pair


def channel() -> Pair:
    pair = handshaken(Channel.POSTCOPY)
    exchange(pair, HEADER, Ready())
    return pair


def resumed() -> Pair:
    pair = handshaken(resume=True)
    exchange(pair, HEADER, Missing(pageset([7, 8])))
    return pair


# -- the conversations ---------------------------------------------------------------------------------


def test_the_stream_switches_to_postcopy_and_ends_verified() -> None:
    pair = switched()
    assert pair.src.phase is pair.dst.phase is Phase.POSTCOPY
    exchange(pair, pages([5, 6, 7]), pages([8, 9]), pages([66]))
    exchange(pair, Complete(DIGEST, (pair.src.frames_sent,)), Verified(DIGEST))
    assert pair.src.phase is pair.dst.phase is Phase.DONE
    pair.src.receive_data(b"")
    assert pair.src.next_event() is CLOSED


def test_the_channel_carries_requests_and_answers_both_ways_and_a_late_request_crosses_the_end() -> None:
    pair = channel()
    assert pair.dst.channel is Channel.POSTCOPY and not pair.dst.primary
    exchange(pair, request(7), pages([7], requested=True), request(8, 66), pages([8], requested=True),
             pages([66], requested=True))
    exchange(pair, Complete(DIGEST, (pair.src.frames_sent,)))
    assert pair.src.phase is Phase.CHANNEL_END
    exchange(pair, request(9), Verified(DIGEST))  # a request sent before the Complete arrived: still legal
    assert pair.src.phase is pair.dst.phase is Phase.DONE


def test_a_resumed_stream_says_what_is_missing_and_goes_on() -> None:
    pair = resumed()
    assert pair.src.phase is pair.dst.phase is Phase.POSTCOPY and pair.dst.resume
    exchange(pair, pages([7, 8]))
    exchange(pair, Complete(DIGEST, (pair.src.frames_sent,)), Verified(DIGEST))


def test_the_received_pages_are_checked_against_their_fingerprints() -> None:
    event = pages([5, 6, 7])
    received = postcopy_pages(event)
    assert received.pfns.tolist() == [5, 6, 7] and np.array_equal(received.data, MEMORY[5:8])
    zeros = postcopy_pages(pages([2, 3, 4]))
    assert zeros.zero.tolist() == [False, True, False] and zeros.fingerprints[1] == 0
    lying = PostcopyPages(event.starts, event.lengths, None, event.fingerprints[::-1].copy(), event.data)
    with pytest.raises(RemoteProtocolError, match=r"post-copy page 0x5 does not match the fingerprint the source "
                                                  r"sent with it .*refused before the guest can read it"):
        postcopy_pages(lying)


@pytest.mark.parametrize(("build", "reader", "match"), [
    (switched, "destination", r"in phase POSTCOPY .*the destination runs the VM and the source holds pages it "
                              r"lacks; resume the migration"),
    (switched, "source", r"in phase POSTCOPY .*resume the migration to finish it"),
    (committed, "source", r"in phase POSTCOPY_RESUME .*after the post-copy Commit: check the destination; if it "
                          r"runs the VM, .*resume the migration to finish it; if not, the source may be resumed"),
    (channel, "source", r"in phase REQUESTS .*post-copy channel broke: before the switch to post-copy the source "
                        r"still owns the VM; after it, .*resume the migration to finish it"),
])
def test_eof_in_postcopy_says_to_resume(build: object, reader: str, match: str) -> None:
    pair = build()  # type: ignore[operator]
    conn = pair.dst if reader == "destination" else pair.src
    conn.receive_data(b"")
    with pytest.raises(TruncatedStreamError, match=match):
        conn.next_event()


# -- the rules, both ways ------------------------------------------------------------------------------


@dataclass
class Case:
    stage: object  # a function making the pair
    sender: str
    event: Event
    match: str
    on_the_wire: bool = True


def precopy_streaming() -> Pair:
    pair = handshaken()
    exchange(pair, HEADER, Ready())
    return pair


def plain_streaming() -> Pair:
    pair = handshaken()
    exchange(pair, Header(PAGE, SLOTS, vcpus=1), Ready())
    return pair


def with_vcpu() -> Pair:
    pair = precopy_streaming()
    exchange(pair, VcpuState(0, b"r"))
    return pair


def open_round() -> Pair:
    pair = with_vcpu()
    exchange(pair, make_page_batch(0, np.arange(2), None, MEMORY[:2], page_size=PAGE))
    return pair


def channel_header() -> Pair:
    return handshaken(Channel.POSTCOPY)


def resume_header() -> Pair:
    return handshaken(resume=True)


CASES = {
    "PostcopyStart without post-copy in the Header": Case(
        plain_streaming, "source", PostcopyStart(pageset([5]), DIGEST, (2,)),
        r"PostcopyStart in a migration whose Header does not allow post-copy"),
    "PostcopyStart during a round": Case(open_round, "source", PostcopyStart(pageset([5]), DIGEST, (4,)),
                                         r"PostcopyStart while round 0 has no RoundEnd"),
    "PostcopyStart without every vCPU": Case(precopy_streaming, "source", PostcopyStart(pageset([5]), DIGEST, (2,)),
                                             r"PostcopyStart without the state of vCPU 0"),
    "PostcopyStart miscounting frames": Case(with_vcpu, "source", PostcopyStart(pageset([5]), DIGEST, (9,)),
                                             r"PostcopyStart counts 9 frames on stream 0, it carried 2"),
    "pending pages over another span": Case(with_vcpu, "source", PostcopyStart(pageset([5], 80), DIGEST, (3,)),
                                            r"pending pages span 80 pages; the memory layout spans 72"),
    "pending pages in a hole": Case(with_vcpu, "source", PostcopyStart(pageset([40]), DIGEST, (3,)),
                                    r"pending pages include gfn 0x28, outside the memory layout"),
    "pages before the commit": Case(with_vcpu, "source", pages([5]), r"source cannot send PostcopyPages in phase "
                                                                     r"STREAMING"),
    "a request on the stream": Case(switched, "destination", request(5),
                                    r"destination cannot send PageRequest in phase POSTCOPY"),
    "a pushed page on the channel": Case(channel, "source", pages([5]), r"the post-copy channel carries requested "
                                                                        r"pages only"),
    "an answer on the stream": Case(switched, "source", pages([5], requested=True), r"requested pages go on the "
                                                                                    r"post-copy channel"),
    "a request for a hole": Case(channel, "destination", request(40), r"run 0 of the page request, gfns \[0x28, "
                                                                      r"0x29\), is outside the memory layout"),
    "requested runs out of order": Case(
        channel, "destination", PageRequest(np.array([9, 5], np.uint64), np.ones(2, np.uint32)),
        r"run 1 of the page request \(gfn 0x5\) overlaps or precedes run 0"),
    "a fingerprint short": Case(
        switched, "source", PostcopyPages(np.array([5], np.uint64), np.array([2], np.uint32), None,
                                          np.zeros(1, np.uint64), MEMORY[5:7].tobytes()),
        r"1 fingerprints for 2 pages", on_the_wire=False),
    "a zero page with a fingerprint": Case(
        switched, "source", PostcopyPages(np.array([5], np.uint64), np.array([1], np.uint32), np.ones(1, bool),
                                          np.ones(1, np.uint64), b""),
        r"a zero page's fingerprint is 0"),
    "data that does not fit the pages": Case(
        switched, "source", PostcopyPages(np.array([5], np.uint64), np.array([2], np.uint32), None,
                                          np.ones(2, np.uint64), MEMORY[5].tobytes()),
        r"post-copy data is 4096 bytes; 2 non-zero pages of 4096 bytes need 8192"),
    "Missing on a stream that is not resumed": Case(switched, "destination", Missing(pageset([5])),
                                                    r"destination cannot send Missing in phase POSTCOPY"),
    "a channel for a migration without post-copy": Case(
        channel_header, "source", Header(PAGE, SLOTS, vcpus=1),
        r"a post-copy channel, or a resumed stream, belongs to a migration whose Header allows post-copy"),
    "a resumed stream that asks for pages first": Case(resume_header, "source", pages([5]),
                                                        r"source cannot send PostcopyPages in phase RESUME_HEADER"),
    "Verified of another digest at the end": Case(
        switched, "destination", Verified(bytes(16)), r"destination cannot send Verified in phase POSTCOPY"),
}


def staged(case: Case) -> Pair:
    return case.stage()  # type: ignore[operator,no-any-return]


@pytest.mark.parametrize("name", list(CASES))
def test_we_may_not_send_it(name: str) -> None:
    case = CASES[name]
    pair = staged(case)
    sender = pair.src if case.sender == "source" else pair.dst
    with pytest.raises(LocalProtocolError, match=case.match):
        sender.send(case.event)
    assert sender.phase is Phase.ERROR


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.on_the_wire])
def test_we_refuse_to_receive_it(name: str) -> None:
    case = CASES[name]
    pair = staged(case)
    receiver = pair.dst if case.sender == "source" else pair.src
    forged = pair.forge(case.sender, case.event)
    if case.stage in (channel_header, resume_header):  # the source's AUTH goes out with its first frame
        forged = encode_record(RecordType.AUTH, _client_proof(pair)) + forged
    with pytest.raises(RemoteProtocolError, match=case.match):
        collect(receiver, forged)
    assert receiver.phase is Phase.ERROR


def _client_proof(pair: Pair) -> bytes:
    from dirtylog.migration.protocol.auth import client_proof

    return client_proof(root_key(KEY), pair.transcript)


def test_postcopy_takes_one_stream() -> None:
    src = SourceConnection(KEY, stream_index=0, stream_count=2)
    dst = DestinationConnection(KEY)
    collect(dst, src.initiate())
    collect(src, dst.accept())
    with pytest.raises(LocalProtocolError, match="post-copy runs on one stream and its post-copy channel, not 2"):
        src.send(Header(PAGE, SLOTS, vcpus=1, streams=2, postcopy=True))


def test_the_table_names_both_speakers_only_where_requests_and_answers_cross() -> None:
    speakers: dict[Phase, set[str]] = {}
    for kind in KINDS:
        if kind.sender is not None:
            for phase in kind.moves:
                speakers.setdefault(phase, set()).add(kind.sender.value)
    both = {phase for phase, who in speakers.items() if len(who) > 1}
    assert both == {Phase.REQUESTS}


# -- malformed payloads -----------------------------------------------------------------------------------

PAGESET_72 = PAGESET_HEAD.pack(END, 1) + struct.pack("<Q", 1 << 5) + bytes(8)
RAW: dict[str, tuple[object, int, bytes, str, str]] = {
    "a page set with bits past its end": (
        switched, FrameType.MISSING, PAGESET_HEAD.pack(END, 1) + struct.pack("<QQ", 0, 1 << 63), "destination",
        r"page set has bits set past its last page"),
    "a page set that miscounts": (
        resume_header, FrameType.MISSING, PAGESET_HEAD.pack(END, 2) + struct.pack("<QQ", 1 << 5, 0), "destination",
        r"page set says 2 pages but holds 1"),
    "a page set too short": (switched, FrameType.POSTCOPY_START, DIGEST + struct.pack("<H6x", 1) + bytes(8)
                             + PAGESET_HEAD.pack(END, 0), "source", r"page set payload is 16 bytes but its fields"),
    "post-copy pages with unknown flags": (
        switched, FrameType.POSTCOPY_PAGES, POSTCOPY_PAGES_HEAD.pack(0x80, 1, 1, 0), "source",
        r"POSTCOPY_PAGES has unknown flags 0x80"),
    "post-copy pages with dirty padding": (
        switched, FrameType.POSTCOPY_PAGES,
        POSTCOPY_PAGES_HEAD.pack(0, 1, 1, 0) + struct.pack("<QIIB7xQ", 5, 1, 7, 1, 0), "source",
        r"POSTCOPY_PAGES padding bytes are not zero"),
    "a request with padding that is not zero": (
        channel, FrameType.PAGE_REQUEST, struct.pack("<I4xQII", 1, 5, 1, 9), "destination",
        r"PAGE_REQUEST padding bytes are not zero"),
    "a request of too many runs": (channel, FrameType.PAGE_REQUEST, struct.pack("<I4x", (1 << 20) + 1),
                                   "destination", r"PAGE_REQUEST of 1048577 runs is out of bounds"),
}


@pytest.mark.parametrize("name", list(RAW))
def test_malformed_payloads_are_refused(name: str) -> None:
    stage, ftype, payload, sender, match = RAW[name]
    pair = stage()  # type: ignore[operator]
    receiver = pair.dst if sender == "source" else pair.src
    raw = pair.seal_raw(ftype, payload, sender)
    if stage in (channel_header, resume_header) and sender == "source":
        raw = encode_record(RecordType.AUTH, _client_proof(pair)) + raw
    with pytest.raises(RemoteProtocolError, match=match):
        collect(receiver, raw)


def test_a_hello_with_an_unknown_flag_is_refused() -> None:
    src, dst = SourceConnection(KEY), DestinationConnection(KEY)
    record = bytearray(join(src.initiate()))
    record[16 + 1] |= 0x40  # the HELLO body's flags byte
    with pytest.raises(RemoteProtocolError, match="HELLO has unknown flags 0x40"):
        collect(dst, bytes(record))
    assert HELLO_BODY.size == 56


# -- a whole post-copy conversation, mutated --------------------------------------------------------------


def recorded_postcopy() -> tuple[bytes, list[str]]:
    """The source's bytes of a post-copy stream from HELLO to the final Complete, and the events it yields."""
    pair = switched()
    body = [pages([5, 6, 7]), pages([8, 9]), pages([66])]
    src = SourceConnection(KEY, nonce=b"s" * 32, migration_id=b"m" * 16)
    dst = DestinationConnection(KEY, nonce=b"d" * 32)
    out = join(src.initiate())
    collect(dst, out)
    collect(src, dst.accept())
    header = join(src.send(HEADER))
    out += header
    collect(dst, header)
    collect(src, dst.send(Ready()))
    steps: list[Event] = [make_page_batch(0, np.arange(5), None, MEMORY[:5], page_size=PAGE), RoundEnd(0, 5),
                          VcpuState(0, b"regs")]
    for event in steps:
        out += join(src.send(event))
    start = PostcopyStart(pageset([5, 6, 7, 8, 9, 66]), DIGEST, (src.frames_sent,))
    out += join(src.send(start))
    del pair
    return out, [type(e).__name__ for e in [HEADER, *steps, start]] + [type(e).__name__ for e in body]


def test_mutated_postcopy_bytes_are_refused_and_deliver_nothing_altered() -> None:
    clean, _ = recorded_postcopy()
    reference = _replay(clean)
    assert reference[1] is None and len(reference[0]) == 6  # Hello, Header, batch, RoundEnd, VcpuState, Start
    rng = random.Random(17)
    refused = 0
    for _ in range(300):
        data = bytearray(clean)
        at = rng.randrange(16, len(data))
        data[at] ^= 1 << rng.randrange(8)
        events, error = _replay(bytes(data))
        assert events == reference[0][:len(events)], "an altered frame was delivered"
        refused += error is not None
    assert refused >= 290


def _replay(data: bytes) -> tuple[list[str], ProtocolError | None]:
    dst = DestinationConnection(KEY, nonce=b"d" * 32)
    events: list[str] = []
    try:
        dst.receive_data(data)
        while (event := dst.next_event()) is not NEED_DATA:
            assert event is not CLOSED
            if isinstance(event, Hello):
                dst.accept()
            elif isinstance(event, Header):
                dst.send(Ready())
            events.append(_canon(event))
            if isinstance(event, Abort):
                break
    except ProtocolError as error:
        return events, error
    return events, None


def _canon(event: object) -> str:
    if isinstance(event, PostcopyStart):
        return f"PostcopyStart {event.pending.pages().tolist()} {event.digest.hex()} {event.stream_frames}"
    if hasattr(event, "data"):
        return f"{type(event).__name__} {bytes(event.data).hex()[:64]}"
    return repr(event)
