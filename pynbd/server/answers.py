"""Block status answers kept for reuse, and a connection's one-extent (REQ_ONE) runs.

A scanning client (``nbdinfo --map``, a backup walking a bitmap) asks again from
where the last answer ended: :class:`ScanTracker` says what comes next, so it can be
computed while the client reads. For images whose extents change only through the
server (:attr:`Image.stable_extents`), answers are shared per export in an
:class:`AnswerCache`. Every cache here drops what overlaps a range the image's change
feed announces (:mod:`pynbd.image.changes`), and nothing else. Event loop thread only.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from pynbd.protocol import wire
from pynbd.protocol.transmission import MAX_DESCRIPTOR_LENGTH, Request
from pynbd.runlength import Buffer
from pynbd.runspans import RunIndex


@dataclass(frozen=True, slots=True)
class BlockStatusAnswer:
    """The encoded chunks of one BLOCK_STATUS reply (cookie 0), as buffers for one gathering send."""

    #: The chunks' buffers, with cookie 0 in the chunk headers.
    parts: list[Buffer]
    #: Which parts are chunk headers (they carry the cookie).
    header_indices: tuple[int, ...]
    #: Bytes described from the request offset (the least over the contexts).
    covered: int
    #: False when a context reported its safe status after an error: such an
    #: answer is sent once and never kept (the next request tries again).
    reusable: bool = True

    def for_cookie(self, cookie: int) -> list[Buffer]:
        """The parts with ``cookie`` in copies of the headers (the descriptors are shared)."""
        return wire.with_cookie(self.parts, self.header_indices, cookie)

    def retained_bytes(self) -> int:
        """Memory this answer keeps alive: a view keeps its whole underlying buffer."""
        return sum(len(part.obj) if isinstance(part, memoryview) else len(part)  # type: ignore[arg-type]
                   for part in self.parts)


#: (offset, length, flags, selected contexts as sorted (id, name) pairs)
RequestKey = tuple[int, int, int, tuple[tuple[int, str], ...]]

#: Answers one export keeps: a scan of 4 TiB in nbdinfo's 4 GiB requests...
MAX_ANSWERS = 1024
#: ...within this much memory (views count their whole buffer).
MAX_ANSWER_BYTES = 16 << 20


class AnswerCache:
    """Answers by request, least recently used first out, bounded in count and bytes.

    ``single_use``: an answer is handed out once (for connections to images whose
    extents may change behind the server's back, e.g. a raw file: only the answer
    computed ahead for the next request of a scan is kept).
    """

    def __init__(self, max_answers: int = MAX_ANSWERS, max_bytes: int = MAX_ANSWER_BYTES,
                 single_use: bool = False) -> None:
        self.max_answers = max_answers
        self.max_bytes = max_bytes
        self.single_use = single_use
        self._answers: OrderedDict[RequestKey, tuple[BlockStatusAnswer, int]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._answers)

    @property
    def retained_bytes(self) -> int:
        return self._bytes

    def get(self, key: RequestKey) -> BlockStatusAnswer | None:
        """The answer kept for exactly this request, if any."""
        entry = self._answers.pop(key, None) if self.single_use else self._answers.get(key)
        if entry is None:
            return None
        answer, size = entry
        if self.single_use:
            self._bytes -= size
        else:
            self._answers.move_to_end(key)
        return answer

    def has(self, key: RequestKey) -> bool:
        """Whether an answer for this request is kept (none is handed out)."""
        return key in self._answers

    def put(self, key: RequestKey, answer: BlockStatusAnswer) -> None:
        """Keep ``answer`` unless it is not reusable or too big."""
        if not answer.reusable:
            return
        size = answer.retained_bytes()
        if size > self.max_bytes:
            return
        old = self._answers.pop(key, None)
        if old is not None:
            self._bytes -= old[1]
        self._answers[key] = (answer, size)
        self._bytes += size
        while len(self._answers) > self.max_answers or self._bytes > self.max_bytes:
            _, (_, evicted) = self._answers.popitem(last=False)
            self._bytes -= evicted

    def drop(self, offset: int, length: int) -> None:
        """Forget every answer to a request overlapping ``[offset, offset+length)``
        (a change feed listener)."""
        if not self._answers:
            return
        end = offset + length
        for key in [key for key in self._answers if key[0] < end and offset < key[0] + key[1]]:
            self._bytes -= self._answers.pop(key)[1]


class ScanTracker:
    """Where a scanning client's last answer ended, and so what it asks next."""

    def __init__(self) -> None:
        self._scan_end = -1

    def next_request(self, offset: int, length: int, covered: int, size: int) -> tuple[int, int] | None:
        """``(offset, length)`` a scanning client asks for next, or None when this is no scan.

        A request continues a scan when it starts at 0 or where the previous answer ended.
        """
        continues = offset == 0 or offset == self._scan_end
        self._scan_end = offset + covered
        if not continues or self._scan_end >= size or covered <= 0:
            return None
        return self._scan_end, min(length, size - self._scan_end)


#: Runs found per context for a REQ_ONE request that does not continue a scan...
ONE_EXTENT_FIRST_RUNS = 16
#: ...and at most this many over all the connection's contexts while a scan goes on
#: (four times more at each refill, so a connection keeps ~100 KiB of runs however
#: many bitmaps it selected).
ONE_EXTENT_MAX_RUNS = 2048
#: Runs of an image whose extents may change behind the server's back (a raw file
#: another process writes) answer requests for this long at most: changes from
#: outside still show within that time.
ONE_EXTENT_UNSTABLE_SECONDS = 0.1


class OneExtentScan:
    """REQ_ONE block status answered from runs found ahead, for one connection.

    QEMU's nbd driver asks for one extent at a time (REQ_ONE), each request
    from where the last answer ended: ``qemu-img map`` and ``convert`` over
    NBD, incremental backups reading a bitmap with ``x-dirty-bitmap``. Finding
    the runs anew for each request would cost more than the whole request in
    qemu-nbd; here runs are found ahead for every selected context, and each
    request is a bisection. A refill that continues the client's scan finds
    four times more runs than the last one, so a client probing single
    offsets costs no more than a few runs each.

    The reply to the request a scan sends next can also be made ahead, while
    the client reads the last one (:meth:`expect`); when that request comes,
    :meth:`made_ahead` hands it out with the request's cookie.
    """

    def __init__(self, context_ids: Sequence[int]) -> None:
        #: The selected contexts' ids, in the order their chunks go out.
        self.context_ids = context_ids
        #: One index per context (same order).
        self._indexes: list[RunIndex] = []
        #: When the kept runs stop answering (time.monotonic()), None: until a change drops them.
        self._expires: float | None = None
        self._runs = ONE_EXTENT_FIRST_RUNS
        #: The request expected next as (type, flags, offset, length), and its reply made
        #: ahead, split where each chunk's cookie goes.
        self._expected: tuple[tuple[int, int, int, int], list[bytes]] | None = None

    def descriptors(self, offset: int, length: int) -> list[tuple[int, int, int]] | None:
        """``(context id, length, status)`` per context for a REQ_ONE request, or None when
        the kept runs cannot answer it (then :meth:`runs_to_find` and :meth:`keep`)."""
        if not self._indexes:
            return None
        if self._expires is not None and time.monotonic() > self._expires:
            return None
        end = offset + length
        found = []
        for context_id, index in zip(self.context_ids, self._indexes):
            run = index.run_at(offset, end)
            if run is None:
                return None
            # A run may be longer than one descriptor can say (NBD spec "BLOCK_STATUS
            # reply chunk": 32-bit lengths): the client asks again from its end.
            found.append((context_id, min(run[0], MAX_DESCRIPTOR_LENGTH), run[1]))
        return found

    def runs_to_find(self, offset: int) -> int:
        """How many runs per context to find from ``offset``: more when the client went
        on to the runs' end (a scan), the first amount when it went elsewhere."""
        indexes = self._indexes
        if any(index.last_start <= offset <= index.end for index in indexes):
            self._runs = min(4 * self._runs, ONE_EXTENT_MAX_RUNS)
        else:
            self._runs = ONE_EXTENT_FIRST_RUNS
        return max(ONE_EXTENT_FIRST_RUNS, self._runs // len(self.context_ids))

    def keep(self, indexes: list[RunIndex], stable: bool = True) -> None:
        """Answer from ``indexes`` until a change drops them (and, unless the image's
        extents are ``stable`` - they change only through the server -, for
        :data:`ONE_EXTENT_UNSTABLE_SECONDS` at most: a raw file may change behind the
        server's back, and that is the one change no feed announces)."""
        self._indexes = indexes
        self._expires = None if stable else time.monotonic() + ONE_EXTENT_UNSTABLE_SECONDS

    def expect(self, request: Request, reply: bytes) -> None:
        """``reply`` (made with cookie 0) answers the next request equal to ``request``
        but for its cookie, unless a change drops it first."""
        # One chunk per context, each with the cookie.
        pieces = wire.split_around_cookies(reply, wire.CHUNK_BLOCK_STATUS_ONE.size)
        self._expected = ((request.type, request.flags, request.offset, request.length), pieces)

    @property
    def expecting(self) -> bool:
        """Whether a reply made ahead waits for the scan's next request."""
        return self._expected is not None

    def made_ahead(self, request: Request) -> bytes | None:
        """The reply made ahead for ``request``, with its cookie, or None when it is not
        the request expected. Used once (a repeated request is answered anew)."""
        expected = self._expected
        if expected is None:
            return None
        self._expected = None
        if expected[0] != (request.type, request.flags, request.offset, request.length):
            return None
        return wire.U64.pack(request.cookie).join(expected[1])

    def drop(self, offset: int, length: int) -> None:
        """Forget runs and the reply made ahead if they overlap ``[offset, offset+length)``
        (a change feed listener)."""
        end = offset + length
        if any(index.start < end and offset < index.end for index in self._indexes):
            self._indexes = []
        expected = self._expected
        if expected is not None:
            _, _, start, n = expected[0]
            if start < end and offset < start + n:
                self._expected = None
