"""Post-copy's page faults as QEMU counts them: blocktime and fault latency, as pure code over times given.

The destination's fault handler reports each fault it reads (which vCPU, which page, when) and each page it
installs (when); from those alone this module keeps what QEMU's ``postcopy-blocktime`` capability reports
(``query-migrate`` on the destination, QEMU 10.1's names):

* ``postcopy-vcpu-blocktime``: per vCPU, the time it spent waiting for pages;
* ``postcopy-blocktime``: the time during which *every* vCPU was waiting at once (the guest made no progress);
* ``postcopy-latency`` / ``postcopy-vcpu-latency`` / ``postcopy-non-vcpu-latency``: the mean time from a fault
  to its page, over all faults, per vCPU, and for other threads (the host touching guest memory);
* ``postcopy-latency-dist``: a histogram of fault latencies in 24 power-of-two microsecond buckets, bucket N
  holding [2^N, 2^(N+1)) us (faults under 1 us in bucket 0, longer than 2^24 us in the last).

As in QEMU, only faults that wait on the source are counted: a fault on a page known to be a zero page, which
the handler resolves at once, is counted apart (``zero_faults``). Times are seconds (``time.perf_counter``);
nothing here reads a clock, so a test can replay any history.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Final

BUCKETS: Final = 24


@dataclass
class _Waiter:
    vcpu: int | None
    since: float


@dataclass
class FaultStats:
    """Faults and their resolutions, per vCPU and in all."""

    vcpus: int
    start: float = 0.0  # when post-copy began: fault times are reported relative to it
    faults: int = 0
    zero_faults: int = 0
    histogram: list[int] = field(default_factory=lambda: [0] * BUCKETS)
    latency_total: float = 0.0
    resolved: int = 0
    non_vcpu_latency_total: float = 0.0
    non_vcpu_resolved: int = 0
    fault_times: list[float] = field(default_factory=list)  # seconds since ``start``, one per fault
    latencies: list[float] = field(default_factory=list)  # seconds, one per resolved fault (what the histogram counts)
    _waiting: dict[int, list[_Waiter]] = field(default_factory=dict)  # page -> who waits since when
    _vcpu_blocktime: list[float] = field(default_factory=list)
    _vcpu_latency_total: list[float] = field(default_factory=list)
    _vcpu_resolved: list[int] = field(default_factory=list)
    _blocked: set[int] = field(default_factory=set)  # vCPUs waiting now
    _all_blocked_since: float | None = None
    blocktime: float = 0.0  # seconds every vCPU waited at once

    def __post_init__(self) -> None:
        self._vcpu_blocktime = [0.0] * self.vcpus
        self._vcpu_latency_total = [0.0] * self.vcpus
        self._vcpu_resolved = [0] * self.vcpus

    def fault(self, page: int, vcpu: int | None, at: float) -> None:
        """A thread (vCPU ``vcpu``, or another when None) waits for ``page`` since ``at``. A vCPU already waiting
        (kicked out of its wait by a pause, it faults again on the same page) is not counted twice."""
        if vcpu is not None and vcpu in self._blocked:
            return
        self.faults += 1
        self.fault_times.append(at - self.start)
        self._waiting.setdefault(page, []).append(_Waiter(vcpu, at))
        if vcpu is not None and 0 <= vcpu < self.vcpus and vcpu not in self._blocked:
            self._blocked.add(vcpu)
            if len(self._blocked) == self.vcpus:
                self._all_blocked_since = at

    def zero_fault(self) -> None:
        """A fault on a page known to be zero, resolved at once without the source."""
        self.zero_faults += 1

    def waiting(self, page: int) -> bool:
        """Whether a fault on ``page`` is waiting."""
        return page in self._waiting

    @property
    def pages_waited_for(self) -> list[int]:
        """The pages faults wait for now."""
        return list(self._waiting)

    def installed(self, pages: list[int], at: float) -> None:
        """``pages`` arrived at ``at``: the faults waiting on them are resolved."""
        for page in pages:
            waiters = self._waiting.pop(page, None)
            if waiters is None:
                continue
            for waiter in waiters:
                latency = max(0.0, at - waiter.since)
                self._account(waiter.vcpu, latency, at)

    def _account(self, vcpu: int | None, latency: float, at: float) -> None:
        micros = latency * 1e6
        bucket = 0 if micros < 1 else min(BUCKETS - 1, int(math.log2(micros)))
        self.histogram[bucket] += 1
        self.latencies.append(latency)
        if vcpu is None or not 0 <= vcpu < self.vcpus:
            self.non_vcpu_latency_total += latency
            self.non_vcpu_resolved += 1
            return
        self.latency_total += latency
        self.resolved += 1
        self._vcpu_latency_total[vcpu] += latency
        self._vcpu_resolved[vcpu] += 1
        self._vcpu_blocktime[vcpu] += latency
        if vcpu in self._blocked:
            if self._all_blocked_since is not None:
                self.blocktime += max(0.0, at - self._all_blocked_since)
                self._all_blocked_since = None
            self._blocked.discard(vcpu)

    @property
    def vcpu_blocktime(self) -> list[float]:
        """Seconds each vCPU waited for pages."""
        return list(self._vcpu_blocktime)

    @property
    def mean_latency(self) -> float:
        """Mean seconds from a vCPU's fault to its page (0 before any)."""
        return self.latency_total / self.resolved if self.resolved else 0.0

    @property
    def vcpu_latency(self) -> list[float]:
        """Mean seconds from a fault to its page, per vCPU."""
        return [total / count if count else 0.0
                for total, count in zip(self._vcpu_latency_total, self._vcpu_resolved, strict=True)]

    @property
    def non_vcpu_latency(self) -> float:
        return self.non_vcpu_latency_total / self.non_vcpu_resolved if self.non_vcpu_resolved else 0.0

    def median_latency(self) -> float:
        """The median fault latency as the histogram allows: the geometric middle of the bucket holding it."""
        total = sum(self.histogram)
        if not total:
            return 0.0
        seen = 0
        for bucket, count in enumerate(self.histogram):
            seen += count
            if 2 * seen >= total:
                return math.sqrt(2.0 ** bucket * 2.0 ** (bucket + 1)) / 1e6
        return 0.0  # not reached

    def latency_percentile(self, percent: float) -> float:
        """The exact ``percent``-th percentile (0-100) of the fault latencies, in seconds, interpolated between the
        nearest two (0 before any): the histogram's buckets are a factor of two wide, too coarse to judge a goal."""
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        rank = percent / 100 * (len(ordered) - 1)
        low = int(rank)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)

    def timeline(self, width: float) -> tuple[list[float], list[int]]:
        """Faults per ``width`` seconds since post-copy began: (bin starts, counts)."""
        if not self.fault_times:
            return [], []
        nbins = int(max(self.fault_times) // width) + 1
        counts = [0] * nbins
        for at in self.fault_times:
            counts[max(0, int(at // width))] += 1
        return [i * width for i in range(nbins)], counts

    def as_qmp(self) -> dict[str, Any]:
        """The members QEMU 10.1's ``query-migrate`` shows with ``postcopy-blocktime``, in its units (ms for
        blocktimes, ns for latencies)."""
        return {
            "postcopy-blocktime": round(self.blocktime * 1e3),
            "postcopy-vcpu-blocktime": [round(t * 1e3) for t in self.vcpu_blocktime],
            "postcopy-latency": round(self.mean_latency * 1e9),
            "postcopy-vcpu-latency": [round(t * 1e9) for t in self.vcpu_latency],
            "postcopy-non-vcpu-latency": round(self.non_vcpu_latency * 1e9),
            "postcopy-latency-dist": list(self.histogram),
        }

    def as_dict(self) -> dict[str, Any]:
        """For ``--json`` and the engine's statistics: the QMP members in snake_case, counts and the median."""
        out = {key.replace("-", "_"): value for key, value in self.as_qmp().items()}
        out.update(faults=self.faults, zero_faults=self.zero_faults, waiting=len(self._waiting),
                   postcopy_latency_median_us=round(self.median_latency() * 1e6, 1),
                   **{f"postcopy_latency_p{q}_us": round(self.latency_percentile(q) * 1e6, 1) for q in (50, 90, 99)})
        return out
