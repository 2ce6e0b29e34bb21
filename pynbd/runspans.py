"""Runs anchored at guest offsets: :class:`SpanRuns`, the runs of a fixed span kept in
caches (an L2 table's, a bitmap chunk's) and sliced by bisection, and :class:`RunIndex`,
which finds the run at an offset (REQ_ONE answers). Pure; see :mod:`pynbd.runlength`
for the run columns themselves.
"""

from __future__ import annotations

import struct
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from itertools import accumulate

from pynbd.runlength import (
    U32_MAX,
    AnyRuns,
    Buffer,
    PackedRuns,
    Runs,
    columns,
    normalize,
    pack_pairs,
)

_BE_U32 = struct.Struct(">I")


class SpanRuns:
    """Normalized runs over a fixed span, indexed for slicing by bisection.

    Kept in caches, so compact: packed (:class:`PackedRuns`, 8 bytes a run
    plus its start) when every length fits a u32, and a slice is then a view
    of those bytes between its two rewritten outer runs; a span with a longer
    run keeps ``array('Q')`` lengths and slices into columns.

    Run ``k`` starts at ``base + (starts[k] << shift)``: a span whose runs
    start on units (clusters) keeps unit indexes, four bytes a run
    (:meth:`from_packed`); others keep byte offsets (``base`` 0, ``shift`` 0).
    """

    __slots__ = ("starts", "base", "shift", "end", "packed", "lengths", "values", "longest")

    def __init__(self, start: int, runs: Runs) -> None:
        runs = normalize(runs)
        self.starts = array("q", accumulate(runs.lengths[:-1], initial=start))
        self.base = self.shift = 0
        self.end = start + runs.total
        self.longest = runs.longest if len(runs) else 0
        self.packed: bytes | None = None
        self.lengths: array | None = None
        self.values: array | None = None
        if self.longest <= U32_MAX:
            self.packed = pack_pairs(runs.lengths, runs.values)
        else:
            self.lengths = array("Q", runs.lengths)
            self.values = array("I", runs.values)

    @classmethod
    def from_packed(cls, packed: bytes, starts: array, base: int, shift: int, end: int,
                    longest: int) -> SpanRuns:
        """A span made by its producer: ``packed`` normalized pairs whose run ``k`` starts at
        ``base + (starts[k] << shift)`` and the last ends at ``end``; ``longest`` bounds the lengths."""
        span = cls.__new__(cls)
        span.packed, span.starts, span.base, span.shift = packed, starts, base, shift
        span.end, span.longest = end, longest
        span.lengths = span.values = None
        return span

    @property
    def start(self) -> int:
        return self.base + (self.starts[0] << self.shift)

    @property
    def nbytes(self) -> int:
        if self.packed is not None:
            return self.starts.itemsize * len(self.starts) + len(self.packed)
        return (8 + 8 + 4) * len(self.starts)

    def mapped(self, value_of: Sequence[int]) -> SpanRuns:
        """The same span with each value ``v`` replaced by ``value_of[v]``, equal neighbours merged.

        When the values are bytes and ``value_of`` keeps the ones present apart, no
        neighbours merge: the result shares these starts, and its packed pairs are
        these with the value bytes translated (a C operation, not work per run).
        """
        packed = self.packed
        if packed:
            count = len(self.starts)
            low = packed[7::8]  # each value's low byte
            present = set(low)
            if (all(packed[k::8].count(0) == count for k in (4, 5, 6))  # every value < 256
                    and max(present) < len(value_of)
                    and len({value_of[v] for v in present}) == len(present)
                    and all(value_of[v] < 256 for v in present)):
                table = bytearray(range(256))
                for v in present:
                    table[v] = value_of[v]
                return self.revalued(low.translate(table))
        runs = self._columns()
        return SpanRuns(self.start, Runs(runs.lengths, [value_of[v] for v in runs.values]))

    def revalued(self, values: bytes) -> SpanRuns:
        """The same runs (sharing the starts) with run ``k``'s value ``values[k]``; the caller
        promises neighbours still differ. Packed spans only."""
        assert self.packed is not None
        out = bytearray(self.packed)
        out[7::8] = values
        return SpanRuns.from_packed(bytes(out), self.starts, self.base, self.shift, self.end, self.longest)

    def _columns(self) -> Runs:
        if self.packed is not None:
            return PackedRuns([self.packed], len(self.starts) if self.packed else 0, 0, 0).unpacked()
        assert self.lengths is not None and self.values is not None
        return Runs(self.lengths, self.values, True)

    def slice(self, pos: int, end: int) -> AnyRuns:
        """The runs of ``[pos, end)`` (inside the span), the outer two clipped."""
        starts, base, shift = self.starts, self.base, self.shift
        packed = self.packed
        if packed and end == self.end and pos == self.start:  # the whole span: its bytes as they are
            return PackedRuns([packed], len(starts), end - pos, self.longest)
        first = bisect_right(starts, (pos - base) >> shift) - 1
        stop = bisect_left(starts, -(-(end - base) >> shift))  # the first run starting at or after end
        # The clipped outer lengths follow from the starts alone.
        head = (base + (starts[first + 1] << shift) if stop - first > 1 else end) - pos
        tail = end - (base + (starts[stop - 1] << shift))
        if packed is not None:
            # The outer runs rewritten, the ones between them viewed in place.
            at = 8 * first
            parts: list[Buffer] = [_BE_U32.pack(head) + packed[at + 4:at + 8]]
            if stop - first > 1:
                if stop - first > 2:
                    parts.append(memoryview(packed)[at + 8:8 * stop - 8])
                parts.append(_BE_U32.pack(tail) + packed[8 * stop - 4:8 * stop])
            return PackedRuns(parts, stop - first, end - pos, self.longest)
        assert self.lengths is not None and self.values is not None
        lengths = self.lengths[first:stop]
        lengths[0] = head
        if stop - first > 1:
            lengths[-1] = tail
        return Runs(lengths, self.values[first:stop], True, end - pos, self.longest)


class RunIndex:
    """Normalized runs from ``start``, for finding the run that holds an offset.

    Serves clients that ask for one extent at a time (REQ_ONE: QEMU's nbd
    driver, under ``qemu-img map`` and incremental backups with
    ``x-dirty-bitmap``): the runs are found once and each request is a
    bisection. The last run may go on past what is known (``open_end``).
    """

    __slots__ = ("start", "end", "ends", "values", "open_end")

    def __init__(self, start: int, runs: AnyRuns, open_end: bool) -> None:
        runs = columns(normalize(runs))
        self.start = start
        # A list: bisecting an array makes an int object per probe.
        self.ends = list(accumulate(runs.lengths, initial=start))
        del self.ends[0]
        self.end = self.ends[-1] if self.ends else start
        self.values = runs.values
        self.open_end = open_end

    def __len__(self) -> int:
        return len(self.ends)

    @property
    def last_start(self) -> int:
        """Where the last run starts."""
        return self.ends[-2] if len(self.ends) > 1 else self.start

    def run_at(self, offset: int, end: int) -> tuple[int, int] | None:
        """``(length, value)`` from ``offset`` to the end of its run, at most up to ``end``;
        None when the index cannot tell (``offset`` outside it, or in an open last run
        that ``end`` reaches past)."""
        ends = self.ends
        if offset < self.start or offset >= self.end:
            return None
        index = bisect_right(ends, offset)
        run_end = ends[index]
        if run_end < end and self.open_end and index == len(ends) - 1:
            return None
        return min(run_end, end) - offset, self.values[index]
