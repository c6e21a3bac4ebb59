"""Nothing lost, nobody let in: recorded streams, tampered with every way we can think of.

A small migration is recorded once per direction, with fixed nonces so a fresh connection reproduces
the same keys and the recording can be replayed into it. Scripted engines answer each event like the
real ones will. The tests (and test_fuzz_stream.py) then flip, cut, repeat, reorder and splice the
bytes and check that each change is refused with a clear error, before anything changed is delivered.
"""

from __future__ import annotations

import functools
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.typing import NDArray

from dirtylog.migration.auth import frame_mac
from dirtylog.migration.connection import Connection, DestinationConnection, SourceConnection
from dirtylog.migration.digest import memory_digest
from dirtylog.migration.errors import (
    AuthenticationError,
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
    ReplayError,
    TruncatedStreamError,
    VersionMismatchError,
)
from dirtylog.migration.events import (
    CLOSED,
    NEED_DATA,
    Abort,
    AbortCode,
    Accepted,
    Codec,
    Commit,
    Complete,
    Event,
    Header,
    Hello,
    MemorySlot,
    PageBatch,
    Ready,
    Resumed,
    RoundEnd,
    VcpuState,
    Verified,
)
from dirtylog.migration.loopback import collect, connect, join
from dirtylog.migration.pages import decode_pages, make_page_batch
from dirtylog.migration.wire import FRAME_HEADER, HELLO_BODY, MAGIC, RECORD_PREFIX, RecordType, encode_record

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
SOURCE_NONCE, DEST_NONCE, MIGRATION_ID = b"s" * 32, b"d" * 32, b"m" * 16
PAGE = 4096
SLOTS = (MemorySlot(0, 0, 16), MemorySlot(1, 16, 16), MemorySlot(2, 64, 8))
PFNS = np.r_[0:32, 64:72].astype(np.uint64)
ROUNDS = [PFNS, PFNS[[1, 2, 3, 20, 33]], PFNS[[2, 39]]]


@functools.cache
def memories() -> list[NDArray[np.uint8]]:
    """Guest RAM (gfn-indexed) at the start of each round: mostly zero, some text-like, one random page."""
    rng = np.random.default_rng(42)
    mem = np.zeros((72, PAGE), np.uint8)
    mem[[1, 5, 6, 17, 65]] = rng.integers(0, 16, (5, PAGE), dtype=np.uint8)
    mem[30] = rng.integers(0, 256, PAGE, dtype=np.uint8)
    snapshots = [mem.copy()]
    for pfns in ROUNDS[1:]:
        mem[pfns[::2]] = rng.integers(0, 8, (len(pfns[::2]), PAGE), dtype=np.uint8)
        mem[pfns[1::2]] = 0
        snapshots.append(mem.copy())
    return snapshots


def digest() -> bytes:
    final = memories()[-1]
    return memory_digest(np.concatenate([final[s.base_gfn : s.base_gfn + s.npages] for s in SLOTS]).ravel())


# -- scripted engines ------------------------------------------------------------------------------


class SourceScript:
    """Answers each event the way a source engine would, with the same bytes every time."""

    def __init__(self, conn: SourceConnection, codec: Codec = "lz4") -> None:
        self.conn, self.codec = conn, codec

    def answer(self, event: Event) -> bytes:
        conn = self.conn
        if isinstance(event, Accepted):
            return join(conn.send(Header(PAGE, SLOTS, vcpus=2, workload={"name": "stamp"}, codec=self.codec)))
        if isinstance(event, Ready):
            out = []
            for rnd, (pfns, mem) in enumerate(zip(ROUNDS, memories(), strict=True)):
                for at in range(0, len(pfns), 16):
                    chunk = pfns[at : at + 16]
                    zero = ~mem[chunk].any(axis=1)
                    batch = make_page_batch(rnd, chunk, zero, mem[chunk][~zero], page_size=PAGE, codec=self.codec)
                    out += conn.send(batch)
                out += conn.send(RoundEnd(rnd, len(pfns), {"round": rnd}))
            out += conn.send(VcpuState(1, b"rip=0x1000"))
            out += conn.send(VcpuState(0, b"rip=0x2000"))
            out += conn.send(Complete(digest(), (conn.frames_sent,)))
            return join(out)
        if isinstance(event, Verified):
            return join(conn.send(Commit()))
        return b""


class DestinationScript:
    """Answers like a destination engine: decodes every batch, verifies the digest it is told."""

    def __init__(self, conn: DestinationConnection) -> None:
        self.conn = conn

    def answer(self, event: Event) -> bytes:
        conn = self.conn
        if isinstance(event, Hello):
            return join(conn.accept())
        if isinstance(event, Header):
            return join(conn.send(Ready()))
        if isinstance(event, PageBatch):
            try:
                decode_pages(event)
            except RemoteProtocolError as exc:  # a corrupt block: apply nothing, tell the source, stop
                conn.send(Abort(str(exc), AbortCode.PROTOCOL))
                raise
            return b""
        if isinstance(event, Complete):
            return join(conn.send(Verified(event.digest)))
        if isinstance(event, Commit):
            return join(conn.send(Resumed()))
        return b""


def source(key: bytes = KEY, nonce: bytes = SOURCE_NONCE) -> SourceConnection:
    return SourceConnection(key, migration_id=MIGRATION_ID, nonce=nonce)


def destination(key: bytes = KEY, nonce: bytes = DEST_NONCE) -> DestinationConnection:
    return DestinationConnection(key, nonce=nonce, page_size=PAGE, layout=SLOTS)


@dataclass(frozen=True)
class Recording:
    s2d: list[bytes]  # the source's bytes, one handshake record or frame per item
    d2s: list[bytes]

    @property
    def to_destination(self) -> bytes:
        return b"".join(self.s2d)

    @property
    def to_source(self) -> bytes:
        return b"".join(self.d2s)


def units(data: bytes) -> list[bytes]:
    """Split a valid stream into its records and frames (an independent reading of the format)."""
    out, at = [], 0
    while at < len(data):
        if data[at : at + len(MAGIC)] == MAGIC:
            size = RECORD_PREFIX.size + RECORD_PREFIX.unpack_from(data, at)[4]
        else:
            size = FRAME_HEADER.size + FRAME_HEADER.unpack_from(data, at)[3] + 16
        out.append(data[at : at + size])
        at += size
    return out


@functools.cache
def recording(codec: Codec = "lz4", source_nonce: bytes = SOURCE_NONCE, dest_nonce: bytes = DEST_NONCE) -> Recording:
    """Run the scripted migration live and keep each direction's bytes."""
    src, dst = source(nonce=source_nonce), destination(nonce=dest_nonce)
    src_script, dst_script = SourceScript(src, codec), DestinationScript(dst)
    to_dst = join(src.initiate())
    s2d, d2s = bytearray(to_dst), bytearray()
    while to_dst:
        to_src = b"".join(dst_script.answer(e) for e in collect(dst, to_dst))
        d2s += to_src
        to_dst = b"".join(src_script.answer(e) for e in collect(src, to_src)) if to_src else b""
        s2d += to_dst
    src.receive_data(b"")
    assert src.next_event() is CLOSED
    return Recording(units(bytes(s2d)), units(bytes(d2s)))


# -- replaying -------------------------------------------------------------------------------------


@dataclass
class Outcome:
    events: list[Any]  # canonical forms, Hello left out (it is not authenticated)
    error: ProtocolError | None


def canon(event: Event) -> Any:
    if isinstance(event, PageBatch):
        return (
            "PageBatch",
            event.round,
            event.starts.tolist(),
            event.lengths.tolist(),
            event.zero.tolist(),
            bytes(event.data),
            event.codec,
        )
    return event


def replay(to: str, pieces: Sequence[bytes], key: bytes = KEY) -> Outcome:
    """Feed ``pieces`` then EOF to a fresh scripted destination (``to="destination"``) or source.

    Checks the invariants of every run: only ProtocolErrors, no endless next_event loop, no NEED_DATA
    after EOF, and nothing but LocalProtocolError once an error was raised.
    """
    conn: Connection
    script: Callable[[Event], bytes]
    if to == "destination":
        dst = destination(key)
        conn, script = dst, DestinationScript(dst).answer
    else:
        src = source(key)
        src.initiate()
        conn, script = src, SourceScript(src).answer
    events: list[Any] = []
    # Every event consumes at least 16 bytes; each piece may end in one NEED_DATA.
    budget = sum(len(p) for p in pieces) // 16 + len(pieces) + 64
    try:
        for piece in [*pieces, b""]:
            conn.receive_data(piece)
            while True:
                budget -= 1
                assert budget > 0, "next_event() keeps returning events without consuming bytes"
                event = conn.next_event()
                if event is NEED_DATA:
                    assert piece, "NEED_DATA after EOF: a peer that hung up would hang us"
                    break
                if event is CLOSED:
                    return Outcome(events, None)
                if not isinstance(event, Hello):
                    events.append(canon(event))
                script(event)
                if isinstance(event, Abort):
                    return Outcome(events, None)
    except ProtocolError as exc:
        for call in (conn.next_event, lambda: conn.receive_data(b"x"), lambda: conn.send(Ready())):
            with pytest.raises(LocalProtocolError):
                call()
        return Outcome(events, exc)
    raise AssertionError("no end of stream")


@functools.cache
def clean(to: str, codec: Codec = "lz4") -> list[Any]:
    """The events of an untouched replay."""
    rec = recording(codec)
    outcome = replay(to, [rec.to_destination if to == "destination" else rec.to_source])
    assert outcome.error is None, outcome.error
    return outcome.events


def assert_refused(to: str, outcome: Outcome) -> ProtocolError:
    """The tampered stream failed, and delivered nothing the clean stream would not have."""
    assert outcome.error is not None, "a tampered stream was accepted"
    assert outcome.events == clean(to)[: len(outcome.events)], "a tampered frame was delivered"
    return outcome.error


def seal_raw(conn: Connection, ftype: int, payload: bytes, *, flags: int = 0, reserved: int = 0) -> bytes:
    """An authentic frame with any payload (what a buggy or hostile peer holding the key could send)."""
    seq = conn._send_seq
    head = FRAME_HEADER.pack(ftype, flags, reserved, len(payload), seq)
    conn._send_seq += 1
    assert conn._send_key is not None
    pending, conn._pending = join(conn._pending), []
    return pending + head + payload + frame_mac(conn._send_key, seq, head + payload)


def streaming_pair(codec: Codec = "lz4", vcpus: int = 1) -> tuple[SourceConnection, DestinationConnection]:
    """A live pair past Header and Ready."""
    src, dst = connect(KEY)
    collect(dst, src.send(Header(PAGE, SLOTS, vcpus=vcpus, codec=codec)))
    collect(src, dst.send(Ready()))
    return src, dst


# -- the tests -------------------------------------------------------------------------------------


DIRECTIONS = ["destination", "source"]


def stream_units(to: str) -> list[bytes]:
    rec = recording()
    return rec.s2d if to == "destination" else rec.d2s


def test_recording_replays_to_the_same_events() -> None:
    rec = recording()
    assert len(rec.s2d) == 15 and len(rec.d2s) == 4  # 2 records, Header, 5 batches, 3 RoundEnds, ...
    assert sum(isinstance(e, tuple) for e in clean("destination")) == 5  # page batches
    assert clean("source") == [Accepted(), Ready(), Verified(digest()), Resumed()]
    pieces = [rec.to_destination[i : i + 7] for i in range(0, len(rec.to_destination), 7)]
    assert replay("destination", pieces).events == clean("destination")


def flip_offsets(size: int) -> list[int]:
    """Every header byte, the MAC, and a spread of payload bytes of a unit."""
    spread = np.linspace(16, max(16, size - 17), num=12, dtype=int).tolist()
    return sorted({*range(min(size, 16)), *spread, *range(max(0, size - 16), size, 3)})


@pytest.mark.parametrize("to", DIRECTIONS)
def test_a_flipped_bit_anywhere_is_refused(to: str) -> None:
    parts = stream_units(to)
    for index, unit in enumerate(parts):
        for offset in flip_offsets(len(unit)):
            bad = bytearray(unit)
            bad[offset] ^= 1 << (offset % 8)
            error = assert_refused(to, replay(to, [*parts[:index], bytes(bad), *parts[index + 1 :]]))
            is_frame = unit[:8] != MAGIC
            if is_frame and offset >= FRAME_HEADER.size:  # payload or MAC: the MAC catches it
                assert isinstance(error, AuthenticationError), (index, offset, error)
                assert "failed authentication: corrupted or tampered" in str(error)


@pytest.mark.parametrize("to", DIRECTIONS)
def test_a_truncated_stream_fails_at_eof_with_a_clear_message(to: str) -> None:
    data = b"".join(stream_units(to))
    boundaries = np.cumsum([len(u) for u in stream_units(to)])[:-1].tolist()
    for cut in sorted({*boundaries, *range(1, 40), *np.linspace(40, len(data) - 1, 40, dtype=int).tolist()}):
        error = assert_refused(to, replay(to, [data[:cut]]))
        assert isinstance(error, TruncatedStreamError), (cut, error)
        assert "closed the connection" in str(error)
        if to == "destination" and cut in boundaries and cut > 200:
            assert "do not resume this copy of the VM" in str(error)
        if cut not in boundaries:
            assert "in the middle of" in str(error)


@pytest.mark.parametrize("to", DIRECTIONS)
@pytest.mark.parametrize("change", ["repeat", "drop", "swap"])
def test_replayed_dropped_or_reordered_frames_are_refused(to: str, change: str) -> None:
    parts = stream_units(to)
    first = 2 if to == "destination" else 1  # the handshake records
    for i in range(first, len(parts) - 1):
        if change == "repeat":
            changed = [*parts[: i + 1], parts[i], *parts[i + 1 :]]
        elif change == "drop":
            changed = parts[:i] + parts[i + 1 :]
        else:
            changed = [*parts[:i], parts[i + 1], parts[i], *parts[i + 2 :]]
        error = assert_refused(to, replay(to, changed))
        assert isinstance(error, ReplayError), (change, i, error)
        assert "a replayed, dropped or reordered frame" in str(error)
        expected = i - first + (change == "repeat")
        assert f"where frame {expected} was expected" in str(error)


def test_a_frame_from_another_session_does_not_verify() -> None:
    other = recording(source_nonce=b"S" * 32, dest_nonce=b"D" * 32)
    mine = recording()
    assert mine.s2d[5] != other.s2d[5] and len(mine.s2d) == len(other.s2d)
    for i in range(2, len(mine.s2d)):
        spliced = [*mine.s2d[:i], other.s2d[i], *mine.s2d[i + 1 :]]
        error = assert_refused("destination", replay("destination", spliced))
        assert isinstance(error, AuthenticationError) and f"frame {i - 2} from the source" in str(error)


@pytest.mark.parametrize("to", DIRECTIONS)
def test_a_peer_without_our_key_is_refused(to: str) -> None:
    error = assert_refused(to, replay(to, [b"".join(stream_units(to))], key=OTHER_KEY))
    assert isinstance(error, AuthenticationError)
    assert "key does not match ours" in str(error) and "--key-file" in str(error) and "dirtylog keygen" in str(error)


def test_wrong_key_live_both_ends_get_a_clear_error() -> None:
    src, dst = SourceConnection(KEY), DestinationConnection(OTHER_KEY)
    collect(dst, src.initiate())
    with pytest.raises(AuthenticationError, match="the destination's key does not match ours") as caught:
        collect(src, dst.accept())
    assert src.phase.value == "ERROR"
    # The source tells the destination why, instead of just hanging up.
    (reply,) = caught.value.reply
    assert reply.startswith(MAGIC)
    with pytest.raises(AuthenticationError, match="refused our key proof, the keys differ") as told:
        collect(dst, reply)
    assert told.value.reply == ()  # nobody left to tell


def test_a_forged_auth_is_refused_and_answered_with_a_reject() -> None:
    dst = destination()
    collect(dst, stream_units("destination")[0])
    dst.accept()
    with pytest.raises(AuthenticationError, match="the source's key does not match ours") as caught:
        collect(dst, encode_record(RecordType.AUTH, bytes(32)) + stream_units("destination")[2])
    (reply,) = caught.value.reply
    code = int.from_bytes(reply[16:18], "little")
    assert reply[10] == RecordType.REJECT and code == AbortCode.AUTHENTICATION


def test_a_version_mismatch_is_told_to_both_sides() -> None:
    hello = stream_units("destination")[0]
    newer = MAGIC + (2).to_bytes(2, "little") + hello[10:]
    dst = destination()
    dst.receive_data(newer[:10])  # the version is known after ten bytes; the rest need not arrive
    with pytest.raises(VersionMismatchError, match="version 2, this dirtylog speaks version 1") as caught:
        dst.next_event()
    assert "install the same dirtylog version on both hosts" in str(caught.value)
    (reply,) = caught.value.reply
    assert reply[:10] == MAGIC + (1).to_bytes(2, "little") and reply[10] == RecordType.REJECT
    # A source of another version sees our version in the reply's prefix and reports it.
    src = source()
    src.initiate()
    reply_v3 = MAGIC + (3).to_bytes(2, "little") + reply[10:]
    with pytest.raises(VersionMismatchError, match="the destination speaks migration stream version 3"):
        collect(src, reply_v3)


def test_a_peer_speaking_something_else_is_refused_at_its_first_byte() -> None:
    dst = destination()
    dst.receive_data(b"G")
    with pytest.raises(RemoteProtocolError, match="not speaking the dirtylog migration stream"):
        dst.next_event()
    src = source()
    src.initiate()
    with pytest.raises(RemoteProtocolError, match="the peer is a source too"):
        collect(src, join(source(nonce=b"x" * 32).initiate()))


@pytest.mark.parametrize("length", [(1 << 32) - 1, (16 << 20) + 1])
def test_a_hostile_length_is_refused_before_buffering(length: int) -> None:
    _, dst = streaming_pair()
    tracemalloc.start()
    try:
        dst.receive_data(FRAME_HEADER.pack(0x12, 0, 0, length, 1) + bytes(1000))
        with pytest.raises(RemoteProtocolError, match="over the 16777216-byte limit"):
            dst.next_event()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 << 10
    record = RECORD_PREFIX.pack(MAGIC, 1, RecordType.HELLO, 0, length)
    fresh = destination()
    fresh.receive_data(record)
    with pytest.raises(RemoteProtocolError, match="handshake record from the source declares"):
        fresh.next_event()


def test_a_corrupt_frame_is_reported_to_the_peer_as_an_authenticated_abort() -> None:
    src, dst = streaming_pair()
    raw = bytearray(join(src.send(RoundEnd(0, 0))))
    raw[20] ^= 0x40
    with pytest.raises(AuthenticationError, match="frame 1 from the source failed authentication") as caught:
        collect(dst, bytes(raw))
    (abort,) = collect(src, caught.value.reply)
    assert isinstance(abort, Abort) and abort.code is AbortCode.AUTHENTICATION
    assert abort.reason.startswith("destination: frame 1 from the source failed authentication")


def test_hello_fields_are_bound_by_the_proofs() -> None:
    """A meddler who rewrites the HELLO (say, its stream index) breaks the handshake."""
    src = source()
    hello = bytearray(join(src.initiate()))
    role, rsvd, index, count, mid, nonce = HELLO_BODY.unpack_from(hello, 16)
    HELLO_BODY.pack_into(hello, 16, role, rsvd, index + 1, count + 1, mid, nonce)
    dst = destination()
    (seen,) = collect(dst, bytes(hello))
    assert isinstance(seen, Hello) and seen.stream_index == 1  # unauthenticated until the proofs
    with pytest.raises(AuthenticationError, match="the destination's key does not match ours"):
        collect(src, dst.accept())


@settings(max_examples=150, deadline=None)
@given(chosen=st.sets(st.sampled_from(PFNS.tolist()), min_size=1), zeros=st.integers(0, 2**40 - 1),
       codec=st.sampled_from(["none", "lz4"]))
def test_any_batch_arrives_as_it_was_sent(chosen: set[int], zeros: int, codec: Codec) -> None:
    """One run or many, with or without zero pages, raw or compressed: the encoder takes shorter paths
    for some of these, and every one must decode to the same runs, zero pages and data."""
    pfns = np.array(sorted(chosen), np.uint64)
    zero = np.array([zeros >> i & 1 for i in range(pfns.size)], bool)
    pages = np.random.default_rng(int(pfns[0])).integers(0, 256, (pfns.size, PAGE), dtype=np.uint8)[~zero]
    src, dst = streaming_pair(codec)
    sent = make_page_batch(3, pfns, zero, pages, page_size=PAGE, codec=codec)
    got = collect(dst, src.send(sent))
    assert len(got) == 1 and isinstance(got[0], PageBatch)
    assert canon(got[0]) == canon(sent)
    got_pfns, got_zero, got_pages = decode_pages(got[0])
    assert got_pfns.tolist() == pfns.tolist() and got_zero.tolist() == zero.tolist()
    assert np.array_equal(got_pages, pages)
