"""What can go wrong building or booting the arm64 lab, each with what to do about it."""

from __future__ import annotations

from dirtylog.errors import DirtylogError


class LabError(DirtylogError):
    """The arm64 lab could not be built or run."""


class QemuMissingError(LabError):
    """``qemu-system-aarch64`` is not installed."""


class RegistryError(LabError):
    """A package registry (Debian's archive or PyPI) could not be reached or lacks a package."""


class BootError(LabError):
    """The arm64 system did not boot, or ended without reporting the command's exit status."""
