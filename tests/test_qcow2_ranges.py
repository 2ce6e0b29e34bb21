"""Property tests of the range arithmetic: cluster splitting, run merging, the
chain walk and bitmap runs, each against a naive per-unit model."""

from __future__ import annotations

from collections.abc import Iterator

from bitarray import bitarray
from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.image.qcow2.bitmaps import DirectoryEntry, Qcow2Bitmap
from pynbd.image.qcow2.chain import (
    KIND_COMPRESSED,
    KIND_DATA,
    KIND_EOF,
    KIND_UNALLOC,
    KIND_ZERO,
    RESOLVED_ABSENT,
    RESOLVED_SHORT,
    Run,
    merge_runs,
    resolve,
)
from pynbd.image.qcow2.compression import compressed_range
from pynbd.image.qcow2.layer import split_clusters


@given(offset=st.integers(0, 1 << 40), length=st.integers(0, 1 << 22), bits=st.integers(9, 21))
def test_split_clusters_covers_exactly(offset: int, length: int, bits: int) -> None:
    unit = 1 << bits
    pos = offset
    pieces = list(split_clusters(offset, length, bits))
    for index, in_unit, n in pieces:
        assert n > 0
        assert index * unit + in_unit == pos  # contiguous, consistent
        assert in_unit + n <= unit  # never crosses a unit boundary
        pos += n
    assert pos == offset + length
    # Only the first and last piece may be partial.
    for _, in_unit, n in pieces[1:-1]:
        assert in_unit == 0 and n == unit


@given(cluster_bits=st.integers(9, 21), nsec=st.integers(0, 1 << 12), off=st.integers(0, 1 << 40))
def test_compressed_descriptor_roundtrip(cluster_bits: int, nsec: int, off: int) -> None:
    """§3.5: x = 62 - (cluster_bits - 8) splits offset and sector count."""
    x = 62 - (cluster_bits - 8)
    nsec %= 1 << (62 - x)
    entry = (1 << 62) | (nsec << x) | off
    rng = compressed_range(entry, cluster_bits)
    assert rng.offset == off
    assert rng.offset + rng.length == (off & ~511) + (nsec + 1) * 512


UNIT = 512
KINDS = st.sampled_from([KIND_DATA, KIND_ZERO, KIND_UNALLOC, KIND_COMPRESSED])


class FakeLayer:
    """A layer described per 512-byte unit: (kind, host) with host = unit index * 512 + base."""

    def __init__(self, kinds: list[int], hosts: list[int]) -> None:
        self.kinds = kinds
        self.hosts = hosts
        self.size = len(kinds) * UNIT
        self.path = "fake"

    def runs(self, offset: int, end: int) -> Iterator[Run]:
        stop = min(end, self.size)
        pieces = []
        for index, in_unit, n in split_clusters(offset, max(0, stop - offset), 9):
            kind = self.kinds[index]
            host = self.hosts[index] + in_unit if kind in (KIND_DATA, KIND_ZERO) else -1
            pieces.append((index * UNIT + in_unit, n, kind, host))
        yield from merge_runs(iter(pieces))
        if max(stop, offset) < end:
            yield max(stop, offset), end - max(stop, offset), KIND_EOF, -1


@st.composite
def chains(draw: st.DrawFn) -> list[FakeLayer]:
    layers = []
    for _ in range(draw(st.integers(1, 4))):
        n = draw(st.integers(1, 24))
        kinds = draw(st.lists(KINDS, min_size=n, max_size=n))
        # Hosts: mostly contiguous, sometimes jumping, so merging is exercised.
        hosts, h = [], draw(st.integers(0, 8)) * UNIT
        for _ in range(n):
            hosts.append(h)
            h += UNIT if draw(st.booleans()) else 7 * UNIT
        layers.append(FakeLayer(kinds, hosts))
    return layers


def naive(layers: list[FakeLayer], unit: int) -> tuple[int, int]:
    """(kind, layer) for one unit of the top image, following §3.6/§3.7 literally."""
    for idx, layer in enumerate(layers):
        if unit * UNIT >= layer.size:
            return RESOLVED_SHORT, idx
        kind = layer.kinds[unit]
        if kind != KIND_UNALLOC:
            return kind, idx
    return RESOLVED_ABSENT, len(layers) - 1


@settings(max_examples=400)
@given(layers=chains(), data=st.data())
def test_resolve_matches_naive_model(layers: list[FakeLayer], data: st.DataObject) -> None:
    size = layers[0].size
    offset = data.draw(st.integers(0, size - 1))
    end = data.draw(st.integers(offset + 1, size))
    pos = offset
    for rpos, n, idx, kind, host in resolve(layers, offset, end):
        assert rpos == pos and n > 0
        for p in range(rpos, rpos + n):
            assert naive(layers, p // UNIT) == (kind, idx)
            if kind in (KIND_DATA, KIND_ZERO):
                layer = layers[idx]
                assert host + (p - rpos) == layer.hosts[p // UNIT] + p % UNIT
        pos += n
    assert pos == end


@given(runs=st.lists(st.tuples(st.integers(1, 5), KINDS, st.booleans()), max_size=30))
def test_merge_runs_preserves_bytes(runs: list[tuple[int, int, bool]]) -> None:
    pieces, pos, host = [], 0, 0
    for n, kind, jump in runs:
        h = host + (1000 if jump else 0) if kind in (KIND_DATA, KIND_ZERO) else -1
        pieces.append((pos, n, kind, h))
        host = (h + n) if h >= 0 else host
        pos += n
    merged = list(merge_runs(iter(pieces)))

    def expand(rs: list[Run]) -> list[tuple[int, int]]:
        return [(k, h + i if h >= 0 else -1) for _, n, k, h in rs for i in range(n)]

    assert expand(merged) == expand(pieces)
    for a, b in zip(merged, merged[1:]):  # fully merged
        assert not (a[2] == b[2] != KIND_COMPRESSED and (a[3] == b[3] == -1 or (a[3] >= 0 and a[3] + a[1] == b[3])))


def make_bitmap(bits: bitarray, gbits: int, size: int) -> Qcow2Bitmap:
    entry = DirectoryEntry("t", 65536, 1, 2, gbits, 0)
    bm = Qcow2Bitmap("mem", -1, 0, 65536, size, entry, None)
    b = bits.copy()
    b.extend([0] * max(0, bm.nbits - len(b)))
    del b[bm.nbits:]
    bm._bits = b
    return bm


@settings(max_examples=300)
@given(raw=st.lists(st.booleans(), min_size=1, max_size=300), gbits=st.integers(9, 20), data=st.data())
def test_dirty_runs_matches_bits(raw: list[bool], gbits: int, data: st.DataObject) -> None:
    g = 1 << gbits
    size = data.draw(st.integers((len(raw) - 1) * g + 1, len(raw) * g))
    bm = make_bitmap(bitarray(raw, endian="little"), gbits, size)
    offset = data.draw(st.integers(0, size - 1))
    length = data.draw(st.integers(1, size - offset))
    pos = offset
    for n, dirty in bm.dirty_runs(offset, length):
        assert n > 0
        assert all(raw[k] == dirty for k in range(pos // g, (pos + n - 1) // g + 1))
        pos += n
    assert pos == offset + length


def test_dirty_runs_large_bitmap() -> None:
    """100 GiB at 64 KiB granularity: 1.6M bits, a few thousand runs (speed: bench/)."""
    size = 100 << 30
    bits = bitarray(size >> 16, endian="little")
    bits.setall(0)
    for k in range(0, len(bits), 1000):
        bits[k:k + 3] = 1
    bm = make_bitmap(bits, 16, size)
    runs = list(bm.dirty_runs(0, size))
    assert len(runs) == 2 * len(range(0, len(bits), 1000))
    assert sum(n for n, d in runs if d) == 3 * 65536 * len(range(0, len(bits), 1000))


@settings(max_examples=300)
@given(raw=st.lists(st.booleans(), min_size=1, max_size=300), gbits=st.integers(9, 20), data=st.data())
def test_dirty_runs_with_limit_are_a_prefix(raw: list[bool], gbits: int, data: st.DataObject) -> None:
    """REQ_ONE asks for a few runs: they must be the first runs of the full answer (the
    last one possibly shorter only where the limit cut it), never more than the limit."""
    g = 1 << gbits
    size = data.draw(st.integers((len(raw) - 1) * g + 1, len(raw) * g))
    bm = make_bitmap(bitarray(raw, endian="little"), gbits, size)
    offset = data.draw(st.integers(0, size - 1))
    length = data.draw(st.integers(1, size - offset))
    limit = data.draw(st.sampled_from([1, 2, 3, 16, 63, 64, 100]))
    full = bm.dirty_runs(offset, length)
    limited = bm.dirty_runs(offset, length, limit)
    assert 1 <= len(limited) <= limit
    assert list(limited) == list(full)[:len(limited)]


@settings(max_examples=200)
@given(raw=st.lists(st.booleans(), min_size=1, max_size=120), gbits=st.integers(9, 16), data=st.data())
def test_dirty_runs_across_cached_chunks(raw: list[bool], gbits: int, data: st.DataObject) -> None:
    """Whole-range answers come from cached chunks of runs: with 8-granule chunks a range
    crosses many of them, and asking again (from the cache) gives the same runs."""
    from unittest import mock

    from pynbd.image import dirtybitmap as bitmaps

    g = 1 << gbits
    size = data.draw(st.integers((len(raw) - 1) * g + 1, len(raw) * g))
    with mock.patch.object(bitmaps, "RUN_CHUNK_BYTES", 8 * g):
        bm = make_bitmap(bitarray(raw, endian="little"), gbits, size)
        offset = data.draw(st.integers(0, size - 1))
        length = data.draw(st.integers(1, size - offset))
        first = list(bm.dirty_runs(offset, length))
        again = list(bm.dirty_runs(offset, length))
    assert first == again
    assert sum(n for n, _ in first) == length
    assert all(a[1] != b[1] for a, b in zip(first, first[1:]))  # merged across chunk seams
    pos = offset
    for n, dirty in first:
        assert n > 0
        assert all(raw[k] == dirty for k in range(pos // g, (pos + n - 1) // g + 1))
        pos += n


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 3000), min_size=1, max_size=40), dirty_first=st.booleans(),
       gbits=st.integers(9, 15))
def test_chunks_by_bit_search_and_by_bytes_agree(lengths: list[int], dirty_first: bool, gbits: int) -> None:
    """A bitmap finer than UNIT_RUNS_GRANULARITY keeps chunks of more than MAX_UNITS
    granules, their runs found by bit search; the same bits in chunks of MAX_UNITS
    granules get theirs from byte operations (pynbd.unitruns). Both give the runs the
    bits have."""
    from unittest import mock

    from pynbd.image import dirtybitmap as bitmaps
    from pynbd.unitruns import MAX_UNITS

    g = 1 << gbits
    lengths = [*lengths, MAX_UNITS]  # (more granules than one chunk of bytes holds)
    values = [(k % 2 == 0) == dirty_first for k in range(len(lengths))]
    bits = bitarray(endian="little")
    for n, dirty in zip(lengths, values):
        bits.extend([dirty] * n)
    size = len(bits) * g
    by_search = make_bitmap(bits, gbits, size)
    with mock.patch.object(bitmaps, "RUN_CHUNK_BYTES", MAX_UNITS * g):
        by_bytes = make_bitmap(bits, gbits, size)
        assert by_search._chunk_granules >= len(bits) > MAX_UNITS  # (one chunk, by bit search)
        assert by_bytes._chunk_granules == MAX_UNITS
        want = [(n * g, int(dirty)) for n, dirty in zip(lengths, values)]
        assert list(by_search.dirty_runs(0, size)) == want
        assert list(by_bytes.dirty_runs(0, size)) == want


def bare_layer(cluster_bits: int, version: int):
    """A Qcow2Layer with just what L2 classification reads (no file)."""
    from pynbd.image.qcow2.layer import Qcow2Layer

    layer = Qcow2Layer.__new__(Qcow2Layer)
    layer.path = "mem.qcow2"
    layer.cluster_bits = cluster_bits
    layer.cluster_size = 1 << cluster_bits
    layer.l2_bits = cluster_bits - 3
    layer.extended_l2 = False
    layer.has_data_file = False
    layer.zero_flag_allowed = version >= 3
    return layer


ENTRY_KINDS = st.sampled_from(["unallocated", "data", "data-copied", "zero", "zero-alloc", "compressed",
                               "misaligned"])


@settings(max_examples=300, deadline=None)
@given(cluster_bits=st.sampled_from([9, 12, 16, 21]), version=st.sampled_from([2, 3]),
       kinds=st.lists(ENTRY_KINDS, min_size=1, max_size=64), data=st.data())
def test_vectorised_l2_classification_matches_the_loop(cluster_bits, version, kinds, data):
    """The byte-wise classification of a whole L2 table gives the per-entry loop's runs, or
    declines (None) where only the loop knows the answer or the error."""
    from array import array

    from pynbd.image.base import ImageIOError
    from pynbd.image.qcow2.l2cache import Table
    from pynbd.image.qcow2.tableruns import TableRuns

    layer = bare_layer(cluster_bits, version)
    cs = layer.cluster_size
    entries = []
    for i, kind in enumerate(kinds):
        host = (i + 7) * cs
        entries.append({"unallocated": 0, "data": host, "data-copied": host | 1 << 63, "zero": 1,
                        "zero-alloc": host | 1, "compressed": 1 << 62 | (i * 977) % (1 << 40) + 1,
                        "misaligned": host + 512 if cluster_bits > 9 else host}[kind])
    n = 1 << layer.l2_bits
    entries += [0] * (n - len(entries))
    raw = array("Q", entries)
    raw.byteswap()  # to big-endian, as on disk
    table = Table((1, 0), raw.tobytes())
    span = n * cs
    end = data.draw(st.integers(max(1, span - cs + 1), span))  # a partial last cluster at the image end
    fast = layer._classify_plain_table(table, 0, end)
    try:
        slow = TableRuns.classify(0, layer._table_pieces(table, 0, end))
    except ImageIOError:
        assert fast is None
        return
    if "compressed" in kinds or ("misaligned" in kinds and cluster_bits > 9) or (
            version == 2 and ({"zero", "zero-alloc"} & set(kinds))):
        assert fast is None
        return
    assert fast is not None
    pos = data.draw(st.integers(0, end - 1))
    stop = data.draw(st.integers(pos + 1, end))
    for column in ("allocation", "depth"):
        for a, b in ((0, end), (pos, stop)):
            assert list(getattr(fast, column).slice(a, b)) == list(getattr(slow, column).slice(a, b))


def test_bitmap_run_cache_is_bounded() -> None:
    """Chunks of runs are kept up to a count, and a chunk with too many runs is not kept."""
    from unittest import mock

    from pynbd.image import dirtybitmap as bitmaps

    g = 1 << 9
    bits = bitarray(64 * 8, endian="little")
    bits.setall(0)
    bits[0:8:2] = 1  # chunk 0: a few runs
    bits[8 * 8:16 * 8] = bitarray("01" * 32)  # chunk 1: one run per granule
    with mock.patch.object(bitmaps, "RUN_CHUNK_BYTES", 64 * g), \
            mock.patch.object(bitmaps, "RUN_CHUNKS_CACHED", 3), \
            mock.patch.object(bitmaps, "MAX_CACHED_CHUNK_BYTES", 40 * 10):  # (10 to 16 bytes a run)
        bm = make_bitmap(bits, 9, len(bits) * g)
        whole = list(bm.dirty_runs(0, len(bits) * g))
        assert sum(n for n, _ in whole) == len(bits) * g
        assert len(bm._run_cache) == 3  # 8 chunks asked for, the last 3 kept (LRU)
        bm._run_cache.clear()
        list(bm.dirty_runs(0, 64 * g))
        list(bm.dirty_runs(64 * g, 64 * g))
        assert list(bm._run_cache) == [0]  # chunk 1 has 64 runs: over the 40-run limit
        assert list(bm.dirty_runs(0, len(bits) * g)) == whole


def expand_runs(runs) -> list[int]:
    return [value for length, value in runs for _ in range(length)]


@settings(max_examples=300, deadline=None)
@given(values=st.one_of(st.lists(st.integers(0, 3), min_size=1, max_size=200),
                        st.lists(st.sampled_from([0, 3, 0xFF]), min_size=1, max_size=40),
                        st.integers(1, 200).map(lambda n: [0, 3] * n)),
       unit_bits=st.sampled_from([9, 12, 16, 17]), data=st.data())
def test_unit_runs_are_the_runs_of_the_units(values: list[int], unit_bits: int, data: st.DataObject) -> None:
    """unit_runs (byte and big-integer operations) gives the runs of the per-unit values,
    merged, with the last unit partial, and slices like the list-built span."""
    from pynbd.unitruns import unit_runs, unit_runs_by_lists
    from pynbd.runlength import columns

    column = bytes(values)
    unit = 1 << unit_bits
    n = len(column)
    span = data.draw(st.integers((n - 1) * unit + 1, n * unit), "span")
    start = data.draw(st.integers(0, 1 << 20), "start") << 29
    fast = unit_runs(start, column, unit_bits, span)
    reference = unit_runs_by_lists(start, column, unit_bits, span)
    assert fast.packed == reference.packed
    lengths = list(columns(fast.slice(start, start + span)).lengths)
    assert fast.end == start + span and fast.longest >= max(lengths)
    pos = data.draw(st.integers(start, start + span - 1), "pos")
    end = data.draw(st.integers(pos + 1, start + span), "end")
    got = fast.slice(pos, end)
    assert list(got) == list(reference.slice(pos, end))
    assert expand_runs(columns(got)) == [v for v in column for _ in range(unit)][pos - start:end - start]


def test_unit_runs_of_large_columns() -> None:
    """A full L2 table of 64 KiB clusters (a run per cluster), the largest column the byte
    path takes, and one past it (the list path) give the same runs as the lists."""
    from pynbd.unitruns import MAX_UNITS, unit_runs, unit_runs_by_lists

    for column, unit_bits in ((bytes([0, 3]) * 4096, 16), (bytes([0, 0, 2, 3]) * (MAX_UNITS // 4), 12),
                              (bytes([1, 0]) * (MAX_UNITS // 2 + 1), 9)):
        span = len(column) << unit_bits
        fast = unit_runs(1 << 40, column, unit_bits, span)
        reference = unit_runs_by_lists(1 << 40, column, unit_bits, span)
        assert fast.packed == reference.packed
        for pos, end in ((1 << 40, (1 << 40) + span), ((1 << 40) + 100, (1 << 40) + span // 2 + 7)):
            assert list(fast.slice(pos, end)) == list(reference.slice(pos, end))


@settings(max_examples=200, deadline=None)
@given(kinds=st.lists(st.integers(0, 3), min_size=1, max_size=120),
       value_of_kind=st.tuples(*[st.sampled_from([0, 1, 2, 3, 300]) for _ in range(4)]),
       unit_bits=st.sampled_from([9, 16]), data=st.data())
def test_cluster_kinds_columns_are_the_kinds_mapped(kinds: list[int], value_of_kind: tuple[int, ...],
                                                    unit_bits: int, data: st.DataObject) -> None:
    """A table kept as one kind byte per cluster gives, for any mapping of kinds to values
    (keeping them apart, merging some, or values that are not bytes), the runs of the
    mapped clusters, and each context's runs once."""
    from pynbd.image.qcow2.tableruns import ClusterKinds
    from pynbd.runlength import columns

    unit = 1 << unit_bits
    n = len(kinds)
    span = data.draw(st.integers((n - 1) * unit + 1, n * unit), "span")
    start = 5 << 30
    table = ClusterKinds(start, bytes(kinds), unit_bits, span, 1)
    column = table.column(value_of_kind)
    assert table.column(value_of_kind) is column
    expected = [value_of_kind[k] for k in kinds for _ in range(unit)][:span]
    pos = data.draw(st.integers(start, start + span - 1), "pos")
    end = data.draw(st.integers(pos + 1, start + span), "end")
    for a, b in ((start, start + span), (pos, end)):
        got = columns(column.slice(a, b))
        assert expand_runs(got) == expected[a - start:b - start]
        assert all(x != y for x, y in zip(got.values, list(got.values)[1:]))  # neighbours merged
