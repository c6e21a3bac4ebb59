"""The dirty limit: cap how fast each vCPU dirties pages, as QEMU's ``set-vcpu-dirty-limit`` does.

Two parts, as everywhere in dirtylog: :class:`DirtyLimiter`, a pure per-vCPU controller that turns
"vCPU v had dirtied n pages at time t" into "vCPU v must now sleep s seconds" and "sample again in w
seconds", and :class:`DirtyLimitController`, the thread that samples the dirty rings when the limiter
asks, and holds vCPUs out of the guest (``Machine.delay_vcpu``). The migration engine and
``Machine.dirty_limit`` both use it.

**What is counted** is what the dirty rate counts: distinct pages. The rings push an entry each time a
page is written after the last reset, so the controller counts a page only the first time each vCPU
writes it in the current *epoch* (:class:`~dirtylog.tracking.first_writes.FirstWrites`). An epoch ends at
each collection of the tracker (a rate window, a migration round: the limit then holds for exactly what
the collector sees) and after at most a second when nobody collects (QEMU's calculation period).
Counting every ring entry instead held a random writer 7-15 % below its limit from a quarter of its
speed up, since it rewrote pages within the window between two samples.

**The debt.** The limiter keeps, per vCPU, a *debt* in seconds: every sample adds ``pages / limit`` (the
time those pages were entitled to) and subtracts the time that passed. A positive debt is slept off at
once; time spent asleep pays it back, so the vCPU is not sent to sleep again until that sleep is over. A
negative debt is credit, capped at ``burst`` seconds so a quiet spell cannot bank a long burst. Over any
stretch the vCPU then dirties at most ``limit * (time + burst)`` pages plus what it dirties between a
sample and the kick that stops it.

**The bursts.** A vCPU awake runs at its own speed until a sample sees it ahead, and a 1 s window holds
whole bursts or not, so a burst is the error of a window: at 1,000 pages/s against a vCPU that writes
20,000-65,000 when awake, a 5 ms burst is 10-30 % of a second's allowance. So the limiter plans the next
sample for when the fastest limited vCPU is predicted to have used its credit, plus a quantum of
``BURST_FRACTION`` of a second's allowance (:meth:`DirtyLimiter.next_sample`), at the speed it writes when
awake. That speed is the highest recently seen, decaying slowly: a sample the vCPU spent partly asleep
(it woke later than ordered) must not make it look slow, which had stretched some bursts to the full
20 ms period.

**The controller thread runs at real-time priority** (``SCHED_FIFO`` 1, where allowed: root or
``CAP_SYS_NICE``; otherwise as any thread). A sample planned for 0.5 ms after a wake is worth nothing if
the thread is scheduled 3-5 ms late behind the vCPUs and the host's other work, and that lateness was
the bursts. It sleeps between samples (at most a few hundred a second, 30-70 us each), and the kernel
bounds real-time threads to 95 % of a CPU in any case.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass

from dirtylog.guest.machine import Machine, State
from dirtylog.rate.estimate import RateError
from dirtylog.tracking.kvm_ring import RingTracker

DIRTY_LIMIT_PERIOD = 0.02  # longest time between samples of the rings
MIN_PERIOD = 0.0005  # shortest: a sample costs a harvest and KVM_RESET_DIRTY_RINGS (30-70 us here)
BURST_FRACTION = 0.02  # a vCPU may run unchecked for about this fraction of a second's allowance
RATE_SMOOTHING = 0.3  # weight of the newest sample in the reported current rate
SPEED_DECAY = 0.1  # weight of a slower sample in the awake speed (a faster one replaces it at once)
EPOCH = 1.0  # longest epoch of first writes when nobody collects the tracker (seconds)


@dataclass
class VcpuLimit:
    """One vCPU's limit and controller state."""

    limit: float | None = None  # pages per second; None: not limited
    debt: float = 0.0  # seconds the vCPU is ahead of its allowance
    asleep_until: float = 0.0
    count: int = 0  # pages dirtied (cumulative, as last sampled)
    current: float = 0.0  # smoothed measured rate, pages/s
    speed: float = 0.0  # pages/s while awake: the highest recent sample spent awake, decaying slowly
    speed_known: bool = False  # a sample spent awake has been seen (until then it may be fast)
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
                if now - dt >= state.asleep_until:  # ordered awake for all of it (it may have woken late)
                    seen = pages / dt
                    state.speed = seen if seen > state.speed else state.speed + SPEED_DECAY * (seen - state.speed)
                    state.speed_known = True
            if state.limit is None:
                continue
            state.debt = max(state.debt + pages / state.limit - dt, -self.burst)
            if state.debt > 0 and now >= state.asleep_until:
                sleeps[index] = state.debt
                state.asleep_until = now + state.debt
                state.slept += state.debt
        return sleeps

    def next_sample(self, now: float, period: float = DIRTY_LIMIT_PERIOD) -> float:
        """Seconds until the next sample: when the first limited vCPU is predicted to have used its credit
        (after its sleep, if it is asleep), plus a quantum of ``BURST_FRACTION`` of a second's allowance,
        each at the speed it writes when awake."""
        wait = period
        for state in self.vcpus:
            if state.limit is None:
                continue
            if not state.speed_known:  # not yet seen awake: it may be fast, look soon
                wait = MIN_PERIOD
                continue
            speed = max(state.speed, state.limit)
            asleep = max(0.0, state.asleep_until - now)
            # Credit left when it wakes (time asleep pays debt back, down to the cap), spent at the rate
            # the debt grows while it writes: speed / limit - 1 seconds of debt per second awake.
            credit = min(self.burst, max(0.0, asleep - state.debt))
            growth = speed / state.limit - 1.0
            spend = credit / growth if growth > 0 else period
            quantum = BURST_FRACTION * state.limit / speed
            wait = min(wait, asleep + spend + quantum)
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
    """Samples a machine's dirty rings when the limiter asks (at least every ``period``) and makes vCPUs
    over their limit sleep it off.

    ``tracker`` is an enabled (or to-be-enabled) :class:`RingTracker` of ``machine``; the controller only
    samples it (``sample_first_writes()``, which keeps harvested pages for the tracker's next collection),
    so a migration or a rate measurement can collect from the same tracker meanwhile; their collections
    end the epochs of first writes, and the controller ends one itself when none came for ``epoch``
    seconds.
    """

    def __init__(self, machine: Machine, tracker: RingTracker, *, period: float = DIRTY_LIMIT_PERIOD,
                 epoch: float = EPOCH, realtime: bool = True) -> None:
        if not isinstance(tracker, RingTracker):
            raise RateError("the dirty limit reads per-vCPU dirty rings: give it a ring tracker")
        self.machine = machine
        self.tracker = tracker
        self.period = period
        self.epoch = epoch
        self.realtime = realtime  # ask for SCHED_FIFO; after start, whether the thread got it
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
        self.tracker.count_first_writes()
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
        if self.realtime:
            self.realtime = _realtime_priority()
        paused = True
        while not self._stop.is_set():
            running = self.machine.state is State.RUNNING
            if running:
                counts, now = self.tracker.sample_first_writes(), time.perf_counter()
                # Nobody collected for a while: end the epoch here (a collector's epochs end at its own
                # collections, a little before this fires for a 1 s window).
                if now - self.tracker.epoch_started >= self.epoch + self.period:
                    self.tracker.new_epoch()
                with self._lock:
                    if paused:  # the time spent paused is neither debt nor credit
                        self.limiter.resync(now, counts)
                        sleeps = {}
                    else:
                        sleeps = self.limiter.step(now, counts)
                for vcpu, seconds in sleeps.items():
                    self.machine.delay_vcpu(vcpu, seconds)
            paused = not running
            with self._lock:  # a paused machine writes nothing: look again a period later
                wait = self.limiter.next_sample(time.perf_counter(), self.period) if running else self.period
            self._stop.wait(wait)


def _realtime_priority() -> bool:
    """Put the calling thread in ``SCHED_FIFO`` at the lowest real-time priority; False where not allowed."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(os.sched_get_priority_min(os.SCHED_FIFO)))
    except (OSError, AttributeError):  # no CAP_SYS_NICE, no RLIMIT_RTPRIO, or not Linux
        return False
    return True
