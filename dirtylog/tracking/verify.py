"""Proof that a tracker loses no write, the KVM selftests' way: guest stamps checked against each log.

The ``stamp`` workload writes its iteration number into the first 8 bytes of the pages it touches; each
page has one writer (its vCPU's share), so a page's stamp only grows. Around every collection ``k`` the
verifier reads each vCPU's finished-iteration counter *before* the ioctl (``S_k``: every write with a
stamp below ``S_k`` happened before the collection began) and every page's stamp *after* it (``M_k``).
From those reads alone, with no assumption about timing, it checks:

* **lost**: a page whose stamp changed between ``M_{k-1}`` and ``M_k`` was written after collection
  ``k-1`` returned, so it must be reported by collection ``k`` or ``k+1``;
* **stale**: a page not reported by ``k`` whose stamp is newer than when it was last reported, yet older
  than ``S_k``, holds a write that happened between its last report and collection ``k``: that write
  was lost (the page was "reported clean while holding a newer stamp");
* **outside**: the guest writes nothing outside the workload area but the vCPU control blocks (its
  progress counters), so the stamps vouch for every write it makes. The page tables never change: their
  accessed and dirty bits are preset, so the CPU never writes them. The verifier compares the bytes of
  every other page outside the area at each collection; one that changed breaks that premise.

Over-reporting is counted, not failed: a reported area page whose stamp is older than ``S_{k-1}`` was not
written since the previous collection began, and a reported page outside the area whose bytes did not
change was not written at all. KVM's contract allows such reports (a consumer only sends a page twice),
and this host's KVM (PVM, shadow paging) makes them: about 0.1-0.2 % of reported pages, including
never-written neighbours of written pages in every mode, and now and then the program's code page in the
first collection after enabling. It never loses one. (The first collection of a tracker with initially-set
reports every page by design and is not counted.) See docs/dirty-logging.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

from dirtylog.bitmap import DirtyBitmap
from dirtylog.guest.machine import Machine
from dirtylog.tracking.base import Tracker, TrackingError
from dirtylog.units import PAGE_SIZE

ViolationKind = Literal["lost", "stale", "outside"]


@dataclass(frozen=True)
class Violation:
    """One page a collection got wrong."""

    kind: ViolationKind
    collection: int
    page: int
    stamp: int

    def describe(self) -> str:
        what = {
            "lost": "changed after the previous collection but reported by neither this one nor the last",
            "stale": "reported clean while holding a stamp newer than at its last report",
            "outside": "changed though it is outside the workload area, where the guest writes nothing",
        }[self.kind]
        return f"collection {self.collection}: page {self.page} (stamp {self.stamp}) {what}"


@dataclass
class VerifyReport:
    """What the verifier has checked so far."""

    collections: int = 0
    pages_reported: int = 0
    changes_seen: int = 0
    over_reported: int = 0  # reported without a write since the previous collection began (allowed)
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


class StampVerifier:
    """Checks each collection of a tracker on a machine running the ``stamp`` workload."""

    MAX_VIOLATIONS_KEPT = 100

    def __init__(self, machine: Machine, *, initially_set: bool = False) -> None:
        if machine.spec.name != "stamp":
            raise TrackingError(f"verification needs the stamp workload; this machine runs {machine.spec.name!r}")
        self.machine = machine
        self.initially_set = initially_set
        npages = machine.ram.npages
        self.owner = np.full(npages, -1, dtype=np.int64)
        for vcpu in range(machine.spec.vcpus):
            share = machine.spec.share(vcpu)
            self.owner[share.start:share.stop] = vcpu
        self.area = self.owner >= 0
        self.allowed_outside = np.zeros(npages, dtype=bool)
        for vcpu in range(machine.spec.vcpus):
            self.allowed_outside[machine.control_block_addr(vcpu) // PAGE_SIZE] = True
        self._outside = np.flatnonzero(~self.area & ~self.allowed_outside)  # the system area, in practice
        self._outside_bytes = self._outside_pages()
        self.report = VerifyReport()
        self._pending = np.zeros(npages, dtype=bool)
        self._s_prev = np.zeros(npages, dtype=np.uint64)
        self._m_prev = np.zeros(npages, dtype=np.uint64)
        self._reported = np.zeros(npages, dtype=np.uint64)

    def _stamps(self) -> npt.NDArray[np.uint64]:
        first_words: npt.NDArray[np.uint64] = self.machine.memory.reshape(-1, PAGE_SIZE)[:, :8].copy().view(np.uint64)
        return first_words[:, 0]

    def _outside_pages(self) -> npt.NDArray[np.uint8]:
        pages: npt.NDArray[np.uint8] = self.machine.memory.reshape(-1, PAGE_SIZE)[self._outside]  # a copy
        return pages

    def _iteration_floor(self) -> npt.NDArray[np.uint64]:
        """Per page: the stamp below which every write to it has already happened (``S``)."""
        current = np.array(self.machine.iterations, dtype=np.uint64) + np.uint64(1)
        floor = np.zeros(self.owner.size, dtype=np.uint64)
        floor[self.area] = current[self.owner[self.area]]
        return floor

    def enable(self, tracker: Tracker) -> None:
        """Enable ``tracker`` and take the starting point of the checks."""
        self._s_prev = self._iteration_floor()
        tracker.enable()
        self._m_prev = self._stamps()
        self._reported = self._m_prev.copy()
        self._outside_bytes = self._outside_pages()

    def collect(self, tracker: Tracker) -> DirtyBitmap:
        """Collect from ``tracker`` and check the result; violations accumulate in :attr:`report`."""
        floor = self._iteration_floor()
        bitmap = tracker.collect()
        stamps = self._stamps()
        outside_bytes = self._outside_pages()
        k = self.report.collections + 1
        reported = np.zeros(self.owner.size, dtype=bool)
        reported[bitmap.pages()] = True
        changed = stamps != self._m_prev

        checks: list[tuple[ViolationKind, npt.NDArray[np.bool_]]] = [
            ("lost", self._pending & ~reported),
            ("stale", ~reported & self.area & (stamps != self._reported) & (stamps < floor)),
        ]
        written_outside = (outside_bytes != self._outside_bytes).any(axis=1)
        outside = np.zeros(self.owner.size, dtype=bool)
        outside[self._outside[written_outside]] = True
        checks.append(("outside", outside))
        if not (self.initially_set and k == 1):  # that first collection reports every page by design
            self.report.over_reported += int(np.count_nonzero(reported & self.area & (stamps < self._s_prev)))
            self.report.over_reported += int(np.count_nonzero(reported[self._outside] & ~written_outside))
        for kind, mask in checks:
            for page in np.flatnonzero(mask)[: self.MAX_VIOLATIONS_KEPT - len(self.report.violations)].tolist():
                self.report.violations.append(Violation(kind, k, page, int(stamps[page])))

        self._pending = changed & ~reported
        self._reported[reported] = stamps[reported]
        self._m_prev, self._s_prev, self._outside_bytes = stamps, floor, outside_bytes
        self.report.collections = k
        self.report.pages_reported += int(np.count_nonzero(reported))
        self.report.changes_seen += int(np.count_nonzero(changed))
        return bitmap
