"""Errors of snapshots: every one says what went wrong, which file, and what to do."""

from __future__ import annotations

from dirtylog.errors import DirtylogError


class SnapshotError(DirtylogError):
    """A snapshot could not be taken, read, merged or restored."""


class SnapshotFormatError(SnapshotError):
    """A file is not a whole, intact dirtylog snapshot: foreign, truncated, of another version, or corrupt."""


class SnapshotCorruptError(SnapshotFormatError):
    """A page or a piece of a snapshot's page index failed its check when it was read (at restore or merge)."""


class SnapshotChainError(SnapshotError):
    """A layer's parent is missing or is not the snapshot it was taken on, or an incremental snapshot was asked
    for on a parent the machine's dirty log does not count from."""


class SnapshotWriteError(SnapshotError):
    """Writing a snapshot failed (disk full, file size limit, I/O error): nothing was saved, no file was left, and
    the pages it would have held are owed to the next snapshot."""
