"""Backing chains of a qcow2 image: per-layer mapping runs and the walk that resolves them.

A *layer* is one file of a chain (a qcow2 image or a raw file) seen on its
own: :meth:`Layer.runs` classifies guest ranges of that layer without looking
at any other layer. :func:`resolve` walks the chain top to bottom the way
QEMU's ``bdrv_co_block_status_above`` does and says, for every guest range,
which layer answers and how. Reads
(:meth:`pynbd.image.qcow2.image.Qcow2Image.read_segments`), NBD block status
and ``qemu-img map`` emulation (:mod:`pynbd.tools.map`) are all built on it.

Runs are plain tuples ``(pos, length, kind, host)`` — there can be one per
cluster, so no per-run objects.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Sequence
from typing import Protocol

from pynbd.image.base import ImageError
from pynbd.image.raw import RawImage, data_runs

log = logging.getLogger(__name__)

# --- per-layer run kinds (Layer.runs) ----------------------------------------------
#: Data at ``host`` in the layer's data file (qcow2 NORMAL, raw data extent).
KIND_DATA = 0
#: Compressed cluster; ``host`` is the raw L2 entry (qcow2 spec, 'Compressed Clusters Descriptor').
KIND_COMPRESSED = 1
#: Allocated here and reads as zeros; ``host`` is the host offset or -1
#: (qcow2 ZERO_ALLOC / ZERO_PLAIN, raw hole).
KIND_ZERO = 2
#: Not allocated in this layer; ``host`` >= 0 for extended-L2 UNALLOCATED_ALLOC.
KIND_UNALLOC = 3
#: Beyond the end of this layer (only asked of backing layers).
KIND_EOF = 4

# --- resolved kinds (resolve) ------------------------------------------------------
#: Zeros synthesised by a backing layer that ends before the range (QEMU
#: reports them allocated at that short layer).
RESOLVED_SHORT = 5
#: Unallocated in every layer.
RESOLVED_ABSENT = 6

Run = tuple[int, int, int, int]
#: ``(pos, length, layer_index, kind, host)``
Resolved = tuple[int, int, int, int, int]


class Layer(Protocol):
    """One file of a backing chain."""

    path: str
    size: int
    #: fd holding data clusters (the external data file for such qcow2 images).
    data_fd: int
    #: Size of that file when it was opened; data past it reads as zeros.
    data_file_size: int

    def runs(self, offset: int, end: int) -> Iterator[Run]:
        """Classify ``[offset, end)`` of this layer alone; past :attr:`size` yield KIND_EOF."""

    def read_compressed(self, pos: int, entry: int) -> bytes:
        """The decompressed cluster containing guest ``pos`` (raises ImageIOError)."""

    def close(self) -> None: ...


def merge_runs(runs: Iterator[Run]) -> Iterator[Run]:
    """Merge neighbouring runs of one kind whose host ranges are contiguous (or both absent)."""
    cur: Run | None = None
    for run in runs:
        if cur is not None:
            cpos, clen, ckind, chost = cur
            pos, length, kind, host = run
            if (kind == ckind and kind != KIND_COMPRESSED and cpos + clen == pos
                    and (host == chost == -1 or (chost >= 0 and chost + clen == host))):
                cur = (cpos, clen + length, ckind, chost)
                continue
            yield cur
        cur = run
    if cur is not None:
        yield cur


def resolve(layers: Sequence[Layer], offset: int, end: int) -> Iterator[Resolved]:
    """Walk the chain over ``[offset, end)`` (which lies inside ``layers[0].size``).

    Yields ``(pos, length, layer, kind, host)`` in guest order, where kind is
    KIND_DATA / KIND_COMPRESSED / KIND_ZERO (answered by ``layer``),
    RESOLVED_SHORT (``layer`` is the backing layer that ended before ``pos``;
    ``host`` is the UNALLOCATED_ALLOC offset of the layer above, if any) or
    RESOLVED_ABSENT (``layer`` is the bottom layer; ``host`` as for SHORT).
    The walk is iterative, so chain depth is not limited by recursion.
    """
    bottom = len(layers) - 1
    # Each frame: (layer index, its runs, host of the parent's run, parent's run start)
    stack: list[tuple[int, Iterator[Run], int, int]] = [(0, layers[0].runs(offset, end), -1, 0)]
    while stack:
        idx, runs, parent_host, parent_pos = stack[-1]
        run = next(runs, None)
        if run is None:
            stack.pop()
            continue
        pos, length, kind, host = run
        if kind == KIND_UNALLOC:
            if idx == bottom:
                yield pos, length, idx, RESOLVED_ABSENT, host
            else:
                stack.append((idx + 1, layers[idx + 1].runs(pos, pos + length), host, pos))
        elif kind == KIND_EOF:
            synth_host = parent_host + (pos - parent_pos) if parent_host >= 0 else -1
            yield pos, length, idx, RESOLVED_SHORT, synth_host
        else:
            yield pos, length, idx, kind, host


class RawLayer:
    """A raw file used as a backing layer: allocated everywhere, as QEMU reports it."""

    def __init__(self, path: str) -> None:
        self._image = RawImage(path, read_only=True)
        self.path = path
        self.size = self._image.size
        self.data_fd = self._image.fd
        self.data_file_size = self.size

    def runs(self, offset: int, end: int) -> Iterator[Run]:
        stop = min(end, self.size)
        if offset < stop:
            for start, stop_, is_data in data_runs(self.data_fd, offset, stop):
                yield start, stop_ - start, KIND_DATA if is_data else KIND_ZERO, start
        else:
            stop = offset
        if stop < end:
            yield stop, end - stop, KIND_EOF, -1

    def read_compressed(self, pos: int, entry: int) -> bytes:  # pragma: no cover - never called
        raise AssertionError("raw layers have no compressed clusters")

    def close(self) -> None:
        self._image.close()


# --- backing file names ------------------------------------------------------------

# QEMU treats "proto:..." as a protocol when "proto" names a protocol driver;
# pynbd only serves local files, so such names are refused with a clear error.
_PROTOCOL_RE = re.compile(r"^(json|nbd|nbds|http|https|ftp|ftps|ssh|iscsi|rbd|gluster|sheepdog|nfs|vxhs)[:+]")


def resolve_backing_path(image_path: str, name: str) -> str:
    """Where the backing file ``name`` named by ``image_path`` lives.

    Like QEMU's ``bdrv_get_full_backing_filename``: an absolute name is used
    as is, a relative one is joined to the directory of the image that names
    it (as that image's path was given, not its resolved path).
    """
    if _PROTOCOL_RE.match(name):
        raise ImageError(f"{image_path}: backing file {name!r} uses a protocol pynbd does not support")
    if name.startswith("file:"):
        name = name[len("file:"):]
    if os.path.isabs(name):
        return name
    return os.path.join(os.path.dirname(image_path), name)


def file_identity(path: str) -> tuple[int, int]:
    """``(st_dev, st_ino)`` of ``path``, for loop detection."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ImageError(f"{path}: cannot open: {exc.strerror}") from None
    return st.st_dev, st.st_ino
