"""A small migration recorded once per direction, and the scripted engines that answer it.

The stream is recorded with fixed nonces, so a fresh connection reproduces the same keys and the
recording can be replayed into it. Scripted engines answer each event like the real ones do. The stream,
rules and fuzz tests flip, cut, repeat, reorder and splice these bytes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from dirtylog.kvm.memslot import SlotLayout
from dirtylog.migration.payload.digest import memory_digest
from dirtylog.migration.payload.pages import decode_pages, make_page_batch
from dirtylog.migration.protocol.acceptance import HeaderAcceptance
from dirtylog.migration.protocol.auth import client_proof, frame_keys, frame_mac, root_key
from dirtylog.migration.protocol.codec import FRAME_HEADER, MAGIC, RECORD_PREFIX, RecordType, encode_record
from dirtylog.migration.protocol.connection import Connection, DestinationConnection, SourceConnection
from dirtylog.migration.protocol.errors import (
    LocalProtocolError,
    ProtocolError,
    RemoteProtocolError,
)
from dirtylog.migration.protocol.events import (
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
    PageBatch,
    Ready,
    Resumed,
    RoundEnd,
    VcpuState,
    Verified,
)
from dirtylog.migration.protocol.loopback import collect, join
from dirtylog.migration.protocol.rules import BY_EVENT

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
SOURCE_NONCE, DEST_NONCE, MIGRATION_ID = b"s" * 32, b"d" * 32, b"m" * 16
PAGE = 4096
SLOTS = (SlotLayout.of_pages(0, 0, 16), SlotLayout.of_pages(1, 16, 16), SlotLayout.of_pages(2, 64, 8))
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
    return DestinationConnection(key, nonce=nonce, acceptance=HeaderAcceptance(page_size=PAGE, plan_slots=planned))


def planned(memory: int, nslots: int) -> tuple[SlotLayout, ...]:
    """The destination lays memory out as the test's SLOTS (whatever the ids)."""
    return tuple(SlotLayout(9 - i, s.guest_phys_addr, s.memory_size) for i, s in enumerate(SLOTS))


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
            None if event.zero is None else event.zero.tolist(),
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


@dataclass
class Pair:
    """A source and a destination past the handshake, and what any holder of the key can derive from the
    handshake bytes: the frame keys and the source's AUTH record. ``seal_raw`` and ``forge`` make frames that
    skip our own rules, as a buggy or hostile peer holding the key could send them."""

    src: SourceConnection
    dst: DestinationConnection
    transcript: bytes  # HELLO ‖ CHALLENGE

    def seal_raw(self, ftype: int, payload: bytes, *, flags: int = 0, reserved: int = 0,
                 sender: str = "source") -> bytes:
        """An authentic next frame of ``sender`` with any payload (after the AUTH record while it is pending)."""
        conn: Connection = self.src if sender == "source" else self.dst
        key = frame_keys(root_key(KEY), self.transcript)[0 if sender == "source" else 1]
        seq = conn.frames_sent
        head = FRAME_HEADER.pack(ftype, flags, reserved, len(payload), seq)
        auth = b""
        if sender == "source" and seq == 0:  # the source's AUTH goes out with its first frame
            auth = encode_record(RecordType.AUTH, client_proof(root_key(KEY), self.transcript))
        return auth + head + payload + frame_mac(key, seq, head + payload)

    def forge(self, sender: str, event: Event) -> bytes:
        """``event`` framed by ``sender`` without the rules our connections apply before sending."""
        kind = BY_EVENT[type(event)]
        assert kind.frame is not None and kind.encode is not None
        head, data = kind.encode(event)
        return self.seal_raw(kind.frame, head + (bytes(data) if data is not None else b""), sender=sender)


def streaming_pair(codec: Codec = "lz4", vcpus: int = 1) -> tuple[SourceConnection, DestinationConnection]:
    """A live pair past Header and Ready."""
    pair = streaming(codec, vcpus)
    return pair.src, pair.dst


def handshaken() -> Pair:
    """A pair past the handshake (the source's AUTH still pending), with what the test needs to forge frames."""
    src, dst = SourceConnection(KEY), DestinationConnection(KEY)
    hello = join(src.initiate())
    collect(dst, hello)
    challenge = join(dst.accept())
    collect(src, challenge)
    return Pair(src, dst, hello + challenge)


def streaming(codec: Codec = "lz4", vcpus: int = 1) -> Pair:
    """A live pair past Header and Ready."""
    pair = handshaken()
    collect(pair.dst, pair.src.send(Header(PAGE, SLOTS, vcpus=vcpus, codec=codec)))
    collect(pair.src, pair.dst.send(Ready()))
    return pair
