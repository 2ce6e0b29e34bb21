"""Malformed qcow2 images: refused at open with a one-line ImageError naming the
file and the field, or an ImageIOError for the affected read only."""

from __future__ import annotations

import re
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pynbd.image import open_image
from pynbd.image.base import ImageError, ImageIOError
from pynbd.image.qcow2 import Qcow2Image, open_qcow2
from pynbd.image.qcow2.compression import compressed_range
from tests.qcow2_fixtures import MiB, qimg, session_fixtures

pytestmark = pytest.mark.needs("qemu-img", "qemu-io")  # (no server: qemu-nbd and nbdinfo unused)


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return session_fixtures(tmp_path_factory)


def copy(fx: dict[str, Path], name: str, dest: Path) -> Path:
    out = dest / ("bad-" + name)
    shutil.copy(fx[name], out)
    return out


def patch(path: Path, offset: int, fmt: str, value: int | bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value) if not isinstance(value, bytes) else value)


def l2_entry_offset(path: Path, guest: int) -> int:
    """File offset of the L2 entry mapping ``guest`` (found with the driver itself)."""
    with open_qcow2(str(path), True) as image:
        assert isinstance(image, Qcow2Image)
        layer = image.top
        span_bits = layer.cluster_bits + layer.l2_bits
        l2 = layer.l1[guest >> span_bits] & 0x00FFFFFFFFFFFE00
        index = (guest >> layer.cluster_bits) & ((1 << layer.l2_bits) - 1)
        return l2 + index * layer.header.l2_entry_size


def read_u64(path: Path, offset: int) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def extension_offset(path: Path, ext_type: int) -> int:
    data = path.read_bytes()[:65536]
    pos = struct.unpack_from(">I", data, 100)[0]
    while True:
        t, n = struct.unpack_from(">II", data, pos)
        if t == ext_type:
            return pos
        assert t != 0, "extension not found"
        pos += 8 + ((n + 7) & ~7)


# --- header fields -------------------------------------------------------------------

HEADER_CASES = [
    # (offset, struct format, value, expected message fragment)
    (0, ">4s", b"QFIX", "header field magic="),
    (4, ">I", 4, "header field version=0x4"),
    (4, ">I", 1, "header field version=0x1"),
    (20, ">I", 8, "header field cluster_bits=0x8"),
    (20, ">I", 22, "header field cluster_bits=0x16"),
    (20, ">I", 0xFFFFFFFF, "header field cluster_bits="),
    (24, ">Q", 1 << 62, "header field l1_size=0x1 is too small for the virtual size"),
    (32, ">I", 2, "header field crypt_method=0x2"),
    (36, ">I", 0, "header field l1_size=0x0 is too small"),
    (36, ">I", 0x7FFFFFFF, "header field l1_size=0x7fffffff exceeds"),
    (40, ">Q", 0x10000000, "header field l1_table_offset=0x10000000 is past the end of the file"),
    (40, ">Q", 0x30001, "header field l1_table_offset=0x30001 is not aligned"),
    (40, ">Q", 0, "header field l1_table_offset=0x0"),
    (48, ">Q", 0x10200, "header field refcount_table_offset=0x10200 is not aligned"),
    (48, ">Q", 0x7FFF0000, "header field refcount_table_offset=0x7fff0000 is past the end"),
    (56, ">I", 0x100000, "header field refcount_table_clusters=0x100000 exceeds"),
    (60, ">I", 70000, "header field nb_snapshots="),
    (72, ">Q", 0x20, "header field incompatible_features=0x20 has unknown feature bit(s) 5"),
    (72, ">Q", 1 << 63, "unknown feature bit(s) 63"),
    (72, ">Q", 0x2, "header field incompatible_features=0x2 has the corrupt bit set"),
    (72, ">Q", 0x8, "header field compression_type=0x0 does not agree"),
    (96, ">I", 7, "header field refcount_order=0x7"),
    (100, ">I", 50, "header field header_length=0x32"),
    (100, ">I", 0x20000, "header field header_length=0x20000"),
    (104, ">B", 5, "header field compression_type=0x5 is unknown"),
    (8, ">Q", 0x20000, "header field backing_file_offset=0x20000 is outside the header cluster"),
    (116, ">I", 0xFFFF, "header extension 0x6803f857 at 0x70"),
]


@pytest.mark.parametrize("offset,fmt,value,message", HEADER_CASES,
                         ids=[f"{c[0]}={c[2]!r}" for c in HEADER_CASES])
def test_header_field_refused(fx: dict[str, Path], tmp_path: Path, offset: int, fmt: str,
                              value: int | bytes, message: str) -> None:
    bad = copy(fx, "v3-64k.qcow2", tmp_path)
    if offset == 8:
        patch(bad, 16, ">I", 5)  # a backing name length to go with the offset
    patch(bad, offset, fmt, value)
    with pytest.raises(ImageError) as info:
        open_qcow2(str(bad), True)
    text = str(info.value)
    assert text.startswith(f"{bad}: ") and message in text and "\n" not in text
    assert not isinstance(info.value, ImageIOError)


def test_truncated_header(fx: dict[str, Path], tmp_path: Path) -> None:
    bad = copy(fx, "v3-64k.qcow2", tmp_path)
    with open(bad, "r+b") as f:
        f.truncate(50)
    with pytest.raises(ImageError, match="too short"):
        open_image(str(bad), read_only=True)  # probed as qcow2 by its magic
    bad = copy(fx, "v3-64k.qcow2", tmp_path)
    with open(bad, "r+b") as f:
        f.truncate(0x30004)  # L1 table cut in half
    with pytest.raises(ImageError, match="l1_table_offset=0x30000 \\+ 8 bytes extends past the end"):
        open_qcow2(str(bad), True)


def test_snapshot_table_past_eof(fx: dict[str, Path], tmp_path: Path) -> None:
    bad = copy(fx, "snap.qcow2", tmp_path)
    patch(bad, 64, ">Q", 0x7FFF0000)
    with pytest.raises(ImageError, match="snapshots_offset=0x7fff0000 is past the end"):
        open_qcow2(str(bad), True)


# --- L1 / L2 entries ---------------------------------------------------------------


@pytest.mark.parametrize("entry,message", [
    (0x8000000100000000, "L1 entry 0=0x8000000100000000 (at 0x30000) points past the end of the file"),
    (0x8000000000040200, "L1 entry 0=0x8000000000040200 (at 0x30000) is not cluster aligned"),
    (0x8100000000040000, "L1 entry 0=0x8100000000040000 (at 0x30000) has reserved bits set"),
])
def test_bad_l1_entry_refused(fx: dict[str, Path], tmp_path: Path, entry: int, message: str) -> None:
    bad = copy(fx, "v3-64k.qcow2", tmp_path)
    patch(bad, 0x30000, ">Q", entry)
    with pytest.raises(ImageError, match=re.escape(f"bad-v3-64k.qcow2: {message}")):
        open_qcow2(str(bad), True)


def test_l1_entry_offset_zero_is_unallocated(fx: dict[str, Path], tmp_path: Path) -> None:
    bad = copy(fx, "v3-64k.qcow2", tmp_path)
    patch(bad, 0x30000, ">Q", 1 << 63)  # COPIED, but no L2 table
    with open_qcow2(str(bad), True) as image:
        assert image.read(0, image.size) == bytes(image.size)
        assert [(e.data, e.depth) for e in image.extents(0, image.size)] == [(False, 0)]


def test_unaligned_l2_entry_fails_only_that_read(fx: dict[str, Path], tmp_path: Path) -> None:
    bad = copy(fx, "v3-64k.qcow2", tmp_path)
    at = l2_entry_offset(bad, 0)
    patch(bad, at, ">Q", read_u64(bad, at) | 0x200)
    with open_qcow2(str(bad), True) as image:
        with pytest.raises(ImageIOError,
                           match=r"bad-v3-64k.qcow2: L2 entry .* guest offset 0x0: .*not cluster aligned"):
            image.read(100, 10)
        with pytest.raises(ImageIOError):
            list(image.extents(0, 4096))
        assert image.read(MiB, 4) == b"\x22" * 4  # other clusters still work


def test_l2_entry_past_eof_reads_zeros(fx: dict[str, Path], tmp_path: Path) -> None:
    """A data cluster beyond the end of the file reads as zeros (as QEMU's file driver does)."""
    bad = copy(fx, "v3-64k.qcow2", tmp_path)
    at = l2_entry_offset(bad, 0)
    patch(bad, at, ">Q", (1 << 63) | 0x10000000)
    with open_qcow2(str(bad), True) as image:
        assert image.read(0, 65536) == bytes(65536)
        ext = next(iter(image.extents(0, 65536)))
        assert ext.data and ext.length == 65536


def test_l2_entry_straddling_eof(fx: dict[str, Path], tmp_path: Path) -> None:
    bad = copy(fx, "v3-64k.qcow2", tmp_path)
    size = bad.stat().st_size
    at = l2_entry_offset(bad, 0)
    last = (size - 1) & ~0xFFFF
    patch(bad, at, ">Q", (1 << 63) | last)
    with open(bad, "rb") as f:
        f.seek(last)
        tail = f.read()
    with open_qcow2(str(bad), True) as image:
        assert image.read(0, 65536) == tail + bytes(65536 - len(tail))


def test_zero_flag_in_v2_image(fx: dict[str, Path], tmp_path: Path) -> None:
    bad = copy(fx, "v2.qcow2", tmp_path)
    at = l2_entry_offset(bad, 0)
    patch(bad, at, ">Q", read_u64(bad, at) | 1)
    with open_qcow2(str(bad), True) as image:
        with pytest.raises(ImageIOError, match="pre-v3"):
            image.read(0, 512)
        assert image.read(2 * MiB, 512) == bytes(512)


def test_invalid_subcluster_bitmap(fx: dict[str, Path], tmp_path: Path) -> None:
    bad = copy(fx, "extl2.qcow2", tmp_path)
    at = l2_entry_offset(bad, 0)
    patch(bad, at + 8, ">Q", (1 << 32) | 1)  # subcluster 0 both allocated and zero
    with open_qcow2(str(bad), True) as image:
        with pytest.raises(ImageIOError, match="both allocated and zero"):
            image.read(0, 512)
        assert image.read(128 * 1024 + 8192, 4) == b"\x13" * 4


# --- compressed clusters -----------------------------------------------------------


@pytest.mark.parametrize("name", ["comp-zlib.qcow2", "comp-zstd.qcow2", "comp-zlib-4k.qcow2"])
def test_compressed_garbage_is_eio_for_that_range(fx: dict[str, Path], tmp_path: Path, name: str) -> None:
    bad = copy(fx, name, tmp_path)
    at = l2_entry_offset(bad, 0)
    entry = read_u64(bad, at)
    assert entry >> 62 == 1
    with open_qcow2(str(bad), True) as image:
        assert isinstance(image, Qcow2Image)
        cb = image.top.cluster_bits
        good = image.read(MiB, 4096)
    rng = compressed_range(entry, cb)
    patch(bad, rng.offset, ">4s", b"\xff\xfe\xfd\xfc")  # clobbers the stream start (and zstd's magic)
    with open_qcow2(str(bad), True) as image:
        with pytest.raises(ImageIOError, match=f"{name}: compressed cluster at guest offset 0x0 "):
            image.read(10, 10)
        assert image.read(MiB, 4096) == good
        assert next(iter(image.extents(0, 512))).data  # block status is unaffected


def test_compressed_truncated_stream(fx: dict[str, Path], tmp_path: Path) -> None:
    """comp-io's only compressed cluster runs past EOF; cutting the stream makes it EIO."""
    bad = copy(fx, "comp-io.qcow2", tmp_path)
    with open(bad, "r+b") as f:
        f.truncate(bad.stat().st_size - 40)
    with open_qcow2(str(bad), True) as image:
        with pytest.raises(ImageIOError, match="compressed cluster at guest offset 0x0"):
            image.read(0, 512)
        assert image.read(MiB, 512) == bytes(512)


# --- bitmaps -------------------------------------------------------------------------


def test_bitmap_directory_past_eof(fx: dict[str, Path], tmp_path: Path) -> None:
    bad = copy(fx, "bitmaps.qcow2", tmp_path)
    pos = extension_offset(bad, 0x23852875)
    patch(bad, pos + 8 + 16, ">Q", 0x7FFF0000)
    with pytest.raises(ImageError, match="bad-bitmaps.qcow2: bitmaps extension: bitmap_directory_offset=0x7fff0000"):
        open_qcow2(str(bad), True)


def test_bitmap_table_size_mismatch(fx: dict[str, Path], tmp_path: Path) -> None:
    bad = copy(fx, "bitmaps.qcow2", tmp_path)
    pos = extension_offset(bad, 0x23852875)
    directory = read_u64(bad, pos + 8 + 16)
    patch(bad, directory + 8, ">I", 5)
    with pytest.raises(ImageError, match="bitmap 'b0': bitmap_table_size=5 does not match"):
        open_qcow2(str(bad), True)


def test_bitmap_data_past_eof_is_eio(fx: dict[str, Path], tmp_path: Path) -> None:
    bad = copy(fx, "bitmaps.qcow2", tmp_path)
    pos = extension_offset(bad, 0x23852875)
    directory = read_u64(bad, pos + 8 + 16)
    table = read_u64(bad, directory)
    patch(bad, table, ">Q", 0x7FFF0000)
    with open_qcow2(str(bad), True) as image:
        b0 = image.bitmaps()["b0"]
        with pytest.raises(ImageIOError, match="bitmap 'b0'"):
            list(b0.dirty_runs(0, 4096))
        infos = {i.name: i for i in image.bitmap_infos()}
        assert infos["b0"].inconsistent and infos["b0"].count == 0
        assert "cannot be read" in (infos["b0"].problem or "")
        assert not infos["b1"].inconsistent


def test_bitmap_all_ones_table_entry(fx: dict[str, Path], tmp_path: Path) -> None:
    """§6.3: a table entry with offset 0 and bit 0 set means an all-ones bitmap cluster."""
    bad = copy(fx, "bitmaps.qcow2", tmp_path)
    pos = extension_offset(bad, 0x23852875)
    directory = read_u64(bad, pos + 8 + 16)
    table = read_u64(bad, directory)
    patch(bad, table, ">Q", 1)
    with open_qcow2(str(bad), True) as image:
        assert list(image.bitmaps()["b0"].dirty_runs(0, image.size)) == [(image.size, True)]


# --- backing chains --------------------------------------------------------------------


def test_backing_loop_refused(tmp_path: Path) -> None:
    qimg(tmp_path, "create", "-q", "-f", "qcow2", "a.qcow2", "1M")
    qimg(tmp_path, "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2", "1M")
    qimg(tmp_path, "rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2")
    for top in ("a.qcow2", "b.qcow2"):
        with pytest.raises(ImageError, match="makes a loop in the backing chain"):
            open_image(str(tmp_path / top), read_only=True)
    qimg(tmp_path, "rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", "a.qcow2")
    with pytest.raises(ImageError, match="a.qcow2: backing file 'a.qcow2' makes a loop"):
        open_image(str(tmp_path / "a.qcow2"), read_only=True)


def test_missing_backing_file(tmp_path: Path) -> None:
    qimg(tmp_path, "create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", "top.qcow2", "1M")
    with pytest.raises(ImageError, match="top.qcow2: backing file 'gone.qcow2' .* does not exist"):
        open_image(str(tmp_path / "top.qcow2"), read_only=True)


def test_unsupported_backing_format(tmp_path: Path) -> None:
    qimg(tmp_path, "create", "-q", "-f", "vmdk", "base.vmdk", "1M")
    qimg(tmp_path, "create", "-q", "-f", "qcow2", "-b", "base.vmdk", "-F", "vmdk", "top.qcow2", "1M")
    with pytest.raises(ImageError, match="top.qcow2: backing file .* has unsupported format 'vmdk'"):
        open_image(str(tmp_path / "top.qcow2"), read_only=True)


def test_deep_chain(tmp_path: Path) -> None:
    """40 qcow2 layers over a raw base, each writing its own 4 KiB, each layer 64 KiB longer."""
    base = tmp_path / "l0.raw"
    with open(base, "wb") as f:
        f.write(b"\x01" * 4096)
    prev, fmt = "l0.raw", "raw"
    for i in range(1, 41):
        name = f"l{i}.qcow2"
        qimg(tmp_path, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "-b", prev, "-F", fmt,
             name, str(4096 + i * 65536))
        with open(tmp_path / "pattern", "wb"):
            pass
        from tests.qcow2_fixtures import qio
        qio(tmp_path, "qcow2", name, f"write -P {i + 1} {i * 4096} 4096")
        prev, fmt = name, "qcow2"
    with open_image(str(tmp_path / prev), read_only=True) as image:
        data = image.read(0, image.size)
        for i in range(41):
            assert data[i * 4096:(i + 1) * 4096] == bytes([i + 1]) * 4096
        assert data[41 * 4096:] == bytes(image.size - 41 * 4096)
        depths = {e.depth for e in image.extents(0, image.size)}
        assert max(depths) == 41


# --- fuzzing -------------------------------------------------------------------------


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_metadata_never_crashes(fx: dict[str, Path], tmp_path_factory: pytest.TempPathFactory,
                                       data: st.DataObject) -> None:
    """Random byte changes in header/L1/L2/bitmap metadata: ImageError/ImageIOError or correct service."""
    name = data.draw(st.sampled_from(["v3-64k.qcow2", "bitmaps.qcow2", "extl2.qcow2", "cs512.qcow2",
                                      "comp-zstd-4k.qcow2", "chain-top.qcow2"]))
    src = fx[name]
    blob = bytearray(src.read_bytes())
    region = data.draw(st.sampled_from(["header", "anywhere"]))
    hi = min(len(blob), 512) if region == "header" else len(blob)
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, hi - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    path = src.parent / ("fuzz-" + name)  # same directory: backing names still resolve
    path.write_bytes(bytes(blob))
    try:
        image = open_qcow2(str(path), True)
    except ImageError as exc:
        assert str(exc).startswith(str(path)) or "backing" in str(exc) or "fuzz-" in str(exc)
        return
    with image:
        n = min(image.size, 8 * MiB)
        try:
            image.read(0, n)
        except ImageIOError:
            pass
        try:
            for _ext in image.extents(0, min(image.size, 1 << 40)):
                pass
        except ImageIOError:
            pass
        for bitmap in image.bitmaps().values():
            try:
                for _run in bitmap.dirty_runs(0, image.size):
                    pass
            except ImageIOError:
                pass
