"""``dirtylog run --snapshot-every``, ``dirtylog snapshot info|merge`` and ``dirtylog restore`` as a user calls them."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from dirtylog.cli import main
from tests.cli.test_cli_basic import json_lines


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, object]]]:
    """A chain taken by ``run --snapshot-every --live`` and its JSON lines."""
    folder = tmp_path_factory.mktemp("chain")
    out = io.StringIO()  # a module fixture cannot use capsys
    with contextlib.redirect_stdout(out):
        assert main(["run", "--memory", "64M", "--vcpus", "2", "--workload", "hotset", "--rate", "5000",
                     "--duration", "1300ms", "--interval", "1s", "--snapshot-every", "400ms", "--snapshot-dir",
                     str(folder), "--live", "--json"]) == 0
    return folder, json_lines(out.getvalue())


@pytest.mark.kvm
def test_run_takes_a_chain_while_the_guest_runs(chain: tuple[Path, list[dict[str, object]]]) -> None:
    folder, records = chain
    snapshots = [record for record in records if "snapshot" in record]
    assert [record["kind"] for record in snapshots] == ["full", "incremental", "incremental"]
    assert all(record["live"] for record in snapshots)
    assert snapshots[1]["parent"] == snapshots[0]["identity"]
    summary = records[-1]["summary"]
    assert isinstance(summary, dict) and summary["snapshots"] == 3 and summary["snapshots_failed"] == 0
    assert sorted(path.name for path in folder.iterdir()) == ["snap-0001.dlsnap", "snap-0002.dlsnap",
                                                              "snap-0003.dlsnap"]


@pytest.mark.kvm
def test_snapshot_info_lists_the_layers(chain: tuple[Path, list[dict[str, object]]],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = chain
    assert main(["snapshot", "info", str(folder / "snap-0003.dlsnap"), "--json"]) == 0
    records = json_lines(capsys.readouterr().out)
    layers, summary = records[:-1], records[-1]["summary"]
    assert [layer["kind"] for layer in layers] == ["full", "incremental", "incremental"]
    assert isinstance(summary, dict) and summary["layers"] == 3
    assert main(["snapshot", "info", str(folder / "snap-0002.dlsnap")]) == 0  # any layer, for people
    out = capsys.readouterr().out
    assert "snap-0001.dlsnap" in out and "restores to state" in out and "snap-0003" not in out


@pytest.mark.kvm
def test_merge_then_restore_the_merged_file(chain: tuple[Path, list[dict[str, object]]], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = chain
    merged = tmp_path / "merged.dlsnap"
    assert main(["snapshot", "merge", str(folder / "snap-0003.dlsnap"), "-o", str(merged), "--json"]) == 0
    (record,) = json_lines(capsys.readouterr().out)
    assert record["layers"] == 3 and merged.exists()
    assert main(["restore", str(merged), "--duration", "300ms", "--interval", "100ms", "--json"]) == 0
    records = json_lines(capsys.readouterr().out)
    summary = records[-1]["summary"]
    assert isinstance(summary, dict) and summary["continued"] is True and summary["digest_checked"] is True


@pytest.mark.kvm
def test_restore_shows_the_guest_continuing(chain: tuple[Path, list[dict[str, object]]],
                                           capsys: pytest.CaptureFixture[str]) -> None:
    folder, _ = chain
    assert main(["restore", str(folder / "snap-0002.dlsnap"), "--duration", "300ms", "--interval", "100ms"]) == 0
    out = capsys.readouterr().out
    assert "vcpu0 progress" in out and "the guest went on from where it was saved" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["run", "--memory", "64M", "--snapshot-every", "1s"], "--snapshot-every and --snapshot-dir go together"),
    (["run", "--memory", "64M", "--live"], "--live is for --snapshot-every"),
    (["run", "--memory", "64M", "--snapshot-every", "1s", "--snapshot-dir", "/tmp", "--live", "--snapshot-mode",
      "uffd"], "use --snapshot-mode log, clear or ring with --live"),
])
def test_snapshot_options_are_checked(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 1
    assert message in capsys.readouterr().err


def test_restoring_something_else_says_what_it_is(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("shopping list\n")
    assert main(["restore", str(path)]) == 1
    assert "is not a dirtylog snapshot" in capsys.readouterr().err
    assert main(["snapshot", "info", str(tmp_path / "missing.dlsnap")]) == 1
    assert "does not exist" in capsys.readouterr().err
