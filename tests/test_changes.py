"""The change feed (pynbd.image.changes) and what the qcow2 driver drops when it hears it.

ChangeFeed on its own: order, removal during an announcement, failures, the
announce-twice helper. The qcow2 driver on images built with qemu-img/qemu-io:
its cached metadata is changed in memory the way a writer will change it (an L2
entry in the cached table, a bit in a loaded bitmap), and block status must
follow once the range is announced — and still give the old answer without the
announcement (the cache is real) — while caches of other ranges stay.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pynbd.image import open_image
from pynbd.image.base import STATE_DATA, STATE_HOLE_ZERO, ZeroSegment
from pynbd.image.changes import ChangeFeed
from pynbd.image.qcow2 import Qcow2Image
from pynbd.image.qcow2.l2cache import Table
from pynbd.image.qcow2.layer import L1E_OFFSET_MASK, OFLAG_ZERO
from pynbd.runlength import columns, normalize
from tests.qcow2_fixtures import BUILD_TOOLS, MiB, qimg, qio, set_u64

GiB = 1 << 30
CLUSTER = 64 * 1024
#: Guest bytes one L2 table maps with 64 KiB clusters (8192 entries).
TABLE_SPAN = 512 * MiB


# --- ChangeFeed on its own ----------------------------------------------------------


def test_announce_calls_listeners_in_order_with_the_range() -> None:
    feed = ChangeFeed()
    heard: list[tuple[str, int, int]] = []
    feed.listen(lambda o, n: heard.append(("a", o, n)))
    feed.listen(lambda o, n: heard.append(("b", o, n)))
    feed.announce(4096, 512)
    assert heard == [("a", 4096, 512), ("b", 4096, 512)]


def test_unlisten_stops_calls_and_unknown_listener_raises() -> None:
    feed = ChangeFeed()
    heard: list[int] = []

    def listener(offset: int, length: int) -> None:
        heard.append(offset)

    feed.listen(listener)
    feed.announce(1, 1)
    feed.unlisten(listener)
    feed.announce(2, 1)
    assert heard == [1] and feed.listeners == ()
    with pytest.raises(ValueError):
        feed.unlisten(listener)


def test_listener_removed_during_an_announcement() -> None:
    """A listener that removes itself, or removes one after it, during an announcement:
    every other listener is still called once, the removed one not after its removal."""
    feed = ChangeFeed()
    heard: list[str] = []

    def first(offset: int, length: int) -> None:
        heard.append("first")
        feed.unlisten(first)
        feed.unlisten(third)

    def second(offset: int, length: int) -> None:
        heard.append("second")

    def third(offset: int, length: int) -> None:
        heard.append("third")

    for listener in (first, second, third):
        feed.listen(listener)
    feed.announce(0, 1)
    assert heard == ["first", "second"]
    feed.announce(0, 1)
    assert heard == ["first", "second", "second"]


def test_listener_added_during_an_announcement_hears_the_next_one() -> None:
    feed = ChangeFeed()
    heard: list[str] = []

    def late(offset: int, length: int) -> None:
        heard.append("late")

    def adder(offset: int, length: int) -> None:
        heard.append("adder")
        if late not in feed.listeners:
            feed.listen(late)

    feed.listen(adder)
    feed.announce(0, 1)
    feed.announce(0, 1)
    assert heard == ["adder", "adder", "late"]


def test_a_failing_listener_does_not_keep_the_others_from_dropping() -> None:
    feed = ChangeFeed()
    heard: list[str] = []

    def broken(offset: int, length: int) -> None:
        raise RuntimeError("broken cache")

    feed.listen(broken)
    feed.listen(lambda o, n: heard.append("after"))
    with pytest.raises(RuntimeError, match="broken cache"):
        feed.announce(0, 10)
    assert heard == ["after"]


def test_empty_and_negative_ranges() -> None:
    feed = ChangeFeed()
    heard: list[tuple[int, int]] = []
    feed.listen(lambda o, n: heard.append((o, n)))
    feed.announce(123, 0)
    assert heard == []
    for offset, length in ((-1, 1), (0, -1)):
        with pytest.raises(ValueError):
            feed.announce(offset, length)


def test_changing_announces_before_and_after_also_on_failure() -> None:
    feed = ChangeFeed()
    heard: list[tuple[int, int]] = []
    feed.listen(lambda o, n: heard.append((o, n)))
    with feed.changing(10, 20):
        assert heard == [(10, 20)]
    assert heard == [(10, 20)] * 2
    with pytest.raises(OSError):
        with feed.changing(30, 5):
            raise OSError("the write failed half way")
    assert heard == [(10, 20)] * 2 + [(30, 5)] * 2


# --- the qcow2 driver -----------------------------------------------------------------

qemu_tools = pytest.mark.needs(*BUILD_TOOLS)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``tables.qcow2``: 8 GiB, 64 KiB clusters (16 L2 tables), bitmap b0 (64 KiB granules:
    4 cached run chunks), data in every table and one zero cluster; ``sparse.qcow2``: data
    at 0 and a second L2 table with no entry set (its one cluster unmapped again);
    ``comp.qcow2``: a compressed cluster."""
    d = tmp_path_factory.mktemp("changes")
    qimg(d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", "tables.qcow2", "8G")
    qimg(d, "bitmap", "--add", "--granularity", "64K", "tables.qcow2", "b0")
    writes = [f"write -P 0x{k + 16:x} {k * TABLE_SPAN + (k % 4) * 64 * MiB} 128k" for k in range(16)]
    qio(d, "qcow2", "tables.qcow2", *writes, f"write -z {5 * GiB + 192 * MiB} 64k")
    qimg(d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", "sparse.qcow2", "1G")
    qio(d, "qcow2", "sparse.qcow2", "write -P 0x33 0 64k", "write -P 0x44 600M 64k")
    # Unmap the second cluster in the file (a discard leaves a zero flag in a v3 image).
    with open_image(str(d / "sparse.qcow2"), read_only=True) as image:
        l2_offset = image.top.l1[1] & L1E_OFFSET_MASK
    set_u64(d / "sparse.qcow2", l2_offset + 8 * (88 * MiB // CLUSTER), 0)
    qimg(d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", "comp.qcow2", "4M")
    qio(d, "qcow2", "comp.qcow2", "write -c -P 0x77 1M 64k")
    return {p.name: p for p in d.iterdir()}


@pytest.fixture
def tables_image(images: dict[str, Path]) -> Iterator[Qcow2Image]:
    with open_image(str(images["tables.qcow2"]), read_only=True) as image:
        assert isinstance(image, Qcow2Image)
        yield image


def rows(image: Qcow2Image, offset: int, length: int) -> list[tuple[int, int, int, int]]:
    """Merged ``(offset, length, allocation state, depth)`` of a range."""
    out: list[tuple[int, int, int, int]] = []
    for e in image.extents(offset, length):
        state = STATE_DATA if e.data else STATE_HOLE_ZERO
        if out and out[-1][2:] == (state, e.depth) and out[-1][0] + out[-1][1] == e.offset:
            out[-1] = (out[-1][0], out[-1][1] + e.length, state, e.depth)
        else:
            out.append((e.offset, e.length, state, e.depth))
    return out


def fill_caches(image: Qcow2Image) -> None:
    """Classify every L2 table for both contexts and cache every bitmap run chunk."""
    extents = image.extents(0, image.size)
    assert extents.allocation.total == extents.depth.total == image.size
    for bitmap in image.top.bitmaps:
        assert bitmap.dirty_runs(0, image.size).total == image.size


def cached_tables(image: Qcow2Image) -> dict[int, Table]:
    """The top layer's cached L2 tables by the guest offset their span starts at."""
    span_of = {entry & L1E_OFFSET_MASK: i * TABLE_SPAN for i, entry in enumerate(image.top.l1) if entry}
    return {span_of[t.key[1]]: t for t in image.table_cache.cached(image.top._id)}


def table_at(image: Qcow2Image, offset: int) -> Table:
    return cached_tables(image)[offset - offset % TABLE_SPAN]


def overlaps(start: int, end: int, offset: int, length: int) -> bool:
    return start < offset + length and offset < end


@qemu_tools
def test_l2_change_is_seen_after_the_announcement(tables_image: Qcow2Image) -> None:
    image = tables_image
    fill_caches(image)
    where = 3 * TABLE_SPAN + 3 * 64 * MiB  # the data written into table 3
    assert rows(image, where, 2 * CLUSTER) == [(where, 2 * CLUSTER, STATE_DATA, 1)]
    table = table_at(image, where)
    index = (where % TABLE_SPAN) // CLUSTER
    with image.metadata_lock:  # as a writer will: the first cluster unallocated, the second a zero cluster
        table.entries[index] = 0
        table.entries[index + 1] = OFLAG_ZERO
    # The entries are the authority for reads at once ...
    assert list(image.read_segments(where, 2 * CLUSTER)) == [ZeroSegment(2 * CLUSTER)]
    # ... block status answers from the runs derived before, until the range is announced.
    assert rows(image, where, 2 * CLUSTER) == [(where, 2 * CLUSTER, STATE_DATA, 1)]
    image.changes.announce(where, 1)
    assert table.derived is None
    assert all(t.derived is not None for start, t in cached_tables(image).items() if t is not table)
    assert rows(image, where, 2 * CLUSTER) == [(where, CLUSTER, STATE_HOLE_ZERO, 0),
                                               (where + CLUSTER, CLUSTER, STATE_HOLE_ZERO, 1)]
    assert rows(image, 0, image.size) == rows_by_walk(image)


def rows_by_walk(image: Qcow2Image) -> list[tuple[int, int, int, int]]:
    """The same rows from the per-cluster walk of the current entries (no derived runs)."""
    from pynbd.image.qcow2.chain import KIND_COMPRESSED, KIND_DATA, KIND_UNALLOC

    out: list[tuple[int, int, int, int]] = []
    for pos, n, kind, _host in image.top.runs(0, image.size):
        row = (STATE_DATA if kind in (KIND_DATA, KIND_COMPRESSED) else STATE_HOLE_ZERO,
               0 if kind == KIND_UNALLOC else 1)
        if out and out[-1][2:] == row:
            out[-1] = (out[-1][0], out[-1][1] + n, *row)
        else:
            out.append((pos, n, *row))
    return out


@qemu_tools
def test_bitmap_change_is_seen_after_the_announcement(tables_image: Qcow2Image) -> None:
    image = tables_image
    bitmap = image.bitmaps()["b0"]
    fill_caches(image)
    chunks = sorted(bitmap.cached_chunks)
    assert len(chunks) == image.size // bitmap.chunk_bytes == 8
    where = 5 * GiB + 7 * MiB  # clean, in chunk 5
    clean = columns(bitmap.dirty_runs(where, CLUSTER))
    assert list(clean) == [(CLUSTER, 0)]
    with image.metadata_lock:
        bitmap.bits()[where // bitmap.granularity] = 1
    assert list(columns(bitmap.dirty_runs(where, CLUSTER))) == [(CLUSTER, 0)]  # still cached
    image.changes.announce(where + 100, 1000)
    assert sorted(bitmap.cached_chunks) == [0, 1, 2, 3, 4, 6, 7]
    assert list(columns(bitmap.dirty_runs(where, CLUSTER))) == [(CLUSTER, 1)]
    whole = columns(normalize(bitmap.dirty_runs(where - CLUSTER, 3 * CLUSTER)))
    assert list(whole) == [(CLUSTER, 0), (CLUSTER, 1), (CLUSTER, 0)]


@qemu_tools
def test_all_zero_table_that_gets_an_entry(images: dict[str, Path]) -> None:
    """A cached L2 table with no entry set is known to map nothing (reads and block status
    skip it); once an entry is set and announced, reads and block status see it."""
    with open_image(str(images["sparse.qcow2"]), read_only=True) as image:
        assert isinstance(image, Qcow2Image)
        fill_caches(image)
        first, empty = table_at(image, 0), table_at(image, 600 * MiB)
        assert empty.all_zero and not first.all_zero
        where = 600 * MiB
        with image.metadata_lock:  # map the guest cluster to the data written at 0
            empty.entries[(where % TABLE_SPAN) // CLUSTER] = first.entries[0]
        assert image.read(where, 4) == b"\0" * 4
        image.changes.announce(where, CLUSTER)
        assert not empty.all_zero
        assert image.read(where, 4) == b"\x33" * 4
        assert rows(image, where, CLUSTER) == [(where, CLUSTER, STATE_DATA, 1)]


@qemu_tools
def test_compressed_reads_follow_the_entries(images: dict[str, Path]) -> None:
    """Decompressed clusters are cached by their descriptor, not by guest range: a guest
    cluster mapped elsewhere reads its new mapping with no announcement at all."""
    with open_image(str(images["comp.qcow2"]), read_only=True) as image:
        assert isinstance(image, Qcow2Image)
        assert image.read(MiB, 4) == b"\x77" * 4  # decompressed and cached
        table = table_at(image, MiB)
        with image.metadata_lock:
            table.entries[MiB // CLUSTER] = OFLAG_ZERO
        assert image.read(MiB, 4) == b"\0" * 4


@qemu_tools
def test_close_stops_listening(images: dict[str, Path]) -> None:
    image = open_image(str(images["comp.qcow2"]), read_only=True)
    assert len(image.changes.listeners) == 1
    image.close()
    assert image.changes.listeners == ()


@qemu_tools
@pytest.mark.parametrize("lookup", ["extents", "depth", "read_segments", "dirty_runs"])
def test_lookups_wait_for_the_metadata_lock(tables_image: Qcow2Image, lookup: str) -> None:
    """A lookup waits while another thread (a writer) holds the metadata lock. (It cannot
    finish early if it takes the lock, so the wait below decides nothing by timing.)"""
    image = tables_image
    extents = image.extents(0, image.size)
    calls: dict[str, Callable[[], object]] = {
        "extents": lambda: image.extents(0, image.size),
        "depth": lambda: extents.depth,
        "read_segments": lambda: image.read_segments(0, 4 * MiB),
        "dirty_runs": lambda: image.bitmaps()["b0"].dirty_runs(0, image.size),
    }
    image.bitmaps()["b0"].bits()
    held, release, done = threading.Event(), threading.Event(), threading.Event()

    def writer() -> None:
        with image.metadata_lock:
            held.set()
            release.wait(30)

    def reader() -> None:
        calls[lookup]()
        done.set()

    threads = [threading.Thread(target=writer)]
    threads[0].start()
    assert held.wait(30)
    threads.append(threading.Thread(target=reader))
    threads[1].start()
    try:
        assert not done.wait(0.2)
    finally:
        release.set()
        for thread in threads:
            thread.join(30)
    assert done.is_set()


@qemu_tools
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_announce_drops_exactly_what_overlaps(tables_image: Qcow2Image, data: st.DataObject) -> None:
    image = tables_image
    bitmap = image.bitmaps()["b0"]
    size = image.size
    offset = data.draw(st.one_of(st.integers(0, size - 1),
                                 st.sampled_from([k * TABLE_SPAN for k in range(16)]),
                                 st.sampled_from([k * TABLE_SPAN - 1 for k in range(1, 16)])), "offset")
    length = data.draw(st.one_of(st.integers(1, size - offset), st.integers(1, min(4 * CLUSTER, size - offset))),
                       "length")
    fill_caches(image)
    tables = cached_tables(image)
    assert len(tables) == 16 and all(t.derived is not None for t in tables.values())
    chunk = bitmap.chunk_bytes
    every = list(range(size // chunk))
    assert sorted(bitmap.cached_chunks) == every
    image.changes.announce(offset, length)
    for start, table in cached_tables(image).items():
        assert (table.derived is None) == overlaps(start, start + TABLE_SPAN, offset, length), start
    assert sorted(bitmap.cached_chunks) == [k for k in every
                                           if not overlaps(k * chunk, (k + 1) * chunk, offset, length)]
    budget = sum(t.nbytes for t in image.table_cache.cached(image.top._id))
    assert image.table_cache.size_bytes == budget  # what was dropped no longer counts
