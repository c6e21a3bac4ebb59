"""dirtylog: dirty page logging for virtual machines, on real KVM and as the ARM stage-2 model."""

from dirtylog.errors import DirtylogError
from dirtylog.guest.machine import GuestCrashError, Machine, MachineError

__all__ = ["DirtylogError", "GuestCrashError", "Machine", "MachineError"]
__version__ = "0.1.0"
