"""Argument types in the manner of QEMU's QAPI schema, checked in one place with QEMU's error wording.

A command declares its arguments as a :class:`Struct` of typed members; :func:`Struct.check` turns the
``arguments`` object of a request into checked Python values or raises :class:`QmpError` with the text
QEMU's input visitor (``qapi/qobject-input-visitor.c``) gives for the same mistake, so a script that
matches QEMU's messages keeps working:

* wrong type: ``Invalid parameter type for 'uri', expected: string``
* missing: ``Parameter 'uri' is missing``; unknown: ``Parameter 'urk' is unexpected``
* unsigned: ``Parameter 'max-bandwidth' expects uint64`` (not a number), ``... expects uint8_t`` (too big)
* enum: ``Parameter 'capability' does not accept value 'warp-drive'``

Members are visited in declaration order and the first problem wins, as in QEMU; nested names read
``capabilities[0].state``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from dirtylog.control.errors import QmpError

_INT64 = (-(1 << 63), (1 << 63) - 1)


def _type_error(path: str, expected: str) -> QmpError:
    return QmpError(f"Invalid parameter type for '{path}', expected: {expected}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class Type:
    """A QAPI type: ``check`` converts a JSON value or raises QmpError."""

    name = "any"

    def check(self, value: Any, path: str, name: str) -> Any:
        """``path`` is the member's full name (``a[0].b``), ``name`` its own name (QEMU uses both)."""
        return value

    def describe(self) -> str:
        return self.name


class Str(Type):
    name = "str"

    def check(self, value: Any, path: str, name: str) -> str:
        if not isinstance(value, str):
            raise _type_error(path, "string")
        return value


class Bool(Type):
    name = "bool"

    def check(self, value: Any, path: str, name: str) -> bool:
        if not isinstance(value, bool):
            raise _type_error(path, "boolean")
        return value


class Int(Type):
    """QAPI ``int`` (int64)."""

    name = "int"

    def check(self, value: Any, path: str, name: str) -> int:
        if not _is_int(value) or not _INT64[0] <= value <= _INT64[1]:
            raise _type_error(path, "integer")
        return int(value)


class Number(Type):
    name = "number"

    def check(self, value: Any, path: str, name: str) -> float:
        if not (_is_int(value) or isinstance(value, float)):
            raise _type_error(path, "number")
        return float(value)


@dataclass(frozen=True)
class UInt(Type):
    """QAPI ``uint8`` ... ``uint64`` and ``size``. Like QEMU, a negative int64 is taken modulo 2**64
    (backward compatibility) and then range-checked."""

    bits: int = 64
    qapi_name: str = ""

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.qapi_name or f"uint{self.bits}"

    def check(self, value: Any, path: str, name: str) -> int:
        if not _is_int(value) or not _INT64[0] <= value < (1 << 64):
            raise QmpError(f"Parameter '{path}' expects uint64")
        number = int(value) % (1 << 64)
        if number >= 1 << self.bits:
            # QEMU names the C type here (visit_type_uintN): "expects uint8_t".
            raise QmpError(f"Parameter '{name or 'null'}' expects uint{self.bits}_t")
        return number


@dataclass(frozen=True)
class Enum(Type):
    """A QAPI enum: a string from ``values``."""

    qapi_name: str
    values: tuple[str, ...]

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.qapi_name

    def check(self, value: Any, path: str, name: str) -> str:
        if not isinstance(value, str):
            raise _type_error(path, "string")
        if value not in self.values:
            raise QmpError(f"Parameter '{name or 'null'}' does not accept value '{value}'")
        return value


@dataclass(frozen=True)
class ListOf(Type):
    item: Type

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"[{self.item.describe()}]"

    def check(self, value: Any, path: str, name: str) -> list[Any]:
        if not isinstance(value, list):
            raise _type_error(path, "array")
        return [self.item.check(element, f"{path}[{index}]", "") for index, element in enumerate(value)]


@dataclass(frozen=True)
class Member:
    """One member of a struct; ``optional`` is QAPI's ``*name``."""

    name: str
    type: Type
    optional: bool = False
    doc: str = ""


@dataclass(frozen=True)
class Struct(Type):
    """A QAPI struct: an object with these members, and no others."""

    qapi_name: str = ""
    members: Sequence[Member] = field(default_factory=tuple)

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.qapi_name or "object"

    def check(self, value: Any, path: str = "", name: str = "") -> dict[str, Any]:
        if not isinstance(value, dict):
            raise _type_error(path or "null", "object")
        prefix = f"{path}." if path else ""
        checked: dict[str, Any] = {}
        for member in self.members:
            full = prefix + member.name
            if member.name not in value:
                if not member.optional:
                    raise QmpError(f"Parameter '{full}' is missing")
                continue
            checked[member.name] = member.type.check(value[member.name], full, member.name)
        known = {member.name for member in self.members}
        for key in value:
            if key not in known:
                raise QmpError(f"Parameter '{prefix}{key}' is unexpected")
        return checked

    def member(self, name: str) -> Member:
        return next(m for m in self.members if m.name == name)


NO_ARGUMENTS = Struct("none")
