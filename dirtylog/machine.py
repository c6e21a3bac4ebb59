"""The scripting API: a guest :class:`~dirtylog.guest.machine.Machine` that can also log its dirty pages.

The guest layer knows nothing of trackers (they sit above it); this facade adds ``dirty_log()`` so that
users get one object: ``with Machine(...) as m: t = m.dirty_log("clear")``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Self

from dirtylog.errors import DirtylogError
from dirtylog.guest import machine as guest
from dirtylog.tracking.base import DIRTY_LOG_MODES, TRACKING_MODES, DirtyLogMode, Tracker, TrackingMode
from dirtylog.tracking.kvm_log import DEFAULT_CLEAR_CHUNK_PAGES
from dirtylog.tracking.modes import open_tracker

if TYPE_CHECKING:
    from dirtylog.rate import DirtyRate
    from dirtylog.rate.limit import DirtyLimitController
    from dirtylog.snapshot.restore import RestoreStats, Restoring
    from dirtylog.snapshot.session import Snapshot, SnapshotChain

__all__ = ["DIRTY_LOG_MODES", "TRACKING_MODES", "DirtyLogMode", "Machine", "TrackingMode"]


class Machine(guest.Machine):
    """A KVM virtual machine running a guest workload, with dirty page logging.

    See :class:`dirtylog.guest.machine.Machine` for the arguments and the lifecycle.
    """

    _snapshots: SnapshotChain | None = None  # the dirty log and fingerprints kept between snapshots
    _restoring: Restoring | None = None  # memory still arriving from a snapshot

    def dirty_log(self, mode: DirtyLogMode = "log", *, slots: list[int] | None = None, initially_set: bool = False,
                  clear_chunk_pages: int = DEFAULT_CLEAR_CHUNK_PAGES,
                  ring_entries: int | None = None) -> Tracker:
        """A dirty-page tracker for this machine (not yet enabled).

        ``log``: KVM_GET_DIRTY_LOG; ``clear``: KVM_GET_DIRTY_LOG + KVM_CLEAR_DIRTY_LOG (``initially_set``,
        ``clear_chunk_pages``); ``ring``: per-vCPU dirty rings of ``ring_entries`` (default: the largest the
        host allows, up to 65536) — choose it before
        :meth:`start`, since KVM only allows rings before vCPUs exist. ``slots`` limits logging to those
        memory slots (default: all). ``uffd``: userfaultfd write-protect of the host memory behind guest RAM
        (Linux 6.7): it also sees writes the host makes, which KVM's log never does; it touches no slot, so
        it may run beside a KVM mode.
        """
        return open_tracker(self, mode, slots=slots, initially_set=initially_set,
                            clear_chunk_pages=clear_chunk_pages, ring_entries=ring_entries)

    # --- dirty rate and dirty limit (dirtylog.rate; imported on first use) --------------------------------

    def dirty_rate(self, window: str | float = "1s", method: str = "sampling", sample_pages: int = 512,
                   **options: Any) -> DirtyRate:
        """The dirty rate over one window of 10 ms to 60 s: distinct pages dirtied / window length.

        ``method``: ``sampling`` (hash ``sample_pages`` per GiB at both ends; no cost to the guest; a
        confidence interval), ``bitmap`` (the dirty log), ``ring`` (per-vCPU rings: per-vCPU rates; needs
        ``dirty_ring=True``) or ``auto`` (the cheapest meeting ``accuracy=``, default 0.05). Options:
        ``confidence``, ``accuracy``, ``bitmap_mode`` ("log" or "clear"), ``seed``. See docs/dirty-rate.md.
        """
        from dirtylog import rate

        return rate.measure(self, window, method, sample_pages=sample_pages, **options)

    def dirty_rates(self, window: str | float = "1s", method: str = "sampling", sample_pages: int = 512,
                    count: int | None = None, **options: Any) -> Iterator[DirtyRate]:
        """Consecutive windows of :meth:`dirty_rate` (``count`` of them, or as long as you iterate)."""
        from dirtylog import rate

        return rate.windows(self, window, method, sample_pages=sample_pages, count=count, **options)

    def dirty_limit(self, pages_per_s: float | None, vcpu: int | None = None) -> DirtyLimitController:
        """Cap ``vcpu`` (every vCPU when None) at ``pages_per_s`` dirtied pages per second, as QEMU's
        ``set-vcpu-dirty-limit``; None lifts the cap (``cancel-vcpu-dirty-limit``). Needs the dirty ring
        (``Machine(..., dirty_ring=True)``). Returns the controller: ``.query()`` gives each vCPU's limit
        and measured rate."""
        from dirtylog.rate import ring_tracker
        from dirtylog.rate.limit import DirtyLimitController

        controller: DirtyLimitController | None = getattr(self, "_limit_controller", None)
        if controller is None:
            if pages_per_s is None:
                from dirtylog.rate.limit import DirtyLimiter

                DirtyLimiter(self.spec.vcpus).set_limit(None, vcpu)  # checks the vCPU number
                raise guest.MachineError("no dirty limit is set on this machine")
            controller = DirtyLimitController(self, ring_tracker(self))
            self._limit_controller = controller
        controller.set_limit(pages_per_s, vcpu)
        if not controller.limiter.active:
            controller.stop()
            controller.tracker.disable()  # no write protection (and no cost to the guest) left behind
        return controller

    # --- snapshots (dirtylog.snapshot; imported on first use) --------------------------------------------

    def snapshot(self, path: str | os.PathLike[str], parent: Snapshot | str | os.PathLike[str] | None = None, *,
                 live: bool = False, mode: DirtyLogMode | None = None) -> Snapshot:
        """Save the machine to ``path``: all of it (``parent`` None), or the pages written since ``parent``, the
        last snapshot of this machine (an incremental layer). ``live`` keeps the guest running while memory is
        written (paused only to arm write protection); otherwise it is paused until its pages are written.
        ``mode`` is the dirty log the chain keeps between snapshots (``log``, ``clear``, ``ring``, ``uffd``;
        default ``log``), chosen by a full snapshot. A failed snapshot leaves no file and loses no page: the
        next one on the same parent holds them. See docs/snapshots.md."""
        from dirtylog.snapshot.errors import SnapshotChainError, SnapshotError
        from dirtylog.snapshot.session import SnapshotChain

        self.wait_restored()
        chain = self._snapshots
        if parent is None:
            if chain is not None and mode is not None and mode != chain.mode:
                chain.close()
                chain = self._snapshots = None
            if chain is None:
                chain = self._snapshots = SnapshotChain(self, mode or "log")
        elif chain is None:
            raise SnapshotChainError("this machine keeps no dirty log since a snapshot: take a full snapshot first "
                                     "(or restore with track='log' to take layers on the restored one)")
        elif mode is not None and mode != chain.mode:
            raise SnapshotError(f"this chain's dirty log is {chain.mode!r}; a layer cannot change it (a full "
                                "snapshot can)")
        if chain.fingerprints is None and self._restoring is not None:
            chain.fingerprints = self._restoring.fingerprints
        return chain.take(path, parent, live)

    @classmethod
    def restore(cls, path: str | os.PathLike[str], *, lazy: bool = True, track: DirtyLogMode | None = None,
                resume: bool = True, into: Self | None = None) -> Self:
        """A running machine restored from the snapshot ``path`` (and its parents), continuing where it was saved.

        Memory arrives on first touch and in the background (``lazy``; ``wait_restored()`` waits for all of it),
        every page checked before the guest sees it; ``lazy=False`` brings and checks it all before the guest
        runs. ``track`` keeps a dirty log from the start, so that ``snapshot(p, parent=path)`` continues the chain.
        ``resume=False`` returns it with its vCPUs loaded but not running (``start()`` runs it), as Firecracker's
        snapshot load without ``resume_vm``. ``into`` is a blank machine of the snapshot's memory size and slot
        count built beforehand (``Machine(size, blank=True)``), which spares the restore building one.
        """
        from dirtylog.snapshot.restore import restore

        machine, restoring, snapshots = restore(cls, path, lazy=lazy, track=track, resume=resume, into=into)
        machine._restoring, machine._snapshots = restoring, snapshots
        return machine

    def wait_restored(self, timeout: float | None = None) -> RestoreStats | None:
        """Wait until a restored machine's memory is all in and checked; its statistics (None: not restored)."""
        return self._restoring.wait(timeout) if self._restoring is not None else None

    @property
    def restore_stats(self) -> RestoreStats | None:
        """How the restore of this machine is going, without waiting (``resident_seconds`` is set once all of
        memory is in); None for a machine that was not restored."""
        return self._restoring.result() if self._restoring is not None else None

    def end_snapshots(self) -> None:
        """Stop the dirty log kept for incremental snapshots (the next snapshot is a full one)."""
        if self._snapshots is not None:
            self._snapshots.close()
            self._snapshots = None

    def check(self) -> None:
        if self._restoring is not None and self._restoring.error is not None:
            raise self._restoring.error
        super().check()

    def start(self, vcpu_states: list[bytes] | None = None, *, paused: bool = False) -> None:
        if self._restoring is not None and self._restoring.error is not None:
            raise self._restoring.error
        super().start(vcpu_states, paused=paused)

    def resume(self) -> None:
        if self._restoring is not None and self._restoring.error is not None:
            raise self._restoring.error
        super().resume()

    def stop(self) -> None:
        controller = getattr(self, "_limit_controller", None)
        if controller is not None:
            controller.stop()
        if self._restoring is not None:
            self._restoring.close()
        if self._snapshots is not None:
            # The chain's dirty log: KVM's goes with the VM, but the uffd mode holds a file descriptor.
            with contextlib.suppress(DirtylogError):
                self._snapshots.close()
            self._snapshots = None
        super().stop()
