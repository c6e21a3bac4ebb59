"""Where a recorded trace sits in guest RAM for the ``trace`` workload: one table per vCPU, at the top.

The tables (:meth:`dirtylog.trace.DirtyTrace.guest_table`) take whole pages at the end of guest RAM, so the
workload area ends where they begin; each vCPU's control block points at its own table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dirtylog.errors import DirtylogError
from dirtylog.guest.arch import ControlBlock
from dirtylog.trace import DirtyTrace
from dirtylog.units import PAGE_SIZE, format_size
from dirtylog.workload import WorkloadSpec


class TraceFitError(DirtylogError):
    """A trace that does not fit the machine meant to replay it."""


@dataclass(frozen=True)
class TraceTables:
    """A trace's per-vCPU tables and their guest-physical addresses."""

    trace: DirtyTrace
    addresses: tuple[int, ...]
    tables: tuple[npt.NDArray[np.uint8], ...]

    @classmethod
    def plan(cls, trace: DirtyTrace | str | os.PathLike[str], vcpus: int, ram_size: int) -> TraceTables:
        """Lay ``trace`` (or the trace file it names) out for ``vcpus`` vCPUs below the end of guest RAM."""
        loaded = trace if isinstance(trace, DirtyTrace) else DirtyTrace.load(trace)
        tables = tuple(loaded.guest_table(vcpu, vcpus) for vcpu in range(vcpus))
        addresses, top = [], ram_size
        for table in tables:
            top -= -(-table.size // PAGE_SIZE) * PAGE_SIZE
            addresses.append(top)
        return cls(loaded, tuple(addresses), tables)

    @property
    def npages(self) -> int:
        """Guest pages the tables take."""
        return sum(-(-table.size // PAGE_SIZE) for table in self.tables)

    def check_fits(self, spec: WorkloadSpec) -> None:
        """Every vCPU's share must hold the trace's pages that vCPU writes."""
        needed = self.trace.pages_needed(spec.vcpus)
        smallest = min(len(spec.share(vcpu)) for vcpu in range(spec.vcpus))
        if smallest < needed:
            more = (needed - smallest) * spec.vcpus * PAGE_SIZE
            raise TraceFitError(f"the trace writes {self.trace.npages} distinct pages, {needed} per vCPU; the "
                                f"workload area gives each vCPU {smallest}: give the machine at least "
                                f"{format_size(more)} more memory")

    def control_fields(self, vcpu: int) -> dict[ControlBlock, int]:
        return {ControlBlock.TRACE_TABLE: self.addresses[vcpu]}
