"""The stamp proof for a process tracking itself: writer threads stamp NumPy arrays while the main thread
collects. No ptrace: the userfaultfd is this process's own."""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
import time

import numpy as np
import numpy.typing as npt

from dirtylog.linux import procfs
from dirtylog.tracking.process import ProcessTracker
from dirtylog.units import PAGE_SIZE
from tests.tracking.address_stamps import AddressStampVerifier

THREADS = 3
ITERATIONS = 150
PER_ITERATION = 16
# Array sizes in pages: the small ones live in malloc's heap or an arena; the last is above glibc's largest
# dynamic mmap threshold (32 MiB), so it always gets a mapping of its own.
SIZES = (12, 96, 9000)


class Stamper:
    """Per thread, NumPy arrays whose whole inner pages get stamped, iteration by iteration."""

    def __init__(self) -> None:
        self.arrays = [[np.zeros(size * PAGE_SIZE // 8 + 1024, dtype=np.uint64) for size in SIZES]
                       for _ in range(THREADS)]
        self.completed = np.zeros(THREADS, dtype=np.uint64)
        self.views: list[list[npt.NDArray[np.uint64]]] = []  # per thread, per array: the stamp word of each page
        addresses, owners = [], []
        for thread, arrays in enumerate(self.arrays):
            views = []
            for array in arrays:
                first = (-array.ctypes.data) % PAGE_SIZE // 8  # the first word on a page boundary
                view = array[first::PAGE_SIZE // 8][: (array.size - 1024) // (PAGE_SIZE // 8)]  # whole pages only
                views.append(view)
                addresses.append(view.ctypes.data + PAGE_SIZE * np.arange(view.size, dtype=np.uint64))
                owners.append(np.full(view.size, thread))
            self.views.append(views)
        self.pages = np.concatenate(addresses).astype(np.uint64)
        self.owner = np.concatenate(owners)

    def stamps(self) -> npt.NDArray[np.uint64]:
        return np.concatenate([view for views in self.views for view in views]).copy()

    def run(self, thread: int, started: threading.Barrier) -> None:
        rng = np.random.default_rng(thread)
        views = self.views[thread]
        sizes = np.array([view.size for view in views])
        started.wait()
        for iteration in range(1, ITERATIONS + 1):
            which = rng.integers(0, len(views), PER_ITERATION)
            slots = rng.integers(0, sizes[which])
            for array, slot in zip(which.tolist(), slots.tolist(), strict=True):
                views[array][slot] = iteration
            self.completed[thread] = iteration  # after the stamps (NumPy stores in program order here)
            time.sleep(0.001)  # let collections fall between iterations, and inside them

    def checksum(self) -> str:
        digest = hashlib.sha256()
        for views in self.views:
            for view in views:
                digest.update(view.tobytes())
        return digest.hexdigest()


def run_stamper(track: bool) -> tuple[str, AddressStampVerifier | None, ProcessTracker | None, int]:
    """Run the writers, collecting concurrently when ``track``; returns the arrays' checksum, the verifier,
    the tracker and the fd its userfaultfd had."""
    stamper = Stamper()
    tracker = ProcessTracker(refresh_interval=0.05) if track else None
    verifier = AddressStampVerifier(stamper.pages, stamper.owner, stamper.stamps,
                                    lambda: stamper.completed.copy()) if track else None
    started = threading.Barrier(THREADS + 1)
    uffd_fd = -1
    workers = [threading.Thread(target=stamper.run, args=(t, started)) for t in range(THREADS)]
    for worker in workers:
        worker.start()
    others = set(procfs.userfaultfd_fds(os.getpid()))  # an earlier test's, not yet collected, is not ours
    if tracker and verifier:
        verifier.enable(tracker)
    started.wait()
    while any(worker.is_alive() for worker in workers):
        if tracker and verifier:
            verifier.collect(tracker)
        else:
            threading.Event().wait(0.001)
    for worker in workers:
        worker.join()
    if tracker and verifier:
        verifier.collect(tracker)
        verifier.collect(tracker)
        (uffd_fd,) = set(procfs.userfaultfd_fds(os.getpid())) - others
        tracker.disable()
    return stamper.checksum(), verifier, tracker, uffd_fd


def test_a_process_tracking_itself_reports_every_write_of_its_threads() -> None:
    checksum, verifier, tracker, uffd_fd = run_stamper(track=True)
    assert verifier is not None and tracker is not None
    report = verifier.report
    assert report.ok, report.violations[:10]
    assert report.collections >= 10 and report.changes_seen > 1000
    assert report.over_reported <= 0.01 * report.pages_reported, report
    assert tracker.self_tracking and uffd_fd not in procfs.userfaultfd_fds(os.getpid())  # disable() closed it
    assert checksum == run_stamper(track=False)[0]


def test_self_tracking_finds_new_mappings_and_leaves_out_its_own_buffer() -> None:
    with ProcessTracker() as tracker:
        area = mmap.mmap(-1, 200 * PAGE_SIZE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        view = np.frombuffer(area, dtype=np.uint8)
        view[::PAGE_SIZE] = 1
        dirty = tracker.collect()
        [mapping] = [m for m in tracker.tracked if m.start <= view.ctypes.data < m.end]
        assert mapping.name == "anon" and mapping in dirty.new
        assert dirty.bitmap(mapping).count() == 200
        view[5 * PAGE_SIZE] = 2
        assert dirty.bitmap(mapping).pages().tolist() == list(range(200))
        assert tracker.collect().bitmap(mapping).pages().tolist() == [5]
        for start, end in (pagemap.buffer_range for pagemap in tracker._pagemaps):
            assert not any(m.start < end and start < m.end for m in tracker.tracked)
        assert {"[heap]", "[stack]"} <= {m.name for m in tracker.tracked}
