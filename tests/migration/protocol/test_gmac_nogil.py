"""The compiled frame MAC is the stream's own: byte for byte what ``auth.frame_mac`` computes, and it refuses a
frame with one bit changed."""

from __future__ import annotations

import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from dirtylog.migration.protocol import gmac_nogil
from dirtylog.migration.protocol.auth import frame_mac

pytestmark = pytest.mark.skipif(bool(gmac_nogil.UNAVAILABLE), reason=gmac_nogil.UNAVAILABLE or "available")


@njit(cache=True, nogil=True)
def _tag_and_check(key: np.ndarray, seq: int, frame: np.ndarray, length: int, tag: np.ndarray) -> tuple[bool, bool]:
    context = gmac_nogil.gmac_context(key)
    scratch = np.zeros(gmac_nogil.SCRATCH_SIZE, dtype=np.uint8)
    made = gmac_nogil.gmac(context, seq, frame.ctypes.data, length, tag.ctypes.data, scratch)
    verifies = gmac_nogil.gmac_verifies(context, seq, frame, length, scratch)
    gmac_nogil.gmac_free(context)
    return made, verifies


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=9000), st.integers(0, 2**63 - 1))  # int64 in compiled code: never reached
def test_the_compiled_gmac_is_frame_mac(data: bytes, seq: int) -> None:
    key = np.frombuffer(os.urandom(32), dtype=np.uint8).copy()
    frame = np.zeros(len(data) + 16, dtype=np.uint8)
    frame[:len(data)] = np.frombuffer(data, dtype=np.uint8)
    tag = np.zeros(16, dtype=np.uint8)
    made, verifies = _tag_and_check(key, seq, frame, len(data), tag)
    assert made and not verifies  # the frame's tag bytes are still zero
    assert tag.tobytes() == frame_mac(key.tobytes(), seq, data)
    frame[len(data):] = tag
    assert _tag_and_check(key, seq, frame, len(data), tag)[1]
    if data:
        frame[len(data) // 2] ^= 0x10
        assert not _tag_and_check(key, seq, frame, len(data), tag)[1]
        frame[len(data) // 2] ^= 0x10
    assert not _tag_and_check(key, seq ^ 1, frame, len(data), tag)[1]  # another frame's place: another nonce
