"""Latency first: how post-copy's fault path gets the interpreter ahead of the bulk work in the same process.

A vCPU waiting for a page waits for Python code on both ends (the destination's fault handler, the source's
answer), and Python code runs only while its thread holds the GIL. A thread woken by a socket or a userfaultfd
must take the GIL back from whichever thread runs Python meanwhile (the push, the installation of pushed pages),
which lets go only at its next blocking call or when the interpreter's switch interval (5 ms by default) says so:
a fault answered in 50 us of work could wait milliseconds for the GIL. Two measures, for the post-copy phase only:

* :func:`short_switch_interval` lowers the interval, so a woken thread waits at most that long for the GIL;
* :class:`Urgency`: the latency-critical threads say when they work (:meth:`Urgency.urgent`), and the bulk threads
  step aside at each frame (:meth:`Urgency.yield_to_urgent`), blocking, which hands the GIL over at once.

The GIL is not the only queue: a woken thread also waits for a core, and on a host whose cores run busy vCPUs (the
guest that faults is running) that wait is most of a fault's latency. :func:`raise_thread_priority` gives the two
latency-critical threads (the destination's fault handler, the source's answers) a lower nice value, so the
scheduler runs them before the vCPUs they serve when they wake (docs/performance.md, post-copy: median fault
latency ~25 % lower beside a guest writing at full speed on 2 cores).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator

SWITCH_INTERVAL = 1e-4  # seconds: how long a woken thread may wait for the GIL in post-copy
URGENT_NICE = -10  # the latency-critical threads' nice value (the vCPUs and bulk threads keep theirs, 0 by default)

_lock = threading.Lock()
_holders = 0
_saved = 0.0


@contextlib.contextmanager
def short_switch_interval(seconds: float = SWITCH_INTERVAL) -> Iterator[None]:
    """The interpreter's switch interval at most ``seconds`` while in the block (nested and concurrent blocks
    share one setting, restored when the last one ends)."""
    global _holders, _saved
    with _lock:
        if _holders == 0:
            _saved = sys.getswitchinterval()
            sys.setswitchinterval(min(_saved, seconds))
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                sys.setswitchinterval(_saved)


def raise_thread_priority(nice: int = URGENT_NICE) -> bool:
    """Give the calling thread (only it: Linux keeps a nice value per thread) the nice value ``nice``; False where
    this process may not (no CAP_SYS_NICE for a negative value), which changes nothing but the latency."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError:
        return False
    return True


class Urgency:
    """How many latency-critical threads work right now; bulk threads wait while any does."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = threading.Condition()

    @contextlib.contextmanager
    def urgent(self) -> Iterator[None]:
        """Mark the block as latency-critical."""
        with self._idle:
            self._count += 1
        try:
            yield
        finally:
            with self._idle:
                self._count -= 1
                if not self._count:
                    self._idle.notify_all()

    def yield_to_urgent(self, limit: float = 0.05) -> None:
        """Wait (at most ``limit`` seconds, so that bulk work is never starved) while urgent work runs."""
        if self._count:  # a racy look, then a proper wait: the usual case costs one attribute read
            with self._idle:
                self._idle.wait_for(lambda: not self._count, limit)
