"""Receiving into the connection's own frame buffer gives exactly the events receive_data() gives."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from dirtylog.migration.connection import DestinationConnection
from dirtylog.migration.events import NEED_DATA, Header, MemorySlot, PageBatch, Ready, RoundEnd
from dirtylog.migration.loopback import collect, connect, join
from dirtylog.migration.pages import decode_pages, make_page_batch

KEY = b"k" * 32


def session_bytes() -> tuple[bytes, DestinationConnection]:
    source, destination = connect(KEY)
    stream = join(source.send(Header(4096, (MemorySlot(0, 0, 1024),), 1)))
    collect(destination, stream)
    collect(source, destination.send(Ready()))
    pages = np.arange(8 * 4096, dtype=np.uint64).astype(np.uint8).reshape(8, 4096)
    pfns = np.arange(100, 108, dtype=np.uint64)
    body = b"".join(join(source.send(make_page_batch(r, pfns, np.zeros(8, bool), pages, page_size=4096)))
                    + join(source.send(RoundEnd(r, 8))) for r in range(3))
    return body, destination


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=1, max_size=50))
def test_in_place_receive_yields_the_same_batches(chunks: list[int]) -> None:
    data, destination = session_bytes()
    position, events = 0, []
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
    batches = [e for e in events if isinstance(e, PageBatch)]
    assert [b.round for b in batches] == [0, 1, 2]
    for batch in batches:
        pfns, zero, pages = decode_pages(batch)
        assert pfns.tolist() == list(range(100, 108)) and not zero.any()
        assert pages[3, 5] == (3 * 4096 + 5) % 256


def test_no_receive_buffer_between_frames() -> None:
    _, destination = session_bytes()
    assert destination.receive_buffer() is None
