"""What one write-protection fault costs the guest on this host, measured, so that a dirty-log
measurement can say how much guest time it took: every page it finds dirty cost the guest one fault.

The calibration runs a small machine of our own (16 MiB, one vCPU, the ``sequential`` workload at full
speed). It lets the guest write its whole area once with logging on (so KVM has split its mappings
into 4 KiB pages, as during any measurement), collects the log (which write-protects every page again),
and times the writes that follow: each goes to a write-protected page and faults, so the write rate is
the fault rate and its reciprocal the cost of one fault (the write itself takes ~12 ns here, against
microseconds for the fault). Measured once per process, in ~0.2 s.
"""

from __future__ import annotations

import functools
import time

from dirtylog.guest.machine import Machine
from dirtylog.tracking.kvm_log import LogTracker

CALIBRATION_MEMORY = "16M"
CALIBRATION_SECONDS = 0.03
FIRST_PASS_TIMEOUT = 2.0


@functools.cache
def fault_cost() -> float:
    """Seconds of vCPU time one guest write to a write-protected page costs on this host (0.0 if the
    calibration could not measure it)."""
    with Machine(CALIBRATION_MEMORY, 1, "sequential", prefault=True) as machine:
        npages = len(machine.workload_pages)
        machine.start()
        tracker = LogTracker(machine)
        tracker.enable()
        deadline = time.perf_counter() + FIRST_PASS_TIMEOUT
        first = machine.progress
        while machine.progress - first < npages and time.perf_counter() < deadline:
            time.sleep(0.002)
        tracker.collect()
        start_writes, start = machine.progress, time.perf_counter()
        # Stop before the pass wraps onto pages already made writable in this round.
        while machine.progress - start_writes < npages // 2 and time.perf_counter() - start < CALIBRATION_SECONDS:
            time.sleep(0.001)
        writes, seconds = machine.progress - start_writes, time.perf_counter() - start
        machine.pause()
        tracker.disable()
    return seconds / writes if writes > 0 else 0.0
