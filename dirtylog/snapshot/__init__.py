"""Snapshots of machines: full, incremental and live, in chains, restored in milliseconds.

A snapshot is a migration to a file, cut where a file must differ from a stream: the VM's description, vCPU
states and memory digest are the migration stream's frames (``format``), while memory is a page-aligned image
that a restore installs on first touch instead of reading it up front (``restore``). Incremental layers come
from a dirty log kept between snapshots (``session``); layers find their parents by identity (``chain``) and
collapse into one full snapshot (``merge``). The loops that touch guest memory are compiled and run without
the GIL (``_kernels``). From Python, use ``Machine.snapshot`` and ``Machine.restore`` (``dirtylog.machine``);
docs/snapshots.md describes the format and its guarantees.
"""

from dirtylog.snapshot.errors import (
    SnapshotChainError,
    SnapshotCorruptError,
    SnapshotError,
    SnapshotFormatError,
    SnapshotWriteError,
)

__all__ = ["SnapshotChainError", "SnapshotCorruptError", "SnapshotError", "SnapshotFormatError", "SnapshotWriteError"]
