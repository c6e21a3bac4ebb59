"""Dirty tracking of any Linux process, from outside: userfaultfd async write-protect + ``PAGEMAP_SCAN``.

How it works (see docs/process-tracking.md for the whole story):

* **One call inside the target.** A userfaultfd acts on the memory of the process that created it, so
  the target must call ``userfaultfd()`` itself; :class:`~dirtylog.linux.inject.RemoteSyscalls` makes it
  do so by ptrace, ``pidfd_getfd`` brings the fd here, and an injected ``close()`` leaves the target with
  nothing of ours. Everything else happens in the tracker: the API handshake with ``WP_ASYNC``,
  ``UFFDIO_REGISTER`` in WP mode of every writable private mapping, and every ``PAGEMAP_SCAN`` on the
  target's ``/proc/PID/pagemap``. Tracking this process itself (``pid=None``) needs no ptrace at all.
* **Arm, then collect.** ``PAGE_IS_WRITTEN`` means "not write-protected", so :meth:`enable` first
  protects every page of every registered mapping (never-touched ones get a marker). From then on a
  write faults once, the kernel un-protects the page by itself (asynchronous mode: the writer never
  waits for us), and a collection reports and re-protects the written pages in one page-table walk
  (``PM_SCAN_WP_MATCHING``), atomically per page: no write can fall between the report and the re-arm.
* **Mappings come and go.** A collection re-reads ``/proc/PID/maps`` when the process's size changed
  (``/proc/PID/statm``, under a microsecond) or ``refresh_interval`` has passed, registers new writable
  private mappings and reports those gone. A new mapping's pages written before it was registered are not
  protected, so its first scan reports them (leaving out zero pages and file pages only read): nothing
  written is ever lost, at worst reported a little later.
* **Scans.** Between refreshes a collection is one ioctl over the whole tracked span: the kernel skips the
  unregistered memory in between (the libraries' code) in its per-VMA test, without walking it. At a
  refresh, adjacent tracked mappings form one run and one ioctl each with ``PM_SCAN_CHECK_WPASYNC``, so
  memory that lost its registration (unmapped and mapped again at the same place) fails the scan instead
  of being skipped. The kernel has then already reported and re-protected the run's pages before that
  point; they are recovered from the output buffer, whose ``categories`` are cleared before a refresh's
  scans so that fresh records can be told from stale ones.
* **No copies.** Results are views of one of two output buffers used in turn; a result still referenced
  when its buffer comes round again is copied out first (:meth:`ProcessDirty.detach`).

What it cannot see: writes to shared mappings (tracked per process here, they may be written by
another), writes by devices (DMA), and pages of mappings the kernel will not register (device or PFN
mappings); those are listed in :attr:`ProcessTracker.untracked`.
"""

from __future__ import annotations

import errno
import functools
import os
import select
import time
import weakref
from dataclasses import dataclass

import numpy as np

from dirtylog.linux import abi, procfs
from dirtylog.linux.errors import (
    InjectionError,
    KernelFeatureError,
    NoSuchProcessError,
    NotRegisteredError,
    ProcessError,
    ProcessExitedError,
    RangeBusyError,
    UserfaultfdError,
)
from dirtylog.linux.inject import RemoteSyscalls
from dirtylog.linux.pagemap import Pagemap, pagemap_scan_missing_message, pagemap_scan_supported
from dirtylog.linux.procfs import Mapping
from dirtylog.linux.syscalls import pidfd_getfd, pidfd_open
from dirtylog.linux.userfaultfd import Userfaultfd, available_features
from dirtylog.tracking.base import TrackerBase, TrackingError
from dirtylog.tracking.process_dirty import ProcessDirty

WP_FEATURES = abi.UFFD_FEATURE_WP_ASYNC | abi.UFFD_FEATURE_WP_UNPOPULATED
# The first scan of a mapping registered at a collection protects all of it (holes and never-touched
# pages too: on 6.18 a none PTE in a range never protected reads as WRITTEN) and reports every region
# with its categories; of those, the written pages are the present or swapped ones that are neither the
# zero page (only read) nor an unmodified page of a file (only read). WPALLOWED is in the return mask so
# that every record has a non-zero ``categories``, which the recovery after a failed scan relies on.
_FIRST_RETURN_MASK = (abi.PAGE_IS_WPALLOWED | abi.PAGE_IS_WRITTEN | abi.PAGE_IS_PRESENT | abi.PAGE_IS_SWAPPED
                      | abi.PAGE_IS_PFNZERO | abi.PAGE_IS_FILE)
_HELD = abi.PAGE_IS_PRESENT | abi.PAGE_IS_SWAPPED
_READ_ONLY_CATEGORIES = abi.PAGE_IS_PFNZERO | abi.PAGE_IS_FILE
_MAX_RESCANS = 4


class TargetUsesUserfaultfdError(ProcessError):
    """The target already has a userfaultfd on its memory: a mapping can be registered with one only."""


@functools.cache
def check_kernel_support() -> None:
    """Raise :class:`KernelFeatureError` unless this kernel has ``PAGEMAP_SCAN`` and ``WP_ASYNC`` (6.7)."""
    if not pagemap_scan_supported():
        raise KernelFeatureError(pagemap_scan_missing_message())
    try:
        available = available_features()
    except UserfaultfdError as error:
        raise KernelFeatureError(f"cannot use userfaultfd here: {error}", error.errno) from None
    if not available & abi.UFFD_FEATURE_WP_ASYNC:
        raise KernelFeatureError(f"this kernel (Linux {os.uname().release}) lacks UFFD_FEATURE_WP_ASYNC; dirty "
                                 "tracking of processes needs Linux 6.7 or newer (PAGEMAP_SCAN and WP_ASYNC)")


def target_userfaultfd(pid: int, pidfd: int) -> Userfaultfd:
    """A userfaultfd created *by* process ``pid`` (by ptrace injection), now held here and nowhere else."""
    existing = procfs.userfaultfd_fds(pid)
    if existing:
        raise TargetUsesUserfaultfdError(
            f"process {pid} already has a userfaultfd (fd {', '.join(map(str, existing))}); a mapping can be "
            "registered with one userfaultfd only, so its memory cannot be tracked this way")
    flags = os.O_CLOEXEC | os.O_NONBLOCK | abi.UFFD_USER_MODE_ONLY
    with RemoteSyscalls(pid) as remote:
        try:
            target_fd = remote.checked_call(abi.SYS_userfaultfd, flags, what="userfaultfd()")
        except InjectionError as error:
            if error.errno in (errno.EPERM, errno.EACCES):
                seccomp = procfs.status(pid).get("Seccomp", "0")
                raise InjectionError(
                    f"process {pid} may not create a userfaultfd (EPERM)"
                    + (": a seccomp filter forbids it (containers' default profiles do)" if seccomp == "2" else
                       ": a security module forbids it"), error.errno) from None
            raise
        try:
            fd = pidfd_getfd(pidfd, target_fd)
        except OSError as error:
            raise InjectionError(f"pidfd_getfd could not bring the userfaultfd of process {pid} here: "
                                 f"{os.strerror(error.errno or 0)}", error.errno) from None
        finally:
            remote.call(abi.SYS_close, target_fd)
    return Userfaultfd.adopt(fd, owner=f"process {pid}")


@dataclass(frozen=True)
class _Job:
    """One scan of a collection: a run of adjacent mappings, steady or first-time."""

    start: int
    end: int
    first: bool  # mappings registered at this collection: report what they hold, not what was re-written


class ProcessTracker(TrackerBase[ProcessDirty]):
    """Dirty pages of process ``pid`` (None: this process), by mapping; see the module docstring.

    ``refresh_interval`` (seconds, default 1): ``/proc/PID/maps`` is re-read, and each run of mappings
    scanned on its own with the registration checked, when the process's size changed (mmap, munmap, brk,
    a new thread's stack, exit) or when this long has passed; otherwise a collection is one ``PAGEMAP_SCAN``
    over all tracked memory. A mapping that appeared without changing the size (one unmapped and mapped
    again at the same place, or made writable by ``mprotect``) is then reported at most this late, never
    lost. 0 re-reads the maps at every collection. ``stop_timeout`` bounds the wait for the target's
    thread to stop for the injection. ``shared`` also tracks writable *shared* mappings (``MAP_SHARED``,
    which is what Python's ``mmap.mmap(-1, n)`` makes); only this process's own writes to them are seen.
    """

    mode = "process"

    def __init__(self, pid: int | None = None, *, refresh_interval: float = 1.0, shared: bool = False,
                 stop_timeout: float = 10.0) -> None:
        if refresh_interval < 0:
            raise TrackingError(f"refresh_interval must be 0 or more seconds, got {refresh_interval}")
        super().__init__()
        self.pid = os.getpid() if pid is None else pid
        self.self_tracking = self.pid == os.getpid()
        self.refresh_interval = refresh_interval
        self.shared = shared
        self.stop_timeout = stop_timeout
        self.tracked: list[Mapping] = []
        self._tracked_tuple: tuple[Mapping, ...] = ()  # what results carry, made once per refresh
        self._span: tuple[int, int] | None = None  # [start, end) of all tracked memory: the steady scan's range
        self._tally = self.stats.add_pages  # results add their pages to the stats when first counted
        self.untracked: dict[Mapping, str] = {}  # mappings the kernel would not register, and why
        self.exited = False
        self.refreshes = 0
        self.refresh_seconds = 0.0
        self.scans = 0
        self.rescans = 0
        self.deferrals = 0  # collections that left memory changing under them to the next one
        self._uffd: Userfaultfd | None = None
        # Two pagemap fds, each with its own output buffer, used in turn: a result is a view of the buffer it
        # was scanned into, which the collection after next reuses (detaching the result if still held).
        self._pagemaps: list[Pagemap] = []
        self._pagemap: Pagemap | None = None
        self._current = 0
        self._written_upto = [0, 0]  # per buffer: records written since its categories were last cleared
        self._handed_out: list[weakref.ref[ProcessDirty] | None] = [None, None]
        self._maps: procfs.MapsReader | None = None
        self._pidfd = -1
        self._statm = -1
        self._size = b""
        self._last_refresh = 0.0
        self._fresh: set[Mapping] = set()
        self._new: list[Mapping] = []
        self._gone: list[Mapping] = []
        self._jobs: list[_Job] = []
        self._exit_reported = False
        self._rescanned = False
        self._refresh_soon = False

    @property
    def target(self) -> str:
        return "this process" if self.self_tracking else f"process {self.pid}"

    # --- enable -----------------------------------------------------------------------------------

    def _enable(self) -> None:
        check_kernel_support()
        if not self.self_tracking and not procfs.process_exists(self.pid):
            raise NoSuchProcessError(f"no process {self.pid}: /proc/{self.pid} does not exist")
        try:
            where: int | str = "self" if self.self_tracking else self.pid
            self._maps = procfs.MapsReader(where)
            self._pagemaps = [Pagemap(where), Pagemap(where)]
            self._pagemap = self._pagemaps[0]
            self._statm = os.open(f"/proc/{where}/statm", os.O_RDONLY | os.O_CLOEXEC)
            if self.self_tracking:
                self._uffd = Userfaultfd.create(user_mode_only=True)
            else:
                self._pidfd = pidfd_open(self.pid)
                self._uffd = target_userfaultfd(self.pid, self._pidfd)
            self._uffd.api(WP_FEATURES)
            self.tracked, self.untracked = [], {}
            self._refresh(initial=True)
            self._plan()
            for job in self._jobs:  # arm: from here on every write is seen
                self._pagemap.protect(job.start, job.end)
        except BaseException:
            self._release()
            raise

    # --- collect ----------------------------------------------------------------------------------

    def _collect(self) -> ProcessDirty:
        if self.exited:
            if self._exit_reported:
                raise ProcessExitedError(f"{self.target} has exited; its last collection was already returned")
            self._exit_reported = True
            return ProcessDirty.empty(self.tracked, exited=True)
        pagemap = self._swap_buffers()
        # The steady path (no refresh due) is kept short: what runs after the walk runs out of the caches
        # the walk has just streamed the page tables through, so every step there costs ten times its
        # warm price.
        refreshed = False
        try:
            if self._refresh_due():
                refreshed = True
                self._refresh()
                self._plan()
                filled = self._scan_all()
            elif self._span is not None:
                self.scans += 1
                filled = self._scan_span(pagemap, *self._span)
            else:
                filled = 0
        except ProcessExitedError:
            self.exited = True
            filled = 0
        if refreshed and not self.exited and self._target_gone():
            self.exited = True
        if filled > self._written_upto[self._current]:
            self._written_upto[self._current] = filled
        if self._rescanned:  # runs were scanned twice: they may repeat or come out of order
            self._rescanned = False
            result = ProcessDirty.from_runs(self.tracked, pagemap.starts[:filled].copy(),
                                            pagemap.ends[:filled].copy(), new=self._new, gone=self._gone,
                                            exited=self.exited, on_count=self._tally)
        else:  # views of the buffer: no copy, no allocation, not even read; detached only if still held
            result = ProcessDirty(self._tracked_tuple, pagemap.starts[:filled], pagemap.ends[:filled],
                                  tuple(self._new) if self._new else (), tuple(self._gone) if self._gone else (),
                                  self.exited, self._tally)
            self._handed_out[self._current] = weakref.ref(result)
        self._exit_reported = self.exited
        if refreshed:
            self._new, self._gone = [], []
            if self._fresh:  # registered at this collection: from the next one on, they are steady runs
                self._fresh.clear()
                self._plan()
        return result

    def _account(self, seconds: float, result: ProcessDirty) -> None:
        """Record the collection without counting its pages: the result adds them to ``stats.pages_reported``
        when it is first counted or read. Counting here would read the whole output right after the walk,
        out of the caches: up to a third of the ioctl's own time at one run per written page."""
        self.stats.record_collect(seconds, 0)

    def _swap_buffers(self) -> Pagemap:
        """Scan into the other of the two pagemaps' buffers; take back the result still using it, if any."""
        self._current ^= 1
        pagemap = self._pagemap = self._pagemaps[self._current]
        previous = self._handed_out[self._current]
        if previous is not None:
            held = previous()
            if held is not None:
                held.detach()
            self._handed_out[self._current] = None
        return pagemap

    def _clear_sentinels(self) -> None:
        """Zero the ``categories`` of every record this buffer holds, before a refresh's checked scans: their
        recovery after a failed scan counts the records with non-zero categories as fresh. (The fast path
        needs no sentinel, so it never clears: this clears up to the furthest record written since.)"""
        assert self._pagemap is not None
        self._pagemap.buffer["categories"][: self._written_upto[self._current]] = 0
        self._written_upto[self._current] = 0

    @staticmethod
    def _scan_span(pagemap: Pagemap, start: int, end: int) -> int:
        """The fast path, when no refresh is due: one ``PAGEMAP_SCAN`` over the whole tracked span.

        Without ``PM_SCAN_CHECK_WPASYNC`` the kernel skips memory not registered with us in its per-VMA test,
        without walking it: the libraries' code between the tracked mappings costs next to nothing. A
        mapping replaced in place since the last refresh is skipped too; its pages stay unprotected and the
        first scan at the next refresh reports them (a refresh is at most ``refresh_interval`` away).
        """
        return pagemap.collect_written(start, end, check_registered=False)

    def _scan_all(self) -> int:
        """A refresh's scans, run by run; returns how many regions fill the buffer (first scans filtered).

        A run that lost its registration under the scan is registered again and scanned again. Memory
        replaced faster than that (a heap top that malloc trims and grows back in a loop) would fail every
        time: after ``_MAX_RESCANS`` the rest of the collection is scanned unchecked, skipping what is not
        registered, and the next collection refreshes, registers it and reports it: late, never lost.
        """
        assert self._pagemap is not None
        self._clear_sentinels()
        self._refresh_soon = False
        pagemap = self._pagemap
        filled, index, rescans, checked = 0, 0, 0, True
        jobs = self._jobs
        while index < len(jobs):
            job = jobs[index]
            try:
                if job.first:
                    flags = abi.PM_SCAN_WP_MATCHING | (abi.PM_SCAN_CHECK_WPASYNC if checked else 0)
                    end = pagemap.scan(job.start, job.end, first=filled, flags=flags, return_mask=_FIRST_RETURN_MASK)
                    filled = self._keep_written(filled, end)
                else:
                    filled = pagemap.collect_written(job.start, job.end, first=filled, check_registered=checked)
                self.scans += 1
                index += 1
            except NotRegisteredError:
                self._rescanned = True
                # Part of the run is no longer registered (unmapped and mapped again). What the kernel
                # reported before it met that part is in the buffer, already re-protected: keep it.
                filled = self._recover(filled)
                rescans += 1
                self.rescans += 1
                self._refresh()
                self._register_again(job.start, job.end)
                self._plan()
                # Scan again from the failed run on, and every run registered just now, wherever it is.
                jobs = [j for j in self._jobs if j.end > job.start or j.first]
                index = 0
                if rescans >= _MAX_RESCANS:
                    checked, self._refresh_soon = False, True
                    self.deferrals += 1
        return filled

    def _recover(self, filled: int) -> int:
        """The end of the records a failed scan wrote from ``filled`` on (their categories are non-zero)."""
        assert self._pagemap is not None
        categories = self._pagemap.buffer["categories"][filled:]
        stale = np.flatnonzero(categories == 0)
        return filled + (int(stale[0]) if stale.size else categories.size)

    def _keep_written(self, first: int, end: int) -> int:
        """Keep only the written records of a first scan (see ``_FIRST_RETURN_MASK``)."""
        assert self._pagemap is not None
        records = self._pagemap.buffer[first:end]
        categories = records["categories"]
        written = records[((categories & abi.PAGE_IS_WRITTEN) != 0) & ((categories & _HELD) != 0)
                          & ((categories & _READ_ONLY_CATEGORIES) == 0)]
        kept = int(written.size)
        records[:kept] = written
        records["categories"][kept:] = 0
        return first + kept

    # --- mappings ---------------------------------------------------------------------------------

    def _process_size(self) -> bytes:
        """The first field of ``/proc/PID/statm``: the process's size in pages, as text (0.6 us to read)."""
        try:
            size: bytes = os.pread(self._statm, 64, 0).split(b" ", 1)[0]
            return size
        except ProcessLookupError:
            raise ProcessExitedError(f"{self.target} exited", errno.ESRCH) from None

    def _refresh_due(self) -> bool:
        """Whether to re-read the maps now: always with ``refresh_interval`` 0; else when the process's size
        changed (mmap, munmap, brk, a thread's stack — and exit: statm reads 0 then) or the interval passed."""
        if self.refresh_interval == 0 or self._refresh_soon:
            return True
        return (self._process_size() != self._size
                or time.monotonic() - self._last_refresh >= self.refresh_interval)

    def _refresh(self, *, initial: bool = False) -> None:
        """Re-read the mappings: register new writable private ones, forget those gone."""
        assert self._maps is not None and self._uffd is not None
        began = time.perf_counter()
        self._size = self._process_size()
        listed = self._maps.mappings(writable_only=True) if self.shared else self._maps.mappings(
            writable_private_only=True)
        current = [m for m in listed if not self._excluded(m)]
        if not current and not self.self_tracking and self._target_gone():
            raise ProcessExitedError(f"{self.target} exited")
        now = set(current)
        known = set(self.tracked)
        self._gone.extend(m for m in self.tracked if m not in now)
        self.untracked = {m: why for m, why in self.untracked.items() if m in now}
        tracked = [m for m in current if m in known]
        for mapping in current:
            if mapping in known or mapping in self.untracked or not self._register(mapping, initial=initial):
                continue
            tracked.append(mapping)
            if not initial:
                self._new.append(mapping)
                self._fresh.add(mapping)
        self.tracked = sorted(tracked)
        self._last_refresh = time.monotonic()
        self.refreshes += 1
        self.refresh_seconds += time.perf_counter() - began

    def _register_again(self, start: int, end: int) -> None:
        """Register the tracked mappings of ``[start, end)`` again and give them a first scan.

        A mapping unmapped and mapped again at the same place has the same line in ``maps``, so only a
        failed scan tells it from the old one; registering is a no-op for the mappings still registered.
        """
        assert self._uffd is not None
        for mapping in [m for m in self.tracked if m.start < end and start < m.end]:
            # A mapping registered at this very refresh can have been replaced before its first scan too.
            if self._register(mapping, initial=False):
                if mapping not in self._fresh:
                    self._fresh.add(mapping)
                    self._new.append(mapping)
            else:
                self.tracked.remove(mapping)

    def _register(self, mapping: Mapping, *, initial: bool) -> bool:
        """Register ``mapping`` for async WP; False (and an entry in :attr:`untracked`) where the kernel won't."""
        assert self._uffd is not None
        try:
            self._uffd.register(mapping.start, mapping.size, wp=True)
        except RangeBusyError:
            if initial and not self.self_tracking:
                raise TargetUsesUserfaultfdError(
                    f"{mapping.label} of {self.target} is already registered with another userfaultfd (the "
                    "program's own, or another tracker's): a mapping belongs to one userfaultfd only") from None
            self.untracked[mapping] = "registered with another userfaultfd"
            return False
        except UserfaultfdError as error:
            if error.errno in (errno.EINVAL, errno.ENOMEM):  # gone meanwhile, or a kind not supported
                self.untracked[mapping] = str(error)
                return False
            raise
        return True

    def _excluded(self, mapping: Mapping) -> bool:
        """A tracker of itself leaves out its own scan buffers (the kernel writes them at every collection)."""
        if not self.self_tracking:
            return False
        return any(mapping.start < end and start < mapping.end
                   for start, end in (pagemap.buffer_range for pagemap in self._pagemaps))

    def _plan(self) -> None:
        """Group tracked mappings into runs of adjacent ones: one scan each."""
        self._tracked_tuple = tuple(self.tracked)
        self._span = (self.tracked[0].start, self.tracked[-1].end) if self.tracked else None
        jobs: list[_Job] = []
        for mapping in self.tracked:
            first = mapping in self._fresh
            if jobs and jobs[-1].end == mapping.start and jobs[-1].first == first:
                jobs[-1] = _Job(jobs[-1].start, mapping.end, first)
            else:
                jobs.append(_Job(mapping.start, mapping.end, first))
        self._jobs = jobs

    def _target_gone(self) -> bool:
        if self._pidfd < 0:
            return False
        ready, _, _ = select.select([self._pidfd], [], [], 0)
        return bool(ready)

    # --- disable ----------------------------------------------------------------------------------

    def _disable(self) -> None:
        self._release()

    def _release(self) -> None:
        """Close the userfaultfd — the kernel then unregisters every range and lifts every protection — and
        everything else the tracker holds."""
        if self._uffd is not None:
            self._uffd.close()
            self._uffd = None
        for index, handed_out in enumerate(self._handed_out):  # results outlive the buffers they view
            held = handed_out() if handed_out is not None else None
            if held is not None:
                held.detach()
            self._handed_out[index] = None
        for pagemap in self._pagemaps:
            pagemap.close()
        self._pagemaps, self._pagemap = [], None
        if self._maps is not None:
            self._maps.close()
            self._maps = None
        for attribute in ("_statm", "_pidfd"):
            fd = getattr(self, attribute)
            if fd >= 0:
                os.close(fd)
                setattr(self, attribute, -1)

    def __del__(self) -> None:
        if hasattr(self, "_statm"):  # not when __init__ refused its arguments
            self._release()
