"""The bitmap recorder's crash rule, driven through the image API in-process
(pynbd/image/qcow2/recording.py): what is on disk after each step, read back by
``qemu-img info -U`` and by a fresh parse of the file, never by the recorder itself.

End-to-end recording against qemu-nbd, the kill test and the backup round trip are
in tests/test_bitmap_recording.py, test_bitmap_crash.py and test_bitmap_backup.py.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.image import open_image
from pynbd.image.base import ImageIOError
from pynbd.image.qcow2.bitmaps import load_bitmaps
from pynbd.image.qcow2.header import parse_header
from pynbd.image.qcow2.image import Qcow2Image

pytestmark = pytest.mark.needs("qemu-img")

MiB = 1 << 20


def make_image(path: Path, cluster_size: int = 65536) -> Path:
    """64 MiB qcow2 with b0 (enabled, qemu-img's default granularity), b1 (enabled, 512 B)
    and b2 (disabled)."""
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}",
                    str(path), "64M"], check=True)
    for args in (["--add", "b0"], ["--add", "-g", "512", "b1"], ["--add", "--disable", "b2"]):
        subprocess.run(["qemu-img", "bitmap", *args[:-1], str(path), args[-1]], check=True)
    return path


def disk_flags(path: Path) -> dict[str, list[str]]:
    """Bitmap name -> flags, as QEMU reads them from the file now."""
    out = subprocess.run(["qemu-img", "info", "-U", "--output", "json", str(path)],
                         check=True, capture_output=True, text=True).stdout
    bitmaps = json.loads(out)["format-specific"]["data"].get("bitmaps", [])
    return {b["name"]: b["flags"] for b in bitmaps}


def disk_granularity(path: Path, name: str) -> int:
    out = subprocess.run(["qemu-img", "info", "-U", "--output", "json", str(path)],
                         check=True, capture_output=True, text=True).stdout
    return next(b["granularity"] for b in json.loads(out)["format-specific"]["data"]["bitmaps"]
                if b["name"] == name)


def disk_dirty(path: Path, name: str) -> list[tuple[int, int]]:
    """The dirty ranges of bitmap ``name`` as a fresh parse of the file sees them (no image
    object, no locks: the writer in this process holds them)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        header = parse_header(str(path), fd, size)
        bitmap = next(b for b in load_bitmaps(str(path), fd, size, header) if b.name == name)
        out, pos = [], 0
        for length, dirty in bitmap.dirty_runs(0, header.size):
            if dirty:
                out.append((pos, length))
            pos += length
        return out
    finally:
        os.close(fd)


@contextmanager
def writable(path: Path) -> Iterator[Qcow2Image]:
    image = open_image(str(path), "qcow2")
    assert isinstance(image, Qcow2Image) and not image.read_only, image.read_only_reason
    try:
        yield image
    finally:
        image.close()


def test_first_new_granule_flags_enabled_bitmaps_before_data(tmp_path: Path) -> None:
    path = make_image(tmp_path / "a.qcow2")
    with writable(path) as image:
        assert disk_flags(path) == {"b0": ["auto"], "b1": ["auto"], "b2": []}
        image.write(3 * MiB + 100, b"x" * 1000)
        # Flagged before the write returned; the disabled bitmap untouched.
        assert disk_flags(path) == {"b0": ["in-use", "auto"], "b1": ["in-use", "auto"], "b2": []}
        image.flush()
        assert disk_flags(path) == {"b0": ["auto"], "b1": ["auto"], "b2": []}
        assert disk_dirty(path, "b0") == [(3 * MiB, 65536)]
        assert disk_dirty(path, "b1") == [(3 * MiB, 1536)]
        # A write inside granules dirty on disk already needs no flag.
        image.write(3 * MiB + 200, b"y" * 10)
        assert disk_flags(path)["b0"] == ["auto"]
        assert image.write_now(3 * MiB + 300, b"z" * 10) in (True, False)
        assert disk_flags(path)["b0"] == ["auto"]
        # WRITE_ZEROES and TRIM count as writes.
        image.write_zeroes(10 * MiB, 65536, may_trim=True)
        assert disk_flags(path)["b0"] == ["in-use", "auto"]
        image.trim(20 * MiB + 1, 10)
    assert disk_flags(path) == {"b0": ["auto"], "b1": ["auto"], "b2": []}
    assert disk_dirty(path, "b0") == [(3 * MiB, 65536), (10 * MiB, 65536), (20 * MiB, 65536)]
    assert disk_dirty(path, "b2") == []
    check = subprocess.run(["qemu-img", "check", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_write_now_never_does_io_for_the_flag(tmp_path: Path) -> None:
    """The inline path (event loop) refuses a write that would need the flag written."""
    path = make_image(tmp_path / "a.qcow2")
    with writable(path) as image:
        image.write(0, bytes(65536))  # allocate the cluster, flag, then store
        image.flush()
        assert not image.write_now(MiB, b"a")  # new granule: must go to a thread
        assert disk_flags(path)["b0"] == ["auto"]
        assert image.write_now(100, b"a")  # dirty on disk already, allocated: inline


def test_disabled_bitmap_bytes_never_change(tmp_path: Path) -> None:
    """b2's table and data clusters and its directory entry are as qemu-img wrote them."""
    path = make_image(tmp_path / "a.qcow2")
    subprocess.run(["qemu-img", "bitmap", "--enable", str(path), "b2"], check=True)
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write 0 1M", str(path)], check=True,
                   capture_output=True)
    subprocess.run(["qemu-img", "bitmap", "--disable", str(path), "b2"], check=True)
    before = disk_dirty(path, "b2")
    with writable(path) as image:
        for i in range(40):
            image.write(i * MiB + 7, b"q" * 4096)
            if i % 7 == 0:
                image.flush()
    assert disk_dirty(path, "b2") == before == [(0, MiB)]
    assert disk_flags(path)["b2"] == []


def test_failed_store_leaves_the_flag(tmp_path: Path) -> None:
    """A store that cannot write keeps the bitmaps flagged in use (inconsistent, never stale)."""
    path = make_image(tmp_path / "a.qcow2")
    with writable(path) as image:
        image.write(0, b"w" * 512)
        size = os.path.getsize(path)
        soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
        old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of the signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))  # no room for b0's new data cluster
        try:
            with pytest.raises(ImageIOError):
                image.flush()
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
            signal.signal(signal.SIGXFSZ, old_handler)
        assert disk_flags(path)["b0"] == ["in-use", "auto"]
        image.flush()  # room again: the next store completes
        assert disk_flags(path)["b0"] == ["auto"]
    assert disk_dirty(path, "b0") == [(0, 65536)]


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["write", "zero", "trim", "flush"]),
                          st.integers(0, 64 * MiB - 1), st.integers(1, 3 * MiB)), min_size=1, max_size=12),
       st.sampled_from([512, 65536]))
def test_stored_bits_cover_every_change(tmp_path_factory: pytest.TempPathFactory,
                                        ops: list[tuple[str, int, int]], cluster_size: int) -> None:
    """After any sequence and a close, each enabled bitmap's stored bits are exactly the
    granules the changes touched (a model), and the disabled one is empty."""
    path = make_image(tmp_path_factory.mktemp("rec") / "a.qcow2", cluster_size)
    touched: list[tuple[int, int]] = []
    with writable(path) as image:
        for op, offset, length in ops:
            length = min(length, image.size - offset)
            if op == "write":
                image.write(offset, b"d" * length)
            elif op == "zero":
                image.write_zeroes(offset, length, may_trim=True)
            elif op == "trim":
                image.trim(offset, length)
            else:
                image.flush()
                continue
            touched.append((offset, length))
    for name in ("b0", "b1"):
        g = disk_granularity(path, name)
        granules = set()
        for offset, length in touched:
            granules.update(range(offset // g, (offset + length - 1) // g + 1))
        dirty = set()
        for start, length in disk_dirty(path, name):
            dirty.update(range(start // g, (start + length) // g))
        assert dirty == granules, name
    assert disk_dirty(path, "b2") == []
    assert disk_flags(path) == {"b0": ["auto"], "b1": ["auto"], "b2": []}


def test_dropped_run_chunks_are_computed_again_once_writes_pause(tmp_path: Path) -> None:
    """A scan caches a bitmap's run chunks; writes drop the chunks they touch; once the
    writes pause, the event loop computes those chunks again (and only those), with the
    new bits, so the next scan finds them ready."""
    import asyncio

    from pynbd.image import dirtybitmap

    path = make_image(tmp_path / "a.qcow2")
    with writable(path) as image:
        bitmap = image.bitmaps()["b1"]  # 512 B granules: 64 MiB in several chunks below
        old_chunk = dirtybitmap.RUN_CHUNK_BYTES
        bitmap._chunk_granules = 4 * MiB // bitmap.granularity  # (chunks of 4 MiB for the test)
        try:
            bitmap.dirty_runs(0, 16 * MiB)  # a scan of the first four chunks
            assert bitmap.cached_chunks == [0, 1, 2, 3]

            async def writes_then_pause() -> list[int]:
                for offset in (MiB, 9 * MiB):
                    image.changes.announce(offset, 4096)
                    image.write(offset, b"w" * 4096)
                    image.changes.announce(offset, 4096)
                assert sorted(bitmap.cached_chunks) == [1, 3]
                await asyncio.sleep(dirtybitmap.RECOMPUTE_AFTER * 5)
                return sorted(bitmap.cached_chunks)

            assert asyncio.run(writes_then_pause()) == [0, 1, 2, 3]
            dirty = [(pos, n) for pos, (n, value) in zip(
                _starts(bitmap.dirty_runs(0, 16 * MiB)), bitmap.dirty_runs(0, 16 * MiB)) if value]
            assert dirty == [(MiB, 4096), (9 * MiB, 4096)]
        finally:
            assert dirtybitmap.RUN_CHUNK_BYTES == old_chunk


@pytest.mark.parametrize("readers", [0, 1])
def test_dropped_run_chunks_of_a_bitmap_being_read_are_computed_sooner(tmp_path: Path, readers: int) -> None:
    """While a connection reads the bitmap (its context selected: a scan is coming), the
    chunks writes dropped are computed again once the writes pause RECOMPUTE_AFTER_READ,
    not RECOMPUTE_AFTER."""
    import asyncio
    import time

    from pynbd.image import dirtybitmap

    path = make_image(tmp_path / "a.qcow2")
    with writable(path) as image:
        bitmap = image.bitmaps()["b1"]
        bitmap._chunk_granules = 4 * MiB // bitmap.granularity  # (chunks of 4 MiB for the test)
        bitmap.dirty_runs(0, 16 * MiB)
        bitmap.readers += readers

        async def writes_then_a_short_pause() -> tuple[list[int], float]:
            for offset in (MiB, 9 * MiB):
                image.changes.announce(offset, 4096)
                image.write(offset, b"w" * 4096)
                image.changes.announce(offset, 4096)
            ended = time.monotonic()
            await asyncio.sleep(dirtybitmap.RECOMPUTE_AFTER_READ * 3)
            return sorted(bitmap.cached_chunks), time.monotonic() - ended

        cached, paused = asyncio.run(writes_then_a_short_pause())
        bitmap.readers -= readers
    assert dirtybitmap.RECOMPUTE_AFTER_READ * 3 < dirtybitmap.RECOMPUTE_AFTER
    if readers:
        assert cached == [0, 1, 2, 3]
    elif paused < dirtybitmap.RECOMPUTE_AFTER:  # (a slow machine may have slept past it)
        assert cached == [1, 3]


def _starts(runs) -> list[int]:
    out, pos = [], 0
    for length, _ in runs:
        out.append(pos)
        pos += length
    return out
