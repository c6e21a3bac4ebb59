"""What a guest workload does, independent of how it runs (x86 machine code on KVM, or the stage-2 model).

A workload writes pages of its *area*; the area is split into one contiguous share per vCPU, so every
page has exactly one writer (as in the KVM selftests' dirty_log_perf_test, where each vCPU owns its slice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from dirtylog.errors import DirtylogError

WorkloadName = Literal["sequential", "random", "hotset", "stamp", "idle", "trace"]
WORKLOADS: tuple[WorkloadName, ...] = ("sequential", "random", "hotset", "stamp", "idle", "trace")

WORKLOAD_HELP: dict[WorkloadName, str] = {
    "sequential": "writes every page of its share in order, again and again",
    "random": "writes uniformly random pages of its share (in-guest xorshift PRNG)",
    "hotset": "sends most writes (hot_weight) to a small hot fraction (hot_fraction) of its share",
    "stamp": "writes the iteration number into the first 8 bytes of random pages; reports each iteration",
    "idle": "writes nothing; spins reading the clock",
    "trace": "replays a recorded program's dirty pages (--trace FILE, from `track --record`) at the recorded pace",
}


class WorkloadError(DirtylogError, ValueError):
    """A workload description that cannot run."""


@dataclass(frozen=True)
class WorkloadSpec:
    """A workload: which pattern, over which pages, by how many vCPUs, how fast.

    ``first_page``/``npages`` are guest page frame numbers of the area. ``rate`` is pages per second per
    vCPU (None: as fast as the vCPU goes). ``hot_fraction`` and ``hot_weight`` shape ``hotset``;
    ``writes_per_iteration`` is how many pages ``stamp`` writes per iteration per vCPU (0: its whole share).
    """

    name: WorkloadName
    first_page: int
    npages: int
    vcpus: int = 1
    rate: int | None = None
    hot_fraction: float = 0.1
    hot_weight: float = 0.9
    writes_per_iteration: int = 0
    seed: int = 0x9E3779B97F4A7C15

    def __post_init__(self) -> None:
        if self.name not in WORKLOADS:
            raise WorkloadError(f"unknown workload {self.name!r}; choose one of {', '.join(WORKLOADS)}")
        if self.vcpus < 1:
            raise WorkloadError(f"a workload needs at least one vCPU, got {self.vcpus}")
        if self.npages < self.vcpus and self.name != "idle":
            raise WorkloadError(
                f"workload area of {self.npages} pages is smaller than {self.vcpus} vCPUs; give more memory"
            )
        if self.rate is not None and self.rate <= 0:
            raise WorkloadError(f"rate must be a positive number of pages/s per vCPU, got {self.rate}")
        if not 0 < self.hot_fraction <= 1:
            raise WorkloadError(f"hot_fraction must be in (0, 1], got {self.hot_fraction}")
        if not 0 <= self.hot_weight <= 1:
            raise WorkloadError(f"hot_weight must be in [0, 1], got {self.hot_weight}")

    def share(self, vcpu: int) -> range:
        """Page frame numbers that vCPU ``vcpu`` writes."""
        per = self.npages // self.vcpus
        start = self.first_page + vcpu * per
        end = self.first_page + self.npages if vcpu == self.vcpus - 1 else start + per
        return range(start, end)

    @property
    def pages(self) -> range:
        """Page frame numbers the workload as a whole may write."""
        return range(self.first_page, self.first_page + self.npages)
