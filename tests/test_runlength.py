"""Property tests of the run-length columns (pynbd/runlength.py) against byte-by-byte expansions."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.runlength import Runs, SpanRuns, clipped, concat, merged, normalize, split_long, without_empty

pairs = st.lists(st.tuples(st.integers(0, 12), st.integers(0, 3)), max_size=30)
nonempty_pairs = st.lists(st.tuples(st.integers(1, 12), st.integers(0, 3)), min_size=1, max_size=30)


def expand(runs) -> list[int]:
    """One value per byte."""
    return [value for length, value in runs for _ in range(length)]


def is_normalized(runs: Runs) -> bool:
    values = runs.values
    return 0 not in runs.lengths and all(a != b for a, b in zip(values, values[1:]))


@settings(max_examples=300)
@given(pairs)
def test_normalize_keeps_bytes_and_merges(p):
    runs = Runs.from_pairs(p)
    out = normalize(runs)
    assert expand(out) == expand(p)
    assert out.normalized and is_normalized(out)
    assert list(merged(without_empty(runs))) == list(out)


@settings(max_examples=300)
@given(pairs, st.integers(0, 400))
def test_clipped_is_a_prefix(p, total):
    out = clipped(Runs.from_pairs(p), total)
    assert expand(out) == expand(p)[:total]


@settings(max_examples=300)
@given(nonempty_pairs, st.integers(1, 5))
def test_split_long(p, max_length):
    out = split_long(Runs.from_pairs(p), max_length)
    assert expand(out) == expand(p)
    assert all(0 < n <= max_length for n in out.lengths)


@settings(max_examples=300)
@given(st.lists(nonempty_pairs, min_size=1, max_size=5))
def test_concat_of_normalized_parts_is_normalized(parts):
    normalized = [normalize(Runs.from_pairs(p)) for p in parts]
    out = concat(normalized)
    assert expand(out) == [v for p in parts for v in expand(p)]
    assert out.normalized and is_normalized(out)


@settings(max_examples=300)
@given(nonempty_pairs, st.integers(0, 1000), st.data())
def test_span_slice(p, start, data):
    span = SpanRuns(start, Runs.from_pairs(p))
    total = sum(n for n, _ in p)
    pos = data.draw(st.integers(start, start + total - 1))
    end = data.draw(st.integers(pos + 1, start + total))
    out = span.slice(pos, end)
    assert expand(out) == expand(p)[pos - start:end - start]
    assert is_normalized(out)


def test_span_slices_are_u32_arrays_and_concat_keeps_them():
    from array import array

    a = SpanRuns(0, Runs([100, 50], [1, 0]))
    b = SpanRuns(150, Runs([30, 20], [0, 1]))
    out = concat([a.slice(10, 150), b.slice(150, 200)])
    assert isinstance(out.lengths, array) and out.lengths.typecode == "I"
    assert list(out) == [(90, 1), (80, 0), (20, 1)]
    assert out.normalized


def test_concat_seam_longer_than_u32_falls_back_to_lists():
    big = 0xFFFFFFF0
    a = SpanRuns(0, Runs([big], [3]))
    b = SpanRuns(big, Runs([0x100, 5], [3, 0]))
    out = concat([a.slice(0, big), b.slice(big, big + 0x105)])
    assert list(out) == [(big + 0x100, 3), (5, 0)]


def test_wire_encoding_same_from_arrays_and_lists():
    from pynbd.protocol import wire

    span = SpanRuns(0, Runs([4096, 61440] * 100, [0, 3] * 100))
    from_arrays = wire.chunk_block_status(7, 1, span.slice(0, 65536 * 100), True)
    from_lists = wire.chunk_block_status(7, 1, Runs([4096, 61440] * 100, [0, 3] * 100), True)
    assert from_arrays == from_lists


@settings(max_examples=300)
@given(pairs)
def test_first_group_is_the_first_descriptor(p):
    from pynbd.runlength import first_group

    runs = Runs.from_pairs(p)
    full = list(normalize(runs))
    head = list(normalize(first_group(runs)))
    assert head == full[:1]
