"""The block nodes the QMP monitor names: each served image as a format node over its
file node (plus the nodes of its backing chain), as a qemu-storage-daemon configured
with ``--blockdev`` for both would have them (:func:`pynbd.qmp.blockinfo.image_nodes`).

On the event loop's thread. A node table is made once per server from its exports;
an image served by several exports is one node (named after its first export).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pynbd.image.base import Image
from pynbd.qmp.blockinfo import AutoNodeNames, BlockNode, image_nodes
from pynbd.qmp.registry import QmpError
from pynbd.server.exports import Export

#: The node name of the export named "" (qemu-storage-daemon's examples use it too).
DEFAULT_NODE_NAME = "disk0"


def default_node_name(export_name: str) -> str:
    """A format node's name when ``--node-name`` does not give one: the export's name,
    or ``disk0`` for the export named ""."""
    return export_name or DEFAULT_NODE_NAME


def node_not_found(name: str) -> QmpError:
    """QEMU's answer for a node (or device) name nothing has (bdrv_lookup_bs)."""
    return QmpError(f"Cannot find device='{name}' nor node-name='{name}'")


@dataclass(eq=False)
class ImageNodes:
    """One served image: its top format node's name, the image, the exports serving it."""

    node_name: str
    image: Image
    exports: list[Export]
    nodes: list[BlockNode]


class NodeTable:
    """Every block node, oldest first, and which image each top format node is."""

    def __init__(self, exports: Iterable[Export], node_names: dict[str, str] | None = None) -> None:
        """``node_names``: export name -> the node name ``--node-name`` gave its image."""
        self._auto = AutoNodeNames()
        self.images: list[ImageNodes] = []
        #: Serialises operations that change bitmaps (one at a time, as QEMU's big lock).
        self.bitmap_lock = asyncio.Lock()
        names = node_names or {}
        for export in exports:
            served = self.served_image(export.image)
            if served is not None:
                served.exports.append(export)
                continue
            name = names.get(export.name) or default_node_name(export.name)
            nodes = image_nodes(export.image, name, self._auto, stats=export.stats)
            for node in nodes:
                if node.node_name == name:
                    node.image = export.image
            self.images.append(ImageNodes(name, export.image, [export], nodes))

    @property
    def nodes(self) -> list[BlockNode]:
        return [node for served in self.images for node in served.nodes]

    def served_image(self, image: Image) -> ImageNodes | None:
        return next((served for served in self.images if served.image is image), None)

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
