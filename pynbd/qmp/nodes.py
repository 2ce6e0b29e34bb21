"""The block nodes and block exports the QMP monitor names.

Each served image is a format node over its file node (plus the nodes of its backing
chain), as a qemu-storage-daemon configured with ``--blockdev`` for both would have
them (:func:`pynbd.qmp.blockinfo.image_nodes`). Images come from the command line (one
node per image, named by ``--node-name``, else after its first export) or from
``blockdev-add``; a ``file`` node added alone stands for its host file until a format
node opens it. Exports have QMP ids: the node name of a command-line image's export,
the ``id`` given to ``block-export-add`` otherwise.

The table owns every image once the monitor runs (exports only use them) and closes
them at :meth:`NodeTable.close`. On the event loop's thread.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from pynbd.image import open_image
from pynbd.image.base import Image, ImageError
from pynbd.image.qcow2.header import MAGIC as QCOW2_MAGIC
from pynbd.image.qcow2.image import open_qcow2
from pynbd.qmp.blockinfo import DRIVER_FILE, AutoNodeNames, BlockNode, image_nodes
from pynbd.qmp.registry import QmpError
from pynbd.server.exports import Export

log = logging.getLogger(__name__)

#: The node name of the export named "" (qemu-storage-daemon's examples use it too).
DEFAULT_NODE_NAME = "disk0"
#: QEMU's id_wellformed(): a letter, then letters, digits, '-', '.', '_'.
_WELL_FORMED = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")


def default_node_name(export_name: str) -> str:
    """A format node's name when ``--node-name`` does not give one: the export's name,
    or ``disk0`` for the export named ""."""
    return export_name or DEFAULT_NODE_NAME


def _open_host_file(filename: str) -> int:
    """A read-only descriptor of a host file for a file node; QmpError in QEMU's words
    ("Could not open '...': reason") when it cannot be opened or is a directory."""
    try:
        fd = os.open(filename, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise QmpError(f"Could not open '{filename}': {exc.strerror}") from None
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.close(fd)
        raise QmpError(f"Could not open '{filename}': {os.strerror(errno.EISDIR)}")
    return fd


def _starts_with(filename: str, magic: bytes) -> bool:
    with open(filename, "rb") as f:
        return f.read(len(magic)) == magic


def node_not_found(name: str) -> QmpError:
    """QEMU's answer for a node (or device) name nothing has (bdrv_lookup_bs)."""
    return QmpError(f"Cannot find device='{name}' nor node-name='{name}'")


@dataclass(eq=False)
class ImageNodes:
    """One served image: its top format node's name, the image, the exports serving it,
    its nodes (oldest first), and the explicitly added file node it was opened over."""

    node_name: str
    image: Image
    exports: list[Export]
    nodes: list[BlockNode]
    #: A file node added with blockdev-add that this image's format node took as its file.
    file_node: BlockNode | None = None
    #: Added with blockdev-add (blockdev-del may remove it); else from the command line.
    monitor_owned: bool = False


@dataclass(eq=False)
class FileNode:
    """A ``file`` node added alone: its host file, open read-only for its sizes."""

    node: BlockNode
    users: list[ImageNodes] = field(default_factory=list)


class NodeTable:
    """Every block node, oldest first, which image each top format node is, and the
    exports by QMP id."""

    def __init__(self, exports: Iterable[Export], node_names: dict[str, str] | None = None) -> None:
        """``node_names``: export name -> the node name ``--node-name`` gave its image."""
        self._auto = AutoNodeNames()
        self.images: list[ImageNodes] = []
        self.files: list[FileNode] = []
        #: Images and file nodes in the order they were made (the order nodes are listed in).
        self._made: list[ImageNodes | FileNode] = []
        #: The block exports by QMP id, oldest first.
        self.exports: dict[str, Export] = {}
        #: Serialises operations that change bitmaps (one at a time, as QEMU's big lock).
        self.bitmap_lock = asyncio.Lock()
        names = node_names or {}
        for export in exports:
            served = self.served_image(export.image)
            if served is None:
                served = self._add_image(names.get(export.name) or default_node_name(export.name), export.image)
            export.owns_image = False  # (the table closes it)
            self.attach(served, export, served.node_name if not served.exports else export.name)

    def attach(self, served: ImageNodes, export: Export, export_id: str) -> None:
        """``export`` serves ``served``'s image under QMP id ``export_id``; the image's top
        node reports the I/O counters of its first export."""
        served.exports.append(export)
        self.exports[export_id] = export
        top = next(node for node in served.nodes if node.node_name == served.node_name)
        if top.stats is None:
            top.stats = export.stats

    def detach(self, export_id: str) -> Export:
        """Forget the export ``export_id`` (the caller stopped serving it)."""
        export = self.exports.pop(export_id)
        for served in self.images:
            if export in served.exports:
                served.exports.remove(export)
        return export

    def _add_image(self, name: str, image: Image) -> ImageNodes:
        nodes = image_nodes(image, name, self._auto)
        for node in nodes:
            if node.node_name == name:
                node.image = image
        served = ImageNodes(name, image, [], nodes)
        self.images.append(served)
        self._made.append(served)
        return served

    # -- looking up --

    @property
    def nodes(self) -> list[BlockNode]:
        """Every node, oldest first: a file node added alone where it was added (once a
        format node opened it, the image's own node for that file stands there)."""
        nodes: list[BlockNode] = []
        for made in self._made:
            if isinstance(made, FileNode):
                nodes.append(made.users[0].nodes[0] if made.users else made.node)
            else:
                nodes.extend(made.nodes[1:] if made.file_node is not None else made.nodes)
        return nodes

    def served_image(self, image: Image) -> ImageNodes | None:
        return next((served for served in self.images if served.image is image), None)

    def has(self, name: str) -> bool:
        """Whether a node is named ``name`` (the commands word its absence differently)."""
        return any(node.node_name == name for node in self.nodes)

    def find(self, name: str) -> BlockNode:
        """The node named ``name``; QmpError as QEMU's when there is none."""
        for node in self.nodes:
            if node.node_name == name:
                return node
        raise node_not_found(name)

    def image_of(self, name: str) -> ImageNodes | None:
        """The served image whose top format node is ``name`` (None: another node)."""
        self.find(name)
        return next((served for served in self.images if served.node_name == name), None)

    def exports_of(self, image: Image) -> Sequence[Export]:
        served = self.served_image(image)
        return served.exports if served is not None else ()

    # -- blockdev-add, blockdev-del --

    def check_new_name(self, name: str | None) -> str:
        """A name for a new node: QEMU's checks and messages."""
        if name is None:
            raise QmpError("'node-name' must be specified for the root node")
        if not _WELL_FORMED.match(name):
            raise QmpError(f"Invalid node-name: '{name}'")
        if self.has(name):
            raise QmpError(f"Duplicate nodes with node-name='{name}'")
        return name

    def add_file(self, name: str, filename: str, read_only: bool) -> None:
        """A ``file`` node for ``filename`` (QmpError as QEMU's if it cannot be opened)."""
        fd = _open_host_file(filename)
        file = FileNode(BlockNode(name, DRIVER_FILE, filename, read_only, fd=fd))
        self.files.append(file)
        self._made.append(file)

    def add_format(self, name: str, driver: str, file: str | dict[str, object], read_only: bool,
                   backing: bool = True) -> ImageNodes:
        """A ``raw`` or ``qcow2`` node over ``file``: the name of a file node, or an inline
        ``{"driver": "file", "filename": ...}`` (its node gets an automatic name). A qcow2
        node opens the backing chain its header names, none when ``backing`` is False."""
        file_node = None
        if isinstance(file, str):
            standalone = next((f for f in self.files if f.node.node_name == file), None)
            if standalone is None:
                self.find(file)  # (unknown: its error; else a node of another kind, "in use" as QEMU says)
            if standalone is None or standalone.users:
                raise QmpError(f"Node '{file}' is in use by another image; pynbd opens a host file once")
            if standalone.node.read_only and not read_only:
                raise QmpError("Block node is read-only")
            filename, file_node = standalone.node.filename, standalone
        else:
            if file.get("driver") != DRIVER_FILE or not isinstance(file.get("filename"), str):
                raise QmpError("pynbd opens images over 'file' nodes only")
            filename = str(file["filename"])
            os.close(_open_host_file(filename))  # (QEMU's message for a file that cannot be opened)
        if driver == "qcow2" and not _starts_with(filename, QCOW2_MAGIC):
            raise QmpError("Image is not in qcow2 format")
        try:
            image = (open_qcow2(filename, read_only, backing=False) if driver == "qcow2" and not backing
                     else open_image(filename, driver, read_only=read_only))
        except ImageError as exc:
            raise QmpError(f"Could not open '{filename}': {exc}") from None
        served = self._add_image(name, image)
        served.monitor_owned = True
        if file_node is not None:
            served.nodes[0].node_name = file_node.node.node_name
            served.nodes[0].read_only = file_node.node.read_only
            served.file_node = file_node.node
            file_node.users.append(served)
            self._made.remove(served)  # (listed where its file node was added, then its own)
            self._made.insert(self._made.index(file_node) + 1, served)
        else:
            served.nodes[0].node_name = self._auto()
        return served

    def delete(self, name: str) -> None:
        """blockdev-del: QEMU's checks and messages; the image is flushed and closed."""
        standalone = next((f for f in self.files if f.node.node_name == name), None)
        if standalone is not None:
            if standalone.users:
                raise QmpError(f"Block device {name} is in use")
            self.files.remove(standalone)
            self._made.remove(standalone)
            os.close(standalone.node.fd)
            return
        served = next((s for s in self.images if s.node_name == name), None)
        if served is None:
            if self.has(name):
                raise QmpError(f"Node {name} is not owned by the monitor")
            raise QmpError(f"Failed to find node with node-name='{name}'")
        if served.exports:
            raise QmpError(f"Node {name} is in use")
        if not served.monitor_owned:
            raise QmpError(f"Node {name} is not owned by the monitor")
        self.images.remove(served)
        self._made.remove(served)
        for file in self.files:
            if served in file.users:
                file.users.remove(served)
        served.image.close()

    def close(self) -> None:
        """Close every image and file node (the server has stopped)."""
        for served in self.images:
            try:
                served.image.close()
            except (OSError, ImageError) as exc:
                log.error("node %r: closing %s failed: %s", served.node_name, served.image.path, exc)
        for file in self.files:
            os.close(file.node.fd)
        self.images.clear()
        self.files.clear()
        self._made.clear()
