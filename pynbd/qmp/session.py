"""One QMP monitor session as a state machine: greeting, capabilities negotiation, requests
in, replies and events out, with QEMU 7.2's messages.

Pure (no I/O, no clock): the monitor (pynbd/qmp/monitor.py) feeds it the bytes a client
sent, runs the handlers of the calls it hands back, and sends the bytes it returns. Used
from one thread at a time.

What QEMU does, and this does the same way (monitor/qmp.c, qapi/qmp-dispatch.c):

* the greeting ``{"QMP": {"version": ..., "capabilities": ["oob"]}}`` comes first;
* until ``qmp_capabilities`` succeeds, only it exists: every other command gets
  CommandNotFound "Expecting capabilities negotiation with 'qmp_capabilities'" (other
  errors, such as a malformed request, keep their own message);
* a request is a JSON object with ``execute`` (a string), optionally ``arguments`` (an
  object) and ``id`` (any JSON value, echoed in the reply); ``exec-oob`` instead of
  ``execute`` once the client enabled the ``oob`` capability (no pynbd command runs out
  of band, so those get "does not support OOB");
* replies are ``{"return": ...}`` or ``{"error": {"class": ..., "desc": ...}}``, plus
  ``id`` when the request had one; parse errors and non-objects have no ``id``;
* events go to negotiated sessions only, as ``{"timestamp": {"seconds": ...,
  "microseconds": ...}, "event": ..., "data": ...}``;
* every message is one line of JSON ended by CR LF.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynbd.qmp.qobject import qdict_order, to_json
from pynbd.qmp.registry import COMMAND_NOT_FOUND, Command, CommandRegistry, QmpError
from pynbd.qmp.stream import JsonError, JsonStream, StreamItem

#: Capabilities a pynbd monitor offers in its greeting (qemu-storage-daemon's).
OFFERED_CAPABILITIES = ("oob",)

NEGOTIATION_COMMAND = "qmp_capabilities"
_EXPECTING_NEGOTIATION = "Expecting capabilities negotiation with 'qmp_capabilities'"
_NO_ID = object()


@dataclass(frozen=True)
class QmpVersion:
    """What ``query-version`` and the greeting report (QAPI VersionInfo)."""

    major: int
    minor: int
    micro: int
    package: str

    def to_qapi(self) -> dict[str, Any]:
        """VersionInfo as QEMU builds it (members in schema order)."""
        return {"qemu": {"major": self.major, "minor": self.minor, "micro": self.micro},
                "package": self.package}


def encode_message(message: dict[str, Any]) -> bytes:
    """One QMP message on the wire: compact JSON in QEMU's member order, then CR LF."""
    return to_json(message).encode("ascii") + b"\r\n"


def encode_event(name: str, data: dict[str, Any] | None, seconds: int, microseconds: int) -> bytes:
    """An event message (qmp_event_build_dict()); ``data`` None leaves ``data`` out, as
    QEMU does for events without members."""
    message: dict[str, Any] = {"timestamp": {"seconds": seconds, "microseconds": microseconds},
                               "event": name}
    if data is not None:
        message["data"] = data
    return encode_message(message)


def error_message(error: QmpError, request_id: Any = _NO_ID) -> bytes:
    """qmp_error_response() plus the ``id`` when there was one."""
    message: dict[str, Any] = {"error": {"class": error.error_class, "desc": error.desc}}
    if request_id is not _NO_ID:
        message["id"] = request_id
    return encode_message(message)


@dataclass(frozen=True)
class Reply:
    """An answer ready to send (an error found before any handler ran)."""

    data: bytes


@dataclass(frozen=True)
class Call:
    """A valid request: run ``command.handler(context, **arguments)``, then pass the outcome
    to :meth:`QmpSession.returned` or :meth:`QmpSession.failed`."""

    command: Command
    arguments: dict[str, Any]
    request_id: Any
    #: Dispatched before negotiation completed (only qmp_capabilities can be).
    before_negotiation: bool


class QmpSession:
    """The protocol state of one monitor client."""

    def __init__(self, registry: CommandRegistry, version: QmpVersion) -> None:
        self.registry = registry
        self.version = version
        self.stream = JsonStream()
        #: qmp_capabilities succeeded: all commands exist, events are sent.
        self.negotiated = False
        #: The client enabled the ``oob`` capability (``exec-oob`` is accepted).
        self.oob_enabled = False

    def greeting(self) -> bytes:
        return encode_message({"QMP": {"version": self.version.to_qapi(),
                                       "capabilities": list(OFFERED_CAPABILITIES)}})

    def feed(self, data: bytes) -> list[StreamItem]:
        """The requests and parse errors completed by ``data``, in order; pass each to
        :meth:`dispatch` when its turn comes (a request's outcome depends on the ones
        before it, e.g. on negotiation)."""
        return self.stream.feed(data)

    def dispatch(self, item: StreamItem) -> Reply | Call:
        """qmp_dispatch() up to the handler: an error reply, or the call to run."""
        if isinstance(item, JsonError):
            return Reply(error_message(QmpError(item.desc)))
        request = item.value
        if not isinstance(request, dict):
            return Reply(error_message(QmpError("QMP input must be a JSON object")))
        request_id = request.get("id", _NO_ID)
        try:
            name, out_of_band = self._check_request(request)
            command = self._find(name)
            if out_of_band:
                raise QmpError(f"The command {name} does not support OOB")
            arguments = command.validate(request.get("arguments", {}))
        except QmpError as error:
            return Reply(self._error(error, request_id, not self.negotiated))
        return Call(command, arguments, request_id, not self.negotiated)

    def _check_request(self, request: dict[str, Any]) -> tuple[str, bool]:
        """qmp_dispatch_check_obj(): the command name and whether it came as exec-oob."""
        exec_key = None
        for key in qdict_order(request):
            value = request[key]
            if key == "execute" or (key == "exec-oob" and self.oob_enabled):
                if not isinstance(value, str):
                    raise QmpError(f"QMP input member '{key}' must be a string")
                if exec_key is not None:
                    raise QmpError(f"QMP input member '{key}' clashes with '{exec_key}'")
                exec_key = key
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise QmpError("QMP input member 'arguments' must be an object")
            elif key != "id":
                raise QmpError(f"QMP input member '{key}' is unexpected")
        if exec_key is None:
            raise QmpError("QMP input lacks member 'execute'")
        return request[exec_key], exec_key == "exec-oob"

    def _find(self, name: str) -> Command:
        command = self.registry.get(name)
        if command is None or (not self.negotiated and name != NEGOTIATION_COMMAND):
            raise QmpError(f"The command {name} has not been found", COMMAND_NOT_FOUND)
        return command

    @staticmethod
    def _error(error: QmpError, request_id: Any, before_negotiation: bool) -> bytes:
        if before_negotiation and error.error_class == COMMAND_NOT_FOUND:
            # monitor_qmp_dispatch(): "Provide a more useful error message".
            error = QmpError(_EXPECTING_NEGOTIATION, COMMAND_NOT_FOUND)
        return error_message(error, request_id)

    def returned(self, call: Call, value: Any) -> bytes:
        """The reply to ``call`` whose handler returned ``value`` (None: ``{}``).

        Raises TypeError when ``value`` is not made of JSON types."""
        message: dict[str, Any] = {"return": {} if value is None else value}
        if call.request_id is not _NO_ID:
            message["id"] = call.request_id
        return encode_message(message)

    def failed(self, call: Call, error: QmpError) -> bytes:
        """The reply to ``call`` whose handler raised ``error``."""
        return self._error(error, call.request_id, call.before_negotiation)

    def negotiate(self, enable: list[str]) -> None:
        """qmp_capabilities: complete negotiation with the ``enable``d capabilities.

        Raises QmpError (CommandNotFound) once negotiation is complete, and for a
        capability not offered."""
        if self.negotiated:
            raise QmpError("Capabilities negotiation is already complete, command ignored", COMMAND_NOT_FOUND)
        unavailable = [capability for capability in enable if capability not in OFFERED_CAPABILITIES]
        if unavailable:
            raise QmpError(f"Capability {', '.join(unavailable)} not available")
        self.oob_enabled = "oob" in enable
        self.negotiated = True


@dataclass(frozen=True)
class CommandContext:
    """What a handler gets besides its arguments (the monitor builds it, on the loop's thread)."""

    #: The calling client's session.
    session: QmpSession
    #: The calling client's name in logs (``qmp#N``).
    client: str
    #: What the monitor controls (pynbd's NbdServer).
    server: Any
    #: ``emit_event(name, data)``: send an event to every negotiated client.
    emit_event: Callable[[str, dict[str, Any] | None], None]
    #: Begin the server's clean stop (what SIGTERM does).
    request_stop: Callable[[], None]
