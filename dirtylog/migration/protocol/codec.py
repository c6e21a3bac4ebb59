"""Bytes of the migration stream: record and frame layouts, and each event's payload encoding.

Everything here is pure formatting (docs/migration-stream.md is the prose version of this file). Which
encoder and decoder serve which frame type is said once, in the table of ``rules``.

* Handshake **records** open with a frozen 10-byte prefix, ``b"DIRTYLOG"`` and the stream version, so
  any two versions of dirtylog can at least tell each other apart::

      magic 8s | version u16 | type u8 | flags u8 | body length u32 | body

* After the handshake, authenticated **frames**::

      type u8 | flags u8 | reserved u16 | payload length u32 | sequence u64 | payload | MAC 16 bytes

All integers are little-endian; ``sequence`` is the frame's number in its direction, checked by the
receiver and used as the MAC's nonce. Decoders raise RemoteProtocolError for anything malformed and return
events without checking their meaning; ``rules`` does that, for both directions alike.
"""

from __future__ import annotations

import enum
import json
import struct
from collections.abc import Callable
from typing import Any, Final

import numpy as np

from dirtylog.bitmap import DirtyBitmap
from dirtylog.kvm.memslot import SlotLayout
from dirtylog.migration.protocol.errors import LocalProtocolError, RemoteProtocolError
from dirtylog.migration.protocol.events import (
    CODECS,
    Abort,
    AbortCode,
    BytesLike,
    Codec,
    Commit,
    Complete,
    Header,
    Missing,
    PageBatch,
    PageRequest,
    PostcopyPages,
    PostcopyStart,
    Ready,
    Resumed,
    RoundEnd,
    VcpuState,
    Verified,
)

MAGIC: Final = b"DIRTYLOG"
VERSION: Final = 3  # 2: HELLO flags (encryption), round statistics checked; 3: post-copy (frames, flags, channel)

# -- limits: a receiver refuses anything larger before buffering it ---------------------------------------
#: Largest frame payload. A PageBatch of 1 MiB of pages (the engine's default) is far below it.
MAX_PAYLOAD: Final = 16 << 20
#: Largest handshake record body; real ones are at most 64 bytes plus a REJECT reason.
MAX_RECORD_BODY: Final = 4096
#: Pages in one batch, zero pages included (bounds the page-number arrays a batch expands to).
MAX_BATCH_PAGES: Final = 1 << 20
#: Uncompressed data of one batch: the decompression bound (no zip bombs).
MAX_BATCH_DATA: Final = MAX_PAYLOAD
MAX_SLOTS: Final = 32768
MAX_VCPUS: Final = 4096
MAX_STREAMS: Final = 256
#: Guest frame numbers stay below 2**52 (a 64-bit physical address space of 4 KiB pages), so
#: ``start + length`` never overflows and fits an int64 for NumPy arithmetic.
MAX_GFN: Final = 1 << 52
MAX_JSON: Final = 64 << 10
MAX_REASON: Final = 1024
NONCE_SIZE: Final = 32
PROOF_SIZE: Final = 32
MAC_SIZE: Final = 16
DIGEST_SIZE: Final = 16
MIGRATION_ID_SIZE: Final = 16

RECORD_PREFIX: Final = struct.Struct("<8sHBBI")
FRAME_HEADER: Final = struct.Struct("<BBHIQ")
assert RECORD_PREFIX.size == FRAME_HEADER.size == 16

# Handshake record bodies.
HELLO_BODY: Final = struct.Struct("<BBHH2x16s32s")  # role, flags, stream index, count, id, nonce
HELLO_ENCRYPT: Final = 0x01  # HELLO flag: every frame of this session is encrypted (AES-256-GCM), not only MACed
HELLO_POSTCOPY: Final = 0x02  # HELLO flag: this connection is the migration's post-copy channel
HELLO_RESUME: Final = 0x04  # HELLO flag: the source reconnects to resume a post-copy migration whose link broke
HELLO_FLAGS: Final = HELLO_ENCRYPT | HELLO_POSTCOPY | HELLO_RESUME
CHALLENGE_BODY: Final = struct.Struct("<32s32s")  # server nonce, server proof
AUTH_BODY: Final = struct.Struct("<32s")  # client proof
REJECT_HEAD: Final = struct.Struct("<HH")  # code, reserved; reason follows
ROLE_SOURCE: Final = 1

# Frame payload layouts.
HEADER_HEAD: Final = struct.Struct("<IIHBBII4x")  # page size, vcpus, streams, codec, flags, nslots, json
HEADER_POSTCOPY: Final = 0x01  # Header flag: the source may switch to post-copy
SLOT: Final = struct.Struct("<IIQQ")  # slot, reserved, base_gfn, npages
BATCH_HEAD: Final = struct.Struct("<IBBHIII12x")  # round, codec, flags, rsvd, nruns, npages, data len
_ONE_RUN: Final = struct.Struct("<QI")  # a batch's runs arrays when it has just one: start, length
VCPU_HEAD: Final = struct.Struct("<I4x")
ROUND_END_HEAD: Final = struct.Struct("<I4xQ")
COMPLETE_HEAD: Final = struct.Struct("<16sH6x")
VERIFIED_BODY: Final = struct.Struct("<16s")
ABORT_HEAD: Final = struct.Struct("<HH")
PAGESET_HEAD: Final = struct.Struct("<QQ")  # span in pages (bits), pages in the set; 64-bit words follow
POSTCOPY_START_HEAD: Final = struct.Struct("<16sH6x")  # digest, stream count; frame counts, then a page set
PAGE_REQUEST_HEAD: Final = struct.Struct("<I4x")  # runs; starts, lengths
POSTCOPY_PAGES_HEAD: Final = struct.Struct("<B3xIII")  # flags, runs, pages, data length
POSTCOPY_REQUESTED: Final = 0x01  # PostcopyPages flag: the answer to a PageRequest
#: Pages a page set may span (a 16 MiB frame of bitmap): post-copy of guests up to 512 GiB of 4 KiB pages.
MAX_PAGESET: Final = (MAX_PAYLOAD - 64) // 8 * 64


class RecordType(enum.IntEnum):
    HELLO = 0x01
    CHALLENGE = 0x02
    AUTH = 0x03
    REJECT = 0x04


class FrameType(enum.IntEnum):
    HEADER = 0x10
    READY = 0x11
    PAGE_BATCH = 0x12
    VCPU_STATE = 0x13
    ROUND_END = 0x14
    COMPLETE = 0x15
    VERIFIED = 0x16
    COMMIT = 0x17
    RESUMED = 0x18
    ABORT = 0x19
    POSTCOPY_START = 0x1A
    PAGE_REQUEST = 0x1B
    POSTCOPY_PAGES = 0x1C
    MISSING = 0x1D


#: The first byte of a record (b"D" of the magic) is never a frame type, so a REJECT record that
#: arrives where a frame was expected (the peer refused our AUTH) is recognised, not misparsed.
RECORD_FIRST_BYTE: Final = MAGIC[0]
assert RECORD_FIRST_BYTE not in set(FrameType)

CODEC_IDS: Final[dict[Codec, int]] = {name: i for i, name in enumerate(CODECS)}

def frame_name(ftype: int) -> str:
    """``PageBatch`` for a known frame type, ``type 0x7f`` otherwise (for messages)."""
    try:
        return FrameType(ftype).name
    except ValueError:
        return f"type {ftype:#04x}"


# -- handshake records ----------------------------------------------------------------------------


def encode_record(rtype: RecordType, body: bytes, version: int = VERSION) -> bytes:
    """One handshake record: the 16-byte prefix and its body."""
    return RECORD_PREFIX.pack(MAGIC, version, rtype, 0, len(body)) + body


def encode_reject(code: AbortCode, reason: str) -> bytes:
    """A REJECT record: the handshake failed (or was refused) for ``reason``."""
    text = reason.encode("utf-8", "replace")[:MAX_REASON]
    return encode_record(RecordType.REJECT, REJECT_HEAD.pack(code, 0) + text)


def decode_reject(body: bytes) -> tuple[int, str]:
    """Code and printable reason of a REJECT body (the reason is the peer's text: shown, not trusted)."""
    if len(body) < REJECT_HEAD.size:
        raise RemoteProtocolError(f"REJECT record of {len(body)} bytes is too short to hold a reason code")
    code, _ = REJECT_HEAD.unpack_from(body)
    return code, printable(body[REJECT_HEAD.size :].decode("utf-8", "replace"))


def printable(text: str, limit: int = MAX_REASON) -> str:
    """``text`` with control characters escaped, so a peer cannot forge lines in our logs."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text[:limit])


# -- frame payloads: encoding ---------------------------------------------------------------------
#
# Each encoder returns ``(head, data)``: ``head`` is the small formatted part, ``data`` the large buffer to
# go out as the caller's memoryview (page data, vCPU state), so nothing big is copied.

Encoded = tuple[bytes, memoryview | None]


def encode_header(header: Header) -> Encoded:
    workload = encode_json(header.workload)
    flags = HEADER_POSTCOPY if header.postcopy else 0
    head = HEADER_HEAD.pack(header.page_size, header.vcpus, header.streams, CODEC_IDS[header.codec], flags,
                            len(header.slots), len(workload))
    slots = b"".join(SLOT.pack(s.slot, 0, s.base_gfn, s.npages) for s in header.slots)
    return head + slots + workload, None


def encode_batch(batch: PageBatch) -> Encoded:
    data = as_bytes_view(batch.data)
    return _encode_batch_head(batch, len(data)), data


def encode_vcpu_state(event: VcpuState) -> Encoded:
    return VCPU_HEAD.pack(event.index), as_bytes_view(event.state)


def encode_round_end(event: RoundEnd) -> Encoded:
    return ROUND_END_HEAD.pack(event.round, event.pages) + encode_json(event.stats), None


def encode_complete(event: Complete) -> Encoded:
    frames = np.asarray(event.stream_frames, dtype="<u8").tobytes()
    return COMPLETE_HEAD.pack(event.digest, len(event.stream_frames)) + frames, None


def encode_verified(event: Verified) -> Encoded:
    return VERIFIED_BODY.pack(event.digest), None


def encode_abort(event: Abort) -> Encoded:
    return ABORT_HEAD.pack(event.code, 0) + abort_reason_bytes(event.reason), None


def encode_postcopy_start(event: PostcopyStart) -> Encoded:
    frames = np.asarray(event.stream_frames, dtype="<u8").tobytes()
    head = POSTCOPY_START_HEAD.pack(event.digest, len(event.stream_frames))
    return head + frames + encode_pageset(event.pending), None


def encode_missing(event: Missing) -> Encoded:
    return encode_pageset(event.pages), None


def encode_pageset(pages: DirtyBitmap) -> bytes:
    """A page set: its span and size, then its bitmap words (bit ``g`` is guest frame ``g``)."""
    return PAGESET_HEAD.pack(pages.npages, pages.count()) + pages.words.astype("<u8", copy=False).tobytes()


def encode_page_request(event: PageRequest) -> Encoded:
    nruns = len(event.starts)
    out = bytearray(_align8(PAGE_REQUEST_HEAD.size + 12 * nruns))
    PAGE_REQUEST_HEAD.pack_into(out, 0, nruns)
    at = PAGE_REQUEST_HEAD.size
    out[at:at + 8 * nruns] = event.starts.astype("<u8", copy=False).tobytes()
    out[at + 8 * nruns:at + 12 * nruns] = event.lengths.astype("<u4", copy=False).tobytes()
    return bytes(out), None


def postcopy_layout(nruns: int, npages: int) -> tuple[int, int, int, int]:
    """Offsets of the lengths, the zero bitmap, the fingerprints and the data in a POSTCOPY_PAGES payload
    (each 8-byte aligned, as in a PageBatch)."""
    lengths_at = POSTCOPY_PAGES_HEAD.size + 8 * nruns
    bitmap_at = _align8(lengths_at + 4 * nruns)
    prints_at = _align8(bitmap_at + (npages + 7) // 8)
    return lengths_at, bitmap_at, prints_at, prints_at + 8 * npages


def encode_postcopy_pages(event: PostcopyPages) -> Encoded:
    data = as_bytes_view(event.data)
    nruns, npages = len(event.starts), event.npages
    lengths_at, bitmap_at, prints_at, data_at = postcopy_layout(nruns, npages)
    out = bytearray(data_at)
    POSTCOPY_PAGES_HEAD.pack_into(out, 0, POSTCOPY_REQUESTED if event.requested else 0, nruns, npages, len(data))
    out[POSTCOPY_PAGES_HEAD.size:lengths_at] = event.starts.astype("<u8", copy=False).tobytes()
    out[lengths_at:lengths_at + 4 * nruns] = event.lengths.astype("<u4", copy=False).tobytes()
    if event.zero is not None:
        bits = np.packbits(event.zero, bitorder="little").tobytes()
        out[bitmap_at:bitmap_at + len(bits)] = bits
    out[prints_at:data_at] = event.fingerprints.astype("<u8", copy=False).tobytes()
    return bytes(out), data


def encode_empty(event: Ready | Commit | Resumed) -> Encoded:
    return b"", None


def abort_reason_bytes(reason: str) -> bytes:
    """The reason of an Abort as sent: UTF-8, cut at MAX_REASON bytes (an abort never fails for length)."""
    return reason.encode("utf-8", "replace")[:MAX_REASON]


def as_bytes_view(data: BytesLike | np.ndarray[Any, Any]) -> memoryview:
    """A flat byte view of ``data`` without copying it (NumPy arrays included)."""
    if isinstance(data, np.ndarray):
        if not data.flags.c_contiguous:
            raise LocalProtocolError("page data must be one contiguous array; gather the pages first")
        return data.reshape(-1).view(np.uint8).data
    view = memoryview(data)
    if view.format != "B" or view.ndim != 1:
        if not view.c_contiguous:
            raise LocalProtocolError("page data must be one contiguous buffer; gather the pages first")
        view = view.cast("B") if view.nbytes else memoryview(b"")
    return view


def encode_json(value: dict[str, Any]) -> bytes:
    """Compact, canonical JSON of a small dict (workload description, round statistics)."""
    if not isinstance(value, dict):
        raise LocalProtocolError(f"expected a dict for JSON, got {type(value).__name__}")
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise LocalProtocolError(f"cannot encode {value!r:.80} as JSON: {exc}") from exc
    data = text.encode()
    if len(data) > MAX_JSON:
        raise LocalProtocolError(f"JSON of {len(data)} bytes is over the {MAX_JSON}-byte limit")
    return data


def batch_layout(nruns: int, npages: int) -> tuple[int, int, int]:
    """Offsets of the lengths array, the zero bitmap and the data inside a PageBatch payload.

    Every array starts 8-byte aligned relative to the payload (frames put payloads at offset 16), so
    the receiver's ``np.frombuffer`` views are aligned.
    """
    lengths_at = BATCH_HEAD.size + 8 * nruns
    bitmap_at = _align8(lengths_at + 4 * nruns)
    data_at = _align8(bitmap_at + (npages + 7) // 8)
    return lengths_at, bitmap_at, data_at


def _align8(n: int) -> int:
    return (n + 7) & ~7


def _encode_batch_head(batch: PageBatch, data_len: int) -> bytes:
    nruns, npages = len(batch.starts), batch.npages
    lengths_at, bitmap_at, data_at = batch_layout(nruns, npages)
    out = bytearray(data_at)
    BATCH_HEAD.pack_into(out, 0, batch.round, CODEC_IDS[batch.codec], 0, 0, nruns, npages, data_len)
    if nruns == 1:  # the usual batch: struct, not array conversions
        _ONE_RUN.pack_into(out, BATCH_HEAD.size, int(batch.starts[0]), int(batch.lengths[0]))
    else:
        out[BATCH_HEAD.size : lengths_at] = batch.starts.astype("<u8", copy=False).tobytes()
        out[lengths_at : lengths_at + 4 * nruns] = batch.lengths.astype("<u4", copy=False).tobytes()
    if batch.zero is not None:  # else the bitmap stays all zero: no page is a zero page
        bits = np.packbits(batch.zero, bitorder="little").tobytes()
        out[bitmap_at : bitmap_at + len(bits)] = bits
    return bytes(out)


# -- frame payloads: decoding ---------------------------------------------------------------------


def batch_data_at(peek: memoryview) -> int:
    """Where the data starts in a PAGE_BATCH payload, from its first BATCH_HEAD.size bytes (0 if they are
    malformed: the frame is then received whole and refused by its decoder)."""
    if len(peek) < BATCH_HEAD.size:
        return 0
    _, _, flags, rsvd, nruns, npages, _ = BATCH_HEAD.unpack_from(peek)
    if flags or rsvd or npages > MAX_BATCH_PAGES or nruns > npages:
        return 0
    return batch_layout(nruns, npages)[2]


def batch_single_run(head: memoryview) -> tuple[int, int, int] | None:
    """``(round, first page, pages)`` of an uncompressed PAGE_BATCH head (its payload up to the data) with
    one run and no zero pages, whose data is then exactly those pages in order; None for any other."""
    if len(head) < BATCH_HEAD.size + 16:
        return None
    rnd, codec_id, flags, rsvd, nruns, npages, _ = BATCH_HEAD.unpack_from(head)
    _, bitmap_at, data_at = batch_layout(1, npages)
    if nruns != 1 or flags or rsvd or codec_id != CODEC_IDS["none"] or len(head) != data_at:
        return None
    first, length = _ONE_RUN.unpack_from(head, BATCH_HEAD.size)
    if length != npages or any(head[bitmap_at:]):
        return None
    return rnd, first, npages


def decode_header(p: memoryview, _: int) -> Header:
    page_size, vcpus, streams, codec_id, flags, nslots, json_len = HEADER_HEAD.unpack_from(p)
    if flags & ~HEADER_POSTCOPY or any(p[20:24]):
        raise RemoteProtocolError(f"HEADER has unknown flags {flags:#x} or reserved bytes that are not zero")
    if nslots > MAX_SLOTS:  # before building a Python object per slot
        raise RemoteProtocolError(f"HEADER lists {nslots} memory slots, over the {MAX_SLOTS} limit")
    _expect_size("HEADER", p, HEADER_HEAD.size + nslots * SLOT.size + json_len)
    raw = np.frombuffer(
        p,
        dtype=np.dtype([("slot", "<u4"), ("rsvd", "<u4"), ("gfn", "<u8"), ("n", "<u8")]),
        count=nslots,
        offset=HEADER_HEAD.size,
    )
    if raw["rsvd"].any():
        raise RemoteProtocolError("HEADER slot reserved bytes are not zero")
    if (raw["gfn"] >= MAX_GFN).any() or (raw["n"] >= MAX_GFN).any():  # before multiplying by the page size
        raise RemoteProtocolError("HEADER lists a memory slot beyond any guest memory")
    slots = tuple(
        SlotLayout.of_pages(int(s), int(g), int(n)) for s, g, n in zip(raw["slot"], raw["gfn"], raw["n"], strict=True)
    )
    workload = decode_json("workload", p[HEADER_HEAD.size + nslots * SLOT.size :])
    return Header(
        page_size=page_size, slots=slots, vcpus=vcpus, workload=workload, codec=_codec(codec_id), streams=streams,
        postcopy=bool(flags & HEADER_POSTCOPY),
    )


def decode_batch(p: memoryview, page_size: int) -> PageBatch:
    rnd, codec_id, flags, rsvd, nruns, npages, data_len = BATCH_HEAD.unpack_from(p)
    if flags or rsvd:
        raise RemoteProtocolError(f"PAGE_BATCH has unknown flags {flags:#x} / reserved bits {rsvd:#x}")
    if npages > MAX_BATCH_PAGES or nruns > npages:
        raise RemoteProtocolError(f"PAGE_BATCH of {npages} pages in {nruns} runs is out of bounds")
    lengths_at, bitmap_at, data_at = batch_layout(nruns, npages)
    _expect_size("PAGE_BATCH", p, data_at + data_len)
    bitmap = np.frombuffer(p, dtype=np.uint8, count=(npages + 7) // 8, offset=bitmap_at)
    # Canonical encoding: padding bits and bytes are zero, so one batch has exactly one encoding.
    if npages % 8 and bitmap[-1] >> (npages % 8):
        raise RemoteProtocolError("PAGE_BATCH zero-page bitmap has bits set past its last page")
    if any(p[lengths_at + 4 * nruns : bitmap_at]) or any(p[bitmap_at + len(bitmap) : data_at]):
        raise RemoteProtocolError("PAGE_BATCH padding bytes are not zero")
    # No zero page: no mask (the decision PageBatch.run reads); bytes, not an array pass, on the usual batch.
    zero = np.unpackbits(bitmap, count=npages, bitorder="little").view(np.bool_) if any(bitmap.data) else None
    return PageBatch(
        round=rnd,
        starts=np.frombuffer(p, dtype="<u8", count=nruns, offset=BATCH_HEAD.size),
        lengths=np.frombuffer(p, dtype="<u4", count=nruns, offset=lengths_at),
        zero=zero,
        data=p[data_at:],
        codec=_codec(codec_id),
        page_size=page_size,
    )


def decode_vcpu_state(p: memoryview, _: int) -> VcpuState:
    (index,) = VCPU_HEAD.unpack_from(p)
    _expect_reserved("VCPU_STATE", p[4:8])
    return VcpuState(index=index, state=bytes(p[VCPU_HEAD.size :]))


def decode_round_end(p: memoryview, _: int) -> RoundEnd:
    rnd, pages = ROUND_END_HEAD.unpack_from(p)
    _expect_reserved("ROUND_END", p[4:8])
    return RoundEnd(round=rnd, pages=pages, stats=decode_json("round statistics", p[ROUND_END_HEAD.size :]))


def decode_complete(p: memoryview, _: int) -> Complete:
    digest, nstreams = COMPLETE_HEAD.unpack_from(p)
    _expect_reserved("COMPLETE", p[18:24])
    _expect_size("COMPLETE", p, COMPLETE_HEAD.size + 8 * nstreams)
    frames = np.frombuffer(p, dtype="<u8", count=nstreams, offset=COMPLETE_HEAD.size)
    return Complete(digest=digest, stream_frames=tuple(int(n) for n in frames))


def decode_verified(p: memoryview, _: int) -> Verified:
    _expect_size("VERIFIED", p, VERIFIED_BODY.size)
    (digest,) = VERIFIED_BODY.unpack_from(p)
    return Verified(digest=digest)


def decode_abort(p: memoryview, _: int) -> Abort:
    code, _rsvd = ABORT_HEAD.unpack_from(p)
    if len(p) - ABORT_HEAD.size > MAX_REASON:
        raise RemoteProtocolError(f"ABORT reason of {len(p) - ABORT_HEAD.size} bytes is over {MAX_REASON}")
    try:
        abort_code = AbortCode(code)
    except ValueError:
        abort_code = AbortCode.PROTOCOL  # a newer peer's reason: still an abort, keep its text
    return Abort(reason=printable(bytes(p[ABORT_HEAD.size :]).decode("utf-8", "replace")), code=abort_code)


def decode_postcopy_start(p: memoryview, _: int) -> PostcopyStart:
    digest, nstreams = POSTCOPY_START_HEAD.unpack_from(p)
    _expect_reserved("POSTCOPY_START", p[18:24])
    at = POSTCOPY_START_HEAD.size + 8 * nstreams
    if len(p) < at:
        raise RemoteProtocolError(f"POSTCOPY_START of {len(p)} bytes is too short for {nstreams} frame counts")
    frames = np.frombuffer(p, dtype="<u8", count=nstreams, offset=POSTCOPY_START_HEAD.size)
    return PostcopyStart(pending=decode_pageset("POSTCOPY_START", p[at:]), digest=digest,
                         stream_frames=tuple(int(n) for n in frames))


def decode_missing(p: memoryview, _: int) -> Missing:
    return Missing(decode_pageset("MISSING", p))


def decode_pageset(what: str, p: memoryview) -> DirtyBitmap:
    """A page set as encode_pageset wrote it; its size, padding bits and count must agree."""
    if len(p) < PAGESET_HEAD.size:
        raise RemoteProtocolError(f"{what} page set of {len(p)} bytes is too short")
    npages, count = PAGESET_HEAD.unpack_from(p)
    if not 0 < npages <= MAX_PAGESET:
        raise RemoteProtocolError(f"{what} page set spans {npages} pages, outside [1, {MAX_PAGESET}]")
    nwords = (npages + 63) // 64
    _expect_size(f"{what} page set", p, PAGESET_HEAD.size + 8 * nwords)
    words = np.frombuffer(p, dtype="<u8", count=nwords, offset=PAGESET_HEAD.size).astype(np.uint64)
    if npages % 64 and int(words[-1]) >> (npages % 64):
        raise RemoteProtocolError(f"{what} page set has bits set past its last page")
    pages = DirtyBitmap(words, npages)
    if pages.count() != count:
        raise RemoteProtocolError(f"{what} page set says {count} pages but holds {pages.count()}")
    return pages


def decode_page_request(p: memoryview, _: int) -> PageRequest:
    (nruns,) = PAGE_REQUEST_HEAD.unpack_from(p)
    _expect_reserved("PAGE_REQUEST", p[4:8])
    if nruns > MAX_BATCH_PAGES:
        raise RemoteProtocolError(f"PAGE_REQUEST of {nruns} runs is out of bounds")
    at = PAGE_REQUEST_HEAD.size
    _expect_size("PAGE_REQUEST", p, _align8(at + 12 * nruns))
    if any(p[at + 12 * nruns:]):
        raise RemoteProtocolError("PAGE_REQUEST padding bytes are not zero")
    return PageRequest(starts=np.frombuffer(p, dtype="<u8", count=nruns, offset=at),
                       lengths=np.frombuffer(p, dtype="<u4", count=nruns, offset=at + 8 * nruns))


def decode_postcopy_pages(p: memoryview, page_size: int) -> PostcopyPages:
    flags, nruns, npages, data_len = POSTCOPY_PAGES_HEAD.unpack_from(p)
    if flags & ~POSTCOPY_REQUESTED or any(p[1:4]):
        raise RemoteProtocolError(f"POSTCOPY_PAGES has unknown flags {flags:#x} or reserved bytes that are not zero")
    if npages > MAX_BATCH_PAGES or nruns > npages:
        raise RemoteProtocolError(f"POSTCOPY_PAGES of {npages} pages in {nruns} runs is out of bounds")
    lengths_at, bitmap_at, prints_at, data_at = postcopy_layout(nruns, npages)
    _expect_size("POSTCOPY_PAGES", p, data_at + data_len)
    bitmap = np.frombuffer(p, dtype=np.uint8, count=(npages + 7) // 8, offset=bitmap_at)
    if npages % 8 and bitmap[-1] >> (npages % 8):
        raise RemoteProtocolError("POSTCOPY_PAGES zero-page bitmap has bits set past its last page")
    if any(p[lengths_at + 4 * nruns:bitmap_at]) or any(p[bitmap_at + len(bitmap):prints_at]):
        raise RemoteProtocolError("POSTCOPY_PAGES padding bytes are not zero")
    zero = np.unpackbits(bitmap, count=npages, bitorder="little").view(np.bool_) if any(bitmap.data) else None
    return PostcopyPages(
        starts=np.frombuffer(p, dtype="<u8", count=nruns, offset=POSTCOPY_PAGES_HEAD.size),
        lengths=np.frombuffer(p, dtype="<u4", count=nruns, offset=lengths_at),
        zero=zero,
        fingerprints=np.frombuffer(p, dtype="<u8", count=npages, offset=prints_at),
        data=p[data_at:],
        requested=bool(flags & POSTCOPY_REQUESTED),
        page_size=page_size,
    )


def decode_empty(event: Ready | Commit | Resumed) -> Callable[[memoryview, int], Ready | Commit | Resumed]:
    """A decoder of a frame that carries nothing but its type."""

    def decode(p: memoryview, _: int) -> Ready | Commit | Resumed:
        _expect_size(type(event).__name__.upper(), p, 0)
        return event

    return decode


def decode_json(what: str, data: memoryview | bytes) -> dict[str, Any]:
    """A JSON object from the peer; anything else (or too deep, or not UTF-8) is a RemoteProtocolError."""
    if len(data) > MAX_JSON:
        raise RemoteProtocolError(f"{what} JSON of {len(data)} bytes is over the {MAX_JSON}-byte limit")
    if not data:
        return {}
    try:
        value = json.loads(bytes(data).decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise RemoteProtocolError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise RemoteProtocolError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _codec(codec_id: int) -> Codec:
    if codec_id >= len(CODECS):
        raise RemoteProtocolError(f"unknown compression codec id {codec_id}")
    return CODECS[codec_id]


def _expect_size(what: str, p: memoryview, size: int) -> None:
    if len(p) != size:
        raise RemoteProtocolError(f"{what} payload is {len(p)} bytes but its fields describe {size}")


def _expect_reserved(what: str, field: memoryview) -> None:
    if any(field):
        raise RemoteProtocolError(f"{what} reserved bytes are not zero")
