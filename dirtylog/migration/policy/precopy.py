"""Pre-copy as QEMU does it, as pure code: the policy a user sets, and the decisions it implies.

The engine (``source.py``) measures each round and asks :class:`PrecopyController` what to do next;
nothing here touches a socket, a clock or a VM, so every decision is a function of the numbers it was
given and the tests can replay any history.

The rules, and where they come from:

* **Switch over** when the pages still to send, at the page rate the link has shown, would take no
  longer than the downtime limit (QEMU's ``migration_iteration_run``: pending size vs. threshold).
  The rate is pages per second actually sent, not wire bytes, so zero-page elision and compression
  count for what they save.
* **Auto-converge** (QEMU's ``cpu-throttle``): each time the guest has, in two rounds since the last
  step (not necessarily consecutive ones, as QEMU counts them), dirtied more than ``throttle_trigger`` of
  what the round sent, throttle vCPUs: first ``throttle_initial``, then ``+throttle_increment`` each
  time, up to ``throttle_max``.
* **Dirty limit** (QEMU's ``dirty-limit`` capability): the same trigger switches on a per-vCPU cap on
  the dirty rate, measured from the dirty ring; vCPUs that dirty faster sleep off the excess (the engine uses
  ``dirtylog.rate.limit``, as ``Machine.dirty_limit`` does).
* **Time limit**: past ``max_time`` the migration is cancelled (the source keeps running) or forced to
  switch over whatever the downtime, as the user chose; with post-copy allowed it switches to post-copy.
* **Post-copy** (QEMU's ``postcopy-ram``, started there by ``migrate-start-postcopy``): when allowed, a
  migration that would finish within the downtime limit still finishes by pre-copy; otherwise it switches to
  post-copy after ``postcopy_after`` rounds, or, without a count, when pre-copy stops converging (the same
  trigger as auto-converge's: two rounds dirtying more than ``throttle_trigger`` of what they sent), instead of
  throttling the guest.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal

from dirtylog.migration.errors import MigrationParameterError

TimeoutPolicy = Literal["cancel", "force"]

@dataclass(frozen=True)
class PrecopyPolicy:
    """What the user asked for. Times in seconds, bandwidth in bytes per second."""

    downtime_limit: float = 0.3  # QEMU's default downtime-limit is 300 ms
    bandwidth: float | None = None
    max_time: float | None = None
    on_timeout: TimeoutPolicy = "cancel"
    auto_converge: bool = False
    throttle_initial: float = 0.2  # QEMU: cpu-throttle-initial 20 %
    throttle_increment: float = 0.1  # QEMU: cpu-throttle-increment 10 %
    throttle_max: float = 0.99  # QEMU: max-cpu-throttle 99 %
    throttle_trigger: float = 0.5  # QEMU: throttle-trigger-threshold 50 %
    dirty_limit: float | None = None  # pages per second per vCPU
    postcopy: bool = False  # QEMU's postcopy-ram: the VM may move before all of its memory
    postcopy_after: int | None = None  # rounds of pre-copy before post-copy; None: when pre-copy stops converging
    postcopy_on_request: bool = False  # only when asked (QMP's migrate-start-postcopy), as QEMU does

    def __post_init__(self) -> None:
        if self.downtime_limit <= 0:
            raise MigrationParameterError(f"downtime limit must be positive, got {self.downtime_limit} s")
        if self.bandwidth is not None and self.bandwidth <= 0:
            raise MigrationParameterError(f"bandwidth must be positive, got {self.bandwidth} B/s")
        if self.max_time is not None and self.max_time <= 0:
            raise MigrationParameterError(f"maximum time must be positive, got {self.max_time} s")
        if self.on_timeout not in ("cancel", "force"):
            raise MigrationParameterError(f"on timeout: choose 'cancel' or 'force', not {self.on_timeout!r}")
        if self.dirty_limit is not None and self.dirty_limit <= 0:
            raise MigrationParameterError(
                f"dirty limit must be a positive number of pages/s per vCPU, got {self.dirty_limit}")
        if not 0 < self.throttle_initial <= self.throttle_max < 1:
            raise MigrationParameterError("throttle settings must satisfy 0 < initial <= max < 1")
        if self.postcopy_after is not None and (self.postcopy_after < 0 or not self.postcopy):
            raise MigrationParameterError(
                f"postcopy_after {self.postcopy_after}: a number of rounds (0 or more) and only with postcopy=True")


@dataclass(frozen=True)
class RoundStats:
    """One pre-copy round: what it sent and what the guest dirtied meanwhile."""

    round: int
    start: float  # seconds since the migration began
    seconds: float
    pages: int  # pages sent, zero markers included
    zero_pages: int
    bytes: int  # bytes on the wire
    dirty_pages: int  # pages the collection at the end of the round found dirty
    throttle: float
    dirty_limited: bool
    final: bool = False  # the paused switch-over round

    @property
    def page_rate(self) -> float:
        """Pages per second the round achieved."""
        return self.pages / self.seconds if self.seconds > 0 else 0.0

    @property
    def bandwidth(self) -> float:
        """Wire bytes per second of the round."""
        return self.bytes / self.seconds if self.seconds > 0 else 0.0

    @property
    def dirty_rate(self) -> float:
        """Pages per second the guest dirtied during the round."""
        return self.dirty_pages / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self, page_size: int) -> dict[str, Any]:
        return {
            "round": self.round, "start_s": round(self.start, 4), "seconds": round(self.seconds, 4),
            "pages": self.pages, "zero_pages": self.zero_pages, "bytes": self.bytes,
            "dirty_pages": self.dirty_pages, "mbps": round(self.bandwidth * 8 / 1e6, 1),
            "dirty_pages_rate": round(self.dirty_rate), "remaining_bytes": self.dirty_pages * page_size,
            "throttle_percentage": round(self.throttle * 100), "dirty_limited": self.dirty_limited,
            "final": self.final,
        }


class Action(enum.Enum):
    CONTINUE = "continue"
    SWITCHOVER = "switchover"
    POSTCOPY = "postcopy"
    CANCEL = "cancel"


@dataclass(frozen=True)
class Decision:
    """What to do after a round: the action, the vCPU throttle to apply, and whether to cap dirty rates."""

    action: Action
    throttle: float
    dirty_limited: bool
    expected_downtime: float
    reason: str


@dataclass
class PrecopyController:
    """Decides after every round; holds only the counters QEMU's algorithm needs."""

    policy: PrecopyPolicy
    throttle: float = 0.0
    dirty_limited: bool = False
    _high_rounds: int = 0
    rounds: list[RoundStats] = field(default_factory=list)

    def expected_downtime(self, pending_pages: int) -> float:
        """Seconds to send ``pending_pages`` at the page rate of the last round (inf before any)."""
        rate = self.rounds[-1].page_rate if self.rounds else 0.0
        if self.policy.bandwidth is not None and self.rounds and self.rounds[-1].pages:
            # Under a cap the last round's rate already reflects it; never promise more than the cap.
            per_page = self.rounds[-1].bytes / self.rounds[-1].pages
            rate = min(rate, self.policy.bandwidth / max(per_page, 1.0))
        if pending_pages == 0:
            return 0.0
        return pending_pages / rate if rate > 0 else float("inf")

    def before_rounds(self) -> Decision | None:
        """Post-copy at once, before any round (``postcopy_after=0``), or None to start pre-copy."""
        if self.policy.postcopy and self.policy.postcopy_after == 0:
            return self._decide(Action.POSTCOPY, float("inf"), "post-copy from the start (postcopy_after=0)")
        return None

    def after_round(self, stats: RoundStats, elapsed: float, *, start_postcopy: bool = False) -> Decision:
        """Record ``stats`` (the round just sent, with the dirty pages found after it) and decide.
        ``start_postcopy``: the operator asked for post-copy (QMP's migrate-start-postcopy)."""
        self.rounds.append(stats)
        expected = self.expected_downtime(stats.dirty_pages)
        if expected <= self.policy.downtime_limit:
            return self._decide(Action.SWITCHOVER, expected,
                                f"expected downtime {expected * 1e3:.1f} ms is within the limit")
        if self.policy.postcopy:
            why = self._postcopy_reason(stats, elapsed, start_postcopy)
            if why:
                return self._decide(Action.POSTCOPY, expected, why)
        if self.policy.max_time is not None and elapsed >= self.policy.max_time:
            if self.policy.on_timeout == "force":
                return self._decide(Action.SWITCHOVER, expected,
                                    f"time limit {self.policy.max_time:.1f} s reached: forcing switch-over")
            return self._decide(Action.CANCEL, expected,
                                f"did not converge within {self.policy.max_time:.1f} s (expected downtime "
                                f"{expected * 1e3:.0f} ms > limit {self.policy.downtime_limit * 1e3:.0f} ms)")
        self._converge(stats)
        return self._decide(Action.CONTINUE, expected,
                            f"expected downtime {expected * 1e3:.1f} ms is over the limit")

    def _postcopy_reason(self, stats: RoundStats, elapsed: float, asked: bool) -> str:
        """Why to switch to post-copy now, or "" to go on with pre-copy."""
        high = self._high(stats)
        if asked:
            return "post-copy requested (migrate-start-postcopy)"
        if self.policy.postcopy_on_request:
            return ""
        after = self.policy.postcopy_after
        if after is not None and len(self.rounds) >= after:
            return f"post-copy after {after} round{'s' * (after != 1)} of pre-copy"
        if self.policy.max_time is not None and elapsed >= self.policy.max_time:
            return f"time limit {self.policy.max_time:.1f} s reached: switching to post-copy"
        if after is None and high and self._high_rounds >= 2:
            return (f"pre-copy is not converging ({stats.dirty_pages:,} pages dirtied while "
                    f"{stats.pages - stats.zero_pages:,} were sent, twice): switching to post-copy")
        return ""

    def _high(self, stats: RoundStats) -> bool:
        """Counts a round that dirtied more than the trigger fraction of what it sent (QEMU's threshold)."""
        sent = stats.pages - stats.zero_pages
        if stats.dirty_pages > self.policy.throttle_trigger * max(sent, 1):
            self._high_rounds += 1
            return True
        return False

    def _converge(self, stats: RoundStats) -> None:
        """QEMU's trigger: dirtied more than a fraction of what was sent, in two rounds since the last step."""
        if not (self.policy.auto_converge or self.policy.dirty_limit):
            return
        if not self.policy.postcopy:  # with post-copy the round was counted when it was looked at
            self._high(stats)
        if self._high_rounds < 2:
            return
        self._high_rounds = 0
        if self.policy.dirty_limit:
            self.dirty_limited = True
        if self.policy.auto_converge:
            if self.throttle == 0:
                self.throttle = self.policy.throttle_initial
            else:
                self.throttle = min(self.policy.throttle_max, self.throttle + self.policy.throttle_increment)

    def _decide(self, action: Action, expected: float, reason: str) -> Decision:
        return Decision(action, self.throttle, self.dirty_limited, expected, reason)
