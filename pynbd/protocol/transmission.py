"""Transmission phase, pure parts: request validation and block-status descriptors.

The I/O layer reads a 28-byte header, unpacks it with :class:`wire.Request`,
reads a WRITE payload when there is one (always, before rejecting, so the
stream stays in step: NBD spec "Request message"), then asks
:meth:`TransmissionState.validate` whether to serve it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pynbd.protocol.constants import (
    CMD_BLOCK_STATUS,
    CMD_WRITE,
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
from pynbd.protocol.wire import Request
from pynbd.runlength import Runs, clipped, first_group, normalize, split_long

#: Flags each command accepts (§0 command flags table); anything else is EINVAL.
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

#: Commands that change the image: EPERM on a read-only export (§3.4 step 5).
WRITING_COMMANDS = frozenset({Command.WRITE, Command.TRIM, Command.WRITE_ZEROES})
#: Commands whose range past EOF means "no space" rather than "invalid" (§3.4 step 6).
ENOSPC_COMMANDS = frozenset({Command.WRITE, Command.WRITE_ZEROES})
#: Commands whose length is payload, capped at MAX_PAYLOAD (§3.4 step 3).
PAYLOAD_COMMANDS = frozenset({Command.READ, Command.WRITE})
#: Commands without a range to check against the export size (§3.4 step 6).
UNRANGED_COMMANDS = frozenset({Command.FLUSH, Command.DISC})
#: Commands gated by a transmission flag (§0 commands table).
GATING_FLAG: dict[int, int] = {
    Command.FLUSH: int(TransmissionFlag.SEND_FLUSH),
    Command.TRIM: int(TransmissionFlag.SEND_TRIM),
    Command.CACHE: int(TransmissionFlag.SEND_CACHE),
    Command.WRITE_ZEROES: int(TransmissionFlag.SEND_WRITE_ZEROES),
}

#: Largest descriptor length in compact mode, kept 512-aligned.
MAX_DESCRIPTOR_LENGTH = 0xFFFFFE00


class RequestError(Exception):
    """A request the server answers with an error value (the connection stays)."""

    def __init__(self, error: Error, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


class ProtocolViolation(Exception):
    """A request after which the stream cannot be trusted: hard disconnect (§3.4 step 1)."""


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

    @staticmethod
    def check_magic(request: Request) -> None:
        if request.magic != REQUEST_MAGIC:
            raise ProtocolViolation(f"bad request magic {request.magic:#x}")

    @staticmethod
    def write_payload_length(request: Request) -> int:
        """Bytes of payload that follow this header on the wire (WRITE only in compact mode)."""
        return request.length if request.type == CMD_WRITE else 0

    def validate(self, request: Request) -> None:
        """Raise RequestError if the request must be refused (§3.4, in its order)."""
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


def build_descriptors(runs: Runs, length: int, req_one: bool, max_count: int = MAX_EXTENTS_PER_CHUNK) -> Runs:
    """Turn ``(length, status)`` runs from the request offset into descriptors.

    Clips at the request end so no descriptor runs past what was asked,
    merges equal neighbours (§5.3 item 6), keeps each length within compact
    mode's u32, honours REQ_ONE (one descriptor, §5.3 item 4), and stops at
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
