"""The dirty limit: cap how fast each vCPU dirties pages, as QEMU's ``set-vcpu-dirty-limit`` does.

Two parts, as everywhere in dirtylog: :class:`DirtyLimiter`, a pure per-vCPU controller that turns
"vCPU v had dirtied n pages at time t" into "vCPU v must now sleep s seconds", and
:class:`DirtyLimitController`, the thread that samples the dirty rings every period, asks the limiter,
and holds vCPUs out of the guest (``Machine.delay_vcpu``). The migration engine and ``Machine.dirty_limit``
both use it.

The limiter keeps, per vCPU, a *debt* in seconds: every sample adds ``pages / limit`` (the time those pages
were entitled to) and subtracts the time that passed. A positive debt is slept off at once; time spent
asleep pays it back, so the vCPU is not sent to sleep again until that sleep is over. A negative debt is
credit, capped at ``burst`` seconds so a quiet spell cannot bank a long burst. Over any stretch the vCPU
then dirties at most ``limit * (time + burst)`` pages plus what it dirties between a sample and the kick
that stops it, which is what makes the measured rate hold at the limit (bench/dirty_rate.py).

A vCPU awake runs at its own speed until the next sample, so the controller samples a limited vCPU soon
after it wakes: within ``BURST_FRACTION`` of a second's allowance at the speed it was last seen writing
(:meth:`DirtyLimiter.next_sample`), down to 1 ms, which keeps a 1 s window within a few percent of the
limit even at 1,000 pages/s against a vCPU that writes 65,000 when awake. The count is ring entries: a
page counts once per harvest it was written in, which for a page written once per window is the distinct
count the dirty rate measures.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from dirtylog.guest.machine import Machine, State
from dirtylog.rate.estimate import RateError
from dirtylog.tracking.kvm_ring import RingTracker

DIRTY_LIMIT_PERIOD = 0.02  # longest time between samples of the rings
MIN_PERIOD = 0.001  # shortest: a sample costs a harvest and KVM_RESET_DIRTY_RINGS
BURST_FRACTION = 0.05  # a vCPU may run unchecked for at most this fraction of a second's allowance
RATE_SMOOTHING = 0.3  # weight of the newest sample in the reported current rate


@dataclass
class VcpuLimit:
    """One vCPU's limit and controller state."""

    limit: float | None = None  # pages per second; None: not limited
    debt: float = 0.0  # seconds the vCPU is ahead of its allowance
    asleep_until: float = 0.0
    count: int = 0  # pages dirtied (cumulative, as last sampled)
    current: float = 0.0  # smoothed measured rate, pages/s
    speed: float = 0.0  # pages/s while awake (the last sample the vCPU spent wholly awake)
    slept: float = 0.0  # seconds of sleep ordered so far


class DirtyLimiter:
    """Pure per-vCPU dirty-rate cap (see the module docstring)."""

    def __init__(self, vcpus: int, *, burst: float = DIRTY_LIMIT_PERIOD) -> None:
        self.vcpus = [VcpuLimit() for _ in range(vcpus)]
        self.burst = burst
        self._last: float | None = None

    def set_limit(self, pages_per_s: float | None, vcpu: int | None = None) -> None:
        """Limit one vCPU (or all, ``vcpu=None``) to ``pages_per_s``; None lifts the limit."""
        if pages_per_s is not None and not pages_per_s > 0:
            raise RateError(f"dirty limit must be a positive number of pages/s per vCPU, got {pages_per_s}")
        targets = range(len(self.vcpus)) if vcpu is None else [vcpu]
        for index in targets:
            if not 0 <= index < len(self.vcpus):
                raise RateError(f"no vCPU {index}; this machine has vCPUs 0..{len(self.vcpus) - 1}")
            state = self.vcpus[index]
            state.limit = None if pages_per_s is None else float(pages_per_s)
            state.debt = min(state.debt, 0.0)

    @property
    def active(self) -> bool:
        return any(v.limit is not None for v in self.vcpus)

    def step(self, now: float, counts: dict[int, int]) -> dict[int, float]:
        """Feed cumulative pages dirtied per vCPU at ``now``; returns seconds each vCPU must sleep now."""
        dt = 0.0 if self._last is None else max(0.0, now - self._last)
        self._last = now
        sleeps: dict[int, float] = {}
        for index, state in enumerate(self.vcpus):
            count = counts.get(index, state.count)
            pages = max(0, count - state.count)
            state.count = count
            if dt > 0:
                state.current += RATE_SMOOTHING * (pages / dt - state.current)
                if now - dt >= state.asleep_until:
                    state.speed = pages / dt
            if state.limit is None:
                continue
            state.debt = max(state.debt + pages / state.limit - dt, -self.burst)
            if state.debt > 0 and now >= state.asleep_until:
                sleeps[index] = state.debt
                state.asleep_until = now + state.debt
                state.slept += state.debt
        return sleeps

    def next_sample(self, now: float, period: float = DIRTY_LIMIT_PERIOD) -> float:
        """Seconds until the next sample: soon enough that no limited vCPU runs more than
        ``BURST_FRACTION`` of a second's allowance unchecked (after its sleep, if it is asleep)."""
        wait = period
        for state in self.vcpus:
            if state.limit is None:
                continue
            quantum = BURST_FRACTION * state.limit / max(state.speed, state.limit)
            wait = min(wait, max(0.0, state.asleep_until - now) + quantum)
        return min(period, max(MIN_PERIOD, wait))

    def resync(self, now: float, counts: dict[int, int]) -> None:
        """Take ``counts`` as the new baseline without charging anything (after a pause)."""
        self._last = now
        for index, state in enumerate(self.vcpus):
            state.count = counts.get(index, state.count)
            state.asleep_until = 0.0
            state.debt = min(state.debt, 0.0)


@dataclass(frozen=True)
class VcpuDirtyLimit:
    """QEMU's ``query-vcpu-dirty-limit`` entry: ``cpu-index``, ``limit-rate``, ``current-rate`` (pages/s here)."""

    cpu_index: int
    limit_rate: float | None
    current_rate: float


class DirtyLimitController:
    """Samples a machine's dirty rings every ``period`` and makes vCPUs over their limit sleep it off.

    ``tracker`` is an enabled (or to-be-enabled) :class:`RingTracker` of ``machine``; the controller only
    calls its ``sample()``, which keeps harvested pages for the tracker's next collection, so a migration
    or a rate measurement can collect from the same tracker meanwhile.
    """

    def __init__(self, machine: Machine, tracker: RingTracker, *, period: float = DIRTY_LIMIT_PERIOD) -> None:
        if not isinstance(tracker, RingTracker):
            raise RateError("the dirty limit reads per-vCPU dirty rings: give it a ring tracker")
        self.machine = machine
        self.tracker = tracker
        self.period = period
        self.limiter = DirtyLimiter(machine.spec.vcpus, burst=period)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def set_limit(self, pages_per_s: float | None, vcpu: int | None = None) -> None:
        """Limit ``vcpu`` (all when None) to ``pages_per_s``; None lifts it. Starts the thread if needed."""
        with self._lock:
            self.limiter.set_limit(pages_per_s, vcpu)
        if self.limiter.active:
            self.start()

    def query(self) -> list[VcpuDirtyLimit]:
        """Each vCPU's limit and its measured dirty rate (smoothed over the last samples)."""
        with self._lock:
            return [VcpuDirtyLimit(i, v.limit, v.current) for i, v in enumerate(self.limiter.vcpus)]

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        if not self.tracker.enabled:
            self.tracker.enable()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="dirty-limit", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop limiting (the tracker stays as it is: its owner disables it)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)
            self._thread = None

    def _loop(self) -> None:
        paused = True
        while not self._stop.is_set():
            running = self.machine.state is State.RUNNING
            if running:
                counts, now = self.tracker.sample(), time.perf_counter()
                with self._lock:
                    if paused:  # the time spent paused is neither debt nor credit
                        self.limiter.resync(now, counts)
                        sleeps = {}
                    else:
                        sleeps = self.limiter.step(now, counts)
                for vcpu, seconds in sleeps.items():
                    self.machine.delay_vcpu(vcpu, seconds)
            paused = not running
            with self._lock:
                wait = self.limiter.next_sample(time.perf_counter(), self.period)
            self._stop.wait(wait)
