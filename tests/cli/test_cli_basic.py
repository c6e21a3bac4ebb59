"""``dirtylog info`` and ``dirtylog run`` as a user calls them, and their errors."""

from __future__ import annotations

import json

import pytest

from dirtylog.cli import main


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@pytest.mark.kvm
def test_info_reports_dirty_log_capabilities(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "--json"]) == 0
    (info,) = json_lines(capsys.readouterr().out)
    assert info["api_version"] == 12
    assert info["host_type"] in {"PVM", "VMX", "SVM"}
    assert isinstance(info["dirty_log"], dict) and info["dirty_log"]["get_dirty_log"] is True
    assert main(["info"]) == 0
    assert "KVM_CLEAR_DIRTY_LOG" in capsys.readouterr().out


@pytest.mark.kvm
def test_run_prints_a_row_per_interval_and_a_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--memory", "64M", "--vcpus", "2", "--workload", "random", "--rate", "3000",
                 "--duration", "600ms", "--interval", "200ms", "--json"]) == 0
    records = json_lines(capsys.readouterr().out)
    rows, summary = records[:-1], records[-1]["summary"]
    assert len(rows) == 3
    assert all(len(row["vcpu_pages_per_s"]) == 2 for row in rows)  # type: ignore[arg-type]
    assert isinstance(summary, dict)
    assert 0.5 * 6000 * 0.6 < summary["pages_written"] < 1.5 * 6000 * 0.6


@pytest.mark.kvm
def test_run_for_people_shows_per_vcpu_columns(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--memory", "64M", "--vcpus", "2", "--duration", "300ms", "--interval", "100ms"]) == 0
    out = capsys.readouterr().out
    assert "vcpu0 pages/s" in out and "vcpu1 pages/s" in out and "wrote" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["run", "--memory", "5X"], "argument --memory: size '5X' is not understood"),
        (["run", "--duration", "2x"], "argument --duration: duration '2x' is not understood"),
        (["run", "--vcpus", "0"], "argument --vcpus: 0 must be at least 1"),
        (["run", "--workload", "fast"], "argument --workload: invalid choice: 'fast'"),
    ],
)
def test_bad_arguments_are_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_kvm_device_is_a_clear_error(monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("DIRTYLOG_KVM_DEVICE", "/nonexistent/kvm")
    assert main(["info"]) == 1
    assert "dirtylog: error: /nonexistent/kvm does not exist: this host has no KVM" in capsys.readouterr().err
    assert main(["run", "--memory", "64M", "--duration", "100ms"]) == 1
    assert "this host has no KVM" in capsys.readouterr().err


@pytest.mark.kvm
def test_memory_the_host_cannot_back_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--memory", "255G", "--duration", "100ms"]) == 1
    assert "more than this host has" in capsys.readouterr().err
