"""The rules, both ways: what we may not send (LocalProtocolError) is what we refuse to receive
(RemoteProtocolError), and every refusal says what was wrong."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from dirtylog.kvm.memslot import SlotLayout
from dirtylog.migration.payload.pages import make_page_batch
from dirtylog.migration.protocol.acceptance import HeaderAcceptance
from dirtylog.migration.protocol.codec import (
    BATCH_HEAD,
    MAX_REASON,
    FrameType,
    RecordType,
    encode_record,
    encode_reject,
)
from dirtylog.migration.protocol.connection import DestinationConnection, SourceConnection
from dirtylog.migration.protocol.errors import (
    HeaderMismatchError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    TruncatedStreamError,
    VersionMismatchError,
)
from dirtylog.migration.protocol.events import (
    CLOSED,
    Abort,
    AbortCode,
    Accepted,
    Commit,
    Complete,
    Event,
    Header,
    Hello,
    PageBatch,
    Ready,
    Resumed,
    RoundEnd,
    VcpuState,
    Verified,
)
from dirtylog.migration.protocol.loopback import collect, connect, join
from dirtylog.migration.protocol.rules import KINDS, Phase
from tests.migration.protocol.recorded import KEY, PAGE, SLOTS, Pair, handshaken, streaming, streaming_pair

DIGEST = bytes(range(16))
slot = SlotLayout.of_pages


def batch(pfns: list[int], round: int = 0, zero: list[bool] | None = None, codec: str = "none") -> PageBatch:
    mask = np.array(zero if zero is not None else [False] * len(pfns))
    data = np.full((int((~mask).sum()), PAGE), 7, np.uint8)
    made = make_page_batch(round, np.array(pfns, np.uint64), mask, data, page_size=PAGE)
    return PageBatch(made.round, made.starts, made.lengths, made.zero, made.data, codec, PAGE)  # type: ignore[arg-type]


def runs(starts: list[int], lengths: list[int], data_pages: int | None = None) -> PageBatch:
    """A batch straight from runs, bypassing make_page_batch's checks."""
    npages = sum(lengths)
    data = bytes(PAGE * (npages if data_pages is None else data_pages))
    return PageBatch(0, np.array(starts, np.uint64), np.array(lengths, np.uint32), None, data)


@dataclass
class Case:
    """``prelude`` goes through the normal API; then ``sender`` breaks a rule with ``event``."""

    event: Event
    match: str
    stage: str = "streaming"  # "handshake" (no Header yet), "header" (no Ready yet), "streaming"
    prelude: list[Event] = field(default_factory=list)
    sender: str = "source"
    vcpus: int = 1
    on_the_wire: bool = True  # False: the wire cannot even express it (send side only)


CASES: dict[str, Case] = {
    "batch before the Header": Case(batch([1]), r"source cannot send PageBatch in phase HEADER", "handshake"),
    "batch before Ready": Case(batch([1]), r"source cannot send PageBatch in phase READY", "header"),
    "second Header": Case(Header(PAGE, SLOTS, 1, codec="lz4"), r"cannot send Header in phase STREAMING"),
    "Commit before Verified": Case(Commit(), r"source cannot send Commit in phase STREAMING"),
    "Resumed from the source": Case(Resumed(), r"source cannot send Resumed"),
    "Ready twice": Case(Ready(), r"destination cannot send Ready in phase STREAMING", sender="destination"),
    "a page in a hole": Case(batch([40]), r"run 0 of the batch, gfns \[0x28, 0x29\), is outside the memory layout"),
    "a run into a hole": Case(batch([30, 31, 32, 33]), r"gfns \[0x1e, 0x22\), is outside the memory layout"),
    "a run past the last slot": Case(batch([70, 71, 72]), r"\[0x46, 0x49\), is outside the memory layout"),
    "a page number past any memory": Case(runs([1 << 60], [1]), r"beyond any guest memory"),
    "overlapping runs": Case(runs([0, 2], [4, 4]), r"run 1 of the batch \(gfn 0x2\) overlaps or precedes run 0"),
    "descending runs": Case(runs([10, 0], [1, 1]), r"overlaps or precedes run 0"),
    "an empty run": Case(runs([0, 5], [3, 0]), r"run 1 of the batch is empty"),
    # One-run batches take a shorter path through the checks than batches of several runs: both are held
    # to the same rules.
    "an empty single run": Case(runs([5], [0]), r"run 0 of the batch is empty", on_the_wire=False),
    "a second run in a hole": Case(runs([0, 40], [1, 1]), r"run 1 of the batch, gfns \[0x28, 0x29\), is outside"),
    "a second run past any memory": Case(runs([0, 1 << 60], [1, 1]), r"beyond any guest memory"),
    "data shorter than the pages": Case(runs([0], [2], data_pages=1), r"batch data is 4096 bytes; .* need 8192"),
    "data longer than the pages": Case(runs([0], [1], data_pages=2), r"batch data is 8192 bytes; .* need 4096"),
    "a codec the Header did not name": Case(batch([1, 2], codec="zstd"), r"batch codec 'zstd' is neither 'none'"),
    "a compressed batch of zero pages": Case(
        PageBatch(0, np.array([1], np.uint64), np.array([1], np.uint32), np.ones(1, bool), b"x", "lz4", PAGE),
        r"a compressed batch needs non-zero pages",
    ),
    "a zero mask of the wrong size": Case(
        PageBatch(0, np.array([1], np.uint64), np.array([2], np.uint32), np.zeros(3, bool), bytes(8192)),
        r"zero-page mask has 3 entries for 2 pages",
        on_the_wire=False,
    ),
    "lists instead of arrays": Case(
        PageBatch(0, [1], [1], [False], bytes(PAGE)),  # type: ignore[arg-type]
        r"a batch needs 1-D arrays",
        on_the_wire=False,
    ),
    "page size unlike the Header's": Case(
        PageBatch(0, np.array([1], np.uint64), np.array([1], np.uint32), np.zeros(1, bool), bytes(8192), "none", 8192),
        r"batch page size 8192 differs from the Header's 4096",
        on_the_wire=False,
    ),
    "a round that went back": Case(
        batch([5]), r"batch of round 0 after round 1 ended", prelude=[batch([1], 1), RoundEnd(1, 1)]
    ),
    "a round ended twice": Case(RoundEnd(1, 0), r"RoundEnd of round 1 after round 1 ended", prelude=[RoundEnd(1, 0)]),
    "a new round before RoundEnd": Case(batch([5], 1), r"batch of round 1 while round 0 is open", prelude=[batch([1])]),
    "RoundEnd of another round": Case(
        RoundEnd(2, 1), r"RoundEnd of round 2 while round 0 is open", prelude=[batch([1])]
    ),
    "RoundEnd miscounting pages": Case(
        RoundEnd(0, 5), r"counts 5 pages, the stream carried 4", prelude=[batch([1, 2]), batch([3, 4])]
    ),
    "a vCPU that does not exist": Case(VcpuState(1, b"x"), r"vCPU index 1 is outside \[0, 0\]"),
    "a vCPU state twice": Case(VcpuState(0, b"x"), r"state of vCPU 0 sent twice", prelude=[VcpuState(0, b"y")]),
    "Complete during a round": Case(
        Complete(DIGEST, (3,)), r"Complete while round 0 has no RoundEnd", prelude=[VcpuState(0, b""), batch([1])]
    ),
    "Complete without every vCPU": Case(
        Complete(DIGEST, (2,)), r"Complete without the state of vCPU 0, 2", prelude=[VcpuState(1, b"")], vcpus=3
    ),
    "Complete miscounting frames": Case(
        Complete(DIGEST, (7,)),
        r"counts 7 frames on stream 0, it carried 2: frames were lost",
        prelude=[VcpuState(0, b"")],
    ),
    "Complete counting other streams": Case(
        Complete(DIGEST, (2, 3)), r"Complete must count the frames of all 1 streams", prelude=[VcpuState(0, b"")]
    ),
    "a short digest": Case(
        Complete(b"short", (2,)), r"a memory digest is 16 bytes", prelude=[VcpuState(0, b"")], on_the_wire=False
    ),
    "Verified with another digest": Case(
        Verified(bytes(16)),
        r"Verified digest 0+ is not the one the source sent \(000102",
        prelude=[VcpuState(0, b""), Complete(DIGEST, (2,))],
        sender="destination",
    ),
    "a page size KVM does not have": Case(Header(3000, SLOTS, 1), r"page size 3000 is not one of 4096", "handshake"),
    "no vCPU": Case(Header(PAGE, SLOTS, 0), r"vCPU count 0 is outside \[1, 4096\]", "handshake"),
    "overlapping slots": Case(
        Header(PAGE, (slot(0, 0, 10), slot(1, 5, 10)), 1), r"slots 0 and 1 overlap at gfn 0x5", "handshake"
    ),
    "a slot id twice": Case(
        Header(PAGE, (slot(3, 0, 10), slot(3, 50, 10)), 1), r"slot id 3 appears twice", "handshake"
    ),
    "an empty slot": Case(Header(PAGE, (slot(0, 0, 0),), 1), r"slot 0 page count 0 is outside", "handshake"),
    "no memory at all": Case(Header(PAGE, (), 1), r"a tuple of 1 to 32768 SlotLayouts", "handshake"),
    "more streams than the handshake opened": Case(
        Header(PAGE, SLOTS, 1, streams=2), r"Header says 2 streams but the handshake opened stream 0 of 1", "handshake"
    ),
    "an unknown codec": Case(
        Header(PAGE, SLOTS, 1, codec="gzip"),  # type: ignore[arg-type]
        r"codec 'gzip' is not one of none, lz4, zstd",
        "handshake",
        on_the_wire=False,
    ),
    "a round that is not a number": Case(RoundEnd(1.5, 0), r"round must be an integer, got float", on_the_wire=False),  # type: ignore[arg-type]
    "statistics that are not a dict": Case(
        RoundEnd(0, 0, [1]),  # type: ignore[arg-type]
        r"round statistics must be a dict, got list",
        on_the_wire=False,
    ),
    "a vCPU state that is not bytes": Case(
        VcpuState(0, "rax=1"),  # type: ignore[arg-type]
        r"vCPU state must be bytes, got str",
        on_the_wire=False,
    ),
    "an Abort without an AbortCode": Case(
        Abort("x", 3),  # type: ignore[arg-type]
        r"Abort needs a reason string and an AbortCode",
        on_the_wire=False,
    ),
    "a batch of too many pages in two runs": Case(
        PageBatch(0, np.array([0, 1 << 20], np.uint64), np.array([1, 1 << 20], np.uint32),
                  np.ones((1 << 20) + 1, bool), b""),
        r"a batch of 1048577 pages is over the 1048576-page limit",
        on_the_wire=False,
    ),
    "a batch of too many pages": Case(
        PageBatch(0, np.array([0], np.uint64), np.array([(1 << 20) + 1], np.uint32), np.ones((1 << 20) + 1, bool), b""),
        r"a batch of 1048577 pages is over the 1048576-page limit",
        on_the_wire=False,
    ),
    "a workload that is not a dict": Case(
        Header(PAGE, SLOTS, 1, workload=["random"]),  # type: ignore[arg-type]
        r"workload must be a dict, got list",
        "handshake",
        on_the_wire=False,
    ),
    "a slot that is not a SlotLayout": Case(
        Header(PAGE, ((0, 0, 10),), 1),  # type: ignore[arg-type]
        r"memory layout entries must be SlotLayout, got tuple",
        "handshake",
        on_the_wire=False,
    ),
    "a workload JSON cannot say": Case(
        Header(PAGE, SLOTS, 1, workload={"pages": {1, 2}}), r"cannot encode .* as JSON", "handshake", on_the_wire=False
    ),
}


def staged(case: Case) -> Pair:
    pair = handshaken()
    src, dst = pair.src, pair.dst
    if case.stage != "handshake":
        collect(dst, src.send(Header(PAGE, SLOTS, vcpus=case.vcpus, codec="lz4")))
        if case.stage == "streaming":
            collect(src, dst.send(Ready()))
    for event in case.prelude:
        sender, receiver = (dst, src) if isinstance(event, Verified) else (src, dst)
        assert len(collect(receiver, sender.send(event))) == 1
    return pair


@pytest.mark.parametrize("name", list(CASES))
def test_we_may_not_send_it(name: str) -> None:
    case = CASES[name]
    pair = staged(case)
    sender, receiver = (pair.src, pair.dst) if case.sender == "source" else (pair.dst, pair.src)
    with pytest.raises(LocalProtocolError, match=case.match) as caught:
        sender.send(case.event)
    assert sender.phase is Phase.ERROR
    with pytest.raises(LocalProtocolError, match="cannot be used"):
        sender.send(Abort("again"))
    # The peer hears why, if there is a session to say it in.
    if caught.value.reply:
        (abort,) = collect(receiver, caught.value.reply)
        assert isinstance(abort, Abort) and abort.code is AbortCode.INTERNAL
        assert abort.reason.startswith(f"{case.sender}: ")


@pytest.mark.parametrize("name", [name for name, case in CASES.items() if case.on_the_wire])
def test_we_refuse_to_receive_it(name: str) -> None:
    case = CASES[name]
    pair = staged(case)
    receiver = pair.dst if case.sender == "source" else pair.src
    forged = pair.forge(case.sender, case.event)  # a buggy or hostile peer that holds the key
    with pytest.raises(RemoteProtocolError, match=case.match) as caught:
        collect(receiver, forged)
    assert f"the {case.sender} broke the protocol in frame" in str(caught.value)
    assert receiver.phase is Phase.ERROR
    with pytest.raises(LocalProtocolError):
        receiver.next_event()


RAW: dict[str, tuple[int, bytes, str]] = {
    "an unknown frame type": (0x7F, b"", r"unknown frame type 0x7f"),
    "a payload on Commit": (FrameType.COMMIT, b"x", r"COMMIT payload is 1 bytes but its fields describe 0"),
    "a short RoundEnd": (FrameType.ROUND_END, b"\x01\x00", r"ROUND_END frame of 2 bytes is malformed"),
    "RoundEnd reserved bytes": (FrameType.ROUND_END, struct.pack("<IIQ", 0, 1, 0), r"reserved bytes are not zero"),
    "statistics that are not JSON": (FrameType.ROUND_END, bytes(16) + b"{nope", r"round statistics is not valid JSON"),
    "statistics as a list": (FrameType.ROUND_END, bytes(16) + b"[1]", r"must be a JSON object, got list"),
    "statistics nested to death": (FrameType.ROUND_END, bytes(16) + b"[" * 50_000, r"is not valid JSON"),
    "statistics with NaN": (FrameType.ROUND_END, bytes(16) + b'{"a": NaN}', r"is not valid JSON"),
    "statistics not UTF-8": (FrameType.ROUND_END, bytes(16) + b'{"\xff": 1}', r"is not valid JSON"),
    "a batch with unknown flags": (FrameType.PAGE_BATCH, BATCH_HEAD.pack(0, 0, 1, 0, 1, 1, 0), r"unknown flags 0x1"),
    "a batch larger than its fields": (
        FrameType.PAGE_BATCH,
        BATCH_HEAD.pack(0, 0, 0, 0, 1, 1, 0) + bytes(32),
        r"PAGE_BATCH payload is 64 bytes but its fields describe 56",
    ),
    "a batch with too many pages": (
        FrameType.PAGE_BATCH,
        BATCH_HEAD.pack(0, 0, 0, 0, 1, (1 << 20) + 1, 0),
        r"PAGE_BATCH of 1048577 pages in 1 runs is out of bounds",
    ),
    "a batch whose bitmap marks pages past its end": (
        FrameType.PAGE_BATCH,
        BATCH_HEAD.pack(0, 0, 0, 0, 1, 1, 0) + struct.pack("<QI4xB7x", 1, 1, 0b10),
        r"bitmap has bits set past its last page",
    ),
    "a batch with dirty padding": (
        FrameType.PAGE_BATCH,
        BATCH_HEAD.pack(0, 0, 0, 0, 1, 1, 0) + struct.pack("<QIIB7x", 1, 1, 9, 0),
        r"padding bytes are not zero",
    ),
    "a batch with an unknown codec": (
        FrameType.PAGE_BATCH,
        BATCH_HEAD.pack(0, 9, 0, 0, 1, 1, 0) + struct.pack("<QI4xB7x", 1, 1, 1),
        r"unknown compression codec id 9",
    ),
    "a Header with a million slots": (
        FrameType.HEADER,
        struct.pack("<IIHBBII4x", 4096, 1, 1, 0, 0, 1 << 20, 0) + bytes(24 << 20),
        r"frame 1 from the source declares a 25165848-byte payload",
    ),
    "a Header with too many slots": (
        FrameType.HEADER,
        struct.pack("<IIHBBII4x", 4096, 1, 1, 0, 0, 40_000, 0) + bytes(24 * 40_000),
        r"HEADER lists 40000 memory slots, over the 32768 limit",
    ),
    "a vCPU state with reserved bytes": (FrameType.VCPU_STATE, struct.pack("<II", 0, 5), r"VCPU_STATE reserved"),
    "Complete with the wrong count of counts": (
        FrameType.COMPLETE,
        DIGEST + struct.pack("<H6x", 2) + bytes(8),
        r"COMPLETE payload is 32 bytes but its fields describe 40",
    ),
    "an over-long abort reason": (FrameType.ABORT, bytes(4) + b"x" * (MAX_REASON + 1), r"ABORT reason of 1025 bytes"),
}


@pytest.mark.parametrize("name", list(RAW))
def test_malformed_payloads_are_refused(name: str) -> None:
    ftype, payload, match = RAW[name]
    pair = streaming()
    with pytest.raises(RemoteProtocolError, match=match):
        collect(pair.dst, pair.seal_raw(ftype, payload))


def test_unknown_frame_flags_are_refused_after_the_mac_checks() -> None:
    pair = streaming()
    with pytest.raises(RemoteProtocolError, match=r"frame 1 \(COMMIT\) has unknown flags 0x80"):
        collect(pair.dst, pair.seal_raw(FrameType.COMMIT, b"", flags=0x80))


def test_an_abort_from_a_newer_peer_keeps_its_reason() -> None:
    pair = streaming()
    (abort,) = collect(pair.dst, pair.seal_raw(FrameType.ABORT, struct.pack("<HH", 999, 0) + b"disk full\n\x1b[2J"))
    assert abort == Abort("disk full\\n\\x1b[2J", AbortCode.PROTOCOL)  # control characters escaped


def test_a_long_abort_reason_is_cut_not_refused() -> None:
    src, dst = streaming_pair()
    (abort,) = collect(dst, src.send(Abort("é" * 5000)))
    assert isinstance(abort, Abort) and abort.reason.startswith("éé") and len(abort.reason.encode()) <= MAX_REASON


# -- the handshake and the ends of a stream ---------------------------------------------------------


def test_the_destination_may_refuse_a_hello() -> None:
    src, dst = SourceConnection(KEY), DestinationConnection(KEY)
    (hello,) = collect(dst, src.initiate())
    assert isinstance(hello, Hello)
    refusal = dst.send(Abort("no migration with this id is expected here"))
    with pytest.raises(
        RemoteProtocolError, match=r"the destination refused the migration stream \(CANCELLED\): no mig"
    ):
        collect(src, refusal)


def test_the_source_may_give_up_during_the_handshake() -> None:
    src, dst = SourceConnection(KEY), DestinationConnection(KEY)
    collect(dst, src.initiate())
    give_up = src.send(Abort("operator cancelled", AbortCode.CANCELLED))
    dst.accept()
    with pytest.raises(RemoteProtocolError, match=r"the source refused the migration stream .*operator cancelled"):
        collect(dst, give_up)


def test_a_batch_must_fit_one_frame() -> None:
    src, dst = connect(KEY)
    collect(dst, src.send(Header(PAGE, (slot(0, 0, 8192),), vcpus=1)))
    collect(src, dst.send(Ready()))
    pages = np.ones((4096, PAGE), np.uint8)  # 16 MiB of pages, plus the batch's own fields
    with pytest.raises(LocalProtocolError, match=r"PAGE_BATCH of 16777776 bytes does not fit a frame \(16777216"):
        src.send(make_page_batch(0, np.arange(4096), np.zeros(4096, bool), pages, page_size=PAGE))


def test_handshake_records_out_of_place_are_refused() -> None:
    src, dst = SourceConnection(KEY), DestinationConnection(KEY)
    hello = join(src.initiate())
    collect(dst, hello)
    dst.accept()
    with pytest.raises(RemoteProtocolError, match=r"unexpected HELLO record: source cannot send HELLO in phase AUTH"):
        collect(dst, hello)
    src, dst = SourceConnection(KEY), DestinationConnection(KEY)
    src.initiate()
    with pytest.raises(RemoteProtocolError, match="REJECT record of 1 bytes is too short"):
        collect(src, encode_record(RecordType.REJECT, b"x"))


def test_a_reject_for_our_version_is_a_version_mismatch() -> None:
    src = SourceConnection(KEY)
    src.initiate()
    with pytest.raises(VersionMismatchError, match="does not speak our stream version: too old"):
        collect(src, encode_reject(AbortCode.VERSION, "too old"))


def test_the_handshake_calls_come_in_order() -> None:
    src, dst = SourceConnection(KEY), DestinationConnection(KEY)
    with pytest.raises(LocalProtocolError, match=r"call initiate\(\) before"):
        src.next_event()
    src = SourceConnection(KEY)
    with pytest.raises(LocalProtocolError, match=r"accept\(\) answers a Hello"):
        dst.accept()
    dst = DestinationConnection(KEY)
    collect(dst, src.initiate())
    with pytest.raises(LocalProtocolError, match="answer the Hello first"):
        dst.next_event()
    src, dst = connect(KEY)
    with pytest.raises(LocalProtocolError, match=r"initiate\(\) opens the stream and is called once"):
        src.initiate()
    for event in (Hello(b"x" * 16, 0, 1), Accepted()):
        src2, _ = connect(KEY)
        with pytest.raises(LocalProtocolError, match="is received, never sent"):
            src2.send(event)


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: SourceConnection(b"short"), r"the key is 5 bytes; a key must be at least 16 random bytes"),
        (lambda: SourceConnection(KEY, nonce=b"n"), r"a nonce is 32 bytes"),
        (lambda: SourceConnection(KEY, migration_id=b"m"), r"a migration id is 16 bytes"),
        (lambda: SourceConnection(KEY, stream_index=2, stream_count=2), r"stream 2 of 2"),
    ],
)
def test_bad_construction_is_refused(build: Callable[[], object], match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        build()


def test_a_header_this_destination_was_not_set_up_for_is_refused_and_told() -> None:
    src = SourceConnection(KEY)
    dst = DestinationConnection(KEY, acceptance=HeaderAcceptance(page_size=PAGE, memory_bytes=512 << 20))
    connect(KEY, src, dst)
    with pytest.raises(HeaderMismatchError, match="give both sides the same memory size") as caught:
        collect(dst, src.send(Header(PAGE, SLOTS, vcpus=1)))
    assert "the source's guest has 0.2 MiB (40 pages in 3 slots) of memory" in str(caught.value)
    assert "this destination accepts 512.0 MiB" in str(caught.value)
    (abort,) = collect(src, caught.value.reply)
    assert isinstance(abort, Abort) and abort.code is AbortCode.MISMATCH
    assert "give both sides the same memory size" in abort.reason  # the source hears the same words
    src, dst = connect(KEY, SourceConnection(KEY), DestinationConnection(KEY, acceptance=HeaderAcceptance(1 << 16)))
    with pytest.raises(HeaderMismatchError, match="the source uses 4096-byte pages, this destination 65536-byte"):
        collect(dst, src.send(Header(PAGE, SLOTS, vcpus=1)))


@pytest.mark.parametrize(("acceptance", "match"), [
    (HeaderAcceptance(max_vcpus=2), r"the source's guest has 3 vCPUs, this destination runs at most 2"),
    (HeaderAcceptance(plan_slots=lambda memory, n: (SlotLayout(0, 0, memory),)),
     r"laid out as \[0x0, 0x10000\), \[0x10000, 0x20000\), \[0x40000, 0x48000\); this destination lays that size "
     r"out as \[0x0, 0x28000\)"),
])
def test_vcpus_and_slot_layout_are_accepted_once_and_a_mismatch_is_told(acceptance: HeaderAcceptance,
                                                                        match: str) -> None:
    src, dst = connect(KEY, SourceConnection(KEY), DestinationConnection(KEY, acceptance=acceptance))
    with pytest.raises(HeaderMismatchError, match=match) as caught:
        collect(dst, src.send(Header(PAGE, SLOTS, vcpus=3)))
    (abort,) = collect(src, caught.value.reply)
    assert abort.code is AbortCode.MISMATCH


def test_same_geometry_with_other_slot_ids_is_accepted() -> None:
    def planned(memory: int, nslots: int) -> tuple[SlotLayout, ...]:
        return tuple(SlotLayout(9, s.guest_phys_addr, s.memory_size) for s in reversed(SLOTS))

    acceptance = HeaderAcceptance(page_size=PAGE, plan_slots=planned)
    src, dst = connect(KEY, SourceConnection(KEY), DestinationConnection(KEY, acceptance=acceptance))
    assert len(collect(dst, src.send(Header(PAGE, SLOTS, vcpus=1)))) == 1


def finish(src: SourceConnection, dst: DestinationConnection, upto: type[Event]) -> None:
    """Drive a streaming pair through the end of the stream, stopping after ``upto``."""
    steps: list[tuple[SourceConnection | DestinationConnection, Event]] = [
        (src, RoundEnd(0, 0)),
        (src, VcpuState(0, b"")),
        (src, Complete(DIGEST, (3,))),
        (dst, Verified(DIGEST)),
        (src, Commit()),
        (dst, Resumed()),
    ]
    for sender, event in steps:
        receiver = dst if sender is src else src
        assert collect(receiver, sender.send(event)) == [event]
        if isinstance(event, upto):
            return


@pytest.mark.parametrize(
    ("upto", "reader", "match"),
    [
        (RoundEnd, "destination", r"closed the connection in phase STREAMING .*do not resume this copy of the VM"),
        (Verified, "destination", r"in phase COMMIT after 4 frames; the migration is incomplete"),
        (RoundEnd, "source", r"the migration did not finish: the source still owns the VM"),
        (Commit, "source", r"after Commit: the destination may be running the VM, check it before resuming"),
    ],
)
def test_eof_before_the_end_says_who_owns_the_vm(upto: type[Event], reader: str, match: str) -> None:
    src, dst = streaming_pair()
    finish(src, dst, upto)
    conn = dst if reader == "destination" else src
    conn.receive_data(b"")
    with pytest.raises(TruncatedStreamError, match=match) as caught:
        conn.next_event()
    assert caught.value.reply == ()  # the peer hung up: nobody to tell


def test_eof_at_the_end_is_clean_and_the_stream_is_over() -> None:
    src, dst = streaming_pair()
    finish(src, dst, Resumed)
    dst.receive_data(b"")
    assert dst.next_event() is CLOSED and dst.next_event() is CLOSED
    with pytest.raises(LocalProtocolError, match="after EOF"):
        dst.receive_data(b"more")
    with pytest.raises(LocalProtocolError, match="source cannot send Abort in phase DONE"):
        src.send(Abort("too late"))


def test_eof_before_anything_is_a_truncated_stream() -> None:
    dst = DestinationConnection(KEY)
    dst.receive_data(b"")
    with pytest.raises(TruncatedStreamError, match="closed the connection in phase HELLO after 0 frames"):
        dst.next_event()


def test_the_rules_table_names_one_speaker_per_phase() -> None:
    speakers: dict[Phase, set[str]] = {}
    for kind in KINDS:
        if kind.sender is not None:  # Abort and REJECT: either side, racing the peer
            for phase in kind.moves:
                speakers.setdefault(phase, set()).add(kind.sender.value)
    # Post-copy's channel is the one place where requests and answers cross (test_postcopy_stream.py).
    assert all(len(who) == 1 for phase, who in speakers.items() if phase is not Phase.REQUESTS), speakers
    assert set(speakers) == set(Phase) - {Phase.DONE, Phase.ERROR}


def test_every_frame_kind_has_its_bytes_and_a_check_where_it_carries_fields() -> None:
    for kind in KINDS:
        if kind.frame is None:
            continue
        assert kind.event is not None and kind.encode is not None and kind.decode is not None, kind.name
        assert kind.event.__name__ == kind.name
        carries_fields = bool(getattr(kind.event, "__slots__", ()))
        assert (kind.check is not None) == carries_fields, kind.name
    assert {kind.frame for kind in KINDS if kind.frame is not None} == set(FrameType)


def test_errors_are_dirtylog_errors_with_a_reply_slot() -> None:
    from dirtylog.errors import DirtylogError

    assert issubclass(ProtocolError, DirtylogError)
    assert ProtocolError("x").reply == ()
