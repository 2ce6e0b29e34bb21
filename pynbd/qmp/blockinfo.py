"""The block nodes of pynbd's images as QEMU's QMP describes them: the answers of
``query-named-block-nodes`` (BlockDeviceInfo, ImageInfo, BlockDirtyInfo), built
as qemu-storage-daemon 7.2 builds them. Pure builders: no sockets. They run on the
caller's thread (the QMP monitor's event loop) while the images are open; what they
read of an image is its parsed header, ``fstat`` of its host files, its snapshot
table (a few small reads) and, the first time a bitmap is counted, the bitmap's bits.

The node graph (:func:`image_nodes`) is the one a qemu-storage-daemon started with
``--blockdev driver=file,node-name=NAME-file,filename=IMAGE --blockdev
driver=FORMAT,node-name=NAME,file=NAME-file`` has: the format node ``NAME`` over
the file node ``NAME-file``; the nodes QEMU opens implicitly (each backing file's
format and file node, an external data file's file node) get automatic names
(:class:`AutoNodeNames`).

Where pynbd's answer departs from qemu-storage-daemon's, on purpose:

- automatic node names are ``#block`` + a counter + ``00`` where QEMU puts two
  random digits (the same ``#block<n><dd>`` shape, reproducible);
- an external data file node is named by the path pynbd opened (the name in the
  header, resolved against the image's directory); QEMU 7.2 shows the header's name
  as it is, which it opens relative to its working directory;
- a raw image's ``virtual-size`` is the size pynbd serves, to the byte; QEMU rounds
  it up to a multiple of 512 (so does its NBD export). File nodes are rounded as in
  QEMU;
- ``format-specific`` bitmaps are the image file's as they are now: pynbd writes
  a persistent bitmap's addition, removal or new flags to the file at once, where
  QEMU writes them when it closes the image (so its list changes only then);
- ``format-specific`` bitmap flags: QEMU flags every persistent bitmap ``in-use``
  on disk while it holds the image writable. pynbd flags a bitmap on disk only once
  a write dirties it, and clears the flag at each flush; it reports ``in-use`` for
  every bitmap of a writable node anyway, as QEMU does, since what the flag tells a
  reader - a writer holds the image and the bits on disk may be stale at any moment
  - holds for pynbd as well.
"""

from __future__ import annotations

import itertools
import os
import stat
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace
from typing import Any

from pynbd.image.base import BitmapInfo, Image
from pynbd.image.qcow2.chain import RawLayer
from pynbd.image.qcow2.header import (
    COMPAT_LAZY_REFCOUNTS,
    COMPRESSION_ZSTD,
    INCOMPAT_CORRUPT,
    INCOMPAT_DIRTY,
)
from pynbd.image.qcow2.image import Qcow2Image
from pynbd.image.qcow2.layer import Qcow2Layer
from pynbd.image.raw import RawImage
from pynbd.server.stats import IoStats

#: Block driver names (BlockDeviceInfo ``drv``).
DRIVER_FILE = "file"
DRIVER_RAW = "raw"
DRIVER_QCOW2 = "qcow2"

#: The ``cache`` object of every node: pynbd writes through the page cache
#: (no O_DIRECT) and honours flushes, as QEMU's default ``cache=writeback``.
CACHE_MODE = {"writeback": True, "direct": False, "no-flush": False}
#: No I/O throttling: BlockDeviceInfo's mandatory bps/iops fields.
NO_THROTTLING = {"bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0, "iops_rd": 0, "iops_wr": 0}

#: What a format node reads: a qcow2 file of a chain, a raw backing file, a raw image.
FormatLayer = Qcow2Layer | RawLayer | RawImage

#: Nanoseconds per second (SnapshotInfo splits the VM clock).
_NS = 1_000_000_000
#: QEMU's block layer counts lengths in 512-byte sectors.
SECTOR = 512


class AutoNodeNames:
    """Names for the nodes opened implicitly (backing files, external data files), in the
    order they are opened: ``#block0``+``00``, ``#block1``+``00``, ... - QEMU's
    ``#block<counter><two digits>`` shape with the digits fixed, so that names are
    reproducible. A name that begins with ``#`` is never a user's (QEMU accepts only
    names that begin with a letter), so these never clash with ``--node-name``.
    One per process (the counter is shared by every image)."""

    def __init__(self) -> None:
        self._counter = itertools.count()

    def __call__(self) -> str:
        return f"#block{next(self._counter)}00"


@dataclass(eq=False)
class BlockNode:
    """One block node: a format node (``qcow2``, ``raw``) reading a :data:`FormatLayer`
    through its file node, or a file node (``file``) for a host file.

    The objects it refers to (``fd``, ``layer``) belong to the opened image: a node is
    valid while its image is open.
    """

    node_name: str
    #: DRIVER_QCOW2, DRIVER_RAW or DRIVER_FILE.
    driver: str
    #: The path the node was opened with (BlockDeviceInfo ``file``).
    filename: str
    read_only: bool
    #: File nodes: the open host file.
    fd: int = -1
    #: Format nodes: what they read.
    layer: FormatLayer | None = None
    #: Format nodes: their file node.
    file: BlockNode | None = None
    #: qcow2 nodes with an external data file: its file node.
    data_file: BlockNode | None = None
    #: Format nodes with a backing file: its format node.
    backing: BlockNode | None = None
    #: Names of this node's bitmaps an export uses (BlockDirtyInfo ``busy``).
    busy_bitmaps: frozenset[str] = frozenset()
    #: The I/O counters reported at this node (pynbd.server.stats); None: not counted.
    stats: IoStats | None = None
    #: A served image's top format node: the image (its bitmaps as they are now).
    image: Image | None = None

    @property
    def stats_parent(self) -> BlockNode | None:
        """The child ``query-blockstats`` reports as ``parent``: the one holding the
        data (an external data file rather than the qcow2 file, as QEMU chooses)."""
        return self.data_file or self.file


# -- the node graph ------------------------------------------------------------------------------


def image_nodes(image: Image, node_name: str, auto_names: AutoNodeNames, *,
                busy_bitmaps: Collection[str] = (), stats: IoStats | None = None) -> list[BlockNode]:
    """The nodes of an opened image, in the order qemu-storage-daemon creates them
    (oldest first): ``node_name-file``, ``node_name``, its data file's node, then for
    each backing file its file node, its format node and its data file's node.

    ``busy_bitmaps`` are the top image's bitmaps an export uses; ``stats`` the counters
    of the export(s) of ``node_name``. Backing nodes are read-only. Raises TypeError
    for an image of a driver pynbd has no node model for.
    """
    if isinstance(image, Qcow2Image):
        layers: Sequence[FormatLayer] = image.layers
    elif isinstance(image, RawImage):
        layers = [image]
    else:
        raise TypeError(f"no block node model for {type(image).__name__}")
    nodes: list[BlockNode] = []
    above: BlockNode | None = None
    for depth, layer in enumerate(layers):
        top = depth == 0
        read_only = image.read_only if top else True
        file_node = BlockNode(f"{node_name}-file" if top else auto_names(), DRIVER_FILE, layer.path,
                              read_only, fd=_layer_fd(layer))
        driver = DRIVER_QCOW2 if isinstance(layer, Qcow2Layer) else DRIVER_RAW
        node = BlockNode(node_name if top else auto_names(), driver, layer.path, read_only,
                         layer=layer, file=file_node)
        nodes += (file_node, node)
        if isinstance(layer, Qcow2Layer) and layer.has_data_file:
            assert layer.data_file_path is not None
            node.data_file = BlockNode(auto_names(), DRIVER_FILE, layer.data_file_path, read_only,
                                       fd=layer.data_fd)
            nodes.append(node.data_file)
        if top:
            node.busy_bitmaps = frozenset(busy_bitmaps)
            node.stats = stats
        else:
            assert above is not None
            above.backing = node
        above = node
    return nodes


def _layer_fd(layer: FormatLayer) -> int:
    """The host file a layer's file node stands for."""
    if isinstance(layer, RawLayer):
        return layer.data_fd
    return layer.fd


# -- query-named-block-nodes ------------------------------------------------------------------


def query_named_block_nodes(nodes: Sequence[BlockNode], flat: bool = False) -> list[dict[str, Any]]:
    """The answer of ``query-named-block-nodes``: one BlockDeviceInfo per node, newest
    first (``nodes`` are oldest first, as :func:`image_nodes` and later additions list
    them). ``flat`` leaves out each image's ``backing-image``."""
    return [block_device_info(node, flat) for node in reversed(nodes)]


def block_device_info(node: BlockNode, flat: bool = False) -> dict[str, Any]:
    """One node's BlockDeviceInfo (QEMU's qapi/block-core.json), as
    qemu-storage-daemon 7.2 fills it.

    The node's bitmaps (:func:`dirty_bitmap_infos`, oldest first) are listed newest
    first, and the key is left out when there are none. ``backing_file_depth`` is 0 when ``flat``, as
    QEMU counts the depth while it nests the backing images. Raises OSError if a host
    file cannot be stat'ed, ImageError if a snapshot table cannot be read.
    """
    info: dict[str, Any] = {
        "file": node.filename,
        "node-name": node.node_name,
        "ro": node.read_only,
        "drv": node.driver,
    }
    if node.backing is not None:
        info["backing_file"] = node.backing.filename
    depth = 0
    backing = None if flat else node.backing
    while backing is not None:
        depth += 1
        backing = backing.backing
    info["backing_file_depth"] = depth
    info["encrypted"] = False
    info["detect_zeroes"] = "off"
    info.update(NO_THROTTLING)
    info["image"] = image_info(node, flat)
    info["cache"] = dict(CACHE_MODE)
    info["write_threshold"] = 0
    dirty_bitmaps = dirty_bitmap_infos(node)
    if dirty_bitmaps:
        info["dirty-bitmaps"] = [block_dirty_info(bitmap) for bitmap in reversed(dirty_bitmaps)]
    return info


def image_info(node: BlockNode, flat: bool = False) -> dict[str, Any]:
    """A node's ImageInfo (QEMU's ``bdrv_query_image_info``): a file node's size is its
    host file's; a format node's ``actual-size`` adds up its file and data file (not
    its backing file). Unless ``flat``, a backing file's ImageInfo is nested as
    ``backing-image``. Raises as :func:`block_device_info`."""
    layer = node.layer
    if layer is None:  # a file node
        virtual_size, actual_size = host_file_sizes(node.fd)
        return {"filename": node.filename, "format": node.driver, "dirty-flag": False,
                "actual-size": actual_size, "virtual-size": virtual_size}
    actual_size = sum(host_file_sizes(child.fd)[1] for child in (node.file, node.data_file) if child)
    info: dict[str, Any] = {"filename": node.filename, "format": node.driver}
    if not isinstance(layer, Qcow2Layer):
        info.update({"dirty-flag": False, "actual-size": actual_size, "virtual-size": layer.size})
        return info
    header = layer.header
    info.update({
        "dirty-flag": bool(header.incompatible_features & INCOMPAT_DIRTY),
        "actual-size": actual_size,
        "virtual-size": layer.size,
        "cluster-size": layer.cluster_size,
    })
    if header.backing_file and node.backing is not None:
        info["backing-filename"] = header.backing_file
        info["full-backing-filename"] = node.backing.filename
        if header.backing_format:
            info["backing-filename-format"] = header.backing_format
    snapshots = snapshot_infos(layer)
    if snapshots:
        info["snapshots"] = snapshots
    if not flat and node.backing is not None:
        info["backing-image"] = image_info(node.backing, flat)
    info["format-specific"] = {"type": "qcow2", "data": qcow2_specific(layer, writable=not node.read_only)}
    return info


def host_file_sizes(fd: int) -> tuple[int, int]:
    """``(size, allocated bytes)`` of an open host file as QEMU's file driver reports
    them: its length rounded up to 512 bytes (QEMU counts lengths in sectors; a block
    device's by seeking to its end) and ``st_blocks * 512``."""
    st = os.fstat(fd)
    size = os.lseek(fd, 0, os.SEEK_END) if stat.S_ISBLK(st.st_mode) else st.st_size
    return -(-size // SECTOR) * SECTOR, st.st_blocks * 512


def qcow2_specific(layer: Qcow2Layer, writable: bool) -> dict[str, Any]:
    """ImageInfoSpecificQCow2 of a qcow2 file (QEMU's ``qcow2_get_specific_info``).

    Version 2 images have only ``compat``, ``refcount-bits`` and ``compression-type``.
    ``bitmaps`` lists the persistent bitmaps in directory order, with their flags;
    a ``writable`` image shows every one ``in-use`` (see the module doc).
    """
    header = layer.header
    compression = "zstd" if header.compression_type == COMPRESSION_ZSTD else "zlib"
    refcount_bits = 1 << header.refcount_order
    if header.version == 2:
        return {"compat": "0.10", "refcount-bits": refcount_bits, "compression-type": compression}
    data: dict[str, Any] = {"compat": "1.1"}
    if header.has_data_file:
        data["data-file"] = header.data_file
        data["data-file-raw"] = header.data_file_raw
    data["extended-l2"] = header.extended_l2
    data["lazy-refcounts"] = bool(header.compatible_features & COMPAT_LAZY_REFCOUNTS)
    data["corrupt"] = bool(header.incompatible_features & INCOMPAT_CORRUPT)
    data["refcount-bits"] = refcount_bits
    if layer.bitmaps:
        data["bitmaps"] = [{"name": b.name, "granularity": b.granularity, "flags": _bitmap_flags(b, writable)}
                           for b in (bitmap.info() for bitmap in layer.bitmaps)]
    data["compression-type"] = compression
    return data


def _bitmap_flags(info: BitmapInfo, writable: bool) -> list[str]:
    """Qcow2BitmapInfoFlags as on disk (``in-use`` then ``auto``); ``in-use`` always
    when ``writable`` (see the module doc)."""
    if writable and "in-use" not in info.flags:
        return ["in-use", *info.flags]
    return list(info.flags)


def snapshot_infos(layer: Qcow2Layer) -> list[dict[str, Any]]:
    """SnapshotInfo of each internal snapshot, in table order (qcow2 spec, 'Snapshots'),
    from the table parsed when the layer was opened (``layer.snapshots``)."""
    infos: list[dict[str, Any]] = []
    for snapshot in layer.snapshots:
        info = {"id": snapshot.id, "name": snapshot.name, "vm-state-size": snapshot.vm_state_size,
                "date-sec": snapshot.date_sec, "date-nsec": snapshot.date_nsec,
                "vm-clock-sec": snapshot.vm_clock_nsec // _NS, "vm-clock-nsec": snapshot.vm_clock_nsec % _NS}
        if snapshot.icount is not None:
            info["icount"] = snapshot.icount
        infos.append(info)
    return infos


# -- dirty bitmaps -------------------------------------------------------------------------------


def dirty_bitmap_infos(node: BlockNode) -> list[BitmapInfo]:
    """The bitmaps of a node, oldest first: a served image's as they are now (those made
    at run time included, ``busy`` while a connection reads them), else the persistent
    bitmaps of a qcow2 node in directory order (the order QEMU loads them), ``busy``
    when an export uses them; none for other nodes. Counting a bitmap's dirty granules
    reads it first if it was not read yet."""
    if node.image is not None:
        return list(node.image.bitmap_infos())
    layer = node.layer
    if not isinstance(layer, Qcow2Layer):
        return []
    return [replace(info, busy=True) if info.name in node.busy_bitmaps and not info.inconsistent else info
            for info in (bitmap.info() for bitmap in layer.bitmaps)]


def block_dirty_info(info: BitmapInfo) -> dict[str, Any]:
    """BlockDirtyInfo (QEMU's qapi/block-core.json); ``inconsistent`` only when true."""
    answer: dict[str, Any] = {"name": info.name, "count": info.count, "granularity": info.granularity,
                              "recording": info.recording, "busy": info.busy, "persistent": info.persistent}
    if info.inconsistent:
        answer["inconsistent"] = True
    return answer
