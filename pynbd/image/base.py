"""The one small interface every image driver implements.

The server never knows whether it serves a raw file, a qcow2 image or a backing
chain: it asks an :class:`Image` for its size, for the *segments* a guest range
reads from (so that data that sits 1:1 in a host file can go out with
sendfile), for allocation extents, and for its persistent dirty bitmaps.

Drivers raise :class:`ImageError` (with the image path and the offending field
or offset in the message) for anything wrong with the image itself.
"""

from __future__ import annotations

import abc
import functools
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

from pynbd.runlength import Runs


class ImageError(Exception):
    """A problem with an image file: unreadable, malformed, unsupported.

    The message always names the file and, where it applies, the field or the
    offset that is wrong, so that it can be shown to a user as one line.
    """


class FastZeroUnsupported(ImageError):
    """WRITE_ZEROES with NBD_CMD_FLAG_FAST_ZERO cannot be done fast; nothing was changed."""


class ImageIOError(ImageError):
    """An I/O error while serving one request; maps to NBD_EIO."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno


# --- read segments -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HostSegment:
    """``length`` guest bytes stored contiguously in ``fd`` at ``host_offset``.

    The file descriptor belongs to the image; callers must not close it. This
    is what the zero-copy path hands to ``os.sendfile``. ``file_size`` lets
    the caller notice that a host file is shorter than the segment (then the
    tail reads as zeros, as the image driver already guarantees for pread).
    """

    length: int
    fd: int
    host_offset: int


@dataclass(frozen=True, slots=True)
class ZeroSegment:
    """``length`` guest bytes that read as zeros (hole, zero cluster, past a short backing file)."""

    length: int


@dataclass(frozen=True, slots=True)
class BytesSegment:
    """``length`` guest bytes the driver had to produce in memory (compressed cluster, ...)."""

    data: bytes | memoryview

    @property
    def length(self) -> int:
        return len(self.data)


ReadSegment = HostSegment | ZeroSegment | BytesSegment


# --- allocation extents --------------------------------------------------------


class Extent(NamedTuple):
    """A run of guest bytes with one allocation state and depth (see :class:`Extents`).

    ``data``: backed by allocated data somewhere in the chain (clear means
    NBD_STATE_HOLE in ``base:allocation``). ``zero``: reads as zeros
    (NBD_STATE_ZERO); every driver here reports non-data as zeros, and data
    as not known to be zero except where qemu knows it is (qcow2 data over a
    hole in its host file: both set). ``depth``: the
    ``qemu:allocation-depth`` value, 0 when no layer allocates the range, 1
    for the top image, N for the (N-1)-th backing file (QEMU's
    ``qemu:allocation-depth`` context, docs/interop/nbd.txt in QEMU).
    """

    offset: int
    length: int
    data: bool
    zero: bool
    depth: int

    @property
    def end(self) -> int:
        return self.offset + self.length


#: Allocation run values. They are the ``base:allocation`` status bits of
#: the NBD spec's base:allocation (HOLE = 1, ZERO = 2) on purpose: the context then
#: sends the runs as they are, with no per-extent translation.
STATE_DATA = 0
#: Allocated and reads as zeros (ZERO without HOLE): qcow2 data over a hole in its host
#: file, where QEMU asks the host file (pynbd.image.qcow2.chain.split_host_holes).
STATE_DATA_ZERO = 2
STATE_HOLE_ZERO = 3


class Extents:
    """Allocation of a range from ``offset``, as two independent run lists.

    ``allocation`` runs have values STATE_DATA, STATE_DATA_ZERO or STATE_HOLE_ZERO:
    every driver reports non-data as reading zeros and data as not known to be
    zero, as qemu does, except qcow2 data over host-file holes (STATE_DATA_ZERO).
    ``depth`` runs have ``qemu:allocation-depth`` values; a driver may give a function that computes them, called only if a client
    asks for that context. Each may cover a prefix of the range (a driver may
    stop early; clients re-query). Run lists, not one object per extent: a
    fragmented image gives tens of thousands per block-status request, and
    the contexts turn runs into descriptors with C-level loops
    (:mod:`pynbd.runlength`).
    """

    __slots__ = ("offset", "allocation", "_depth")

    def __init__(self, offset: int, allocation: Runs, depth: Runs | Callable[[], Runs]) -> None:
        self.offset = offset
        self.allocation = allocation
        self._depth = depth

    @property
    def depth(self) -> Runs:
        if callable(self._depth):
            self._depth = self._depth()
        return self._depth

    def __iter__(self) -> Iterator[Extent]:
        """One :class:`Extent` per stretch where both allocation and depth are constant."""
        alloc = iter(self.allocation)
        depths = iter(self.depth)
        pos = self.offset
        alloc_left = depth_left = 0
        state = depth = 0
        while True:
            if not alloc_left:
                alloc_left, state = next(alloc, (0, 0))
            if not depth_left:
                depth_left, depth = next(depths, (0, 0))
            n = min(alloc_left, depth_left)
            if n <= 0:
                return
            yield Extent(pos, n, state != STATE_HOLE_ZERO, state != STATE_DATA, depth)
            pos += n
            alloc_left -= n
            depth_left -= n


# --- dirty bitmaps -----------------------------------------------------------------


class Bitmap(abc.ABC):
    """A dirty bitmap, exported as ``qemu:dirty-bitmap:NAME``."""

    name: str
    granularity: int
    #: NBD connections that selected its context (changed under the image's metadata
    #: lock): the bitmap is busy while any does.
    readers: int = 0
    #: Writes are recorded into it (QEMU's ``recording``).
    recording: bool = False

    @abc.abstractmethod
    def dirty_runs(self, offset: int, length: int, limit: int | None = None) -> Runs:
        """Runs with value 1 (dirty) or 0 (clean) covering exactly ``[offset, offset+length)``.

        With ``limit``, at most that many runs, covering a prefix of the range
        (block status with REQ_ONE needs only the first: without the limit,
        ``qemu-img map`` over NBD would cost O(extents²)).

        Runs are contiguous from ``offset``; neighbouring runs may share a
        state (callers merge).
        """

    def preload(self) -> None:
        """Read the bitmap now (as qemu does when it opens the image), so the first
        client does not wait for it; raises ImageIOError if it cannot be read."""


@dataclass(frozen=True, slots=True)
class BitmapInfo:
    """One bitmap of an image file in the words of QEMU's ``BlockDirtyInfo``
    (``query-named-block-nodes``), plus its on-disk flags and what makes it unusable.
    What ``pynbd bitmap`` lists."""

    name: str
    #: Dirty bytes: the granules set times the granularity; 0 when inconsistent, as QEMU says.
    count: int
    granularity: int
    #: Records writes: enabled (flag ``auto``) and not inconsistent.
    recording: bool
    #: In use by an operation (an NBD export of a running server, say); never offline.
    busy: bool
    #: Stored in the image (every bitmap pynbd reads is).
    persistent: bool
    #: Unusable: flagged in use on disk (not stored cleanly), or not readable.
    inconsistent: bool
    #: The directory entry's flags as ``qemu-img info`` names them ("in-use", "auto").
    flags: tuple[str, ...] = ()
    #: Why it is inconsistent (None when it is not).
    problem: str | None = None


# --- the image ---------------------------------------------------------------------


class Image(abc.ABC):
    """An opened image. One object per export, shared by all its connections."""

    #: Path of the image, for messages.
    path: str
    #: Virtual size in bytes.
    size: int
    #: True when the image was opened read-only (or the driver cannot write it).
    read_only: bool
    #: Why a driver serves an image read-only that was asked for writable (for the log).
    read_only_reason: str | None = None

    #: Short driver name ("raw", "qcow2"), for logs and ``nbdinfo`` descriptions.
    format_name: str
    #: Extents change only through this object (they come from metadata the
    #: driver holds, not from asking the host file system each time), so block
    #: status answers may be kept until the image is changed through the server.
    stable_extents: bool = False

    # -- what every driver shares (created on first use: drivers need not call __init__) --

    @functools.cached_property
    def changes(self) -> "ChangeFeed":
        """Announces which guest ranges change (pynbd.image.changes)."""
        return ChangeFeed()

    @functools.cached_property
    def leases(self) -> "HostLeases":
        """Pins the host ranges of reads being sent (pynbd.image.leases)."""
        return HostLeases()

    @functools.cached_property
    def metadata_lock(self) -> threading.RLock:
        """Guards the driver's in-memory metadata (tables, refcounts, bitmap bits): taken
        around lookups and updates, never held across an await."""
        return threading.RLock()

    # -- reading --

    @abc.abstractmethod
    def read_segments(self, offset: int, length: int) -> Sequence[ReadSegment]:
        """Describe how to produce guest bytes ``[offset, offset+length)``.

        The segments are in guest order and their lengths add up to
        ``length``. The caller validated the range against :attr:`size`.
        """

    def read(self, offset: int, length: int) -> bytes:
        """Read guest bytes into memory (the copy path, and tests)."""
        out = bytearray(length)
        view = memoryview(out)
        pos = 0
        for seg in self.read_segments(offset, length):
            n = seg.length
            if isinstance(seg, HostSegment):
                # A host file shorter than the mapping reads as zeros (bytearray
                # is zero-filled already); qemu does the same for raw files.
                os.preadv(seg.fd, [view[pos:pos + n]], seg.host_offset)
            elif isinstance(seg, BytesSegment):
                view[pos:pos + n] = seg.data
            pos += n
        return bytes(out)

    # -- allocation --

    @abc.abstractmethod
    def extents(self, offset: int, length: int, limit: int | None = None) -> Extents:
        """Extents covering ``[offset, offset+length)`` (or a prefix of it).

        ``limit`` caps the number of extents (see :meth:`Bitmap.dirty_runs`).

        Extents are contiguous starting at ``offset``. A driver may stop early
        (e.g. after many extents); callers re-query from where it stopped.
        Neighbouring extents may be equal (callers merge per context).
        """

    # -- bitmaps --

    def bitmaps(self) -> Mapping[str, Bitmap]:
        """The persistent dirty bitmaps of the top image that may be exported."""
        return {}

    def bitmap_infos(self) -> Sequence[BitmapInfo]:
        """Every bitmap in the top image, including ones that cannot be exported."""
        return ()

    # -- writing (drivers that cannot write raise ImageError) --

    def write(self, offset: int, data: bytes | memoryview) -> None:
        raise ImageError(f"{self.path}: {self.format_name} image is read-only in pynbd")

    def write_now(self, offset: int, data: bytes | memoryview) -> bool:
        """Do :meth:`write` now if it needs no lock another thread may hold and no change
        of metadata (True), else nothing (False: the caller runs :meth:`write` in a
        worker thread). Called on the event loop thread."""
        return False

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fast: bool = False) -> None:
        """Make the range read as zeros; ``may_trim`` allows punching holes.

        With ``fast`` the driver raises :class:`FastZeroUnsupported` *before
        touching anything* when it cannot do better than writing zeros.
        """
        raise ImageError(f"{self.path}: {self.format_name} image is read-only in pynbd")

    def trim(self, offset: int, length: int) -> None:
        raise ImageError(f"{self.path}: {self.format_name} image is read-only in pynbd")

    def flush(self) -> None:
        """Make completed writes durable. A no-op for read-only images."""

    def cache(self, offset: int, length: int) -> None:
        """Prefetch hint (NBD_CMD_CACHE); never changes semantics."""

    #: WRITE_ZEROES can be done faster than writing zeros (NBD FAST_ZERO).
    fast_zero: bool = False

    @abc.abstractmethod
    def close(self) -> None:
        """Flush (if writable) and release file descriptors."""

    def __enter__(self) -> "Image":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# (At the end: these modules use the segment types above.)
from pynbd.image.changes import ChangeFeed  # noqa: E402
from pynbd.image.leases import HostLeases  # noqa: E402
