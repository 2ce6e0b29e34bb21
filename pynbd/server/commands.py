"""The command handlers (NBD spec "Request types"), one per command, and the table
the engine dispatches with. A handler's :class:`Kind` says where it runs:

- IMMEDIATE (BLOCK_STATUS, CACHE): a function on the event loop returning its
  encoded reply, which the engine sends (from a reader callback or the task);
- IN_ORDER (READ): a coroutine run by the connection's task, in request order;
- IN_THREAD (WRITE, WRITE_ZEROES, TRIM, FLUSH): a task of its own whose blocking
  call goes to a worker thread; replies may go out of order. A handler's ``now``
  (WRITE) first tries to serve the request on the spot, as IMMEDIATE does, when it
  can without waiting (no lock another thread holds, no I/O but the write itself):
  no task, and its reply is batched with the others of the same burst.

Handlers raise :class:`~pynbd.image.base.ImageError` or ``OSError``; the engine
answers with :func:`nbd_error_for`.
"""

from __future__ import annotations

import asyncio
import enum
import errno
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pynbd.image.base import FastZeroUnsupported, Image, ImageIOError
from pynbd.protocol.constants import FLAG_DF, FLAG_FAST_ZERO, FLAG_FUA, FLAG_NO_HOLE, Command, Error
from pynbd.protocol.transmission import Request
from pynbd.runlength import Buffer
from pynbd.server.stats import IO_FLUSH, IO_READ, IO_UNMAP, IO_WRITE, counted, counted_now

if TYPE_CHECKING:
    from pynbd.server.connection import Connection
    from pynbd.server.exports import Export

#: Host errno -> NBD error, the table qemu uses (NBD spec "Error values").
ERRNO_TO_NBD: dict[int, Error] = {
    errno.EPERM: Error.EPERM,
    errno.EROFS: Error.EPERM,
    errno.EIO: Error.EIO,
    errno.ENOMEM: Error.ENOMEM,
    errno.ENOSPC: Error.ENOSPC,
    errno.EDQUOT: Error.ENOSPC,
    errno.EFBIG: Error.ENOSPC,
    errno.EOVERFLOW: Error.EOVERFLOW,
    errno.ENOTSUP: Error.ENOTSUP,
    errno.ESHUTDOWN: Error.ESHUTDOWN,
}


def nbd_error_for(exc: BaseException) -> Error:
    """The NBD error a failed handler answers with."""
    if isinstance(exc, FastZeroUnsupported):
        return Error.ENOTSUP
    if isinstance(exc, ImageIOError):
        return ERRNO_TO_NBD.get(exc.errno or errno.EIO, Error.EIO)
    if isinstance(exc, OSError) and exc.errno is not None:
        return ERRNO_TO_NBD.get(exc.errno, Error.EINVAL)
    return Error.EIO


class Kind(enum.Enum):
    """Where a handler runs and how its reply goes (see the module doc)."""

    IMMEDIATE = "immediate"
    IN_ORDER = "in order"
    IN_THREAD = "in a thread"


@dataclass(frozen=True, slots=True)
class Handler:
    kind: Kind
    #: IMMEDIATE: ``(conn, request) -> reply buffers``; else ``async (conn, request) -> None``
    #: that sends its own reply.
    run: Callable[..., Any]
    #: IN_THREAD: ``(conn, request) -> reply buffers`` when it served the request on the
    #: event loop, or None, having done nothing: then ``run`` serves it.
    now: Callable[..., list[Buffer] | None] | None = None


async def in_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking image call in the default executor's worker threads."""
    return await asyncio.get_running_loop().run_in_executor(None, fn, *args)


async def changing(image: Image, offset: int, length: int, fn: Callable[..., Any], *args: Any) -> Any:
    """Run a change to ``[offset, offset+length)`` of ``image``, ``fn(*args)``, in a worker thread.

    The image's change feed announces the range when the change begins and again
    when it has ended, both on the event loop thread: whatever a cache derived from
    the range while the change ran in a thread is dropped at its end.
    """
    image.changes.announce(offset, length)
    try:
        return await in_thread(fn, *args)
    finally:
        image.changes.announce(offset, length)


# -- immediate ---------------------------------------------------------------------------

def block_status(conn: Connection, request: Request) -> list[Buffer]:
    assert conn.block_status is not None  # (validation refuses BLOCK_STATUS without contexts)
    return conn.block_status.reply(request)


def cache(conn: Connection, request: Request) -> list[Buffer]:
    if request.length:
        conn.export.image.cache(request.offset, request.length)
    return [conn.writer.ok_reply(request.cookie)]


# -- in order ------------------------------------------------------------------------------

async def read(conn: Connection, request: Request) -> None:
    image = conn.export.image
    if request.flags & FLAG_FUA:
        await in_thread(image.flush)  # as qemu: FUA on READ flushes first
    segments = image.read_segments(request.offset, request.length) if request.length else ()
    # The host ranges stay leased until sent: a cluster freed meanwhile is not reused.
    with image.leases.lease(segments):
        await conn.writer.read(request.cookie, request.offset, segments, request.length,
                               bool(request.flags & FLAG_DF))


# -- in a thread ------------------------------------------------------------------------------

async def _then_flush(conn: Connection, request: Request) -> None:
    """FUA: the change is durable before the reply (NBD spec "NBD_CMD_FLAG_FUA")."""
    if request.flags & FLAG_FUA:
        await in_thread(conn.export.image.flush)


def _written_now(export: Export, request: Request) -> bool:
    """The WRITE done inline if it can be (True), or nothing (False); see InlineWhileFast.

    Nothing else runs on the event loop meanwhile, so one announcement after the
    change, failed or not, is all the change feed needs."""
    image = export.image
    try:
        done = export.writes.try_now(image.write_now, request.offset, request.payload)
    except BaseException:
        image.changes.announce(request.offset, request.length)
        raise
    if done:
        image.changes.announce(request.offset, request.length)
    return done


def write_now(conn: Connection, request: Request) -> list[Buffer] | None:
    # FUA waits for a flush in a thread: the task's way.
    if not request.length or request.flags & FLAG_FUA or not _written_now(conn.export, request):
        return None
    return [conn.writer.ok_reply(request.cookie)]


async def write(conn: Connection, request: Request) -> None:
    export = conn.export
    image = export.image
    if request.length:
        # (Only a FUA write has not been tried inline already: write_now leaves it here.)
        if not (request.flags & FLAG_FUA and _written_now(export, request)):
            await changing(image, request.offset, request.length, image.write, request.offset,
                           request.payload)
        await _then_flush(conn, request)
    await conn.writer.ok(request.cookie)


async def write_zeroes(conn: Connection, request: Request) -> None:
    image = conn.export.image
    if request.length:
        may_trim = not request.flags & FLAG_NO_HOLE
        fast = bool(request.flags & FLAG_FAST_ZERO)
        await changing(image, request.offset, request.length, image.write_zeroes,
                       request.offset, request.length, may_trim, fast)
        await _then_flush(conn, request)
    await conn.writer.ok(request.cookie)


async def trim(conn: Connection, request: Request) -> None:
    image = conn.export.image
    if request.length:
        await changing(image, request.offset, request.length, image.trim,
                       request.offset, request.length)
        await _then_flush(conn, request)
    await conn.writer.ok(request.cookie)


async def flush(conn: Connection, request: Request) -> None:
    await in_thread(conn.export.image.flush)
    await conn.writer.ok(request.cookie)


#: Command -> its handler. DISC never reaches a handler (the receiver's Disconnect event).
#: The commands QEMU accounts are counted in the export's I/O statistics (pynbd.server.stats).
HANDLERS: dict[int, Handler] = {
    Command.BLOCK_STATUS: Handler(Kind.IMMEDIATE, block_status),
    Command.CACHE: Handler(Kind.IMMEDIATE, cache),
    Command.READ: Handler(Kind.IN_ORDER, counted(IO_READ, read)),
    Command.WRITE: Handler(Kind.IN_THREAD, counted(IO_WRITE, write), counted_now(IO_WRITE, write_now)),
    Command.WRITE_ZEROES: Handler(Kind.IN_THREAD, counted(IO_WRITE, write_zeroes)),
    Command.TRIM: Handler(Kind.IN_THREAD, counted(IO_UNMAP, trim)),
    Command.FLUSH: Handler(Kind.IN_THREAD, counted(IO_FLUSH, flush)),
}
