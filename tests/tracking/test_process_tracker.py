"""ProcessTracker on real processes: the stamp proof, mappings that come and go, everything that can go
wrong, and nothing left behind."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from dirtylog.linux import abi, procfs
from dirtylog.linux.errors import NoSuchProcessError, ProcessExitedError, PtraceNotPermittedError
from dirtylog.linux.pagemap import Pagemap
from dirtylog.tracking.base import TrackingError
from dirtylog.tracking.process import ProcessTracker, TargetUsesUserfaultfdError
from dirtylog.units import PAGE_SIZE
from tests.tracking.address_stamps import AddressStampVerifier

HERE = Path(__file__).parent
# One malloc arena with no mmap threshold to speak of: the target's bytearray lands in the brk heap.
TARGET_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_ARENA_MAX": "1"}


class Lines:
    """A child's stdout, line by line, readable with a timeout."""

    def __init__(self, child: subprocess.Popen[str]) -> None:
        self.queue: queue.Queue[str] = queue.Queue()
        assert child.stdout is not None
        stdout = child.stdout
        threading.Thread(target=lambda: [self.queue.put(line) for line in stdout], daemon=True).start()

    def next(self, timeout: float = 20.0) -> str:
        return self.queue.get(timeout=timeout).strip()

    def ready(self) -> str | None:
        try:
            return self.queue.get_nowait().strip()
        except queue.Empty:
            return None


class StampTarget:
    """tests/tracking/stamp_target.py, started and described."""

    def __init__(self, tmp: Path, *, threads: int = 4, pages: int = 128, iterations: int = 200, pause: float = 0.002):
        self.file = tmp / "backing"
        self.file.write_bytes(bytes(threads * pages * PAGE_SIZE))
        self.child = subprocess.Popen(
            [sys.executable, str(HERE / "stamp_target.py"), str(self.file), "--threads", str(threads), "--pages",
             str(pages), "--iterations", str(iterations), "--pause", str(pause)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=TARGET_ENV)
        self.lines = Lines(self.child)
        layout = json.loads(self.lines.next())
        self.pid: int = layout["pid"]
        self.control: int = layout["control"]
        self.areas: list[dict[str, int | str]] = layout["areas"]
        starts = [int(a["start"]) + PAGE_SIZE * np.arange(int(a["npages"]), dtype=np.uint64) for a in self.areas]
        self.pages = np.concatenate(starts).astype(np.uint64)
        self.owner = np.concatenate([np.full(int(a["npages"]), int(a["thread"])) for a in self.areas])
        self.threads = threads
        self.memory = procfs.MemoryReader(self.pid)

    def send(self, line: str) -> None:
        assert self.child.stdin is not None
        self.child.stdin.write(line + "\n")
        self.child.stdin.flush()

    def stamps(self) -> npt.NDArray[np.uint64]:
        parts = []
        for area in self.areas:
            data = self.memory.read(int(area["start"]), int(area["npages"]) * PAGE_SIZE)
            parts.append(np.frombuffer(data, dtype=np.uint64)[:: PAGE_SIZE // 8])
        return np.concatenate(parts)

    def completed(self) -> npt.NDArray[np.uint64]:
        return np.frombuffer(self.memory.read(self.control, 8 * self.threads), dtype=np.uint64).copy()

    def verifier(self) -> AddressStampVerifier:
        return AddressStampVerifier(self.pages, self.owner, self.stamps, self.completed)

    def finish(self) -> str:
        self.send("exit")
        self.child.wait(20)
        self.memory.close()
        return self.checksum

    def close(self) -> None:
        self.child.kill()
        self.child.wait()


def untracked_checksum(tmp: Path, **options: int | float) -> str:
    target = StampTarget(tmp, **options)  # type: ignore[arg-type]
    try:
        target.send("go")
        checksum = json.loads(target.lines.next())["checksum"]
        target.send("exit")
        return str(checksum)
    finally:
        target.close()


@pytest.mark.parametrize("refresh_interval", [1.0, 0.0], ids=["one-ioctl collections", "maps at every collection"])
def test_every_write_of_a_multithreaded_process_is_reported(tmp_path: Path, refresh_interval: float) -> None:
    target = StampTarget(tmp_path)
    try:
        tracker = ProcessTracker(target.pid, refresh_interval=refresh_interval)
        verifier = target.verifier()
        verifier.enable(tracker)
        # Each kind of memory is tracked, under the name /proc/PID/maps gives it.
        for area in target.areas:
            [mapping] = [m for m in tracker.tracked if m.start <= int(area["start"]) < m.end]
            expected = {"heap": "[heap]", "anon": "anon", "file": str(target.file), "stack": "anon"}[str(area["kind"])]
            assert mapping.name == expected, (area, mapping)
        target.send("go")
        done = None
        while done is None:  # collections run while the threads write
            verifier.collect(tracker)
            done = target.lines.ready()
            time.sleep(0.003)
        for _ in range(2):  # the writes are over: whatever is pending must come now
            verifier.collect(tracker)
        report = verifier.report
        assert report.ok, report.violations[:10]
        assert report.collections >= 20 and report.changes_seen > 1000
        assert report.over_reported <= 0.01 * report.pages_reported, report
        if refresh_interval:  # most collections took the fast path: the size of the process stays put
            assert tracker.refreshes < report.collections / 2, (tracker.refreshes, report.collections)
        else:
            assert tracker.refreshes >= report.collections + 1  # enable's, then at least one per collection
        tracker.disable()
        checksum = json.loads(done)["checksum"]
        target.send("exit")
        assert target.child.wait(20) == 0
    finally:
        target.close()
    assert checksum == untracked_checksum(tmp_path)  # tracking changed nothing the program computes


def smaps_uffd_wp(pid: int) -> int:
    """How many of the process's mappings carry VM_UFFD_WP ("uw" in smaps VmFlags)."""
    text = Path(f"/proc/{pid}/smaps").read_text()
    return sum(" uw" in line for line in text.splitlines() if line.startswith("VmFlags:"))


def protected_pages(pid: int, areas: list[dict[str, int | str]]) -> int:
    """Pages of ``areas`` whose pagemap entry has the uffd write-protect bit."""
    pagemap = Pagemap(pid)
    try:
        return sum(int(np.count_nonzero(pagemap.read_entries(int(a["start"]), int(a["start"]) + int(a["npages"])
                                                             * PAGE_SIZE) & np.uint64(abi.PM_UFFD_WP)))
                   for a in areas)
    finally:
        pagemap.close()


def test_nothing_is_left_behind_after_disable(tmp_path: Path) -> None:
    target = StampTarget(tmp_path, iterations=5)
    try:
        tracker = ProcessTracker(target.pid)
        tracker.enable()
        assert smaps_uffd_wp(target.pid) == len(tracker.tracked) and protected_pages(target.pid, target.areas) > 0
        assert procfs.userfaultfd_fds(target.pid) == []  # the target never kept the fd it made for us
        tracker.collect()
        tracker.disable()
        assert smaps_uffd_wp(target.pid) == 0 and protected_pages(target.pid, target.areas) == 0
        assert procfs.status(target.pid)["TracerPid"] == "0"
        target.send("go")
        assert "checksum" in json.loads(target.lines.next())
    finally:
        target.close()


def test_nothing_is_left_behind_when_the_tracker_is_killed(tmp_path: Path) -> None:
    target = StampTarget(tmp_path, iterations=5)
    tracker_code = textwrap.dedent(f"""
        import sys, time
        from dirtylog.tracking.process import ProcessTracker
        tracker = ProcessTracker({target.pid})
        tracker.enable()
        tracker.collect()
        print("tracking", flush=True)
        time.sleep(60)
    """)
    tracker = subprocess.Popen([sys.executable, "-c", tracker_code], stdout=subprocess.PIPE, text=True)
    try:
        assert tracker.stdout is not None and tracker.stdout.readline() == "tracking\n"
        assert smaps_uffd_wp(target.pid) > 0 and protected_pages(target.pid, target.areas) > 0
        tracker.send_signal(signal.SIGKILL)
        tracker.wait(10)
        assert smaps_uffd_wp(target.pid) == 0 and protected_pages(target.pid, target.areas) == 0
        assert procfs.userfaultfd_fds(target.pid) == []
        target.send("go")
        assert "checksum" in json.loads(target.lines.next())
    finally:
        tracker.kill()
        target.close()


class CommandTarget:
    """tests/tracking/command_target.py: a process that maps, writes and unmaps when told."""

    def __init__(self) -> None:
        self.child = subprocess.Popen([sys.executable, str(HERE / "command_target.py")], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True, env=TARGET_ENV)
        self.lines = Lines(self.child)
        assert self.lines.next() == "ready"
        self.pid = self.child.pid

    def __call__(self, *words: object) -> int:
        assert self.child.stdin is not None
        self.child.stdin.write(" ".join(map(str, words)) + "\n")
        self.child.stdin.flush()
        reply = self.lines.next()
        return 0 if reply == "ok" else int(reply)

    def close(self) -> None:
        self.child.kill()
        self.child.wait()


@pytest.fixture
def commands() -> Iterator[CommandTarget]:
    target = CommandTarget()
    yield target
    target.close()


def pages_of(dirty_pages: npt.NDArray[np.uint64], start: int, count: int) -> list[int]:
    inside = (dirty_pages >= start) & (dirty_pages < start + count * PAGE_SIZE)
    return ((dirty_pages[inside] - np.uint64(start)) // PAGE_SIZE).tolist()


@pytest.mark.parametrize("refresh_interval", [0.0, 5.0])
def test_new_mappings_are_registered_and_counted_and_gone_ones_reported(commands: CommandTarget,
                                                                        refresh_interval: float) -> None:
    tracker = ProcessTracker(commands.pid, refresh_interval=refresh_interval)
    tracker.enable()
    tracker.collect()
    area = commands("map", 32)
    commands("write", area, 5)  # written before the tracker knows the mapping
    dirty = tracker.collect()  # the size changed: a refresh even with a long refresh_interval
    [new] = [m for m in dirty.new if m.start <= area < m.end]
    assert new.name == "anon" and new in tracker.tracked
    assert pages_of(dirty.pages(), area, 32) == [0, 1, 2, 3, 4]  # what it held, not its untouched pages
    commands("write", area + 10 * PAGE_SIZE, 2)
    assert pages_of(tracker.collect().pages(), area, 32) == [10, 11]  # counted from then on
    commands("unmap", area, 32)
    dirty = tracker.collect()
    assert new in dirty.gone and new not in tracker.tracked
    tracker.disable()


def test_memory_mapped_again_at_the_same_place_is_registered_again(commands: CommandTarget) -> None:
    area = commands("map", 16)
    commands("write", area, 16)
    tracker = ProcessTracker(commands.pid, refresh_interval=0)
    tracker.enable()
    try:
        commands("write", area, 3)
        commands("remap", area, 16)  # same place, same size, same maps line: only the scan can tell
        commands("write", area + 4 * PAGE_SIZE, 2)
        dirty = tracker.collect()
        # Found by the checked scan failing on it, or (when the new mapping merged with a neighbour) by its
        # new line in maps: either way registered again and reported with what it holds.
        assert tracker.rescans >= 1 or any(m.start <= area < m.end for m in dirty.new)
        assert pages_of(dirty.pages(), area, 16) == [4, 5]  # the old pages 0-2 are gone with their mapping
        commands("write", area + 8 * PAGE_SIZE, 1)
        assert pages_of(tracker.collect().pages(), area, 16) == [8]
    finally:
        tracker.disable()


def test_between_refreshes_a_replaced_mapping_is_reported_late_but_not_lost(commands: CommandTarget) -> None:
    area = commands("map", 16)
    commands("write", area, 16)
    tracker = ProcessTracker(commands.pid, refresh_interval=0.3)
    tracker.enable()
    try:
        tracker.collect()
        commands("remap", area, 16)
        commands("write", area + 4 * PAGE_SIZE, 2)
        fast = tracker.collect()  # same size: no refresh is due, the one-ioctl scan skips the new memory
        assert pages_of(fast.pages(), area, 16) == [] and tracker.rescans == 0
        time.sleep(0.35)
        late = tracker.collect()  # the refresh finds it, registers it, reports what it holds
        assert tracker.rescans >= 1 or any(m.start <= area < m.end for m in late.new)
        assert pages_of(late.pages(), area, 16) == [4, 5]
    finally:
        tracker.disable()


@pytest.mark.parametrize("refresh_interval", [0.0, 0.05])
def test_memory_replaced_faster_than_a_rescan_is_reported_late_not_failed(commands: CommandTarget,
                                                                          refresh_interval: float) -> None:
    area = commands("map", 16)
    commands("write", area, 16)
    tracker = ProcessTracker(commands.pid, refresh_interval=refresh_interval)
    tracker.enable()
    try:
        commands("churn", area, 16)  # from here on the mapping is replaced every few microseconds
        for _ in range(40):
            tracker.collect()  # never fails, however often the registration is lost under the scan
            time.sleep(0.002)
        assert commands("calm") > 1000
        assert tracker.rescans >= 1
        commands("write", area + 2 * PAGE_SIZE, 2)
        reported = np.concatenate([tracker.collect().pages() for _ in range(2)])
        assert {2, 3} <= set(pages_of(reported, area, 16))
        commands("write", area + 9 * PAGE_SIZE, 1)  # and counted as usual once the churn stops
        assert pages_of(tracker.collect().pages(), area, 16) == [9]
    finally:
        tracker.disable()


def test_heap_growth_and_new_thread_stacks_are_tracked(commands: CommandTarget) -> None:
    tracker = ProcessTracker(commands.pid)
    tracker.enable()
    tracker.collect()
    grown = commands("grow", 8)
    stack = commands("thread", 3)
    dirty = tracker.collect()
    assert pages_of(dirty.pages(), grown, 8) == list(range(8))
    assert [m.name for m in tracker.tracked if m.start <= grown < m.end] == ["[heap]"]
    assert pages_of(dirty.pages(), stack, 3) == [0, 1, 2]
    tracker.disable()


@pytest.mark.parametrize("shared", [False, True])
def test_shared_mappings_are_tracked_when_asked(commands: CommandTarget, shared: bool) -> None:
    area = commands("mapshared", 8)
    tracker = ProcessTracker(commands.pid, shared=shared)
    tracker.enable()
    try:
        commands("write", area, 3)
        assert pages_of(tracker.collect().pages(), area, 8) == ([0, 1, 2] if shared else [])
        assert any(m.start <= area < m.end and m.perms[3] == "s" for m in tracker.tracked) == shared
    finally:
        tracker.disable()


def test_results_held_while_their_buffer_is_reused_keep_their_pages(commands: CommandTarget) -> None:
    area = commands("map", 64)
    tracker = ProcessTracker(commands.pid, refresh_interval=60)
    tracker.enable()
    try:
        tracker.collect()
        held = []
        for round_ in range(5):  # results are views of two buffers used in turn: each is reused twice here
            commands("write", area + round_ * 8 * PAGE_SIZE, round_ + 1)
            held.append(tracker.collect())
        for round_, dirty in enumerate(held):
            assert pages_of(dirty.pages(), area, 64) == list(range(round_ * 8, round_ * 8 + round_ + 1))
        # The stats add a collection's pages when its result is first counted or read, not in collect().
        assert tracker.stats.collections == 6
        assert tracker.stats.pages_reported == sum(dirty.count() for dirty in held)
        before = tracker.stats.pages_reported
        unread = tracker.collect()
        commands("write", area, 3)
        last = tracker.collect()
        assert tracker.stats.pages_reported == before  # neither is counted yet
        assert pages_of(last.pages(), area, 64) == [0, 1, 2]
        assert tracker.stats.pages_reported == before + last.count()
        assert tracker.stats.pages_reported == before + last.count() + unread.count()
    finally:
        tracker.disable()


def test_a_target_that_exits_ends_the_tracking_with_its_last_data(commands: CommandTarget) -> None:
    tracker = ProcessTracker(commands.pid)
    tracker.enable()
    area = commands("map", 4)
    commands("write", area, 4)
    assert pages_of(tracker.collect().pages(), area, 4) == [0, 1, 2, 3]
    commands.child.kill()
    commands.child.wait()
    last = tracker.collect()
    assert last.exited and last.count() == 0
    with pytest.raises(ProcessExitedError, match="has exited"):
        tracker.collect()
    tracker.disable()


def test_a_pid_that_does_not_exist() -> None:
    with pytest.raises(NoSuchProcessError, match="no process 4194001"):
        ProcessTracker(4194001).enable()


def test_a_target_with_its_own_userfaultfd_is_refused(commands: CommandTarget) -> None:
    fd = commands("uffd")
    assert fd >= 0
    with pytest.raises(TargetUsesUserfaultfdError, match=f"already has a userfaultfd \\(fd {fd}\\)"):
        ProcessTracker(commands.pid).enable()
    assert procfs.status(commands.pid)["TracerPid"] == "0"


def test_a_second_tracker_is_refused_while_the_first_tracks(commands: CommandTarget) -> None:
    first = ProcessTracker(commands.pid)
    first.enable()
    try:
        with pytest.raises(TargetUsesUserfaultfdError, match="already registered with another userfaultfd"):
            ProcessTracker(commands.pid).enable()
        assert procfs.userfaultfd_fds(commands.pid) == []  # the refused one left nothing either
        area = commands("map", 2)
        commands("write", area, 2)
        assert pages_of(first.collect().pages(), area, 2) == [0, 1]  # the first one is unharmed
    finally:
        first.disable()


def test_ptrace_not_permitted_is_explained(commands: CommandTarget) -> None:
    read_end, write_end = os.pipe()
    helper = os.fork()
    if helper == 0:  # pragma: no cover - runs in the forked child
        os.close(read_end)
        try:
            os.setgid(65534)
            os.setuid(65534)
            ProcessTracker(commands.pid).enable()
            message = "no error"
        except PtraceNotPermittedError as error:
            message = f"refused: {error}"
        except BaseException as error:  # reported to the parent
            message = f"{type(error).__name__}: {error}"
        os.write(write_end, message.encode())
        os._exit(0)
    os.close(write_end)
    os.waitpid(helper, 0)
    message = os.read(read_end, 4096).decode()
    os.close(read_end)
    assert message.startswith(f"refused: may not ptrace process {commands.pid}"), message
    assert "run as that user or as root" in message


def test_collect_before_enable_and_bad_settings_are_errors() -> None:
    with pytest.raises(TrackingError, match="not enabled"):
        ProcessTracker().collect()
    with pytest.raises(TrackingError, match="refresh_interval must be 0 or more"):
        ProcessTracker(refresh_interval=-1)
