"""Run-length columns: a range described as consecutive runs with one value each.

Block status of a fragmented image is tens of thousands of runs per request.
Kept as two parallel lists (``lengths``, ``values``) instead of one tuple per
run, merging, clipping and encoding become ``itertools``/``operator``/``array``
loops that run in C, and Python code costs per request instead of per run
(bench/README.md, "block status"). The image drivers produce runs (from
bitarrays with :func:`bit_runs`, or cached as :class:`~pynbd.runspans.SpanRuns`), the protocol
layer turns them into descriptors; both use this module, which is pure (no I/O).
Cached spans keep their runs as the wire carries them (:class:`PackedRuns`),
so answering from a cache is slicing bytes, not work per run.
"""

from __future__ import annotations

import struct
import sys
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate, compress, repeat
from operator import add, ne, sub

from bitarray import bitarray

#: The largest length a descriptor (and a packed run) can carry (NBD spec "BLOCK_STATUS" reply chunk: u32).
U32_MAX = 0xFFFFFFFF
_BE_U32 = struct.Struct(">I")
_LITTLE_ENDIAN = sys.byteorder == "little"
assert array("I").itemsize == 4


@dataclass(slots=True)
class Runs:
    """Consecutive runs: run ``i`` is ``lengths[i]`` bytes with ``values[i]``.

    The columns are lists, or arrays where they come from cached spans.
    ``normalized`` promises that no run is empty and neighbours differ, so
    consumers can skip those passes (a producer that builds runs from
    boundaries knows it; :func:`normalize` establishes it). ``size_hint`` and
    ``longest_hint``, when set, are the sum and an upper bound of the lengths:
    a producer that knows them saves consumers a pass over every run.
    """

    lengths: list[int] | array
    values: list[int] | array
    normalized: bool = False
    size_hint: int | None = None
    longest_hint: int | None = None

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[int, int]]) -> Runs:
        lengths: list[int] = []
        values: list[int] = []
        for length, value in pairs:
            lengths.append(length)
            values.append(value)
        return cls(lengths, values)

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        """``(length, value)`` pairs, for callers that want them one by one."""
        return zip(self.lengths, self.values)

    @property
    def total(self) -> int:
        return self.size_hint if self.size_hint is not None else sum(self.lengths)

    @property
    def longest(self) -> int:
        """The longest run, or a bound on it."""
        if self.longest_hint is not None:
            return self.longest_hint
        return max(self.lengths, default=0)

    def head(self, count: int) -> Runs:
        """The first ``count`` runs."""
        if len(self.lengths) <= count:
            return self
        return Runs(self.lengths[:count], self.values[:count], self.normalized, None, self.longest_hint)


def interleave(evens: Sequence[int], odds: Sequence[int]) -> list[int]:
    """``[evens[0], odds[0], evens[1], odds[1], ...]`` (equal lengths), by slice assignment."""
    out = [0] * (2 * len(evens))
    out[0::2] = evens
    out[1::2] = odds
    return out


def without_empty(runs: Runs) -> Runs:
    """Drop zero-length runs (a length works as its own keep-mask)."""
    if runs.normalized or 0 not in runs.lengths:
        return runs
    return Runs(list(compress(runs.lengths, runs.lengths)), list(compress(runs.values, runs.lengths)))


def merged(runs: Runs) -> Runs:
    """Merge neighbouring runs with equal values.

    A run is kept as the end of its group when the next value differs; the
    group's length is the difference of the kept cumulative ends.
    """
    values = runs.values
    if runs.normalized or len(values) < 2:
        return runs
    last_of_group = list(map(ne, values, values[1:]))
    if all(last_of_group):
        return runs  # already maximal: the common case for image runs
    last_of_group.append(True)
    ends = list(compress(accumulate(runs.lengths), last_of_group))
    starts = [0]
    starts += ends[:-1]
    return Runs(list(map(sub, ends, starts)), list(compress(values, last_of_group)))


def first_group(runs: AnyRuns) -> AnyRuns:
    """The leading runs up to the first non-empty run with another value than the first non-empty one."""
    if runs.normalized:
        return runs.head(1)
    value = None
    count = 0
    for length, run_value in runs:
        if length:
            if value is None:
                value = run_value
            elif run_value != value:
                break
        count += 1
    return runs.head(count)


def normalize(runs: AnyRuns) -> AnyRuns:
    """Without empty runs and with equal neighbours merged, marked so."""
    if runs.normalized:
        return runs
    out = merged(without_empty(runs))
    return Runs(out.lengths, out.values, True, runs.size_hint)


#: A piece of packed runs: bytes, or a view into a cached span's bytes.
Buffer = bytes | bytearray | memoryview


class PackedRuns:
    """Normalized runs as the wire carries them: big-endian u32 ``(length, value)`` pairs.

    This is the body of a BLOCK_STATUS chunk (NBD spec "NBD_REPLY_TYPE_BLOCK_STATUS"). The pairs are kept as a
    list of buffers whose concatenation is the body: a slice of a cached span
    is a view into the span's bytes between its two rewritten outer runs
    (:meth:`~pynbd.runspans.SpanRuns.slice`), :func:`concat` joins lists, and the reply goes
    out with one gathering send. So answering from cached runs copies no run;
    the kernel's copy into the socket is the only one. Consumers that need
    columns get them unpacked (:meth:`unpacked`).
    """

    __slots__ = ("parts", "count", "size_hint", "longest_hint")

    normalized = True

    def __init__(self, parts: list[Buffer], count: int, size: int, longest: int) -> None:
        self.parts = parts
        #: Number of runs (8 bytes each over all parts).
        self.count = count
        self.size_hint = size
        self.longest_hint = longest

    @classmethod
    def pack(cls, runs: Runs) -> PackedRuns:
        """Pack normalized runs whose lengths fit a u32."""
        return cls([pack_pairs(runs.lengths, runs.values)], len(runs), runs.total, runs.longest)

    @property
    def data(self) -> bytes:
        """All pairs in one bytes object."""
        return b"".join(self.parts)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.unpacked())

    @property
    def total(self) -> int:
        return self.size_hint

    @property
    def longest(self) -> int:
        return self.longest_hint

    @property
    def lengths(self) -> array:
        return self.unpacked().lengths

    @property
    def values(self) -> array:
        return self.unpacked().values

    def unpacked(self) -> Runs:
        """The same runs in ``array('I')`` columns."""
        words = array("I")
        for part in self.parts:
            words.frombytes(part)
        if _LITTLE_ENDIAN:
            words.byteswap()
        return Runs(words[0::2], words[1::2], True, self.size_hint, self.longest_hint)

    def head(self, count: int) -> PackedRuns:
        """The first ``count`` runs."""
        if self.count <= count:
            return self
        kept = _byte_range(self.parts, 0, 8 * count)
        dropped = self.count - count
        # The size from whichever side has fewer runs to unpack.
        if dropped < count:
            tail = _byte_range(self.parts, 8 * count, 8 * self.count)
            size = self.size_hint - sum(PackedRuns(tail, dropped, 0, 0).unpacked().lengths)
        else:
            size = sum(PackedRuns(kept, count, 0, 0).unpacked().lengths)
        return PackedRuns(kept, count, size, self.longest_hint)


def _byte_range(parts: Sequence[Buffer], begin: int, end: int) -> list[Buffer]:
    """Bytes ``[begin, end)`` of the concatenation of ``parts``, as views into them."""
    out: list[Buffer] = []
    pos = 0
    for part in parts:
        size = len(part)
        if pos + size > begin and pos < end:
            lo, hi = max(begin - pos, 0), min(end - pos, size)
            out.append(part if (lo, hi) == (0, size) else memoryview(part)[lo:hi])
        pos += size
        if pos >= end:
            break
    return out


def pack_pairs(lengths: Sequence[int], values: Sequence[int]) -> bytes:
    """Big-endian u32 ``(length, value)`` pairs (interleaved and byte-swapped in C)."""
    words = array("I", interleave(lengths, values))
    if _LITTLE_ENDIAN:
        words.byteswap()
    return words.tobytes()


#: Runs in either form; every function here takes both.
AnyRuns = Runs | PackedRuns


def columns(runs: AnyRuns) -> Runs:
    """``runs`` with list or array columns (unpacking packed runs)."""
    return runs.unpacked() if isinstance(runs, PackedRuns) else runs


#: Plain parts this short are packed to join packed neighbours (a hole between cached tables).
_PACK_PLAIN_PARTS_UP_TO = 8


def concat(parts: Sequence[AnyRuns]) -> AnyRuns:
    """Runs of consecutive ranges, one after the other; normalized parts stay normalized.

    Packed parts (slices of cached spans) give packed runs, so the answer
    reaches the encoder as bytes; a seam between parts with equal values is
    merged in place.
    """
    if len(parts) == 1:
        return parts[0]
    if any(isinstance(p, PackedRuns) for p in parts):
        packed = [p if isinstance(p, PackedRuns) else _packable(p) for p in parts]
        if all(p is not None for p in packed):
            joined = _concat_packed(packed)  # type: ignore[arg-type]
            if joined is not None:
                return joined
        parts = [columns(p) for p in parts]
    lengths: list[int] = []
    values: list[int] = []
    sizes_known = all(p.size_hint is not None for p in parts)
    longest_known = all(p.longest_hint is not None for p in parts)
    longest = max(p.longest_hint or 0 for p in parts) if longest_known else None
    for part in parts:
        if not part.lengths:
            continue
        if lengths and values[-1] == part.values[0]:  # the seam of two normalized parts
            lengths[-1] += part.lengths[0]
            if longest is not None:
                longest = max(longest, lengths[-1])
            lengths += part.lengths[1:]
            values += part.values[1:]
        else:
            lengths += part.lengths
            values += part.values
    size = sum(p.total for p in parts) if sizes_known else None
    return Runs(lengths, values, all(part.normalized for part in parts), size, longest)


def _packable(runs: Runs) -> PackedRuns | None:
    if len(runs) > _PACK_PLAIN_PARTS_UP_TO or not runs.normalized or runs.longest > U32_MAX:
        return None
    return PackedRuns.pack(runs)


#: Packed runs gathered from more buffers than this are joined into one (a
#: request over many small cached tables; a gathering send takes at most IOV_MAX).
MAX_PACKED_PARTS = 64


def _concat_packed(parts: Sequence[PackedRuns]) -> PackedRuns | None:
    """Packed parts joined, or None when a merged seam would not fit a u32."""
    out: list[Buffer] = []
    count = size = longest = 0
    for part in parts:
        if not part.count:
            continue
        pieces = part.parts
        if count and _last_value(out) == _first_value(pieces):  # equal values at the seam: one run
            merged = _last_length(out) + _first_length(pieces)
            if merged > U32_MAX:
                return None
            value = _drop_last_run(out)
            out.append(_BE_U32.pack(merged) + value)
            pieces = _without_first_run(pieces)
            count -= 1
            longest = max(longest, merged)
        out += pieces
        count += part.count
        size += part.size_hint
        longest = max(longest, part.longest_hint)
    if len(out) > MAX_PACKED_PARTS:
        out = [b"".join(out)]
    return PackedRuns(out, count, size, longest)


# The seam helpers look at the 8 bytes of the first or last run of a list of
# buffers; a buffer holds whole runs, and none is empty.
def _first_value(parts: Sequence[Buffer]) -> bytes:
    return bytes(parts[0][4:8])


def _first_length(parts: Sequence[Buffer]) -> int:
    return _BE_U32.unpack_from(parts[0])[0]


def _last_value(parts: Sequence[Buffer]) -> bytes:
    last = parts[-1]
    return bytes(last[len(last) - 4:])


def _last_length(parts: Sequence[Buffer]) -> int:
    last = parts[-1]
    return _BE_U32.unpack_from(last, len(last) - 8)[0]


def _drop_last_run(parts: list[Buffer]) -> bytes:
    """Remove the last run from ``parts`` (in place); returns its value bytes."""
    last = parts.pop()
    if len(last) > 8:
        parts.append(memoryview(last)[:-8])
    return bytes(last[len(last) - 4:])


def _without_first_run(parts: list[Buffer]) -> list[Buffer]:
    first = parts[0]
    rest = parts[1:]
    if len(first) > 8:
        rest.insert(0, memoryview(first)[8:])
    return rest


def clipped(runs: AnyRuns, total: int) -> AnyRuns:
    """At most ``total`` bytes: the run that crosses it is shortened, later ones dropped."""
    if runs.total <= total:
        return runs
    runs = columns(runs)
    lengths = runs.lengths
    ends = list(accumulate(lengths))
    last = bisect_left(ends, total)  # first run that reaches ``total``
    out = lengths[:last + 1]
    out[last] -= ends[last] - total
    return Runs(out, runs.values[:last + 1], runs.normalized, total, runs.longest_hint)


def split_long(runs: AnyRuns, max_length: int) -> AnyRuns:
    """Cut runs longer than ``max_length`` into pieces of at most that length."""
    if not len(runs) or runs.longest <= max_length:
        return runs
    lengths: list[int] = []
    values: list[int] = []
    for length, value in runs:
        while length > max_length:
            lengths.append(max_length)
            values.append(value)
            length -= max_length
        lengths.append(length)
        values.append(value)
    return Runs(lengths, values)


#: A ``bytes.translate`` table: 0 for a zero byte, 1 for any other.
NONZERO_TO_ONE = bytes([0] + [1] * 255)


def byte_runs(data: bytes) -> Runs:
    """Runs of equal bytes (values the bytes, lengths in bytes).

    A byte that differs from the next one ends a run: there the XOR of the
    bytes with the bytes shifted by one is not zero, and bitarray finds those
    places in C; the values are the bytes where runs start.
    """
    if not data:
        return Runs([], [], True)
    changed = (int.from_bytes(data[:-1], "big") ^ int.from_bytes(data[1:], "big")).to_bytes(
        len(data) - 1, "big").translate(NONZERO_TO_ONE)
    bits = bitarray(endian="little")
    bits.pack(changed)
    ends = list(map(add, bits.search(1), repeat(1)))
    ends.append(len(data))
    starts = [0]
    starts += ends[:-1]
    values = [data[0]]
    values += compress(data[1:], changed)
    return Runs(list(map(sub, ends, starts)), values, True)


def bit_runs(bits: bitarray) -> Runs:
    """Runs of equal bits (values 0/1, lengths in bits).

    Every run boundary is a set bit of (bits XOR bits shifted by one):
    bitarray finds them in C, and the lengths are their differences.
    """
    if not bits:
        return Runs([], [], True)
    ends = list(map(add, (bits[1:] ^ bits[:-1]).search(1), repeat(1)))
    ends.append(len(bits))
    starts = [0]
    starts += ends[:-1]
    # Runs alternate between the two values, starting with the first bit.
    values = [bits[0], 1 - bits[0]] * ((len(ends) + 1) // 2)
    del values[len(ends):]
    return Runs(list(map(sub, ends, starts)), values, True)
