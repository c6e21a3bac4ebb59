"""Receiving into the connection's own frame buffer, or page data straight where a RunPlacer puts it, gives
exactly the events receive_data() gives."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dirtylog.kvm.memslot import SlotLayout
from dirtylog.migration.payload.pages import decode_pages, make_page_batch
from dirtylog.migration.protocol.connection import DestinationConnection
from dirtylog.migration.protocol.errors import AuthenticationError, ProtocolError, TruncatedStreamError
from dirtylog.migration.protocol.events import CLOSED, NEED_DATA, Header, PageBatch, Ready, RoundEnd
from dirtylog.migration.protocol.loopback import collect, connect, join

KEY = b"k" * 32


def session_bytes() -> tuple[bytes, DestinationConnection]:
    source, destination = connect(KEY)
    stream = join(source.send(Header(4096, (SlotLayout.of_pages(0, 0, 1024),), 1)))
    collect(destination, stream)
    collect(source, destination.send(Ready()))
    pages = np.arange(8 * 4096, dtype=np.uint64).astype(np.uint8).reshape(8, 4096)
    pfns = np.arange(100, 108, dtype=np.uint64)
    body = b"".join(join(source.send(make_page_batch(r, pfns, np.zeros(8, bool), pages, page_size=4096)))
                    + join(source.send(RoundEnd(r, 8))) for r in range(3))
    return body, destination


def receive_in_chunks(data: bytes, destination: DestinationConnection, chunks: list[int],
                      events: list[object] | None = None) -> list[object]:
    """Feed ``data`` in chunks of the given sizes (cycled), into receive buffers where offered; the events,
    appended to ``events`` as they come (kept if an error cuts the feeding short)."""
    position, events = 0, [] if events is None else events
    sizes = itertools.cycle(chunks)
    while position < len(data):
        size = next(sizes)
        target = destination.receive_buffer()
        if target is not None:
            count = min(size, len(target), len(data) - position)
            target[:count] = data[position:position + count]
            destination.received(count)
        else:
            count = min(size, len(data) - position)
            destination.receive_data(data[position:position + count])
        position += count
        while (event := destination.next_event()) is not NEED_DATA:
            events.append(event)
    return events


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=50))
def test_in_place_receive_yields_the_same_batches(chunks: list[int]) -> None:
    data, destination = session_bytes()
    batches = [e for e in receive_in_chunks(data, destination, chunks) if isinstance(e, PageBatch)]
    assert [b.round for b in batches] == [0, 1, 2]
    for batch in batches:
        pfns, zero, pages = decode_pages(batch)
        assert pfns.tolist() == list(range(100, 108)) and not zero.any()
        assert pages[3, 5] == (3 * 4096 + 5) % 256


def test_no_receive_buffer_between_frames() -> None:
    _, destination = session_bytes()
    assert destination.receive_buffer() is None


# -- placing page data where it belongs ---------------------------------------------------------------------

PLACED_PAGES = 32  # 128 KiB batches: over framing.PLACE_MIN


class IntoArray:
    """A RunPlacer that puts the data of one-run batches into ``memory`` at their pages, as the destination
    does with guest memory."""

    def __init__(self, npages: int) -> None:
        self.memory = np.zeros((npages, 4096), dtype=np.uint8)
        self.placed = 0

    def place_run(self, round: int, first: int, npages: int) -> memoryview | None:
        if not 0 <= first < first + npages <= self.memory.shape[0]:  # a mutated head: as the destination does
            return None
        self.placed += 1
        return self.memory[first:first + npages].data.cast("B")


def placed_session(zero_page: bool = False) -> tuple[bytes, DestinationConnection, IntoArray, np.ndarray]:
    source, destination = connect(KEY)
    collect(destination, join(source.send(Header(4096, (SlotLayout.of_pages(0, 0, 1024),), 1))))
    placer = IntoArray(1024)
    destination.place_runs_with(placer)
    collect(source, destination.send(Ready()))
    pages = np.random.default_rng(7).integers(1, 256, (3, PLACED_PAGES, 4096), dtype=np.uint8)
    zero = np.zeros(PLACED_PAGES, dtype=bool)
    if zero_page:
        zero[5] = True
    body = b""
    for r in range(3):
        pfns = np.arange(100 + 40 * r, 100 + 40 * r + PLACED_PAGES, dtype=np.uint64)
        batch = make_page_batch(r, pfns, zero, pages[r][~zero], page_size=4096)
        body += join(source.send(batch)) + join(source.send(RoundEnd(r, PLACED_PAGES)))
    return body, destination, placer, pages


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 70_000), min_size=1, max_size=20))
def test_placed_data_lands_at_its_pages(chunks: list[int]) -> None:
    data, destination, placer, pages = placed_session()
    batches = [e for e in receive_in_chunks(data, destination, chunks) if isinstance(e, PageBatch)]
    assert placer.placed == 3 and [b.round for b in batches] == [0, 1, 2]
    for r, batch in enumerate(batches):
        pfns, zero, got = decode_pages(batch)
        first = 100 + 40 * r
        assert pfns.tolist() == list(range(first, first + PLACED_PAGES)) and not zero.any()
        assert np.array_equal(placer.memory[first:first + PLACED_PAGES], pages[r])
        assert got.ctypes.data == placer.memory[first].ctypes.data  # the batch is a view of where it landed


def test_batches_with_zero_pages_are_received_whole() -> None:
    data, destination, placer, pages = placed_session(zero_page=True)
    batches = [e for e in receive_in_chunks(data, destination, [65536]) if isinstance(e, PageBatch)]
    assert placer.placed == 0 and len(batches) == 3
    assert not placer.memory.any()
    _, zero, got = decode_pages(batches[1])
    assert zero[5] and np.array_equal(got, pages[1][~zero])


def test_placed_data_that_was_tampered_with_fails_its_mac() -> None:
    data, destination, _, _ = placed_session()
    tampered = bytearray(data)
    tampered[len(data) // 6] ^= 1  # inside the first batch's page data
    with pytest.raises(AuthenticationError, match="failed authentication"):
        receive_in_chunks(bytes(tampered), destination, [4096])


def test_a_stream_cut_inside_placed_data_is_reported_truncated() -> None:
    data, destination, _, _ = placed_session()
    receive_in_chunks(data[: len(data) // 6], destination, [1000])
    destination.receive_data(b"")
    with pytest.raises(TruncatedStreamError, match=r"frame \d+ \(PAGE_BATCH\) \(\d+ of 131\d{3} bytes\)"):
        destination.next_event()


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(0, 400_000), st.integers(1, 255)), min_size=1, max_size=4),
       st.integers(0, 400_000), st.sampled_from([4096, 65536, 1 << 20]))
def test_mutated_placed_streams_fail_cleanly(flips: list[tuple[int, int]], cut: int, chunk: int) -> None:
    """Flipped bytes (in heads, data or MACs) and a cut anywhere: every batch delivered is an authentic one,
    and anything else is a ProtocolError, whatever the placer was told on the way."""
    data, destination, _, pages = placed_session()
    mutated = bytearray(data[: max(1, cut)])
    for position, bits in flips:
        if position < len(mutated):
            mutated[position] ^= bits
    events: list[object] = []
    try:
        receive_in_chunks(bytes(mutated), destination, [chunk], events)
        destination.receive_data(b"")
        while (event := destination.next_event()) not in (NEED_DATA, CLOSED):
            events.append(event)
    except ProtocolError:
        pass
    for batch in (e for e in events if isinstance(e, PageBatch)):
        pfns, _, got = decode_pages(batch)
        r = batch.round
        assert pfns[0] == 100 + 40 * r and np.array_equal(got, pages[r])
