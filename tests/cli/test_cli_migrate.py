"""``dirtylog keygen / receive / migrate`` as two real processes, and their errors."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dirtylog.cli import main

DIRTYLOG = [sys.executable, "-m", "dirtylog"]


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_keygen_writes_a_private_key_and_never_overwrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "k"
    assert main(["keygen", str(key)]) == 0
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert len(key.read_text().split()[1]) == 64
    first = key.read_text()
    assert main(["keygen", str(key)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert key.read_text() == first
    assert main(["keygen", str(key), "--force"]) == 0
    assert key.read_text() != first


def test_a_key_file_others_can_read_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "k"
    main(["keygen", str(key)])
    os.chmod(key, 0o644)
    assert main(["migrate", "--to", "127.0.0.1:9", "--key-file", str(key), "--memory", "64M"]) == 1
    assert f"run `chmod 600 {key}`" in capsys.readouterr().err


def test_a_missing_key_file_says_how_to_make_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["receive", "--key-file", str(tmp_path / "none"), "--listen", "127.0.0.1:0"]) == 1
    assert "dirtylog keygen" in capsys.readouterr().err


@pytest.mark.kvm
def test_two_processes_migrate_and_the_guest_continues(tmp_path: Path) -> None:
    key = tmp_path / "k"
    main(["keygen", str(key)])
    receiver = subprocess.Popen(
        [*DIRTYLOG, "receive", "--listen", "127.0.0.1:0", "--key-file", str(key), "--duration", "500ms", "--json"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert receiver.stdout is not None
    address = json.loads(receiver.stdout.readline())["address"]
    plot = tmp_path / "timeline.png"
    source = subprocess.run(
        [
            *DIRTYLOG,
            "migrate",
            "--to",
            address,
            "--key-file",
            str(key),
            "--memory",
            "128M",
            "--workload",
            "hotset",
            "--rate",
            "20000",
            "--warmup",
            "300ms",
            "--downtime-limit",
            "100ms",
            "--json",
            "--plot",
            str(plot),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    out, _ = receiver.communicate(timeout=120)
    assert source.returncode == 0, source.stdout + source.stderr
    assert receiver.returncode == 0, out
    sent = json_lines(source.stdout)
    completed = next(e for e in sent if e["event"] == "completed")
    stats = completed["stats"]
    assert isinstance(stats, dict) and stats["status"] == "completed" and stats["downtime_ms"] is not None
    assert [e for e in sent if e["event"] == "round"]
    received = next(e for e in json_lines(out) if e["event"] == "completed")
    assert received["continued"] is True
    assert isinstance(received["stats"], dict) and received["stats"]["digest"] == stats["digest"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.kvm
def test_migrating_to_nobody_fails_and_the_source_keeps_running(tmp_path: Path) -> None:
    key = tmp_path / "k"
    main(["keygen", str(key)])
    result = subprocess.run(
        [*DIRTYLOG, "migrate", "--to", "127.0.0.1:9", "--key-file", str(key), "--memory", "64M", "--warmup", "100ms"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "nobody listens at 127.0.0.1:9" in result.stdout
    assert "the source VM keeps running here" in result.stdout


def test_bad_migration_arguments_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["migrate", "--to", "x:1", "--key-file", "k", "--downtime-limit", "soon"])
    assert exit_info.value.code == 2
    assert "argument --downtime-limit" in capsys.readouterr().err
    assert main(["migrate", "--to", "nohost", "--key-file", "/nonexistent", "--memory", "64M"]) == 1


@pytest.mark.kvm
def test_a_vm_saved_to_a_file_and_loaded_by_another_process(tmp_path: Path) -> None:
    key, stream = tmp_path / "k", tmp_path / "vm.stream"
    assert main(["keygen", str(key), "--json"]) == 0
    saved = subprocess.run(
        [*DIRTYLOG, "migrate", "--to", f"file:{stream}", "--key-file", str(key), "--memory", "64M",
         "--workload", "sequential", "--warmup", "200ms"],
        capture_output=True, text=True, timeout=120,
    )
    assert saved.returncode == 0, saved.stdout + saved.stderr
    assert f"saved to file:{stream}; this VM stays paused here" in saved.stdout
    loaded = subprocess.run(
        [*DIRTYLOG, "receive", "--listen", f"file:{stream}", "--key-file", str(key), "--duration", "300ms", "--json"],
        capture_output=True, text=True, timeout=120,
    )
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    done = next(e for e in json_lines(loaded.stdout) if e["event"] == "completed")
    assert done["continued"] is True  # the sequential guest writes on from where it was saved


@pytest.mark.parametrize(("argv", "message"), [
    (["track", "--interval", "0"], "argument --interval: duration '0' must be more than zero"),
    (["run", "--duration", "-5s"], "argument --duration: duration '-5s' is negative"),
    (["run", "--memory", "-1G"], "argument --memory: size '-1G' is negative"),
    (["receive", "--key-file", "k", "--timeout", "0"], "argument --timeout: duration '0' must be more than zero"),
    (["receive", "--key-file", "k", "--accept-timeout", "0"], "argument --accept-timeout: duration '0' must be more"),
    (["migrate", "--to", "h:1", "--key-file", "k", "--downtime-limit", "0"], "duration '0' must be more than zero"),
    (["migrate", "--to", "h:1", "--key-file", "k", "--bandwidth", "0"], "rate '0' must be more than zero"),
    (["migrate", "--to", "h:1", "--key-file", "k", "--streams", "100"], "100 must be between 1 and 64"),
])
def test_bad_values_are_one_line_usage_errors_before_any_vm(argv: list[str], message: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_a_binary_key_file_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = tmp_path / "k"
    key.write_bytes(bytes(range(256)))
    key.chmod(0o600)
    assert main(["receive", "--key-file", str(key), "--listen", "127.0.0.1:0"]) == 1
    err = capsys.readouterr().err
    assert "holds binary data" in err and err.count("\n") == 1
