"""Raw images: a regular file or a block device, byte for byte.

Block status comes from FIEMAP in batches (:mod:`pynbd.image.fiemap`), or
from ``SEEK_DATA``/``SEEK_HOLE`` where FIEMAP cannot be used; reads find their
holes with ``SEEK_DATA``/``SEEK_HOLE``. Zeroing and trimming use
``fallocate`` (punch hole / zero range), which Python's ``os`` module does not
expose with flags, so it is called through libc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import stat
import sys
from collections.abc import Iterator, Sequence
from itertools import accumulate
from operator import sub

from pynbd.image.base import (
    STATE_DATA,
    STATE_HOLE_ZERO,
    Extents,
    FastZeroUnsupported,
    HostSegment,
    Image,
    ImageError,
    ReadSegment,
    ZeroSegment,
)
from pynbd.image.fiemap import BATCH, FIRST_BATCH, FiemapUnsupported, MappedExtents, check_order, map_extents
from pynbd.image.locking import RAW_READ_ONLY, RAW_WRITABLE, LockPermissions, lock_file
from pynbd.runlength import Runs, concat, interleave, normalize

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
#: Runs found with lseek before block status switches to FIEMAP: a few runs cost less
#: by lseek than a FIEMAP call (bench/README.md).
SEEKS_BEFORE_FIEMAP = 16
#: Chunk size for writing explicit zeros when fallocate cannot help.
_ZERO_CHUNK = 1 << 20


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """``fallocate(2)`` with flags; raises OSError."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


#: fallocate errors that mean "this file system cannot do that mode": another way is tried.
FALLOCATE_CANNOT = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def zero_by_fallocate(fd: int, offset: int, length: int, may_trim: bool) -> bool:
    """Make ``[offset, offset+length)`` of ``fd`` read as zeros without writing them: a
    hole when ``may_trim``, else zeroed blocks that stay allocated. True when done; False
    when the file system can do neither (the caller writes zeros). Other errors: OSError."""
    modes = ([FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE] if may_trim else []) + \
        [FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE]
    for mode in modes:
        try:
            fallocate(fd, mode, offset, length)
            return True
        except OSError as exc:
            if exc.errno not in FALLOCATE_CANNOT:
                raise
    return False


def seek_runs(fd: int, offset: int, end: int, limit: int | None = None) -> Runs:
    """Allocation runs (STATE_DATA / STATE_HOLE_ZERO) of ``[offset, end)`` from SEEK_DATA/SEEK_HOLE.

    One lseek per run (qemu's raw driver makes 1.5); a file system without
    them reports all data. At most ``limit`` runs (a prefix). This loop is
    the per-extent hot path when FIEMAP cannot be used, so it is flat.
    """
    lseek = os.lseek
    lengths: list[int] = []
    states: list[int] = []
    count = sys.maxsize if limit is None else limit  # runs still allowed
    pos = offset
    while pos < end and count > 0:
        try:
            found = lseek(fd, pos, SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole from pos to EOF
                lengths.append(end - pos)
                states.append(STATE_HOLE_ZERO)
                pos = end
                break
            if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                lengths.append(end - pos)
                states.append(STATE_DATA)
                pos = end
                break
            raise
        if found > pos:
            if found >= end:
                lengths.append(end - pos)
                states.append(STATE_HOLE_ZERO)
                pos = end
                break
            lengths.append(found - pos)
            states.append(STATE_HOLE_ZERO)
            pos = found
            count -= 1
            if not count:
                break
        try:
            hole = lseek(fd, pos, SEEK_HOLE)
        except OSError as exc:
            if exc.errno not in (errno.ENXIO, errno.EINVAL, errno.EOPNOTSUPP):
                raise
            hole = end
        if hole >= end:
            hole = end
        elif hole <= pos:  # a file system that answers nonsense: never loop forever
            hole = pos + 1
        lengths.append(hole - pos)
        states.append(STATE_DATA)
        pos = hole
        count -= 1
    return Runs(lengths, states, size_hint=pos - offset)


def data_runs(fd: int, offset: int, end: int) -> Iterator[tuple[int, int, bool]]:
    """``(start, stop, is_data)`` runs of ``fd`` over ``[offset, end)`` (see :func:`seek_runs`)."""
    runs = seek_runs(fd, offset, end)
    starts = list(accumulate(runs.lengths, initial=offset))
    return zip(starts, starts[1:], map(STATE_DATA.__eq__, runs.values))


def fiemap_runs(fd: int, offset: int, end: int, limit: int | None = None) -> Runs:
    """Allocation runs of ``[offset, end)`` from FIEMAP (see :mod:`pynbd.image.fiemap`).

    The same answers as :func:`seek_runs`, in a handful of system calls.
    Raises FiemapUnsupported.
    """
    parts: list[Runs] = []
    count = 0
    # Small first (most files have few extents, and the buffer is 56 bytes an
    # extent), larger while the file keeps filling it.
    batch = FIRST_BATCH if limit is None else max(1, min(FIRST_BATCH, limit))
    pos = offset
    while pos < end:
        mapped = map_extents(fd, pos, end, batch)
        batch = min(batch * 4, BATCH)
        if not mapped.starts:
            break
        parts.append(_extent_runs(fd, pos, mapped))
        count += len(parts[-1])
        pos = mapped.ends[-1]
        if mapped.complete or (limit is not None and count >= limit):
            break
    if pos < end and (limit is None or count < limit):
        parts.append(Runs([end - pos], [STATE_HOLE_ZERO], True, end - pos))  # no extent after pos: a hole to the end
    runs = concat(parts) if parts else Runs([], [], True, 0)
    return runs if limit is None else runs.head(limit)


def _extent_runs(fd: int, pos: int, mapped: MappedExtents) -> Runs:
    """Runs from ``pos`` to the end of the last mapped extent: a hole before each extent, then its data."""
    gaps = list(map(sub, mapped.starts, [pos] + mapped.ends[:-1]))
    sizes = list(map(sub, mapped.ends, mapped.starts))
    check_order(sizes, gaps, pos, mapped.ends[-1])
    covered = mapped.ends[-1] - pos
    unwritten = mapped.unwritten
    if not unwritten and 0 not in gaps[1:]:
        # Hole and data strictly alternate: already normalized, but for an
        # empty first hole when the first extent starts at pos.
        lengths = interleave(gaps, sizes)
        states = [STATE_HOLE_ZERO, STATE_DATA] * len(gaps)
        if not gaps[0]:
            del lengths[0], states[0]
        return Runs(lengths, states, True, covered)
    lengths = interleave(gaps, sizes)
    states = [STATE_HOLE_ZERO, STATE_DATA] * len(gaps)
    for index in reversed(unwritten):  # lseek decides inside preallocated extents
        inside = seek_runs(fd, mapped.starts[index], mapped.ends[index])
        lengths[2 * index + 1:2 * index + 2] = inside.lengths
        states[2 * index + 1:2 * index + 2] = inside.values
    return normalize(Runs(lengths, states, size_hint=covered))


SEEK_DATA = os.SEEK_DATA
SEEK_HOLE = os.SEEK_HOLE


class RawImage(Image):
    format_name = "raw"

    def __init__(self, path: str, read_only: bool = False, fiemap: bool = True,
                 lock: LockPermissions | None = None) -> None:
        """Open ``path``; raises ImageError (the one-line reason, naming ``path``).

        The file is locked as QEMU locks image files (:mod:`pynbd.image.locking`):
        for ``lock``, by default :data:`~pynbd.image.locking.RAW_READ_ONLY` or
        :data:`~pynbd.image.locking.RAW_WRITABLE` after ``read_only``. Another
        process's conflicting lock raises ImageError; closing releases the lock.
        """
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
        try:
            if lock is None:
                lock = RAW_READ_ONLY if read_only else RAW_WRITABLE
            lock_file(self.fd, path, lock)
        except BaseException:
            os.close(self.fd)
            raise
        self.fast_zero = not read_only and not self.is_block_device
        #: Block status from FIEMAP (False: SEEK_DATA/SEEK_HOLE only). Turned
        #: off for good when the file system turns out not to support it.
        self.fiemap = fiemap and not self.is_block_device
        #: Writes since the last flush: FIEMAP's sync would write them back
        #: inside a block-status request, so lseek answers until the flush.
        self._unflushed = False
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

    def extents(self, offset: int, length: int, limit: int | None = None) -> Extents:
        cap = MAX_EXTENTS_PER_CALL if limit is None else min(limit, MAX_EXTENTS_PER_CALL)
        end = offset + length
        # A few lseeks answer most requests (few extents) faster than one FIEMAP
        # call from Python; a range with more runs goes on with FIEMAP.
        allocation = normalize(seek_runs(self.fd, offset, end, min(cap, SEEKS_BEFORE_FIEMAP)))
        covered = offset + allocation.total
        if covered < end and len(allocation) < cap:
            rest: Runs | None = None
            if self.fiemap and not self._unflushed:
                try:
                    rest = fiemap_runs(self.fd, covered, end, cap - len(allocation))
                except FiemapUnsupported as exc:
                    log.info("%s: %s; block status uses SEEK_DATA/SEEK_HOLE", self.path, exc)
                    self.fiemap = False
            if rest is None:
                rest = seek_runs(self.fd, covered, end, cap - len(allocation))
            allocation = concat([allocation, rest])
        # A raw layer is allocated everywhere: depth 1, holes included (QEMU's docs/interop/nbd.txt).
        return Extents(offset, allocation, lambda: Runs([allocation.total], [1], True))

    # -- writing --

    def _check_writable(self) -> None:
        if self.read_only:
            raise ImageError(f"{self.path}: image is open read-only")

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._check_writable()
        self._unflushed = True
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def write_now(self, offset: int, data: bytes | memoryview) -> bool:
        """A pwrite into the page cache, no metadata: always done now."""
        self.write(offset, data)
        return True

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fast: bool = False) -> None:
        self._check_writable()
        self._unflushed = True
        if zero_by_fallocate(self.fd, offset, length, may_trim and not self.is_block_device):
            return
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
        self._unflushed = True
        if self.is_block_device:
            return  # a hint; BLKDISCARD is not worth the risk here
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise

    def flush(self) -> None:
        if not self.read_only:
            self._unflushed = False  # before the sync: a write racing with it sets it again
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
