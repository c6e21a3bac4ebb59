"""Live migration of a running machine, in tiers, each importing only those below it::

    engine/      source and destination drivers, streams, the recording peer of file streams
    transports/  TCP, Unix sockets and files behind one small channel interface
    policy/      pure: the pre-copy controller, the migration parameters, QEMU-named statistics
    payload/     page batches from and into guest memory, zero pages, digests
    protocol/    sans-io: events, their bytes, framing, authentication, the rules, the connection

``keys`` reads pre-shared key files; ``errors`` holds MigrationError.
"""

from dirtylog.migration.engine.destination import Listener, Received, receive
from dirtylog.migration.engine.source import migrate, preload
from dirtylog.migration.errors import MigrationError
from dirtylog.migration.policy.parameters import MigrationParameters
from dirtylog.migration.policy.stats import MigrationStats, MigrationStatus

__all__ = ["Listener", "MigrationError", "MigrationParameters", "MigrationStats", "MigrationStatus", "Received",
           "migrate", "preload", "receive"]
