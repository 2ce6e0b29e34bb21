"""A host file's allocation, read with the kernel's own calls (not pynbd's code):
SEEK_DATA/SEEK_HOLE runs, FIEMAP block states, whether the file system has FIEMAP.

The oracle side of the tests that compare what pynbd and qemu-nbd leave in the files
they serve.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
from pathlib import Path

import pytest

FS_IOC_FIEMAP = 0xC020660B  # _IOWR('f', 11, struct fiemap)
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNWRITTEN = 0x800
HOLE, UNWRITTEN, WRITTEN = "hole", "unwritten", "written"


class _FiemapExtent(ctypes.Structure):
    _fields_ = [("fe_logical", ctypes.c_uint64), ("fe_physical", ctypes.c_uint64),
                ("fe_length", ctypes.c_uint64), ("fe_reserved64", ctypes.c_uint64 * 2),
                ("fe_flags", ctypes.c_uint32), ("fe_reserved", ctypes.c_uint32 * 3)]


_BATCH = 256


class _Fiemap(ctypes.Structure):
    _fields_ = [("fm_start", ctypes.c_uint64), ("fm_length", ctypes.c_uint64),
                ("fm_flags", ctypes.c_uint32), ("fm_mapped_extents", ctypes.c_uint32),
                ("fm_extent_count", ctypes.c_uint32), ("fm_reserved", ctypes.c_uint32),
                ("fm_extents", _FiemapExtent * _BATCH)]


def block_states(path: Path, block: int) -> list[str]:
    """The state of every ``block`` bytes of the file by FIEMAP (synced first): HOLE, UNWRITTEN
    (allocated, reads as zeros) or WRITTEN. Skips on a file system without FIEMAP."""
    size = path.stat().st_size
    states = [HOLE] * ((size + block - 1) // block)
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            fm = _Fiemap(fm_start=pos, fm_length=size - pos, fm_flags=FIEMAP_FLAG_SYNC,
                         fm_extent_count=_BATCH)
            try:
                fcntl.ioctl(fd, FS_IOC_FIEMAP, fm)
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY):
                    pytest.skip("no FIEMAP on this file system")  # (an allowed skip)
                raise
            if not fm.fm_mapped_extents:
                break
            for e in fm.fm_extents[:fm.fm_mapped_extents]:
                assert e.fe_logical % block == 0 and e.fe_length % block == 0, (e.fe_logical,
                                                                                 e.fe_length)
                state = UNWRITTEN if e.fe_flags & FIEMAP_EXTENT_UNWRITTEN else WRITTEN
                for b in range(e.fe_logical // block,
                               min(len(states), (e.fe_logical + e.fe_length) // block)):
                    states[b] = state
            last = fm.fm_extents[fm.fm_mapped_extents - 1]
            pos = last.fe_logical + last.fe_length
            if last.fe_flags & FIEMAP_EXTENT_LAST:
                break
    finally:
        os.close(fd)
    return states


def seek_runs(path: Path) -> list[tuple[int, int, bool]]:
    """The file's (offset, length, is_data) runs from SEEK_DATA/SEEK_HOLE."""
    runs: list[tuple[int, int, bool]] = []
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        pos = 0
        while pos < size:
            try:
                data = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:
                    raise
                data = size
            if data > pos:
                runs.append((pos, data - pos, False))
            if data >= size:
                break
            hole = os.lseek(fd, data, os.SEEK_HOLE)
            runs.append((data, hole - data, True))
            pos = hole
    finally:
        os.close(fd)
    return runs


def fs_has_fiemap(path: Path) -> bool:
    """Whether the file system of ``path`` answers FS_IOC_FIEMAP (tmpfs, NFS do not)."""
    header = struct.pack("=QQIIII", 0, 1 << 62, 0, 0, 0, 0)
    with open(path, "rb") as f:
        try:
            fcntl.ioctl(f.fileno(), FS_IOC_FIEMAP, bytearray(header), True)
        except OSError:
            return False
    return True
