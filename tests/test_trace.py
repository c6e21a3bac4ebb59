"""Recorded traces: the file format, the guest tables, and the trace workload replaying them on KVM."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from dirtylog.guest.machine import MachineError
from dirtylog.guest.trace_tables import TraceFitError
from dirtylog.machine import Machine
from dirtylog.trace import DirtyTrace, TraceError
from dirtylog.units import PAGE_SIZE

BASE = 0x7F00_0000_0000


def addresses(pages: range | list[int]) -> np.ndarray:
    return np.uint64(BASE) + np.uint64(PAGE_SIZE) * np.asarray(list(pages), dtype=np.uint64)


def sample() -> DirtyTrace:
    """Three windows: pages 0-9, then 5-14 again, then nothing, then 100."""
    windows = [addresses(range(10)), addresses(range(5, 15)), addresses([]), addresses([100])]
    return DirtyTrace.from_windows([0.05, 0.10, 0.15, 0.20], windows, source="sample", interval=0.05)


def test_windows_become_compact_page_numbers_and_survive_a_file(tmp_path: Path) -> None:
    trace = sample()
    assert trace.npages == 16 and trace.nwindows == 4 and trace.pages.size == 21
    assert trace.window(1).tolist() == list(range(5, 15)) and trace.window(2).size == 0
    assert trace.window(3).tolist() == [15] and int(trace.addresses[15]) == BASE + 100 * PAGE_SIZE
    trace.save(tmp_path / "t.npz")
    again = DirtyTrace.load(tmp_path / "t.npz")
    assert again.source == "sample" and again.interval == 0.05 and again.describe() == trace.describe()
    assert all(np.array_equal(a, b) for a, b in ((again.pages, trace.pages), (again.offsets, trace.offsets),
                                                  (again.times, trace.times), (again.addresses, trace.addresses)))


def test_guest_tables_split_pages_between_vcpus() -> None:
    trace = sample()
    table = trace.guest_table(1, 2)
    header = table[: 8 * 9].view("<u8")
    assert header[0] == 4
    assert header[1::2].tolist() == [50_000, 100_000, 150_000, 200_000]  # microseconds
    assert header[2::2].tolist() == [5, 5, 0, 1]  # odd compact pages belong to vCPU 1
    assert table[8 * 9:].view("<u4").tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 5, 6, 7]  # page p // 2
    assert trace.pages_needed(2) == 8


def test_bad_trace_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="no trace file"):
        DirtyTrace.load(tmp_path / "missing.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(TraceError, match="is not a dirtylog trace"):
        DirtyTrace.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", format=np.array("something/else"))
    with pytest.raises(TraceError, match="not a dirtylog-trace/1 trace"):
        DirtyTrace.load(tmp_path / "other.npz")
    broken = sample()
    object.__setattr__(broken, "offsets", broken.offsets[:-1])
    with pytest.raises(TraceError, match="do not match"):
        broken.check()


@pytest.mark.kvm
def test_the_trace_workload_writes_each_recorded_page_once_per_replay_at_the_recorded_pace() -> None:
    trace = sample()
    with Machine("64M", vcpus=2, workload="trace", trace=trace) as machine:
        log = machine.dirty_log("log")
        machine.start()
        log.enable()
        log.collect()
        time.sleep(0.1)  # half the trace's 0.2 s: a replay cannot have finished
        assert machine.iterations == [0, 0]
        while min(machine.iterations) < 2:
            machine.check()
        machine.pause()
        written = np.intersect1d(log.collect().pages(), np.array(machine.workload_pages))
        shares = [machine.spec.share(v) for v in range(2)]
        expected = sorted(shares[p % 2].start + p // 2 for p in range(trace.npages))
        assert written.tolist() == expected
        progress = machine.vcpu_progress
        assert sum(progress) >= 2 * trace.pages.size
        stamps = machine.memory.reshape(-1, PAGE_SIZE)[expected, :8].copy().view(np.uint64)[:, 0]
        assert bool(np.all(stamps >= 2))  # stamped with the replay number


@pytest.mark.kvm
def test_a_trace_must_fit_and_must_be_asked_for() -> None:
    big = DirtyTrace.from_windows([0.1], [addresses(range(20000))])
    with pytest.raises(TraceFitError, match="give the machine at least"):
        Machine("64M", vcpus=2, workload="trace", trace=big)
    with pytest.raises(MachineError, match="give both workload='trace' and trace=FILE"):
        Machine("64M", vcpus=1, workload="trace")
    with pytest.raises(MachineError, match="give both"):
        Machine("64M", vcpus=1, workload="random", trace=sample())
