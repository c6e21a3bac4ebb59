"""The lab's pure parts: the newc archive (read back by GNU cpio), apt sources parsing, the guest payload."""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path

import pytest

from dirtylog.lab import debian, environment
from dirtylog.lab.cpio import CpioWriter
from dirtylog.lab.errors import RegistryError


@pytest.mark.skipif(shutil.which("cpio") is None, reason="GNU cpio is not installed (apt-get install cpio)")
def test_cpio_archives_read_back_with_gnu_cpio(tmp_path: Path) -> None:
    out = io.BytesIO()
    writer = CpioWriter(out)
    writer.file("a/b/c.txt", b"hello", 0o600)
    writer.symlink("a/link", "b/c.txt")
    writer.file("odd", b"x" * 5)
    writer.close()
    done = subprocess.run(["cpio", "-idm", "--quiet"], input=out.getvalue(), cwd=tmp_path, check=True)
    assert done.returncode == 0
    assert (tmp_path / "a/b/c.txt").read_bytes() == b"hello"
    assert (tmp_path / "a/b/c.txt").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "a/link").readlink() == Path("b/c.txt")
    assert (tmp_path / "odd").read_bytes() == b"xxxxx"


def test_mirrors_come_from_the_hosts_sources_in_both_formats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DIRTYLOG_DEBIAN_MIRROR", raising=False)
    monkeypatch.delenv("DIRTYLOG_DEBIAN_SECURITY_MIRROR", raising=False)
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d/debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n"
        "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n")
    assert debian.host_mirrors(tmp_path) == debian.Mirrors("http://mirror.example/debian",
                                                           "http://mirror.example/debian-security")
    (tmp_path / "sources.list.d/debian.sources").unlink()
    (tmp_path / "sources.list").write_text("deb [arch=amd64] http://other.example/debian bookworm main\n")
    assert debian.host_mirrors(tmp_path).security == "http://other.example/debian-security"
    (tmp_path / "sources.list").write_text("# nothing\n")
    with pytest.raises(RegistryError, match="DIRTYLOG_DEBIAN_MIRROR"):
        debian.host_mirrors(tmp_path)


def test_the_payload_carries_the_source_tree_and_the_command() -> None:
    data = environment.payload(["dirtylog", "track", "--verify"], environment={"NO_COLOR": "1"})
    assert b"opt/dirtylog/src/dirtylog/guest/arm64.py" in data
    assert b"dirtylog track --verify\n" in data
    assert b"export NO_COLOR=1" in data
    assert data.rstrip(b"\0").endswith(b"TRAILER!!!")


def test_an_unknown_kernel_is_refused_by_name() -> None:
    with pytest.raises(environment.LabError, match="unknown kernel 'debian11'"):
        environment.build("debian11")
