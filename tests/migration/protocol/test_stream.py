"""Nothing lost, nobody let in: recorded streams (``recorded.py``), tampered with every way we can think of.

The tests (and test_fuzz.py) flip, cut, repeat, reorder and splice the bytes and check that each change is
refused with a clear error, before anything changed is delivered.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dirtylog.migration.payload.pages import decode_pages, make_page_batch
from dirtylog.migration.protocol.codec import (
    FRAME_HEADER,
    HELLO_BODY,
    MAGIC,
    RECORD_PREFIX,
    VERSION,
    RecordType,
    encode_record,
)
from dirtylog.migration.protocol.connection import DestinationConnection, SourceConnection
from dirtylog.migration.protocol.errors import (
    AuthenticationError,
    RemoteProtocolError,
    ReplayError,
    TruncatedStreamError,
    VersionMismatchError,
)
from dirtylog.migration.protocol.events import (
    Abort,
    AbortCode,
    Accepted,
    Codec,
    Hello,
    PageBatch,
    Ready,
    Resumed,
    RoundEnd,
    Verified,
)
from dirtylog.migration.protocol.loopback import collect, join
from tests.migration.protocol.recorded import (
    KEY,
    OTHER_KEY,
    PAGE,
    PFNS,
    assert_refused,
    canon,
    clean,
    destination,
    digest,
    recording,
    replay,
    source,
    streaming_pair,
)

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
    newer = MAGIC + (VERSION + 1).to_bytes(2, "little") + hello[10:]
    dst = destination()
    dst.receive_data(newer[:10])  # the version is known after ten bytes; the rest need not arrive
    with pytest.raises(VersionMismatchError, match=f"version {VERSION + 1}, this dirtylog speaks version {VERSION}") \
            as caught:
        dst.next_event()
    assert "install the same dirtylog version on both hosts" in str(caught.value)
    (reply,) = caught.value.reply
    assert reply[:10] == MAGIC + VERSION.to_bytes(2, "little") and reply[10] == RecordType.REJECT
    # A source of another version sees our version in the reply's prefix and reports it.
    src = source()
    src.initiate()
    reply_other = MAGIC + (VERSION + 7).to_bytes(2, "little") + reply[10:]
    with pytest.raises(VersionMismatchError, match=f"the destination speaks migration stream version {VERSION + 7}"):
        collect(src, reply_other)


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
    record = RECORD_PREFIX.pack(MAGIC, VERSION, RecordType.HELLO, 0, length)
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
