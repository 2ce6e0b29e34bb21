"""QMP's dirty bitmap commands: ``block-dirty-bitmap-add``, ``-remove``, ``-clear``,
``-enable``, ``-disable``, ``-merge`` and ``transaction`` of those, with
qemu-storage-daemon 7.2's arguments, checks and messages.

The work happens in :mod:`pynbd.image.qcow2.bitmapops` (in a worker thread: it writes
persistent bitmaps to the image); here the nodes are looked up, the image's change
feed announces the whole image around it (every cached bitmap run is dropped), and the
exports of the image then export its bitmaps as they are. Commands run one at a time.

Where pynbd departs from QEMU: bitmaps can be changed on the writable qcow2 images pynbd
serves (their top node), not on read-only, raw, file or backing nodes; a bitmap is busy
while an NBD client reads it (has its ``qemu:dirty-bitmap:`` context selected), not for
an export's lifetime; ``block-dirty-bitmap-merge`` with an empty list of sources changes
nothing (qemu-storage-daemon 7.2 crashes).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from pynbd.image.base import ImageError
from pynbd.image.dirtybitmap import DirtyBitmap
from pynbd.image.qcow2.bitmapdir import BitmapOpError
from pynbd.image.qcow2.bitmapops import BitmapAction, apply_actions
from pynbd.image.qcow2.image import Qcow2Image
from pynbd.image.qcow2.recording import BitmapRecorder
from pynbd.qmp.nodecmds import node_table
from pynbd.qmp.nodes import NodeTable
from pynbd.qmp.registry import (
    ANY,
    BOOL,
    STR,
    UINT32,
    Alternate,
    CommandRegistry,
    Enum,
    List,
    Member,
    QmpError,
    Struct,
    Union,
)
from pynbd.qmp.session import CommandContext

#: QAPI BlockDirtyBitmap: a node and a bitmap name.
BLOCK_DIRTY_BITMAP = (Member("node", STR), Member("name", STR))
BLOCK_DIRTY_BITMAP_ADD = (*BLOCK_DIRTY_BITMAP, Member("granularity", UINT32, optional=True),
                          Member("persistent", BOOL, optional=True), Member("disabled", BOOL, optional=True))
#: QAPI BlockDirtyBitmapOrStr: a name on the target's node, or a node and a name.
BITMAP_OR_STR = Alternate("BlockDirtyBitmapOrStr", (STR, Struct("BlockDirtyBitmap", BLOCK_DIRTY_BITMAP)))
BLOCK_DIRTY_BITMAP_MERGE = (Member("node", STR), Member("target", STR), Member("bitmaps", List(BITMAP_OR_STR)))

#: Transaction action type -> (the operation, its data members).
ACTIONS: dict[str, tuple[str, tuple[Member, ...]]] = {
    "block-dirty-bitmap-add": ("add", BLOCK_DIRTY_BITMAP_ADD),
    "block-dirty-bitmap-remove": ("remove", BLOCK_DIRTY_BITMAP),
    "block-dirty-bitmap-clear": ("clear", BLOCK_DIRTY_BITMAP),
    "block-dirty-bitmap-enable": ("enable", BLOCK_DIRTY_BITMAP),
    "block-dirty-bitmap-disable": ("disable", BLOCK_DIRTY_BITMAP),
    "block-dirty-bitmap-merge": ("merge", BLOCK_DIRTY_BITMAP_MERGE),
}
#: QAPI TransactionAction: QEMU 7.2's action types (those pynbd runs are ACTIONS).
ACTION_TYPES = ("abort", "block-dirty-bitmap-add", "block-dirty-bitmap-remove", "block-dirty-bitmap-clear",
                "block-dirty-bitmap-enable", "block-dirty-bitmap-disable", "block-dirty-bitmap-merge",
                "blockdev-backup", "blockdev-snapshot", "blockdev-snapshot-internal-sync",
                "blockdev-snapshot-sync", "drive-backup")
TRANSACTION_ACTION = Union("TransactionAction", (Member("type", Enum("TransactionActionKind", ACTION_TYPES)),),
                           branches={kind: (Member("data", Struct(f"{kind}-wrapper", ACTIONS[kind][1])
                                                   if kind in ACTIONS else ANY),)
                                     for kind in ACTION_TYPES})
TRANSACTION_PROPERTIES = Struct("TransactionProperties", (
    Member("completion-mode", Enum("ActionCompletionMode", ("individual", "grouped")), optional=True),))


def _recorder(table: NodeTable, node: str, op: str) -> BitmapRecorder:
    """The bitmap recorder of the writable qcow2 image whose top node is ``node``."""
    if op != "add" and not table.has(node):
        raise QmpError(f"Node '{node}' not found")  # (block_dirty_bitmap_lookup's words; add's differ)
    served = table.image_of(node)  # QmpError for a node nothing has
    image = served.image if served is not None else None
    if not isinstance(image, Qcow2Image) or image.recorder is None:
        raise QmpError(f"Node '{node}': pynbd changes the bitmaps of the writable qcow2 images "
                       "it serves (their top node) only")
    return image.recorder


def _merge_sources(table: NodeTable, bitmaps: Sequence[Any]) -> tuple[str | DirtyBitmap, ...]:
    """Merge sources as bitmapops takes them: names stay names (looked up on the target's
    node, in order), ``{node, name}`` become the bitmap of that node."""
    sources: list[str | DirtyBitmap] = []
    for source in bitmaps:
        if isinstance(source, str):
            sources.append(source)
            continue
        if not table.has(source["node"]):
            raise QmpError(f"Node '{source['node']}' not found")
        served = table.image_of(source["node"])
        image = None if served is None else served.image
        found = None if not isinstance(image, Qcow2Image) else next(
            (b for b in image.bitmap_list() if b.name == source["name"]), None)
        if found is None:
            raise QmpError(f"Dirty bitmap '{source['name']}' not found")
        sources.append(found)
    return tuple(sources)


def _action(table: NodeTable, op: str, data: dict[str, Any]) -> BitmapAction:
    """The action of one command's (or transaction action's) arguments."""
    if op == "add":
        return BitmapAction("add", data["name"], data.get("granularity"),
                            data.get("persistent", False), data.get("disabled", False))
    if op == "merge":
        return BitmapAction("merge", data["target"], sources=_merge_sources(table, data["bitmaps"]))
    return BitmapAction(op, data["name"])


async def run_actions(context: CommandContext, steps: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """Run ``(op, arguments)`` steps all or nothing: on one node at once; on several, each
    node's steps are tried first (applied and undone), then applied."""
    table = node_table(context)
    async with table.bitmap_lock:
        grouped: dict[str, list[BitmapAction]] = {}
        recorders: dict[str, BitmapRecorder] = {}
        for op, data in steps:
            if op == "add" and not data["name"]:  # QEMU checks the name before the node
                raise QmpError("Bitmap name cannot be empty")
            node = data["node"]
            if node not in recorders:
                recorders[node] = _recorder(table, node, op)
            grouped.setdefault(node, []).append(_action(table, op, data))
        loop = asyncio.get_running_loop()
        if len(grouped) > 1:
            for node, actions in grouped.items():
                await _run(loop, recorders[node], node, actions, dry_run=True)
        for node, actions in grouped.items():
            await _run(loop, recorders[node], node, actions, dry_run=False)
            for export in table.exports_of(recorders[node].image):
                context.server.refresh_export(export)


async def _run(loop: asyncio.AbstractEventLoop, recorder: BitmapRecorder, node: str, actions: list[BitmapAction],
               dry_run: bool) -> None:
    image = recorder.image
    image.changes.announce(0, image.size)
    try:
        await loop.run_in_executor(None, apply_actions, recorder, node, actions, dry_run)
    except BitmapOpError as exc:
        raise QmpError(str(exc)) from None
    except ImageError as exc:
        raise QmpError(f"Node '{node}': {exc}") from None
    finally:
        image.changes.announce(0, image.size)


def _command(op: str) -> Any:
    async def handler(context: CommandContext, **arguments: Any) -> None:
        await run_actions(context, [(op, arguments)])
    handler.__name__ = f"block_dirty_bitmap_{op}"
    return handler


async def transaction(context: CommandContext, actions: list[dict[str, Any]],
                      properties: dict[str, Any] | None = None) -> None:
    """QMP ``transaction`` of bitmap actions: all or nothing."""
    if actions and properties and properties.get("completion-mode", "individual") == "grouped":
        raise QmpError(f"Action '{actions[0]['type']}' does not support Transaction property "
                       "completion-mode = grouped")
    steps = []
    for action in actions:
        kind = action["type"]
        if kind not in ACTIONS:
            raise QmpError(f"Action '{kind}' is not supported by pynbd")
        steps.append((ACTIONS[kind][0], action["data"]))
    await run_actions(context, steps)


def register(registry: CommandRegistry) -> None:
    for kind, (op, members) in ACTIONS.items():
        registry.add(kind, _command(op), members)
    registry.add("transaction", transaction, [Member("actions", List(TRANSACTION_ACTION)),
                                              Member("properties", TRANSACTION_PROPERTIES, optional=True)])
