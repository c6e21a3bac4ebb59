"""Frame MACs from compiled code: AES-256-GMAC through OpenSSL's EVP calls, made by Numba ``nogil`` code.

The post-copy fault path runs compiled on both ends (``engine/fault_lanes.py``), never taking the GIL, and its
frames are the stream's own: each needs the GMAC that :func:`dirtylog.migration.protocol.auth.frame_mac` computes
(AES-256-GCM with the frame as associated data and nothing encrypted, the sequence number as the 12-byte
little-endian nonce, a 16-byte tag). PyCA's ``cryptography`` cannot be called without the GIL, so this module
calls the same library underneath, the system's ``libcrypto`` (OpenSSL 3), by symbol name: Numba links the calls
by name, so the compiled code is cached on disk like any other. A host without ``libcrypto.so.3`` has no compiled
MACs (:data:`UNAVAILABLE`); the fault path then stays in Python, as before.

These functions run inside compiled code only: ``context`` is an ``EVP_CIPHER_CTX`` made for one key by
:func:`gmac_context` and freed by :func:`gmac_free` in the same compiled call.
"""

from __future__ import annotations

import ctypes.util
from typing import Any, Final

import llvmlite.binding
import numpy as np
from numba import njit, types

from dirtylog.migration.protocol.codec import MAC_SIZE

_LIBRARY: Final = ctypes.util.find_library("crypto")
#: Why compiled MACs are not available here ("" when they are).
UNAVAILABLE: str = ""
try:
    if _LIBRARY is None:
        raise OSError("no libcrypto (OpenSSL) found")
    llvmlite.binding.load_library_permanently(_LIBRARY)
except (OSError, RuntimeError) as error:
    UNAVAILABLE = f"compiled frame MACs need OpenSSL's libcrypto: {error}"

_voidptr = types.voidptr
_int32 = types.int32
_ctx_new: Any = types.ExternalFunction("EVP_CIPHER_CTX_new", _voidptr())
_ctx_free: Any = types.ExternalFunction("EVP_CIPHER_CTX_free", types.void(_voidptr))
_aes_256_gcm: Any = types.ExternalFunction("EVP_aes_256_gcm", _voidptr())
_init: Any = types.ExternalFunction("EVP_EncryptInit_ex", _int32(_voidptr, _voidptr, _voidptr, _voidptr, _voidptr))
_update: Any = types.ExternalFunction("EVP_EncryptUpdate", _int32(_voidptr, _voidptr, _voidptr, _voidptr, _int32))
_final: Any = types.ExternalFunction("EVP_EncryptFinal_ex", _int32(_voidptr, _voidptr, _voidptr))
_ctrl: Any = types.ExternalFunction("EVP_CIPHER_CTX_ctrl", _int32(_voidptr, _int32, _int32, _voidptr))
_GCM_GET_TAG: Final = 0x10  # EVP_CTRL_GCM_GET_TAG (EVP_CTRL_AEAD_GET_TAG)
_NULL: Final = 0
#: Bytes of scratch the calls below need (uint8): the 12-byte nonce, an output length, the expected tag.
SCRATCH_SIZE: Final = 48
_TAG_AT: Final = 32


@njit(cache=True, nogil=True)
def gmac_context(key: np.ndarray) -> Any:
    """An AES-256-GCM context holding ``key`` (32 bytes), its schedule computed once. (Only a failed allocation
    makes OpenSSL refuse it; :func:`gmac` then fails, and says so.)"""
    context = _ctx_new()
    _init(context, _aes_256_gcm(), _NULL, key.ctypes.data, _NULL)
    return context


@njit(cache=True, nogil=True)
def gmac_free(context: Any) -> None:
    """Free a context of :func:`gmac_context`."""
    _ctx_free(context)


@njit(cache=True, nogil=True)
def gmac(context: Any, seq: int, address: int, length: int, tag: int, scratch: np.ndarray) -> bool:
    """Write the 16-byte GMAC of frame ``seq`` (``length`` bytes at ``address``: header and payload) to ``tag``;
    False if OpenSSL failed. ``scratch``: its first 24 bytes are used (uint8)."""
    nonce = scratch[:12]
    value = seq
    for i in range(8):  # the sequence number, little-endian, in a 12-byte nonce
        nonce[i] = value & 0xFF
        value >>= 8
    for i in range(8, 12):
        nonce[i] = 0
    written = scratch[16:20].view(np.int32)
    if _init(context, _NULL, _NULL, _NULL, nonce.ctypes.data) != 1:
        return False
    if length and _update(context, _NULL, written.ctypes.data, address, length) != 1:
        return False
    if _final(context, _NULL, written.ctypes.data) != 1:
        return False
    done: bool = _ctrl(context, _GCM_GET_TAG, MAC_SIZE, tag) == 1
    return done


@njit(cache=True, nogil=True)
def gmac_verifies(context: Any, seq: int, frame: np.ndarray, length: int, scratch: np.ndarray) -> bool:
    """Whether ``frame`` (uint8: ``length`` bytes of header and payload, then the 16-byte tag) carries the GMAC of
    frame ``seq``; compared in constant time. ``scratch``: SCRATCH_SIZE bytes (uint8)."""
    expected = scratch[_TAG_AT:_TAG_AT + MAC_SIZE]
    if not gmac(context, seq, frame.ctypes.data, length, expected.ctypes.data, scratch):
        return False
    difference = 0
    for i in range(MAC_SIZE):
        difference |= expected[i] ^ frame[length + i]
    return difference == 0
