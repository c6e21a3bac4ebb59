"""Transports: addresses, and bytes through real TCP and Unix sockets and files."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from dirtylog.migration.errors import MigrationError
from dirtylog.migration.transports import Endpoint, connect, listen, parse_endpoint
from dirtylog.migration.transports.files import FileReader, FileWriter


@pytest.mark.parametrize(("text", "parsed"), [
    ("10.0.0.2:7000", Endpoint("tcp", host="10.0.0.2", port=7000)),
    ("tcp:10.0.0.2:7000", Endpoint("tcp", host="10.0.0.2", port=7000)),
    (":7000", Endpoint("tcp", host="127.0.0.1", port=7000)),
    ("7000", Endpoint("tcp", host="127.0.0.1", port=7000)),
    ("[::1]:7000", Endpoint("tcp", host="::1", port=7000)),
    ("unix:/run/vm.sock", Endpoint("unix", path="/run/vm.sock")),
    ("file:/tmp/vm.stream", Endpoint("file", path="/tmp/vm.stream")),
])
def test_addresses(text: str, parsed: Endpoint) -> None:
    assert parse_endpoint(text) == parsed
    assert parse_endpoint(str(parsed)) == parsed  # what we print, we read back


@pytest.mark.parametrize(("text", "message"), [
    ("host", "no port number"),
    ("h:70000", "out of range"),
    ("unix:", "names no path"),
    ("file:", "names no path"),
])
def test_bad_addresses(text: str, message: str) -> None:
    with pytest.raises(MigrationError, match=message):
        parse_endpoint(text)


def echo_through(address: str) -> bytes:
    """Send three buffers from a connected channel to an accepted one; what arrived."""
    listener = listen(parse_endpoint(address))
    received = bytearray()

    def serve() -> None:
        channel = listener.accept(5)
        view = memoryview(bytearray(4096))
        while count := channel.recv_into(view):
            received.extend(view[:count])
        channel.close()

    thread = threading.Thread(target=serve)
    thread.start()
    client = connect(parse_endpoint(listener.address), 5)
    client.send([b"one ", memoryview(b"two "), bytes(range(256)) * 100])
    client.shutdown_write()
    thread.join(5)
    client.close()
    listener.close()
    return bytes(received)


def test_tcp_carries_the_bytes_in_order() -> None:
    assert echo_through("127.0.0.1:0") == b"one two " + bytes(range(256)) * 100


def test_a_unix_socket_carries_the_bytes_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / "migration.sock"
    listener = listen(parse_endpoint(f"unix:{path}"))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # created for its owner only
    listener.close()
    assert not path.exists()  # the listener removes its socket
    assert echo_through(f"unix:{path}") == b"one two " + bytes(range(256)) * 100


def test_a_unix_listener_refuses_to_replace_a_file(tmp_path: Path) -> None:
    path = tmp_path / "precious"
    path.write_text("data")
    with pytest.raises(MigrationError, match="exists and is not a socket"):
        listen(parse_endpoint(f"unix:{path}"))
    assert path.read_text() == "data"


def test_nobody_listening_is_said_with_the_command_to_run(tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match=r"nobody listens at unix:.*start `dirtylog receive --listen unix:"):
        connect(parse_endpoint(f"unix:{tmp_path / 'none.sock'}"), 1)


def test_a_file_stream_is_named_only_when_committed(tmp_path: Path) -> None:
    path = tmp_path / "vm.stream"
    writer = FileWriter(str(path))
    writer.send([b"frames"])
    assert not path.exists() and (tmp_path / "vm.stream.partial").exists()
    writer.close()  # not committed: a failed migration leaves nothing that looks whole
    assert not path.exists() and not (tmp_path / "vm.stream.partial").exists()
    writer = FileWriter(str(path))
    writer.send([b"frames ", b"and more"])
    writer.commit()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # it holds guest memory
    reader = FileReader(str(path))
    assert reader.replay_nonce == writer.replay_nonce and len(reader.replay_nonce or b"") == 32
    view = memoryview(bytearray(100))
    count = reader.recv_into(view)
    assert bytes(view[:count]) == b"frames and more" and reader.recv_into(view) == 0
    reader.close()


def test_a_file_that_is_not_a_stream_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(MigrationError, match="is not a dirtylog migration stream"):
        listen(parse_endpoint(f"file:{tmp_path / 'notes.txt'}")).accept(1)
    with pytest.raises(MigrationError, match="no migration stream file"):
        listen(parse_endpoint(f"file:{tmp_path / 'missing'}"))
