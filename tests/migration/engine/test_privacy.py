"""Guest memory on the wire: encrypted whenever it leaves this host or when asked, in clear only when chosen."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dirtylog.machine import Machine
from dirtylog.migration import migrate, receive
from tests.helpers import wait_for
from tests.migration.engine.peers import Proxy, Receiver, start_receiver

pytestmark = pytest.mark.kvm

MARKER = b"dirtylog: this guest page is private"


def marked_source() -> Machine:
    source = Machine("64M", vcpus=1, workload="idle")
    area = source.memory[source.workload_pages.start * 4096:].reshape(-1, 4096)
    area[::97, 64:64 + len(MARKER)] = np.frombuffer(MARKER, dtype=np.uint8)
    source.start()
    return source


@pytest.mark.parametrize("encrypt", [True, False, None])
def test_what_crosses_the_wire(encrypt: bool | None, key_file: str, receivers: list[Receiver]) -> None:
    """Loopback is local, so without a choice the frames are only authenticated; asked, they are encrypted."""
    receiver = start_receiver(key_file)
    receivers.append(receiver)
    captured = bytearray()

    def capture(way: str, at: int, chunk: bytes) -> bytes:
        if way == "up":
            captured.extend(chunk)
        return chunk

    proxy = Proxy(receiver.address, capture).start()
    with marked_source() as source:
        try:
            stats = migrate(source, proxy.address, key_file=key_file, downtime_limit="100ms", encrypt=encrypt)
        finally:
            proxy.close()
        receiver.join()
        assert receiver.error is None and receiver.result is not None
        assert np.array_equal(receiver.memory_at_resume, source.memory)
        assert stats.encrypted is bool(encrypt) and receiver.result.stats.encrypted is bool(encrypt)
    assert len(captured) > 160 * 4096  # the marked pages went (the zero pages were elided)
    assert (MARKER in captured) is not bool(encrypt)


def test_a_stream_file_is_encrypted_at_rest_and_loads(key_file: str, tmp_path: Path) -> None:
    path = tmp_path / "vm.stream"
    with marked_source() as source:
        stats = migrate(source, f"file:{path}", key_file=key_file, downtime_limit="100ms")
        assert stats.encrypted
        assert MARKER not in path.read_bytes()
        kept: dict[str, np.ndarray] = {}
        received = receive(f"file:{path}", key_file=key_file,
                           before_resume=lambda machine: kept.setdefault("memory", machine.memory.copy()))
        with received.machine:
            assert np.array_equal(kept["memory"], source.memory)
            wait_for(lambda: received.machine.state.value == "running", what="the loaded VM to run")
