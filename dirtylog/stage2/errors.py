"""The errors the modelled ioctls return, as exceptions: each keeps the kernel's errno and says what to do."""

from __future__ import annotations

import errno

from dirtylog.errors import DirtylogError


class Stage2Error(DirtylogError):
    """An ioctl of the stage-2 model failed; ``errno`` is what the kernel would have returned (negated)."""

    errno: int = 0


class ModelSettingError(Stage2Error, ValueError):
    """A setting of the model itself (not an ioctl argument) that cannot work."""


class InvalidSlotError(Stage2Error, ValueError):
    """EINVAL: the slot id is outside what KVM accepts, or a memory region is malformed."""

    errno = errno.EINVAL


class NoDirtyBitmapError(Stage2Error, LookupError):
    """ENOENT: the slot has no dirty bitmap (it is not registered, or not logging)."""

    errno = errno.ENOENT


class BadDestinationError(Stage2Error):
    """EFAULT: copy_to_user could not write the log to the caller's buffer."""

    errno = errno.EFAULT
