"""Whole migrations through the sans-io stream: source → bytes → destination, in any chunking."""

from __future__ import annotations

import random
from collections.abc import Callable

import numpy as np
import pytest
from numpy.typing import NDArray

from dirtylog.kvm.memslot import SlotLayout
from dirtylog.migration.payload.digest import memory_digest
from dirtylog.migration.payload.pages import decode_pages, make_page_batch
from dirtylog.migration.protocol.acceptance import HeaderAcceptance
from dirtylog.migration.protocol.connection import Buffers, Connection, DestinationConnection, SourceConnection
from dirtylog.migration.protocol.errors import LocalProtocolError
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
from dirtylog.migration.protocol.loopback import collect, connect, join
from dirtylog.migration.protocol.rules import Phase

KEY = bytes(range(32))
PAGE = 4096
# Slots 0 and 1 touch (runs may cross between them); a hole separates slot 2.
SLOTS = (SlotLayout.of_pages(0, 0, 48), SlotLayout.of_pages(1, 48, 48), SlotLayout.of_pages(7, 160, 32))
COVERED = np.concatenate([np.arange(s.base_gfn, s.base_gfn + s.npages) for s in SLOTS]).astype(np.uint64)


def guest_memory(seed: int, nonzero: float = 2 / 3) -> NDArray[np.uint8]:
    """Guest RAM indexed by gfn: zero pages, random pages and low-entropy pages (half and half)."""
    rng = np.random.default_rng(seed)
    mem = np.zeros((192, PAGE), np.uint8)
    kind = np.where(rng.random(192) < nonzero, rng.integers(1, 3, 192), 0)
    mem[kind == 1] = rng.integers(0, 256, (int((kind == 1).sum()), PAGE), dtype=np.uint8)
    low = rng.integers(0, 1000, (int((kind == 2).sum()), PAGE // 4), dtype=np.int32)
    mem[kind == 2] = low.view(np.uint8).reshape(-1, PAGE)
    return mem


def slots_digest(mem: NDArray[np.uint8]) -> bytes:
    """The memory digest of the slots' pages, in layout order."""
    return memory_digest(np.concatenate([mem[s.base_gfn : s.base_gfn + s.npages] for s in SLOTS]).ravel())


def dirty(mem: NDArray[np.uint8], rng: np.random.Generator, n: int) -> NDArray[np.uint64]:
    """Write ``n`` random covered pages (some to zero) and return them sorted, as a round would."""
    pfns = np.sort(rng.choice(COVERED, n, replace=False))
    mem[pfns] = rng.integers(0, 256, (n, PAGE), dtype=np.uint8)
    mem[pfns[::4]] = 0
    return pfns


Deliver = Callable[[Connection, Buffers], list[Event]]


def whole(conn: Connection, buffers: Buffers) -> list[Event]:
    return collect(conn, buffers)


def random_chunks(seed: int, largest: int) -> Deliver:
    rng = random.Random(seed)

    def deliver(conn: Connection, buffers: Buffers) -> list[Event]:
        raw, events, at = join(buffers), [], 0
        while at < len(raw):
            step = rng.randint(1, largest)
            events += collect(conn, raw[at : at + step])
            at += step
        return events

    deliver.__name__ = f"chunks_up_to_{largest}"
    return deliver


def one_byte(conn: Connection, buffers: Buffers) -> list[Event]:
    return collect(conn, buffers, chunk=1)


def migrate(
    deliver: Deliver, codec: Codec, dirty_counts: list[int], *, nonzero: float = 2 / 3, seed: int = 1
) -> tuple[NDArray[np.uint8], NDArray[np.uint8], list[Event]]:
    """A full pre-copy migration; returns (source memory, destination memory, destination's events).

    Round 0 sends every page; then one round per ``dirty_counts`` entry, the last one being the
    stop-and-copy round, followed by the vCPU states, Complete and the commit.
    """
    rng = np.random.default_rng(seed)
    src_mem, dst_mem = guest_memory(seed, nonzero), np.full((192, PAGE), 0xAA, np.uint8)
    src, dst = SourceConnection(KEY), DestinationConnection(KEY, acceptance=HeaderAcceptance(page_size=PAGE))
    seen: list[Event] = []

    (hello,) = deliver(dst, src.initiate())
    assert isinstance(hello, Hello) and hello.stream_count == 1 and hello.migration_id == src.migration_id
    assert deliver(src, dst.accept()) == [Accepted()]
    header = Header(PAGE, SLOTS, vcpus=3, workload={"name": "random", "pages": 192}, codec=codec)
    assert deliver(dst, src.send(header)) == [header]
    assert deliver(src, dst.send(Ready())) == [Ready()]

    rounds = [COVERED] + [dirty(src_mem, rng, n) for n in dirty_counts]
    for rnd, pfns in enumerate(rounds):
        out: Buffers = []
        for at in range(0, len(pfns), 40):
            chunk = pfns[at : at + 40]
            pages = src_mem[chunk]
            zero = ~pages.any(axis=1)
            out += src.send(make_page_batch(rnd, chunk, zero, pages[~zero], page_size=PAGE, codec=codec))
        out += src.send(RoundEnd(rnd, len(pfns), {"dirty": len(pfns)}))
        for event in deliver(dst, out):
            seen.append(event)
            if isinstance(event, PageBatch):
                got_pfns, got_zero, data = decode_pages(event)
                dst_mem[got_pfns[got_zero]] = 0
                dst_mem[got_pfns[~got_zero]] = data

    states = [VcpuState(i, bytes([i]) * (100 + i)) for i in range(3)]
    out = [b for state in states for b in src.send(state)]
    complete = Complete(slots_digest(src_mem), (src.frames_sent,))
    out += src.send(complete)
    events = deliver(dst, out)
    seen += events
    assert events == [*states, complete]
    assert slots_digest(dst_mem) == complete.digest  # what a destination engine checks
    assert deliver(src, dst.send(Verified(complete.digest))) == [Verified(complete.digest)]
    assert deliver(dst, src.send(Commit())) == [Commit()]
    assert deliver(src, dst.send(Resumed())) == [Resumed()]
    assert src.phase is dst.phase is Phase.DONE
    for conn in (src, dst):
        conn.receive_data(b"")
        assert conn.next_event() is CLOSED
        assert conn.next_event() is CLOSED
    assert src.frames_sent == dst.frames_received and dst.frames_sent == src.frames_received == 3
    assert src.bytes_sent == dst.bytes_received and dst.bytes_sent == src.bytes_received
    return src_mem, dst_mem, seen


@pytest.mark.parametrize("codec", ["none", "lz4", "zstd"])
@pytest.mark.parametrize("deliver", [whole, random_chunks(7, 3000), random_chunks(8, 70_000)], ids=lambda f: f.__name__)
def test_full_migration_copies_memory_exactly(deliver: Deliver, codec: Codec) -> None:
    src_mem, dst_mem, events = migrate(deliver, codec, [60, 30, 12])
    assert np.array_equal(src_mem[COVERED], dst_mem[COVERED])
    assert (dst_mem[96:160] == 0xAA).all()  # the hole between slots is never written
    ends = [e for e in events if isinstance(e, RoundEnd)]
    assert [(e.round, e.pages) for e in ends] == [(0, 128), (1, 60), (2, 30), (3, 12)]
    batches = [e for e in events if isinstance(e, PageBatch)]
    assert {b.codec for b in batches} == {"none", codec}  # random pages always go raw
    assert sum(b.nzero for b in batches) > 20


@pytest.mark.parametrize("codec", ["none", "lz4", "zstd"])
def test_one_byte_at_a_time(codec: Codec) -> None:
    src_mem, dst_mem, _ = migrate(one_byte, codec, [2], nonzero=0.1, seed=3)
    assert np.array_equal(src_mem[COVERED], dst_mem[COVERED])


def test_runs_cross_touching_slots_and_batches_carry_zero_pages() -> None:
    src, dst = connect(KEY)
    header = Header(PAGE, SLOTS, vcpus=1)
    collect(dst, src.send(header))
    collect(src, dst.send(Ready()))
    pfns = np.arange(40, 60, dtype=np.uint64)  # crosses gfn 48, from slot 0 into slot 1
    zero = np.zeros(20, bool)
    zero[[0, 5, 19]] = True
    data = np.arange(17 * PAGE, dtype=np.uint32).astype(np.uint8)
    (batch,) = collect(dst, src.send(make_page_batch(0, pfns, zero, data, page_size=PAGE)))
    assert isinstance(batch, PageBatch)
    assert batch.starts.tolist() == [40] and batch.lengths.tolist() == [20] and batch.nzero == 3
    got_pfns, got_zero, pages = decode_pages(batch)
    assert got_pfns.tolist() == list(range(40, 60)) and np.array_equal(got_zero, zero)
    assert pages.shape == (17, PAGE) and pages.tobytes() == data.tobytes()


def test_send_hands_back_the_callers_page_buffer_uncopied() -> None:
    src, dst = connect(KEY)
    collect(dst, src.send(Header(PAGE, SLOTS, vcpus=1)))
    collect(src, dst.send(Ready()))
    data = np.random.default_rng(0).integers(0, 256, 4 * PAGE, dtype=np.uint8)
    batch = make_page_batch(0, np.arange(4), np.zeros(4, bool), data, page_size=PAGE)
    buffers = src.send(batch)
    assert len(buffers) == 3  # header+metadata, the pages, the MAC
    assert isinstance(buffers[1], memoryview) and np.shares_memory(np.frombuffer(buffers[1], np.uint8), data)
    (received,) = collect(dst, buffers)
    assert isinstance(received, PageBatch)
    _, _, pages = decode_pages(received)
    # The receiver's pages are a view of the frame it buffered, not a further copy.
    assert np.shares_memory(pages, np.frombuffer(received.data, np.uint8))
    assert not pages.flags.writeable and pages.tobytes() == data.tobytes()


def every_event() -> list[Event]:
    return [
        Header(PAGE, SLOTS, vcpus=2, workload={"name": "hotset", "hot": [0.1, 0.9], "ü": None}, codec="zstd"),
        Ready(),
        RoundEnd(0, 0, {"rate": 1.5, "note": "idle round"}),
        VcpuState(1, bytes(range(256)) * 1000),
        VcpuState(0, b""),
        RoundEnd(4, 0),
        Complete(bytes(range(16)), (8,)),
        Verified(bytes(range(16))),
        Commit(),
        Resumed(),
    ]


def test_every_event_survives_the_wire_unchanged() -> None:
    src, dst = connect(KEY)
    for event in every_event():
        sender, receiver = (dst, src) if isinstance(event, Ready | Verified | Resumed) else (src, dst)
        if isinstance(event, Complete):
            event = Complete(event.digest, (src.frames_sent,))
        assert collect(receiver, sender.send(event)) == [event]
    assert src.phase is Phase.DONE


@pytest.mark.parametrize("by_source", [True, False])
def test_abort_reaches_the_peer_and_closes_both_ends(by_source: bool) -> None:
    src, dst = connect(KEY)
    collect(dst, src.send(Header(PAGE, SLOTS, vcpus=1)))
    sender, receiver = (src, dst) if by_source else (dst, src)
    abort = Abort("operator pressed ^C", AbortCode.CANCELLED)
    buffers = sender.send(abort)
    assert collect(receiver, buffers) == [abort]
    for conn in (src, dst):
        assert conn.phase is Phase.ERROR
        with pytest.raises(LocalProtocolError, match="operator pressed"):
            conn.next_event()
        with pytest.raises(LocalProtocolError, match="cannot be used"):
            conn.send(Ready())


def test_parallel_streams_each_count_their_frames_and_commit_on_the_primary() -> None:
    migration = b"M" * 16
    streams = [
        connect(KEY, SourceConnection(KEY, migration_id=migration, stream_index=i, stream_count=3)) for i in range(3)
    ]
    header = Header(PAGE, SLOTS, vcpus=2, codec="lz4", streams=3)
    mem = guest_memory(5)
    for i, (src, dst) in enumerate(streams):
        assert dst.migration_id == migration and dst.stream_index == i and dst.primary == (i == 0)
        collect(dst, src.send(header))
        collect(src, dst.send(Ready()))
    # Round 0: each stream carries every third page; stream 2 skips round 1 entirely.
    for rnd, pfns in enumerate([COVERED, COVERED[:30]]):
        for i, (src, dst) in enumerate(streams):
            mine = pfns[i::3]
            if rnd == 1 and i == 2:
                continue
            pages = mem[mine]
            zero = ~pages.any(axis=1)
            out = src.send(make_page_batch(rnd, mine, zero, pages[~zero], page_size=PAGE, codec="lz4"))
            out += src.send(RoundEnd(rnd, len(mine)))
            assert len(collect(dst, out)) == 2
    primary_src, primary_dst = streams[0]
    with pytest.raises(LocalProtocolError, match="secondary stream 1"):
        streams[1][0].send(VcpuState(0, b"x"))
    streams.pop(1)  # that stream is now unusable; the rest carry on
    for i in range(2):
        collect(primary_dst, primary_src.send(VcpuState(i, b"regs")))
    counts = (primary_src.frames_sent, 3, streams[1][0].frames_sent)
    complete = Complete(slots_digest(mem), counts)
    for src, dst in streams:
        assert collect(dst, src.send(complete)) == [complete]
    assert streams[1][0].phase is streams[1][1].phase is Phase.DONE  # secondary: ends at Complete
    assert primary_dst.phase is Phase.VERIFY
    collect(primary_src, primary_dst.send(Verified(complete.digest)))
    collect(primary_dst, primary_src.send(Commit()))
    collect(primary_src, primary_dst.send(Resumed()))
    assert primary_src.phase is Phase.DONE


def test_next_event_needs_data_until_a_whole_frame_arrived() -> None:
    src, dst = connect(KEY)
    raw = join(src.send(Header(PAGE, SLOTS, vcpus=1)))
    dst.receive_data(raw[:-1])
    assert dst.next_event() is NEED_DATA
    dst.receive_data(raw[-1:])
    assert isinstance(dst.next_event(), Header)
    assert dst.next_event() is NEED_DATA


def test_received_data_may_be_reused_by_the_caller() -> None:
    src, dst = connect(KEY)
    raw = bytearray(join(src.send(Header(PAGE, SLOTS, vcpus=1))))
    dst.receive_data(raw)
    raw[:] = bytes(len(raw))  # the transport recycles its receive buffer
    assert isinstance(dst.next_event(), Header)
