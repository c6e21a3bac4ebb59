"""The snapshot file format as values and bytes: head, metadata, identity, and the refusals of files that are
not whole snapshots of this version. Pure: no KVM."""

from __future__ import annotations

import numpy as np
import pytest

from dirtylog.kvm.memslot import SlotLayout
from dirtylog.migration.protocol import codec
from dirtylog.migration.protocol.events import Header
from dirtylog.snapshot.errors import SnapshotFormatError
from dirtylog.snapshot.format import (
    HEAD_SIZE,
    IDENTITY_SIZE,
    MAGIC,
    Head,
    Kind,
    Metadata,
    chunk_count,
    metadata_checksum,
    state_identity,
)

NPAGES = 8192
HEADER = Header(4096, (SlotLayout(0, 0, 4096 * 4096), SlotLayout(1, 4096 * 4096, 4096 * 4096)), 2,
                {"name": "random", "rate": None})
STATES = (b"\x01" * 100, b"\x02" * 100)
DIGEST = bytes(range(16))


def metadata(**changes: object) -> Metadata:
    values: dict[str, object] = {"header": HEADER, "vcpu_states": STATES, "digest": DIGEST,
                                 "chunk_checks": np.arange(chunk_count(NPAGES), dtype=np.uint64),
                                 "held_hash": bytes(16), "info": {"created": 1.5, "parent": None}}
    values.update(changes)
    return Metadata(**values)  # type: ignore[arg-type]


def head_of(meta: Metadata, kind: Kind = Kind.FULL, held: int = NPAGES, parent: bytes = bytes(32)) -> Head:
    encoded = meta.encode()
    index_offset, index_length, meta_offset = Head.plan(kind, NPAGES, held)
    return Head(kind, NPAGES, held, index_offset, index_length, meta_offset, len(encoded), meta.identity, parent,
                metadata_checksum(encoded))


def test_metadata_round_trips_through_the_stream_codec() -> None:
    meta = metadata()
    back = Metadata.decode(meta.encode(), "x", NPAGES)
    assert back.header == HEADER and back.vcpu_states == STATES and back.digest == DIGEST
    assert (back.chunk_checks == meta.chunk_checks).all() and back.info == meta.info
    assert back.identity == meta.identity


def test_metadata_frames_are_the_migration_streams_frames() -> None:
    encoded = metadata().encode()
    ftype, flags, reserved, length, seq = codec.FRAME_HEADER.unpack_from(encoded)
    assert (ftype, flags, reserved, seq) == (codec.FrameType.HEADER, 0, 0, 0)
    assert codec.decode_header(memoryview(encoded)[16:16 + length], 4096) == HEADER


def test_the_identity_is_the_state_and_nothing_else() -> None:
    base = metadata().identity
    assert len(base) == IDENTITY_SIZE
    assert metadata(info={"created": 99.0}).identity == base  # when it was taken does not matter
    assert metadata(chunk_checks=np.zeros(2, np.uint64)).identity == base  # nor how the layer stores it
    assert metadata(digest=bytes(16)).identity != base
    assert metadata(vcpu_states=(b"\x01" * 100, b"\x03" * 100)).identity != base
    assert state_identity(HEADER, STATES, DIGEST) == base


def test_the_head_round_trips_and_fills_one_page() -> None:
    meta = metadata()
    head = head_of(meta)
    data = head.pack()
    assert len(data) == HEAD_SIZE and data.startswith(MAGIC)
    assert Head.unpack(data, "x", head.file_length) == head


@pytest.mark.parametrize(("data", "says"), [
    (b"", "is empty"),
    (b"hello world, a text file\n" * 300, "not a dirtylog snapshot"),
    (b"DIRTYLOG-FILE\x01" + bytes(5000), "migration stream file"),
    (MAGIC[:7], "cut short"),
    (MAGIC + bytes(100), "cut short"),
])
def test_foreign_and_short_files_are_refused_saying_what_they_are(data: bytes, says: str) -> None:
    with pytest.raises(SnapshotFormatError, match=says):
        Head.unpack(data, "f", len(data))


def test_a_corrupt_head_is_refused() -> None:
    head = head_of(metadata())
    for offset in (17, 40, 100, 200, 3000):
        data = bytearray(head.pack())
        data[offset] ^= 0x10
        with pytest.raises(SnapshotFormatError):
            Head.unpack(bytes(data), "f", head.file_length)


def test_another_version_is_named() -> None:
    data = bytearray(head_of(metadata()).pack())
    data[16] = 9
    with pytest.raises(SnapshotFormatError, match="version 9 snapshot"):
        Head.unpack(bytes(data), "f", 10**9)


def test_a_truncated_or_extended_file_is_refused_by_its_length() -> None:
    head = head_of(metadata())
    with pytest.raises(SnapshotFormatError, match="truncated"):
        Head.unpack(head.pack(), "f", head.file_length - 1)
    with pytest.raises(SnapshotFormatError, match="after its end"):
        Head.unpack(head.pack(), "f", head.file_length + 4096)


def test_inconsistent_heads_are_refused() -> None:
    meta = metadata()
    good = head_of(meta)
    bad = [
        Head(Kind.FULL, NPAGES, NPAGES - 1, *Head.plan(Kind.FULL, NPAGES, NPAGES - 1), 100, meta.identity,
             bytes(32), bytes(32)),  # a full snapshot holds every page
        Head(Kind.INCREMENTAL, NPAGES, 10, *Head.plan(Kind.INCREMENTAL, NPAGES, 10), 100, meta.identity,
             bytes(32), bytes(32)),  # an incremental one has a parent
        Head(Kind.FULL, NPAGES, NPAGES, good.index_offset + 4096, good.index_length, good.meta_offset, 100,
             meta.identity, bytes(32), bytes(32)),  # offsets that do not follow from the counts
    ]
    for head in bad:
        with pytest.raises(SnapshotFormatError, match="inconsistent"):
            Head.unpack(head.pack(), "f", head.file_length)


def test_corrupt_metadata_is_refused_not_misread() -> None:
    encoded = metadata().encode()
    for cut in (5, 16, len(encoded) // 2, len(encoded) - 1):
        with pytest.raises(SnapshotFormatError):
            Metadata.decode(encoded[:cut], "f", NPAGES)
    with pytest.raises(SnapshotFormatError, match="Header describes"):
        Metadata.decode(encoded, "f", NPAGES * 2)  # a layer of another size
    flipped = bytearray(encoded)
    flipped[3] = 1  # reserved bits of the first frame
    with pytest.raises(SnapshotFormatError):
        Metadata.decode(bytes(flipped), "f", NPAGES)
    # Frames out of their order: the Header twice.
    frames = encoded + encoded[:16 + codec.FRAME_HEADER.unpack_from(encoded)[3]]
    with pytest.raises(SnapshotFormatError):
        Metadata.decode(frames, "f", NPAGES)
