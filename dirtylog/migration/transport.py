"""Thin TCP for the migration stream: addresses, connecting, listening, and moving buffers.

Everything protocol-shaped lives in ``connection.py``; this module only moves bytes. Listeners bind
to loopback unless an address is given explicitly (a migration stream carries a whole VM).
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence

from dirtylog.migration.precopy import MigrationError

SOCKET_BUFFER = 4 << 20
DEFAULT_HOST = "127.0.0.1"


def parse_address(text: str, *, default_host: str = DEFAULT_HOST) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port``/``port`` (host defaults to loopback)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or default_host
    try:
        number = int(port)
    except ValueError:
        raise MigrationError(f"address {text!r} has no port number; write host:port, e.g. 127.0.0.1:7000") from None
    if not 0 <= number <= 65535:
        raise MigrationError(f"port {number} in {text!r} is out of range 0..65535")
    return host, number


def _tune(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)


def connect(address: tuple[str, int], timeout: float) -> socket.socket:
    """A connected, tuned socket; a clear error when nobody listens."""
    try:
        sock = socket.create_connection(address, timeout=timeout)
    except ConnectionRefusedError:
        raise MigrationError(f"nobody listens at {address[0]}:{address[1]}: start `dirtylog receive --listen "
                             f"{address[0]}:{address[1]}` on the destination first") from None
    except TimeoutError:
        raise MigrationError(f"connecting to {address[0]}:{address[1]} timed out after {timeout:.0f} s") from None
    except OSError as error:
        raise MigrationError(f"cannot connect to {address[0]}:{address[1]}: {error.strerror}") from None
    _tune(sock)
    return sock


def listen(address: tuple[str, int], backlog: int = 16) -> socket.socket:
    """A listening socket on ``address``."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise MigrationError(f"cannot listen on {address[0]}:{address[1]}: {error.strerror}") from None
    sock.listen(backlog)
    return sock


def send_buffers(sock: socket.socket, buffers: Sequence[bytes | memoryview]) -> int:
    """Write all of ``buffers`` with ``sendmsg`` (scatter-gather, no joining copy); returns bytes sent."""
    views = [memoryview(b).cast("B") for b in buffers if len(b)]
    total = sum(len(v) for v in views)
    while views:
        sent = sock.sendmsg(views[:512])  # IOV_MAX is 1024 on Linux
        while sent:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0
    return total


class Pacer:
    """A token bucket that holds a sender to ``rate`` bytes per second (None: no limit)."""

    def __init__(self, rate: float | None, burst_seconds: float = 0.05) -> None:
        self.rate = rate
        self.burst = (rate or 0) * burst_seconds
        self._tokens = self.burst
        self._last = time.monotonic()

    def wait(self, nbytes: int) -> None:
        """Sleep until ``nbytes`` may go out."""
        if self.rate is None:
            return
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= nbytes
        if self._tokens < 0:
            time.sleep(-self._tokens / self.rate)
