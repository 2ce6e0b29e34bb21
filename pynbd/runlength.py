"""Run-length columns: a range described as consecutive runs with one value each.

Block status of a fragmented image is tens of thousands of runs per request.
Kept as two parallel lists (``lengths``, ``values``) instead of one tuple per
run, merging, clipping and encoding become ``itertools``/``operator``/``array``
loops that run in C, and Python code costs per request instead of per run
(bench/README.md, "block status"). The image drivers produce runs (from
bitarrays with :func:`bit_runs`, or cached as :class:`SpanRuns`), the protocol
layer turns them into descriptors; both use this module, which is pure (no I/O).
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate, compress, repeat
from operator import add, ne, sub

from bitarray import bitarray


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


def first_group(runs: Runs) -> Runs:
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


def normalize(runs: Runs) -> Runs:
    """Without empty runs and with equal neighbours merged, marked so."""
    if runs.normalized:
        return runs
    out = merged(without_empty(runs))
    return Runs(out.lengths, out.values, True, runs.size_hint)


def is_u32_array(column: Sequence[int]) -> bool:
    """True for an ``array('I')``: a column the wire encoder copies without converting."""
    return isinstance(column, array) and column.typecode == "I"


def concat(parts: Sequence[Runs]) -> Runs:
    """Runs of consecutive ranges, one after the other; normalized parts stay normalized.

    Parts in ``array('I')`` columns (slices of cached spans) give arrays, so
    the answer reaches the encoder without a conversion per run.
    """
    if len(parts) == 1:
        return parts[0]
    compact = all(is_u32_array(p.lengths) and is_u32_array(p.values) for p in parts)
    lengths: list[int] | array = array("I") if compact else []
    values: list[int] | array = array("I") if compact else []
    sizes_known = all(p.size_hint is not None for p in parts)
    longest_known = all(p.longest_hint is not None for p in parts)
    longest = max(p.longest_hint or 0 for p in parts) if longest_known else None
    for part in parts:
        if not part.lengths:
            continue
        if lengths and values[-1] == part.values[0]:  # the seam of two normalized parts
            try:
                lengths[-1] += part.lengths[0]
            except OverflowError:  # a merged run longer than a u32: go on in lists
                lengths, values = list(lengths), list(values)
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


class SpanRuns:
    """Normalized runs over a fixed span, indexed for slicing by bisection.

    Compact columns (16 bytes a run) because they are kept in caches; lengths
    and values are ``array('I')`` when every length fits a u32, so slices go
    to the wire encoder as they are (:func:`pynbd.protocol.wire.chunk_block_status`).
    """

    __slots__ = ("starts", "lengths", "values", "longest")

    def __init__(self, start: int, runs: Runs) -> None:
        runs = normalize(runs)
        self.starts = array("q", accumulate(runs.lengths[:-1], initial=start))
        self.longest = max(runs.lengths, default=0)
        self.lengths = array("I" if self.longest <= 0xFFFFFFFF else "Q", runs.lengths)
        self.values = array("I", runs.values)

    @property
    def nbytes(self) -> int:
        return (8 + self.lengths.itemsize + 4) * len(self.values)

    def slice(self, pos: int, end: int) -> Runs:
        """The runs of ``[pos, end)`` (inside the span), the outer two clipped."""
        first = bisect_right(self.starts, pos) - 1
        stop = bisect_left(self.starts, end)
        lengths = self.lengths[first:stop]
        lengths[0] -= pos - self.starts[first]
        lengths[-1] -= self.starts[stop - 1] + self.lengths[stop - 1] - end
        return Runs(lengths, self.values[first:stop], True, end - pos, self.longest)


def clipped(runs: Runs, total: int) -> Runs:
    """At most ``total`` bytes: the run that crosses it is shortened, later ones dropped."""
    lengths = runs.lengths
    if runs.total <= total:
        return runs
    ends = list(accumulate(lengths))
    last = bisect_left(ends, total)  # first run that reaches ``total``
    out = lengths[:last + 1]
    out[last] -= ends[last] - total
    return Runs(out, runs.values[:last + 1], runs.normalized, total, runs.longest_hint)


def split_long(runs: Runs, max_length: int) -> Runs:
    """Cut runs longer than ``max_length`` into pieces of at most that length."""
    if not runs.lengths or runs.longest <= max_length:
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
