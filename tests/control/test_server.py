"""The QMP server over real sockets (no VM): socket safety, many clients, events, bad input, big input."""

from __future__ import annotations

import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from dirtylog.control.commands import CommandTable, Dispatcher
from dirtylog.control.errors import ControlError
from dirtylog.control.protocol import Event
from dirtylog.control.schema import Member, Str, Struct
from dirtylog.control.server import QmpServer, parse_address
from tests.control.conftest import RawClient

VERSION = {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "test"}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[QmpServer]:
    table = CommandTable()
    holder: list[QmpServer] = []
    table.add("say", lambda args: holder[0].broadcast(Event.now("SAID", {"text": args["text"]})) or {},
              Struct("say", (Member("text", Str()),)))
    table.add("echo", lambda args: args, Struct("echo", (Member("text", Str()),)))
    table.add("x-broken", lambda args: {}["missing"])  # a handler with a bug
    table.add("x-not-json", lambda args: {"rate": float("nan")})
    table.add("x-bad-event", lambda args: holder[0].broadcast(Event.now("BAD", {"rate": float("inf")})) or {})
    qmp = QmpServer(f"unix:{tmp_path / 'qmp.sock'}", Dispatcher(table), VERSION)
    holder.append(qmp)
    qmp.start()
    yield qmp
    qmp.close()
    qmp.join(5)


def test_the_unix_socket_is_private_and_removed_at_the_end(server: QmpServer) -> None:
    path = server.address.path
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and stat.S_ISSOCK(os.stat(path).st_mode)
    assert not [p for p in Path(path).parent.iterdir() if p.name.startswith(".qmp-")]
    server.close()
    server.join(5)
    assert not os.path.exists(path)


def test_stale_sockets_are_replaced_live_ones_and_other_files_refused(tmp_path: Path) -> None:
    dispatcher = Dispatcher(CommandTable())
    stale = tmp_path / "stale.sock"
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(stale))
    dead.close()  # the file stays, nobody listens: what a killed process leaves
    first = QmpServer(f"unix:{stale}", dispatcher, VERSION)
    with pytest.raises(ControlError, match="another process serves QMP"):
        QmpServer(f"unix:{stale}", dispatcher, VERSION)
    first.close()
    plain = tmp_path / "file"
    plain.write_text("keep me")
    with pytest.raises(ControlError, match="exists and is not a socket"):
        QmpServer(f"unix:{plain}", dispatcher, VERSION)
    assert plain.read_text() == "keep me"


@pytest.mark.parametrize("address", ["tcp:0.0.0.0:4444", "tcp:192.168.1.5:4444", "tcp:example.com:4444"])
def test_tcp_must_be_loopback(address: str) -> None:
    with pytest.raises(ControlError, match="not loopback: QMP has no authentication"):
        parse_address(address)


def test_loopback_tcp_with_port_zero_reports_the_real_port() -> None:
    qmp = QmpServer("tcp:127.0.0.1:0", Dispatcher(CommandTable()), VERSION)
    qmp.start()
    try:
        assert qmp.address.port > 0
        client = RawClient(str(qmp.address))
        assert client.greeting == {"QMP": {"version": VERSION, "capabilities": []}}
        client.close()
    finally:
        qmp.close()


def test_several_clients_events_only_after_negotiation_and_before_the_answer(server: QmpServer) -> None:
    address = str(server.address)
    talker, listener, shy = RawClient(address), RawClient(address), RawClient(address)
    talker.negotiate()
    listener.negotiate()
    talker.send(b'{"execute": "say", "arguments": {"text": "hi"}, "id": 1}')
    said = talker.read()
    assert said["event"] == "SAID" and said["data"] == {"text": "hi"}
    assert talker.read() == {"return": {}, "id": 1}  # the event the command caused came first
    assert listener.read()["event"] == "SAID"
    # The client still negotiating got no event: its next message is the answer to its own request.
    shy.send(b'{"execute": "echo", "arguments": {"text": "x"}, "id": 2}')
    assert shy.read()["error"]["class"] == "CommandNotFound"
    for client in (talker, listener, shy):
        client.close()


def test_events_from_other_threads_are_broadcast(server: QmpServer) -> None:
    client = RawClient(str(server.address))
    client.negotiate()
    threading.Thread(target=server.broadcast, args=(Event.now("MIGRATION", {"status": "active"}),)).start()
    assert client.read()["data"] == {"status": "active"}
    client.close()


def test_bad_input_is_answered_and_the_connection_keeps_working(server: QmpServer) -> None:
    client = RawClient(str(server.address))
    client.negotiate()
    client.send(b'{"execute": "echo", "arguments": {"text": }}\n')
    assert client.read() == {"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}
    client.send(b'{"execute": "echo", "arguments": {"text": 5}, "id": "t"}')
    assert client.read() == {"id": "t", "error": {"class": "GenericError",
                                                 "desc": "Invalid parameter type for 'text', expected: string"}}
    client.send(b'{"execute": "no-such", "id": "u"}')
    assert client.read()["error"] == {"class": "CommandNotFound", "desc": "The command no-such has not been found"}
    client.send(b'{"execute": "echo", "arguments": {"text": "still here"}, "id": "v"}')
    assert client.read() == {"return": {"text": "still here"}, "id": "v"}
    client.close()


def test_a_bug_in_a_command_or_event_costs_that_answer_not_the_monitor(
        server: QmpServer, capfd: pytest.CaptureFixture[str]) -> None:
    client, other = RawClient(str(server.address)), RawClient(str(server.address))
    client.negotiate()
    other.negotiate()
    client.send(b'{"execute": "x-broken", "id": 1}')
    assert client.read() == {"id": 1, "error": {"class": "GenericError",
                                                "desc": "internal error in x-broken: KeyError: 'missing'"}}
    client.send(b'{"execute": "x-not-json", "id": 2}')
    assert client.read()["error"]["desc"].startswith("internal error in x-not-json: its answer is not JSON")
    client.send(b'{"execute": "x-bad-event", "id": 3}')
    assert client.read() == {"id": 3, "return": {}}  # the event is dropped; the command did its work
    client.send(b'{"execute": "say", "arguments": {"text": "alive"}}')
    assert client.read()["data"] == {"text": "alive"} and client.read() == {"return": {}}
    assert other.read()["data"] == {"text": "alive"}  # the other client was never disconnected
    client.close()
    other.close()
    reported = capfd.readouterr().err
    assert all(f"internal error in {where}" in reported for where in
               ("the QMP command x-broken", "the answer to x-not-json", "the event BAD"))
    assert "KeyError: 'missing'" in reported  # the traceback, for the bug report


def test_a_message_over_64_mib_is_refused_and_the_session_goes_on(server: QmpServer) -> None:
    client = RawClient(str(server.address))
    client.negotiate()
    sender = threading.Thread(target=client.send, args=(
        b'{"execute": "echo", "arguments": {"text": "' + b"A" * (65 << 20) + b'"}}\n',))
    sender.start()
    assert client.read() == {"error": {"class": "GenericError", "desc": "JSON token size limit exceeded"}}
    sender.join(30)
    # The rest of the oversized string is garbage to the lexer, as in QEMU: errors until it resynchronizes.
    client.send(b'\n{"execute": "echo", "arguments": {"text": "after"}, "id": "w"}')
    while (answer := client.read()).get("id") != "w":
        assert "error" in answer and "id" not in answer
    assert answer == {"return": {"text": "after"}, "id": "w"}
    client.close()


def test_a_client_that_vanishes_mid_message_does_not_disturb_others(server: QmpServer) -> None:
    rude = RawClient(str(server.address))
    rude.negotiate()
    rude.send(b'{"execute": "echo", "argu')
    rude.close()
    polite = RawClient(str(server.address))
    polite.negotiate()
    polite.send(b'{"execute": "echo", "arguments": {"text": "ok"}}')
    assert polite.read() == {"return": {"text": "ok"}}
    polite.close()


def test_closing_delivers_the_final_event(server: QmpServer) -> None:
    client = RawClient(str(server.address))
    client.negotiate()
    server.close(Event.now("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"}))
    assert client.read()["event"] == "SHUTDOWN"
    deadline = time.monotonic() + 5
    while client.sock.recv(1) and time.monotonic() < deadline:
        pass
    assert server.closed.wait(5)
