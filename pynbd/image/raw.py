"""Raw images: a regular file or a block device, byte for byte.

Allocation comes from ``SEEK_DATA``/``SEEK_HOLE``; zeroing and trimming use
``fallocate`` (punch hole / zero range), which Python's ``os`` module does not
expose with flags, so it is called through libc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import itertools
import logging
import os
import stat
from collections.abc import Iterator, Sequence

from pynbd.image.base import (
    Extent,
    FastZeroUnsupported,
    HostSegment,
    Image,
    ImageError,
    ReadSegment,
    ZeroSegment,
)

log = logging.getLogger(__name__)

# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int

#: Upper bound of extents one ``extents()`` call produces; the caller re-queries.
MAX_EXTENTS_PER_CALL = 65536
#: Chunk size for writing explicit zeros when fallocate cannot help.
_ZERO_CHUNK = 1 << 20


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` with flags; raises OSError."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def data_runs(fd: int, offset: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """Yield ``(start, stop, is_data)`` runs of ``fd`` over ``[offset, end)``.

    Uses SEEK_DATA/SEEK_HOLE (one lseek per run, like qemu's raw driver); a
    file system without them reports all data. This loop is the per-extent
    hot path of raw block status, so it avoids helper calls.
    """
    lseek = os.lseek
    pos = offset
    while pos < end:
        try:
            data = lseek(fd, pos, SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from pos to EOF
                yield pos, end, False
                return
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                yield pos, end, True
                return
            raise
        if data > pos:
            if data >= end:
                yield pos, end, False
                return
            yield pos, data, False
            pos = data
        try:
            hole = lseek(fd, pos, SEEK_HOLE)
        except OSError as exc:
            if exc.errno not in (errno.ENXIO, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            hole = end
        if hole >= end:
            yield pos, end, True
            return
        if hole <= pos:  # a file system that answers nonsense: never loop forever
            hole = pos + 1
        yield pos, hole, True
        pos = hole


SEEK_DATA = os.SEEK_DATA
SEEK_HOLE = os.SEEK_HOLE
_new_extent = tuple.__new__  # Extent(...) without NamedTuple's Python-level __new__


class RawImage(Image):
    format_name = "raw"

    def __init__(self, path: str, read_only: bool = False) -> None:
        self.path = path
        self.read_only = read_only
        flags = os.O_RDONLY if read_only else os.O_RDWR
        try:
            self.fd = os.open(path, flags | os.O_CLOEXEC)
        except OSError as exc:
            raise ImageError(f"{path}: cannot open: {exc.strerror}") from None
        st = os.fstat(self.fd)
        self.is_block_device = stat.S_ISBLK(st.st_mode)
        if self.is_block_device:
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
        elif stat.S_ISREG(st.st_mode):
            self.size = st.st_size
        else:
            os.close(self.fd)
            raise ImageError(f"{path}: not a regular file or block device")
        self.fast_zero = not read_only and not self.is_block_device
        self._closed = False

    # -- reading --

    def read_segments(self, offset: int, length: int) -> Sequence[ReadSegment]:
        end = offset + length
        segments: list[ReadSegment] = []
        for start, stop, is_data in data_runs(self.fd, offset, end):
            if is_data:
                segments.append(HostSegment(stop - start, self.fd, start))
            else:
                segments.append(ZeroSegment(stop - start))
        return segments

    def extents(self, offset: int, length: int, limit: int | None = None) -> list[Extent]:
        # A raw layer is allocated everywhere: depth 1, holes included (§5.5).
        cap = MAX_EXTENTS_PER_CALL if limit is None else min(limit, MAX_EXTENTS_PER_CALL)
        runs = itertools.islice(data_runs(self.fd, offset, offset + length), cap)
        new = _new_extent
        return [new(Extent, (start, stop - start, is_data, not is_data, 1)) for start, stop, is_data in runs]

    # -- writing --

    def _check_writable(self) -> None:
        if self.read_only:
            raise ImageError(f"{self.path}: image is open read-only")

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._check_writable()
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fast: bool = False) -> None:
        self._check_writable()
        modes = []
        if may_trim and not self.is_block_device:
            modes.append(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        modes.append(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE)
        for mode in modes:
            try:
                fallocate(self.fd, mode, offset, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
        if fast:
            raise FastZeroUnsupported(f"{self.path}: cannot zero quickly")
        zeros = bytes(min(length, _ZERO_CHUNK))
        end = offset + length
        while offset < end:
            n = min(end - offset, len(zeros))
            self.write(offset, memoryview(zeros)[:n])
            offset += n

    def trim(self, offset: int, length: int) -> None:
        self._check_writable()
        if self.is_block_device:
            return  # a hint; BLKDISCARD is not worth the risk here
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise

    def flush(self) -> None:
        if not self.read_only:
            os.fdatasync(self.fd)

    def cache(self, offset: int, length: int) -> None:
        try:
            os.posix_fadvise(self.fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # a hint: failure must not change semantics (spec, NBD_CMD_CACHE)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.flush()
        finally:
            os.close(self.fd)
