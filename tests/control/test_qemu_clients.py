"""dirtylog machines driven by clients written for QEMU: the ``qemu.qmp`` library's QMPClient and its
qmp-shell migrate a VM between two ``dirtylog ... --qmp`` processes on real KVM; a raw socket feeds a
running machine every kind of bad input, and the VM keeps running."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

from tests.control.conftest import RawClient, Served

pytestmark = pytest.mark.kvm

Serve = Callable[..., Served]
GUEST = ["--memory", "128M", "--vcpus", "2", "--workload", "random", "--rate", "20000"]


def names(events: list[Any]) -> list[str]:
    return [event["event"] for event in events]


def drain(listener: EventListener) -> list[Any]:
    return listener.clear()


async def migrate_with_qmp_client(source_path: str, destination_path: str, key_file: str) -> dict[str, Any]:
    source, destination = QMPClient("source"), QMPClient("destination")
    await source.connect(source_path)
    await destination.connect(destination_path)
    source_events, destination_events = EventListener(), EventListener()
    source.register_listener(source_events)
    destination.register_listener(destination_events)
    seen: dict[str, Any] = {}

    assert await destination.execute("query-status") == {"running": False, "status": "inmigrate"}
    await destination.execute("migrate-set-parameters", {"x-dirtylog-key-file": key_file})
    await destination.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    await destination.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    incoming = await destination.execute("query-migrate")
    assert isinstance(incoming, dict) and incoming["status"] == "setup"
    port = incoming["socket-address"][0]["port"]

    assert await source.execute("query-status") == {"running": True, "status": "running"}
    await source.execute("migrate-set-capabilities", {"capabilities": [{"capability": "events", "state": True}]})
    # Slow enough that query-migrate is seen mid-flight; raised to unlimited once it has been.
    await source.execute("migrate-set-parameters", {"downtime-limit": 100, "max-bandwidth": 48 << 20})
    parameters = await source.execute("query-migrate-parameters")
    assert isinstance(parameters, dict)
    assert (parameters["downtime-limit"], parameters["max-bandwidth"]) == (100, 48 << 20)
    assert await source.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"}) == {}
    try:
        await source.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
        raise AssertionError("a second migrate was accepted")
    except ExecuteError as error:
        assert error.error_class == "GenericError" and str(error) == "There's a migration process in progress"

    transferred: list[int] = []
    deadline = time.monotonic() + 120
    while True:
        info = await source.execute("query-migrate")
        assert isinstance(info, dict)
        if info["status"] == "active" and "ram" in info:
            transferred.append(info["ram"]["transferred"])
            assert info["ram"]["total"] == 128 << 20 and "expected-downtime" in info
            if len(transferred) == 3:
                await source.execute("migrate-set-parameters", {"max-bandwidth": 0})
        if info["status"] in ("completed", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, info
        await asyncio.sleep(0.05)
    seen["transferred"] = transferred
    seen["info"] = info
    seen["source-status"] = await source.execute("query-status")
    seen["destination-status"] = await destination.execute("query-status")
    first = await destination.execute("x-dirtylog-query-progress")
    await asyncio.sleep(0.3)
    seen["destination-progress"] = (first, await destination.execute("x-dirtylog-query-progress"))
    seen["destination-migrate"] = await destination.execute("query-migrate")
    await asyncio.sleep(0.1)  # let the last events arrive
    seen["source-events"] = drain(source_events)
    seen["destination-events"] = drain(destination_events)
    for client, events in ((source, source_events), (destination, destination_events)):
        await client.execute("quit")
        shutdown = await asyncio.wait_for(events.get(), 10)
        seen.setdefault("shutdowns", []).append(dict(shutdown))
        with contextlib.suppress(EOFError):  # the server hung up first, as QEMU does after quit (qemu.machine
            await client.disconnect()        # expects this EOF too)
    return seen


def test_qemu_qmp_client_migrates_a_vm_between_two_dirtylog_processes(serve: Serve, key_file: str) -> None:
    source = serve("source", "run", *GUEST, "--key-file", key_file)
    destination = serve("destination", "receive", "--memory", "128M")
    seen = asyncio.run(migrate_with_qmp_client(source.path, destination.path, key_file))

    info = seen["info"]
    assert info["status"] == "completed", info.get("error-desc")
    assert info["downtime"] > 0 and info["total-time"] >= info["setup-time"] > 0
    assert info["ram"]["remaining"] == 0 and info["ram"]["dirty-sync-count"] >= 2
    assert info["ram"]["normal-bytes"] == info["ram"]["normal"] * 4096
    # query-migrate moved while the migration ran, not only at its end
    moving = seen["transferred"]
    assert len(moving) >= 3 and moving == sorted(moving) and moving[0] < moving[-1] <= info["ram"]["transferred"]
    assert seen["source-status"] == {"running": False, "status": "postmigrate"}
    assert seen["destination-status"] == {"running": True, "status": "running"}
    before, after = seen["destination-progress"]
    assert after["progress"] > before["progress"], "the migrated guest does not run"
    assert seen["destination-migrate"]["status"] == "completed"

    source_events = seen["source-events"]
    statuses = [e["data"]["status"] for e in source_events if e["event"] == "MIGRATION"]
    assert statuses == ["setup", "active", "completed"]
    passes = [e["data"]["pass"] for e in source_events if e["event"] == "MIGRATION_PASS"]
    assert passes == list(range(1, len(passes) + 1)) and passes[-1] == info["ram"]["dirty-sync-count"]
    assert names(source_events).index("STOP") < names(source_events).index("MIGRATION", 2)
    for event in source_events:
        assert set(event["timestamp"]) == {"seconds", "microseconds"}
    destination_events = seen["destination-events"]
    assert [e["data"]["status"] for e in destination_events if e["event"] == "MIGRATION"] == \
        ["setup", "active", "completed"]
    assert "RESUME" in names(destination_events)
    assert [s["data"] for s in seen["shutdowns"]] == [{"guest": False, "reason": "host-qmp-quit"}] * 2

    assert source.finish()[-1]["vm"] == "postmigrate" and source.process.returncode == 0
    assert destination.finish()[-1]["vm"] == "running" and destination.process.returncode == 0


class Shell:
    """QEMU's qmp-shell on a socket, fed one line at a time as a person would type it."""

    def __init__(self, path: str) -> None:
        executable = shutil.which("qmp-shell") or os.path.join(os.path.dirname(sys.executable), "qmp-shell")
        self.process = subprocess.Popen([executable, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, "PYTHONUNBUFFERED": "1", "HOME": os.path.dirname(path)})
        self.banner = [self._line(), self._line()]

    def _line(self) -> str:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, "qmp-shell ended"
        return line

    def __call__(self, command: str) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        while True:
            line = self._line()
            if "{" in line:  # the prompt "(QEMU) " precedes the answer on the same line
                return json.loads(line[line.index("{"):])

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(10)


def test_qmp_shell_migrates_a_vm_between_two_dirtylog_processes(serve: Serve, key_file: str) -> None:
    source = serve("source", "run", *GUEST)
    destination = serve("destination", "receive", "--key-file", key_file)
    src, dst = Shell(source.path), Shell(destination.path)
    assert src.banner[1].strip() == "Connected to QEMU 0.1.0"

    assert dst("migrate-incoming uri=tcp:127.0.0.1:0") == {"return": {}}
    port = dst("query-migrate")["return"]["socket-address"][0]["port"]
    failed = src(f"migrate uri=tcp:127.0.0.1:{port}")
    assert "x-dirtylog-key-file" in failed["error"]["desc"]  # the key was not given to the source yet
    assert src(f"migrate-set-parameters x-dirtylog-key-file={key_file} downtime-limit=100 max-bandwidth=0") == \
        {"return": {}}
    assert src(f"migrate uri=tcp:127.0.0.1:{port}") == {"return": {}}
    deadline = time.monotonic() + 120
    while (info := src("query-migrate")["return"])["status"] not in ("completed", "failed", "cancelled"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert info["status"] == "completed", info
    assert dst("query-status") == {"return": {"running": True, "status": "running"}}
    assert src("query-status") == {"return": {"running": False, "status": "postmigrate"}}
    assert src("cont")["error"]["desc"].startswith("this machine was migrated to")
    for shell in (src, dst):
        assert shell("quit") == {"return": {}}
        shell.close()
    assert source.finish()[-1]["reason"] == "host-qmp-quit"
    assert destination.finish()[-1]["reason"] == "host-qmp-quit"


def progress(client: RawClient) -> int:
    return int(client.ask(b'{"execute": "x-dirtylog-query-progress"}')["return"]["progress"])


def test_bad_input_gets_qemus_answers_and_the_vm_keeps_running(serve: Serve, tmp_path: Path) -> None:
    machine = serve("machine", "run", *GUEST)
    client = RawClient(machine.address)
    assert client.greeting["QMP"]["version"]["package"].startswith("dirtylog")
    assert client.ask(b'{"execute": "query-status"}') == {"error": {
        "class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
    assert client.ask(b'{"execute": "qmp_capabilities"}') == {"return": {}}
    start = progress(client)

    generic = "GenericError"
    cases: list[tuple[bytes, dict[str, Any]]] = [
        (b'{"execute": "query-status",}', {"class": generic, "desc": "JSON parse error, expecting value"}),
        (b"}", {"class": generic, "desc": "JSON parse error, expecting value"}),
        (b"[]", {"class": generic, "desc": "QMP input must be a JSON object"}),
        (b'{"arguments": {}}', {"class": generic, "desc": "QMP input lacks member 'execute'"}),
        (b'{"execute": "system_powerdown", "id": 1}',
         {"class": "CommandNotFound", "desc": "The command system_powerdown has not been found"}),
        (b'{"execute": "migrate", "arguments": {"uri": 4444}, "id": 2}',
         {"class": generic, "desc": "Invalid parameter type for 'uri', expected: string"}),
        (b'{"execute": "migrate-set-parameters", "arguments": {"downtime-limit": "50ms"}, "id": 3}',
         {"class": generic, "desc": "Parameter 'downtime-limit' expects uint64"}),
        (b'{"execute": "migrate-set-capabilities", "arguments": {"capabilities": '
         b'[{"capability": "turbo", "state": true}]}, "id": 4}',
         {"class": generic, "desc": "Parameter 'capability' does not accept value 'turbo'"}),
        (b'{"execute": "stop", "arguments": {"now": true}, "id": 5}',
         {"class": generic, "desc": "Parameter 'now' is unexpected"}),
        (b'{"execute": "migrate", "arguments": {"uri": "tcp:127.0.0.1:1"}, "cookie": 1, "id": 6}',
         {"class": generic, "desc": "QMP input member 'cookie' is unexpected"}),
    ]
    for request, error in cases:
        assert client.ask(request)["error"] == error, request
    # 65 MiB in one message: more than QEMU's (and our) 64 MiB limit. The rest of the string is garbage
    # to the lexer, as it would be to QEMU's: more errors, all without an id, until it resynchronizes.
    client.send(b'{"execute": "migrate", "arguments": {"uri": "' + b"A" * (65 << 20) + b'"}, "id": 7}\n')
    assert client.read(events=False) == {"error": {"class": generic, "desc": "JSON token size limit exceeded"}}
    client.send(b'\n{"execute": "query-status", "id": "after"}')
    while (answer := client.read(events=False)).get("id") != "after":
        assert "error" in answer and "id" not in answer
    assert answer == {"return": {"running": True, "status": "running"}, "id": "after"}
    time.sleep(0.2)
    assert progress(client) > start, "the guest stopped writing"
    assert machine.process.poll() is None
    assert client.ask(b'{"execute": "quit"}') == {"return": {}}
    client.close()
    assert machine.finish()[-1]["reason"] == "host-qmp-quit" and machine.process.returncode == 0
