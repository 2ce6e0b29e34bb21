"""QMP's block node queries: ``query-named-block-nodes`` and ``query-blockstats``, answered
as qemu-storage-daemon 7.2 answers them (pynbd.qmp.blockinfo, pynbd.server.stats), from
the server's node table. On the event loop's thread."""

from __future__ import annotations

from typing import Any

from pynbd.qmp.blockinfo import query_named_block_nodes as named_block_nodes
from pynbd.qmp.nodes import NodeTable
from pynbd.qmp.registry import BOOL, CommandRegistry, Member, QmpError
from pynbd.qmp.session import CommandContext
from pynbd.server.stats import query_blockstats as blockstats


def node_table(context: CommandContext) -> NodeTable:
    """The server's node table (QmpError when the server has none)."""
    table = getattr(context.server, "nodes", None)
    if not isinstance(table, NodeTable):
        raise QmpError("this server has no block nodes")
    return table


def query_named_block_nodes(context: CommandContext, flat: bool = False) -> list[dict[str, Any]]:
    return named_block_nodes(node_table(context).nodes, flat)


def query_blockstats(context: CommandContext, query_nodes: bool = False) -> list[dict[str, Any]]:
    return blockstats(node_table(context).nodes, query_nodes)


def register(registry: CommandRegistry) -> None:
    registry.add("query-named-block-nodes", query_named_block_nodes, [Member("flat", BOOL, optional=True)])
    registry.add("query-blockstats", query_blockstats, [Member("query-nodes", BOOL, optional=True)])
