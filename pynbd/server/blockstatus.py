"""BLOCK_STATUS for one connection: answers kept or computed, REQ_ONE answered from
runs found ahead, and what a scanning client asks next prepared while it reads.

Runs on the event loop thread only (the engine's handlers and its lookahead call
it), like every cache it uses; the image's change feed drops what a change
touches (:mod:`pynbd.image.changes`).
"""

from __future__ import annotations

import logging

from pynbd.image.base import ImageError, ImageIOError
from pynbd.protocol import wire
from pynbd.protocol.constants import FLAG_REQ_ONE
from pynbd.protocol.contexts import bitmap_of_context
from pynbd.protocol.transmission import Request, RequestError, TransmissionState, build_descriptors
from pynbd.runlength import Buffer, Runs, clipped
from pynbd.runspans import RunIndex
from pynbd.server.answers import (
    ONE_EXTENT_FIRST_RUNS,
    AnswerCache,
    BlockStatusAnswer,
    OneExtentScan,
    RequestKey,
    ScanTracker,
)
from pynbd.server.contexts import ExtentQuery
from pynbd.server.exports import Export


class BlockStatusService:
    """Answers one connection's BLOCK_STATUS requests (NBD spec "Block status").

    :meth:`reply` is the command's handler; :meth:`prepare_next` is the lookahead's
    hook, called while the client reads the last reply. Both run on the event loop
    thread. :meth:`close` when the connection ends (it stops listening to the image).
    """

    def __init__(self, export: Export, state: TransmissionState, log: logging.LoggerAdapter) -> None:
        self.export = export
        self.state = state
        self.log = log
        image = export.image
        #: The selected contexts as sorted ``(id, name)`` pairs, as the answer caches' keys carry them.
        self.contexts_key: tuple[tuple[int, str], ...] = tuple(sorted(state.contexts.items()))
        # Shared when the image's extents change only through the server; a raw file may
        # change behind its back, so only the answer computed ahead of a scan is kept.
        self._shared = image.stable_extents
        self.answers = export.answers if self._shared else AnswerCache(max_answers=1, single_use=True)
        self._scan = ScanTracker()
        self._one_extent: OneExtentScan | None = None  # (made at the first REQ_ONE request)
        #: The last request answered, with its answer (None for REQ_ONE) and reply: what
        #: :meth:`prepare_next` continues from.
        self._last: tuple[Request, BlockStatusAnswer | None, list[Buffer]] | None = None
        image.changes.listen(self._changed)
        #: The bitmaps this connection reads: busy until it closes (QEMU's BlockDirtyInfo
        #: ``busy``; operations on them are refused meanwhile).
        self._reading = [export.bitmaps[bitmap] for bitmap in map(bitmap_of_context, state.contexts.values())
                         if bitmap is not None]
        with image.metadata_lock:
            for bitmap in self._reading:
                bitmap.readers += 1

    def close(self) -> None:
        image = self.export.image
        image.changes.unlisten(self._changed)
        with image.metadata_lock:
            for bitmap in self._reading:
                bitmap.readers -= 1
        self._reading = []

    def _changed(self, offset: int, length: int) -> None:
        if not self._shared:
            self.answers.drop(offset, length)  # (the export drops from its shared cache)
        if self._one_extent is not None:
            self._one_extent.drop(offset, length)

    @property
    def expecting(self) -> bool:
        """A REQ_ONE reply made ahead waits for the scan's next request (the client
        answers each reply with its next request at once: worth polling for)."""
        return self._one_extent is not None and self._one_extent.expecting

    # -- the handler ------------------------------------------------------------------

    def reply(self, request: Request) -> list[Buffer]:
        """The encoded reply (buffers for one gathering send); raises ImageError or
        OSError when a context without a safe status cannot be answered."""
        if request.flags & FLAG_REQ_ONE:
            scan = self._scan_for_one_extent()
            reply = scan.made_ahead(request) or self._one_extent_reply(request, scan)
            if reply is None:
                # (Runs could not be found ahead: the general way reports the error or a
                # safe status, in the same layout: one descriptor per context.)
                reply = b"".join(self._compute(request.offset, request.length, request.flags)
                                 .for_cookie(request.cookie))
            parts: list[Buffer] = [reply]
            self._last = (request, None, parts)
            return parts
        key: RequestKey = (request.offset, request.length, request.flags, self.contexts_key)
        answer = self.answers.get(key)
        if answer is None:
            answer = self._compute(request.offset, request.length, request.flags)
            if not self.answers.single_use:  # (single use: only answers computed ahead are kept)
                self.answers.put(key, answer)
        parts = answer.for_cookie(request.cookie)
        self._last = (request, answer, parts)
        return parts

    # -- the lookahead's hook -----------------------------------------------------------

    def prepare_next(self) -> None:
        """The client reads the last reply now: compute the answer (or make the REQ_ONE
        reply) its scan asks for next, unless that request would be refused."""
        last, self._last = self._last, None
        if last is None:
            return
        request, answer, parts = last
        covered = answer.covered if answer is not None else wire.block_status_one_covered(parts[0])
        upcoming = self._scan.next_request(request.offset, request.length, covered, self.export.image.size)
        if upcoming is None:
            return
        following = Request(request.type, request.flags, 0, *upcoming)
        try:
            self.state.validate(following)
            if answer is None:
                scan = self._scan_for_one_extent()
                ahead = self._one_extent_reply(following, scan)
                if ahead is not None:
                    scan.expect(following, ahead)
                return
            key: RequestKey = (following.offset, following.length, following.flags, self.contexts_key)
            if not self.answers.has(key):
                self.answers.put(key, self._compute(following.offset, following.length, following.flags))
        except (RequestError, ImageError, OSError):
            return  # the request, if it comes, is answered (or refused) the usual way

    # -- REQ_ONE from runs found ahead ----------------------------------------------------

    def _scan_for_one_extent(self) -> OneExtentScan:
        scan = self._one_extent
        if scan is None:
            scan = self._one_extent = OneExtentScan([context_id for context_id, _ in self.contexts_key])
        return scan

    def _one_extent_reply(self, request: Request, scan: OneExtentScan) -> bytes | None:
        """A REQ_ONE reply from the runs kept for this connection's scan (found now if
        they cannot answer it), or None when runs cannot be found (an image error)."""
        offset, length = request.offset, request.length
        found = scan.descriptors(offset, length)
        if found is None:
            try:
                scan.keep(self._run_indexes(offset, length, scan.runs_to_find(offset)),
                          stable=self.export.image.stable_extents)
            except (ImageError, OSError):
                return None
            found = scan.descriptors(offset, length)
            if found is None:
                return None
        return wire.block_status_one_reply(request.cookie, found)

    def _run_indexes(self, offset: int, length: int, runs: int) -> list[RunIndex]:
        """Up to ``runs`` runs from ``offset`` for each selected context, indexed."""
        export = self.export
        query = ExtentQuery(export.image, offset, length, runs)
        size = export.image.size
        indexes = []
        for _, name in self.contexts_key:
            found = clipped(export.contexts.providers[name].runs(name, query, export.bitmaps), length)
            indexes.append(RunIndex(offset, found, open_end=offset + found.total < size))
        return indexes

    # -- answers computed --------------------------------------------------------------

    def _compute(self, offset: int, length: int, flags: int) -> BlockStatusAnswer:
        """One chunk per selected context (NBD spec "BLOCK_STATUS reply chunk"), cookie 0
        (see BlockStatusAnswer.for_cookie)."""
        export = self.export
        req_one = bool(flags & FLAG_REQ_ONE)
        # REQ_ONE comes here only when runs could not be found ahead: one descriptor is
        # wanted, a few runs suffice (a shorter descriptor is allowed, the client asks
        # again from its end), and the whole range each time would make qemu-img map
        # O(extents²).
        query = ExtentQuery(export.image, offset, length, ONE_EXTENT_FIRST_RUNS if req_one else None)
        items = self.contexts_key
        parts: list[Buffer] = []
        headers: list[int] = []
        covered = length
        reusable = True
        for index, (context_id, name) in enumerate(items):
            provider = export.contexts.providers[name]
            try:
                descriptors = build_descriptors(provider.runs(name, query, export.bitmaps), length, req_one)
                if not descriptors:
                    raise ImageIOError(f"{export.image.path}: no extents at offset {offset}")
            except ImageError as exc:
                if provider.safe_status is None:
                    raise
                self.log.error("block status for %s at %d failed, reporting safe status: %s",
                               name, offset, exc)
                descriptors = Runs([length], [provider.safe_status])
                reusable = False
            covered = min(covered, descriptors.total)
            headers.append(len(parts))
            parts += wire.chunk_block_status_parts(0, context_id, descriptors, done=index == len(items) - 1)
        return BlockStatusAnswer(parts, tuple(headers), covered, reusable)

