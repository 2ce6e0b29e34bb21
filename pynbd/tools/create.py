"""``pynbd create``: new raw and qcow2 images, as ``qemu-img create`` makes them.

:func:`create_image` checks the options the way qemu-img 7.2 does (and refuses
what it refuses), then writes a raw file (:func:`create_raw`) or a qcow2 v3
(compat 1.1) image: 16-bit refcounts, zlib compression type, no lazy
refcounts, optionally extended L2 entries, a backing file and preallocation.
:mod:`pynbd.tools.create_qcow2` plans where qemu-img puts every cluster;
:func:`qcow2_header` and :func:`write_qcow2` write those bytes, so the file is
the one qemu-img writes. Everything runs on the caller's thread; no server is
involved.
"""

from __future__ import annotations

import array
import logging
import os
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from pynbd.image import open_image, probe_format
from pynbd.image.base import ImageError
from pynbd.image.qcow2.header import (
    EXT_BACKING_FORMAT,
    EXT_END,
    EXT_FEATURE_TABLE,
    INCOMPAT_EXTL2,
    MAGIC,
    MAX_BACKING_NAME,
    MAX_CLUSTER_BITS,
    MIN_CLUSTER_BITS,
    V3_MIN_HEADER_LENGTH,
)
from pynbd.tools.create_qcow2 import (
    PREALLOC_MODES,
    REFCOUNT_ORDER,
    LayoutError,
    Qcow2Layout,
    l2_entries,
    plan_qcow2,
    round_up,
)

log = logging.getLogger(__name__)

FORMATS = ("raw", "qcow2")
#: What preallocation means for a raw file: nothing, fallocate, or written zeros.
RAW_PREALLOC_MODES = ("off", "falloc", "full")
DEFAULT_CLUSTER_SIZE = 1 << 16
#: Extended L2 entries split a cluster into 32 subclusters of at least 512 bytes.
MIN_EXTL2_CLUSTER_SIZE = 1 << 14
SECTOR = 512

#: QEMU 7.2 writes the v3 header with the compression type byte and its padding.
HEADER_LENGTH = V3_MIN_HEADER_LENGTH + 8
_V3_HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQIIB7x")
_EXT_PREFIX = struct.Struct(">II")
_COPIED = 1 << 63
#: qemu-img omits the feature name table at 4 KiB clusters and below (it would
#: crowd out the backing file name in cluster 0).
_FEATURE_TABLE_MIN_CLUSTER = 8192
# qcow2 spec, 'Feature name table': (type, bit, name); type 0 incompatible,
# 1 compatible, 2 autoclear. The eight entries qemu-img 7.2 writes, in its order.
_FEATURE_NAMES = (
    (0, 0, "dirty bit"), (0, 1, "corrupt bit"), (0, 2, "external data file"),
    (0, 3, "compression type"), (0, 4, "extended L2 entries"), (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"), (2, 1, "raw external data"),
)


class CreateError(Exception):
    """The image cannot be created: a bad option combination, an unusable backing
    file, or the file exists / the directory is not writable. One line that names
    the image."""


@dataclass(frozen=True, slots=True)
class CreateOptions:
    """What ``pynbd create`` was asked for; None means "the default"."""

    #: None: qcow2 if the image name ends in ``.qcow2``, else raw.
    fmt: str | None = None
    #: Virtual size in bytes; None: the backing file's virtual size.
    size: int | None = None
    #: The backing file name as given (stored verbatim; relative to the image's directory).
    backing: str | None = None
    #: None: probed from the backing file's first bytes.
    backing_format: str | None = None
    #: qcow2 only; None: 64 KiB.
    cluster_size: int | None = None
    extended_l2: bool = False
    preallocation: str = "off"


@dataclass(frozen=True, slots=True)
class CreatedImage:
    """What was written."""

    path: str
    fmt: str
    size: int
    preallocation: str
    cluster_size: int | None = None
    extended_l2: bool = False
    backing: str | None = None
    backing_format: str | None = None

    def describe(self) -> str:
        """One line for the user, e.g. ``qcow2, 1073741824 bytes, 65536-byte clusters``."""
        if self.fmt == "raw":
            mode = "sparse" if self.preallocation == "off" else f"preallocation={self.preallocation}"
            return f"raw, {self.size} bytes ({mode})"
        parts = [f"qcow2, {self.size} bytes, {self.cluster_size}-byte clusters"]
        if self.extended_l2:
            parts.append("extended L2")
        if self.backing:
            parts.append(f"backing file {self.backing} ({self.backing_format})")
        if self.preallocation != "off":
            parts.append(f"preallocation={self.preallocation}")
        return ", ".join(parts)


def default_format(path: str) -> str:
    """qcow2 for a name ending in ``.qcow2``, else raw."""
    return "qcow2" if path.lower().endswith(".qcow2") else "raw"


def create_image(path: str, options: CreateOptions) -> CreatedImage:
    """Create ``path`` as asked; never overwrites a file. Raises CreateError."""
    fmt = options.fmt or default_format(path)
    if fmt not in FORMATS:
        raise CreateError(f"{path}: unknown format {fmt!r} (use raw or qcow2)")
    if options.preallocation not in PREALLOC_MODES:
        raise CreateError(f"{path}: unknown preallocation mode {options.preallocation!r}")
    if options.backing_format and options.backing is None:
        raise CreateError(f"{path}: a backing format (-F) needs a backing file (-b)")
    if fmt == "raw":
        return _create_raw_image(path, options)
    return _create_qcow2_image(path, options)


def _create_raw_image(path: str, options: CreateOptions) -> CreatedImage:
    for given, option in ((options.backing is not None, "a backing file (-b)"),
                          (options.cluster_size is not None, "--cluster-size"),
                          (options.extended_l2, "--extended-l2")):
        if given:
            raise CreateError(f"{path}: {option} is for qcow2 images, not raw (add -f qcow2)")
    if options.preallocation not in RAW_PREALLOC_MODES:
        raise CreateError(f"{path}: raw images support preallocation off, falloc and full, "
                          f"not {options.preallocation}")
    if options.size is None:
        raise CreateError(f"{path}: a size is needed")
    create_raw(path, options.size, options.preallocation)
    return CreatedImage(path, "raw", options.size, options.preallocation)


def create_raw(path: str, size: int, preallocation: str = "off") -> None:
    """Create ``path`` as a raw image of exactly ``size`` bytes; never overwrites a file.

    ``off``: sparse; ``falloc``: the blocks reserved (posix_fallocate); ``full``:
    zeros written. Raises CreateError; a partial file is removed.
    """
    fd = _create_exclusive(path)
    try:
        os.ftruncate(fd, size)
        if preallocation == "falloc" and size:
            os.posix_fallocate(fd, 0, size)
        elif preallocation == "full":
            write_zeros(fd, 0, size)
        os.fsync(fd)
    except OSError as exc:
        _discard(path, fd)
        raise CreateError(f"{path}: cannot write: {exc.strerror}") from None
    os.close(fd)


def _create_qcow2_image(path: str, options: CreateOptions) -> CreatedImage:
    cluster_size = DEFAULT_CLUSTER_SIZE if options.cluster_size is None else options.cluster_size
    cluster_bits = max(cluster_size.bit_length() - 1, 0)
    if cluster_size != 1 << cluster_bits or not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise CreateError(f"{path}: cluster size {cluster_size} is not a power of two from 512 to 2M")
    if options.extended_l2 and cluster_size < MIN_EXTL2_CLUSTER_SIZE:
        raise CreateError(f"{path}: extended L2 entries need clusters of at least "
                          f"{MIN_EXTL2_CLUSTER_SIZE} bytes, not {cluster_size}")
    if options.backing is not None and options.preallocation != "off" and not options.extended_l2:
        # Preallocated standard L2 entries would hide the backing file.
        raise CreateError(f"{path}: a backing file and preallocation need --extended-l2")
    backing_format, backing_size = None, None
    if options.backing is not None:
        backing_format, backing_size = _inspect_backing(path, options.backing, options.backing_format)
    size = options.size if options.size is not None else backing_size
    if size is None:
        raise CreateError(f"{path}: a size is needed (or a backing file (-b) to take it from)")
    # qcow2 stores the size in bytes, but QEMU counts it in 512-byte sectors.
    size = round_up(size, SECTOR)
    try:
        layout = plan_qcow2(size, cluster_bits, options.extended_l2, options.preallocation)
        header = qcow2_header(layout, options.backing, backing_format)
    except LayoutError as exc:
        raise CreateError(f"{path}: cannot create {size} bytes with {cluster_size}-byte clusters: {exc}") from None
    fd = _create_exclusive(path)
    try:
        write_qcow2(fd, layout, header, options.preallocation)
        os.fsync(fd)
    except OSError as exc:
        _discard(path, fd)
        raise CreateError(f"{path}: cannot write: {exc.strerror}") from None
    os.close(fd)
    log.debug("%s: %d clusters refcounted, %d L2 tables, file %d bytes",
              path, layout.refcounted.count(1), len(layout.l2_tables), layout.file_length)
    return CreatedImage(path, "qcow2", size, options.preallocation, cluster_size, options.extended_l2,
                        options.backing, backing_format)


def _inspect_backing(path: str, backing: str, backing_format: str | None) -> tuple[str, int]:
    """(format, virtual size) of the backing file, opened as QEMU will find it: a
    relative name is relative to the new image's directory."""
    where = backing if os.path.isabs(backing) else os.path.join(os.path.dirname(path), backing)
    try:
        fmt = backing_format or probe_format(where)
        if fmt not in FORMATS:
            raise ImageError(f"{where}: unknown format {fmt!r}")
        with open_image(where, fmt, read_only=True) as image:
            return fmt, image.size
    except ImageError as exc:
        raise CreateError(f"{path}: cannot use backing file {backing!r}: {exc}") from None


# --- qcow2 bytes --------------------------------------------------------------------------


def qcow2_header(layout: Qcow2Layout, backing: str | None, backing_format: str | None) -> bytes:
    """Cluster 0 as qemu-img writes it (qcow2 spec, 'Header' and 'Header extensions'):
    the v3 header, the backing format and feature name table extensions, the end
    marker, then the backing file name.

    Raises LayoutError when the backing file name does not fit in the cluster.
    """
    cs = layout.cluster_size
    extensions = b""
    if backing_format:
        extensions += _extension(EXT_BACKING_FORMAT, backing_format.encode())
    if cs >= _FEATURE_TABLE_MIN_CLUSTER:
        table = b"".join(struct.pack(">BB46s", kind, bit, name.encode()) for kind, bit, name in _FEATURE_NAMES)
        extensions += _extension(EXT_FEATURE_TABLE, table)
    extensions += _extension(EXT_END, b"")
    name = backing.encode() if backing else b""
    if len(name) > MAX_BACKING_NAME:
        raise LayoutError(f"the backing file name is longer than {MAX_BACKING_NAME} bytes")
    name_offset = HEADER_LENGTH + len(extensions)
    if name_offset + len(name) > cs:
        raise LayoutError(f"the backing file name does not fit in the {cs}-byte header cluster "
                          f"({cs - name_offset} bytes left)")
    header = _V3_HEADER.pack(
        MAGIC, 3, name_offset if name else 0, len(name), layout.cluster_bits, layout.size, 0,
        layout.l1_size, layout.l1_cluster * cs, layout.reftable_cluster * cs, len(layout.reftable) * 8 // cs,
        0, 0, INCOMPAT_EXTL2 if layout.extended_l2 else 0, 0, 0, REFCOUNT_ORDER, HEADER_LENGTH, 0,
    )
    return (header + extensions + name).ljust(cs, b"\0")


def _extension(kind: int, data: bytes) -> bytes:
    return _EXT_PREFIX.pack(kind, len(data)) + data.ljust(round_up(len(data), 8), b"\0")


def _big_endian_u64(values: array.array) -> bytes:
    if sys.byteorder == "little":
        values.byteswap()
    return values.tobytes()


def _reftable_bytes(cluster_size: int, blocks: list[int]) -> bytes:
    return _big_endian_u64(array.array("Q", (block * cluster_size for block in blocks)))


def _stale_reftable(layout: Qcow2Layout, cluster: int, entries: list[int]) -> bytes:
    """An outgrown refcount table's bytes, except in clusters QEMU later maps as guest
    data: there QEMU 7.2 leaves the stale table for the guest to read (metadata
    preallocation with small clusters), pynbd leaves zeros."""
    cs = layout.cluster_size
    data = bytearray(_reftable_bytes(cs, entries))
    end = cluster + len(data) // cs
    for _guest, host, count in layout.data_runs:
        first, last = max(host, cluster), min(host + count, end)
        if first < last:
            data[(first - cluster) * cs:(last - cluster) * cs] = bytes((last - first) * cs)
    return bytes(data)


def _qcow2_tables(layout: Qcow2Layout) -> Iterator[tuple[int, bytes]]:
    """(byte offset, content) of the outgrown refcount tables (first: live structures
    may reuse their clusters), the refcount blocks, the refcount table, the L1 table
    and the L2 tables."""
    cs = layout.cluster_size
    for cluster, entries in layout.old_reftables:
        yield cluster * cs, _stale_reftable(layout, cluster, entries)
    per_block = cs * 8 >> REFCOUNT_ORDER
    for index, block in enumerate(layout.reftable):
        if block:
            counts = bytearray(cs)
            chunk = layout.refcounted[index * per_block:(index + 1) * per_block]
            counts[1:2 * len(chunk):2] = chunk  # 16-bit big-endian refcounts, all 0 or 1
            yield block * cs, bytes(counts)
    yield layout.reftable_cluster * cs, _reftable_bytes(cs, layout.reftable)
    if layout.l1_size:
        l1 = array.array("Q", bytes(8 * layout.l1_size))
        for index, table in layout.l2_tables.items():
            l1[index] = table * cs | _COPIED
        yield layout.l1_cluster * cs, _big_endian_u64(l1)
    yield from _l2_tables(layout)


def _l2_tables(layout: Qcow2Layout) -> Iterator[tuple[int, bytes]]:
    """Every L2 table: host offset | COPIED for each mapped guest cluster. Extended L2
    entries get an all-zero subcluster bitmap: QEMU's preallocation maps clusters
    without allocating their subclusters, so they still read from the backing file."""
    cs = layout.cluster_size
    span = l2_entries(layout.cluster_bits, layout.extended_l2)
    runs: dict[int, list[tuple[int, int, int]]] = {}
    for run in layout.data_runs:  # a run never crosses an L2 table's range
        runs.setdefault(run[0] // span, []).append(run)
    for index, table in sorted(layout.l2_tables.items()):
        entries = array.array("Q", bytes(8 * span))
        for guest, host, count in runs.get(index, ()):
            first = host * cs | _COPIED
            start = guest - index * span
            entries[start:start + count] = array.array("Q", range(first, first + count * cs, cs))
        if layout.extended_l2:
            wide = array.array("Q", bytes(16 * span))
            wide[0::2] = entries
            entries = wide
        yield table * cs, _big_endian_u64(entries)


def write_qcow2(fd: int, layout: Qcow2Layout, header: bytes, preallocation: str) -> None:
    """Write the image into the empty file ``fd``: header, refcount structures, L1 and
    L2 tables, and for falloc/full the data area (fallocated / written as zeros).

    Raises OSError (e.g. ENOSPC); the caller removes the partial file.
    """
    cs = layout.cluster_size
    os.ftruncate(fd, layout.file_length)
    if layout.data_area and preallocation == "falloc":
        first, count = layout.data_area
        os.posix_fallocate(fd, first * cs, count * cs)
    elif layout.data_area and preallocation == "full":
        first, count = layout.data_area
        write_zeros(fd, first * cs, count * cs)
    os.pwrite(fd, header, 0)
    for offset, data in _qcow2_tables(layout):
        os.pwrite(fd, data, offset)
    if layout.zero_tail:
        offset, length = layout.zero_tail
        write_zeros(fd, offset, length)


def write_zeros(fd: int, offset: int, length: int) -> None:
    """Write ``length`` zero bytes at ``offset`` (real writes, no holes). Raises OSError."""
    chunk = bytes(min(length, 4 << 20))
    end = offset + length
    while offset < end:
        offset += os.pwrite(fd, memoryview(chunk)[:end - offset], offset)


def _create_exclusive(path: str) -> int:
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        raise CreateError(f"{path}: cannot create: {exc.strerror}") from None


def _discard(path: str, fd: int) -> None:
    """Close and remove a partially written image (as qemu-img does on failure)."""
    os.close(fd)
    try:
        os.unlink(path)
    except OSError:
        log.warning("%s: cannot remove the partial image", path)
