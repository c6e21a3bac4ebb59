"""Post-copy through QMP, as QEMU's operators drive it: the postcopy-ram capability, migrate-start-postcopy,
migrate-pause, migrate-recover on the destination and migrate with resume=true on the source, the statuses and
their MIGRATION events, and query-migrate's post-copy members on both ends."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from typing import Any

import numpy as np
import pytest
from qemu.qmp import EventListener, ExecuteError, QMPClient

from dirtylog.guest.machine import State
from tests.control.conftest import DIRTYLOG, Monitors, error_of, running_machine
from tests.control.test_monitor_kvm import events, wait_status
from tests.control.test_qemu_clients import drain, names
from tests.helpers import wait_for

pytestmark = pytest.mark.kvm


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def migration_statuses(client: Any) -> list[str]:
    return [e["data"]["status"] for e in events(client, 0) if e["event"] == "MIGRATION"]


def test_postcopy_is_started_paused_recovered_and_resumed_over_qmp(monitors: Monitors, key_file: str) -> None:
    machine = running_machine("256M", rate=None)
    area = machine.memory[machine.workload_pages.start * 4096:]
    area[:] = np.random.default_rng(1).integers(1, 256, area.size, dtype=np.uint8)  # every page costs the link
    dest_monitor, destination = monitors("destination", machine=None, incoming=True, key_file=key_file)
    _, source = monitors("source", machine=machine, key_file=key_file)
    assert error_of(source, "migrate-start-postcopy").startswith("Enable postcopy with migrate_set_capability")
    for client in (source, destination):  # as QEMU's users do: on both ends, the destination's before it listens
        client.cmd("migrate-set-capabilities", capabilities=[
            {"capability": "events", "state": True}, {"capability": "postcopy-ram", "state": True},
            {"capability": "postcopy-preempt", "state": True}, {"capability": "postcopy-blocktime", "state": True}])
    destination.cmd("migrate-incoming", uri="tcp:127.0.0.1:0", **{"exit-on-error": False})
    port = int(destination.cmd("query-migrate")["socket-address"][0]["port"])
    assert error_of(source, "migrate-start-postcopy") == "Postcopy must be started after migration has been started"
    assert error_of(source, "migrate-pause").startswith("migrate-pause is currently only supported during postcopy")
    source.cmd("migrate-set-parameters", **{"max-bandwidth": 40 << 20, "downtime-limit": 1})
    source.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    wait_status(source, ("active",))
    source.cmd("migrate-start-postcopy")
    wait_status(source, ("postcopy-active",))
    wait_status(destination, ("postcopy-active",))
    assert "Postcopy migration in progress, cannot cancel" in error_of(source, "migrate_cancel")
    assert error_of(destination, "migrate-recover", uri="tcp:127.0.0.1:0").startswith(
        "Migrate recover can only be run when postcopy is paused")
    assert error_of(source, "migrate", uri="tcp:127.0.0.1:1", resume=True) == (
        "Cannot resume if there is no paused migration")

    source.cmd("migrate-pause")
    wait_status(source, ("postcopy-paused",))
    wait_status(destination, ("postcopy-paused",))
    destination.cmd("migrate-recover", uri="tcp:127.0.0.1:0")
    info = destination.cmd("query-migrate")
    new_port = int(info["socket-address"][0]["port"])
    assert new_port != port
    source.cmd("migrate", uri=f"tcp:127.0.0.1:{new_port}", resume=True)
    done = wait_status(source, ("completed", "failed"))
    assert done["status"] == "completed", done
    assert done["ram"]["postcopy-bytes"] > 0 and "downtime" in done
    arrived = wait_status(destination, ("completed",))
    assert set(arrived) >= {"postcopy-blocktime", "postcopy-vcpu-blocktime", "postcopy-latency",
                            "postcopy-vcpu-latency", "postcopy-latency-dist", "postcopy-non-vcpu-latency"}
    assert len(arrived["postcopy-latency-dist"]) == 24 and len(arrived["postcopy-vcpu-blocktime"]) == 2
    statuses = migration_statuses(source)
    assert statuses[:2] == ["setup", "active"] and statuses[-1] == "completed"
    assert statuses[2:-1] == ["postcopy-active", "postcopy-paused", "postcopy-recover", "postcopy-active"]
    assert migration_statuses(destination) == statuses
    assert dest_monitor.vm.state.value == "running"
    assert machine.state is State.HANDED_OFF
    assert source.cmd("query-status")["status"] == "postmigrate"
    received = dest_monitor.vm.machine
    assert received is not None
    before = received.progress
    wait_for(lambda: received.progress > before, what="the guest to run on the destination")


async def postcopy_between_processes(source_path: str, destination_path: str, key_file: str) -> dict[str, Any]:
    """A QEMU operator's post-copy script, with qemu.qmp's own client: both ends' capabilities, migrate, then
    migrate-start-postcopy; the destination breaks the link (migrate-pause), listens anew (migrate-recover), and
    the source resumes there (migrate with resume)."""
    source, destination = QMPClient("source"), QMPClient("destination")
    await source.connect(source_path)
    await destination.connect(destination_path)
    source_events, destination_events = EventListener(), EventListener()
    source.register_listener(source_events)
    destination.register_listener(destination_events)
    capabilities = {"capabilities": [{"capability": name, "state": True} for name in
                                     ("events", "postcopy-ram", "postcopy-preempt", "postcopy-blocktime")]}
    seen: dict[str, Any] = {}

    async def status_of(client: QMPClient, wanted: tuple[str, ...]) -> dict[str, Any]:
        deadline = time.monotonic() + 120
        while True:
            info = await client.execute("query-migrate")
            assert isinstance(info, dict)
            if info.get("status") in wanted:
                return info
            assert time.monotonic() < deadline, info
            await asyncio.sleep(0.05)

    await destination.execute("migrate-set-capabilities", capabilities)
    await destination.execute("migrate-incoming", {"uri": "tcp:127.0.0.1:0"})
    incoming = await destination.execute("query-migrate")
    assert isinstance(incoming, dict)
    port = incoming["socket-address"][0]["port"]
    await source.execute("migrate-set-capabilities", capabilities)
    # A link slower than the guest dirties memory: pre-copy alone would never finish.
    await source.execute("migrate-set-parameters", {"downtime-limit": 1, "max-bandwidth": 32 << 20})
    await source.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
    watchers = [subprocess.Popen([*DIRTYLOG, "ctl", path, "watch-migration", *flags], stdout=subprocess.PIPE, text=True)
                for path in (source_path, destination_path) for flags in ((), ("--json",))]
    await status_of(source, ("active",))
    await source.execute("migrate-start-postcopy")
    seen["source-active"] = await status_of(source, ("postcopy-active",))
    seen["destination-active"] = await status_of(destination, ("postcopy-active",))
    seen["destination-status"] = await destination.execute("query-status")
    seen["source-status"] = await source.execute("query-status")
    try:
        await source.execute("migrate_cancel")
        raise AssertionError("migrate_cancel was accepted in post-copy")
    except ExecuteError as error:
        seen["cancel"] = str(error)

    await destination.execute("migrate-pause")
    seen["source-paused"] = await status_of(source, ("postcopy-paused",))
    seen["destination-paused"] = await status_of(destination, ("postcopy-paused",))
    await destination.execute("migrate-recover", {"uri": "tcp:127.0.0.1:0"})
    recovering = await destination.execute("query-migrate")
    assert isinstance(recovering, dict)
    seen["recover-port"] = recovering["socket-address"][0]["port"]
    await source.execute("migrate", {"uri": f"tcp:127.0.0.1:{seen['recover-port']}", "resume": True})
    seen["source-done"] = await status_of(source, ("completed", "failed"))
    seen["destination-done"] = await status_of(destination, ("completed", "failed"))
    seen["watch"] = [watcher.communicate(timeout=60)[0] for watcher in watchers]
    first = await destination.execute("x-dirtylog-query-progress")
    await asyncio.sleep(0.3)
    seen["progress"] = (first, await destination.execute("x-dirtylog-query-progress"))
    seen["source-events"] = drain(source_events)
    seen["destination-events"] = drain(destination_events)
    for client, listener in ((source, source_events), (destination, destination_events)):
        await client.execute("quit")
        await asyncio.wait_for(listener.get(), 10)
        with contextlib.suppress(EOFError):
            await client.disconnect()
    return seen


def test_qemu_qmp_client_drives_postcopy_and_its_recovery_between_two_processes(serve: Any, key_file: str) -> None:
    source = serve("source", "run", "--memory", "256M", "--vcpus", "2", "--workload", "random", "--rate", "200000",
                   "--key-file", key_file)
    destination = serve("destination", "receive", "--memory", "256M", "--key-file", key_file)
    seen = asyncio.run(postcopy_between_processes(source.path, destination.path, key_file))

    assert seen["source-active"]["ram"]["postcopy-requests"] >= 0 and "downtime" not in seen["source-active"]
    assert seen["destination-status"] == {"running": True, "status": "running"}  # it runs there from the switch
    assert seen["source-status"]["running"] is False
    assert seen["cancel"].startswith("Postcopy migration in progress, cannot cancel")
    assert seen["recover-port"] != seen["source-paused"].get("socket-address", [{}])[0].get("port")
    done = seen["source-done"]
    assert done["status"] == "completed", done.get("error-desc")
    ram = done["ram"]
    assert ram["postcopy-bytes"] > 0 and ram["remaining"] == 0
    # the guest's faults are asked for again after the resume (a stale poll registration once left them to the push)
    assert ram["postcopy-requests"] > seen["source-paused"]["ram"]["postcopy-requests"]
    assert ram["precopy-bytes"] + ram["downtime-bytes"] + ram["postcopy-bytes"] == ram["transferred"]
    arrived = seen["destination-done"]
    assert arrived["status"] == "completed", arrived.get("error-desc")
    assert len(arrived["postcopy-vcpu-blocktime"]) == len(arrived["postcopy-vcpu-latency"]) == 2
    assert len(arrived["postcopy-latency-dist"]) == 24 and arrived["postcopy-blocktime"] >= 0
    assert sum(arrived["postcopy-latency-dist"]) == 0 or arrived["postcopy-latency"] > 0
    before, after = seen["progress"]
    assert after["progress"] > before["progress"], "the migrated guest does not run"
    # dirtylog ctl SOCKET watch-migration follows post-copy on either end, for people and as JSON lines
    source_view, source_json, destination_view, destination_json = seen["watch"]
    assert "postcopy-active: " in source_view and "page requests" in source_view
    assert "post-copy" in source_view and "migration completed" in source_view
    assert "fault latency" in destination_view and "blocktime" in destination_view
    watched = [e for e in json_lines(source_json) if e["event"] == "postcopy"]
    assert "postcopy-active" in {e["status"] for e in watched}  # (a poll may miss the short pause: events show it)
    assert watched[-1]["postcopy_bytes"] > 0 and "remaining_pages" in watched[-1]
    completed = json_lines(destination_json)[-1]
    assert completed["event"] == "completed" and "postcopy-latency-dist" in completed["query-migrate"]

    def statuses(events: list[Any]) -> list[str]:
        return [e["data"]["status"] for e in events if e["event"] == "MIGRATION"]

    expected = ["setup", "active", "postcopy-active", "postcopy-paused", "postcopy-recover", "postcopy-active",
                "completed"]
    assert statuses(seen["source-events"]) == expected
    assert statuses(seen["destination-events"]) == expected
    assert "RESUME" in names(seen["destination-events"]) and "STOP" in names(seen["source-events"])
    source_lines, destination_lines = source.finish(), destination.finish()
    assert source_lines[-1]["vm"] == "postmigrate" and source.process.returncode == 0, source.stderr
    assert destination_lines[-1]["vm"] == "running" and destination.process.returncode == 0
