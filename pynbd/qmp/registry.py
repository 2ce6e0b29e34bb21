"""The QMP command registry: commands, their argument schemas in QAPI's terms, and validation
with QEMU's error messages.

Pure (no I/O); the registry is filled at start-up and read from the event loop's thread.

A command is a name, an argument schema and a handler. The schema uses QAPI's types —
``STR``, ``BOOL``, ``INT`` (int64), ``UINT32``, ``UINT64``, :class:`Enum`, :class:`Struct`
members (``Member(name, type, optional=True)``), :class:`List`, :class:`Alternate`,
:class:`Union` — and validation walks the arguments as QEMU's QObject input visitor
(qapi/qobject-input-visitor.c) does, member by member in schema order, so the first error
and its message are QEMU's: "Parameter 'x' is missing", "Invalid parameter type for 'x',
expected: string", "Parameter 'x' expects uint32_t", "Parameter 'x' does not accept value
'y'", "Parameter 'x' is unexpected" (the first left in QEMU's hash-table order).

A handler is called as ``handler(context, **arguments)``: the top-level members by their C
names (``-`` and ``.`` become ``_``; a Python keyword gets a ``q_`` prefix, as QAPI does), only
the members present (optional ones left out take the handler's defaults); nested structs
arrive as dicts keyed by the JSON names. It may be a coroutine function. It returns the
``return`` value (``None`` means ``{}``, QEMU's answer for commands without a return type) or
raises :class:`QmpError`.
"""

from __future__ import annotations

import keyword
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pynbd.qmp.qobject import GHashKeySet, qdict_order

# QAPI's ErrorClass values (qapi/error.json).
GENERIC_ERROR = "GenericError"
COMMAND_NOT_FOUND = "CommandNotFound"
DEVICE_NOT_ACTIVE = "DeviceNotActive"
DEVICE_NOT_FOUND = "DeviceNotFound"
KVM_MISSING_CAP = "KVMMissingCap"
ERROR_CLASSES = (GENERIC_ERROR, COMMAND_NOT_FOUND, DEVICE_NOT_ACTIVE, DEVICE_NOT_FOUND, KVM_MISSING_CAP)


class QmpError(Exception):
    """A command's failure as QMP reports it: ``{"error": {"class": ..., "desc": ...}}``."""

    def __init__(self, desc: str, error_class: str = GENERIC_ERROR) -> None:
        if error_class not in ERROR_CLASSES:
            raise ValueError(f"not a QAPI error class: {error_class!r}")
        super().__init__(desc)
        self.desc = desc
        self.error_class = error_class


def _invalid_type(name: str, expected: str) -> QmpError:
    return QmpError(f"Invalid parameter type for '{name}', expected: {expected}")


def _invalid_value(name: str | None, expected: str) -> QmpError:
    return QmpError(f"Parameter '{'null' if name is None else name}' expects {expected}")


# --- The input visitor ----------------------------------------------------------------------

_ABSENT = object()


@dataclass(slots=True)
class _Level:
    """StackObject: a dict or list being visited, the name it has in its parent, and what
    is left of it (the unvisited keys, or the index of the current element)."""

    obj: dict[str, Any] | list[Any]
    name: str | None
    unvisited: GHashKeySet | None = None
    index: int = -1


class _Visitor:
    """The parts of QEMU's QObject input visitor that argument validation uses."""

    def __init__(self) -> None:
        self.stack: list[_Level] = []

    def full_name(self, name: str | None) -> str:
        """full_name_nth(): the member's path for messages, e.g. ``actions[0].data.name``."""
        path = ""
        for level in reversed(self.stack):
            if isinstance(level.obj, dict):
                path = "." + ("<anonymous>" if name is None else name) + path
            else:
                path = f"[{level.index}]" + path
            name = level.name
        if name is not None:
            return name + path
        if path.startswith("."):
            return path[1:]
        return path or "<anonymous>"

    def peek(self, name: str | None) -> Any:
        """The member (or, in a list, the next element) without consuming it; _ABSENT if none."""
        level = self.stack[-1]
        if isinstance(level.obj, dict):
            assert name is not None
            return level.obj.get(name, _ABSENT)
        return level.obj[level.index + 1] if level.index + 1 < len(level.obj) else _ABSENT

    def take(self, name: str | None) -> Any:
        """qobject_input_get_object() consuming it; raises "Parameter 'x' is missing"."""
        if not self.stack:  # the arguments themselves
            raise AssertionError("the root is entered with enter(), not taken")
        level = self.stack[-1]
        if isinstance(level.obj, dict):
            assert name is not None
            value = level.obj.get(name, _ABSENT)
            if value is not _ABSENT and level.unvisited is not None:
                level.unvisited.discard(name)
        else:
            level.index += 1
            value = level.obj[level.index] if level.index < len(level.obj) else _ABSENT
        if value is _ABSENT:
            raise QmpError(f"Parameter '{self.full_name(name)}' is missing")
        return value

    def enter(self, obj: dict[str, Any] | list[Any], name: str | None) -> None:
        unvisited = GHashKeySet(qdict_order(obj)) if isinstance(obj, dict) else None
        self.stack.append(_Level(obj, name, unvisited))

    def check_struct(self) -> None:
        """qobject_input_check_struct(): "Parameter 'x' is unexpected" for a member left."""
        level = self.stack[-1]
        assert level.unvisited is not None
        for key in level.unvisited:
            raise QmpError(f"Parameter '{self.full_name(key)}' is unexpected")

    def leave(self) -> None:
        self.stack.pop()


# --- QAPI types ---------------------------------------------------------------------------

class QapiType:
    """A QAPI type: ``visit`` takes member ``name`` (None for a list element) from the
    visitor, checks it, and returns the Python value the handler gets."""

    #: The QAPI type name (alternates show theirs in type errors).
    name: str

    def visit(self, visitor: _Visitor, name: str | None) -> Any:
        raise NotImplementedError

    def accepts_json_type(self, value: Any) -> bool:
        """Whether an alternate picks this branch for ``value`` (by its JSON type only)."""
        raise NotImplementedError


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class _Scalar(QapiType):
    name: str
    expected: str

    def accepts_json_type(self, value: Any) -> bool:
        if self.expected == "string":
            return isinstance(value, str)
        if self.expected == "boolean":
            return isinstance(value, bool)
        if self.expected == "null":
            return value is None
        return True  # any

    def visit(self, visitor: _Visitor, name: str | None) -> Any:
        value = visitor.take(name)
        if not self.accepts_json_type(value):
            raise _invalid_type(visitor.full_name(name), self.expected)
        return value


@dataclass(frozen=True)
class Int(QapiType):
    """A signed integer: int64 ('int'), or int8/16/32 with their C range check."""

    name: str = "int"
    bits: int = 64

    def accepts_json_type(self, value: Any) -> bool:
        return _is_number(value)

    def visit(self, visitor: _Visitor, name: str | None) -> int:
        value = visitor.take(name)
        if not isinstance(value, int) or isinstance(value, bool) or not -(1 << 63) <= value < 1 << 63:
            raise _invalid_type(visitor.full_name(name), "integer")
        if self.bits < 64 and not -(1 << (self.bits - 1)) <= value < 1 << (self.bits - 1):
            raise _invalid_value(name, f"int{self.bits}_t")
        return value


@dataclass(frozen=True)
class UInt(QapiType):
    """An unsigned integer: uint64 ('uint64', 'size'), or uint8/16/32 with their C range check.

    As QEMU, a negative int64 is taken modulo 2**64 (then fails the narrower range checks).
    """

    name: str = "uint64"
    bits: int = 64

    def accepts_json_type(self, value: Any) -> bool:
        return _is_number(value)

    def visit(self, visitor: _Visitor, name: str | None) -> int:
        value = visitor.take(name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise _invalid_value(visitor.full_name(name), "uint64")
        if value < 0:
            value += 1 << 64
        if self.bits < 64 and value >= 1 << self.bits:
            raise _invalid_value(name, f"uint{self.bits}_t")
        return value


@dataclass(frozen=True)
class Number(QapiType):
    """QAPI 'number': any JSON number, as a float."""

    name: str = "number"

    def accepts_json_type(self, value: Any) -> bool:
        return _is_number(value)

    def visit(self, visitor: _Visitor, name: str | None) -> float:
        value = visitor.take(name)
        if not _is_number(value):
            raise _invalid_type(visitor.full_name(name), "number")
        return float(value)


STR = _Scalar("str", "string")
BOOL = _Scalar("bool", "boolean")
NULL = _Scalar("null", "null")
ANY = _Scalar("any", "any")
INT = Int()
INT8, INT16, INT32 = Int("int8", 8), Int("int16", 16), Int("int32", 32)
UINT64 = UInt()
SIZE = UInt("size")
UINT8, UINT16, UINT32 = UInt("uint8", 8), UInt("uint16", 16), UInt("uint32", 32)
NUMBER = Number()


@dataclass(frozen=True)
class Enum(QapiType):
    """A QAPI enum: a string out of ``values``."""

    name: str
    values: tuple[str, ...]

    def accepts_json_type(self, value: Any) -> bool:
        return isinstance(value, str)

    def visit(self, visitor: _Visitor, name: str | None) -> str:
        value = STR.visit(visitor, name)
        if value not in self.values:
            # input_type_enum() names the bare member, not its path.
            raise QmpError(f"Parameter '{'null' if name is None else name}' does not accept value '{value}'")
        return value


@dataclass(frozen=True)
class Member:
    """A struct member: its JSON name, its type, whether it may be left out."""

    name: str
    type: QapiType
    optional: bool = False


def _visit_members(visitor: _Visitor, members: Sequence[Member], into: dict[str, Any]) -> None:
    for member in members:
        if member.optional and visitor.peek(member.name) is _ABSENT:
            continue
        into[member.name] = member.type.visit(visitor, member.name)


@dataclass(frozen=True)
class Struct(QapiType):
    """A QAPI struct: a JSON object with these members and no others."""

    name: str
    members: tuple[Member, ...] = ()

    def accepts_json_type(self, value: Any) -> bool:
        return isinstance(value, dict)

    def visit(self, visitor: _Visitor, name: str | None) -> dict[str, Any]:
        value = visitor.take(name)
        if not isinstance(value, dict):
            raise _invalid_type(visitor.full_name(name), "object")
        return self.visit_object(visitor, value, name)

    def visit_object(self, visitor: _Visitor, value: dict[str, Any], name: str | None) -> dict[str, Any]:
        """Visit the members of ``value``, an object named ``name`` in its parent."""
        visitor.enter(value, name)
        result: dict[str, Any] = {}
        _visit_members(visitor, self.members, result)
        _visit_members(visitor, self.variant_members(result), result)
        visitor.check_struct()
        visitor.leave()
        return result

    def variant_members(self, base: dict[str, Any]) -> Sequence[Member]:
        """Members visited after the base ones (a union's branch)."""
        return ()


@dataclass(frozen=True)
class Union(Struct):
    """A QAPI (flat) union: the base ``members``, one of them the enum ``discriminator``,
    then the members of the branch its value picks (none for a value without a branch)."""

    discriminator: str = "type"
    branches: Mapping[str, tuple[Member, ...]] = field(default_factory=dict)

    def variant_members(self, base: dict[str, Any]) -> Sequence[Member]:
        return self.branches.get(base[self.discriminator], ())


@dataclass(frozen=True)
class List(QapiType):
    """A QAPI list (``['T']``)."""

    element: QapiType
    name: str = "list"

    def accepts_json_type(self, value: Any) -> bool:
        return isinstance(value, list)

    def visit(self, visitor: _Visitor, name: str | None) -> list[Any]:
        value = visitor.take(name)
        if not isinstance(value, list):
            raise _invalid_type(visitor.full_name(name), "array")
        visitor.enter(value, name)
        result = [self.element.visit(visitor, None) for _ in value]
        visitor.leave()
        return result


@dataclass(frozen=True)
class Alternate(QapiType):
    """A QAPI alternate (e.g. 'BlockDirtyBitmapOrStr'): the first branch whose JSON type
    matches the value is used."""

    name: str
    branches: tuple[QapiType, ...]

    def accepts_json_type(self, value: Any) -> bool:
        return any(branch.accepts_json_type(value) for branch in self.branches)

    def visit(self, visitor: _Visitor, name: str | None) -> Any:
        value = visitor.peek(name)
        if value is _ABSENT:
            visitor.take(name)  # raises "is missing"
        for branch in self.branches:
            if branch.accepts_json_type(value):
                return branch.visit(visitor, name)
        raise _invalid_type("null" if name is None else name, self.name)


# --- Commands -------------------------------------------------------------------------------

def c_name(name: str) -> str:
    """A QAPI member name as a Python identifier (QAPI's c_name())."""
    ident = name.replace("-", "_").replace(".", "_")
    return "q_" + ident if keyword.iskeyword(ident) else ident


Handler = Callable[..., Any]


@dataclass(frozen=True)
class Command:
    """A registered command: its name, argument members, and handler."""

    name: str
    handler: Handler
    arguments: tuple[Member, ...] = ()
    #: QAPI ``'boxed': true``: the arguments are this struct or union (``arguments`` unused).
    boxed: Struct | None = None

    def validate(self, arguments: dict[str, Any]) -> dict[str, Any]:
        """The handler's keyword arguments for the ``arguments`` object of a request;
        raises QmpError with QEMU's message for the first problem."""
        visitor = _Visitor()
        schema = self.boxed if self.boxed is not None else Struct(self.name, self.arguments)
        visited = schema.visit_object(visitor, arguments, None)
        return {c_name(key): value for key, value in visited.items()}


class CommandRegistry:
    """The commands a monitor offers, by name, in registration order."""

    def __init__(self) -> None:
        self._commands: dict[str, Command] = {}

    def add(self, name: str, handler: Handler, arguments: Iterable[Member] = (),
            boxed: Struct | None = None) -> Command:
        """Register ``handler`` as command ``name`` taking ``arguments``, or the members of
        the struct or union ``boxed``; raises ValueError for a name taken."""
        if name in self._commands:
            raise ValueError(f"QMP command {name!r} is registered twice")
        command = Command(name, handler, tuple(arguments), boxed)
        self._commands[name] = command
        return command

    def get(self, name: str) -> Command | None:
        return self._commands.get(name)

    def names(self) -> list[str]:
        """The command names in the order query-commands lists them (QEMU's: newest first)."""
        return list(reversed(self._commands))
