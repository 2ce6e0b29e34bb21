"""The external data file of a qcow2 image served writable (qcow2 spec, incompatible
feature bit 2 'External data file' and autoclear bit 1 'Raw external data').

Guest cluster N lives at offset N * cluster_size of the data file; the qcow2 file
holds only metadata. :func:`open_writable` opens it for the writer and locks it as
QEMU locks a writable data file; :func:`zero_range` and :func:`discard_range` are
what zeroing and freeing a data cluster do to it. A *raw* data file (autoclear
bit 1) must stay a valid raw image of the guest at every moment the writer's
changes are durable, so wherever the guest reads zeros from metadata the data file
reads zeros too: zeroing and freeing write real zeros when a hole cannot be made.

Every function runs on the caller's thread (the writer's worker threads; the opening
on the thread that makes the image writable) and makes a few system calls.
"""

from __future__ import annotations

import logging
import os

from pynbd.image.base import FastZeroUnsupported, ImageIOError
from pynbd.image.locking import DATA_FILE_WRITABLE, open_locked_for_writing
from pynbd.image.raw import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOCATE_CANNOT,
    fallocate,
    zero_by_fallocate,
)

log = logging.getLogger(__name__)

#: Zeros are written in pieces of at most this size where no hole can be made.
_ZERO_CHUNK = 1 << 20


def open_writable(path: str) -> int:
    """A read-write descriptor of the data file ``path``, locked for writing (QEMU's
    permissions for a writable data file, :data:`~pynbd.image.locking.DATA_FILE_WRITABLE`).
    The caller owns it. Raises ImageError (one line naming the file) when it cannot be
    opened for writing or another process holds it."""
    return open_locked_for_writing(path, DATA_FILE_WRITABLE, "the external data file")


def _write_zeros(fd: int, path: str, offset: int, length: int) -> None:
    """Explicit zeros over ``[offset, offset+length)``, up to the file's end (past it the
    file reads zeros already, and it must not grow for nothing)."""
    end = min(offset + length, os.fstat(fd).st_size)
    zeros = memoryview(bytes(min(max(end - offset, 0), _ZERO_CHUNK)))
    pos = offset
    try:
        while pos < end:
            pos += os.pwrite(fd, zeros[:min(end - pos, len(zeros))], pos)
    except OSError as exc:
        raise ImageIOError(f"{path}: cannot write zeros at {pos:#x}: {exc.strerror}", exc.errno) from None


def zero_range(fd: int, path: str, offset: int, length: int, *, may_trim: bool, fast: bool) -> None:
    """Make data file bytes ``[offset, offset+length)`` read as zeros: a hole when
    ``may_trim``, else zeroed blocks that stay allocated (as QEMU's write-zeroes on a
    file), else written zeros. With ``fast``, FastZeroUnsupported instead of writing
    zeros (nothing changed). ImageIOError on other failures."""
    try:
        if zero_by_fallocate(fd, offset, length, may_trim):
            return
    except OSError as exc:
        raise ImageIOError(f"{path}: cannot zero {offset:#x}+{length:#x}: {exc.strerror}", exc.errno) from None
    if fast:
        raise FastZeroUnsupported(f"{path}: zeroing {offset}+{length} means writing zeros")
    _write_zeros(fd, path, offset, length)


def discard_range(fd: int, path: str, offset: int, length: int, *, must_zero: bool) -> None:
    """A data cluster is no longer referenced: punch a hole there (what QEMU's discard
    passes down to the data file). Where the file system cannot, a raw data file
    (``must_zero``) gets written zeros; another keeps its bytes (nothing reads them).
    ImageIOError when a raw data file cannot be zeroed."""
    try:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        return
    except OSError as exc:
        if must_zero:
            if exc.errno not in FALLOCATE_CANNOT:
                raise ImageIOError(f"{path}: cannot discard {offset:#x}+{length:#x}: {exc.strerror}",
                                   exc.errno) from None
            _write_zeros(fd, path, offset, length)
        else:
            log.debug("%s: discarding %#x+%#x failed: %s (the bytes stay; nothing maps them)",
                      path, offset, length, exc.strerror)
