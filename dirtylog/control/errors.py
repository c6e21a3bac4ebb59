"""QMP errors: the error classes of QEMU's ``qapi/error.json``, and the exception handlers raise."""

from __future__ import annotations

import enum
import sys
import traceback

from dirtylog.errors import DirtylogError


class ErrorClass(enum.StrEnum):
    """QEMU's QapiErrorClass: what a client may branch on (the description is for people)."""

    GENERIC = "GenericError"
    COMMAND_NOT_FOUND = "CommandNotFound"
    DEVICE_NOT_ACTIVE = "DeviceNotActive"
    DEVICE_NOT_FOUND = "DeviceNotFound"
    KVM_MISSING_CAP = "KVMMissingCap"


class QmpError(DirtylogError):
    """A command failed; the client gets ``{"error": {"class": ..., "desc": ...}}`` and nothing changed."""

    def __init__(self, desc: str, error_class: ErrorClass = ErrorClass.GENERIC) -> None:
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


class ControlError(DirtylogError):
    """The control socket itself cannot be set up or reached (bad address, socket in use, refused)."""


def report_internal_error(where: str) -> None:
    """Print the exception being handled to stderr: a bug in one command or event must cost that
    command or event, never the monitor every client depends on, and must still be seen."""
    print(f"dirtylog: internal error in {where} (please report it):", file=sys.stderr)
    traceback.print_exc(file=sys.stderr)
