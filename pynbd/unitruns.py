"""Runs of a column of per-unit values (one byte per unit), found without work per run.

An L2 table classified for block status is one value byte per cluster, a chunk
of a dirty bitmap one byte per granule (its bits unpacked); their runs are
wanted as a :class:`~pynbd.runspans.SpanRuns`: big-endian u32
``(length, value)`` pairs and the first unit of every run. A fragmented table
or bitmap has a run per unit or two, and a loop, or even a chain of ``map()``
passes, over thousands of runs is most of the cost of a first whole-image map.
:func:`unit_runs` gets there with byte operations (``translate``, extended slice
assignment) and arithmetic on big integers whose 16- or 32-bit lanes hold one
run each and never borrow from or carry into each other:

1. run starts: a unit starts a run where its value differs from the previous
   one (XOR of the column with itself shifted by one unit);
2. their indexes: every unit's index is kept, written as two 7-bit digits, and
   the indexes of units that start no run are overwritten with 0xFF bytes and
   deleted (``bytes.translate(None, b"\\xff")``: compaction in C); the digits
   become u16 lanes (a high digit counts 128, not 256);
3. run lengths: the indexes as lanes of one integer, subtracted from the same
   integer shifted by one lane (every difference is positive: no borrow), times
   the unit;
4. run values: the column with the same 0xFF overwrite and deletion.

Columns it cannot do that way (more units than two digits index, units whose
lengths together do not fit a u32, a 0xFF value) take the list path (:func:`byte_runs`).
"""

from __future__ import annotations

import sys
from array import array
from itertools import repeat
from operator import mul

from pynbd.protocol.wire import DESCRIPTOR
from pynbd.runlength import U32_MAX, Runs, byte_runs
from pynbd.runspans import SpanRuns

#: Units a column may have for the fast path: indexes are two 7-bit digits.
MAX_UNITS = 1 << 14
_SENTINEL = b"\xff"


def _digit_pairs() -> bytes:
    """Two 7-bit digits (high, low) of every index below MAX_UNITS."""
    out = bytearray(2 * MAX_UNITS)
    out[0::2] = b"".join(bytes([high]) * 128 for high in range(MAX_UNITS >> 7))
    out[1::2] = bytes(range(128)) * (MAX_UNITS >> 7)
    return bytes(out)


_INDEX_DIGITS = _digit_pairs()
#: 0xFF00 in every u16 lane of MAX_UNITS lanes: the high digits (shifted right, the top lanes go).
_HIGH_BYTES_BITS = 16 * MAX_UNITS
_HIGH_BYTES = int.from_bytes(b"\xff\x00" * MAX_UNITS, "big")
#: ``translate`` table: a unit that differs from the previous one (a non-zero XOR byte)
#: becomes 0x00, one that does not the sentinel.
_SENTINEL_UNLESS_CHANGED = bytes([0xFF] + [0] * 255)


def unit_runs(start: int, values: bytes, unit_bits: int, span: int) -> SpanRuns:
    """The runs of ``values`` (one byte per unit of ``1 << unit_bits`` bytes, the last unit
    possibly partial) over guest bytes ``[start, start + span)``, neighbours merged.

    ``span`` must lie in ``((len(values) - 1) << unit_bits, len(values) << unit_bits]``
    (ValueError otherwise). The span keeps its starts as unit indexes.
    """
    n = len(values)
    if not (n - 1) << unit_bits < span <= n << unit_bits:
        raise ValueError(f"span {span} does not fit {n} units of {1 << unit_bits} bytes")
    if n < 2 or n > MAX_UNITS or n << unit_bits > U32_MAX or _SENTINEL in values:
        return unit_runs_by_lists(start, values, unit_bits, span)
    column = int.from_bytes(values, "big")
    changed = (column >> 8) ^ column  # byte k (k > 0): unit k differs from unit k - 1
    if changed == values[0] << (8 * (n - 1)):  # no unit differs from the one before: one run
        return SpanRuns.from_packed(DESCRIPTOR.pack(span, values[0]), array("H", [0]), start, unit_bits,
                                    start + span, span)
    # 1. one flag byte per unit, the sentinel where no run starts (the first unit always starts one)
    sentinel_mask = b"\x00" + changed.to_bytes(n, "big")[1:].translate(_SENTINEL_UNLESS_CHANGED)
    # 2. the indexes of the run starts, as two 7-bit digits each, then as u16 lanes
    spread = bytearray(2 * n)
    spread[0::2] = sentinel_mask
    spread[1::2] = sentinel_mask
    digits = (_index_digits(n) | int.from_bytes(spread, "big")).to_bytes(2 * n, "big").translate(None, _SENTINEL)
    count = len(digits) // 2
    lanes = int.from_bytes(digits, "big")
    lane_bits = 16 * count
    first_units = lanes - ((lanes & (_HIGH_BYTES >> (_HIGH_BYTES_BITS - lane_bits))) >> 1)  # 128 high + low
    starts = array("H")
    starts.frombytes(first_units.to_bytes(2 * count, "big"))
    if sys.byteorder == "little":
        starts.byteswap()
    # 3. lengths in units: the next run's first unit (n after the last) minus this one's
    units = ((((first_units << 16) | n) & ((1 << lane_bits) - 1)) - first_units).to_bytes(2 * count, "big")
    packed = bytearray(8 * count)
    if unit_bits == 16:  # 64 KiB units: the u32 length is the u16 and two zero bytes
        packed[0::8] = units[0::2]
        packed[1::8] = units[1::2]
    else:  # the u16 widened to u32 lanes and shifted there
        wide = bytearray(4 * count)
        wide[2::4] = units[0::2]
        wide[3::4] = units[1::2]
        length_bytes = (int.from_bytes(wide, "big") << unit_bits).to_bytes(4 * count, "big")
        for k in range(4):
            packed[k::8] = length_bytes[k::4]
    if span != n << unit_bits:  # the last unit is partial
        packed[-8:-4] = (span - (starts[-1] << unit_bits)).to_bytes(4, "big")
    # 4. values: the column with the same units overwritten and deleted
    packed[7::8] = (column | int.from_bytes(sentinel_mask, "big")).to_bytes(n, "big").translate(None, _SENTINEL)
    return SpanRuns.from_packed(bytes(packed), starts, start, unit_bits, start + span,
                                _longest_bound(span, count, unit_bits))


def _index_digits(n: int) -> int:
    """The two 7-bit digits of every index below ``n``, as one big-endian integer."""
    digits = _INDEX_DIGITS_INT.get(n)
    if digits is None:
        if len(_INDEX_DIGITS_INT) >= 8:  # a few table sizes per process; keep it small anyway
            _INDEX_DIGITS_INT.clear()
        digits = _INDEX_DIGITS_INT[n] = int.from_bytes(_INDEX_DIGITS[:2 * n], "big")
    return digits


_INDEX_DIGITS_INT: dict[int, int] = {}


def _longest_bound(span: int, count: int, unit_bits: int) -> int:
    """A bound on the longest of ``count`` runs over ``span``: all but one have a whole
    unit or more, except that the last may have a byte."""
    return span if count == 1 else span - ((count - 2) << unit_bits) - 1


def unit_runs_by_lists(start: int, values: bytes, unit_bits: int, span: int) -> SpanRuns:
    """:func:`unit_runs` through run lists (any column; work per run); starts in bytes."""
    runs = byte_runs(values)
    lengths = list(map(mul, runs.lengths, repeat(1 << unit_bits)))
    lengths[-1] -= (len(values) << unit_bits) - span
    return SpanRuns(start, Runs(lengths, runs.values, True, span, span if span <= U32_MAX else None))
