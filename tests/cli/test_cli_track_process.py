"""``dirtylog track`` on processes, as a user runs it: a command started and tracked to its end, a running
pid, a recording replayed in a VM, and the mistakes a user can make."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dirtylog.cli import main
from dirtylog.machine import Machine
from dirtylog.trace import DirtyTrace

# Writes 64 pages of a private mapping, 8 at a time, then 32 pages of a second mapping, and exits.
JOB = textwrap.dedent("""
    import mmap, sys, time
    first = mmap.mmap(-1, 64 * 4096, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for step in range(8):
        for page in range(step * 8, step * 8 + 8):
            first[page * 4096] = 1
        time.sleep(0.03)
    second = mmap.mmap(-1, 32 * 4096, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    for page in range(32):
        second[page * 4096] = 2
    time.sleep(0.1)
""")


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_a_command_is_tracked_until_it_exits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["track", "--interval", "20ms", "--json", "--", sys.executable, "-c", JOB]) == 0
    records = json_lines(capsys.readouterr().out)
    rows, summary = records[:-1], records[-1]["summary"]
    assert isinstance(summary, dict)
    assert summary["exited"] is True and summary["exit_status"] == 0 and rows[-1]["exited"] is True
    assert summary["collections"] == len(rows) >= 5
    by_mapping = summary["by_mapping"]
    assert isinstance(by_mapping, dict) and by_mapping["anon"] >= 96  # every page the job wrote
    assert summary["working_set_pages"] >= 96 and summary["mappings_new"] >= 1
    assert any("new" in row for row in rows)
    assert all(isinstance(row["mb_per_s"], float) and row["collect_ms"] > 0 for row in rows)  # type: ignore[operator]


def test_a_running_pid_is_tracked_for_the_duration(capsys: pytest.CaptureFixture[str]) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time\nprint('ready', flush=True)\ntime.sleep(30)"],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
        assert main(["track", "--pid", str(child.pid), "--interval", "50ms", "--duration", "300ms", "--json"]) == 0
        records = json_lines(capsys.readouterr().out)
        summary = records[-1]["summary"]
        assert isinstance(summary, dict) and summary["exited"] is False and summary["collections"] == 6
        assert child.poll() is None  # the process runs on, unharmed
    finally:
        child.kill()
        child.wait()


def test_for_people_with_a_heatmap(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plot = tmp_path / "heat.png"
    assert main(["track", "--interval", "20ms", "--plot", str(plot), "--", sys.executable, "-c", JOB]) == 0
    out = capsys.readouterr().out
    assert "busiest mappings" in out and "[heap]" in out and "exited with status 0" in out
    assert plot.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.kvm
def test_a_recording_replays_in_a_vm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    record = tmp_path / "job.npz"
    assert main(["track", "--interval", "20ms", "--record", str(record), "--json", "--", sys.executable, "-c",
                 JOB]) == 0
    summary = json_lines(capsys.readouterr().out)[-1]["summary"]
    trace = DirtyTrace.load(record)
    assert isinstance(summary, dict) and summary["recorded"]["distinct_pages"] == trace.npages  # type: ignore[index]
    assert trace.nwindows == summary["collections"] and trace.npages >= 96
    with Machine("64M", vcpus=2, workload="trace", trace=record) as machine:
        log = machine.dirty_log("log")
        machine.start()
        log.enable()
        log.collect()
        while min(machine.iterations) < 1:  # one whole replay
            machine.check()
        written = log.collect().pages()
        area = np.array(machine.workload_pages)
        in_area = np.intersect1d(written, area)
        assert in_area.size == trace.npages  # each recorded page, on its own guest page
        assert machine.progress >= trace.pages.size


@pytest.mark.kvm
def test_self_tracks_this_process_running_a_vm(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["track", "--self", "--memory", "64M", "--vcpus", "1", "--workload", "random", "--rate", "20000",
                 "--interval", "50ms", "--duration", "300ms", "--json"]) == 0
    records = json_lines(capsys.readouterr().out)
    summary = records[-1]["summary"]
    assert isinstance(summary, dict) and summary["exited"] is False and summary["collections"] == 6
    assert "running a random VM" in str(summary["target"])
    by_mapping = summary["by_mapping"]
    assert isinstance(by_mapping, dict) and by_mapping["anon"] > 1000  # the guest's writes land in its RAM mapping


def test_mistakes_are_explained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["track", "--pid", "4194002", "--duration", "100ms"]) == 1
    assert "no process 4194002" in capsys.readouterr().err
    assert main(["track", "--pid", "1", "--", "true"]) == 1
    assert "exactly one of --pid PID, --self or -- COMMAND (got --pid and -- COMMAND)" in capsys.readouterr().err
    assert main(["track", "--record", str(tmp_path / "x.txt"), "--", "true"]) == 1
    assert "must end in .npz" in capsys.readouterr().err
    assert main(["track", "--", str(tmp_path / "missing-program")]) == 1
    assert "cannot start" in capsys.readouterr().err
    assert main(["track", "--verify", "--", "true"]) == 1
    assert "does not apply to a process" in capsys.readouterr().err
    assert main(["run", "--workload", "random", "--trace", str(tmp_path / "t.npz"), "--duration", "100ms"]) == 1
    assert "add --workload trace" in capsys.readouterr().err
