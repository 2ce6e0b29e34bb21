"""The qcow2 driver against QEMU 7.2 on the fixtures of tests/qcow2_fixtures.py.

For every fixture: guest data equals ``qemu-img convert -O raw``; merged
extents equal qemu-nbd's ``base:allocation`` and ``qemu:allocation-depth``
(nbdinfo); ``image_map`` equals ``qemu-img map --output=json``; dirty bitmaps
equal ``qemu:dirty-bitmap:NAME``.
"""

from __future__ import annotations

import shutil

import logging
import os
from pathlib import Path

import pytest

from pynbd.image import open_image
from pynbd.image.base import BytesSegment, HostSegment, Image, ImageError, ZeroSegment
from pynbd.tools.bitmap import format_bitmap_list
from pynbd.tools.map import format_map_json, image_map
from pynbd.image.qcow2 import Qcow2Image, open_qcow2
from tests.qcow2_fixtures import (
    MiB,
    QemuNbd,
    merge_rows,
    qemu_convert_raw,
    qemu_img_map,
    qemu_img_map_text,
    qimg,
    requires_qemu,
    session_fixtures,
)

pytestmark = requires_qemu

#: Fixtures pynbd serves (the rest must be refused, see test_refused_fixtures).
SERVED = (
    "v3-64k.qcow2", "chain-mid.qcow2", "chain-top.qcow2", "comp-zlib.qcow2", "comp-zstd.qcow2",
    "comp-zlib-512.qcow2", "comp-zlib-4k.qcow2", "comp-zlib-2M.qcow2", "comp-zstd-4k.qcow2", "comp-io.qcow2",
    "extl2.qcow2", "extl2-16k.qcow2", "bitmaps.qcow2", "bm-gran.qcow2", "bm-top.qcow2", "extdata-raw.qcow2",
    "extdata.qcow2", "cs512.qcow2", "cs2m.qcow2", "odd.qcow2", "snap.qcow2", "v2.qcow2", "dirty.qcow2",
    "bitmaps-inuse.qcow2", "bitmaps-noautoclear.qcow2", "rnd-base.qcow2", "rnd-top.qcow2", "probe/top.qcow2",
    "raw-sparse.raw", "raw-created.raw", "chain-base.raw",
)
#: name -> bitmaps exported by qemu-nbd -B
BITMAPS = {
    "bitmaps.qcow2": ("b0", "b1"),
    "bm-gran.qcow2": ("g512", "g4k", "g32k", "g1m"),
    "bm-top.qcow2": ("top16k",),
}


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return session_fixtures(tmp_path_factory)


def open_fixture(fx: dict[str, Path], name: str) -> Image:
    return open_image(str(fx[name]), read_only=True)


def fmt_of(name: str) -> str:
    return "raw" if name.endswith(".raw") else "qcow2"


def base_rows(image: Image) -> list[tuple[int, int, int]]:
    return merge_rows((e.offset, e.length, (0 if e.data else 1) | (2 if e.zero else 0))
                      for e in all_extents(image))


def depth_rows(image: Image) -> list[tuple[int, int, int]]:
    return merge_rows((e.offset, e.length, e.depth) for e in all_extents(image))


def all_extents(image: Image):
    """Extents over the whole image, re-querying when the driver stops early."""
    pos = 0
    while pos < image.size:
        got = False
        for ext in image.extents(pos, image.size - pos):
            assert ext.offset == pos and ext.length > 0
            pos = ext.end
            got = True
            yield ext
        assert got


def dirty_rows(image: Image, name: str) -> list[tuple[int, int, int]]:
    bitmap = image.bitmaps()[name]
    rows = []
    pos = 0
    for n, dirty in bitmap.dirty_runs(0, image.size):
        rows.append((pos, n, int(dirty)))
        pos += n
    assert pos == image.size
    return merge_rows(rows)


# --- data --------------------------------------------------------------------------


@pytest.mark.parametrize("name", SERVED)
def test_read_equals_qemu_convert(fx: dict[str, Path], name: str, tmp_path: Path) -> None:
    ref = qemu_convert_raw(fx[name], tmp_path / "ref.raw", fmt_of(name))
    with open_fixture(fx, name) as image:
        assert image.size == len(ref)
        assert image.read(0, image.size) == ref
        # Unaligned pieces straddling clusters, subclusters and layer ends.
        step = 100_003
        for off in range(0, image.size, step):
            n = min(step + 777, image.size - off)
            assert image.read(off, n) == ref[off:off + n], f"{name} at {off}"


@pytest.mark.parametrize("name", SERVED)
def test_read_segments_cover_range(fx: dict[str, Path], name: str) -> None:
    with open_fixture(fx, name) as image:
        for off, n in ((0, image.size), (12345, 1 << 20), (image.size - 1, 1)):
            n = min(n, image.size - off)
            segs = image.read_segments(off, n)
            assert sum(s.length for s in segs) == n
            assert all(s.length > 0 for s in segs)
            for a, b in zip(segs, segs[1:]):  # merged: no two zero runs, no contiguous host runs
                assert not (isinstance(a, ZeroSegment) and isinstance(b, ZeroSegment))
                if isinstance(a, HostSegment) and isinstance(b, HostSegment):
                    assert not (a.fd == b.fd and a.host_offset + a.length == b.host_offset)


# --- block status ------------------------------------------------------------------


@pytest.mark.parametrize("name", SERVED)
def test_extents_equal_qemu_nbd(fx: dict[str, Path], name: str, tmp_path: Path) -> None:
    with QemuNbd(fx[name], tmp_path / "ref.sock", fmt=fmt_of(name)) as ref:
        want_base = merge_rows(ref.map("base:allocation"))
        want_depth = merge_rows(ref.map("qemu:allocation-depth"))
    with open_fixture(fx, name) as image:
        assert base_rows(image) == want_base
        assert depth_rows(image) == want_depth


def test_chain_depths_f3(fx: dict[str, Path]) -> None:
    """Fixture F3: zeros past a short backing file are allocated at that layer."""
    with open_fixture(fx, "chain-top.qcow2") as image:
        rows = depth_rows(image)
    assert (4194304 - 983040, 2031616, 3) in rows  # 3M+64K .. 5M: base (past its 4M end too)
    assert (8388608, 1048576, 2) in rows  # 8M..9M: mid is 8M long
    assert (9502720, 7274496, 2) in rows


def test_extents_stop_early_and_resume(fx: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import pynbd.image.qcow2.image as q

    with open_fixture(fx, "rnd-top.qcow2") as image:
        full = depth_rows(image)
        monkeypatch.setattr(q, "MAX_EXTENTS_PER_CALL", 3)
        first = list(image.extents(0, image.size))
        assert len(first) <= 4 and first[-1].end < image.size
        assert depth_rows(image) == full


@pytest.mark.parametrize("name", SERVED)
def test_image_map_equals_qemu_img_map(fx: dict[str, Path], name: str) -> None:
    with open_fixture(fx, name) as image:
        mine = image_map(image)
        text = format_map_json(mine)
    ref = qemu_img_map(fx[name], fmt_of(name))
    assert mine == ref
    assert text == qemu_img_map_text(fx[name], fmt_of(name))


# --- bitmaps -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(BITMAPS))
def test_dirty_bitmaps_equal_qemu_nbd(fx: dict[str, Path], name: str, tmp_path: Path) -> None:
    names = BITMAPS[name]
    with QemuNbd(fx[name], tmp_path / "ref.sock", bitmaps=names, allocation_depth=False) as ref:
        want = {b: merge_rows(ref.map(f"qemu:dirty-bitmap:{b}")) for b in names}
    with open_fixture(fx, name) as image:
        assert sorted(image.bitmaps()) == sorted(names)
        for b in names:
            assert dirty_rows(image, b) == want[b], b


def test_f6_bitmap_contents(fx: dict[str, Path]) -> None:
    with open_fixture(fx, "bitmaps.qcow2") as image:
        assert dirty_rows(image, "b0") == [
            (0, 65536, 1), (65536, 983040, 0), (1048576, 65536, 1), (1114112, 3080192, 0),
            (4194304, 65536, 1), (4259840, 4128768, 0), (8388608, 1048576, 1), (9437184, 7340032, 0)]
        assert dirty_rows(image, "b1") == [
            (0, 131072, 1), (131072, 917504, 0), (1048576, 131072, 1), (1179648, 15597568, 0)]
        infos = {i.name: i for i in image.bitmap_infos()}
        assert infos["b0"].recording and not infos["b1"].recording
        assert infos["b0"].flags == ("auto",) and infos["b1"].flags == ()
        assert infos["b0"].granularity == 65536 and infos["b1"].granularity == 131072
        assert infos["b0"].count == (1 + 1 + 1 + 16) * 65536
        assert infos["b1"].count == 2 * 131072
        assert all(not i.inconsistent and i.problem is None and i.persistent and not i.busy
                   for i in infos.values())
        text = format_bitmap_list(image.bitmap_infos())
    assert "name: b0" in text and "[0]: auto" in text and "granularity: 131072" in text


def test_dirty_runs_subranges(fx: dict[str, Path]) -> None:
    """dirty_runs on unaligned sub-ranges agrees with the whole-image answer."""
    with open_fixture(fx, "bm-gran.qcow2") as image:
        for name, bitmap in image.bitmaps().items():
            whole = dirty_rows(image, name)

            def state(pos: int) -> int:
                return next(v for o, n, v in whole if o <= pos < o + n)

            for off, n in ((1, 511), (4000, 9000), (1048000, 2000), (3 * MiB - 5, 800 * 1024)):
                pos = off
                for length, dirty in bitmap.dirty_runs(off, n):
                    assert length > 0
                    assert int(dirty) == state(pos) == state(pos + length - 1)
                    pos += length
                assert pos == off + n


def test_inuse_bitmaps_are_not_exported(fx: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    """F12: in_use bitmaps are listed but not exported, with a warning naming image and bitmap."""
    with caplog.at_level(logging.WARNING):
        with open_fixture(fx, "bitmaps-inuse.qcow2") as image:
            assert image.bitmaps() == {}
            infos = image.bitmap_infos()
    assert [(i.name, i.flags, i.inconsistent, i.recording, i.count) for i in infos] == [
        ("b0", ("in-use", "auto"), True, False, 0), ("b1", ("in-use",), True, False, 0)]
    for b in ("b0", "b1"):
        assert any("bitmaps-inuse.qcow2" in r.getMessage() and repr(b) in r.getMessage()
                   for r in caplog.records)
    assert "in-use" in format_bitmap_list(infos)


def test_stale_bitmaps_extension_is_ignored(fx: dict[str, Path]) -> None:
    """F13: autoclear bit 0 clear -> QEMU considers the bitmaps lost."""
    with open_fixture(fx, "bitmaps-noautoclear.qcow2") as image:
        assert image.bitmaps() == {} and list(image.bitmap_infos()) == []


# --- segments, chains, formats -----------------------------------------------------


def test_fully_allocated_read_is_one_host_segment(tmp_path: Path) -> None:
    qimg(tmp_path, "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", "full.qcow2", "64M")
    with open_qcow2(str(tmp_path / "full.qcow2"), True) as image:
        segs = image.read_segments(0, 32 * MiB)
        assert len(segs) == 1 and isinstance(segs[0], HostSegment) and segs[0].length == 32 * MiB


def test_segment_types(fx: dict[str, Path]) -> None:
    with open_fixture(fx, "chain-top.qcow2") as image:
        assert isinstance(image, Qcow2Image)
        segs = image.read_segments(64 * 1024 + 100, 100)  # mid's data
        assert len(segs) == 1 and isinstance(segs[0], HostSegment) and segs[0].fd == image.layers[1].data_fd
        segs = image.read_segments(4 * MiB, MiB)  # past the base's end
        assert segs == [ZeroSegment(MiB)]
    with open_fixture(fx, "probe/top.qcow2") as image:
        assert isinstance(image, Qcow2Image)
        segs = image.read_segments(4096, 4096)  # the raw base, seen through two qcow2 layers
        assert segs == [HostSegment(4096, image.layers[2].data_fd, 4096)]
    with open_fixture(fx, "comp-zstd.qcow2") as image:
        segs = image.read_segments(MiB + 10, 20)
        assert len(segs) == 1 and isinstance(segs[0], BytesSegment)
        assert bytes(segs[0].data) == bytes(range(10, 30))


def test_backing_resolved_relative_to_image(fx: dict[str, Path], tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rel = os.path.relpath(fx["probe/top.qcow2"], tmp_path)
    with open_image(rel, read_only=True) as image:
        assert isinstance(image, Qcow2Image)
        assert [type(layer).__name__ for layer in image.layers] == ["Qcow2Layer", "Qcow2Layer", "RawLayer"]
        assert image.read(64 * 1024, 4) == b"\xc0" * 4


def test_format_override_and_probe(fx: dict[str, Path]) -> None:
    path = str(fx["v3-64k.qcow2"])
    with open_image(path, "raw", read_only=True) as image:
        assert image.format_name == "raw" and image.size == os.path.getsize(path)
        assert image.read(0, 4) == b"QFI\xfb"
    with open_image(path, read_only=True) as image:
        assert image.format_name == "qcow2" and image.size == 8 * MiB
    with open_image(str(fx["raw-sparse.raw"]), read_only=True) as image:
        assert image.format_name == "raw"
    with pytest.raises(ImageError, match="raw-sparse.raw.*magic"):
        open_qcow2(str(fx["raw-sparse.raw"]), True)


def test_write_open_is_writable_and_read_open_is_not(fx: dict[str, Path], tmp_path: Path) -> None:
    image_path = tmp_path / "rw.qcow2"
    shutil.copy(fx["v3-64k.qcow2"], image_path)
    with open_qcow2(str(image_path), False) as image:
        assert not image.read_only
        image.write(0, b"x")
        assert image.read(0, 2) == b"x\x11"
    with open_qcow2(str(image_path), True) as image:
        assert image.read_only and image.read(0, 2) == b"x\x11"
        with pytest.raises(ImageError):
            image.write(0, b"y")


def test_snapshot_table_parsed(fx: dict[str, Path]) -> None:
    with open_fixture(fx, "snap.qcow2") as image:
        assert isinstance(image, Qcow2Image)
        [snap] = image.snapshots
        assert (snap.id, snap.name, snap.disk_size, snap.l1_size) == ("1", "snap1", 4 * MiB, 1)
        assert image.read(64 * 1024, 2) == b"\x82\x82"


@pytest.mark.parametrize("name", ["aes.qcow2", "unknown-incompat.qcow2", "corrupt.qcow2"])
def test_refused_fixtures(fx: dict[str, Path], name: str) -> None:
    field = {"aes.qcow2": "crypt_method", "unknown-incompat.qcow2": "incompatible_features",
             "corrupt.qcow2": "incompatible_features"}[name]
    with pytest.raises(ImageError, match=f"{name}: header field {field}="):
        open_fixture(fx, name)


def test_l2_cache_is_bounded(fx: dict[str, Path], tmp_path: Path) -> None:
    """cs512: 32 L2 tables of 512 bytes; a 2-table cache still reads correctly."""
    from pynbd.image.qcow2.l2cache import TableCache
    from pynbd.image.qcow2 import open_chain

    ref = qemu_convert_raw(fx["rnd-top.qcow2"], tmp_path / "ref.raw")
    cache = TableCache(max_bytes=1024)
    image = Qcow2Image(open_chain(str(fx["rnd-top.qcow2"]), cache), cache)
    with image:
        assert image.read(0, image.size) == ref
        assert cache.size_bytes <= 1024 and cache.misses > 2


def test_extents_work_per_call_is_bounded(fx: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import pynbd.image.qcow2.image as q

    with open_fixture(fx, "cs2m.qcow2") as image:
        full = depth_rows(image)
        monkeypatch.setattr(q, "MAX_CLUSTERS_PER_CALL", 3)
        first = list(image.extents(0, image.size))
        assert first[-1].end == 3 * 2 * MiB
        assert depth_rows(image) == full


def test_cached_table_runs_count_against_the_cache_budget(fx: dict[str, Path]) -> None:
    """Block status keeps each L2 table's classified runs with the table: they are counted in
    the cache's byte budget (memory stays bounded) and answers stay those of the per-cluster walk."""
    from pynbd.image.qcow2.l2cache import TableCache
    from pynbd.image.qcow2 import open_chain

    from pynbd.image.qcow2.chain import KIND_COMPRESSED, KIND_DATA, KIND_UNALLOC

    with open_fixture(fx, "cs512.qcow2") as reference:
        # The per-cluster classification of the layer, without any cached runs.
        walk = list(reference.top.runs(0, reference.size))
        expected_depth = merge_rows((p, n, 0 if k == KIND_UNALLOC else 1) for p, n, k, _h in walk)
        expected_base = merge_rows((p, n, 0 if k in (KIND_DATA, KIND_COMPRESSED) else 3)
                                   for p, n, k, _h in walk)
    cache = TableCache(max_bytes=2048)
    image = Qcow2Image(open_chain(str(fx["cs512.qcow2"]), cache), cache)
    with image:
        for _ in range(2):  # the second pass answers from whatever the budget kept
            assert depth_rows(image) == expected_depth
            assert base_rows(image) == expected_base
        assert 0 < cache.size_bytes <= 2048
        assert any(table.derived is not None for table in cache._tables.values())
        assert all(table.nbytes > len(table.entries) * 8 for table in cache._tables.values()
                   if table.derived is not None and table.derived.nbytes)


def test_depth_runs_built_only_when_asked(fx: dict[str, Path]) -> None:
    """A map of base:allocation classifies each L2 table once, into kinds, and derives only
    its allocation runs; asking for qemu:allocation-depth derives the depth runs from the
    same classification (no second one), and they equal the per-cluster walk's."""
    from pynbd.image.qcow2.chain import KIND_UNALLOC
    from pynbd.image.qcow2.tableruns import ALLOCATION_OF_KIND, TOP_DEPTH_OF_KIND

    with open_fixture(fx, "v3-64k.qcow2") as reference:
        walk = list(reference.top.runs(0, reference.size))
        expected_depth = merge_rows((p, n, 0 if k == KIND_UNALLOC else 1) for p, n, k, _h in walk)
    with open_fixture(fx, "v3-64k.qcow2") as image:
        list(image.extents(0, image.size).allocation)
        tables = [t for t in image.top._cache._tables.values() if t.derived is not None]
        assert tables and all(set(t.derived._columns) == {ALLOCATION_OF_KIND} for t in tables)
        kinds = [t.derived.kinds for t in tables]
        assert depth_rows(image) == expected_depth
        assert all(set(t.derived._columns) == {ALLOCATION_OF_KIND, TOP_DEPTH_OF_KIND} for t in tables)
        assert [t.derived.kinds for t in tables] == kinds  # classified once
