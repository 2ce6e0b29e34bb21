"""Property tests of the run-length columns (pynbd/runlength.py) against byte-by-byte expansions."""

from __future__ import annotations

from itertools import groupby

from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.runlength import (
    PackedRuns,
    Runs,
    byte_runs,
    clipped,
    concat,
    merged,
    normalize,
    pack_pairs,
    split_long,
    without_empty,
)
from pynbd.runspans import RunIndex, SpanRuns

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


def test_span_slices_are_views_and_concat_keeps_them_packed():
    a = SpanRuns(0, Runs([100, 50, 7, 3], [1, 0, 1, 0]))
    b = SpanRuns(160, Runs([30, 20], [0, 1]))
    first = a.slice(10, 160)
    assert isinstance(first, PackedRuns)
    # The runs between the two rewritten outer ones are a view of the span's bytes, not a copy.
    assert any(isinstance(part, memoryview) and part.obj is a.packed for part in first.parts)
    out = concat([first, b.slice(160, 210)])
    assert isinstance(out, PackedRuns)
    assert list(out) == [(90, 1), (50, 0), (7, 1), (33, 0), (20, 1)]
    assert (len(out), out.total, out.longest) == (5, 200, 100)
    assert out.data == pack_pairs([90, 50, 7, 33, 20], [1, 0, 1, 0, 1])


@settings(max_examples=300)
@given(st.lists(st.tuples(nonempty_pairs, st.data()), min_size=1, max_size=6), st.integers(0, 3))
def test_concat_of_span_slices_is_the_expansion(spans, plain_value):
    """Slices of packed spans, with short plain runs between some of them (holes
    between cached tables), concatenate to the bytes they describe, normalized and
    packed, and encode as the same chunk as their columns."""
    from pynbd.protocol import wire

    parts = []
    expected: list[int] = []
    pos = 0
    for index, (p, data) in enumerate(spans):
        span = SpanRuns(pos, Runs.from_pairs(p))
        total = sum(n for n, _ in p)
        start = data.draw(st.integers(pos, pos + total - 1))
        end = data.draw(st.integers(start + 1, pos + total))
        parts.append(span.slice(start, end))
        expected += expand(p)[start - pos:end - pos]
        if index % 2:
            parts.append(Runs([3], [plain_value], True, 3, 3))
            expected += [plain_value] * 3
        pos += total
    out = concat(parts)
    assert isinstance(out, PackedRuns)
    assert expand(out) == expected
    assert is_normalized(out.unpacked()) and len(out) == len(out.unpacked())
    assert out.total == len(expected)
    assert wire.chunk_block_status(9, 1, out, True) == wire.chunk_block_status(9, 1, out.unpacked(), True)


def test_packed_head_and_many_parts():
    span = SpanRuns(0, Runs([2, 3] * 200, [0, 1] * 200))
    parts = [span.slice(5 * i, 5 * i + 5) for i in range(200)]  # each slice: runs 2 and 3
    out = concat(parts)
    assert len(out.parts) == 1  # more than MAX_PACKED_PARTS buffers are joined
    assert list(out) == [(2, 0), (3, 1)] * 200
    head = out.head(3)
    assert list(head) == [(2, 0), (3, 1), (2, 0)] and head.total == 7 and len(head) == 3


@settings(max_examples=200)
@given(st.lists(nonempty_pairs, min_size=1, max_size=6), st.data())
def test_packed_head_is_a_prefix_of_the_parts(spans, data):
    """head() of packed runs gathered from several spans: the first runs, as views into
    the same buffers, with their size (counted from either end)."""
    parts = []
    pos = 0
    for p in spans:
        span = SpanRuns(pos, Runs.from_pairs(p))
        total = sum(n for n, _ in p)
        parts.append(span.slice(pos, pos + total))
        pos += total
    out = concat(parts)
    assert isinstance(out, PackedRuns)
    expected = list(out)
    count = data.draw(st.integers(1, len(expected) + 1))
    head = out.head(count)
    assert list(head) == expected[:count] and len(head) == min(count, len(expected))
    assert head.total == sum(n for n, _ in expected[:count])


def test_span_with_unit_starts_slices_like_byte_starts():
    """A span whose run starts are unit indexes (base + index << shift) slices as the same
    runs kept with byte offsets, the whole span as its own bytes."""
    from array import array

    lengths, values = [3, 1, 4, 1, 5], [0, 1, 0, 2, 0]
    unit, base = 512, 1 << 33
    plain = SpanRuns(base, Runs([n * unit for n in lengths], values))
    unit_starts = array("H", [0, 3, 4, 8, 9])
    shifted = SpanRuns.from_packed(plain.packed, unit_starts, base, 9, base + 14 * unit, 5 * unit)
    assert shifted.start == base and shifted.nbytes == 2 * 5 + 8 * 5
    whole = shifted.slice(base, base + 14 * unit)
    assert isinstance(whole, PackedRuns) and whole.parts == [plain.packed]
    for pos in range(base, base + 14 * unit, 200):
        for end in range(pos + 1, base + 14 * unit + 1, 311):
            assert list(shifted.slice(pos, end)) == list(plain.slice(pos, end)), (pos, end)


def test_span_with_a_run_longer_than_u32_slices_into_columns():
    big = 0x1_0000_0000 + 5
    span = SpanRuns(0, Runs([10, big, 10], [0, 1, 0]))
    assert span.packed is None
    out = span.slice(5, big + 15)
    assert not isinstance(out, PackedRuns)
    assert list(out) == [(5, 0), (big, 1), (5, 0)]


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


@settings(max_examples=500)
@given(pairs, st.integers(0, 50), st.booleans(), st.integers(-5, 420), st.integers(1, 420))
def test_run_index_answers_like_the_expansion(p, start, open_end, offset, length):
    """run_at: from ``offset`` to where the value changes (or ``end``); None only outside
    the runs or in an open last run that ``end`` reaches past."""
    index = RunIndex(start, Runs.from_pairs(p), open_end)
    values = expand(p)
    end = offset + length
    got = index.run_at(offset, end)
    inside = start <= offset < start + len(values)
    if not inside:
        assert got is None
        return
    value = values[offset - start]
    run_end = offset
    while run_end - start < len(values) and values[run_end - start] == value:
        run_end += 1
    in_last_run = run_end == start + len(values)
    if open_end and in_last_run and run_end < end:
        assert got is None
    else:
        assert got == (min(run_end, end) - offset, value)
    assert len(index) == len(normalize(Runs.from_pairs(p)))


@given(st.binary(max_size=64))
def test_byte_runs_are_the_runs_of_equal_bytes(data: bytes) -> None:
    runs = byte_runs(data)
    assert list(runs) == [(len(list(group)), value) for value, group in groupby(data)]


@given(st.lists(st.tuples(st.integers(1, 1 << 33), st.integers(0, 5)), max_size=24),
       st.lists(st.integers(0, 300), min_size=6, max_size=6))
def test_mapped_span_equals_the_runs_mapped_and_merged(pairs, value_of) -> None:
    """SpanRuns.mapped gives the runs with values mapped and equal neighbours merged, whether
    it shares the boundaries (values kept apart) or builds the runs anew (some merge)."""
    start = 4096
    span = SpanRuns(start, Runs([n for n, _ in pairs], [v for _, v in pairs]))
    expected = normalize(Runs([n for n, _ in pairs], [value_of[v] for _, v in pairs]))
    got = span.mapped(value_of)
    if pairs:
        assert list(got.slice(start, start + expected.total)) == list(expected)
