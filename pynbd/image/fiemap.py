"""Where a file's data is, from ``FS_IOC_FIEMAP``: thousands of extents per system call.

``SEEK_DATA``/``SEEK_HOLE`` costs one ``lseek`` per extent (qemu's raw driver
makes 1.5 per extent); on a fragmented file those calls are most of the cost
of a block-status request. FIEMAP returns the file's extents in batches.

FIEMAP has a history of lost data: without ``FIEMAP_FLAG_SYNC``, some kernels
did not report data that was still only in the page cache (delayed
allocation), and copy tools that trusted the reported holes skipped it
(coreutils cp and qemu-img, both of which then moved to ``SEEK_DATA``). So:

- every call passes ``FIEMAP_FLAG_SYNC``: the kernel writes the file's dirty
  pages back first, so every byte of data has an extent. On a file without
  dirty pages that costs nothing measurable (bench/README.md).
- unwritten (preallocated) extents are not taken as data or as holes:
  ``SEEK_DATA``/``SEEK_HOLE`` decide inside them (they look at the page
  cache), so the answers are exactly what the ``lseek`` path gives.
- the caller uses FIEMAP only while it has no unflushed writes of its own
  (the sync would write them back inside a block-status request), and falls
  back to ``lseek`` where the file system has no FIEMAP (tmpfs, NFS, block
  devices) or answers something inconsistent.

The layouts are ``struct fiemap`` and ``struct fiemap_extent`` of
``linux/fiemap.h``, in host byte order.
"""

from __future__ import annotations

import errno
import fcntl
import struct
import sys
from array import array
from itertools import repeat
from operator import add, and_

#: _IOWR('f', 11, struct fiemap)
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNWRITTEN = 0x800

#: fm_start, fm_length, fm_flags, fm_mapped_extents, fm_extent_count, fm_reserved
_HEADER = struct.Struct("=QQIIII")
#: struct fiemap_extent: fe_logical, fe_physical, fe_length, fe_reserved64[2],
#: fe_flags, fe_reserved[3] -- 56 bytes, read as 7 u64 words.
_EXTENT_SIZE = 56
_WORDS = 7
_LOGICAL, _LENGTH, _FLAGS = 0, 2, 5
#: fe_flags is the first u32 of word 5: its low half on little-endian hosts.
_FLAGS_SHIFT = 0 if sys.byteorder == "little" else 32

#: Extents asked for by the first call of a scan, and at most per call (a 224 KiB buffer).
FIRST_BATCH = 64
BATCH = 4096

_UNSUPPORTED = {errno.EOPNOTSUPP, errno.ENOTTY, errno.EBADR, errno.EINVAL, errno.ENOSYS}


class FiemapUnsupported(Exception):
    """This file cannot be mapped with FIEMAP (the message says why); use lseek."""


def check_order(lengths: list[int], gaps: list[int], start: int, end: int) -> None:
    """Extents must be non-empty and each after the previous one.

    Anything else is a file system bug, and a wrong hole loses data, so the
    caller falls back to lseek.
    """
    if min(lengths) <= 0 or min(gaps) < 0:
        raise FiemapUnsupported(f"FIEMAP gave overlapping or empty extents in [{start}, {end})")


class MappedExtents:
    """Data extents of one FIEMAP call, clipped to the asked range, in columns."""

    __slots__ = ("starts", "ends", "_flag_words", "complete")

    def __init__(self, starts: list[int], ends: list[int], flag_words: array, complete: bool) -> None:
        self.starts = starts
        self.ends = ends
        self._flag_words = flag_words
        #: True when no extent follows the last one in the asked range.
        self.complete = complete

    @property
    def unwritten(self) -> list[int]:
        """Indexes of unwritten (preallocated) extents."""
        mask = FIEMAP_EXTENT_UNWRITTEN << _FLAGS_SHIFT
        if not any(map(and_, self._flag_words, repeat(mask))):
            return []
        return [i for i, word in enumerate(self._flag_words) if word & mask]


def map_extents(fd: int, start: int, end: int, max_extents: int = BATCH) -> MappedExtents:
    """One FIEMAP call for ``[start, end)``: up to ``max_extents`` extents, clipped to it.

    Raises :class:`FiemapUnsupported` when the file system has no FIEMAP.
    The caller checks that the extents are sorted, disjoint and non-empty
    (:func:`check_order`) while it computes their lengths and gaps anyway.
    """
    buf = bytearray(_HEADER.size + max_extents * _EXTENT_SIZE)
    _HEADER.pack_into(buf, 0, start, end - start, FIEMAP_FLAG_SYNC, 0, max_extents, 0)
    try:
        fcntl.ioctl(fd, FS_IOC_FIEMAP, buf, True)
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            raise FiemapUnsupported(f"FIEMAP not supported ({exc.strerror})") from None
        raise
    count = _HEADER.unpack_from(buf)[3]
    if count == 0:
        return MappedExtents([], [], array("Q"), True)
    words = array("Q")
    words.frombytes(memoryview(buf)[_HEADER.size:_HEADER.size + count * _EXTENT_SIZE])
    starts = words[_LOGICAL::_WORDS].tolist()
    ends = list(map(add, starts, words[_LENGTH::_WORDS].tolist()))
    # The kernel returns the extents that overlap the range: only the first
    # and the last can stick out of it.
    starts[0] = max(starts[0], start)
    ends[-1] = min(ends[-1], end)
    flag_words = words[_FLAGS::_WORDS]
    last = (flag_words[-1] >> _FLAGS_SHIFT) & FIEMAP_EXTENT_LAST
    complete = count < max_extents or bool(last) or ends[-1] >= end
    return MappedExtents(starts, ends, flag_words, complete)
