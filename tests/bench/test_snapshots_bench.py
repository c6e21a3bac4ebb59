"""bench/snapshots.py in its quick mode: every measurement runs and reports what the docs quote."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import snapshots


@pytest.mark.kvm
def test_the_quick_bench_measures_everything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert snapshots.main(["--quick", "--json", "--dir", str(tmp_path)]) == 0
    results = json.loads(capsys.readouterr().out)
    kinds = [(row["kind"], row["dirtied"]) for row in results["create"]]
    assert kinds == [("full", "all"), ("incremental", "1%"), ("incremental", "10%"), ("incremental", "100%"),
                     ("full (live)", "all"), ("incremental (live)", "10%")]
    assert all(row["ratio"] > 0 for row in results["create"] if "ratio" in row)
    assert [row["guest_rate"] for row in results["live"]] == ["unlimited", "20000/s per vCPU"]
    assert {(row["cache"], row["vm"]) for row in results["restore"]} == {("warm", "built"), ("cold", "built"),
                                                                       ("warm", "prepared")}
    assert all(0 < row["first_served_ms"] <= row["resident_ms"] for row in results["restore"])
    assert list(tmp_path.iterdir()) == []  # nothing left behind
