"""The root of dirtylog's exceptions: every error we raise on purpose says what was wrong and what to do."""

from __future__ import annotations


class DirtylogError(Exception):
    """Base of every error dirtylog raises on purpose; its message is meant for the user."""
