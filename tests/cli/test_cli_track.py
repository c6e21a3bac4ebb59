"""``dirtylog track`` on real KVM and on the stage-2 model, as a user runs it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dirtylog.cli import main


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.kvm
@pytest.mark.parametrize("mode", ["log", "clear", "ring"])
def test_track_verify_passes_in_every_mode(mode: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["track", "--mode", mode, "--memory", "64M", "--vcpus", "2", "--interval", "20ms",
                 "--duration", "400ms", "--verify", "--json"]) == 0
    records = json_lines(capsys.readouterr().out)
    rows, summary = records[:-1], records[-1]["summary"]
    assert len(rows) == 20 and all(row["violations"] == 0 for row in rows)
    assert isinstance(summary, dict) and summary["verified"] is True and summary["mode"] == mode
    assert summary["changes_seen"] > 0  # type: ignore[operator]


@pytest.mark.kvm
def test_track_for_people_shows_rates_and_a_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plot = tmp_path / "track.png"
    assert main(["track", "--mode", "clear", "--memory", "64M", "--workload", "hotset", "--interval", "50ms",
                 "--duration", "300ms", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "MB/s dirtied" in out and "collect ms" in out and "collections" in out
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_track_on_the_stage2_model_needs_no_kvm(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DIRTYLOG_KVM_DEVICE", "/nonexistent/kvm")
    assert main(["track", "--backend", "stage2", "--memory", "16M", "--vcpus", "2", "--interval", "100ms",
                 "--duration", "300ms", "--verify", "--json"]) == 0
    summary = json_lines(capsys.readouterr().out)[-1]["summary"]
    assert isinstance(summary, dict)
    assert summary["verified"] is True and summary["lost_pages"] == 0 and summary["model_writes"] > 0


def test_verify_needs_the_stamp_workload(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["track", "--verify", "--workload", "random", "--duration", "100ms"]) == 1
    assert "--verify checks the stamp workload" in capsys.readouterr().err


def test_bad_track_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["track", "--mode", "fast"])
    assert "invalid choice: 'fast'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["track", "--interval", "soon"])
    assert "argument --interval" in capsys.readouterr().err
