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
