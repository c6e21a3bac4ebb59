"""``query-migrate`` answers built from dirtylog's statistics: pure functions, QEMU's ``MigrationInfo``.

The engine's :class:`~dirtylog.migration.MigrationStats` already follows QEMU's vocabulary; here it
is laid out as QEMU lays out ``MigrationInfo`` (``qapi/migration.json``), member by member, with QEMU's
rules for which members appear when: ``ram`` while active or completed, ``expected-downtime`` while
active, ``downtime`` once completed, ``error-desc`` once failed, ``cpu-throttle-percentage`` while
throttling. Times are milliseconds, sizes bytes, rates pages or megabits per second.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dirtylog.migration import MigrationStats
from dirtylog.migration.transports import Endpoint

POSTCOPY_STATES = frozenset({"postcopy-active", "postcopy-paused", "postcopy-recover"})
ACTIVE_STATES = frozenset({"setup", "active", "cancelling"}) | POSTCOPY_STATES
RAM_STATES = frozenset({"active", "cancelling", "completed"}) | POSTCOPY_STATES


@dataclass(frozen=True)
class Timing:
    """When the migration began and ended (``time.perf_counter`` seconds; ``ended`` None while running)."""

    started: float
    ended: float | None
    now: float

    @property
    def elapsed(self) -> float:
        return (self.ended if self.ended is not None else self.now) - self.started


def _ms(seconds: float) -> int:
    return round(seconds * 1e3)


def ram_stats(stats: MigrationStats, timing: Timing, *, multifd: bool) -> dict[str, Any]:
    """QEMU's MigrationStats (every member is mandatory there, so all are present here)."""
    precopy_rounds = [r for r in stats.rounds if not r.final]
    final_bytes = sum(r.bytes for r in stats.rounds if r.final)
    moving = max(timing.elapsed - stats.setup_time, 0.0)
    throughput = stats.throughput if timing.ended is not None else (stats.transferred / moving if moving else 0.0)
    pages_per_second = precopy_rounds[-1].page_rate if precopy_rounds else 0.0
    return {
        "transferred": stats.transferred,
        "remaining": max(stats.remaining_pages, 0) * stats.page_size,
        "total": stats.total_pages * stats.page_size,
        "duplicate": stats.duplicate_pages,
        "normal": stats.normal_pages,
        "normal-bytes": stats.normal_pages * stats.page_size,
        "dirty-pages-rate": round(stats.dirty_pages_rate),
        "mbps": round(throughput * 8 / 1e6, 3),
        "dirty-sync-count": stats.dirty_sync_count,
        "postcopy-requests": stats.postcopy_requests,
        "page-size": stats.page_size,
        "multifd-bytes": stats.transferred if multifd else 0,
        "pages-per-second": round(pages_per_second),
        "precopy-bytes": stats.transferred - final_bytes - stats.postcopy_bytes,
        "downtime-bytes": final_bytes,
        "postcopy-bytes": stats.postcopy_bytes,
        "dirty-sync-missed-zero-copy": 0,
    }


def outgoing_info(status: str, stats: MigrationStats, timing: Timing, *, downtime_limit: float, multifd: bool,
                  error: str = "") -> dict[str, Any]:
    """The source side's MigrationInfo."""
    info: dict[str, Any] = {"status": status}
    if status in RAM_STATES:
        info["ram"] = ram_stats(stats, timing, multifd=multifd)
    info["total-time"] = _ms(timing.elapsed)
    if status != "setup":
        info["setup-time"] = _ms(stats.setup_time)
    if status in ACTIVE_STATES:
        # Before the first round QEMU reports the limit itself as the expectation.
        expected = stats.expected_downtime if stats.expected_downtime is not None else downtime_limit
        info["expected-downtime"] = _ms(expected) if expected != float("inf") else 2**63 - 1
        if stats.throttle:
            info["cpu-throttle-percentage"] = round(stats.throttle * 100)
    if status == "completed" and stats.downtime is not None:
        info["downtime"] = _ms(stats.downtime)
    if status == "failed" and error:
        info["error-desc"] = error
    return info


def socket_address(endpoint: Endpoint) -> list[dict[str, str]]:
    """QEMU's SocketAddress list for where a destination listens (none for a file)."""
    if endpoint.scheme == "tcp":
        return [{"type": "inet", "host": endpoint.host, "port": str(endpoint.port)}]
    if endpoint.scheme == "unix":
        return [{"type": "unix", "path": endpoint.path}]
    return []


def incoming_info(status: str, address: list[dict[str, str]], error: str = "",
                  stats: MigrationStats | None = None) -> dict[str, Any]:
    """The destination side's MigrationInfo: QEMU reports the state and where it listens, not the RAM; and, once
    post-copy ran, its blocktime and fault latencies (QEMU 10.1's postcopy-blocktime members)."""
    info: dict[str, Any] = {"status": status}
    if address:
        info["socket-address"] = address
    if stats is not None and stats.faults is not None:
        info.update(stats.faults.as_qmp())
    if status == "failed" and error:
        info["error-desc"] = error
    return info


def qmp_keys(record: dict[str, Any]) -> dict[str, Any]:
    """A progress record of the engine (snake_case keys) in QMP spelling (dashes)."""
    return {key.replace("_", "-"): value for key, value in record.items()}
