"""The command table: QMP command names mapped to a handler and its argument schema, and the dispatcher.

Adding a command is one entry: ``table.add("calc-dirty-rate", handler, Struct(...))``. The dispatcher
does everything QEMU's ``qmp_dispatch`` does around a handler: capabilities-negotiation mode (only
``qmp_capabilities`` runs), ``CommandNotFound`` for names not in the table, argument checking against
the schema before any side effect, and turning a :class:`QmpError` into an error answer. Handlers get
checked arguments (a dict of Python values keyed by QAPI member names) and return the JSON ``return``
value (``{}`` when the command returns nothing).

Commands run one at a time (a lock), whatever client sent them, as QEMU runs them in its main loop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from dirtylog.control.errors import ErrorClass, QmpError, report_internal_error
from dirtylog.control.json_stream import JsonValue
from dirtylog.control.protocol import QmpConnection, Request
from dirtylog.control.schema import NO_ARGUMENTS, Enum, ListOf, Member, Struct

Handler = Callable[[dict[str, Any]], JsonValue]

QMP_CAPABILITY = Enum("QMPCapability", ("oob",))
QMP_CAPABILITIES_ARGUMENTS = Struct("qmp_capabilities", (Member("enable", ListOf(QMP_CAPABILITY), optional=True),))


@dataclass(frozen=True)
class Command:
    """One QMP command."""

    name: str
    handler: Handler
    arguments: Struct = NO_ARGUMENTS
    doc: str = ""


class CommandTable:
    """Command name -> :class:`Command`."""

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}

    def add(self, name: str, handler: Handler, arguments: Struct = NO_ARGUMENTS, doc: str = "") -> None:
        if name in self._commands:
            raise ValueError(f"QMP command {name!r} is registered twice")
        self._commands[name] = Command(name, handler, arguments, doc or (handler.__doc__ or "").strip())

    def get(self, name: str) -> Command | None:
        return self._commands.get(name)

    def __iter__(self) -> Iterator[Command]:
        return iter(self._commands.values())

    def __contains__(self, name: object) -> bool:
        return name in self._commands

    def names(self) -> list[str]:
        return sorted(self._commands)


class Dispatcher:
    """Runs requests against a command table, with QMP's session rules (see the module docstring)."""

    def __init__(self, table: CommandTable) -> None:
        self.table = table
        self._lock = threading.Lock()

    def dispatch(self, connection: QmpConnection, request: Request) -> JsonValue | QmpError:
        """The answer to ``request`` on ``connection``: a return value or a QmpError."""
        with self._lock:
            try:
                return self._run(connection, request)
            except QmpError as error:
                return error
            except Exception as error:  # a bug: this command fails, the monitor goes on
                report_internal_error(f"the QMP command {request.command}")
                return QmpError(f"internal error in {request.command}: {type(error).__name__}: {error}")

    def _run(self, connection: QmpConnection, request: Request) -> JsonValue:
        if request.command == "qmp_capabilities":
            return self._qmp_capabilities(connection, request.arguments)
        if not connection.negotiated:
            raise QmpError("Expecting capabilities negotiation with 'qmp_capabilities'",
                           ErrorClass.COMMAND_NOT_FOUND)
        if request.command == "query-commands":
            NO_ARGUMENTS.check(request.arguments)
            return [{"name": name} for name in sorted([*self.table.names(), "qmp_capabilities", "query-commands"])]
        command = self.table.get(request.command)
        if command is None:
            raise QmpError(f"The command {request.command} has not been found", ErrorClass.COMMAND_NOT_FOUND)
        arguments = command.arguments.check(request.arguments)
        return command.handler(arguments)

    def _qmp_capabilities(self, connection: QmpConnection, arguments: dict[str, Any]) -> JsonValue:
        if connection.negotiated:
            raise QmpError("Capabilities negotiation is already complete, command ignored",
                           ErrorClass.COMMAND_NOT_FOUND)
        checked = QMP_CAPABILITIES_ARGUMENTS.check(arguments)
        for capability in checked.get("enable", []):
            if capability not in connection.capabilities:
                raise QmpError(f"Capability '{capability}' not available")
        connection.negotiate()
        return {}
