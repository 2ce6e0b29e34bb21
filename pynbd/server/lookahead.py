"""Block status computed ahead for clients that scan an image range by range.

Tools that map a whole image (``nbdinfo --map``, backup tools walking the
allocation) send one BLOCK_STATUS, wait for the answer, and ask again from
where it ended, with the same length (cut at the end of the export). Such a
client spends its time reading each answer, while the server waits. With
:class:`Lookahead`, the server computes the next answer while the client reads
the current one; when the request arrives and matches, the answer goes out at
once, so the server's work no longer adds to the client's.

One answer is kept per connection, only for a request that continues a scan
(one that started at offset 0 or where the previous answer ended); a kept
answer is used only if the export did not change since (its generation).
"""

from __future__ import annotations

from dataclasses import dataclass

from pynbd.protocol import wire
from pynbd.runlength import Buffer


@dataclass(frozen=True, slots=True)
class BlockStatusAnswer:
    """The encoded chunks of one BLOCK_STATUS reply, as buffers for one gathering send."""

    #: The chunks' buffers (with cookie 0 when computed ahead).
    parts: list[Buffer]
    #: Which parts are chunk headers (they carry the cookie).
    header_indices: tuple[int, ...]
    #: Bytes described from the request offset (the least over the contexts).
    covered: int

    def for_cookie(self, cookie: int) -> list[Buffer]:
        """The parts with ``cookie`` in copies of the headers (the descriptors are shared)."""
        return wire.with_cookie(self.parts, self.header_indices, cookie)


#: (offset, length, flags, export generation)
RequestKey = tuple[int, int, int, int]


class Lookahead:
    """At most one answer computed ahead, and where the last answer ended."""

    def __init__(self) -> None:
        self._key: RequestKey | None = None
        self._answer: BlockStatusAnswer | None = None
        self._scan_end = -1

    def take(self, key: RequestKey) -> BlockStatusAnswer | None:
        """The answer kept for exactly this request, if any (it is used once)."""
        answer = self._answer if key == self._key else None
        self._key = self._answer = None
        return answer

    def next_request(self, offset: int, length: int, answer: BlockStatusAnswer, size: int) -> tuple[int, int] | None:
        """``(offset, length)`` a scanning client asks for next, or None when this is no scan."""
        continues = offset == 0 or offset == self._scan_end
        self._scan_end = offset + answer.covered
        if not continues or self._scan_end >= size or answer.covered <= 0:
            return None
        return self._scan_end, min(length, size - self._scan_end)

    def keep(self, key: RequestKey, answer: BlockStatusAnswer) -> None:
        self._key = key
        self._answer = answer
