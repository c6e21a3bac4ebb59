"""Helpers of the post-copy tests: reading a destination's guest memory while pages are still missing there, and
a relay that cuts one connection once post-copy has begun."""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from dirtylog.machine import Machine
from dirtylog.units import PAGE_SIZE
from tests.migration.engine.peers import Proxy


def fill(machine: Machine) -> None:
    """Every workload page non-zero (random bytes), so that each one the source pushes costs a page on the link."""
    area = machine.memory[machine.workload_pages.start * PAGE_SIZE:]
    area[:] = np.random.default_rng(3).integers(1, 256, area.size, dtype=np.uint8)


def read_stamps(machine: Machine, pages: npt.NDArray[np.int64]) -> npt.NDArray[np.uint64]:
    """The first 8 bytes of each of ``pages``, read the way a guest would fault on them: with ``memmove``, which
    releases the GIL, so the destination's fault handler (Python) can serve a page that is not there yet. A NumPy
    read would wait for the page while holding the GIL the handler needs."""
    out = np.zeros(len(pages), dtype=np.uint64)
    base = machine.ram.address
    for i, page in enumerate(pages.tolist()):
        ctypes.memmove(out.ctypes.data + 8 * i, base + page * PAGE_SIZE, 8)
    return out


@dataclass
class PostcopyCut:
    """A relay fault that strikes once, ``after`` bytes after the source's ``trigger`` progress record (post-copy
    has begun) on connection ``connection`` (0: the first connection the relay carries, the stream; 1: the post-copy
    channel) in ``direction``: ``cut`` the connection, or ``flip`` a bit (a frame then fails its MAC)."""

    direction: str
    after: int
    connection: int = 0
    how: str = "cut"
    trigger: str = "postcopy"  # the source's progress record that opens the window: post-copy has begun
    started: threading.Event = field(default_factory=threading.Event)  # set when post-copy begins
    struck: threading.Event = field(default_factory=threading.Event)
    _seen: dict[tuple[int, str], int] = field(default_factory=dict)

    def mutate(self, proxy: Proxy, way: str, at: int, chunk: bytes) -> bytes | None:
        if self.struck.is_set() or not self.started.is_set() or way != self.direction:
            return chunk
        if proxy.connection_of(threading.current_thread()) != self.connection:
            return chunk
        key = (self.connection, way)
        seen = self._seen.setdefault(key, at)  # the offset when post-copy began on this connection
        if at + len(chunk) - seen < self.after:
            return chunk
        self.struck.set()
        if self.how == "cut":
            return None
        data = bytearray(chunk)
        data[len(data) // 2] ^= 0x10
        return bytes(data)
