"""dirtylog: dirty page logging for virtual machines, on real KVM and as the ARM stage-2 model."""

from typing import Any

from dirtylog.bitmap import DirtyBitmap
from dirtylog.errors import DirtylogError
from dirtylog.guest.machine import GuestCrashError, MachineError
from dirtylog.machine import Machine
from dirtylog.migration import Listener, MigrationError, MigrationParameters, Received, migrate
from dirtylog.migration import receive as _receive

__all__ = ["DirtyBitmap", "DirtylogError", "GuestCrashError", "Machine", "MachineError", "MigrationError",
           "MigrationParameters", "migrate", "receive"]
__version__ = "0.1.0"


def receive(listen_on: str | Listener, **options: Any) -> Received:
    """:func:`dirtylog.migration.receive`, whose machine is a :class:`Machine` (dirty logs, snapshots, rates):
    the migration layer builds whatever machine class it is given, and sits below this one."""
    return _receive(listen_on, machine_class=Machine, **options)
