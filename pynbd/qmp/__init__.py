"""QMP, the QEMU Machine Protocol: pynbd's control socket (``pynbd serve --qmp PATH``).

It speaks as qemu-storage-daemon 7.2 does, so QEMU's tools and the ``qemu.qmp`` library
drive it unchanged. The layers:

* :mod:`pynbd.qmp.stream` — input bytes to JSON values, as QEMU's JSON parser cuts them;
* :mod:`pynbd.qmp.qobject` — QEMU's member order and JSON writer, for identical answers;
* :mod:`pynbd.qmp.registry` — commands, QAPI argument schemas, QEMU's validation messages;
* :mod:`pynbd.qmp.session` — one client's protocol state (greeting, negotiation, replies);
* :mod:`pynbd.qmp.monitor` — the asyncio unix socket server;
* :mod:`pynbd.qmp.basic` — qmp_capabilities, query-version, query-commands, quit;
* :mod:`pynbd.qmp.nodes` — the block nodes of the served images;
* :mod:`pynbd.qmp.nodecmds` — query-named-block-nodes, query-blockstats
  (answers built by :mod:`pynbd.qmp.blockinfo` and :mod:`pynbd.server.stats`);
* :mod:`pynbd.qmp.bitmapcmds` — block-dirty-bitmap-* and transaction;
* :mod:`pynbd.qmp.exportcmds` — blockdev-add/-del, block-export-add/-del, query-block-exports.

A command set is a module with ``register(registry)``; :func:`standard_registry` lists them.
"""

from __future__ import annotations

from pynbd.qmp.registry import CommandRegistry


def standard_registry() -> CommandRegistry:
    """A registry with every command ``pynbd serve --qmp`` offers."""
    from pynbd.qmp import basic, bitmapcmds, exportcmds, nodecmds

    registry = CommandRegistry()
    for commands in (basic, nodecmds, bitmapcmds, exportcmds):
        commands.register(registry)
    return registry
