"""Chains of layers: a full snapshot and the incremental layers taken on it, found and checked by identity.

A layer names its parent by *identity* (what the parent restores to, see ``format``), and by a file name as a
hint. :func:`open_chain` follows the hints from the layer asked for down to a full snapshot; when a hinted
file is gone or is another snapshot, it looks for a file with the right identity beside the layer (a chain
merged into one file, renamed), and refuses with a message naming what is missing otherwise. Every layer must
describe the same VM (memory layout, vCPUs).

:class:`ChainArrays` lays a chain out for the compiled loops: the newest layer holding each page wins.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import xxhash

from dirtylog.migration.payload.digest import MULTIPLIERS
from dirtylog.migration.protocol.events import Header
from dirtylog.snapshot import _kernels
from dirtylog.snapshot.errors import SnapshotChainError, SnapshotCorruptError, SnapshotError, SnapshotFormatError
from dirtylog.snapshot.format import CHUNK_PAGES, MAGIC, MAX_CHAIN, SUFFIX, chunk_count, nwords, short
from dirtylog.snapshot.layer import Layer
from dirtylog.units import PAGE_SIZE


def check_chain(layers: Sequence[Layer]) -> None:
    """Refuse a list of layers (base first) that is not one chain of one VM."""
    if not layers:
        raise SnapshotChainError("an empty chain restores to nothing")
    if not layers[0].full:
        raise SnapshotChainError(f"{layers[0].name} is an incremental layer: a chain starts with a full snapshot")
    if len(layers) > MAX_CHAIN:
        raise SnapshotChainError(f"a chain of {len(layers)} layers is longer than {MAX_CHAIN}: merge it "
                                 "(`dirtylog snapshot merge`) and take new layers on the merged file")
    base = layers[0].meta.header
    for parent, child in itertools.pairwise(layers):
        if child.full:
            raise SnapshotChainError(f"{child.name} is a full snapshot, not a layer on {parent.name}")
        if child.parent != parent.identity:
            raise SnapshotChainError(
                f"{parent.name} is not the parent of {child.name}: it restores to state {short(parent.identity)}, "
                f"the layer was taken on {short(child.parent or b'')}")
        header = child.meta.header
        if (header.slots, header.page_size, header.vcpus) != (base.slots, base.page_size, base.vcpus):
            raise SnapshotChainError(f"{child.name} describes another VM (memory layout or vCPUs) than "
                                     f"{layers[0].name}")


@dataclass
class Chain:
    """Open layers, the full snapshot first and the layer asked for last."""

    layers: list[Layer]

    @property
    def top(self) -> Layer:
        return self.layers[-1]

    @property
    def header(self) -> Header:
        return self.top.meta.header

    @property
    def npages(self) -> int:
        return self.top.head.npages

    def __iter__(self) -> Iterator[Layer]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def close(self) -> None:
        for layer in self.layers:
            layer.close()

    def __enter__(self) -> Chain:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def merged_fingerprints(self) -> npt.NDArray[np.uint64]:
        """The fingerprint of every page of the state the chain restores to."""
        merged = np.array(self.layers[0].fingerprints(), dtype=np.uint64)
        for layer in self.layers[1:]:
            held = layer.held_words()
            pages = np.flatnonzero(np.unpackbits(held.view(np.uint8), bitorder="little"))
            merged[pages] = layer.fingerprints()
        return merged

    def check_digest(self, fingerprints: npt.NDArray[np.uint64]) -> None:
        """Refuse a chain whose merged fingerprints do not make the memory digest its top layer recorded."""
        digest = xxhash.xxh3_128_digest(fingerprints.data)
        if digest != self.top.meta.digest:
            raise SnapshotFormatError(
                f"{self.top.name}: the chain's pages do not add up to the memory it recorded (digest "
                f"{digest.hex()[:12]} instead of {self.top.meta.digest.hex()[:12]}): a layer is corrupt")


def open_chain(path: str | os.PathLike[str]) -> Chain:
    """The chain that restores ``path``: its layer and every parent down to a full snapshot, checked."""
    layers = [Layer.open(path)]
    try:
        while not layers[-1].full:
            if len(layers) >= MAX_CHAIN:
                raise SnapshotChainError(f"{layers[0].name} has more than {MAX_CHAIN} layers under it: merge them")
            layers.append(_find_parent(layers[-1]))
        layers.reverse()
        check_chain(layers)
    except BaseException:
        for layer in layers:
            layer.close()
        raise
    return Chain(layers)


def _find_parent(child: Layer) -> Layer:
    """The parent of ``child``: the file its hint names if it is the right one, else a sibling that is."""
    want = child.parent
    assert want is not None
    hint = child.info.get("parent")
    folder = child.path.parent
    wrong = ""
    if isinstance(hint, str) and hint and Path(hint).name == hint:
        candidate = folder / hint
        if candidate.exists():
            try:
                layer = Layer.open(candidate)
            except SnapshotFormatError as error:
                wrong = f"{hint} cannot serve: {error}"
            else:
                if layer.identity == want:
                    return layer
                wrong = f"{hint} is another snapshot (it restores to {short(layer.identity)})"
                layer.close()
        else:
            wrong = f"{hint} is missing"
    for sibling in sorted(folder.glob(f"*{SUFFIX}")):
        if sibling == child.path or (isinstance(hint, str) and sibling.name == hint) or not _looks_like(sibling):
            continue
        try:
            layer = Layer.open(sibling)
        except SnapshotFormatError:
            continue
        if layer.identity == want:
            return layer
        layer.close()
    raise SnapshotChainError(
        f"{child.name} is an incremental layer on state {short(want)}, and no snapshot of that state is beside it "
        f"({wrong or 'it names no parent file'}): put the parent back, or restore a layer whose chain is whole")


def _looks_like(path: Path) -> bool:
    try:
        with path.open("rb") as file:
            return file.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


@dataclass
class ChainArrays:
    """A chain as the compiled loops read it (``_kernels.fill_block``): per layer, its held bitmap and ranks,
    the addresses of its mapped zero bitmap and fingerprints, its file, its chunk checks."""

    held: npt.NDArray[np.uint64]  # (layers, words)
    ranks: npt.NDArray[np.int64]  # (layers, words + 1)
    zero_addresses: npt.NDArray[np.int64]
    fps_addresses: npt.NDArray[np.int64]
    fds: npt.NDArray[np.int64]
    checks: npt.NDArray[np.uint64]  # (layers, chunks)
    checked: npt.NDArray[np.uint8]  # (layers, chunks): checked already
    multipliers: npt.NDArray[np.uint64] = field(default_factory=lambda: MULTIPLIERS)
    _keep: list[object] = field(default_factory=list)  # the mapped arrays the addresses point into

    @classmethod
    def of(cls, chain: Chain) -> ChainArrays:
        count, words, chunks = len(chain), nwords(chain.npages), chunk_count(chain.npages)
        held = np.empty((count, words), dtype=np.uint64)
        ranks = np.empty((count, words + 1), dtype=np.int64)
        keep: list[object] = []
        zero_addresses = np.empty(count, dtype=np.int64)
        fps_addresses = np.empty(count, dtype=np.int64)
        for index, layer in enumerate(chain):
            held[index] = layer.held_words()
            if layer.full:
                ranks[index] = np.arange(words + 1, dtype=np.int64) * 64
            else:
                _kernels.rank_words(held[index], ranks[index])
            zero, fps = layer.zero_words(), layer.fingerprints()
            keep += [zero, fps]
            zero_addresses[index] = zero.ctypes.data
            # An empty layer has no fingerprints; its address is never read.
            fps_addresses[index] = fps.ctypes.data if fps.size else 0
        checks = np.stack([layer.meta.chunk_checks for layer in chain])
        assert checks.shape == (count, chunks)
        return cls(held, ranks, zero_addresses, fps_addresses, np.array([layer.fd for layer in chain], np.int64),
                   checks, np.zeros((count, chunks), dtype=np.uint8), _keep=keep)


def loop_failure(chain: Chain, stats: npt.NDArray[np.int64], status: int) -> SnapshotError:
    """The error for a compiled loop that read ``chain`` and ended with ``status`` (see ``_kernels``)."""
    page, layer = int(stats[_kernels.S_PAGE]), int(stats[_kernels.S_LAYER])
    name = chain.layers[layer].name if 0 <= layer < len(chain) else "the output file"
    code = int(stats[_kernels.S_ERRNO])
    if status == _kernels.CORRUPT_PAGE:
        return SnapshotCorruptError(f"{name}: guest page {page} (address {page * PAGE_SIZE:#x}) is corrupt: its "
                                    "fingerprint does not match")
    if status == _kernels.CORRUPT_INDEX:
        return SnapshotCorruptError(f"{name}: the index of guest pages {page}-{page + CHUNK_PAGES - 1} is corrupt")
    if status == _kernels.SHORT_READ:
        return SnapshotFormatError(f"{name} ends before guest page {page}: the file was cut short while in use")
    if status == _kernels.IO_ERROR:
        return SnapshotError(f"{'writing' if layer < 0 else 'reading'} {name} failed: {os.strerror(code)}")
    if status == _kernels.UFFD_ERROR:
        return SnapshotError(f"the userfaultfd serving guest memory failed: {os.strerror(code)}")
    return SnapshotError(f"stopped before the end (status {status})")
