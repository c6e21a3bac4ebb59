"""Ground truth for the dirty rate of our own workloads: the exact pages the guest wrote between two
readings of its progress counters, by replaying its writes.

Each vCPU of a workload program (dirtylog/guest/programs.py) stores its progress counter (writes done)
to its control block after every page write, and picks its pages deterministically: ``sequential`` writes
page ``k mod share`` with its ``k``-th write, and ``random``, ``hotset`` and ``stamp`` advance an xorshift64
PRNG, seeded from the control block, once per write. So the writes numbered ``[a, b)`` of a vCPU can be
replayed on the host exactly, without pausing the guest, and so can the distinct pages they touched.
Add the control block page of every vCPU that wrote (its counter lives there) and nothing else: the
programs write nothing else (the page tables' accessed and dirty bits are preset, see guest/x86.py).

The truth's own error: a counter read while the guest runs may miss the one write in flight (the page
is written just before the counter is stored), so each boundary is exact to within one write per vCPU.
What the guest did in the window is exact; *when* the window began and ended is known only as well as
the caller timed its counter readings, which is why :class:`Truth` brackets a boundary with a reading
before and one after it (see :meth:`Truth.bracket`).

It reads everything from guest memory (control blocks and the program's seed), so it serves any machine
running these programs on the same layout: ours, or the QEMU guest of bench/qemu_guest.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from dirtylog.bitmap import DirtyBitmap
from dirtylog.guest.programs import ControlBlock
from dirtylog.guest.x86 import control_block_addr
from dirtylog.rate.estimate import RateError
from dirtylog.units import PAGE_SIZE

REPLAYABLE = ("sequential", "random", "hotset", "stamp", "idle")


@dataclass(frozen=True)
class Reading:
    """Every vCPU's progress counter at one moment (perf_counter time ``t``)."""

    t: float
    progress: tuple[int, ...]


@dataclass
class _Cursor:
    position: int  # writes replayed so far
    state: int  # xorshift state after ``position`` writes


class Truth:
    """Replays a workload's writes from guest memory (``words``: guest RAM as uint64)."""

    def __init__(self, words: npt.NDArray[np.uint64], workload: str, vcpus: int, npages: int) -> None:
        if workload not in REPLAYABLE:
            raise RateError(f"no ground truth for workload {workload!r}; it is known for {', '.join(REPLAYABLE)}")
        self.words = words
        self.workload = workload
        self.vcpus = vcpus
        self.npages = npages
        self._cursors = [_Cursor(0, self._field(v, ControlBlock.PRNG_SEED)) for v in range(vcpus)]
        from dirtylog.rate import _kernels

        # Load the compiled replay now, not inside the first window a caller times.
        _kernels.replay_writes(np.uint64(1), np.int64(1), np.uint64(1), np.uint64(0), np.uint64(0),
                               np.empty(1, dtype=np.int64))
        _kernels.skip_writes(np.uint64(1), np.int64(1))

    def _field(self, vcpu: int, offset: ControlBlock) -> int:
        return int(self.words[(control_block_addr(vcpu) + offset) // 8])

    def read(self, t: float = 0.0) -> Reading:
        """The progress counters now."""
        return Reading(t, tuple(self._field(v, ControlBlock.PROGRESS) for v in range(self.vcpus)))

    def pages(self, start: Reading, end: Reading) -> DirtyBitmap:
        """Guest pages written by the writes between two readings (``start`` no earlier than the last
        :meth:`forget` point), control blocks included."""
        from dirtylog.rate import _kernels

        dirty = DirtyBitmap.empty(self.npages)
        if self.workload == "idle":
            return dirty
        for vcpu in range(self.vcpus):
            a, b = start.progress[vcpu], end.progress[vcpu]
            if b <= a:
                continue
            base = self._field(vcpu, ControlBlock.AREA_BASE) // PAGE_SIZE
            share = self._field(vcpu, ControlBlock.AREA_NPAGES)
            dirty.set_range(control_block_addr(vcpu) // PAGE_SIZE, 1)
            if self.workload == "sequential":
                if b - a >= share:
                    dirty.set_range(base, share)
                    continue
                first, last = a % share, (b - 1) % share
                if first <= last:
                    dirty.set_range(base + first, last - first + 1)
                else:
                    dirty.set_range(base + first, share - first)
                    dirty.set_range(base, last + 1)
                continue
            cursor = self._cursors[vcpu]
            if a < cursor.position:
                raise RateError(f"vCPU {vcpu}: replay asked from write {a}, already forgotten up to "
                                f"{cursor.position}")
            state = int(_kernels.skip_writes(np.uint64(cursor.state), np.int64(a - cursor.position)))
            hot = self._field(vcpu, ControlBlock.HOT_NPAGES) if self.workload == "hotset" else 0
            threshold = self._field(vcpu, ControlBlock.HOT_THRESHOLD) if self.workload == "hotset" else 0
            out = np.empty(b - a, dtype=np.int64)
            _kernels.replay_writes(np.uint64(state), np.int64(b - a), np.uint64(share), np.uint64(hot),
                                   np.uint64(threshold), out)
            dirty.set_pages(out + base)
        return dirty

    def forget(self, reading: Reading) -> None:
        """Move the replay forward to ``reading``: later calls start there or after (keeps replays short)."""
        from dirtylog.rate import _kernels

        for vcpu, cursor in enumerate(self._cursors):
            target = reading.progress[vcpu]
            if target > cursor.position and self.workload != "sequential":
                cursor.state = int(_kernels.skip_writes(np.uint64(cursor.state), np.int64(target - cursor.position)))
            cursor.position = max(cursor.position, target)


@dataclass(frozen=True)
class TruthWindow:
    """Distinct pages a workload wrote in a window, bracketed: ``low`` counts the writes certainly inside
    (from after the start boundary to before the end boundary), ``high`` those possibly inside."""

    low: int
    high: int
    pages: DirtyBitmap

    @property
    def middle(self) -> float:
        return (self.low + self.high) / 2


def bracket(truth: Truth, start_before: Reading, start_after: Reading, end_before: Reading,
            end_after: Reading) -> TruthWindow:
    """The truth of a window whose start and end boundaries were each bracketed by two readings."""
    inner = truth.pages(start_after, end_before)
    outer = truth.pages(start_before, end_after)
    return TruthWindow(inner.count(), outer.count(), outer)
