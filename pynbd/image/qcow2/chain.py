"""Backing chains of a qcow2 image: per-layer mapping runs and the walk that resolves them.

A *layer* is one file of a chain (a qcow2 image or a raw file) seen on its
own: :meth:`Layer.runs` classifies guest ranges of that layer without looking
at any other layer. :func:`resolve` walks the chain top to bottom the way
QEMU's ``bdrv_co_block_status_above`` does and says, for every guest range,
which layer answers and how. Reads
(:meth:`pynbd.image.qcow2.image.Qcow2Image.read_segments`), NBD block status
and ``qemu-img map`` emulation (:mod:`pynbd.tools.map`) are all built on it.
Block status walks the layers' :meth:`Layer.status_runs`, which ask the host file
where data lies over holes (:func:`split_host_holes`) where QEMU would: in a qcow2
file that looks metadata-preallocated (:func:`looks_metadata_preallocated`).

Runs are plain tuples ``(pos, length, kind, host)`` — there can be one per
cluster, so no per-run objects.
"""

from __future__ import annotations

import logging
import os
import re
import struct
from array import array
from bisect import bisect_right
from collections.abc import Iterable, Iterator, Sequence
from itertools import accumulate
from typing import Protocol

from pynbd.image.base import STATE_DATA, ImageError
from pynbd.image.qcow2.header import Qcow2Header, pread_exact
from pynbd.image.raw import RawImage, data_runs, seek_runs

log = logging.getLogger(__name__)

#: qcow2 spec, 'Host cluster management': refcount table entry offset bits.
REFT_OFFSET_MASK = 0xFFFFFFFFFFFFFE00

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
#: Data (as KIND_DATA, ``host`` valid) whose host bytes are a hole in the host file or
#: lie past its end: they read as zeros. Only block status asks (:meth:`Layer.status_runs`);
#: QEMU reports such ranges DATA and ZERO when it asks the host file (BDRV_BLOCK_RECURSE).
KIND_HOST_HOLE = 4
#: Beyond the end of this layer (only asked of backing layers).
KIND_EOF = 5

# --- resolved kinds (resolve) ------------------------------------------------------
#: Zeros synthesised by a backing layer that ends before the range (QEMU
#: reports them allocated at that short layer).
RESOLVED_SHORT = 6
#: Unallocated in every layer.
RESOLVED_ABSENT = 7

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

    def status_runs(self, offset: int, end: int) -> Iterable[Run]:
        """:meth:`runs` as block status reports them: data over host-file holes may come
        out as KIND_HOST_HOLE (where QEMU asks the host file, see :func:`split_host_holes`)."""

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


def resolve(layers: Sequence[Layer], offset: int, end: int, block_status: bool = False) -> Iterator[Resolved]:
    """Walk the chain over ``[offset, end)`` (which lies inside ``layers[0].size``).

    Yields ``(pos, length, layer, kind, host)`` in guest order, where kind is
    KIND_DATA / KIND_COMPRESSED / KIND_ZERO (answered by ``layer``; with
    ``block_status``, from :meth:`Layer.status_runs`, also KIND_HOST_HOLE),
    RESOLVED_SHORT (``layer`` is the backing layer that ended before ``pos``;
    ``host`` is the UNALLOCATED_ALLOC offset of the layer above, if any) or
    RESOLVED_ABSENT (``layer`` is the bottom layer; ``host`` as for SHORT).
    The walk is iterative, so chain depth is not limited by recursion.
    """
    bottom = len(layers) - 1

    def layer_runs(index: int, start: int, stop: int) -> Iterator[Run]:
        layer = layers[index]
        return iter(layer.status_runs(start, stop)) if block_status else layer.runs(start, stop)

    # Each frame: (layer index, its runs, host of the parent's run, parent's run start)
    stack: list[tuple[int, Iterator[Run], int, int]] = [(0, layer_runs(0, offset, end), -1, 0)]
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
                stack.append((idx + 1, layer_runs(idx + 1, pos, pos + length), host, pos))
        elif kind == KIND_EOF:
            synth_host = parent_host + (pos - parent_pos) if parent_host >= 0 else -1
            yield pos, length, idx, RESOLVED_SHORT, synth_host
        else:
            yield pos, length, idx, kind, host


# --- asking the host file -------------------------------------------------------------


def split_host_holes(runs: Iterable[Run], fd: int) -> list[Run]:
    """``runs`` with each KIND_DATA run split where its host bytes in ``fd`` are a hole
    (SEEK_DATA/SEEK_HOLE) or lie past the end of the file: those pieces become KIND_HOST_HOLE.

    This is QEMU's block-status recursion into the file a data cluster lives in
    (block/io.c ``bdrv_co_block_status`` with BDRV_BLOCK_RECURSE): the host file's
    status splits the range, its holes and what lies past its end add ZERO, and an
    error asking it changes nothing (the pieces stay data). The host ranges of all
    data runs are asked for together, one lseek walk per span of touching ranges.
    Other runs pass unchanged. On the caller's thread.
    """
    runs = runs if isinstance(runs, list) else list(runs)
    ranges = sorted((host, host + n) for _pos, n, kind, host in runs if kind == KIND_DATA and host >= 0)
    if not ranges:
        return runs
    hole_starts, hole_ends = _host_holes(fd, ranges)
    if not hole_starts:
        return runs
    out: list[Run] = []
    for run in runs:
        pos, n, kind, host = run
        if kind != KIND_DATA or host < 0:
            out.append(run)
            continue
        end = host + n
        at = host
        i = bisect_right(hole_ends, host)
        while i < len(hole_starts) and hole_starts[i] < end:
            hole_start = max(hole_starts[i], at)
            hole_end = min(hole_ends[i], end)
            if hole_start > at:
                out.append((pos + at - host, hole_start - at, KIND_DATA, at))
            out.append((pos + hole_start - host, hole_end - hole_start, KIND_HOST_HOLE, hole_start))
            at = hole_end
            i += 1
        if at < end:
            out.append((pos + at - host, end - at, KIND_DATA, at))
    return out


def _host_holes(fd: int, ranges: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Starts and ends of the holes of ``fd`` inside the sorted host ``ranges``
    (past the end of the file counts as a hole), sorted and disjoint."""
    starts: list[int] = []
    ends: list[int] = []
    span_start, span_end = ranges[0]
    for start, stop in [*ranges[1:], (-1, -1)]:
        if 0 <= start <= span_end:  # touching or overlapping: one span
            span_end = max(span_end, stop)
            continue
        try:
            status = seek_runs(fd, span_start, span_end)
        except OSError as exc:  # QEMU ignores errors here: the range stays data
            log.debug("asking the host file for holes in [%d, %d) failed: %s", span_start, span_end, exc)
        else:
            edges = list(accumulate(status.lengths, initial=span_start))
            for k, state in enumerate(status.values):
                if state != STATE_DATA:
                    if ends and ends[-1] == edges[k]:
                        ends[-1] = edges[k + 1]
                    else:
                        starts.append(edges[k])
                        ends.append(edges[k + 1])
        span_start, span_end = start, stop
    return starts, ends


def looks_metadata_preallocated(fd: int, path: str, header: Qcow2Header) -> bool:
    """QEMU's ``qcow2_detect_metadata_preallocation`` (block/qcow2-refcount.c): whether
    the qcow2 file ``fd`` has clearly more clusters in use (a non-zero refcount) than
    it has clusters of storage allocated (``st_blocks``): at least
    ``max(real * 10 // 9, real + 2)`` of the clusters below its end, ``real`` being
    the allocated bytes in whole clusters. Only then does QEMU ask the host file
    where data clusters are holes.

    A file with fewer clusters than that is answered from ``fstat`` alone (most
    files); else the refcount blocks are read in order until the count is reached.
    Anything that goes wrong (I/O error, a misaligned refcount block) is False, as
    in QEMU. On the caller's thread.
    """
    try:
        st = os.fstat(fd)
        cluster_size = header.cluster_size
        real_clusters = st.st_blocks * 512 // cluster_size
        threshold = max(real_clusters * 10 // 9, real_clusters + 2)
        end_cluster = -(-st.st_size // cluster_size)
        if end_cluster < threshold:
            return False
        return _referenced_clusters(fd, path, header, end_cluster, threshold) >= threshold
    except (OSError, ImageError) as exc:
        log.info("%s: cannot count the clusters in use (%s); block status does not ask the "
                 "host file for holes", path, exc)
        return False


def _referenced_clusters(fd: int, path: str, header: Qcow2Header, end_cluster: int, enough: int) -> int:
    """How many clusters below ``end_cluster`` have a non-zero refcount, counted a refcount
    block at a time, stopping once ``enough`` are found (so blocks past that point are not read).
    Raises ImageError for a misaligned refcount block offset, OSError for I/O errors."""
    cluster_size = header.cluster_size
    entry_bits = 1 << header.refcount_order
    per_block = cluster_size * 8 // entry_bits
    blocks = min(-(-end_cluster // per_block), header.refcount_table_clusters * cluster_size // 8)
    raw = pread_exact(fd, 8 * blocks, header.refcount_table_offset, path, "refcount table")
    count = 0
    for index, entry in enumerate(struct.unpack(f">{blocks}Q", raw)):
        if count >= enough:
            break
        block_offset = entry & REFT_OFFSET_MASK
        if not block_offset:
            continue
        if block_offset & (cluster_size - 1):
            raise ImageError(f"{path}: refcount block offset {block_offset:#x} (refcount table "
                             f"entry {index}) is not cluster aligned")
        entries = min(per_block, end_cluster - index * per_block)
        block = os.pread(fd, cluster_size, block_offset)  # past the end of the file: zeros
        count += nonzero_entries(block.ljust(cluster_size, b"\0"), header.refcount_order, entries)
    return count


#: Per byte, how many of its 1-, 2- or 4-bit fields are non-zero (refcount orders 0, 1, 2).
_NONZERO_FIELDS = {order: bytes(sum(1 for k in range(0, 8, 1 << order) if (b >> k) & ((1 << (1 << order)) - 1))
                                for b in range(256))
                   for order in (0, 1, 2)}
#: array typecodes by item size, for the refcount widths of whole bytes.
_TYPECODE_OF_SIZE = {array(code).itemsize: code for code in "QLIHB"}


def nonzero_entries(block: bytes, refcount_order: int, entries: int) -> int:
    """How many of the first ``entries`` refcounts in a refcount block are non-zero
    (entries of ``1 << refcount_order`` bits; qcow2 spec, 'Host cluster management':
    sub-byte entries are packed from the least significant bit of each byte up)."""
    entry_bits = 1 << refcount_order
    if entry_bits >= 8:
        values = array(_TYPECODE_OF_SIZE[entry_bits // 8])
        values.frombytes(block[:entries * entry_bits // 8])
        return entries - values.count(0)
    whole, rest_bits = divmod(entries * entry_bits, 8)
    fields = block[:whole]
    if rest_bits:  # the last byte's low fields only
        fields += bytes([block[whole] & ((1 << rest_bits) - 1)])
    return sum(fields.translate(_NONZERO_FIELDS[refcount_order]))


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

    def status_runs(self, offset: int, end: int) -> Iterator[Run]:
        """:meth:`runs`: its holes are KIND_ZERO already (QEMU's raw driver passes the
        file's status through)."""
        return self.runs(offset, end)

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
