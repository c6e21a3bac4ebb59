"""A recorded dirty-page trace: which pages a program wrote, window by window, and when.

``dirtylog track --record FILE`` writes one; ``Machine(workload="trace", trace=FILE)`` replays it inside a
guest at the recorded pace, so a migration or a snapshot can be tried on the memory behaviour of a real
program. The file is a NumPy ``.npz`` archive:

* ``times`` (float64): the end of each window, in seconds since recording began;
* ``offsets`` (int64, one more than the windows): window ``w`` wrote ``pages[offsets[w]:offsets[w + 1]]``;
* ``pages`` (uint32): compact page numbers, indices into ``addresses``;
* ``addresses`` (uint64, ascending): the virtual address of each page the program ever wrote;
* ``format``, ``source`` and ``interval``: what the file is, what was recorded, the window length.

Compact numbers keep a trace of a 128 TiB address space small and give a replay a dense page range.
For a guest of ``v`` vCPUs, page ``p`` goes to vCPU ``p % v`` as page ``p // v`` of its share, so every
page keeps exactly one writer (the workloads' rule); :meth:`DirtyTrace.guest_table` lays a vCPU's part out
for the guest program (``dirtylog.guest.programs``, ``trace``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from dirtylog.errors import DirtylogError

FORMAT = "dirtylog-trace/1"


class TraceError(DirtylogError):
    """A trace file that cannot be read, or a trace that does not fit where it should be replayed."""


@dataclass(frozen=True)
class DirtyTrace:
    """Dirty page sets per window; see the module docstring for the fields."""

    times: npt.NDArray[np.float64]
    offsets: npt.NDArray[np.int64]
    pages: npt.NDArray[np.uint32]
    addresses: npt.NDArray[np.uint64]
    source: str = ""
    interval: float = 0.0

    @classmethod
    def from_windows(cls, times: Sequence[float], windows: Sequence[npt.NDArray[np.uint64]], *, source: str = "",
                     interval: float = 0.0) -> DirtyTrace:
        """A trace from the written page addresses of each window (one array per window)."""
        if len(times) != len(windows):
            raise TraceError(f"{len(times)} window times for {len(windows)} windows")
        everything = np.concatenate(list(windows)) if windows else np.zeros(0, dtype=np.uint64)
        addresses = np.unique(everything.astype(np.uint64))
        if addresses.size >= 2**32:
            raise TraceError(f"{addresses.size} distinct pages is more than a trace numbers (2^32)")
        pages = np.searchsorted(addresses, everything).astype(np.uint32)
        sizes = np.array([window.size for window in windows], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        return cls(np.asarray(times, dtype=np.float64), offsets, pages, addresses, source, interval)

    # --- files ------------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the trace as a compressed ``.npz`` archive."""
        try:
            with open(path, "wb") as out:
                np.savez_compressed(out, format=np.array(FORMAT), source=np.array(self.source),
                                    interval=np.array(self.interval), times=self.times, offsets=self.offsets,
                                    pages=self.pages, addresses=self.addresses)
        except OSError as error:
            raise TraceError(f"cannot write trace {os.fspath(path)!r}: {error.strerror}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DirtyTrace:
        """Read a trace written by :meth:`save`, checking that its parts agree."""
        name = os.fspath(path)
        if not Path(name).is_file():
            raise TraceError(f"no trace file {name!r}; record one with `dirtylog track --pid PID --record {name}`")
        try:
            with np.load(name, allow_pickle=False) as data:
                if str(data["format"]) != FORMAT:
                    raise TraceError(f"{name!r} is a {str(data['format'])!r} file, not a {FORMAT} trace")
                trace = cls(data["times"].astype(np.float64), data["offsets"].astype(np.int64),
                            data["pages"].astype(np.uint32), data["addresses"].astype(np.uint64),
                            str(data["source"]), float(data["interval"]))
        except (OSError, ValueError, KeyError) as error:
            raise TraceError(f"{name!r} is not a dirtylog trace ({error})") from None
        trace.check()
        return trace

    def check(self) -> None:
        """Raise :class:`TraceError` unless the arrays describe one consistent trace."""
        windows = self.times.size
        if self.offsets.size != windows + 1 or (windows and (self.offsets[0] != 0 or
                                                             self.offsets[-1] != self.pages.size)):
            raise TraceError(f"trace offsets ({self.offsets.size}) do not match its {windows} windows and "
                             f"{self.pages.size} page writes")
        if windows and (np.any(np.diff(self.offsets) < 0) or np.any(np.diff(self.times) < 0)):
            raise TraceError("trace windows go backwards in time or in offsets")
        if self.pages.size and int(self.pages.max()) >= self.addresses.size:
            raise TraceError(f"trace page number {int(self.pages.max())} is beyond its {self.addresses.size} pages")

    # --- what it holds ----------------------------------------------------------------------------

    @property
    def nwindows(self) -> int:
        return int(self.times.size)

    @property
    def npages(self) -> int:
        """Distinct pages written over the whole trace."""
        return int(self.addresses.size)

    @property
    def duration(self) -> float:
        return float(self.times[-1]) if self.times.size else 0.0

    def window(self, index: int) -> npt.NDArray[np.uint32]:
        """The compact page numbers written in window ``index``."""
        return self.pages[self.offsets[index]:self.offsets[index + 1]]

    # --- replay in a guest ------------------------------------------------------------------------

    def pages_needed(self, vcpus: int) -> int:
        """Pages each vCPU's share must have to replay this trace on ``vcpus`` vCPUs."""
        return -(-self.npages // vcpus)

    def guest_table(self, vcpu: int, vcpus: int) -> npt.NDArray[np.uint8]:
        """vCPU ``vcpu``'s part of the trace, laid out for the guest program.

        Little-endian: u64 window count ``n``; ``n`` pairs of u64 (window end in microseconds since the
        replay began, pages in the window); then the u32 page numbers, in the vCPU's share, of every window
        in turn. A vCPU gets page ``p`` when ``p % vcpus == vcpu`` (as page ``p // vcpus``).
        """
        mine = self.pages % np.uint32(vcpus) == vcpu
        window_of = np.repeat(np.arange(self.nwindows), np.diff(self.offsets))
        counts = np.bincount(window_of[mine], minlength=self.nwindows).astype(np.uint64)
        header = np.zeros(1 + 2 * self.nwindows, dtype="<u8")
        header[0] = self.nwindows
        header[1::2] = np.round(self.times * 1e6).astype(np.uint64)
        header[2::2] = counts
        local = (self.pages[mine] // np.uint32(vcpus)).astype("<u4")
        table: npt.NDArray[np.uint8] = np.concatenate([header.view(np.uint8), local.view(np.uint8)])
        return table

    def describe(self) -> str:
        return (f"{self.nwindows} windows over {self.duration:.2f} s, {self.pages.size} page writes to "
                f"{self.npages} distinct pages" + (f", recorded from {self.source}" if self.source else ""))
