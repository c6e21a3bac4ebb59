"""Migrations over a Unix socket and through a file, end to end on real KVM."""

from __future__ import annotations

import resource
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dirtylog.guest.machine import State
from dirtylog.machine import Machine
from dirtylog.migration import MigrationError, MigrationStatus, migrate, receive
from dirtylog.migration.keys import generate_key_file
from tests.helpers import wait_for
from tests.migration.engine.peers import Receiver, start_receiver

pytestmark = pytest.mark.kvm


def writing_source(rate: int | None = 20_000) -> Machine:
    source = Machine("64M", vcpus=2, workload="random", rate=rate)
    source.start()
    wait_for(lambda: source.progress > 2000, what="the guest to write")
    return source


def test_a_migration_over_a_unix_socket(key_file: str, tmp_path: Path, receivers: list[Receiver]) -> None:
    receiver = start_receiver(key_file, listen=f"unix:{tmp_path / 'dest.sock'}")
    receivers.append(receiver)
    with writing_source() as source:
        stats = migrate(source, f"unix:{tmp_path / 'dest.sock'}", key_file=key_file, downtime_limit="100ms")
        receiver.join()
        assert receiver.error is None and receiver.result is not None
        assert stats.status is MigrationStatus.COMPLETED and source.state is State.HANDED_OFF
        assert np.array_equal(receiver.memory_at_resume, source.memory)


def load(path: Path, key_file: str) -> tuple[Machine, Any]:
    """Load a stream file into a new machine; the machine and its memory at resume."""
    kept: dict[str, Any] = {}
    received = receive(f"file:{path}", key_file=key_file,
                       before_resume=lambda machine: kept.setdefault("memory", machine.memory.copy()))
    return received.machine, kept["memory"]


def test_a_stream_written_to_a_file_loads_byte_exact_into_a_new_machine(key_file: str, tmp_path: Path) -> None:
    path = tmp_path / "vm.stream"
    with writing_source() as source:
        stats = migrate(source, f"file:{path}", key_file=key_file, downtime_limit="100ms")
        assert stats.status is MigrationStatus.COMPLETED and path.is_file()
        assert source.state is State.PAUSED  # nobody took the VM over: it may go on here
        paused_at = source.vcpu_progress
        machine, memory = load(path, key_file)
        with machine:
            assert np.array_equal(memory, source.memory)  # byte for byte, as at the pause
            wait_for(lambda: all(a > b for a, b in zip(machine.vcpu_progress, paused_at, strict=True)),
                     what="the loaded guest to continue")
        source.resume()  # and the original too
        wait_for(lambda: source.progress > sum(paused_at), what="the source to continue")
        machine2, memory2 = load(path, key_file)  # a file loads as often as you like
        with machine2:
            assert np.array_equal(memory2, memory)


@pytest.fixture
def file_size_limit() -> Iterator[int]:
    """Writes past 4 MiB fail with EFBIG in this process, as on a full disk (SIGXFSZ ignored, limit restored)."""
    limit = 4 << 20
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        yield limit
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_a_migration_to_a_full_disk_fails_keeps_the_source_and_leaves_no_file(key_file: str, tmp_path: Path,
                                                                             file_size_limit: int) -> None:
    path = tmp_path / "vm.stream"
    with writing_source() as source:
        source.memory[source.workload_pages.start * 4096:][:8 << 20] = 1  # 8 MiB to send: past the limit
        with pytest.raises(MigrationError, match=r"File too large.*the source keeps running"):
            migrate(source, f"file:{path}", key_file=key_file, downtime_limit="100ms")
        assert source.state is State.RUNNING
        assert not path.exists() and not Path(f"{path}.partial").exists()


def test_a_file_altered_or_read_with_another_key_is_refused_and_nothing_runs(key_file: str, tmp_path: Path) -> None:
    path = tmp_path / "vm.stream"
    with writing_source() as source:
        migrate(source, f"file:{path}", key_file=key_file, downtime_limit="100ms")
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # somewhere in the page data
    (tmp_path / "tampered.stream").write_bytes(bytes(data))
    with pytest.raises(MigrationError, match=r"failed authentication.*nothing was resumed here"):
        receive(f"file:{tmp_path / 'tampered.stream'}", key_file=key_file)
    (tmp_path / "cut.stream").write_bytes(path.read_bytes()[: len(data) // 3])
    with pytest.raises(MigrationError, match=r"truncated.*nothing was resumed here"):
        receive(f"file:{tmp_path / 'cut.stream'}", key_file=key_file)
    other = str(generate_key_file(tmp_path / "other.key"))
    with pytest.raises(MigrationError, match=r"key does not match.*nothing was resumed here"):
        receive(f"file:{path}", key_file=other)
