"""Pre-shared key files."""

from __future__ import annotations

import os
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
