"""Raw block status from FIEMAP gives exactly what SEEK_DATA/SEEK_HOLE gives, on real files.

Files are built with holes, data, punched holes, preallocated (unwritten)
extents and preallocation past EOF, then mapped both ways; the lseek answers
are what qemu-nbd reports (tests/test_interop_raw.py compares those).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pynbd.image.fiemap import FiemapUnsupported, map_extents
from pynbd.image.raw import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    RawImage,
    fallocate,
    fiemap_runs,
    seek_runs,
)

BLOCK = 4096
SIZE = 256 * BLOCK

operations = st.lists(
    st.tuples(st.sampled_from(["write", "punch", "prealloc", "prealloc_past_eof"]),
              st.integers(0, SIZE // BLOCK - 1), st.integers(1, 24)),
    max_size=25)


def build(path, ops, sync: bool) -> None:
    with open(path, "wb") as f:
        f.truncate(SIZE)
    fd = os.open(path, os.O_RDWR)
    try:
        for op, block, count in ops:
            offset, length = block * BLOCK, min(count * BLOCK, SIZE - block * BLOCK)
            if op == "write":
                os.pwrite(fd, b"\x5a" * length, offset)
            elif op == "punch":
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            elif op == "prealloc":
                fallocate(fd, 0, offset, length)
            else:
                fallocate(fd, FALLOC_FL_KEEP_SIZE, SIZE, length)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def fiemap_works(path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        map_extents(fd, 0, 1)
        return True
    except FiemapUnsupported:
        return False
    finally:
        os.close(fd)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=operations, sync=st.booleans(), data=st.data())
def test_fiemap_equals_seek(tmp_path, ops, sync, data):
    path = tmp_path / "disk.img"
    build(path, ops, sync)
    if not fiemap_works(path):
        pytest.skip("no FIEMAP on this file system")
    offset = data.draw(st.integers(0, SIZE - 1))
    length = data.draw(st.integers(1, SIZE - offset))
    limit = data.draw(st.sampled_from([None, 1, 2, 3, 16, 100]))
    fd = os.open(path, os.O_RDONLY)
    try:
        seek = seek_runs(fd, offset, offset + length)
        by_seek = list(seek)
        by_fiemap = fiemap_runs(fd, offset, offset + length, limit)
    finally:
        os.close(fd)
    for runs in (seek, by_fiemap):  # a size hint, when given, is the sum of the lengths
        assert runs.size_hint in (None, sum(runs.lengths))
    if limit is None:
        assert list(by_fiemap) == by_seek
    else:
        got = list(by_fiemap)
        assert 1 <= len(got) <= limit
        assert got[:-1] == by_seek[:len(got) - 1]
        last_length, last_state = got[-1]
        assert last_state == by_seek[len(got) - 1][1] and last_length <= by_seek[len(got) - 1][0]


@pytest.mark.parametrize("fiemap", [True, False])
def test_image_extents_both_sources(tmp_path, fiemap):
    """RawImage.extents on a file with more runs than the lseek prefix, with either source."""
    path = tmp_path / "disk.img"
    ops = [("write", b, 1) for b in range(0, SIZE // BLOCK, 3)]
    build(path, ops, sync=False)
    image = RawImage(str(path), read_only=True, fiemap=fiemap)
    try:
        runs = image.extents(0, SIZE).allocation
        assert list(runs) == list(seek_runs(image.fd, 0, SIZE))
        assert len(runs) > 100
        assert image.fiemap == (fiemap and fiemap_works(path))
    finally:
        image.close()


def test_unflushed_write_is_seen(tmp_path):
    """Data written through the image and not yet flushed is data in block status."""
    path = tmp_path / "disk.img"
    build(path, [("write", 0, 1)], sync=True)
    image = RawImage(str(path), read_only=False)
    try:
        assert len(image.extents(0, SIZE).allocation) == 2
        image.write(100 * BLOCK, b"\x01" * BLOCK)
        runs = list(image.extents(0, SIZE).allocation)
        assert runs == [(BLOCK, 0), (99 * BLOCK, 3), (BLOCK, 0), (SIZE - 101 * BLOCK, 3)]
        image.flush()
        assert list(image.extents(0, SIZE).allocation) == runs
    finally:
        image.close()


def test_file_system_without_fiemap_falls_back(tmp_path):
    """tmpfs has SEEK_DATA/SEEK_HOLE but no FIEMAP: the image notices once and uses lseek."""
    shm = "/dev/shm"
    if not os.path.isdir(shm) or os.statvfs(shm).f_bsize == 0:
        pytest.skip("no /dev/shm")
    path = os.path.join(shm, f"pynbd-test-{os.getpid()}.img")
    try:
        with open(path, "wb") as f:
            f.truncate(SIZE)
            for block in range(0, SIZE // BLOCK, 8):
                f.seek(block * BLOCK)
                f.write(b"\x01" * BLOCK)
        if fiemap_works(path):
            pytest.skip("/dev/shm supports FIEMAP here")
        image = RawImage(path, read_only=True)
        try:
            runs = list(image.extents(0, SIZE).allocation)
            assert runs == list(seek_runs(image.fd, 0, SIZE))
            assert len(runs) == 2 * (SIZE // BLOCK // 8)
            assert image.fiemap is False
        finally:
            image.close()
    finally:
        os.unlink(path)
