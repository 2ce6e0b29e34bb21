"""Transmission phase, pure parts: the events a client's requests become, request
validation (:meth:`TransmissionState.validate`, NBD spec "Request types"), and
block-status descriptors. The receiver that makes the events from bytes is
:mod:`pynbd.protocol.receiver`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pynbd.protocol.constants import (
    CMD_BLOCK_STATUS,
    MAX_EXTENTS_PER_CHUNK,
    FLAG_DF,
    FLAG_FAST_ZERO,
    MAX_PAYLOAD,
    REQUEST_MAGIC,
    TFLAG_READ_ONLY,
    TFLAG_SEND_DF,
    TFLAG_SEND_FAST_ZERO,
    Command,
    CommandFlag,
    Error,
    TransmissionFlag,
)
from pynbd.protocol.handshake import ExportDescription, HandshakeComplete
from pynbd.protocol import wire
from pynbd.runlength import Runs, clipped, first_group, normalize, split_long

#: Flags each command accepts (NBD spec "Command flags"); anything else is EINVAL.
#: Plain ints: ``~`` of an IntFlag only complements the defined bits.
ALLOWED_FLAGS: dict[int, int] = {
    Command.READ: int(CommandFlag.FUA | CommandFlag.DF),
    Command.WRITE: int(CommandFlag.FUA),
    Command.DISC: 0xFFFF,  # qemu ignores flags on DISC
    Command.FLUSH: int(CommandFlag.FUA),
    Command.TRIM: int(CommandFlag.FUA),
    Command.CACHE: int(CommandFlag.FUA),
    Command.WRITE_ZEROES: int(CommandFlag.FUA | CommandFlag.NO_HOLE | CommandFlag.FAST_ZERO),
    Command.BLOCK_STATUS: int(CommandFlag.FUA | CommandFlag.REQ_ONE),
}

#: Commands that change the image: EPERM on a read-only export (NBD spec "Error values").
WRITING_COMMANDS = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})
#: Commands whose range past EOF means "no space" rather than "invalid" (NBD spec
#: "Error values"; NBD_CMD_WRITE_ZEROES in "Request types").
ENOSPC_COMMANDS = frozenset({Command.WRITE, Command.WRITE_ZEROES})
#: Commands whose length is payload, capped at MAX_PAYLOAD (NBD spec "Size constraints").
PAYLOAD_COMMANDS = frozenset({Command.READ, Command.WRITE})
#: Commands without a range to check against the export size (NBD spec "Request types").
UNRANGED_COMMANDS = frozenset({Command.FLUSH, Command.DISC})
#: Commands gated by a transmission flag (NBD spec "Transmission flags").
GATING_FLAG: dict[int, int] = {
    Command.FLUSH: int(TransmissionFlag.SEND_FLUSH),
    Command.TRIM: int(TransmissionFlag.SEND_TRIM),
    Command.CACHE: int(TransmissionFlag.SEND_CACHE),
    Command.WRITE_ZEROES: int(TransmissionFlag.SEND_WRITE_ZEROES),
}

#: Largest descriptor length in compact mode, kept 512-aligned.
MAX_DESCRIPTOR_LENGTH = 0xFFFFFE00

SHUTDOWN_MESSAGE = "server is shutting down"

_KNOWN_FLAGS = int(sum(CommandFlag))


class RequestError(Exception):
    """A request the server answers with an error value (the connection stays)."""

    def __init__(self, error: Error, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


# --- events ---------------------------------------------------------------------------


class NeedData:
    """No whole event is buffered: receive more (the only instance is :data:`NEED_DATA`)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = NeedData()


@dataclass(slots=True)
class Request:
    """A request to serve (NBD spec "Request message", compact mode).

    ``payload`` is a WRITE's data, exactly ``length`` bytes, owned by the
    caller once the event is returned; None for other commands and for a
    WRITE of length 0.
    """

    type: int
    flags: int
    cookie: int
    offset: int
    length: int
    payload: bytearray | None = None

    def pack(self) -> bytes:
        """The 28-byte header of this request as a client sends it (no payload)."""
        return wire.REQUEST.pack(REQUEST_MAGIC, self.flags, self.type, self.cookie, self.offset, self.length)

    def __repr__(self) -> str:
        try:
            name = Command(self.type).name
        except ValueError:
            name = f"command {self.type}"
        names = [flag.name for flag in CommandFlag if self.flags & flag]
        if self.flags & ~_KNOWN_FLAGS:
            names.append(f"{self.flags & ~_KNOWN_FLAGS:#x}")
        flags = "|".join(names) if names else "0"
        return f"{name} offset={self.offset} length={self.length} flags={flags} cookie={self.cookie:#x}"


@dataclass(frozen=True, slots=True)
class Rejected:
    """A request to answer with ``error`` (and ``message``); the connection stays.
    ``request.payload`` is None: a refused WRITE's payload was skipped."""

    request: Request
    error: Error
    message: str


@dataclass(frozen=True, slots=True)
class Disconnect:
    """The client sent NBD_CMD_DISC (NBD spec "Terminating the transmission phase"):
    answer the requests received before it, then close. Nothing after it is parsed."""


DISCONNECT = Disconnect()


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The stream cannot be trusted (a bad request magic): close at once without a
    reply (a hard disconnect, NBD spec "Terminating the transmission phase")."""

    reason: str


Event = Request | Rejected | Disconnect | ProtocolViolation | NeedData


@dataclass(slots=True)
class TransmissionState:
    """What one connection negotiated, and the rules that follow from it."""

    export: ExportDescription
    structured: bool
    contexts: Mapping[int, str]
    flags: int

    @classmethod
    def from_handshake(cls, done: HandshakeComplete) -> "TransmissionState":
        return cls(export=done.export, structured=done.structured, contexts=done.contexts, flags=done.flags)

    def validate(self, request: Request | wire.Request) -> None:
        """Raise RequestError if the request must be refused.

        Checks, in this order: known command, payload length (NBD spec "Size
        constraints"), read-only export, range within the export ("Error
        values": ENOSPC for writes, else EINVAL), flags valid for the command
        ("Command flags"), flags and commands the negotiation allows
        ("Transmission flags"), and BLOCK_STATUS needing structured replies and
        a context (NBD_CMD_BLOCK_STATUS in "Request types"). Reads only type,
        flags, offset and length (a :class:`pynbd.protocol.wire.Request` fits
        too). Pure: safe from any thread.
        """
        command = request.type
        if command not in ALLOWED_FLAGS:
            raise RequestError(Error.EINVAL, f"unsupported command {command}")
        if command in PAYLOAD_COMMANDS and request.length > MAX_PAYLOAD:
            raise RequestError(Error.EINVAL, f"request length {request.length} exceeds the maximum "
                                             f"payload {MAX_PAYLOAD}")
        if command in WRITING_COMMANDS and self.flags & TFLAG_READ_ONLY:
            raise RequestError(Error.EPERM, "export is read-only")
        size = self.export.size
        if command not in UNRANGED_COMMANDS:
            if request.offset > size or request.length > size - request.offset:
                error = Error.ENOSPC if command in ENOSPC_COMMANDS else Error.EINVAL
                raise RequestError(error, f"operation past EOF; From: {request.offset}, "
                                          f"Len: {request.length}, Size: {size}")
        bad_flags = request.flags & ~ALLOWED_FLAGS[command]
        if bad_flags:
            raise RequestError(Error.EINVAL, f"invalid flags {bad_flags:#x} for command {Command(command).name}")
        if request.flags & FLAG_DF and not self.flags & TFLAG_SEND_DF:
            raise RequestError(Error.EINVAL, "DF flag needs structured replies")
        if request.flags & FLAG_FAST_ZERO and not self.flags & TFLAG_SEND_FAST_ZERO:
            raise RequestError(Error.EINVAL, "FAST_ZERO flag not negotiated")
        gate = GATING_FLAG.get(command)
        if gate is not None and not self.flags & gate:
            raise RequestError(Error.EINVAL, f"command {Command(command).name} not negotiated")
        if command == CMD_BLOCK_STATUS:
            if not self.structured or not self.contexts:
                raise RequestError(Error.EINVAL, "CMD_BLOCK_STATUS not negotiated")
            if request.length == 0:
                raise RequestError(Error.EINVAL, "need non-zero length")


# Receiver modes: where the next received bytes go, and what next_event() does.
def build_descriptors(runs: Runs, length: int, req_one: bool, max_count: int = MAX_EXTENTS_PER_CHUNK) -> Runs:
    """Turn ``(length, status)`` runs from the request offset into descriptors.

    Clips at the request end so no descriptor runs past what was asked,
    merges equal neighbours (NBD_CMD_BLOCK_STATUS in NBD spec "Request types":
    different statuses between neighbours), keeps each length within compact
    mode's u32, honours REQ_ONE (one descriptor), and stops at
    ``max_count`` descriptors (a shorter answer is allowed; clients re-query).
    The result is never empty when ``length`` > 0 and the runs cover at
    least one byte. Every step is a C-level loop (:mod:`pynbd.runlength`).
    """
    if req_one:
        runs = first_group(runs)  # no need to look past the first change of status
    runs = normalize(clipped(runs, length))
    if length > MAX_DESCRIPTOR_LENGTH:  # else no run can be longer than a descriptor
        runs = split_long(runs, MAX_DESCRIPTOR_LENGTH)
    return runs.head(1 if req_one else max_count)
