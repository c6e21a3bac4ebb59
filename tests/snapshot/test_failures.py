"""What goes wrong, on real KVM: a disk that fills up or a file size limit mid-snapshot (nothing saved, nothing
lost: Firecracker #4545), corrupt, truncated and foreign files (refused, never half-restored), and chains with
a missing or wrong parent."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from dirtylog.guest.machine import State
from dirtylog.machine import Machine
from dirtylog.snapshot.errors import (
    SnapshotChainError,
    SnapshotCorruptError,
    SnapshotFormatError,
    SnapshotWriteError,
)
from dirtylog.snapshot.format import DATA_OFFSET, HEAD_SIZE, nwords
from dirtylog.snapshot.layer import Layer
from dirtylog.units import PAGE_SIZE
from tests.helpers import wait_for
from tests.snapshot.helpers import corrupt, paused_memory, restored_memory

pytestmark = pytest.mark.kvm


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """RLIMIT_FSIZE for this process, with SIGXFSZ ignored so that a write past it fails with EFBIG."""
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)


@pytest.mark.parametrize("live", [False, True])
def test_a_snapshot_past_the_file_size_limit_saves_nothing_and_loses_nothing(tmp_path: Path, live: bool) -> None:
    with Machine("64M", 2, "random", rate=20000) as machine:
        machine.start()
        base = machine.snapshot(tmp_path / "base.dlsnap")
        wait_for(lambda: machine.progress > 4000, what="guest writes")
        with file_size_limit(64 * PAGE_SIZE), pytest.raises(SnapshotWriteError, match="file size limit") as failure:
            machine.snapshot(tmp_path / "failed.dlsnap", base, live=live)
        assert "are kept for the next snapshot" in str(failure.value)
        assert not list(tmp_path.glob("failed*"))  # no file, whole or partial
        assert machine.state is State.RUNNING
        wait_for(lambda: machine.progress > 8000, what="guest writes")
        reference = paused_memory(machine)
        retry = machine.snapshot(tmp_path / "retry.dlsnap", base, live=live)  # same parent: the owed pages too
    assert retry.parent == base.identity
    assert np.array_equal(restored_memory(retry.path), reference)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, to fill up."""
    mount = tmp_path / "small"
    mount.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True,
                            text=True, check=False)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_saves_nothing_and_the_next_layer_holds_the_pages(tmp_path: Path, small_disk: Path) -> None:
    with Machine("64M", 2, "random", rate=20000) as machine:
        machine.start()
        base = machine.snapshot(tmp_path / "base.dlsnap")
        wait_for(lambda: machine.progress > 4000, what="guest writes")  # far more than 2 MiB of pages
        with pytest.raises(SnapshotWriteError, match="disk is full"):
            machine.snapshot(small_disk / "layer.dlsnap", base)
        assert not os.listdir(small_disk)
        reference = paused_memory(machine)
        layer = machine.snapshot(tmp_path / "layer.dlsnap", base)
    assert np.array_equal(restored_memory(layer.path), reference)


@dataclass
class Chain:
    """A full snapshot and a layer of a 64 MiB guest, with the memory each restores to."""

    base: Path
    layer: Path
    base_memory: np.ndarray
    layer_memory: np.ndarray
    code_page: int


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Chain:
    folder = tmp_path_factory.mktemp("chain")
    with Machine("64M", 2, "random", rate=20000) as machine:
        machine.start()
        wait_for(lambda: machine.progress > 2000, what="guest writes")
        base_memory = paused_memory(machine)
        base = machine.snapshot(folder / "base.dlsnap")
        machine.resume()
        wait_for(lambda: machine.progress > 6000, what="guest writes")
        layer_memory = paused_memory(machine)
        layer = machine.snapshot(folder / "layer.dlsnap", base)
        code_page = machine.arch.layout.code_addr // PAGE_SIZE
    return Chain(base.path, layer.path, base_memory, layer_memory, code_page)


def copy_chain(chain: Chain, folder: Path) -> tuple[Path, Path]:
    base, layer = folder / chain.base.name, folder / chain.layer.name
    shutil.copyfile(chain.base, base)
    shutil.copyfile(chain.layer, layer)
    return base, layer


def test_the_fixture_chain_restores(chain: Chain) -> None:
    assert np.array_equal(restored_memory(chain.layer), chain.layer_memory)


@pytest.mark.parametrize(("content", "says"), [
    (b"", "is empty"),
    (b"#!/bin/sh\necho not a snapshot\n", "not a dirtylog snapshot"),
    (b"DIRTYLOG-FILE\x01\x00\x00" + bytes(60), "migration stream file"),
])
def test_foreign_files_are_refused_saying_what_they_are(tmp_path: Path, content: bytes, says: str) -> None:
    path = tmp_path / "foreign.dlsnap"
    path.write_bytes(content)
    with pytest.raises(SnapshotFormatError, match=says):
        Machine.restore(path)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SnapshotFormatError, match="does not exist"):
        Machine.restore(tmp_path / "nothing.dlsnap")


@pytest.mark.parametrize("keep", [0, 100, HEAD_SIZE, HEAD_SIZE + 5 * PAGE_SIZE, -1])
def test_truncated_files_are_refused_before_anything_runs(chain: Chain, tmp_path: Path, keep: int) -> None:
    base, layer = copy_chain(chain, tmp_path)
    size = layer.stat().st_size
    os.truncate(layer, size - 1 if keep < 0 else keep)
    with pytest.raises(SnapshotFormatError, match=r"truncated|cut short|is empty"):
        Machine.restore(layer)
    os.truncate(base, base.stat().st_size // 2)  # the parent, too
    shutil.copyfile(chain.layer, layer)
    with pytest.raises(SnapshotChainError, match=r"cannot serve.*truncated"):
        Machine.restore(layer)


def test_a_corrupt_head_or_metadata_is_refused_before_anything_runs(chain: Chain, tmp_path: Path) -> None:
    _, layer = copy_chain(chain, tmp_path)
    corrupt(layer, 60)
    with pytest.raises(SnapshotFormatError, match="head is corrupt"):
        Machine.restore(layer)
    shutil.copyfile(chain.layer, layer)
    corrupt(layer, layer.stat().st_size - 40)  # inside the metadata, at the end of the file
    with pytest.raises(SnapshotFormatError, match="metadata is corrupt"):
        Machine.restore(layer)


def nonzero_page_offset(path: Path, skip: int = 0) -> tuple[int, int]:
    """(guest page, file offset) of a non-zero page the layer holds."""
    with Layer.open(path) as layer:
        held = np.flatnonzero(np.unpackbits(layer.held_words().view(np.uint8), bitorder="little"))
        zero = np.unpackbits(layer.zero_words().view(np.uint8), bitorder="little").astype(bool)
        ranks = np.flatnonzero(~zero[held])
        rank = int(ranks[skip])
        return int(held[rank]), DATA_OFFSET + rank * PAGE_SIZE + 123


def test_a_corrupt_page_is_refused_before_the_guest_can_read_it(chain: Chain, tmp_path: Path) -> None:
    _, layer = copy_chain(chain, tmp_path)
    page, offset = nonzero_page_offset(layer, skip=10)
    corrupt(layer, offset)
    with pytest.raises(SnapshotCorruptError, match=f"guest page {page} .*is corrupt"):
        Machine.restore(layer, lazy=False)  # everything checked first: nothing ran
    restored = Machine.restore(layer, resume=False)
    try:
        with pytest.raises(SnapshotCorruptError, match=f"guest page {page} "):
            restored.wait_restored(30)
        with pytest.raises(SnapshotCorruptError):
            restored.start()  # it never runs
        # The host may read the rest; the corrupt block reads as zeros, never as the corrupt bytes.
        block = restored.memory[page // 64 * 64 * PAGE_SIZE:(page // 64 + 1) * 64 * PAGE_SIZE]
        assert not block.any()
    finally:
        restored.stop()


def test_a_corrupt_page_stops_a_running_restored_guest_before_it_reads_it(chain: Chain, tmp_path: Path) -> None:
    base, layer = copy_chain(chain, tmp_path)
    corrupt(base, DATA_OFFSET + chain.code_page * PAGE_SIZE + 40)  # the guest's program: needed first
    restored = Machine.restore(layer)
    try:
        with pytest.raises(SnapshotCorruptError, match=f"base.dlsnap: guest page {chain.code_page} "):
            restored.wait_restored(30)
        assert restored.state is State.PAUSED
        with pytest.raises(SnapshotCorruptError):
            restored.check()
        with pytest.raises(SnapshotCorruptError):
            restored.resume()
    finally:
        restored.stop()


def test_a_corrupt_index_is_refused(chain: Chain, tmp_path: Path) -> None:
    _, layer = copy_chain(chain, tmp_path)
    with Layer.open(layer) as opened:
        index = opened.head.index_offset
        fingerprints = index + 16 * nwords(opened.head.npages)  # after the zero and held bitmaps
    corrupt(layer, fingerprints + 8 * 7 + 3)  # the fingerprint of the layer's eighth page
    with pytest.raises(SnapshotCorruptError, match="index of guest pages"):
        Machine.restore(layer, lazy=False)


def test_a_layer_without_its_parent_is_refused(chain: Chain, tmp_path: Path) -> None:
    layer = tmp_path / chain.layer.name
    shutil.copyfile(chain.layer, layer)
    with pytest.raises(SnapshotChainError, match=r"no snapshot of that state is beside it \(base.dlsnap is missing"):
        Machine.restore(layer)


def test_a_layer_on_another_parent_is_refused(chain: Chain, tmp_path: Path) -> None:
    _, layer = copy_chain(chain, tmp_path)
    with Machine("64M", 2, "random") as other:  # same geometry, another state
        other.start()
        other.snapshot(tmp_path / "base.dlsnap")  # in the parent's place, under its name
    with pytest.raises(SnapshotChainError, match=r"base\.dlsnap is another snapshot"):
        Machine.restore(layer)


def test_a_parent_renamed_is_found_by_identity(chain: Chain, tmp_path: Path) -> None:
    base, layer = copy_chain(chain, tmp_path)
    base.rename(tmp_path / "renamed.dlsnap")
    assert np.array_equal(restored_memory(layer), chain.layer_memory)
