"""The QMP session without sockets: greeting, negotiation, request checks, ids, argument schemas, events."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from dirtylog.control.commands import CommandTable, Dispatcher
from dirtylog.control.errors import ErrorClass, QmpError
from dirtylog.control.protocol import NO_ID, Event, QmpConnection, Refusal, Request, check_request, encode
from dirtylog.control.schema import Bool, Enum, Int, ListOf, Member, Number, Str, Struct, UInt

VERSION = {"qemu": {"major": 0, "minor": 1, "micro": 0}, "package": "test"}


class Session:
    """A QmpConnection and a dispatcher, driven with bytes the way the server drives them."""

    def __init__(self, table: CommandTable) -> None:
        self.connection = QmpConnection(VERSION)
        self.dispatcher = Dispatcher(table)

    def send(self, data: bytes) -> list[dict[str, Any]]:
        out = b""
        for item in self.connection.receive_data(data):
            if isinstance(item, Refusal):
                out += self.connection.answer(item.id, item.error)
            else:
                out += self.connection.answer(item.id, self.dispatcher.dispatch(self.connection, item))
        assert out == b"" or out.endswith(b"\r\n")
        return [json.loads(line) for line in out.decode("ascii").splitlines()]

    def execute(self, command: str, **arguments: Any) -> dict[str, Any]:
        (answer,) = self.send(json.dumps({"execute": command, "arguments": arguments, "id": 1}).encode())
        return answer


def table() -> CommandTable:
    commands = CommandTable()
    commands.add("echo", lambda args: args, Struct("echo", (
        Member("text", Str()),
        Member("count", Int(), optional=True),
        Member("small", UInt(8), optional=True),
        Member("ratio", Number(), optional=True),
        Member("flags", ListOf(Struct("flag", (Member("name", Enum("Flag", ("a", "b"))), Member("on", Bool())))),
               optional=True),
    )))
    commands.add("fail", lambda args: (_ for _ in ()).throw(QmpError("it failed, as asked")))
    return commands


@pytest.fixture
def session() -> Session:
    s = Session(table())
    assert s.send(b'{"execute": "qmp_capabilities"}') == [{"return": {}}]
    return s


def test_greeting_is_qmp_shaped_ascii_and_crlf_terminated() -> None:
    greeting = QmpConnection(VERSION, ("oob",)).greeting()
    assert greeting.endswith(b"\r\n") and greeting.isascii()
    assert json.loads(greeting) == {"QMP": {"version": VERSION, "capabilities": ["oob"]}}


def test_only_qmp_capabilities_runs_before_negotiation() -> None:
    s = Session(table())
    for command in ("echo", "no-such-command", "query-commands"):
        assert s.execute(command) == {"id": 1, "error": {
            "class": "CommandNotFound", "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
    assert s.execute("qmp_capabilities", enable=["oob"]) == {"id": 1, "error": {
        "class": "GenericError", "desc": "Capability 'oob' not available"}}
    # A list element has no name of its own: QEMU's enum check says 'null' there too.
    assert s.execute("qmp_capabilities", enable=["warp"])["error"]["desc"] == \
        "Parameter 'null' does not accept value 'warp'"
    assert s.execute("qmp_capabilities") == {"id": 1, "return": {}}
    assert s.execute("qmp_capabilities") == {"id": 1, "error": {
        "class": "CommandNotFound", "desc": "Capabilities negotiation is already complete, command ignored"}}


def test_ids_of_any_json_type_are_echoed_and_absent_ids_stay_absent(session: Session) -> None:
    for request_id in ("x", 7, None, [1, {"a": 2}], {"nested": True}):
        answer = session.send(json.dumps({"execute": "echo", "arguments": {"text": "t"}, "id": request_id}).encode())
        assert answer == [{"return": {"text": "t"}, "id": request_id}]
    assert session.send(b'{"execute": "echo", "arguments": {"text": "t"}}') == [{"return": {"text": "t"}}]


@pytest.mark.parametrize(("request_text", "desc", "has_id"), [
    (b"[1, 2]", "QMP input must be a JSON object", False),
    (b'"query-status"', "QMP input must be a JSON object", False),
    (b'{"id": 5}', "QMP input lacks member 'execute'", True),
    (b'{"execute": 5, "id": 5}', "QMP input member 'execute' must be a string", True),
    (b'{"execute": "echo", "arguments": [], "id": 5}', "QMP input member 'arguments' must be an object", True),
    (b'{"execute": "echo", "argumnets": {}, "id": 5}', "QMP input member 'argumnets' is unexpected", True),
    (b'{"exec-oob": "echo", "id": 5}', "QMP input member 'exec-oob' is unexpected", True),
    (b'{"execute": "echo", "id": 5,}', "JSON parse error, expecting value", False),
])
def test_malformed_requests_get_qemus_generic_errors(session: Session, request_text: bytes, desc: str,
                                                    has_id: bool) -> None:
    (answer,) = session.send(request_text)
    assert answer["error"] == {"class": "GenericError", "desc": desc}
    assert ("id" in answer) == has_id


def test_unknown_commands_are_command_not_found(session: Session) -> None:
    assert session.execute("query-kvm") == {"id": 1, "error": {
        "class": "CommandNotFound", "desc": "The command query-kvm has not been found"}}


@pytest.mark.parametrize(("arguments", "desc"), [
    ({}, "Parameter 'text' is missing"),
    ({"text": 1}, "Invalid parameter type for 'text', expected: string"),
    ({"text": "t", "cuont": 1}, "Parameter 'cuont' is unexpected"),
    ({"text": "t", "count": "1"}, "Invalid parameter type for 'count', expected: integer"),
    ({"text": "t", "count": True}, "Invalid parameter type for 'count', expected: integer"),
    ({"text": "t", "count": 1.5}, "Invalid parameter type for 'count', expected: integer"),
    ({"text": "t", "small": 256}, "Parameter 'small' expects uint8_t"),
    ({"text": "t", "small": -1}, "Parameter 'small' expects uint8_t"),
    ({"text": "t", "small": "x"}, "Parameter 'small' expects uint64"),
    ({"text": "t", "ratio": "x"}, "Invalid parameter type for 'ratio', expected: number"),
    ({"text": "t", "flags": {}}, "Invalid parameter type for 'flags', expected: array"),
    ({"text": "t", "flags": [{"name": "c", "on": True}]}, "Parameter 'name' does not accept value 'c'"),
    ({"text": "t", "flags": [{"name": "a", "on": 1}]}, "Invalid parameter type for 'flags[0].on', expected: boolean"),
    ({"text": "t", "flags": [{"name": "a"}]}, "Parameter 'flags[0].on' is missing"),
    ({"text": "t", "flags": [{"name": "a", "on": True, "x": 0}]}, "Parameter 'flags[0].x' is unexpected"),
])
def test_arguments_are_checked_before_the_handler_runs_with_qemus_wording(arguments: dict[str, Any],
                                                                          desc: str) -> None:
    calls: list[dict[str, Any]] = []
    commands = CommandTable()
    commands.add("echo", lambda args: calls.append(args) or {}, table().get("echo").arguments)  # type: ignore[union-attr]
    s = Session(commands)
    s.send(b'{"execute": "qmp_capabilities"}')
    assert s.execute("echo", **arguments) == {"id": 1, "error": {"class": "GenericError", "desc": desc}}
    assert calls == []


def test_checked_arguments_reach_the_handler(session: Session) -> None:
    answer = session.execute("echo", text="t", count=-3, small=200, ratio=2, flags=[{"name": "b", "on": False}])
    assert answer["return"] == {"text": "t", "count": -3, "small": 200, "ratio": 2.0,
                                "flags": [{"name": "b", "on": False}]}


def test_a_handler_error_is_an_error_answer(session: Session) -> None:
    assert session.execute("fail") == {"id": 1, "error": {"class": "GenericError", "desc": "it failed, as asked"}}


def test_commands_without_arguments_refuse_any(session: Session) -> None:
    assert session.execute("fail", x=1)["error"]["desc"] == "Parameter 'x' is unexpected"


def test_query_commands_lists_the_table_and_the_protocol_commands(session: Session) -> None:
    names = [c["name"] for c in session.execute("query-commands")["return"]]
    assert names == sorted(["echo", "fail", "qmp_capabilities", "query-commands"])


def test_events_reach_only_negotiated_sessions_with_a_timestamp() -> None:
    event = Event.now("STOP")
    fresh = QmpConnection(VERSION)
    assert fresh.event(event) == b""
    fresh.negotiate()
    message = json.loads(fresh.event(event))
    assert message["event"] == "STOP" and "data" not in message
    assert set(message["timestamp"]) == {"seconds", "microseconds"}
    assert abs(message["timestamp"]["seconds"] - time.time()) < 5
    assert 0 <= message["timestamp"]["microseconds"] < 1_000_000
    assert json.loads(fresh.event(Event.now("MIGRATION", {"status": "active"})))["data"] == {"status": "active"}


def test_requests_and_encoding_helpers() -> None:
    assert check_request({"execute": "stop"}) == Request("stop", {}, NO_ID)
    assert check_request({"execute": "stop", "id": None}) == Request("stop", {}, None)
    assert encode({"return": {"name": "é"}}) == b'{"return": {"name": "\\u00e9"}}\r\n'
    deep: list[Any] = []
    for _ in range(1100):
        deep = [deep]
    assert encode({"id": deep}).count(b"[") == 1101  # echoed even past Python's recursion limit
    assert ErrorClass.COMMAND_NOT_FOUND == "CommandNotFound"
