"""QEMU itself as the oracle: the same bytes sent to a real QEMU's QMP socket and to dirtylog's get the same
answers, byte-for-byte in content (class, description, id), for everything that does not depend on the VM.

QEMU runs with ``-machine none -S`` (no guest, no KVM needed); dirtylog's monitor has no machine either,
which QMP calls ``prelaunch``. Skipped where ``qemu-system-x86_64`` is not installed (Debian:
``apt-get install -y qemu-system-x86``).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dirtylog.control.monitor import Monitor
from tests.control.conftest import RawClient

QEMU = shutil.which("qemu-system-x86_64")
pytestmark = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed "
                                "(apt-get install -y qemu-system-x86)")

# Input that QEMU and dirtylog must answer alike, from before negotiation to after it. Migration arguments
# stay within what QEMU 7.2 (Debian 12) and 9.x agree on.
NEGOTIATION = [
    b'{"execute": "query-status"}',
    b'{"execute": "qmp_capabilities", "arguments": {"enable": ["warp"]}}',
    b'{"execute": "qmp_capabilities", "arguments": {"x": 1}}',
    b'{"execute": "qmp_capabilities", "id": "n"}',
]
COMMAND_MODE = [
    b'{"execute": "qmp_capabilities", "id": 1}',
    b'{"execute": "query-status",}',
    b"}",
    b"[]",
    b'"query-status"',
    b"42 ",
    b'{"arguments": {}}',
    b'{"execute": 1, "id": 3}',
    b'{"execute": "stop", "arguments": [], "id": 3}',
    b'{"execute": "stop", "cookie": 1, "id": 4}',
    b'{"execute": "stop", "arguments": {"now": true}, "id": 5}',
    b'{"execute": "cont", "arguments": {"x": 1}, "id": 17}',
    b'{"execute": "no-such-command", "id": 6}',
    b'{"exec-oob": "migrate-pause", "id": 18}',
    b'{"execute": "migrate", "arguments": {"uri": 4444}, "id": 7}',
    b'{"execute": "migrate-set-parameters", "arguments": {"downtime-limit": "50ms"}, "id": 8}',
    b'{"execute": "migrate-set-parameters", "arguments": {"multifd-channels": 300}, "id": 9}',
    b'{"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": -1.5}, "id": 9.5}',
    b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "turbo", "state": true}]}, '
    b'"id": 10}',
    b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "events", "state": 1}]}, '
    b'"id": 11}',
    b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "events"}]}, "id": 12}',
    b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "events", "state": true, '
    b'"x": 1}]}, "id": 13}',
    b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities": {}}, "id": 13.5}',
    b'{"execute": "query-migrate", "id": 15}',
    b'{"execute": "migrate_cancel", "id": [1, {"a": null}]}',
    b'{"execute": @}',
    b"[1 2]",
    b'{"a": 1, "a": 2}',
    b'{"a" 1}',
    b"[tru]",
    b'["\\x"]',
    b'["\\ud800"]',
    b"{'execute': 'no-such-command', 'id': 'it\\'s'}",
    b"\x01",
    b'{"execute": "migrate_cancel", "id": null}',
    b'{"execute": "stop", "arguments": {"a": [' + b"[" * 1030 + b"]" * 1030 + b"]}}",
    b'{"execute": "stop", "arguments": {\x01"x": 1}}',
    b'{"execute": "stop", "id": "\xff"}',
    b'["' + b"x" * 2000 + b'", ' + b"y" * 2000 + b"]",  # a parser message longer than QEMU's buffer
    # (Messages over QEMU's 64 MiB limit were compared by hand: the same answers, the same resynchronization,
    # but QEMU takes about two minutes to lex 65 MiB, too long for the suite; test_server covers ours.)
]


@pytest.fixture
def qemu(tmp_path: Path) -> Iterator[str]:
    assert QEMU is not None
    socket_path = tmp_path / "qemu.sock"
    process = subprocess.Popen([QEMU, "-machine", "none", "-nodefaults", "-display", "none", "-S",
                                "-qmp", f"unix:{socket_path},server=on,wait=off"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not socket_path.exists():
        assert process.poll() is None, process.stderr.read() if process.stderr else ""
        assert time.monotonic() < deadline, "QEMU did not create its QMP socket"
        time.sleep(0.02)
    yield f"unix:{socket_path}"
    process.kill()
    process.wait(10)


@pytest.fixture
def dirtylog(tmp_path: Path) -> Iterator[str]:
    monitor = Monitor(f"unix:{tmp_path / 'dirtylog.sock'}", machine=None)
    monitor.start()
    yield monitor.address
    monitor.request_shutdown(None)
    monitor.close()


def answers(address: str, inputs: list[bytes]) -> list[list[dict[str, Any]]]:
    """What the server says to each input: every message until a marker request's answer comes back."""
    client = RawClient(address)
    out = []
    for index, data in enumerate(inputs):
        client.send(data + b"\n")
        marker = f"marker-{index}"
        # A request that always fails the same way, whatever the mode: it closes this input's answers.
        client.send(b'{"execute": "no-such-marker", "id": "' + marker.encode() + b'"}\n')
        got = []
        while (message := client.read(events=False)).get("id") != marker:
            got.append(message)
        out.append(got)
    client.close()
    return out


def test_qemu_and_dirtylog_answer_the_same_bytes_alike(qemu: str, dirtylog: str) -> None:
    inputs = NEGOTIATION + COMMAND_MODE
    theirs, ours = answers(qemu, inputs), answers(dirtylog, inputs)
    for data, their, our in zip(inputs, theirs, ours, strict=True):
        assert our == their, f"{data!r}: QEMU said {their}, dirtylog {our}"


def test_the_greeting_has_qemus_shape(qemu: str, dirtylog: str) -> None:
    theirs, ours = RawClient(qemu).greeting, RawClient(dirtylog).greeting
    assert set(ours) == set(theirs) == {"QMP"}
    assert set(ours["QMP"]) == set(theirs["QMP"]) == {"version", "capabilities"}
    assert set(ours["QMP"]["version"]) == set(theirs["QMP"]["version"]) == {"qemu", "package"}
    assert set(ours["QMP"]["version"]["qemu"]) == set(theirs["QMP"]["version"]["qemu"]) == {"major", "minor", "micro"}
