"""Encrypted sessions: the source asks in its HELLO, every frame is AES-256-GCM, and the rest holds as before."""

from __future__ import annotations

import numpy as np
import pytest

from dirtylog.kvm.memslot import SlotLayout
from dirtylog.migration.payload.pages import batch_pages, make_page_batch
from dirtylog.migration.protocol.connection import DestinationConnection, SourceConnection
from dirtylog.migration.protocol.errors import AuthenticationError, RemoteProtocolError
from dirtylog.migration.protocol.events import Hello, PageBatch, Ready, RoundEnd, VcpuState
from dirtylog.migration.protocol.loopback import collect, join

KEY = bytes(range(32))
MARKER = b"dirtylog secret guest page marker"
SLOTS = (SlotLayout.of_pages(0, 0, 64),)


def pair(encrypt: bool) -> tuple[SourceConnection, DestinationConnection, Hello]:
    src, dst = SourceConnection(KEY, encrypt=encrypt), DestinationConnection(KEY)
    (hello,) = collect(dst, src.initiate())
    assert isinstance(hello, Hello)
    collect(src, dst.accept())
    from dirtylog.migration.protocol.events import Header

    collect(dst, src.send(Header(4096, SLOTS, vcpus=1)))
    collect(src, dst.send(Ready()))
    return src, dst, hello


def secret_pages() -> np.ndarray:
    pages = np.zeros((4, 4096), dtype=np.uint8)
    for row in pages:
        row[100:100 + len(MARKER)] = np.frombuffer(MARKER, dtype=np.uint8)
    return pages


@pytest.mark.parametrize("encrypt", [True, False])
def test_the_source_chooses_and_the_destination_follows(encrypt: bool) -> None:
    src, dst, hello = pair(encrypt)
    assert hello.encrypted is encrypt and dst.encrypted is encrypt
    pages = secret_pages()
    wire = join(src.send(make_page_batch(0, np.arange(8, 12, dtype=np.uint64), None, pages.copy(), page_size=4096)))
    assert (MARKER in wire) is not encrypt  # guest memory crosses in clear only when the source said so
    (batch,) = collect(dst, wire)
    assert isinstance(batch, PageBatch) and batch.run == (8, 4)
    assert np.array_equal(batch_pages(batch), pages)  # decrypted, byte for byte


def test_the_callers_page_buffer_holds_ciphertext_afterwards_and_bytes_are_copied() -> None:
    src, dst, _ = pair(True)
    pages = secret_pages()
    buffer = pages.copy()
    wire = join(src.send(make_page_batch(0, np.arange(8, 12, dtype=np.uint64), None, buffer, page_size=4096)))
    assert not np.array_equal(buffer, pages)  # encrypted in place: the gather buffer is not read again
    state = b"registers " + MARKER
    wire += join(src.send(VcpuState(0, state)))
    assert state == b"registers " + MARKER and MARKER not in wire  # immutable bytes: a copy was encrypted
    events = collect(dst, wire)
    assert [type(e) for e in events] == [PageBatch, VcpuState] and events[1].state == state


def test_a_flipped_bit_in_an_encrypted_frame_is_refused() -> None:
    src, dst, _ = pair(True)
    wire = bytearray(join(src.send(RoundEnd(0, 0, {"final": False}))))
    wire[20] ^= 0x01  # inside the encrypted payload
    with pytest.raises(AuthenticationError, match="failed authentication"):
        collect(dst, bytes(wire))


def test_unknown_hello_flags_are_refused() -> None:
    src, dst = SourceConnection(KEY), DestinationConnection(KEY)
    hello = bytearray(join(src.initiate()))
    hello[16 + 1] = 0x80  # the HELLO body's flags byte
    with pytest.raises(RemoteProtocolError, match="unknown flags 0x80"):
        collect(dst, bytes(hello))
