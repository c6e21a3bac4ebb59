"""Pre-shared key files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from dirtylog.migration.keys import KeyFileError, generate_key_file, load_key


def test_key_files_round_trip_and_refuse_bad_ones(tmp_path: Path) -> None:
    path = generate_key_file(tmp_path / "k")
    assert len(load_key(path)) == 32
    assert load_key(generate_key_file(tmp_path / "k2")) != load_key(path)
    (tmp_path / "bad").write_text("not a key\n")
    os.chmod(tmp_path / "bad", 0o600)
    with pytest.raises(KeyFileError, match="not a dirtylog key file"):
        load_key(tmp_path / "bad")
    os.chmod(path, 0o640)
    with pytest.raises(KeyFileError, match="accessible by other users"):
        load_key(path)


def test_force_replaces_a_symbolic_link_itself_never_its_target(tmp_path: Path) -> None:
    precious = tmp_path / "precious"
    precious.write_text("someone's data\n")
    os.chmod(precious, 0o644)
    link = tmp_path / "migration.key"
    link.symlink_to(precious)
    with pytest.raises(KeyFileError, match="already exists"):
        generate_key_file(link)
    generate_key_file(link, overwrite=True)
    assert precious.read_text() == "someone's data\n" and stat.S_IMODE(precious.stat().st_mode) == 0o644
    assert not link.is_symlink() and len(load_key(link)) == 32


def write_key_file(path: Path, content: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(content)
    os.chmod(path, mode)
    return path


@pytest.mark.parametrize(("content", "message"), [
    (b"\x00\xff" * 40, "it holds binary data"),
    (b"dirtylog-psk-v1 " + b"00" * 32 + b"\n", "16 distinct|1 distinct byte values: not a random key"),
    (b"dirtylog-psk-v1 " + b"0102" * 16 + b"\n", "2 distinct byte values"),
    (b"dirtylog-psk-v1 zz\n", "holds no valid hex key"),
    (b"dirtylog-psk-v1 abcd\n", "holds 2 bytes of key, not 32"),
])
def test_a_key_that_is_not_a_random_key_file_is_refused(tmp_path: Path, content: bytes, message: str) -> None:
    with pytest.raises(KeyFileError, match=message):
        load_key(write_key_file(tmp_path / "k", content))


def test_a_key_file_of_another_user_is_refused(tmp_path: Path) -> None:
    path = generate_key_file(tmp_path / "k")
    if os.getuid() != 0:
        pytest.skip("only root can give a file to another user to show this")
    os.chown(path, 4242, -1)
    with pytest.raises(KeyFileError, match="belongs to user 4242, not to you"):
        load_key(path)


def test_a_directory_is_not_a_key_file(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir(mode=0o700)
    with pytest.raises(KeyFileError, match="not a regular file"):
        load_key(tmp_path / "dir")
