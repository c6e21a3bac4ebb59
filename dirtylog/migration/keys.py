"""Pre-shared key files: ``dirtylog keygen F`` writes one, both ends of a migration read the same one.

The file is a line ``dirtylog-psk-v1 <64 hex digits>`` (32 random bytes), mode 0600. Like ssh with its
private keys, a key file that others can read is refused: anyone who can read it can take part in, or
take over, a migration.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from dirtylog.errors import DirtylogError

KEY_BYTES = 32
_PREFIX = "dirtylog-psk-v1"


class KeyFileError(DirtylogError):
    """A key file that is missing, unreadable, malformed or too open."""


def generate_key_file(path: str | Path, *, overwrite: bool = False) -> Path:
    """Write a fresh random key to ``path`` with mode 0600; refuse to replace one unless ``overwrite``."""
    target = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(target, flags, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{target} already exists; keep using it, or pass --force to replace it") from None
    except OSError as error:
        raise KeyFileError(f"cannot create key file {target}: {error.strerror}") from None
    with os.fdopen(fd, "w") as file:
        os.fchmod(file.fileno(), 0o600)
        file.write(f"{_PREFIX} {secrets.token_hex(KEY_BYTES)}\n")
    return target


def load_key(path: str | Path) -> bytes:
    """The key in ``path``; refuses files others can read and files not written by keygen."""
    source = Path(path)
    try:
        mode = source.stat().st_mode
        text = source.read_text()
    except FileNotFoundError:
        raise KeyFileError(f"key file {source} does not exist; create one with `dirtylog keygen {source}` "
                           "and copy it to both hosts") from None
    except OSError as error:
        raise KeyFileError(f"cannot read key file {source}: {error.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"key file {source} is accessible by other users (mode {stat.S_IMODE(mode):o}); "
                           f"run `chmod 600 {source}`")
    parts = text.split()
    if len(parts) != 2 or parts[0] != _PREFIX:
        raise KeyFileError(f"{source} is not a dirtylog key file (expected '{_PREFIX} <hex>'); "
                           f"create one with `dirtylog keygen`")
    try:
        key = bytes.fromhex(parts[1])
    except ValueError:
        raise KeyFileError(f"key file {source} holds no valid hex key") from None
    if len(key) != KEY_BYTES:
        raise KeyFileError(f"key file {source} holds {len(key)} bytes of key, not {KEY_BYTES}")
    return key
