"""dirtylog: dirty page logging for virtual machines, on real KVM and as the ARM stage-2 model."""

from dirtylog.bitmap import DirtyBitmap
from dirtylog.errors import DirtylogError
from dirtylog.guest.machine import GuestCrashError, MachineError
from dirtylog.machine import Machine
from dirtylog.migration import MigrationError, MigrationParameters, migrate, receive

__all__ = ["DirtyBitmap", "DirtylogError", "GuestCrashError", "Machine", "MachineError", "MigrationError",
           "MigrationParameters", "migrate", "receive"]
__version__ = "0.1.0"
