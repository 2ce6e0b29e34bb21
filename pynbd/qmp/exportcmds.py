"""QMP's node and export management: ``blockdev-add``, ``blockdev-del``,
``block-export-add``, ``block-export-del``, ``query-block-exports`` and the
``BLOCK_EXPORT_DELETED`` event, as qemu-storage-daemon 7.2 answers them.

Exports added here are served like those of the command line (TLS included when the
server has it: TLS is the connection's, not the export's). On the event loop's thread;
opening an image reads its metadata there (as the command line does before serving).

Where pynbd departs from QEMU: ``blockdev-add`` knows the drivers ``file``, ``raw`` and
``qcow2``, opens a qcow2 node's backing chain from its header (``backing: null`` opens
none; a node named as ``backing`` is refused),
and honours ``read-only``; a host file is opened by one format node at a time; exports
are NBD exports of format nodes (the top node of an image), and offer
``qemu:allocation-depth`` whatever ``allocation-depth`` says; a bitmap may be named by
several exports (it is busy while a client reads it, not while an export names it).
"""

from __future__ import annotations

import asyncio
from typing import Any

from pynbd.image.base import ImageError
from pynbd.qmp.bitmapcmds import BITMAP_OR_STR
from pynbd.qmp.nodecmds import node_table
from pynbd.qmp.nodes import NodeTable
from pynbd.qmp.registry import ANY, BOOL, STR, Alternate, CommandRegistry, Enum, List, Member, QmpError, Union
from pynbd.qmp.session import CommandContext
from pynbd.server.exports import Export

#: QAPI BlockdevRef: an inline node or a node's name.
BLOCKDEV_REF = Alternate("BlockdevRef", (STR, ANY))
BLOCKDEV_OPTIONS = Union("BlockdevOptions", (
    Member("driver", Enum("BlockdevDriver", ("file", "qcow2", "raw"))),
    Member("node-name", STR, optional=True),
    Member("read-only", BOOL, optional=True),
), discriminator="driver", branches={
    "file": (Member("filename", STR),),
    "raw": (Member("file", BLOCKDEV_REF),),
    "qcow2": (Member("file", BLOCKDEV_REF), Member("backing", ANY, optional=True)),
})
BLOCK_EXPORT_OPTIONS = Union("BlockExportOptions", (
    Member("type", Enum("BlockExportType", ("nbd", "vhost-user-blk", "fuse", "vduse-blk"))),
    Member("id", STR),
    Member("fixed-iothread", BOOL, optional=True),
    Member("iothread", STR, optional=True),
    Member("node-name", STR),
    Member("writable", BOOL, optional=True),
    Member("writethrough", BOOL, optional=True),
), discriminator="type", branches={
    "nbd": (Member("name", STR, optional=True), Member("description", STR, optional=True),
            Member("bitmaps", List(BITMAP_OR_STR), optional=True),
            Member("allocation-depth", BOOL, optional=True)),
})


def blockdev_add(context: CommandContext, driver: str, node_name: str | None = None,
                 read_only: bool = False, **branch: Any) -> None:
    table = node_table(context)
    name = table.check_new_name(node_name)
    if driver == "file":
        table.add_file(name, branch["filename"], read_only)
        return
    backing = branch.get("backing", "header")
    if backing not in ("header", None):
        raise QmpError("pynbd opens the backing chain a qcow2 header names (or none with "
                       "'backing': null), not a node given by name")
    table.add_format(name, driver, branch["file"], read_only, backing=backing is not None)


def blockdev_del(context: CommandContext, node_name: str) -> None:
    node_table(context).delete(node_name)


def block_export_add(context: CommandContext, type: str, id: str, node_name: str,
                     writable: bool = False, name: str | None = None, description: str = "",
                     bitmaps: list[Any] | None = None, **_unused: Any) -> None:
    """An NBD export of a format node (QEMU's checks in QEMU's order)."""
    table = node_table(context)
    server = context.server
    if type != "nbd":
        raise QmpError(f"pynbd exports over NBD only, not {type}")
    if id in table.exports:
        raise QmpError(f"Block export id '{id}' is already in use")
    if not table.has(node_name):
        raise QmpError(f"Cannot find device='' nor node-name='{node_name}'")
    served = table.image_of(node_name)
    if served is None:
        raise QmpError(f"Node '{node_name}': pynbd exports the top node of an image (raw or qcow2)")
    if writable and served.image.read_only:
        raise QmpError("Cannot export read-only node as writable")
    export_name = node_name if name is None else name
    if export_name in server.exports:
        raise QmpError(f"NBD server already has export named '{export_name}'")
    names = None
    if bitmaps is not None:
        available = served.image.bitmaps()
        names = []
        for source in bitmaps:
            bitmap_name = source if isinstance(source, str) else source["name"]
            if not isinstance(source, str) and source["node"] != node_name:
                raise QmpError(f"Bitmap '{bitmap_name}' is not found")  # (pynbd: on the node only)
            bitmap = available.get(bitmap_name)
            if bitmap is None:
                raise QmpError(f"Bitmap '{bitmap_name}' is not found")
            if not writable and bitmap.recording and not served.image.read_only:
                raise QmpError(f"Enabled bitmap '{bitmap_name}' incompatible with readonly export")
            names.append(bitmap_name)
    try:
        export = Export.for_image(export_name, served.image, description, not writable, names)
    except ImageError as exc:
        raise QmpError(str(exc)) from None
    table.attach(served, export, id)
    server.add_export(export)


async def block_export_del(context: CommandContext, id: str, mode: str = "safe") -> None:
    """Stop serving the export; ``hard`` disconnects its clients (``safe`` refuses while
    any is connected). BLOCK_EXPORT_DELETED goes out once its last client is gone."""
    table = node_table(context)
    server = context.server
    export = table.exports.get(id)
    if export is None:
        raise QmpError(f"Export '{id}' is not found")
    clients = server.clients_of(export)
    if clients and mode != "hard":
        raise QmpError(f"export '{id}' still in use")
    server.remove_export(export)
    table.detach(id)
    asyncio.get_running_loop().create_task(_deleted(context, table, export, id, clients))


async def _deleted(context: CommandContext, table: NodeTable, export: Export, export_id: str,
                   clients: list[Any]) -> None:
    """Cut the clients (mode hard), then close the export and tell the monitors."""
    for conn in clients:
        conn.abort()
    tasks = [conn.task for conn in clients if conn.task is not None]
    if tasks:
        await asyncio.wait(tasks)
    export.close()
    context.emit_event("BLOCK_EXPORT_DELETED", {"id": export_id})


def query_block_exports(context: CommandContext) -> list[dict[str, Any]]:
    """BlockExportInfo per export, newest first."""
    table = node_table(context)
    answer = []
    for export_id, export in reversed(list(table.exports.items())):
        served = table.served_image(export.image)
        answer.append({"id": export_id, "type": "nbd",
                       "node-name": served.node_name if served is not None else "",
                       "shutting-down": False})
    return answer


def register(registry: CommandRegistry) -> None:
    registry.add("blockdev-add", blockdev_add, boxed=BLOCKDEV_OPTIONS)
    registry.add("blockdev-del", blockdev_del, [Member("node-name", STR)])
    registry.add("block-export-add", block_export_add, boxed=BLOCK_EXPORT_OPTIONS)
    registry.add("block-export-del", block_export_del, [
        Member("id", STR), Member("mode", Enum("BlockExportRemoveMode", ("safe", "hard")), optional=True)])
    registry.add("query-block-exports", query_block_exports)
