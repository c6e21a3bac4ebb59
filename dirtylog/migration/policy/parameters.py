"""Everything a user sets about one migration, with its defaults said once.

:class:`MigrationParameters` is the pre-copy policy (:class:`PrecopyPolicy`, which the pure controller
reads) plus how the stream runs: streams, zero pages, compression, the dirty-log mode, batch size and
timeouts. ``migrate()``, the CLI and the QMP socket all build one with :meth:`MigrationParameters.parse`,
which takes people's units (``"50ms"``, ``"1G"``) and names what it does not know.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dirtylog.migration.errors import MigrationParameterError
from dirtylog.migration.policy.precopy import PrecopyPolicy
from dirtylog.migration.protocol.events import CODECS, Codec
from dirtylog.tracking.base import TRACKING_MODES, TrackingMode
from dirtylog.units import UnitError, parse_duration, parse_rate

MAX_STREAMS = 64

#: Parameters given as durations (seconds, or strings like "50ms") and as rates (bytes/s, or "1G").
_DURATIONS = ("downtime_limit", "max_time", "connect_timeout", "io_timeout", "switchover_timeout", "resume_timeout")
_RATES = ("bandwidth",)


@dataclass(frozen=True)
class MigrationParameters(PrecopyPolicy):
    """The policy, and how the stream runs. Times in seconds, sizes in bytes, rates in bytes per second."""

    streams: int = 1
    zero_pages: bool = True  # elide zero pages (not sent in round 0, markers later)
    compression: Codec = "none"
    mode: TrackingMode = "log"
    batch_pages: int = 1024  # 4 MiB of pages per frame: fewer per-frame costs (bench/migration.py)
    connect_timeout: float = 10.0
    io_timeout: float = 30.0
    switchover_timeout: float | None = None  # None: derived from the downtime limit (switchover_deadline)
    encrypt: bool | None = None  # None: when the bytes leave this host (not loopback TCP or a Unix socket)
    # After the post-copy commit a broken link pauses the migration; the source reconnects (to ``resume_to``, by
    # default the address it migrated to) until ``resume_timeout`` (None: for as long as the process lives).
    resume_to: str | None = None
    resume_timeout: float | None = None
    # Post-copy's fault path (the source's answers, the destination's requests and installs) in compiled code
    # without the GIL where this host can (engine/answer_lane.py); False keeps it in Python (to compare them).
    compiled_faults: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.streams <= MAX_STREAMS:
            raise MigrationParameterError(f"streams must be between 1 and {MAX_STREAMS}, got {self.streams}")
        if self.compression not in CODECS:
            raise MigrationParameterError(f"compression {self.compression!r} is not one of {', '.join(CODECS)}")
        if self.mode not in TRACKING_MODES:
            raise MigrationParameterError(f"dirty-log mode {self.mode!r} is not one of {', '.join(TRACKING_MODES)}")
        if self.dirty_limit and self.mode != "ring":
            raise MigrationParameterError(
                "the dirty limit measures each vCPU's dirty rate with the dirty ring: use mode 'ring'")
        if not 1 <= self.batch_pages <= 4096:
            raise MigrationParameterError(f"batch of {self.batch_pages} pages: choose 1 to 4096 pages per frame")
        if self.postcopy and self.streams != 1:
            raise MigrationParameterError(f"post-copy runs on one stream and its own post-copy channel: use streams=1, "
                                          f"not {self.streams}")
        if self.resume_timeout is not None and self.resume_timeout <= 0:
            raise MigrationParameterError(f"resume timeout must be positive, got {self.resume_timeout} s")
        if self.switchover_timeout is not None and self.switchover_timeout <= 0:
            raise MigrationParameterError(f"switch-over timeout must be positive, got {self.switchover_timeout} s")
        for name in ("connect_timeout", "io_timeout"):
            if getattr(self, name) <= 0:
                raise MigrationParameterError(f"{name.replace('_', ' ')} must be positive, got {getattr(self, name)} s")

    @classmethod
    def parse(cls, base: MigrationParameters | None = None, **changes: Any) -> MigrationParameters:
        """``base`` (default: the defaults) with ``changes``, durations and rates also as strings."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise MigrationParameterError(f"unknown migration parameter(s) {', '.join(unknown)}; known: "
                                          f"{', '.join(sorted(known))}")
        values = dict(changes)
        try:
            for name in _DURATIONS:
                if isinstance(values.get(name), str):
                    values[name] = parse_duration(values[name])
            for name in _RATES:
                if isinstance(values.get(name), str):
                    values[name] = float(parse_rate(values[name]))
        except UnitError as error:
            raise MigrationParameterError(str(error)) from None
        return dataclasses.replace(base or cls(), **values)

    @property
    def switchover_deadline(self) -> float:
        """Seconds the guest may stay paused for the switch-over before the source gives up and resumes it:
        the setting, or 20 times the downtime limit within [1 s, 5 s] (the final round is expected to fit the
        limit; this leaves room for a slow Verified without holding a guest paused for the whole I/O timeout)."""
        if self.switchover_timeout is not None:
            return self.switchover_timeout
        return min(5.0, max(1.0, 20 * self.downtime_limit))

    def batch_pages_for(self, page_size: int) -> int:
        """Pages per frame: ``batch_pages``, fewer under a low bandwidth cap, so that one frame takes at most
        50 ms on the link and a time limit or a cancel is heard within a frame, not within minutes."""
        if self.bandwidth is None:
            return self.batch_pages
        return max(1, min(self.batch_pages, int(self.bandwidth * 0.05 / page_size)))
