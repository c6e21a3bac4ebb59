"""dirtylog processes serving QMP, for tests that drive them with QEMU's own clients."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import ExecuteError
from qemu.qmp.legacy import QEMUMonitorProtocol

from dirtylog.control.json_stream import JsonStreamer
from dirtylog.control.monitor import Monitor
from dirtylog.machine import Machine
from dirtylog.migration.keys import generate_key_file
from tests.helpers import wait_for

DIRTYLOG = [sys.executable, "-m", "dirtylog"]


@dataclass
class Served:
    """A ``dirtylog ... --qmp`` process and the socket it serves."""

    process: subprocess.Popen[str]
    address: str  # unix:PATH
    stderr_path: Path  # a file rather than a pipe: nothing blocks on it, and it outlives the process

    @property
    def path(self) -> str:
        return self.address[5:]

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def finish(self, timeout: float = 30) -> list[dict[str, object]]:
        """Wait for the process to end (after quit); its remaining JSON lines."""
        out, _ = self.process.communicate(timeout=timeout)
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


class RawClient:
    """A QMP client with nothing in between: bytes out, parsed messages in."""

    def __init__(self, address: str) -> None:
        if address.startswith("unix:"):
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.connect(address[5:])
        else:
            host, port = address[4:].rsplit(":", 1)
            self.sock = socket.create_connection((host, int(port)))
        self.sock.settimeout(10)
        self.streamer = JsonStreamer()
        self.pending: list[Any] = []
        self.greeting = self.read()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read(self, *, events: bool = True) -> dict[str, Any]:
        """The next message (skipping events unless ``events``)."""
        while True:
            while not self.pending:
                data = self.sock.recv(1 << 16)
                assert data, "the server closed the connection"
                self.pending += self.streamer.feed(data)
            message = self.pending.pop(0)
            assert isinstance(message, dict)
            if events or "event" not in message:
                return message

    def ask(self, data: bytes) -> dict[str, Any]:
        """Send ``data``; the next message that is not an event."""
        self.send(data)
        return self.read(events=False)

    def negotiate(self) -> None:
        self.send(b'{"execute": "qmp_capabilities"}')
        assert self.read() == {"return": {}}

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def key_file(tmp_path: Path) -> str:
    return str(generate_key_file(tmp_path / "migration.key"))


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[object]:
    """``serve(name, *argv)`` starts ``dirtylog *argv --qmp unix:tmp/name.sock --json`` and waits until it listens."""
    started: list[Served] = []

    def start(name: str, *argv: str) -> Served:
        address = f"unix:{tmp_path / (name + '.sock')}"
        stderr_path = tmp_path / (name + ".stderr")
        with stderr_path.open("w") as stderr:
            process = subprocess.Popen([*DIRTYLOG, *argv, "--qmp", address, "--json"], stdout=subprocess.PIPE,
                                       stderr=stderr, text=True)
        served = Served(process, address, stderr_path)
        started.append(served)
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            process.wait(30)
            raise AssertionError(f"dirtylog {' '.join(argv)} ended before serving QMP: {served.stderr}")
        assert json.loads(line) == {"event": "listening", "qmp": address}
        return served

    yield start
    for served in started:
        if served.process.poll() not in (None, 0) or served.stderr.strip():
            # shown with the test's report when it fails: why a process ended early, or what it complained of
            print(f"--- {served.path} (exit {served.process.returncode}) stderr:\n{served.stderr}", file=sys.stderr)
        if served.process.poll() is None:
            served.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                served.process.wait(30)
        if served.process.poll() is None:
            served.process.kill()


Monitors = Callable[..., tuple[Monitor, QEMUMonitorProtocol]]


@pytest.fixture
def monitors(tmp_path: Path) -> Iterator[Monitors]:
    """``monitors(name, machine=..., ...)``: a started Monitor and a connected, negotiated client."""
    opened: list[tuple[Monitor, QEMUMonitorProtocol]] = []

    def open_(name: str, **kwargs: Any) -> tuple[Monitor, QEMUMonitorProtocol]:
        monitor = Monitor(f"unix:{tmp_path / (name + '.sock')}", **kwargs)
        monitor.start()
        client = QEMUMonitorProtocol(str(tmp_path / (name + ".sock")))
        client.connect()
        opened.append((monitor, client))
        return monitor, client

    yield open_
    for monitor, client in opened:
        with contextlib.suppress(EOFError, OSError):  # the monitor may have ended the session (quit)
            client.close()
        monitor.close()


def running_machine(memory: str = "128M", rate: int | None = 20000, workload: str = "random",
                    ring: bool = False) -> Machine:
    machine = Machine(memory, vcpus=2, workload=workload, rate=rate, dirty_ring=ring)  # type: ignore[arg-type]
    machine.start()
    wait_for(lambda: machine.progress > 2000, what="the guest to write")
    return machine


def error_of(client: QEMUMonitorProtocol, command: str, **arguments: Any) -> str:
    with pytest.raises(ExecuteError) as failure:
        client.cmd(command, **arguments)
    return str(failure.value)
