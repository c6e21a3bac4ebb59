"""``dirtylog migrate --postcopy`` and ``dirtylog receive`` as processes: QEMU-named post-copy statistics in
``--json``, the live view for people on both ends, and ``--plot`` of the destination's faults over time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from dirtylog.migration.keys import generate_key_file

DIRTYLOG = [sys.executable, "-m", "dirtylog"]
GUEST = ["--memory", "128M", "--vcpus", "2", "--workload", "random", "--rate", "200000", "--warmup", "300ms"]
POSTCOPY = ["--postcopy", "--postcopy-after", "1", "--bandwidth", "40M", "--downtime-limit", "1ms"]


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def run_pair(tmp_path: Path, *, source_json: bool, receive_args: list[str]) -> tuple[str, str]:
    key = generate_key_file(tmp_path / "k")
    receiver = subprocess.Popen([*DIRTYLOG, "receive", "--listen", "127.0.0.1:0", "--key-file", str(key),
                                 "--duration", "300ms", "--json", *receive_args], stdout=subprocess.PIPE, text=True)
    assert receiver.stdout is not None
    address = json.loads(receiver.stdout.readline())["address"]
    source = subprocess.run([*DIRTYLOG, "migrate", "--to", address, "--key-file", str(key), *GUEST, *POSTCOPY,
                             *(["--json"] if source_json else [])], capture_output=True, text=True, timeout=180)
    out, _ = receiver.communicate(timeout=120)
    assert source.returncode == 0, source.stdout + source.stderr
    assert receiver.returncode == 0, out
    return source.stdout, out


@pytest.mark.kvm
def test_postcopy_statistics_in_json_and_the_faults_plot(tmp_path: Path) -> None:
    plot = tmp_path / "faults.png"
    sent, received = run_pair(tmp_path, source_json=True, receive_args=["--plot", str(plot)])
    events = json_lines(sent)
    kinds = [e["event"] for e in events]
    assert "postcopy" in kinds and "postcopy-progress" in kinds and kinds[-1] == "completed"
    live = [e for e in events if e["event"] == "postcopy-progress"][-1]
    assert {"remaining", "pages_pushed", "pages_requested", "requests", "bytes"} <= set(live)
    source = events[-1]["stats"]["postcopy"]
    assert source["pages_pushed"] + source["pages_requested"] >= source["pending_pages"] > 0
    assert source["postcopy_requests"] > 0 and source["postcopy_bytes"] > 0
    arrived = json_lines(received)
    assert any(e["event"] == "received-postcopy-progress" and "blocktime_ms" in e for e in arrived)
    destination = next(e for e in arrived if e["event"] == "completed")["stats"]["postcopy"]
    # QEMU 10.1's members, snake_case: blocktime total and per vCPU, latency mean, per vCPU, histogram
    assert len(destination["postcopy_vcpu_blocktime"]) == len(destination["postcopy_vcpu_latency"]) == 2
    assert len(destination["postcopy_latency_dist"]) == 24
    assert sum(destination["postcopy_latency_dist"]) == destination["faults"] > 0
    assert destination["postcopy_latency"] > 0 and destination["postcopy_latency_median_us"] > 0
    assert destination["postcopy_requests"] == source["postcopy_requests"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.kvm
def test_postcopy_live_view_for_people(tmp_path: Path) -> None:
    sent, _ = run_pair(tmp_path, source_json=False, receive_args=[])
    assert "switch-over to post-copy" in sent and "post-copy after 1 round" in sent
    assert "owed" in sent and "requested" in sent  # the live rows' columns
    assert "pages pushed / requested" in sent and "migration completed" in sent
