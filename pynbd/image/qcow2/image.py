"""The qcow2 driver: a qcow2 image and its backing chain, served read-only.

:func:`open_chain` opens a qcow2 file and its backing files (qcow2 or raw) as
layers; :class:`Qcow2Image` stacks them into a backing chain and implements the
:class:`~pynbd.image.base.Image` interface (reads, block status, bitmaps) on top
of the chain walk (:func:`pynbd.image.qcow2.chain.resolve`). :func:`open_qcow2`
is the entry point used by :func:`pynbd.image.open_image`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

from pynbd.image.base import (
    Bitmap,
    BitmapInfo,
    BytesSegment,
    Extents,
    HostSegment,
    Image,
    ImageError,
    ReadSegment,
    ZeroSegment,
)
from pynbd.image.locking import QCOW2_READ_ONLY, QCOW2_WRITABLE, lock_file, open_locked_for_writing
from pynbd.image.dirtybitmap import DirtyBitmap, DroppedRunsRecomputer, forget_runs
from pynbd.image.qcow2.chain import (
    KIND_COMPRESSED,
    KIND_DATA,
    RESOLVED_ABSENT,
    Layer,
    RawLayer,
    file_identity,
    resolve,
    resolve_backing_path,
)
from pynbd.image.qcow2.compression import ClusterCache
from pynbd.image.qcow2.header import INCOMPAT_DIRTY, MAGIC, parse_header
from pynbd.image.qcow2.l2cache import TableCache
from pynbd.image.qcow2.layer import Qcow2Layer
from pynbd.image.qcow2.recording import BitmapRecorder
from pynbd.image.qcow2.tableruns import ALLOCATION_OF_KIND, TOP_DEPTH_OF_KIND
from pynbd.image.qcow2.repair import repair_refcounts
from pynbd.image.qcow2.subclusters import ExtendedL2Writer
from pynbd.image.qcow2.writer import Qcow2Writer
from pynbd.runlength import Runs

log = logging.getLogger(__name__)

#: Upper bound of extents one ``extents()`` call yields; the caller re-queries.
MAX_EXTENTS_PER_CALL = 65536
#: One ``extents()`` call looks at no more than this many top-layer clusters,
#: so the work per block-status request stays bounded on huge allocated images.
MAX_CLUSTERS_PER_CALL = 1 << 18
#: Backing chains deeper than this are refused (each layer holds open fds).
MAX_CHAIN_LENGTH = 1000


class Qcow2Image(Image):
    """A qcow2 image with its backing chain; writable through :meth:`make_writable`
    (writes go to the top image only: :mod:`pynbd.image.qcow2.writer`)."""

    format_name = "qcow2"

    def __init__(self, layers: Sequence[Layer], cache: TableCache) -> None:
        top = layers[0]
        assert isinstance(top, Qcow2Layer)
        self.top = top
        self.layers = list(layers)
        self.table_cache = cache
        self.path = top.path
        self.size = top.size
        self.read_only = True
        # A raw layer's holes are asked of the file system at each request.
        self.stable_extents = all(isinstance(layer, Qcow2Layer) for layer in self.layers)
        self.header = top.header
        self.snapshots = top.snapshots
        self.writer: Qcow2Writer | None = None
        #: Records writes into the enabled bitmaps (made with the writer).
        self.recorder: BitmapRecorder | None = None
        self._closed = False
        for bitmap in top.bitmaps:
            bitmap.metadata_lock = self.metadata_lock
            if bitmap.problem:
                log.warning("%s: bitmap %r %s; it is not exported", self.path, bitmap.name, bitmap.problem)
        #: Bitmap run chunks a change dropped are computed again once changes pause.
        self._recomputer = DroppedRunsRecomputer(self.bitmap_list)
        self.changes.listen(self._forget_changed)

    def _forget_changed(self, offset: int, length: int) -> None:
        """Listener of :attr:`changes`: drop what was derived from guest bytes
        ``[offset, offset+length)`` of the top layer (pynbd.image.changes, on the event loop).

        Goes: the block-status runs classified from the top layer's L2 tables that map
        the range (the entries stay: they are the authority a writer updates) and the
        cached run chunks of every bitmap over the range. Nothing is kept above the
        layers (a chain's block status is resolved per request). Stays: backing layers (never
        changed through the server) and decompressed clusters, which are keyed by their
        compressed descriptor (host offset and length), not by guest range: a write
        never rewrites a compressed cluster in place (it maps the guest cluster to a
        normal cluster and frees the old sectors), and a descriptor names other bytes
        only if a compressed cluster is written again at the same place, which the
        server never does; a cluster whose descriptor no entry holds any more is never
        asked for again and ages out of the LRU.
        """
        with self.metadata_lock:
            self.top.forget_derived(offset, length)
            dropped = forget_runs(self.bitmap_list(), offset, length)
        self._recomputer.changed(dropped)

    # -- reading --

    def read_segments(self, offset: int, length: int) -> Sequence[ReadSegment]:
        """See :meth:`Image.read_segments`; on the event loop thread.

        The chain is resolved under :attr:`metadata_lock` (L2 tables missing from the
        cache are read then: they are the lookup); compressed clusters are read and
        decompressed after it is released.
        """
        segments: list[ReadSegment] = []
        layers = self.layers
        with self.metadata_lock:
            resolved = list(resolve(layers, offset, offset + length))

        def add_zero(n: int) -> None:
            if segments and isinstance(segments[-1], ZeroSegment):
                segments[-1] = ZeroSegment(segments[-1].length + n)
            else:
                segments.append(ZeroSegment(n))

        for pos, n, idx, kind, host in resolved:
            if kind == KIND_DATA:
                layer = layers[idx]
                # A data cluster past the end of its host file reads as zeros, as in QEMU.
                inside = max(0, min(n, layer.data_file_size - host))
                if inside:
                    fd = layer.data_fd
                    last = segments[-1] if segments else None
                    if isinstance(last, HostSegment) and last.fd == fd and last.host_offset + last.length == host:
                        segments[-1] = HostSegment(last.length + inside, fd, last.host_offset)
                    else:
                        segments.append(HostSegment(inside, fd, host))
                if inside < n:
                    add_zero(n - inside)
            elif kind == KIND_COMPRESSED:
                layer = layers[idx]
                cluster = layer.read_compressed(pos, host)
                start = pos & (len(cluster) - 1)
                segments.append(BytesSegment(memoryview(cluster)[start:start + n]))
            else:
                add_zero(n)
        return segments

    # -- allocation --

    def extents(self, offset: int, length: int, limit: int | None = None) -> Extents:
        """base:allocation flags and qemu:allocation-depth, as qemu-nbd reports them.

        Data (normal or compressed, in any layer) is not zero, except where the layer
        asks its host file (QEMU's metadata-preallocation rule,
        :attr:`Qcow2Layer.asks_host_file`) and the data lies over a hole there: that is
        allocated and zero (NBD_STATE_ZERO without HOLE). Everything else (zero
        clusters, raw holes, short backing files, unallocated everywhere) is a zero
        hole. Depth is 1-based, 0 when no layer owns the range.
        On the event loop thread; each lookup (the depth runs too, made when asked
        for) runs under :attr:`metadata_lock`.
        """
        end = offset + min(length, MAX_CLUSTERS_PER_CALL << self.top.cluster_bits)
        cap = MAX_EXTENTS_PER_CALL if limit is None else min(limit, MAX_EXTENTS_PER_CALL)
        if len(self.layers) == 1:
            # No backing file: the top layer's own runs are the answer, from its
            # classified L2 tables; unallocated there is unallocated everywhere.
            top = self.top
            lock = self.metadata_lock

            def top_runs(value_of_kind: tuple[int, ...]) -> Runs:
                with lock:
                    return top.top_runs(offset, end, value_of_kind).head(cap)

            return Extents(offset, top_runs(ALLOCATION_OF_KIND), lambda: top_runs(TOP_DEPTH_OF_KIND))
        lengths: list[int] = []
        states: list[int] = []
        depths: list[int] = []
        with self.metadata_lock:
            for _pos, n, idx, kind, _host in resolve(self.layers, offset, end, block_status=True):
                lengths.append(n)
                states.append(ALLOCATION_OF_KIND[kind])
                depths.append(0 if kind == RESOLVED_ABSENT else idx + 1)
                if len(lengths) >= cap:
                    break
        return Extents(offset, Runs(lengths, states), Runs(lengths, depths))

    # -- writing (in worker threads; see writer.py) --

    def make_writable(self) -> None:
        """Open the top file for writing. Raises ImageError (one line) when the file cannot
        be opened or locked for writing, or a bitmap it records into cannot be read."""
        if self.top.header.incompatible_features & INCOMPAT_DIRTY:
            raise ImageError(f"{self.path}: its dirty bit is set: open it with open_qcow2, which repairs it")
        fd = open_locked_for_writing(self.path, QCOW2_WRITABLE)
        try:
            writer = (ExtendedL2Writer if self.top.extended_l2 else Qcow2Writer)(self, fd)
            self.recorder = BitmapRecorder(self, writer)
            self.writer = writer
        except BaseException:
            os.close(fd)
            raise
        self.read_only = False
        self.fast_zero = self.top.zero_flag_allowed

    def _writable(self) -> Qcow2Writer:
        if self.writer is None:
            raise ImageError(f"{self.path}: opened read-only")
        return self.writer

    def _recorded(self, offset: int, length: int) -> Qcow2Writer:
        """The writer, once the change is recorded in the enabled bitmaps (before any of
        its data is written, as pynbd.image.qcow2.recording requires)."""
        writer = self._writable()
        assert self.recorder is not None
        self.recorder.record(offset, length)
        return writer

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self._recorded(offset, len(data)).write(offset, data)

    def write_now(self, offset: int, data: bytes | memoryview) -> bool:
        writer, recorder = self.writer, self.recorder
        return (writer is not None and recorder is not None and recorder.record(offset, len(data), wait=False)
                and writer.write_now(offset, data))

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fast: bool = False) -> None:
        # Recorded even when FAST_ZERO then fails, as QEMU marks every write request it ran.
        self._recorded(offset, length).write_zeroes(offset, length, may_trim, fast)

    def trim(self, offset: int, length: int) -> None:
        self._recorded(offset, length).trim(offset, length)

    def flush(self) -> None:
        """Make completed writes durable, then store the bitmaps they dirtied."""
        if self.writer is not None:
            self.writer.flush()
            assert self.recorder is not None
            self.recorder.store()

    # -- bitmaps --

    def bitmap_list(self) -> list[DirtyBitmap]:
        """Every bitmap of the top image: the file's, and on a writable image those made
        at run time (:mod:`pynbd.image.qcow2.bitmapops`), oldest first."""
        return self.recorder.bitmaps if self.recorder is not None else list(self.top.bitmaps)

    def bitmaps(self) -> Mapping[str, Bitmap]:
        return {b.name: b for b in self.bitmap_list() if b.consistent}

    def bitmap_infos(self) -> Sequence[BitmapInfo]:
        return [b.info() for b in self.bitmap_list()]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.changes.unlisten(self._forget_changed)
        self._recomputer.close()
        try:
            if self.writer is not None:
                try:
                    self.flush()
                finally:
                    self.writer.close()
        finally:
            for layer in self.layers:
                layer.close()


def _probe_is_qcow2(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError as exc:
        raise ImageError(f"{path}: cannot open: {exc.strerror}") from None


def _open_backing(path: str, fmt: str | None, cache: TableCache, ccache: ClusterCache,
                  named_by: str) -> Layer:
    if fmt is None:
        fmt = "qcow2" if _probe_is_qcow2(path) else "raw"
    if fmt == "qcow2":
        return Qcow2Layer(path, cache, ccache)
    if fmt == "raw":
        return RawLayer(path)
    raise ImageError(f"{named_by}: backing file {path!r} has unsupported format {fmt!r}")


def open_chain(path: str, cache: TableCache | None = None, backing: bool = True) -> list[Layer]:
    """Open ``path`` (qcow2) and its whole backing chain, read-only; top layer first.
    With ``backing`` False, the top layer alone (its unallocated clusters read as zeros,
    as QEMU's ``backing: null``).

    Backing names are resolved relative to the naming image's directory, the
    backing format comes from the header extension or is probed, and a
    chain that comes back to a file already in it is refused.
    """
    cache = cache or TableCache()
    ccache = ClusterCache()
    layers: list[Layer] = []
    try:
        top = Qcow2Layer(path, cache, ccache)
        layers.append(top)
        seen = {file_identity(path): path}
        current: Layer = top
        while backing and isinstance(current, Qcow2Layer) and current.header.backing_file:
            hdr = current.header
            assert hdr.backing_file is not None
            backing_path = resolve_backing_path(current.path, hdr.backing_file)
            if not os.path.exists(backing_path):
                raise ImageError(f"{current.path}: backing file {hdr.backing_file!r} "
                                 f"({backing_path}) does not exist")
            ident = file_identity(backing_path)
            if ident in seen:
                raise ImageError(f"{current.path}: backing file {hdr.backing_file!r} makes a loop in the "
                                 f"backing chain (it is {seen[ident]!r} again)")
            if len(layers) >= MAX_CHAIN_LENGTH:
                raise ImageError(f"{path}: backing chain is longer than {MAX_CHAIN_LENGTH} images")
            seen[ident] = backing_path
            current = _open_backing(backing_path, hdr.backing_format, cache, ccache, current.path)
            layers.append(current)
        return layers
    except BaseException:
        for layer in layers:
            layer.close()
        raise


def repair_if_dirty(path: str) -> None:
    """Repair the refcounts of an image whose dirty bit is set (lazy refcounts left by a
    crash) and clear the bit, as QEMU does when it opens such an image for writing
    (:mod:`pynbd.image.qcow2.repair`); nothing for a clean image. The file is locked
    for writing while it is looked at and repaired (ImageError if another writer has
    it, or if it cannot be repaired safely)."""
    fd = open_locked_for_writing(path, QCOW2_WRITABLE)
    try:
        header = parse_header(path, fd, os.fstat(fd).st_size)
        if header.incompatible_features & INCOMPAT_DIRTY:
            report = repair_refcounts(path, fd)
            log.warning("%s: the dirty bit was set (refcounts not up to date after a crash): repaired "
                        "(%d refcounts raised, %d leaked clusters freed, %d COPIED flags fixed)",
                        path, report.raised, report.lowered, report.copied_fixed)
    finally:
        os.close(fd)  # (its locks go with it; the image's own open locks again)


def open_qcow2(path: str, read_only: bool, fiemap: bool = True, backing: bool = True) -> Image:
    """Open a qcow2 image with its backing chain (none when ``backing`` is False: see
    :func:`open_chain`), writable unless ``read_only`` (an image left dirty by a crash is
    repaired first: :func:`repair_if_dirty`).

    ``fiemap`` does not apply: qcow2 block status comes from the L2 tables.
    """
    if not read_only:
        repair_if_dirty(path)
    cache = TableCache()
    image = Qcow2Image(open_chain(path, cache, backing), cache)
    try:
        # Locked as QEMU locks a chain: backing files for shared reading, the top for
        # what it is served as (pynbd.image.locking); a raw backing file locks itself.
        for layer in image.layers[1:]:
            if isinstance(layer, Qcow2Layer):
                lock_file(layer.fd, layer.path, QCOW2_READ_ONLY)
        if read_only:
            lock_file(image.top.fd, path, QCOW2_READ_ONLY)
        else:
            image.make_writable()
    except BaseException:
        image.close()
        raise
    return image
