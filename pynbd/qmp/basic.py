"""The monitor's own commands: ``qmp_capabilities``, ``query-version``, ``query-commands``, ``quit``.

Handlers run on the event loop's thread (see pynbd/qmp/monitor.py).
"""

from __future__ import annotations

from typing import Any

from pynbd import __version__
from pynbd.qmp.registry import CommandRegistry, Enum, List, Member
from pynbd.qmp.session import OFFERED_CAPABILITIES, CommandContext, QmpVersion

#: What pynbd reports as its version (greeting and ``query-version``). The ``qemu``
#: numbers are the QEMU release whose QMP pynbd speaks — 7.2.0, qemu-storage-daemon 7.2's
#: commands, answers and error messages — so a client that checks the version before using
#: a command sees the level it talks to; ``package`` says it is pynbd, and which release.
PYNBD_QMP_VERSION = QmpVersion(7, 2, 0, f"pynbd {__version__}")

#: QAPI enum QMPCapability.
QMP_CAPABILITY = Enum("QMPCapability", OFFERED_CAPABILITIES)


def qmp_capabilities(context: CommandContext, enable: list[str] | None = None) -> None:
    """Complete capabilities negotiation (a second time: CommandNotFound)."""
    context.session.negotiate(enable or [])


def query_version(context: CommandContext) -> dict[str, Any]:
    return context.session.version.to_qapi()


def query_commands(context: CommandContext) -> list[dict[str, str]]:
    """CommandInfo for every command, newest first as QEMU lists them."""
    return [{"name": name} for name in context.session.registry.names()]


def quit_(context: CommandContext) -> None:
    """Answer ``{}``, then stop the server cleanly, as SIGTERM does (bitmaps stored,
    images closed, exit code 0). As qemu-storage-daemon, BLOCK_EXPORT_DELETED goes out
    for each export first, oldest first."""
    table = getattr(context.server, "nodes", None)
    for export_id in list(getattr(table, "exports", ())):
        context.emit_event("BLOCK_EXPORT_DELETED", {"id": export_id})
    context.request_stop()


def register(registry: CommandRegistry) -> None:
    """Add the basic commands (first, so ``query-commands`` lists them last, as QEMU)."""
    registry.add("qmp_capabilities", qmp_capabilities, [Member("enable", List(QMP_CAPABILITY), optional=True)])
    registry.add("query-version", query_version)
    registry.add("query-commands", query_commands)
    registry.add("quit", quit_)
