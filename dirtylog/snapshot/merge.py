"""Collapsing a chain into one full snapshot, and describing a chain for people (``dirtylog snapshot``).

:func:`merge` reads the state a chain restores to — every page from the newest layer holding it, each checked
against its fingerprint — and writes it as one full snapshot with the *same identity* as the layer it was
asked for (the same state), so layers taken on that layer still find their parent in the merged file. It is
Firecracker's ``snapshot-editor edit-memory rebase`` without the editing: the result is checked against the
chain's memory digest before it is named.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from dirtylog.snapshot import _kernels
from dirtylog.snapshot.chain import ChainArrays, loop_failure, open_chain
from dirtylog.snapshot.errors import SnapshotChainError, SnapshotCorruptError
from dirtylog.snapshot.format import Kind
from dirtylog.snapshot.writer import LayerWriter


@dataclass(frozen=True)
class Merged:
    """What a merge wrote."""

    path: Path
    layers: int
    pages: int
    zero_pages: int
    disk_bytes: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "layers": self.layers, "pages": self.pages, "zero_pages": self.zero_pages,
                "disk_bytes": self.disk_bytes, "seconds": round(self.seconds, 3)}


def merge(path: str | os.PathLike[str], out: str | os.PathLike[str]) -> Merged:
    """Write the state the chain of ``path`` restores to as one full snapshot at ``out``."""
    began = time.perf_counter()
    _kernels.load_kernels()
    out = Path(out)
    with open_chain(path) as chain:
        if any(out.exists() and out.resolve() == layer.path.resolve() for layer in chain):
            raise SnapshotChainError(f"{out} is a layer of the chain being merged: write the merged snapshot elsewhere")
        arrays = ChainArrays.of(chain)
        writer = LayerWriter(out, chain.npages, None)
        try:
            control = np.zeros(_kernels.CONTROL_SIZE, dtype=np.int64)
            stats = np.zeros(_kernels.STATS_SIZE, dtype=np.int64)
            status = _kernels.merge_layers(arrays.held, arrays.ranks, arrays.zero_addresses, arrays.fps_addresses,
                                           arrays.fds, arrays.checks, arrays.checked, arrays.multipliers, writer.fd,
                                           writer.fps, writer.zero, control, stats)
            if status != _kernels.DONE:
                failure = loop_failure(chain, stats, status)
                raise type(failure)(f"{failure}; nothing was written to {out}")
            top = chain.top
            if xxhash.xxh3_128_digest(writer.fps.data) != top.meta.digest:
                raise SnapshotCorruptError(f"the pages of {top.name}'s chain do not add up to the memory it recorded; "
                                           f"nothing was written to {out}")
            info = dict(top.info, created=time.time(), sequence=0, parent=None, pages=chain.npages,
                        zero_pages=int(stats[_kernels.S_ZERO_PAGES]), merged_from=[layer.name for layer in chain])
            writer.finish(top.meta.header, top.meta.vcpu_states, top.meta.digest, info, None)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        layers = len(chain)
    status_ = os.stat(out)
    return Merged(out, layers, chain.npages, int(stats[_kernels.S_ZERO_PAGES]), status_.st_blocks * 512,
                  time.perf_counter() - began)


def describe(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Each layer of the chain of ``path``, base first: what it holds, what it cost, what it restores to."""
    rows = []
    with open_chain(path) as chain:
        for depth, layer in enumerate(chain):
            info = layer.info
            rows.append({
                "layer": depth, "path": str(layer.path), "name": layer.name,
                "kind": "full" if layer.head.kind is Kind.FULL else "incremental",
                "created": info.get("created"), "mode": info.get("mode"), "live": info.get("live"),
                "pages": layer.head.held, "zero_pages": info.get("zero_pages"),
                "file_bytes": layer.head.file_length, "disk_bytes": layer.disk_bytes,
                "pause_ms": info.get("pause_ms"), "identity": layer.identity.hex(),
                "parent": None if layer.parent is None else layer.parent.hex(),
                "restores_to": {"memory_bytes": layer.meta.header.memory_bytes, "vcpus": layer.meta.header.vcpus,
                                "slots": len(layer.meta.header.slots),
                                "workload": layer.meta.header.workload.get("name"),
                                "vcpu_progress": info.get("vcpu_progress"), "digest": layer.meta.digest.hex()},
                "merged_from": info.get("merged_from"),
            })
    return rows
