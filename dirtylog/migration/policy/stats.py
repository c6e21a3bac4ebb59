"""Migration statistics in the words of QEMU's ``query-migrate``, which users already read."""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dirtylog.migration.policy.postcopy import FaultStats
from dirtylog.migration.policy.precopy import RoundStats


def ms(seconds: float | None) -> float | None:
    """Seconds as milliseconds for JSON; None (null) when unknown or infinite (an expected downtime before any page
    rate is known), which JSON cannot carry."""
    return None if seconds is None or not math.isfinite(seconds) else round(seconds * 1e3, 3)

# progress(kind, record): the engines' live reports ("setup", "round", "refused", ...), for CLIs and QMP.
ProgressCallback = Callable[[str, dict[str, Any]], None]


class MigrationStatus(enum.Enum):
    """QEMU's MigrationStatus values that dirtylog's migrations go through."""

    SETUP = "setup"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"  # the destination runs the VM; pages still follow
    POSTCOPY_PAUSED = "postcopy-paused"  # the link broke in post-copy: both sides wait to resume
    POSTCOPY_RECOVER = "postcopy-recover"  # reconnecting to resume
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass
class MigrationStats:
    """Totals of one migration (times in seconds, sizes in bytes, counts in pages), current while it runs."""

    status: MigrationStatus = MigrationStatus.SETUP
    page_size: int = 4096
    total_pages: int = 0
    setup_time: float = 0.0
    total_time: float = 0.0
    downtime: float | None = None
    expected_downtime: float | None = None
    transferred: int = 0
    remaining_pages: int = 0  # still to send in this round (pages dirty since their last send, not yet sent)
    duplicate_pages: int = 0  # zero pages: elided in round 0, sent as markers later
    normal_pages: int = 0  # pages sent with their contents
    dirty_sync_count: int = 0
    throttle: float = 0.0
    dirty_limited: bool = False
    streams: int = 1
    compression: str = "none"
    mode: str = "log"
    encrypted: bool = False
    digest: str = ""
    error: str = ""
    setup_phases: dict[str, float] = field(default_factory=dict)  # seconds per phase of the setup
    switchover: dict[str, float] = field(default_factory=dict)  # ms per phase of the downtime
    rounds: list[RoundStats] = field(default_factory=list)
    # Post-copy (QEMU: ram.postcopy-requests, ram.postcopy-bytes; the destination's blocktime and latencies).
    postcopy: bool = False  # the migration switched to post-copy
    postcopy_reason: str = ""
    postcopy_started: float | None = None  # seconds from the start to the post-copy commit
    postcopy_time: float | None = None  # seconds from the post-copy commit to the last page
    postcopy_pending: int = 0  # pages owed at the switch-over
    postcopy_requests: int = 0  # page requests (source: received; destination: sent)
    postcopy_bytes: int = 0  # wire bytes after the switch-over
    pages_pushed: int = 0  # pages sent (source) or installed (destination) in the background
    pages_requested: int = 0  # pages sent (or installed) in answer to a request
    recoveries: int = 0  # times a broken post-copy link was resumed
    paused_time: float = 0.0  # seconds post-copy spent paused, its link broken
    #: Who served this side's faults or answers: "compiled", or "python: <why>" (engine/answer_lane.py, fault_lane.py)
    fault_path: str = ""
    faults: FaultStats | None = None  # the destination's fault handler (blocktime, latency)
    #: (seconds since post-copy began, pages still owed, page requests so far), sampled while post-copy runs
    postcopy_timeline: list[tuple[float, int, int]] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        """Wire bytes per second after the setup, as QEMU's final ``mbps``: setup (connecting, building the
        destination VM, loading compiled passes) moves no pages, and on a first run it takes seconds."""
        transfer_time = self.total_time - self.setup_time
        return self.transferred / transfer_time if transfer_time > 0 else 0.0

    @property
    def dirty_pages_rate(self) -> float:
        """Pages per second the guest dirtied in the last round (QEMU: dirty-pages-rate)."""
        precopy = [r for r in self.rounds if not r.final]
        return precopy[-1].dirty_rate if precopy else 0.0

    def as_dict(self) -> dict[str, Any]:
        """The statistics as QEMU's query-migrate would name them (snake_case), plus the rounds."""
        return {
            "status": self.status.value,
            "total_time_ms": ms(self.total_time),
            "setup_time_ms": ms(self.setup_time),
            "setup_phases_ms": {name: ms(seconds) for name, seconds in self.setup_phases.items()},
            "expected_downtime_ms": ms(self.expected_downtime),
            "downtime_ms": ms(self.downtime),
            "ram": {
                "transferred": self.transferred,
                "remaining": self.remaining_pages * self.page_size,
                "total": self.total_pages * self.page_size,
                "duplicate": self.duplicate_pages,
                "normal": self.normal_pages,
                "normal_bytes": self.normal_pages * self.page_size,
                "dirty_pages_rate": round(self.dirty_pages_rate),
                "mbps": round(self.throughput * 8 / 1e6, 1),
                "dirty_sync_count": self.dirty_sync_count,
                "page_size": self.page_size,
            },
            "cpu_throttle_percentage": round(self.throttle * 100),
            "dirty_limit_active": self.dirty_limited,
            "streams": self.streams,
            "compression": self.compression,
            "mode": self.mode,
            "encrypted": self.encrypted,
            "digest": self.digest,
            "error": self.error,
            "switchover_ms": self.switchover,
            "rounds": [r.as_dict(self.page_size) for r in self.rounds],
            "postcopy": self.postcopy_dict() if self.postcopy else None,
        }

    def postcopy_dict(self) -> dict[str, Any]:
        """Post-copy's figures (QEMU's names in snake_case where it has them)."""
        out: dict[str, Any] = {
            "reason": self.postcopy_reason, "started_ms": ms(self.postcopy_started),
            "postcopy_time_ms": ms(self.postcopy_time), "pending_pages": self.postcopy_pending,
            "postcopy_requests": self.postcopy_requests, "postcopy_bytes": self.postcopy_bytes,
            "pages_pushed": self.pages_pushed, "pages_requested": self.pages_requested,
            "recoveries": self.recoveries, "paused_ms": ms(self.paused_time), "fault_path": self.fault_path,
        }
        if self.faults is not None:
            out.update(self.faults.as_dict())
        return out
