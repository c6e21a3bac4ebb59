"""A destination on a hostile network, and peers that hold the key but not the rules: stray connections,
a slowloris, two claims to one stream, markup in a reason, statistics that lie. Real sockets on loopback."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dirtylog.kvm.memslot import SlotLayout
from dirtylog.machine import Machine
from dirtylog.migration import MigrationError, migrate
from dirtylog.migration.keys import generate_key_file, load_key
from dirtylog.migration.protocol.auth import frame_keys, frame_mac, root_key
from dirtylog.migration.protocol.codec import FRAME_HEADER, ROUND_END_HEAD, FrameType, encode_json, encode_reject
from dirtylog.migration.protocol.connection import SourceConnection
from dirtylog.migration.protocol.events import NEED_DATA, Abort, AbortCode, Accepted, Header, Ready
from dirtylog.migration.protocol.loopback import join
from tests.helpers import wait_for
from tests.migration.engine.peers import Receiver, start_receiver

pytestmark = pytest.mark.kvm


def recorder() -> tuple[list[dict[str, Any]], Any]:
    events: list[dict[str, Any]] = []

    def progress(kind: str, record: dict[str, Any]) -> None:
        events.append({"kind": kind, **record})

    return events, progress


def address_of(receiver: Receiver) -> tuple[str, int]:
    host, port = receiver.address.rsplit(":", 1)
    return host, int(port)


def test_stray_connections_and_a_slowloris_do_not_keep_the_real_source_out(key_file: str, tmp_path: Path,
                                                                          receivers: list[Receiver]) -> None:
    events, progress = recorder()
    receiver = start_receiver(key_file, progress=progress, handshake_timeout=1.0)
    receivers.append(receiver)
    where = address_of(receiver)
    socket.create_connection(where).close()  # a port scan: connect and go
    probe = socket.create_connection(where)
    probe.sendall(b"GET / HTTP/1.0\r\n\r\n")  # an HTTP probe
    stop = threading.Event()

    def slowloris() -> None:
        with socket.create_connection(where) as sock:
            for byte in b"DIRTYLOG\x02\x00":
                if stop.wait(0.4):
                    return
                try:
                    sock.sendall(bytes([byte]))
                except OSError:
                    return

    threading.Thread(target=slowloris, daemon=True).start()
    wrong = str(generate_key_file(tmp_path / "wrong.key"))
    with Machine("64M", vcpus=1, workload="random", rate=5000) as source:
        source.start()
        with pytest.raises(MigrationError, match="key does not match"):
            migrate(source, receiver.address, key_file=wrong)
        migrate(source, receiver.address, key_file=key_file, downtime_limit="100ms")  # the real one gets in
        receiver.join()
        stop.set()
        # The slowloris, a byte every 0.4 s, was still dribbling: it held nothing up.
        probe.close()
        assert receiver.error is None and receiver.result is not None
        assert np.array_equal(receiver.memory_at_resume, source.memory)
    refused = [e for e in events if e["kind"] == "refused"]
    reasons = " | ".join(e["reason"] for e in refused)
    assert all(e["peer"].startswith("127.0.0.1:") for e in refused)
    assert "not speaking the dirtylog migration stream" in reasons  # the HTTP probe
    assert "key does not match" in reasons  # the wrong key
    assert "closed the connection" in reasons  # the scan


def test_a_slowloris_is_cut_at_the_handshake_deadline(key_file: str, receivers: list[Receiver]) -> None:
    events, progress = recorder()
    receiver = start_receiver(key_file, progress=progress, handshake_timeout=1.0)
    receivers.append(receiver)
    with socket.create_connection(address_of(receiver)) as sock:
        began = time.monotonic()
        for byte in b"DIRTYLOG":  # a byte every 0.3 s: each read succeeds, the whole never arrives in time
            sock.sendall(bytes([byte]))
            if any(e["kind"] == "refused" for e in events):
                break
            time.sleep(0.3)
        wait_for(lambda: any(e["kind"] == "refused" for e in events), what="the slowloris to be refused")
        assert time.monotonic() - began < 2.0
    (refusal,) = [e for e in events if e["kind"] == "refused"]
    assert re.search(r"sent nothing for|took longer than its deadline", refusal["reason"]), refusal
    assert receiver.thread is not None and receiver.thread.is_alive()  # still listening for a real source
    receiver.listener.close()
    receiver.join()


class KeyHolder:
    """A source that holds the key and can say anything: handshake and Header by the book, then frames
    forged with keys derived from its own handshake bytes."""

    def __init__(self, address: tuple[str, int], key: bytes, *, index: int = 0, count: int = 1,
                 migration_id: bytes = b"m" * 16) -> None:
        self.sock = socket.create_connection(address)
        self.key = key
        self.conn = SourceConnection(key, migration_id=migration_id, stream_index=index, stream_count=count)
        hello = join(self.conn.initiate())
        self.sock.sendall(hello)
        challenge = self._read_until(Accepted)
        self.send_key = frame_keys(root_key(key), hello + challenge)[0]

    def _read_until(self, wanted: type) -> bytes:
        seen = b""
        while True:
            event = self.conn.next_event()
            if isinstance(event, wanted):
                return seen
            if isinstance(event, Abort):
                raise AssertionError(f"refused: {event.reason}")
            assert event is NEED_DATA, event
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("the destination hung up")
            seen += chunk
            self.conn.receive_data(chunk)

    def send_header(self, pages: int = 16384) -> None:
        self.sock.sendall(join(self.conn.send(Header(4096, (SlotLayout.of_pages(0, 0, pages),), vcpus=1,
                                                     streams=self.conn.stream_count))))

    def wait_ready(self) -> None:
        self._read_until(Ready)

    def forge_round_end(self, stats: dict[str, Any]) -> None:
        payload = ROUND_END_HEAD.pack(0, 0) + encode_json(stats)
        seq = self.conn.frames_sent
        head = FRAME_HEADER.pack(FrameType.ROUND_END, 0, 0, len(payload), seq)
        self.sock.sendall(head + payload + frame_mac(self.send_key, seq, head + payload))

    def close(self) -> None:
        self.sock.close()


def test_two_claims_to_one_stream_index_are_refused_at_once(key_file: str, receivers: list[Receiver]) -> None:
    events, progress = recorder()
    receiver = start_receiver(key_file, progress=progress)
    receivers.append(receiver)
    first = KeyHolder(address_of(receiver), load_key(key_file), index=0, count=2)
    first.send_header()
    began = time.monotonic()
    second = KeyHolder(address_of(receiver), load_key(key_file), index=0, count=2)
    second.send_header()
    wait_for(lambda: any(e["kind"] == "refused" for e in events), what="the second claim to be refused")
    assert time.monotonic() - began < 2  # at once, not at the I/O timeout
    (refusal,) = [e for e in events if e["kind"] == "refused"]
    assert "stream 0 of this migration is already connected" in refusal["reason"]
    first.close()
    second.close()
    receiver.listener.close()
    receiver.join()


@pytest.mark.parametrize(("stats", "outcome"), [
    ({"pages": "x", "round": "y", "event": "completed"}, "kept apart"),
    ({"nested": {"deep": 1}}, r"round statistic 'nested' is a dict"),
    ({f"k{i}": i for i in range(40)}, r"40 entries, over the 32 allowed"),
])
def test_statistics_from_the_source_are_checked_and_kept_apart(stats: dict[str, Any], outcome: str,
                                                               key_file: str, receivers: list[Receiver]) -> None:
    events, progress = recorder()
    receiver = start_receiver(key_file, progress=progress, io_timeout=5.0)
    receivers.append(receiver)
    liar = KeyHolder(address_of(receiver), load_key(key_file))
    liar.send_header()
    liar.wait_ready()
    liar.forge_round_end(stats)
    if outcome == "kept apart":
        wait_for(lambda: any(e["kind"] == "round" for e in events), what="the round record")
        (record,) = [e for e in events if e["kind"] == "round"]
        assert record["pages"] == 0 and record["round"] == 0  # ours, whatever the source claims
        assert record["source_stats"] == stats  # theirs, under their own key
        liar.close()
        receiver.join()
        assert isinstance(receiver.error, MigrationError)  # the stream then ended early: nothing resumed
    else:
        receiver.join(timeout=10)  # a refused frame ends the migration, no hang
        liar.close()
        assert isinstance(receiver.error, MigrationError)
        assert re.search(outcome, str(receiver.error)), receiver.error


def test_markup_in_a_peer_reason_reaches_the_terminal_as_text(tmp_path: Path) -> None:
    """An unauthenticated peer's REJECT reason full of rich markup: shown literally, no traceback."""
    key = tmp_path / "k"
    generate_key_file(key)
    server = socket.create_server(("127.0.0.1", 0))

    def reject_everyone() -> None:
        conn, _ = server.accept()
        conn.recv(4096)
        conn.sendall(encode_reject(AbortCode.PROTOCOL, "[/oops] [bold red]pwned[/bold red] \x1b[2J"))
        conn.close()

    threading.Thread(target=reject_everyone, daemon=True).start()
    result = subprocess.run(
        [sys.executable, "-m", "dirtylog", "migrate", "--to", f"127.0.0.1:{server.getsockname()[1]}", "--key-file",
         str(key), "--memory", "64M", "--warmup", "0"], capture_output=True, text=True, timeout=120)
    server.close()
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "[/oops] [bold red]pwned[/bold red]" in result.stdout  # as text, not as markup
    assert "\x1b" not in result.stdout  # control characters escaped
    assert "the source VM keeps running here" in result.stdout
