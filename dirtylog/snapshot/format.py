"""The snapshot file, as values and bytes: its head, its page index layout, its metadata, its identity. Pure.

A snapshot file is one *layer*: a full snapshot (every page) or an incremental one (the pages written since
its parent). docs/snapshots.md is the prose version of this module::

    offset                         what
    0                              head, one page (below); written last, so an unfinished file has none
    4096                           data: the layer's pages in guest-frame order, one page each, page-aligned,
                                   so that page k of the layer is at 4096 + k * 4096; zero pages are holes
    index_offset                   index: zero bitmap (a bit per guest page) · held bitmap (incremental only:
                                   which guest pages the layer holds) · one fingerprint per held page
    meta_offset                    metadata: frames of the migration stream, without MACs (below)
    file_length                    end

The **head** holds the geometry, the offsets, the layer's *identity* and its parent's, and two BLAKE3
checksums: of the metadata, and of the head itself. The **metadata** reuses the migration stream's frames and
their codec, so a snapshot describes a VM in exactly the bytes a migration does: ``Header`` (page size, memory
slots, vCPUs, workload), one ``VcpuState`` per vCPU, a ``SnapshotIndex`` (the check of every 4096-page chunk
of the index, the hash of the held bitmap), a ``SnapshotInfo`` (JSON: when, how, progress) and last a
``Complete`` carrying the memory digest (the migration's: xxh3-128 of every page's fingerprint) and the count
of frames before it. Frames use the stream's 16-byte frame header; the sequence number is the frame's index.

The **identity** of a layer is what it restores to: a BLAKE3 hash of its Header, vCPU states and memory
digest. A child records its parent's identity, so any file that restores to the same state — the parent
itself, or a chain merged into one file — serves as the parent, and any other is refused.

What is checked when (docs/snapshots.md has the whole story): the head, the metadata and the held bitmaps are
checked when a layer is opened, before anything runs; each index chunk when one of its pages is first needed;
each page's fingerprint before the guest may see the page; the merged fingerprints against the digest when
all memory is in.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import xxhash
from blake3 import blake3

from dirtylog.errors import DirtylogError
from dirtylog.migration.protocol import codec, rules
from dirtylog.migration.protocol.errors import ProtocolError
from dirtylog.migration.protocol.events import Complete, Header, VcpuState
from dirtylog.snapshot.errors import SnapshotFormatError
from dirtylog.units import PAGE_SIZE

MAGIC: Final = b"\x89DIRTYLOG-SNAP\r\n"  # PNG's trick: a high byte and CR LF catch text-mode transfers
VERSION: Final = 1
HEAD_SIZE: Final = 4096
DATA_OFFSET: Final = HEAD_SIZE
#: Pages per block: the unit a restore installs and a live snapshot saves; one word of the bitmaps.
BLOCK_PAGES: Final = 64
#: Guest pages per index chunk, the unit the index is checked in when first used (16 MiB of guest memory).
CHUNK_PAGES: Final = 4096
CHUNK_WORDS: Final = CHUNK_PAGES // 64
#: File suffix the tools give snapshots (any name works).
SUFFIX: Final = ".dlsnap"
MAX_METADATA: Final = 64 << 20
MAX_CHAIN: Final = 255
IDENTITY_SIZE: Final = 32
_CONTEXT: Final = "dirtylog snapshot v1"

_HEAD: Final = struct.Struct("<16sHBB4xQQQQQQQ32s32s32s")
_CHECKSUM: Final = struct.Struct("<32s")
HEAD_USED: Final = _HEAD.size + _CHECKSUM.size


class Kind(enum.IntEnum):
    FULL = 1
    INCREMENTAL = 2


class SnapshotFrame(enum.IntEnum):
    """Metadata frames of their own (the stream's frame types stay the stream's; these live only in files)."""

    INDEX = 0x30
    INFO = 0x31


_INDEX_HEAD: Final = struct.Struct("<II16s")  # chunk pages, chunk count, xxh3-128 of the held bitmap


def _hash(purpose: str, *parts: bytes | memoryview) -> bytes:
    hasher = blake3(derive_key_context=f"{_CONTEXT} {purpose}")
    for part in parts:
        hasher.update(part)
    return hasher.digest()


def nwords(npages: int) -> int:
    """64-bit words of a bitmap over ``npages`` pages."""
    return (npages + 63) // 64


def index_length(kind: Kind, npages: int, held: int) -> int:
    """Bytes of a layer's index: zero bitmap, held bitmap (incremental only), one fingerprint per held page."""
    return 8 * (nwords(npages) * (1 if kind is Kind.FULL else 2) + held)


def chunk_count(npages: int) -> int:
    return (npages + CHUNK_PAGES - 1) // CHUNK_PAGES


def bitmap_hash(words: npt.NDArray[np.uint64]) -> bytes:
    """The 16-byte hash of a held bitmap (checked when a layer is opened)."""
    return xxhash.xxh3_128_digest(np.ascontiguousarray(words, dtype="<u8").data)


@dataclass(frozen=True)
class Head:
    """The first page of a snapshot file."""

    kind: Kind
    npages: int
    held: int  # pages the layer holds (all of them for a full snapshot)
    index_offset: int
    index_length: int
    meta_offset: int
    meta_length: int
    identity: bytes
    parent: bytes  # the parent's identity; zeros for a full snapshot
    meta_checksum: bytes

    @property
    def file_length(self) -> int:
        return self.meta_offset + self.meta_length

    @classmethod
    def plan(cls, kind: Kind, npages: int, held: int) -> tuple[int, int, int]:
        """``(index_offset, index_length, meta_offset)`` of a layer holding ``held`` of ``npages`` pages."""
        index_offset = DATA_OFFSET + held * PAGE_SIZE
        length = index_length(kind, npages, held)
        return index_offset, length, index_offset + length

    def pack(self) -> bytes:
        fields = _HEAD.pack(MAGIC, VERSION, self.kind, 0, self.npages, self.held, self.index_offset,
                            self.index_length, self.meta_offset, self.meta_length, self.file_length, self.identity,
                            self.parent, self.meta_checksum)
        return (fields + _CHECKSUM.pack(_hash("head", fields))).ljust(HEAD_SIZE, b"\0")

    @classmethod
    def unpack(cls, data: bytes, name: str, size: int) -> Head:
        """The head of a file of ``size`` bytes named ``name`` (for messages); SnapshotFormatError if it is not
        one this version wrote, whole."""
        foreign = _foreign(data, name)
        if foreign:
            raise SnapshotFormatError(foreign)
        if len(data) < HEAD_SIZE:
            raise SnapshotFormatError(f"{name} is cut short: {size} bytes, not even a whole snapshot head")
        version = int.from_bytes(data[16:18], "little")
        if version != VERSION:
            raise SnapshotFormatError(f"{name} is a version {version} snapshot; this dirtylog reads version "
                                      f"{VERSION}: restore it with the dirtylog that wrote it")
        (_magic, version, kind, flags, npages, held, index_offset, index_len, meta_offset, meta_length, file_length,
         identity, parent, meta_checksum) = _HEAD.unpack_from(data)
        (checksum,) = _CHECKSUM.unpack_from(data, _HEAD.size)
        if checksum != _hash("head", data[:_HEAD.size]) or any(data[HEAD_USED:HEAD_SIZE]):
            raise SnapshotFormatError(f"{name}: the snapshot head is corrupt (its checksum does not match)")
        try:
            kind = Kind(kind)
        except ValueError:
            raise SnapshotFormatError(f"{name}: unknown snapshot kind {kind}") from None
        head = cls(kind, npages, held, index_offset, index_len, meta_offset, meta_length, identity, parent,
                   meta_checksum)
        problem = head._inconsistency(flags, file_length)
        if problem:
            raise SnapshotFormatError(f"{name}: the snapshot head is inconsistent ({problem})")
        if size < head.file_length:
            raise SnapshotFormatError(f"{name} is truncated: {size} bytes of the {head.file_length} it was written "
                                      "with; the rest is lost (restore an earlier layer, or a copy of this file)")
        if size > head.file_length:
            raise SnapshotFormatError(f"{name} has {size - head.file_length} bytes after its end: not a file "
                                      "dirtylog wrote (or one appended to)")
        return head

    def _inconsistency(self, flags: int, file_length: int) -> str:
        if flags:
            return f"unknown flags {flags:#x}"
        if self.npages <= 0 or self.npages % BLOCK_PAGES:
            return f"{self.npages} guest pages"
        if not 0 <= self.held <= self.npages or (self.kind is Kind.FULL and self.held != self.npages):
            return f"{self.held} pages held of {self.npages}"
        if (self.index_offset, self.index_length, self.meta_offset) != Head.plan(self.kind, self.npages, self.held):
            return "section offsets"
        if not 0 < self.meta_length <= MAX_METADATA or file_length != self.file_length:
            return "metadata length"
        if (self.kind is Kind.FULL) != (self.parent == bytes(IDENTITY_SIZE)):
            return "a full snapshot has no parent, an incremental one has one"
        return ""


def _foreign(data: bytes, name: str) -> str:
    """Why ``data`` (a file's first bytes) is not a snapshot, or '' when its magic is right."""
    if data.startswith(MAGIC):
        return ""
    if not data:
        return f"{name} is empty, not a dirtylog snapshot"
    if data.startswith(b"DIRTYLOG-FILE"):
        return (f"{name} is a migration stream file, not a snapshot: load it with "
                f"`dirtylog receive --listen file:{name}`")
    if data.startswith(codec.MAGIC):
        return f"{name} is a recorded migration stream, not a snapshot"
    if MAGIC.startswith(data[:len(MAGIC)]):
        return f"{name} is cut short: {len(data)} bytes, not even a whole snapshot head"
    return f"{name} is not a dirtylog snapshot (it does not start with the snapshot magic)"


# -- metadata --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Metadata:
    """What a layer says about the VM it restores to, and how to check its index."""

    header: Header
    vcpu_states: tuple[bytes, ...]
    digest: bytes  # memory digest of the state the layer restores to (payload.digest)
    chunk_checks: npt.NDArray[np.uint64]  # one per CHUNK_PAGES guest pages: the index chunk's check value
    held_hash: bytes  # bitmap_hash of the held bitmap (incremental), zeros (full)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def identity(self) -> bytes:
        """What the layer restores to, as 32 bytes (see the module docstring)."""
        return state_identity(self.header, self.vcpu_states, self.digest)

    def encode(self) -> bytes:
        """The metadata section's bytes."""
        frames: list[bytes] = []

        def add(ftype: int, payload: bytes | memoryview) -> None:
            frames.append(codec.FRAME_HEADER.pack(ftype, 0, 0, len(payload), len(frames)) + bytes(payload))

        add(codec.FrameType.HEADER, _joined(codec.encode_header(self.header)))
        for index, state in enumerate(self.vcpu_states):
            add(codec.FrameType.VCPU_STATE, _joined(codec.encode_vcpu_state(VcpuState(index, state))))
        checks = np.ascontiguousarray(self.chunk_checks, dtype="<u8")
        add(SnapshotFrame.INDEX, _INDEX_HEAD.pack(CHUNK_PAGES, checks.size, self.held_hash) + checks.tobytes())
        add(SnapshotFrame.INFO, codec.encode_json(self.info))
        add(codec.FrameType.COMPLETE, _joined(codec.encode_complete(Complete(self.digest, (len(frames),)))))
        return b"".join(frames)

    @classmethod
    def decode(cls, data: bytes, name: str, npages: int) -> Metadata:
        """The metadata of a layer of ``npages`` pages; SnapshotFormatError for anything out of place."""
        try:
            return _decode_metadata(memoryview(data), npages)
        except (ProtocolError, _MetadataError) as error:
            raise SnapshotFormatError(f"{name}: the snapshot metadata is invalid: {error}") from None


class _MetadataError(DirtylogError):
    pass


def _joined(encoded: codec.Encoded) -> bytes:
    head, data = encoded
    return head + (bytes(data) if data is not None else b"")


def _frames(data: memoryview) -> list[tuple[int, memoryview]]:
    frames: list[tuple[int, memoryview]] = []
    at = 0
    while at < len(data):
        if len(data) - at < codec.FRAME_HEADER.size:
            raise _MetadataError(f"{len(data) - at} stray bytes at its end")
        ftype, flags, reserved, length, seq = codec.FRAME_HEADER.unpack_from(data, at)
        if flags or reserved:
            raise _MetadataError(f"frame {len(frames)} has flags or reserved bits set")
        if seq != len(frames):
            raise _MetadataError(f"frame {len(frames)} is numbered {seq}")
        at += codec.FRAME_HEADER.size
        if length > len(data) - at:
            raise _MetadataError(f"frame {len(frames)} runs past the end")
        frames.append((ftype, data[at:at + length]))
        at += length
    return frames


def _decode_metadata(data: memoryview, npages: int) -> Metadata:
    frames = _frames(data)
    expected: list[int] = [codec.FrameType.HEADER]
    if not frames or frames[0][0] != codec.FrameType.HEADER:
        raise _MetadataError("it does not open with the VM's Header")
    state = rules.StreamState()
    header = codec.decode_header(frames[0][1], PAGE_SIZE)
    rules.check_header(state, header)
    if header.page_size != PAGE_SIZE or header.total_pages != npages:
        raise _MetadataError(f"its Header describes {header.total_pages} pages of {header.page_size} bytes, the "
                             f"head {npages} of {PAGE_SIZE}")
    expected += [codec.FrameType.VCPU_STATE] * header.vcpus
    expected += [SnapshotFrame.INDEX, SnapshotFrame.INFO, codec.FrameType.COMPLETE]
    if [ftype for ftype, _ in frames] != expected:
        raise _MetadataError(f"it holds frames {[hex(t) for t, _ in frames]}, expected {[hex(t) for t in expected]}")
    states: list[bytes] = []
    for _ftype, payload in frames[1:1 + header.vcpus]:
        event = codec.decode_vcpu_state(payload, PAGE_SIZE)
        if event.index != len(states):
            raise _MetadataError(f"vCPU state {len(states)} is numbered {event.index}")
        rules.check_vcpu_state(state, event)
        states.append(bytes(event.state))
    index = frames[1 + header.vcpus][1]
    if len(index) < _INDEX_HEAD.size:
        raise _MetadataError("its index record is cut short")
    chunk_pages, nchunks, held_hash = _INDEX_HEAD.unpack_from(index)
    if chunk_pages != CHUNK_PAGES or nchunks != chunk_count(npages) or len(index) != _INDEX_HEAD.size + 8 * nchunks:
        raise _MetadataError(f"its index record has {nchunks} chunks of {chunk_pages} pages")
    checks = np.frombuffer(index, dtype="<u8", count=nchunks, offset=_INDEX_HEAD.size).astype(np.uint64)
    info = codec.decode_json("snapshot info", frames[-2][1])
    complete = codec.decode_complete(frames[-1][1], PAGE_SIZE)
    if complete.stream_frames != (len(frames) - 1,):
        raise _MetadataError(f"its Complete counts {complete.stream_frames} frames before it, not {len(frames) - 1}")
    return Metadata(header, tuple(states), complete.digest, checks, held_hash, info)


def state_identity(header: Header, vcpu_states: tuple[bytes, ...], digest: bytes) -> bytes:
    """32 bytes naming the state a snapshot restores to: its VM's Header, vCPU states and memory digest."""
    parts = [_joined(codec.encode_header(header))]
    parts += [_joined(codec.encode_vcpu_state(VcpuState(i, s))) for i, s in enumerate(vcpu_states)]
    lengths = struct.pack(f"<{len(parts)}Q", *(len(part) for part in parts))
    return _hash("state identity", lengths, *parts, digest)


def metadata_checksum(data: bytes) -> bytes:
    """The head's checksum of the metadata section."""
    return _hash("metadata", data)


def short(identity: bytes) -> str:
    """The first 12 hex digits of an identity, for people."""
    return identity.hex()[:12]
