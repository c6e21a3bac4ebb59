"""Pre-shared key files: ``dirtylog keygen F`` writes one, both ends of a migration read the same one.

The file is a line ``dirtylog-psk-v1 <64 hex digits>`` (32 random bytes), mode 0600. Like ssh with its
private keys, a key file that others can read, or that another user owns, is refused: anyone who can read
it can take part in, or take over, a migration. The checks are made on the file as opened (``fstat``), so
the file cannot be swapped between the check and the read; and a new key is written to a fresh file and
renamed into place, so ``--force`` replaces a symbolic link itself, never the file it points to.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

from dirtylog.errors import DirtylogError

KEY_BYTES = 32
MIN_DISTINCT_BYTES = 12  # 32 random bytes have ~30 distinct values; fewer than 12 is no random key
_PREFIX = "dirtylog-psk-v1"
_MAX_FILE = 4096


class KeyFileError(DirtylogError):
    """A key file that is missing, unreadable, malformed, weak or too open."""


def generate_key_file(path: str | Path, *, overwrite: bool = False) -> Path:
    """Write a fresh random key to ``path`` with mode 0600; refuse to replace one unless ``overwrite``."""
    target = Path(path)
    if not overwrite and (target.exists() or target.is_symlink()):
        raise KeyFileError(f"{target} already exists; keep using it, or pass --force to replace it")
    text = f"{_PREFIX} {secrets.token_hex(KEY_BYTES)}\n"
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.new")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise KeyFileError(f"cannot create key file {target}: {error.strerror}") from None
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        if not overwrite:
            os.link(temporary, target)  # fails if the name appeared meanwhile: never replace what is there
        else:
            os.replace(temporary, target)  # replaces a symbolic link itself, not what it points to
    except FileExistsError:
        raise KeyFileError(f"{target} already exists; keep using it, or pass --force to replace it") from None
    except OSError as error:
        raise KeyFileError(f"cannot create key file {target}: {error.strerror}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    return target


def load_key(path: str | Path) -> bytes:
    """The key in ``path``: a regular file of ours, not readable by others, written by keygen, random."""
    source = Path(path)
    try:
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise KeyFileError(f"key file {source} does not exist; create one with `dirtylog keygen {source}` "
                           "and copy it to both hosts") from None
    except OSError as error:
        raise KeyFileError(f"cannot read key file {source}: {error.strerror}") from None
    try:
        info = os.fstat(fd)  # the file we read, not whatever the name points to later
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"key file {source} is not a regular file")
        if info.st_uid not in (os.getuid(), 0):
            raise KeyFileError(f"key file {source} belongs to user {info.st_uid}, not to you: another user could "
                               "have written it; make your own with `dirtylog keygen`")
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeyFileError(f"key file {source} is accessible by other users (mode {stat.S_IMODE(info.st_mode):o}); "
                               f"run `chmod 600 {source}`")
        raw = os.read(fd, _MAX_FILE + 1)
    finally:
        os.close(fd)
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise KeyFileError(f"{source} is not a dirtylog key file (it holds binary data); create one with "
                           "`dirtylog keygen`") from None
    parts = text.split()
    if len(raw) > _MAX_FILE or len(parts) != 2 or parts[0] != _PREFIX:
        raise KeyFileError(f"{source} is not a dirtylog key file (expected '{_PREFIX} <hex>'); "
                           f"create one with `dirtylog keygen`")
    try:
        key = bytes.fromhex(parts[1])
    except ValueError:
        raise KeyFileError(f"key file {source} holds no valid hex key") from None
    if len(key) != KEY_BYTES:
        raise KeyFileError(f"key file {source} holds {len(key)} bytes of key, not {KEY_BYTES}")
    if len(set(key)) < MIN_DISTINCT_BYTES:
        raise KeyFileError(f"key file {source} holds a key with {len(set(key))} distinct byte values: not a random "
                           "key (all zeroes, or typed by hand); make one with `dirtylog keygen`")
    return key
