"""The error of the migration tools: a migration that failed or was refused, said for the operator."""

from __future__ import annotations

from typing import Any

from dirtylog.errors import DirtylogError


class MigrationError(DirtylogError):
    """A migration failed or was cancelled. On the source side its message ends by saying what became of
    the VM (it keeps running with its memory intact, unless the commit was sent); on the destination side,
    that nothing was resumed there. ``stats`` holds what the source measured up to the failure, when there
    was a source engine to measure it (a ``MigrationStats``; typed loosely so this bottom module imports
    nothing above it)."""

    stats: Any = None


class MigrationParameterError(MigrationError, ValueError):
    """A migration parameter out of range or unknown; raised before anything starts."""
