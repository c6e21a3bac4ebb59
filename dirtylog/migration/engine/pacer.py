"""The bandwidth cap of a migration: a token bucket its streams' writes wait on."""

from __future__ import annotations

import threading
import time


class Pacer:
    """Holds writers to ``rate`` bytes per second in all (None: no limit); safe from several threads."""

    def __init__(self, rate: float | None, burst_seconds: float = 0.05) -> None:
        self.rate = rate
        self.burst = (rate or 0) * burst_seconds
        self._tokens = self.burst
        self._last = time.monotonic()
        self._lock = threading.Lock()  # held by a writer while it sleeps: writers go one at a time
        self._debt = 0  # bytes charged without waiting, paid by the next writer
        self._debt_lock = threading.Lock()  # never held while sleeping

    def charge(self, nbytes: int) -> None:
        """``nbytes`` went out without waiting (post-copy's answers to page requests): the next writers wait
        for them instead. Never blocks (not even on a writer sleeping in :meth:`wait`)."""
        if self.rate is None:
            return
        with self._debt_lock:
            self._debt += nbytes

    def wait(self, nbytes: int) -> None:
        """Sleep until ``nbytes`` may go out."""
        if self.rate is None:
            return
        with self._lock:
            with self._debt_lock:
                debt, self._debt = self._debt, 0
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now
            self._tokens -= nbytes + debt
            if self._tokens < 0:
                time.sleep(-self._tokens / self.rate)
