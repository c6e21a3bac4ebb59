"""``dirtylog ctl`` and ``run/receive --qmp`` as processes: commands, --json, errors, watch-migration."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest

from dirtylog.cli import main
from dirtylog.cli.ctl import CtlArgumentError, parse_arguments
from dirtylog.guest.machine import State
from dirtylog.machine import Machine
from dirtylog.migration import MigrationError, migrate
from tests.cli.test_cli_migrate import DIRTYLOG, json_lines
from tests.control.conftest import RawClient, Served
from tests.migration.engine.peers import Proxy


def test_key_value_arguments_are_json_when_they_parse() -> None:
    assert parse_arguments(["uri=tcp:127.0.0.1:4444", "downtime-limit=50", "events=true", "name=null",
                            'capabilities=[{"capability":"events","state":true}]', "a.b.c=1", "a.b.d=x"]) == {
        "uri": "tcp:127.0.0.1:4444", "downtime-limit": 50, "events": True, "name": None,
        "capabilities": [{"capability": "events", "state": True}], "a": {"b": {"c": 1, "d": "x"}}}
    for bad in (["novalue"], ["=1"], ["a=1", "a=2"], ["a=1", "a.b=2"]):
        with pytest.raises(CtlArgumentError):
            parse_arguments(bad)


def test_qmp_addresses_that_are_not_loopback_are_refused_before_a_vm_starts(
        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--memory", "64M", "--qmp", "tcp:0.0.0.0:4444"]) == 1
    assert "QMP has no authentication" in capsys.readouterr().err


def test_receive_without_qmp_still_needs_a_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["receive", "--listen", "127.0.0.1:0"]) == 1
    assert "receive needs --key-file" in capsys.readouterr().err


def ctl(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*DIRTYLOG, "ctl", *argv], capture_output=True, text=True, timeout=120)


@pytest.mark.kvm
def test_ctl_commands_and_watch_migration_against_two_processes(serve: object, key_file: str,
                                                                tmp_path: Path) -> None:
    source: Served = serve("source", "run", "--memory", "128M", "--workload", "hotset",  # type: ignore[operator]
                           "--rate", "20000", "--key-file", key_file)
    destination: Served = serve("destination", "receive", "--key-file", key_file,  # type: ignore[operator]
                                "--listen", "127.0.0.1:0")

    status = ctl(source.path, "query-status", "--json")
    assert status.returncode == 0 and json.loads(status.stdout) == {"return": {"running": True, "status": "running"}}
    people = ctl(source.address, "query-status")
    assert "running" in people.stdout and people.returncode == 0
    unknown = ctl(source.path, "device_add", "driver=e1000", "--json")
    assert unknown.returncode == 1
    assert json.loads(unknown.stdout) == {"error": {"class": "CommandNotFound",
                                                    "desc": "The command device_add has not been found"}}
    bad = ctl(source.path, "migrate-set-parameters", "downtime-limit=soon")
    assert bad.returncode == 1 and "Parameter 'downtime-limit' expects uint64" in bad.stdout

    port = json.loads(ctl(destination.path, "query-migrate", "--json").stdout)["return"]["socket-address"][0]["port"]
    assert ctl(source.path, "migrate-set-parameters", "downtime-limit=100", "max-bandwidth=0").returncode == 0
    assert ctl(source.path, "migrate", f"uri=tcp:127.0.0.1:{port}").returncode == 0
    watch = ctl(source.path, "watch-migration", "--json")
    assert watch.returncode == 0, watch.stdout + watch.stderr
    lines = json_lines(watch.stdout)
    rounds = [line for line in lines if line["event"] == "round"]
    assert rounds and rounds[0]["round"] == 0 and rounds[-1]["final"] is True
    assert all("dirty_pages" in r and "expected_downtime_ms" in r for r in rounds[:-1])
    assert lines[-1]["event"] == "completed" and lines[-1]["query-migrate"]["status"] == "completed"
    watch_again = ctl(source.path, "watch-migration")  # the migration is over: the summary at once
    assert watch_again.returncode == 0 and "migration completed" in watch_again.stdout
    assert json.loads(ctl(destination.path, "query-status", "--json").stdout)["return"]["status"] == "running"
    for served in (source, destination):
        assert ctl(served.path, "quit").returncode == 0
        assert served.finish()[-1]["reason"] == "host-qmp-quit"


@pytest.mark.kvm
@pytest.mark.parametrize(("signum", "listen"), [(signal.SIGTERM, False), (signal.SIGINT, True)])
def test_a_signal_ends_a_served_machine_with_shutdown_host_signal(serve: object, key_file: str, signum: int,
                                                                  listen: bool) -> None:
    argv = ["receive", "--key-file", key_file] + (["--listen", "127.0.0.1:0"] if listen else [])
    served: Served = serve("vm", *(argv if listen else ["run", "--memory", "64M"]))  # type: ignore[operator]
    client = RawClient(served.address)
    client.negotiate()
    served.process.send_signal(signum)
    event = client.read()
    assert event["event"] == "SHUTDOWN" and event["data"] == {"guest": False, "reason": "host-signal"}
    summary = served.finish()[-1]
    assert summary["reason"] == "host-signal" and served.process.returncode == 0
    assert not Path(served.path).exists()


@pytest.mark.kvm
def test_an_incoming_migration_that_fails_ends_the_destination_and_says_why(serve: object, key_file: str) -> None:
    destination: Served = serve("destination", "receive", "--key-file", key_file,  # type: ignore[operator]
                                "--listen", "127.0.0.1:0")
    port = json.loads(ctl(destination.path, "query-migrate", "--json").stdout)["return"]["socket-address"][0]["port"]

    def cut_mid_stream(way: str, at: int, chunk: bytes) -> bytes | None:
        return None if way == "up" and at > 1 << 20 else chunk  # past the handshake, among the pages

    proxy = Proxy(f"127.0.0.1:{port}", cut_mid_stream).start()
    try:
        with Machine(memory="64M", workload="idle") as source:
            source.start()
            source.memory[: 8 << 20] = np.random.default_rng(7).integers(0, 256, 8 << 20, dtype=np.uint8)
            with pytest.raises(MigrationError):
                migrate(source, proxy.address, key_file=key_file, encrypt=False)
            assert source.state is State.RUNNING  # the source keeps its VM
    finally:
        proxy.close()
    out, _ = destination.process.communicate(timeout=60)
    summary = json.loads(out.splitlines()[-1])
    assert destination.process.returncode == 1 and summary["status"] == 1 and summary["vm"] == "inmigrate"
    assert summary["error"] and f"the incoming migration failed: {summary['error']}" in destination.stderr
