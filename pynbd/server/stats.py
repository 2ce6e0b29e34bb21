"""I/O counters of an export, and the ``query-blockstats`` answers built from them.

QEMU keeps these counters per BlockBackend (block/accounting.c) and
qemu-storage-daemon 7.2 never fills them for NBD traffic: its NBD server does not
account requests, and its exports' backends are anonymous, so ``query-blockstats``
answers ``[]`` and, with ``query-nodes``, zeros (only ``wr_highest_offset``, which
the block layer keeps per node, moves). pynbd counts every NBD request an export
serves, with QEMU's rules, and reports the counters at the export's format node.

The rules, as block/accounting.c has them (``account_invalid`` and
``account_failed`` both on):

- a request that completes adds its bytes and one operation of its kind (READ ->
  ``rd``; WRITE and WRITE_ZEROES -> ``wr``, as QEMU counts write-zeroes as writes;
  TRIM -> ``unmap``; FLUSH -> ``flush``) and its time to ``*_total_time_ns``;
- a request whose I/O fails (answered with an NBD error) adds one ``failed_*``
  operation and its time, no bytes;
- a request refused by validation before any I/O adds one ``invalid_*`` operation
  and no time (:meth:`IoStats.invalid_command`, for the connection engine to call
  with each refused request; ESHUTDOWN refusals are not invalid);
- each of the three is an access: ``idle_time_ns`` is the time since the last one
  (absent before the first);
- ``wr_highest_offset`` is the end of the highest WRITE or WRITE_ZEROES that reached
  the image, failed or not (QEMU's block/io.c raises it when a write request
  finishes, whatever its result); TRIM does not raise it.

A request's time runs from when its handler starts to when it has sent its reply
(QEMU stops the clock when the I/O completes, before the reply): for a READ sent
with sendfile the I/O and the reply are one thing. Nothing is merged (``*_merged``
are 0) and no interval statistics are kept (``timed_stats`` is ``[]``).

Everything here runs on the event loop thread: the counters are plain integers.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from pynbd.image.base import ImageError
from pynbd.protocol.constants import Command

if TYPE_CHECKING:
    from pynbd.protocol.transmission import Request
    from pynbd.runlength import Buffer
    from pynbd.server.connection import Connection

# The kinds of accounted I/O (QEMU's BlockAcctType), indexes into the counter lists.
IO_READ = 0
IO_WRITE = 1
IO_UNMAP = 2
IO_FLUSH = 3

#: NBD command -> the kind of I/O it is accounted as; other commands are not accounted.
KIND_OF_COMMAND: dict[int, int] = {
    Command.READ: IO_READ,
    Command.WRITE: IO_WRITE,
    Command.WRITE_ZEROES: IO_WRITE,
    Command.TRIM: IO_UNMAP,
    Command.FLUSH: IO_FLUSH,
}

#: The driver-specific statistics of QEMU's file driver (BlockStatsSpecificFile): host
#: discards pynbd does not count; reported as QEMU reports them for NBD traffic.
FILE_DRIVER_STATS = {"driver": "file", "discard-nb-ok": 0, "discard-nb-failed": 0, "discard-bytes-ok": 0}


class IoStats:
    """The I/O counters of one export (what BlockDeviceStats holds); see the module doc.

    ``clock`` gives monotonic nanoseconds (tests pass their own). Event loop thread only.
    """

    __slots__ = ("clock", "bytes", "operations", "failed", "invalid", "total_time_ns",
                 "wr_highest_offset", "last_access_ns")

    def __init__(self, clock: Callable[[], int] = time.perf_counter_ns) -> None:
        self.clock = clock
        #: Per kind (IO_READ ... IO_FLUSH).
        self.bytes = [0, 0, 0, 0]
        self.operations = [0, 0, 0, 0]
        self.failed = [0, 0, 0, 0]
        self.invalid = [0, 0, 0, 0]
        self.total_time_ns = [0, 0, 0, 0]
        self.wr_highest_offset = 0
        #: Clock reading of the last access; None before the first.
        self.last_access_ns: int | None = None

    def done(self, kind: int, offset: int, length: int, start_ns: int) -> None:
        """A request of ``kind`` over ``[offset, offset+length)`` that began at
        ``start_ns`` (a :attr:`clock` reading) completed."""
        self.bytes[kind] += length
        self.operations[kind] += 1
        self._finished(kind, offset, length, start_ns)

    def fail(self, kind: int, offset: int, length: int, start_ns: int) -> None:
        """As :meth:`done`, for a request whose I/O failed: no bytes are counted."""
        self.failed[kind] += 1
        self._finished(kind, offset, length, start_ns)

    def _finished(self, kind: int, offset: int, length: int, start_ns: int) -> None:
        now = self.clock()
        self.total_time_ns[kind] += now - start_ns
        self.last_access_ns = now
        end = offset + length
        if kind == IO_WRITE and length and end > self.wr_highest_offset:
            self.wr_highest_offset = end

    def invalid_command(self, command: int) -> None:
        """An NBD request of ``command`` was refused by validation, before any I/O (a
        command that is not accounted, such as BLOCK_STATUS, counts nothing).

        Requests refused because the server is stopping (ESHUTDOWN) are not invalid
        and must not be passed here.
        """
        kind = KIND_OF_COMMAND.get(command)
        if kind is not None:
            self.invalid[kind] += 1
            self.last_access_ns = self.clock()

    def block_device_stats(self) -> dict[str, Any]:
        """This export's BlockDeviceStats (QEMU's qapi/block-core.json), as the JSON
        object ``query-blockstats`` sends."""
        nbytes, ops, times = self.bytes, self.operations, self.total_time_ns
        failed, invalid = self.failed, self.invalid
        stats: dict[str, Any] = {
            "rd_bytes": nbytes[IO_READ], "wr_bytes": nbytes[IO_WRITE], "unmap_bytes": nbytes[IO_UNMAP],
            "rd_operations": ops[IO_READ], "wr_operations": ops[IO_WRITE],
            "flush_operations": ops[IO_FLUSH], "unmap_operations": ops[IO_UNMAP],
            "rd_total_time_ns": times[IO_READ], "wr_total_time_ns": times[IO_WRITE],
            "flush_total_time_ns": times[IO_FLUSH], "unmap_total_time_ns": times[IO_UNMAP],
            "wr_highest_offset": self.wr_highest_offset,
            "rd_merged": 0, "wr_merged": 0, "unmap_merged": 0,
        }
        if self.last_access_ns is not None:
            stats["idle_time_ns"] = self.clock() - self.last_access_ns
        stats.update({
            "failed_rd_operations": failed[IO_READ], "failed_wr_operations": failed[IO_WRITE],
            "failed_flush_operations": failed[IO_FLUSH], "failed_unmap_operations": failed[IO_UNMAP],
            "invalid_rd_operations": invalid[IO_READ], "invalid_wr_operations": invalid[IO_WRITE],
            "invalid_flush_operations": invalid[IO_FLUSH], "invalid_unmap_operations": invalid[IO_UNMAP],
            "account_invalid": True, "account_failed": True,
            "timed_stats": [],
        })
        return stats


def uncounted_device_stats() -> dict[str, Any]:
    """The BlockDeviceStats of a node pynbd does not count I/O for (file nodes, backing
    nodes): what qemu-storage-daemon 7.2 answers for a node with ``query-nodes``, zeros
    with ``account_invalid`` and ``account_failed`` false and no ``idle_time_ns``."""
    stats = IoStats().block_device_stats()
    stats["account_invalid"] = stats["account_failed"] = False
    return stats


# -- counting NBD requests ------------------------------------------------------------------

HandlerRun = Callable[["Connection", "Request"], Awaitable[None]]
HandlerNow = Callable[["Connection", "Request"], "list[Buffer] | None"]


def _count_raised(stats: IoStats, kind: int, request: Request, start: int, exc: OSError | ImageError) -> None:
    """A handler serving ``request`` raised ``exc``: the client went away after the I/O
    (ConnectionError, counted as done) or the I/O failed (the engine answers with an
    NBD error; counted as failed)."""
    count = stats.done if isinstance(exc, ConnectionError) else stats.fail
    count(kind, request.offset, request.length, start)


def counted(kind: int, run: HandlerRun) -> HandlerRun:
    """``run`` (an in-order or in-thread command handler, pynbd.server.commands) with
    each request it serves counted in its export's :class:`IoStats` as ``kind``.

    A handler that raises ImageError or OSError (the engine answers with an NBD error)
    counts a failed request; one whose reply could not be sent because the client went
    away (ConnectionError) did its I/O and counts as done; a cancelled one counts
    nothing. On the event loop thread.
    """

    async def run_counted(conn: Connection, request: Request) -> None:
        stats = conn.export.stats
        start = stats.clock()
        try:
            await run(conn, request)
        except (ImageError, OSError) as exc:
            _count_raised(stats, kind, request, start, exc)
            raise
        stats.done(kind, request.offset, request.length, start)

    run_counted.__name__ = run_counted.__qualname__ = f"counted_{getattr(run, '__name__', 'handler')}"
    run_counted.__doc__ = run.__doc__
    return run_counted


def counted_now(kind: int, now: HandlerNow) -> HandlerNow:
    """``now`` (a handler's attempt to serve a request on the spot) counted as
    :func:`counted` counts, when it served the request (returned its reply); a
    request it left to the handler's task is counted there."""

    def now_counted(conn: Connection, request: Request) -> list[Buffer] | None:
        stats = conn.export.stats
        start = stats.clock()
        try:
            reply = now(conn, request)
        except (ImageError, OSError) as exc:
            _count_raised(stats, kind, request, start, exc)
            raise
        if reply is not None:
            stats.done(kind, request.offset, request.length, start)
        return reply

    now_counted.__name__ = now_counted.__qualname__ = f"counted_{getattr(now, '__name__', 'handler')}"
    return now_counted


# -- query-blockstats -------------------------------------------------------------------------


class StatsNode(Protocol):
    """What the ``query-blockstats`` builder needs of a block node
    (pynbd.qmp.blockinfo.BlockNode is one)."""

    node_name: str
    #: "file", "raw" or "qcow2".
    driver: str
    #: The counters reported at this node; None for a node pynbd does not count.
    stats: IoStats | None

    @property
    def stats_parent(self) -> StatsNode | None:
        """The child QEMU reports as ``parent``: the node holding the data."""


def node_block_stats(node: StatsNode) -> dict[str, Any]:
    """The BlockStats of one node as ``query-blockstats`` with ``query-nodes`` gives it
    (QEMU's ``bdrv_query_bds_stats``): ``node-name``, ``stats``, ``parent`` (the stats
    of the child that holds the data: the file, or an external data file) and, for
    file nodes, the file driver's ``driver-specific`` statistics. No ``device`` or
    ``qdev``: nodes have neither."""
    answer: dict[str, Any] = {"node-name": node.node_name}
    answer["stats"] = (node.stats.block_device_stats() if node.stats is not None
                       else uncounted_device_stats())
    parent = node.stats_parent
    if parent is not None:
        answer["parent"] = node_block_stats(parent)
    if node.driver == "file":
        answer["driver-specific"] = dict(FILE_DRIVER_STATS)
    return answer


def query_blockstats(nodes: Sequence[StatsNode], query_nodes: bool = False) -> list[dict[str, Any]]:
    """The answer of ``query-blockstats``.

    ``nodes``: every node, in the order they were created (oldest first, the order
    QEMU lists them). Without ``query_nodes`` QEMU lists the named or attached
    BlockBackends; pynbd's exports, like qemu-storage-daemon's, have anonymous ones,
    so the answer is ``[]``. With it, one :func:`node_block_stats` per node.
    """
    if not query_nodes:
        return []
    return [node_block_stats(node) for node in nodes]
