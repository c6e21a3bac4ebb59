"""Sockets as channels: TCP (``host:port``) and Unix (``unix:PATH``), connecting and listening.

Only bytes move here. Listeners bind to loopback unless an address is given explicitly (a migration
stream carries a whole VM), and a Unix socket is created mode 0600, reachable by its owner only.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import stat
from collections.abc import Sequence

from dirtylog.migration.errors import MigrationError
from dirtylog.migration.transports.base import Endpoint

SOCKET_BUFFER = 4 << 20
IOV_MAX = 1024  # Linux


class SocketChannel:
    """A connected stream socket."""

    live = True
    replay_nonce: bytes | None = None

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.local = sock.family == socket.AF_UNIX or _loopback(sock.getpeername()[0])
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER)

    def send(self, buffers: Sequence[bytes | memoryview]) -> None:
        """Write all of ``buffers`` with ``sendmsg`` (scatter-gather, no joining copy)."""
        views = [memoryview(b).cast("B") for b in buffers if len(b)]
        while views:
            sent = self.sock.sendmsg(views[:IOV_MAX // 2])
            while sent:
                if sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][sent:]
                    sent = 0

    def recv_into(self, view: memoryview) -> int:
        return self.sock.recv_into(view)

    def fileno(self) -> int:
        """The socket's descriptor, to wait on it with others (post-copy's fault handler)."""
        return self.sock.fileno()

    def settimeout(self, seconds: float | None) -> None:
        self.sock.settimeout(seconds)

    def shutdown_write(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def connect_socket(endpoint: Endpoint, timeout: float) -> SocketChannel:
    """A connected channel to a TCP or Unix endpoint; a clear error when nobody listens."""
    where = str(endpoint)
    try:
        if endpoint.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            try:
                sock.connect(endpoint.path)
            except BaseException:
                sock.close()
                raise
        else:
            sock = socket.create_connection((endpoint.host, endpoint.port), timeout=timeout)
    except (ConnectionRefusedError, FileNotFoundError):
        raise MigrationError(f"nobody listens at {where}: start `dirtylog receive --listen {where}` on the "
                             "destination first") from None
    except TimeoutError:
        raise MigrationError(f"connecting to {where} timed out after {timeout:.0f} s") from None
    except OSError as error:
        raise MigrationError(f"cannot connect to {where}: {error.strerror or error}") from None
    return SocketChannel(sock, where)


class SocketListener:
    """A listening TCP or Unix socket."""

    def __init__(self, endpoint: Endpoint, backlog: int = 16) -> None:
        self.endpoint = endpoint
        self._unlink = ""
        if endpoint.scheme == "unix":
            self.sock = self._bind_unix(endpoint.path)
            self.address = str(endpoint)
        else:
            family = socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                self.sock.bind((endpoint.host, endpoint.port))
            except OSError as error:
                self.sock.close()
                raise MigrationError(f"cannot listen on {endpoint}: {error.strerror}") from None
            self.address = str(Endpoint("tcp", host=endpoint.host, port=self.sock.getsockname()[1]))
        #: The TCP port listened on (0 for a Unix socket).
        self.port = int(self.sock.getsockname()[1]) if endpoint.scheme == "tcp" else 0
        self.sock.listen(backlog)

    def _bind_unix(self, path: str) -> socket.socket:
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise MigrationError(f"{path} exists and is not a socket; choose another path for unix:")
            os.unlink(path)  # a socket left by an earlier listener
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # created 0600: the socket is the key to a whole VM's memory
        try:
            sock.bind(path)
        except OSError as error:
            sock.close()
            raise MigrationError(f"cannot listen on unix:{path}: {error.strerror}") from None
        finally:
            os.umask(old)
        self._unlink = path
        return sock

    def accept(self, timeout: float | None) -> SocketChannel:
        self.sock.settimeout(timeout)
        sock, address = self.sock.accept()
        peer = f"{address[0]}:{address[1]}" if isinstance(address, tuple) else f"unix:{self.endpoint.path}"
        return SocketChannel(sock, peer)

    def close(self) -> None:
        self.sock.close()
        if self._unlink:
            with contextlib.suppress(OSError):
                os.unlink(self._unlink)
            self._unlink = ""
