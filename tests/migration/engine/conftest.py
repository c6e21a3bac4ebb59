"""Fixtures of the migration engine tests: a key file, and the receivers a test starts (stopped after it)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from dirtylog.migration.keys import generate_key_file
from tests.migration.engine.peers import Receiver


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    return str(generate_key_file(tmp_path / "migration.key"))


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    """Receivers a test started; their machines are stopped afterwards."""
    started: list[Receiver] = []
    yield started
    for receiver in started:
        if receiver.thread is not None:
            receiver.thread.join(30)
        if receiver.result is not None:
            receiver.result.machine.stop()
