"""The reply writer: the one place that puts transmission replies on a channel.

Every reply (header plus payload) goes out under one lock so replies never
interleave (NBD spec "Structured replies"). READ data leaves either through sendfile
(zero-copy: header with MSG_MORE, then ``os.sendfile`` from the image's host
file) or through a copy into one buffer; which one is a per-connection
setting, and both sit behind :meth:`ReplyWriter.read`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence

from pynbd.image.base import BytesSegment, HostSegment, ReadSegment, ZeroSegment
from pynbd.protocol import wire
from pynbd.protocol.constants import Error
from pynbd.runlength import Buffer
from pynbd.server.channel import Channel, skip_bytes

log = logging.getLogger(__name__)

_ZEROS = memoryview(bytes(1024 * 1024))
#: Most bytes of replies held back while batching.
BATCH_LIMIT = 256 * 1024


def group_chunks(segments: Sequence[ReadSegment], df: bool) -> list[tuple[bool, int, list[ReadSegment]]]:
    """Group read segments into ``(is_hole, length, segments)`` chunks.

    Neighbouring data segments share one OFFSET_DATA chunk; zero segments
    become OFFSET_HOLE chunks unless DF asks for a single data chunk (NBD spec "NBD_CMD_FLAG_DF").
    """
    chunks: list[tuple[bool, int, list[ReadSegment]]] = []
    for seg in segments:
        if seg.length == 0:
            continue
        hole = isinstance(seg, ZeroSegment) and not df
        if chunks and chunks[-1][0] == hole:
            prev_hole, prev_len, prev_segs = chunks[-1]
            prev_segs.append(seg)
            chunks[-1] = (prev_hole, prev_len + seg.length, prev_segs)
        else:
            chunks.append((hole, seg.length, [seg]))
    return chunks


def plan_chunks(segments: Sequence[ReadSegment], offset: int,
                df: bool) -> list[tuple[int, int, bool, bool, list[ReadSegment]]]:
    """The chunks of a structured READ reply: ``(guest_offset, length, done, is_hole, segments)``."""
    chunks = group_chunks(segments, df)
    plan = []
    pos = offset
    last = len(chunks) - 1
    for index, (hole, size, segs) in enumerate(chunks):
        plan.append((pos, size, index == last, hole, segs))
        pos += size
    return plan


def copy_segments(segments: Sequence[ReadSegment], out: memoryview) -> None:
    """Fill ``out`` from segments (the copy path). ``out`` must be zero-filled already."""
    pos = 0
    for seg in segments:
        n = seg.length
        if isinstance(seg, HostSegment):
            os.preadv(seg.fd, [out[pos:pos + n]], seg.host_offset)  # short = zeros past EOF
        elif isinstance(seg, BytesSegment):
            out[pos:pos + n] = seg.data
        pos += n


#: Under ``--zero-copy auto``, READs at least this long go by sendfile, shorter
#: ones by one pread and one send: small reads are faster copied, large ones by
#: sendfile, and from this size on sendfile was never slower (bench/README.md).
AUTO_ZERO_COPY_MIN = 16 * 1024
#: A length no READ reaches: never sendfile.
_NEVER = 1 << 64


class ReplyWriter:
    def __init__(self, channel: Channel, structured: bool, zero_copy: bool | None) -> None:
        """``zero_copy``: True sendfile, False copy, None (auto) by the size of each READ."""
        self.channel = channel
        self.structured = structured
        #: "on", "off" or "auto", for the connection's closing log line.
        self.zero_copy_mode = "auto" if zero_copy is None else "on" if zero_copy else "off"
        if not channel.supports_sendfile or zero_copy is False:
            self.zero_copy_min = _NEVER
        else:
            self.zero_copy_min = 0 if zero_copy else AUTO_ZERO_COPY_MIN
        self.lock = asyncio.Lock()
        #: READ payload bytes sent by os.sendfile and by copying (shown when the connection ends).
        self.sendfile_bytes = 0
        self.copied_bytes = 0
        #: While True, small replies are held back and sent together by flush():
        #: the reader sets it when more requests are already buffered, so a burst
        #: of pipelined small reads costs one send instead of one per reply.
        self.batching = False
        self._pending: list[Buffer] = []
        self._pending_size = 0
        #: The task finishing a reply for finish_later() (kept referenced).
        self._finishing: asyncio.Task[None] | None = None

    @property
    def pending(self) -> bool:
        """Replies are held back (batching) and flush() would send them."""
        return bool(self._pending)

    def send_nowait(self, parts: Sequence[Buffer], size: int) -> list[Buffer] | None:
        """Send a reply now when no other reply is in progress or held back: None when
        all of it went out, else what is left (all of it when it had to wait).

        Most replies fit the socket buffer, and the lock and the channel's
        coroutines cost more than the send.
        """
        if self._pending or self.lock.locked():
            return list(parts)
        sent = self.channel.send_nowait(parts)
        return None if sent == size else skip_bytes(parts, sent)

    def finish_later(self, rest: Sequence[Buffer]) -> None:
        """The rest of a reply send_nowait() could not finish, from code that cannot
        await: it goes out before any other reply, from a task of its own."""
        self._pending[:0] = rest
        self._pending_size += sum(map(len, rest))
        self._finishing = asyncio.get_running_loop().create_task(self._flush_or_close())

    async def _flush_or_close(self) -> None:
        try:
            await self.flush()
        except ConnectionError:
            self.channel.close()  # the reader notices and ends the connection

    def _hold(self, parts: Sequence[Buffer], size: int) -> bool:
        """Hold a reply back while batching (True), or say it must go now (False)."""
        if self.batching and self._pending_size + size <= BATCH_LIMIT:
            self._pending += parts
            self._pending_size += size
            return True
        return False

    async def _send(self, data: Buffer) -> None:
        await self._send_parts((data,), len(data))

    async def _send_parts(self, parts: Sequence[Buffer], size: int) -> None:
        if self._hold(parts, size):
            return
        rest = self.send_nowait(parts, size)
        if rest is not None:
            # What send_nowait() left, after the replies held back, under the lock.
            async with self.lock:
                if self._pending:
                    await self._send_pending()
                await self.channel.sendall_parts(rest)

    async def flush(self) -> None:
        """Send replies held back while batching (before the reader waits for input)."""
        if self._pending:
            async with self.lock:
                await self._send_pending()

    async def _send_pending(self) -> None:
        # Called with the lock held.
        pending, self._pending, self._pending_size = self._pending, [], 0
        if pending:
            await self.channel.sendall(pending[0] if len(pending) == 1 else b"".join(pending))

    # -- replies without data --

    @staticmethod
    def ok_reply(cookie: int) -> bytes:
        """A success without payload: a simple reply, as qemu sends even in structured mode."""
        return wire.simple_reply(cookie)

    def error_reply(self, cookie: int, error: int, message: str) -> bytes:
        """An error: a chunk with the message in structured mode, else a simple reply."""
        if self.structured:
            return wire.chunk_error(cookie, error, message)
        return wire.simple_reply(cookie, error)

    async def ok(self, cookie: int) -> None:
        await self._send(wire.simple_reply(cookie))

    async def error(self, cookie: int, error: int, message: str) -> None:
        await self._send(self.error_reply(cookie, error, message))

    async def chunks(self, parts: Sequence[Buffer]) -> None:
        """Pre-encoded structured chunks of one reply (block status), as buffers."""
        await self._send_parts(parts, sum(map(len, parts)))

    # -- READ --

    async def read(self, cookie: int, offset: int, segments: Sequence[ReadSegment], length: int,
                   df: bool) -> None:
        """Send a successful READ reply for ``segments`` covering ``length`` bytes from ``offset``."""
        if self.structured:
            await self._read_structured(cookie, offset, segments, length, df)
        else:
            await self._read_simple(cookie, segments, length)

    async def _read_simple(self, cookie: int, segments: Sequence[ReadSegment], length: int) -> None:
        header = wire.simple_reply(cookie)
        if length and length >= self.zero_copy_min:
            ops: list[_Op] = [header]
            _segment_ops(segments, ops)
            async with self.lock:
                await self._send_pending()
                # An I/O error after the header went out cannot be expressed in a
                # simple reply: the exception ends the connection (NBD spec "Simple reply message").
                await self._run_ops(ops)
            return
        buf = bytearray(len(header) + length)
        buf[:len(header)] = header
        copy_segments(segments, memoryview(buf)[len(header):])
        self.copied_bytes += length
        await self._send(buf)

    async def _read_structured(self, cookie: int, offset: int, segments: Sequence[ReadSegment],
                               length: int, df: bool) -> None:
        if length == 0:
            await self._send(wire.chunk_none(cookie))
            return
        chunks = plan_chunks(segments, offset, df)
        if length >= self.zero_copy_min:
            ops: list[_Op] = []
            for pos, size, done, hole, segs in chunks:
                if hole:
                    ops.append(wire.chunk_offset_hole(cookie, pos, size, done))
                else:
                    ops.append(wire.chunk_offset_data_header(cookie, pos, size, done))
                    _segment_ops(segs, ops)
            async with self.lock:
                await self._send_pending()
                try:
                    await self._run_ops(ops)
                except _OpFailed as exc:
                    # The data chunk in progress was padded with zeros; the
                    # spec-blessed recovery is an error chunk after it (NBD spec "Structured reply chunk message").
                    # If it was not the last chunk, later chunks were not sent, so
                    # a plain ERROR invalidates the whole read.
                    await self.channel.sendall(wire.chunk_error(
                        cookie, Error.EIO, f"read failed: {exc.cause}", done=True))
            return
        # Copy path: encode every chunk into one buffer, then one send.
        parts: list[bytes | bytearray] = []
        for pos, size, done, hole, segs in chunks:
            if hole:
                parts.append(wire.chunk_offset_hole(cookie, pos, size, done))
            else:
                header = wire.chunk_offset_data_header(cookie, pos, size, done)
                buf = bytearray(len(header) + size)
                buf[:len(header)] = header
                copy_segments(segs, memoryview(buf)[len(header):])
                self.copied_bytes += size
                parts.append(buf)
        await self._send(parts[0] if len(parts) == 1 else b"".join(parts))

    async def _run_ops(self, ops: Sequence["_Op"]) -> None:
        """Send ops in order with the lock held: bytes corked (MSG_MORE) until the last op.

        If sendfile fails, the rest of that file range is padded with zeros so
        the chunk stays well-formed, and _OpFailed is raised.
        """
        channel = self.channel
        last = len(ops) - 1
        for index, op in enumerate(ops):
            if isinstance(op, tuple):
                fd, host_offset, count = op
                try:
                    sent = await channel.sendfile(fd, host_offset, count)
                    self.sendfile_bytes += sent
                except OSError as exc:
                    log.error("sendfile from fd %d at %d failed: %s", fd, host_offset, exc)
                    await self._send_zeros(count, more=index < last)
                    raise _OpFailed(exc) from exc
                if sent < count:
                    # Host file ended early: like pread, the rest reads as zeros.
                    await self._send_zeros(count - sent, more=index < last)
            elif index < last:
                await channel.sendall_more(op)
            else:
                await channel.sendall(op)

    async def _send_zeros(self, n: int, more: bool) -> None:
        while n:
            take = min(n, len(_ZEROS))
            n -= take
            if more or n:
                await self.channel.sendall_more(_ZEROS[:take])
            else:
                await self.channel.sendall(_ZEROS[:take])


#: One step of a zero-copy reply: bytes to send, or (fd, host_offset, count) to sendfile.
_Op = bytes | memoryview | tuple[int, int, int]


class _OpFailed(Exception):
    def __init__(self, cause: OSError) -> None:
        super().__init__(str(cause))
        self.cause = cause


def _segment_ops(segments: Sequence[ReadSegment], ops: list[_Op]) -> None:
    for seg in segments:
        if isinstance(seg, HostSegment):
            ops.append((seg.fd, seg.host_offset, seg.length))
        elif isinstance(seg, BytesSegment):
            ops.append(seg.data)
        else:
            n = seg.length
            while n:
                take = min(n, len(_ZEROS))
                ops.append(_ZEROS[:take])
                n -= take
