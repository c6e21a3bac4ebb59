"""Real-socket helpers for migration engine tests: a receiving thread and a fault-injecting proxy."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dirtylog.migration import Listener, Received
from dirtylog.migration.engine.destination import DestinationMigration
from dirtylog.migration.keys import load_key


@dataclass
class Receiver:
    """``receive()`` running in a thread, with what it returned or raised."""

    listener: Listener
    thread: threading.Thread | None = None
    result: Received | None = None
    error: BaseException | None = None
    memory_at_resume: Any = None
    migration: DestinationMigration | None = None  # the engine, while it runs

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.listener.port}"

    def join(self, timeout: float = 60) -> None:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "receive() did not finish"


def start_receiver(key_file: str, *, listen: str = "127.0.0.1:0", before_resume: Callable[[Any], None] | None = None,
                   memory: int | None = None, max_memory: int | None = None, **kwargs: Any) -> Receiver:
    """A destination listening (by default on a free loopback port), receiving in a background thread; it keeps
    a copy of the memory as migrated, then calls ``before_resume``."""
    receiver = Receiver(Listener(listen, memory=memory, max_memory=max_memory))

    def keep_memory(machine: Any) -> None:
        receiver.memory_at_resume = machine.memory.copy()
        if before_resume is not None:
            before_resume(machine)

    def run() -> None:
        # receive(), with the engine kept where the test can look at it while it runs
        options: dict[str, Any] = {"io_timeout": 10.0, "accept_timeout": None, "handshake_timeout": 5.0,
                                   "progress": None, **kwargs}
        try:
            receiver.migration = DestinationMigration(receiver.listener, load_key(key_file), before_resume=keep_memory,
                                                      **options)
            receiver.result = receiver.migration.run()
        except BaseException as error:  # reported to the test, which asserts on it
            receiver.error = error
        finally:
            receiver.listener.close()

    receiver.thread = threading.Thread(target=run, daemon=True)
    receiver.thread.start()
    return receiver


Mutator = Callable[[str, int, bytes], bytes | None]


@dataclass
class Proxy:
    """A TCP relay between source and destination that can corrupt, duplicate or cut the byte stream.

    ``mutate(direction, offset, chunk)`` sees each chunk ("up": source to destination, "down": back)
    with its offset in that direction's stream, and returns the bytes to forward, or None to cut the
    connection there.
    """

    upstream: str
    mutate: Mutator
    sock: socket.socket = field(default_factory=lambda: socket.create_server(("127.0.0.1", 0)))
    cut: threading.Event = field(default_factory=threading.Event)
    connections: int = 0  # connections relayed so far
    _pumps: dict[threading.Thread, int] = field(default_factory=dict)

    def connection_of(self, pump: threading.Thread) -> int:
        """Which connection (0 for the first the relay accepted) a pump thread carries."""
        return self._pumps.get(pump, -1)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def start(self) -> Proxy:
        threading.Thread(target=self._serve, daemon=True).start()
        return self

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            host, port = self.upstream.rsplit(":", 1)
            server = socket.create_connection((host, int(port)))
            done = threading.Barrier(2, action=lambda c=client, s=server: (c.close(), s.close()))
            for direction, source, target in (("up", client, server), ("down", server, client)):
                pump = threading.Thread(target=self._pump, args=(direction, source, target, done), daemon=True)
                self._pumps[pump] = self.connections
                pump.start()
            self.connections += 1

    def _pump(self, direction: str, source: socket.socket, target: socket.socket, done: threading.Barrier) -> None:
        # Like a real relay: an end that closes cleanly is passed on as a half-close, so what the other
        # direction still carries (an Abort, say) gets through; a cut or an error drops the whole connection.
        offset = 0
        cut = False
        try:
            while chunk := source.recv(65536):
                out = self.mutate(direction, offset, chunk)
                offset += len(chunk)
                if out is None:
                    self.cut.set()
                    cut = True
                    break
                target.sendall(out)
        except OSError:
            cut = True
        if cut:
            for end in (source, target):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)
        else:
            with contextlib.suppress(OSError):
                target.shutdown(socket.SHUT_WR)
        done.wait()

    def close(self) -> None:
        self.sock.close()
