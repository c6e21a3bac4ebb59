"""Fuzzing the stream: random and mutated bytes into both ends.

Every run goes through test_wire_stream.replay, which fails the test on anything but a ProtocolError, on
an endless next_event() loop, on NEED_DATA after EOF, and on any use of a connection after its error.
Byte-level mutations must also never deliver an event the clean stream would not have; MAC-valid
forgeries (a peer holding the key) need only be refused cleanly.

Deterministic by default (hypothesis derandomized, a fixed loop seed). For a longer hunt:
``DIRTYLOG_FUZZ_SECONDS=300 DIRTYLOG_FUZZ_SEED=$RANDOM pytest tests/migration/test_fuzz_stream.py``.
"""

from __future__ import annotations

import functools
import os
import random
import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dirtylog.migration.protocol.auth import frame_keys, frame_mac, root_key
from dirtylog.migration.protocol.codec import FRAME_HEADER, MAC_SIZE, FrameType
from dirtylog.migration.protocol.events import Codec
from tests.migration.protocol.recorded import KEY, Outcome, clean, recording, replay

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DIRECTIONS = st.sampled_from(["destination", "source"])
CODECS: list[Codec] = ["lz4", "zstd", "none"]


def stream(to: str, codec: Codec = "lz4") -> bytes:
    rec = recording(codec)
    return rec.to_destination if to == "destination" else rec.to_source


def parts(to: str, codec: Codec = "lz4") -> list[bytes]:
    rec = recording(codec)
    return rec.s2d if to == "destination" else rec.d2s


def chunked(data: bytes, sizes: list[int]) -> list[bytes]:
    """``data`` cut into pieces of the given sizes, cycling (one piece if no sizes)."""
    if not sizes:
        return [data]
    pieces, at, i = [], 0, 0
    while at < len(data):
        pieces.append(data[at : at + sizes[i % len(sizes)]])
        at += sizes[i % len(sizes)]
        i += 1
    return pieces


def mutate(data: bytes, op: str, pos: int, size: int, blob: bytes) -> bytes:
    """One byte-level mutation of the kinds a broken link or a meddler produces."""
    if not data:
        return blob
    pos %= len(data)
    if op == "flip":
        return data[:pos] + bytes([data[pos] ^ (1 << (size % 8))]) + data[pos + 1 :]
    if op == "set":
        return data[:pos] + bytes([size % 256]) + data[pos + 1 :]
    if op == "insert":
        return data[:pos] + blob + data[pos:]
    if op == "delete":
        return data[:pos] + data[pos + size :]
    if op == "truncate":
        return data[:pos]
    if op == "duplicate":
        return data[: pos + size] + data[pos : pos + size] + data[pos + size :]
    if op == "move":  # cut a chunk out and put it back further on
        chunk, rest = data[pos : pos + size], data[:pos] + data[pos + size :]
        at = (pos + size * 7) % (len(rest) + 1)
        return rest[:at] + chunk + rest[at:]
    raise AssertionError(op)


OPS = ["flip", "set", "insert", "delete", "truncate", "duplicate", "move"]
MUTATIONS = st.lists(
    st.tuples(st.sampled_from(OPS), st.integers(0, 1 << 20), st.integers(1, 64), st.binary(min_size=1, max_size=24)),
    min_size=1,
    max_size=3,
)


def check_byte_mutation(to: str, outcome: Outcome, codec: Codec = "lz4") -> None:
    """Tampering with bytes never gets an altered event through, and never completes a changed stream."""
    expected = clean(to, codec)
    assert outcome.events == expected[: len(outcome.events)], "a tampered stream delivered an altered event"
    if outcome.error is None:
        assert outcome.events == expected


@functools.cache
def keys() -> tuple[bytes, bytes]:
    """The recorded sessions' frame keys (source→destination, destination→source): the same nonces
    and the same HELLO and CHALLENGE for every codec, so the same keys."""
    rec = recording()
    return frame_keys(root_key(KEY), rec.s2d[0] + rec.d2s[0])


def sealed(to: str, ftype: int, payload: bytes, seq: int, flags: int = 0) -> bytes:
    """A frame with a valid MAC in the recorded session: what a peer holding the key could send."""
    head = FRAME_HEADER.pack(ftype, flags, 0, len(payload), seq)
    return head + payload + frame_mac(keys()[0 if to == "destination" else 1], seq, head + payload)


def handshake_units(to: str) -> int:
    return 2 if to == "destination" else 1


# -- hypothesis --------------------------------------------------------------------------------------


@FUZZ
@given(to=DIRECTIONS, data=st.binary(max_size=3000), sizes=st.lists(st.integers(1, 600), max_size=8))
def test_random_bytes(to: str, data: bytes, sizes: list[int]) -> None:
    assert replay(to, chunked(data, sizes)).error is not None or not data


@FUZZ
@given(to=DIRECTIONS, codec=st.sampled_from(CODECS), keep=st.integers(0, 1 << 20), tail=st.binary(max_size=2000))
def test_a_valid_prefix_then_random_bytes(to: str, codec: Codec, keep: int, tail: bytes) -> None:
    data = stream(to, codec)
    outcome = replay(to, [data[: keep % len(data)] + tail])
    check_byte_mutation(to, outcome, codec)


@FUZZ
@given(
    to=DIRECTIONS,
    codec=st.sampled_from(CODECS),
    mutations=MUTATIONS,
    sizes=st.lists(st.integers(1, 5000), max_size=6),
)
def test_mutated_streams(to: str, codec: Codec, mutations: list[tuple[str, int, int, bytes]], sizes: list[int]) -> None:
    data = stream(to, codec)
    for op, pos, size, blob in mutations:
        data = mutate(data, op, pos, size, blob)
    check_byte_mutation(to, replay(to, chunked(data, sizes)), codec)


@FUZZ
@given(to=DIRECTIONS, codec=st.sampled_from(CODECS), index=st.integers(0, 100), mutations=MUTATIONS)
def test_authentic_frames_with_mutated_payloads(
    to: str, codec: Codec, index: int, mutations: list[tuple[str, int, int, bytes]]
) -> None:
    """Structure-aware: a real frame's payload mutated and re-sealed, so it passes the MAC."""
    units = parts(to, codec)
    first = handshake_units(to)
    i = first + index % (len(units) - first)
    unit = units[i]
    ftype, _, _, length, seq = FRAME_HEADER.unpack_from(unit)
    payload = unit[FRAME_HEADER.size : FRAME_HEADER.size + length]
    for op, pos, size, blob in mutations:
        payload = mutate(payload, op, pos, size, blob)
    forged = sealed(to, ftype, payload, seq)
    replay(to, [*units[:i], forged, *units[i + 1 :]])


@FUZZ
@given(
    to=DIRECTIONS,
    index=st.integers(0, 100),
    ftype=st.sampled_from(list(FrameType)) | st.integers(0, 255),
    flags=st.sampled_from([0, 0, 0, 1, 0x80]),
    payload=st.binary(max_size=2000),
)
def test_authentic_frames_with_arbitrary_payloads(to: str, index: int, ftype: int, flags: int, payload: bytes) -> None:
    """A key holder sending any frame type with any payload, anywhere in the stream."""
    units = parts(to)
    first = handshake_units(to)
    i = first + index % (len(units) - first)
    seq = FRAME_HEADER.unpack_from(units[i])[4]
    replay(to, [*units[:i], sealed(to, ftype, payload, seq, flags), *units[i + 1 :]])


# -- a plain seeded mutation loop, on a time budget ----------------------------------------------------


def test_seeded_mutation_loop() -> None:
    seconds = float(os.environ.get("DIRTYLOG_FUZZ_SECONDS", "2.5"))
    rng = random.Random(int(os.environ.get("DIRTYLOG_FUZZ_SEED", "20240611")))
    deadline, runs, refused = time.monotonic() + seconds, 0, 0
    while time.monotonic() < deadline:
        to, codec = rng.choice(["destination", "source"]), rng.choice(CODECS)
        if rng.random() < 0.7:  # bytes damaged on the way: nothing altered may get through
            data = stream(to, codec)
            for _ in range(rng.randint(1, 4)):
                blob = rng.randbytes(rng.randint(1, 32))
                data = mutate(data, rng.choice(OPS), rng.randrange(1 << 20), rng.randint(1, 300), blob)
            sizes = [rng.randint(1, 9000) for _ in range(rng.randint(0, 5))]
            outcome = replay(to, chunked(data, sizes))
            check_byte_mutation(to, outcome, codec)
        else:  # a key holder's frame with a damaged payload: refused cleanly, whatever it says
            units = parts(to, codec)
            i = rng.randrange(handshake_units(to), len(units))
            ftype, _, _, length, seq = FRAME_HEADER.unpack_from(units[i])
            payload = units[i][FRAME_HEADER.size : FRAME_HEADER.size + length]
            for _ in range(rng.randint(1, 3)):
                payload = mutate(payload, rng.choice(OPS), rng.randrange(1 << 16), rng.randint(1, 16), b"\xff")
            outcome = replay(to, [*units[:i], sealed(to, ftype, payload, seq), *units[i + 1 :]])
        runs += 1
        refused += outcome.error is not None
    assert runs >= 100, f"only {runs} runs in {seconds} s"
    assert refused >= runs // 2  # most damage is refused; the rest was harmless (e.g. a re-sealed no-op)


def test_the_fuzzed_stream_is_the_real_thing() -> None:
    """The corpus covers every frame type a pre-copy migration sends (so mutations reach every decoder; post-copy's
    frames have their own corpus in test_postcopy_stream.py)."""
    seen = {FRAME_HEADER.unpack_from(u)[0] for to in ("destination", "source") for u in parts(to) if u[:1] != b"D"}
    postcopy = {FrameType.POSTCOPY_START, FrameType.PAGE_REQUEST, FrameType.POSTCOPY_PAGES, FrameType.MISSING}
    assert seen == set(FrameType) - {FrameType.ABORT} - postcopy
    assert all(len(u) >= FRAME_HEADER.size + MAC_SIZE for u in parts("destination")[2:])
