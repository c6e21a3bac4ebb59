"""A monitor's behaviour on real KVM, driven by qemu.qmp's synchronous client (QEMUMonitorProtocol):
stop/cont and their events, migrate_cancel, retuning a running migration, failures that leave the
source running, capabilities that need a dirty ring, and quit in the middle of a migration."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp.legacy import QEMUMonitorProtocol

from dirtylog.control.monitor import Monitor
from dirtylog.control.vm import ShutdownCause
from dirtylog.guest.machine import State
from tests.control.conftest import Monitors, error_of, running_machine
from tests.helpers import wait_for

pytestmark = pytest.mark.kvm

def events(client: QEMUMonitorProtocol, wait: float = 0.2) -> list[dict[str, Any]]:
    time.sleep(wait)
    return client.get_events()


def wait_status(client: QEMUMonitorProtocol, statuses: tuple[str, ...], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        info = client.cmd("query-migrate")
        assert isinstance(info, dict)
        if info.get("status") in statuses:
            return info
        assert time.monotonic() < deadline, info
        time.sleep(0.05)


def incoming(monitors: Monitors, key_file: str, name: str = "destination") -> tuple[Monitor, QEMUMonitorProtocol, int]:
    monitor, client = monitors(name, machine=None, incoming=True, key_file=key_file)
    client.cmd("migrate-incoming", uri="tcp:127.0.0.1:0", **{"exit-on-error": False})
    info = client.cmd("query-migrate")
    assert isinstance(info, dict)
    return monitor, client, int(info["socket-address"][0]["port"])


def test_stop_and_cont_pause_the_guest_with_events(monitors: Monitors) -> None:
    machine = running_machine()
    _, client = monitors("vm", machine=machine)
    client.cmd("stop")
    assert client.cmd("query-status") == {"running": False, "status": "paused"}
    assert [e["event"] for e in events(client)] == ["STOP"]
    frozen = machine.progress
    time.sleep(0.2)
    assert machine.progress == frozen and machine.state is State.PAUSED
    client.cmd("stop")  # already stopped: nothing happens, no event
    assert error_of(client, "migrate", uri="tcp:127.0.0.1:1").startswith("dirtylog migrates running VMs only")
    client.cmd("cont")
    assert client.cmd("query-status") == {"running": True, "status": "running"}
    assert [e["event"] for e in events(client)] == ["RESUME"]
    wait_for(lambda: machine.progress > frozen, what="the guest to continue")


def test_a_migration_to_nobody_fails_and_the_source_keeps_running(monitors: Monitors, key_file: str) -> None:
    machine = running_machine()
    _, client = monitors("vm", machine=machine, key_file=key_file)
    client.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    assert client.cmd("migrate", uri="tcp:127.0.0.1:9") == {}
    info = wait_status(client, ("failed",))
    assert "nobody listens at 127.0.0.1:9" in info["error-desc"] and "ram" not in info
    statuses = [e["data"]["status"] for e in events(client) if e["event"] == "MIGRATION"]
    assert statuses == ["setup", "failed"]
    assert client.cmd("query-status") == {"running": True, "status": "running"}
    before = machine.progress
    wait_for(lambda: machine.progress > before, what="the source to keep running")


def test_migrate_cancel_stops_a_migration_and_the_source_keeps_running(monitors: Monitors, key_file: str) -> None:
    machine = running_machine()
    _, destination, port = incoming(monitors, key_file)
    _, source = monitors("source", machine=machine, key_file=key_file)
    source.cmd("migrate-set-capabilities", capabilities=[{"capability": "events", "state": True}])
    source.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 20})  # 128 MiB at 8 MiB/s: many seconds
    source.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    active = wait_status(source, ("active",))
    wait_for(lambda: source.cmd("query-migrate")["ram"]["transferred"] > active["ram"]["transferred"],
             what="pages to move")
    assert error_of(source, "stop").startswith("stop is refused while a migration is in progress")
    assert error_of(source, "migrate-set-capabilities", capabilities=[{"capability": "events", "state": False}]) == \
        "There's a migration process in progress"
    assert source.cmd("migrate_cancel") == {}
    info = wait_status(source, ("cancelled",), timeout=30)
    assert "error-desc" not in info
    statuses = [e["data"]["status"] for e in events(source) if e["event"] == "MIGRATION"]
    assert statuses == ["setup", "active", "cancelling", "cancelled"]
    assert source.cmd("query-status") == {"running": True, "status": "running"}
    before = machine.progress
    wait_for(lambda: machine.progress > before, what="the source to keep running")
    assert wait_status(destination, ("failed",), timeout=30)["status"] == "failed"
    assert destination.cmd("query-status") == {"running": False, "status": "inmigrate"}
    assert source.cmd("migrate_cancel") == {}  # nothing to cancel: still fine, as in QEMU


def test_raising_the_downtime_limit_lets_a_running_migration_converge(monitors: Monitors, key_file: str) -> None:
    machine = running_machine(workload="hotset", rate=40000)
    _, destination, port = incoming(monitors, key_file)
    _, source = monitors("source", machine=machine, key_file=key_file)
    # 1 ms cannot be met by a guest dirtying 80k pages/s under a 64 MiB/s cap: rounds go on and on.
    source.cmd("migrate-set-parameters", **{"downtime-limit": 1, "max-bandwidth": 64 << 20})
    source.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    wait_for(lambda: source.cmd("query-migrate")["ram"]["dirty-sync-count"] >= 3
             if "ram" in source.cmd("query-migrate") else False, timeout=60, what="three passes")
    assert source.cmd("query-migrate")["status"] == "active"
    source.cmd("migrate-set-parameters", **{"downtime-limit": 2000, "max-bandwidth": 0})
    assert source.cmd("query-migrate-parameters")["downtime-limit"] == 2000
    info = wait_status(source, ("completed", "failed"))
    assert info["status"] == "completed", info
    # The source completes at the destination's Resumed; the destination's monitor says so a moment later, when
    # its side of the migration has returned (QEMU's users poll the destination too).
    assert wait_status(destination, ("completed", "failed"), timeout=10)["status"] == "completed"
    assert destination.cmd("query-status") == {"running": True, "status": "running"}
    assert source.cmd("query-status") == {"running": False, "status": "postmigrate"}
    assert error_of(source, "migrate", uri=f"tcp:127.0.0.1:{port}") == \
        "Can't migrate the vm that was paused due to previous migration"
    rounds = source.cmd("x-dirtylog-query-migrate-rounds")
    assert isinstance(rounds, list) and rounds[-1]["final"] and len(rounds) >= 4
    assert all("expected-downtime-ms" in r for r in rounds[:-1])


def test_dirty_limit_needs_a_dirty_ring_and_excludes_auto_converge(monitors: Monitors) -> None:
    plain = running_machine()
    _, client = monitors("plain", machine=plain)
    assert "requires KVM with accelerator property 'dirty-ring-size'" in error_of(
        client, "migrate-set-capabilities", capabilities=[{"capability": "dirty-limit", "state": True}])
    ringed = running_machine(ring=True)
    _, ring_client = monitors("ring", machine=ringed)
    assert ring_client.cmd("query-migrate-parameters")["x-dirtylog-mode"] == "ring"
    assert "conflicts with auto-converge" in error_of(
        ring_client, "migrate-set-capabilities", capabilities=[{"capability": "dirty-limit", "state": True},
                                                               {"capability": "auto-converge", "state": True}])
    ring_client.cmd("migrate-set-capabilities", capabilities=[{"capability": "dirty-limit", "state": True}])
    states = {c["capability"]: c["state"] for c in ring_client.cmd("query-migrate-capabilities")}
    assert states["dirty-limit"] and not states["auto-converge"] and len(states) >= 22
    assert "not supported by dirtylog" in error_of(
        ring_client, "migrate-set-capabilities", capabilities=[{"capability": "x-colo", "state": True}])


def test_migrate_without_a_key_says_how_to_give_one(monitors: Monitors) -> None:
    _, client = monitors("vm", machine=running_machine())
    desc = error_of(client, "migrate", uri="tcp:127.0.0.1:4444")
    assert "x-dirtylog-key-file" in desc and "--key-file" in desc and "dirtylog keygen" in desc
    assert client.cmd("query-migrate") == {}
    assert error_of(client, "migrate-incoming", uri="tcp:127.0.0.1:0").startswith("'-incoming' was not specified")


def test_quit_during_a_migration_shuts_down_cleanly(monitors: Monitors, key_file: str) -> None:
    machine = running_machine()
    _, _, port = incoming(monitors, key_file)
    monitor, source = monitors("source", machine=machine, key_file=key_file)
    source.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 20})
    source.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    wait_status(source, ("active",))
    source.cmd("quit")
    shutdown = [e for e in source.get_events(wait=5.0) if e["event"] == "SHUTDOWN"]
    assert shutdown and shutdown[0]["data"] == {"guest": False, "reason": "host-qmp-quit"}
    assert monitor.wait() == 0 and monitor.cause is ShutdownCause.HOST_QMP_QUIT
    started = time.monotonic()
    monitor.close()
    assert time.monotonic() - started < 20
    assert machine.state is State.STOPPED
    assert monitor.migration.outgoing is not None and monitor.migration.outgoing.status == "cancelled"


def test_migrate_to_a_file_and_load_it_elsewhere_as_qemu_users_save_and_restore(monitors: Monitors, key_file: str,
                                                                               tmp_path: Path) -> None:
    machine = running_machine()
    _, source = monitors("source", machine=machine, key_file=key_file)
    source.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    source.cmd("migrate", uri=f"file:{tmp_path / 'vm.state'}")
    assert wait_status(source, ("completed", "failed"))["status"] == "completed"
    # A file has no destination to take the VM over: the source is paused, and may go on (QEMU: cont).
    assert source.cmd("query-status") == {"running": False, "status": "postmigrate"}
    source.cmd("cont")
    assert source.cmd("query-status") == {"running": True, "status": "running"}
    _, destination = monitors("destination", machine=None, incoming=True, key_file=key_file)
    destination.cmd("migrate-incoming", uri=f"file:{tmp_path / 'vm.state'}")
    loading = destination.cmd("query-migrate")
    assert loading["status"] in ("setup", "active", "completed") and "socket-address" not in loading
    assert wait_status(destination, ("completed", "failed"))["status"] == "completed"
    assert destination.cmd("query-status") == {"running": True, "status": "running"}
    first = destination.cmd("x-dirtylog-query-progress")["progress"]
    wait_for(lambda: destination.cmd("x-dirtylog-query-progress")["progress"] > first, what="the loaded guest to run")


def test_migrate_over_a_unix_socket(monitors: Monitors, key_file: str, tmp_path: Path) -> None:
    machine = running_machine()
    _, destination = monitors("destination", machine=None, incoming=True, key_file=key_file)
    path = tmp_path / "migration.sock"
    destination.cmd("migrate-incoming", uri=f"unix:{path}")
    assert destination.cmd("query-migrate")["socket-address"] == [{"type": "unix", "path": str(path)}]
    _, source = monitors("source", machine=machine, key_file=key_file)
    source.cmd("migrate-set-parameters", **{"max-bandwidth": 0})
    source.cmd("migrate", uri=f"unix:{path}")
    assert wait_status(source, ("completed", "failed"))["status"] == "completed"
    assert wait_status(destination, ("completed", "failed"), timeout=10)["status"] == "completed"
    assert destination.cmd("query-status") == {"running": True, "status": "running"}


def test_a_failed_incoming_migration_ends_the_destination_unless_told_otherwise(monitors: Monitors,
                                                                                 key_file: str) -> None:
    machine = running_machine()
    destination_monitor, destination = monitors("destination", machine=None, incoming=True, key_file=key_file)
    destination.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")  # exit-on-error defaults to true, as in QEMU
    port = destination.cmd("query-migrate")["socket-address"][0]["port"]
    _, source = monitors("source", machine=machine, key_file=key_file)
    source.cmd("migrate-set-parameters", **{"max-bandwidth": 8 << 20})
    source.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    wait_status(source, ("active",))
    source.cmd("migrate_cancel")
    assert destination_monitor.wait() == 1 and destination_monitor.cause is None  # no SHUTDOWN: QEMU just exits
    assert destination_monitor.migration.incoming is not None
    assert destination_monitor.migration.incoming.status == "failed"
    assert "cancel" in destination_monitor.migration.incoming.error
