"""Block status: descriptor building (build_descriptors), descriptor encoding
(chunk_block_status) and the whole pipeline for one ``nbdinfo --map`` request
over the fragmented image the end-to-end benchmark uses (4 KiB of data every
64 KiB of a 1 GiB raw file: 16384 data extents, 16384 holes), plus the run
slicing that serves cached qcow2 L2 tables and dirty bitmaps."""

from __future__ import annotations

import pytest

from pynbd.image.base import STATE_DATA, STATE_HOLE_ZERO, Extents
from pynbd.protocol import wire
from pynbd.protocol.constants import MAX_EXTENTS_PER_CHUNK
from pynbd.protocol.contexts import resolve_queries
from pynbd.protocol.transmission import build_descriptors
from pynbd.runlength import Runs, concat
from pynbd.runspans import SpanRuns
from pynbd.server.contexts import PROVIDERS, ExtentQuery

GiB = 1 << 30

# 16384 x (4 KiB data, 60 KiB hole): what SEEK_DATA/SEEK_HOLE gives for the fragmented raw file.
FRAG_PAIRS = [run for _ in range(16384) for run in ((4096, STATE_DATA), (61440, STATE_HOLE_ZERO))]


def frag_runs(normalized: bool) -> Runs:
    runs = Runs.from_pairs(FRAG_PAIRS)
    runs.normalized = normalized
    return runs


class _FragImage:
    """Just enough of an Image for ExtentQuery: extents(offset, length)."""

    size = GiB

    def extents(self, offset, length, limit=None):
        runs = frag_runs(normalized=True)
        return Extents(offset, runs if limit is None else runs.head(limit), Runs([GiB], [1], True))


@pytest.mark.parametrize("normalized", [True, False], ids=["normalized", "unchecked"])
def test_descriptors_fragmented_32k_runs(benchmark, normalized):
    runs = frag_runs(normalized)
    out = benchmark(build_descriptors, runs, GiB, False)
    assert len(out) == 32768


def test_descriptors_uniform_32k_runs_into_one(benchmark):
    runs = Runs([4096] * 32768, [STATE_DATA] * 32768)
    out = benchmark(build_descriptors, runs, 32768 * 4096, False)
    assert list(out) == [(32768 * 4096, STATE_DATA)]


def test_descriptors_req_one(benchmark):
    runs = frag_runs(normalized=False)
    out = benchmark(build_descriptors, runs, GiB, True)
    assert list(out) == [(4096, STATE_DATA)]


@pytest.mark.parametrize("count", [1, 1024, 32768, MAX_EXTENTS_PER_CHUNK])
def test_encode_descriptors(benchmark, count):
    descs = Runs([4096 if i % 2 == 0 else 61440 for i in range(count)],
                 [STATE_DATA if i % 2 == 0 else STATE_HOLE_ZERO for i in range(count)], True)
    out = benchmark(wire.chunk_block_status, 1, 0, descs, True)
    assert len(out) == 20 + 4 + 8 * count


def test_span_slice_32k_runs(benchmark):
    """A cached L2 table or bitmap chunk: one request's slice of it."""
    span = SpanRuns(0, frag_runs(normalized=True))
    out = benchmark(span.slice, 100, GiB - 100)
    assert len(out) == 32768


def test_scan_request_over_cached_spans(benchmark):
    """One 4 GiB request of a bitmap scan: three 2 GiB chunks of cached runs (1024 each,
    a dirty 64 KiB every 4 MiB), sliced, joined and encoded as buffers for one sendmsg."""
    chunk = 2 * GiB
    pairs = Runs([65536, 4 * 1024 * 1024 - 65536] * 512, [1, 0] * 512, True)
    spans = [SpanRuns(i * chunk, pairs) for i in range(3)]
    start, length = chunk // 2 + 12345, 0xFFFFFFFF

    def one_request():
        parts, pos, end = [], start, start + length
        while pos < end:
            index = pos // chunk
            stop = min(end, (index + 1) * chunk)
            parts.append(spans[index].slice(pos, stop))
            pos = stop
        descs = build_descriptors(concat(parts), length, False)
        return wire.chunk_block_status_parts(42, 1, descs, True)

    out = benchmark(one_request)
    assert sum(map(len, out)) == 24 + 8 * 2049


def test_base_allocation_map_pipeline(benchmark):
    """Extents -> base:allocation runs -> descriptors -> one encoded chunk (one whole-image request)."""
    image = _FragImage()
    provider = next(p for p in PROVIDERS if "base:allocation" in p.names(image, {}))

    def one_request():
        query = ExtentQuery(image, 0, GiB)
        descs = build_descriptors(provider.runs("base:allocation", query, {}), GiB, False)
        return wire.chunk_block_status(42, 0, descs, True)

    out = benchmark(one_request)
    assert len(out) == 20 + 4 + 8 * 32768


def test_resolve_meta_context_queries(benchmark):
    available = ["base:allocation", "qemu:allocation-depth"] + [f"qemu:dirty-bitmap:b{i}" for i in range(8)]
    out = benchmark(resolve_queries, ["base:allocation", "qemu:dirty-bitmap:"], available, True)
    assert out[0] == "base:allocation" and len(out) == 9
