"""Block status: extent merging (build_descriptors), descriptor encoding
(chunk_block_status) and the whole pipeline for one ``nbdinfo --map`` request
over the fragmented image the end-to-end benchmark uses (4 KiB of data every
64 KiB of a 1 GiB raw file: 16384 data extents, 16384 holes)."""

from __future__ import annotations

import pytest

from pynbd.image.base import Extent
from pynbd.protocol import wire
from pynbd.protocol.constants import MAX_EXTENTS_PER_CHUNK
from pynbd.protocol.contexts import resolve_queries
from pynbd.protocol.transmission import build_descriptors
from pynbd.server.contexts import PROVIDERS, ExtentQuery

GiB = 1 << 30
HOLE_ZERO = 3  # NBD_STATE_HOLE | NBD_STATE_ZERO

# 16384 x (4 KiB data, 60 KiB hole): what SEEK_DATA/SEEK_HOLE gives for the fragmented raw file.
FRAG_RUNS = [run for _ in range(16384) for run in ((4096, 0), (61440, HOLE_ZERO))]
# The same byte range cut into 4 KiB runs of one status: all of it merges into one descriptor.
UNIFORM_RUNS = [(4096, 0)] * 32768


def _extent(**kw):
    return Extent(**kw)


def _frag_extents():
    out, off = [], 0
    for length, status in FRAG_RUNS:
        data = status == 0
        out.append(_extent(offset=off, length=length, data=data, zero=not data, depth=1 if data else 0))
        off += length
    return out


class _FragImage:
    """Just enough of an Image for ExtentQuery: extents(offset, length)."""

    size = GiB

    def __init__(self):
        self._extents = _frag_extents()

    def extents(self, offset, length, limit=None):
        return self._extents if limit is None else self._extents[:limit]


def test_merge_fragmented_32k_runs(benchmark):
    out = benchmark(build_descriptors, FRAG_RUNS, GiB, False)
    assert len(out) == 32768


def test_merge_uniform_32k_runs_into_one(benchmark):
    out = benchmark(build_descriptors, UNIFORM_RUNS, 32768 * 4096, False)
    assert out == [(32768 * 4096, 0)]


def test_merge_req_one(benchmark):
    out = benchmark(build_descriptors, FRAG_RUNS, GiB, True)
    assert out == [(4096, 0)]


@pytest.mark.parametrize("count", [1, 1024, 32768, MAX_EXTENTS_PER_CHUNK])
def test_encode_descriptors(benchmark, count):
    descs = [(4096 if i % 2 == 0 else 61440, 0 if i % 2 == 0 else HOLE_ZERO) for i in range(count)]
    out = benchmark(wire.chunk_block_status, 1, 0, descs, True)
    assert len(out) == 20 + 4 + 8 * count


def test_base_allocation_map_pipeline(benchmark):
    """Extents -> base:allocation runs -> merged descriptors -> one encoded chunk (one whole-image request)."""
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
