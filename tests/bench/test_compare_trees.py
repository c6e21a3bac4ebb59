"""bench/compare_trees.py: each run imports dirtylog from the tree it names, in processes of its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.kvm
def test_runs_alternate_between_trees_and_import_only_the_tree_under_test(tmp_path: Path) -> None:
    # The same tree twice, reached by two paths: each run must import dirtylog from the path it was given.
    link = tmp_path / "same-tree"
    link.symlink_to(ROOT)
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "compare_trees.py"), "--trees", str(ROOT), str(link),
                           "--pairs", "1", "--memory", "64M", "--json"], capture_output=True, text=True, timeout=300,
                          check=True)
    result = json.loads(done.stdout)
    assert [(run["pair"], run["tree"]) for run in result["runs"]] == [(0, "A"), (0, "B")]
    assert all(run["status"] == "completed" and run["destination_completed"] for run in result["runs"])
    assert [run["dirtylog"] for run in result["runs"]] == [f"{ROOT}/dirtylog/__init__.py",
                                                          f"{link}/dirtylog/__init__.py"]
    assert result["summary"]["pairs"] == 1 and result["summary"]["round0_gbps"]["ratio"] > 0


def test_a_directory_that_is_no_tree_is_refused(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "compare_trees.py"), "--trees", str(ROOT),
                           str(tmp_path)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "is not a dirtylog source tree" in done.stderr
