"""Meta-context names and the LIST vs SET query rules (NBD spec "Metadata querying").

Which contexts an export has is decided by the server's context registry; this
module only decides which of those names a client's query selects.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

BASE_ALLOCATION = "base:allocation"
QEMU_ALLOCATION_DEPTH = "qemu:allocation-depth"
QEMU_DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:"


def dirty_bitmap_context(name: str) -> str:
    return QEMU_DIRTY_BITMAP_PREFIX + name


def bitmap_of_context(context: str) -> str | None:
    """The bitmap a ``qemu:dirty-bitmap:NAME`` context names (None for other contexts)."""
    return context[len(QEMU_DIRTY_BITMAP_PREFIX):] if context.startswith(QEMU_DIRTY_BITMAP_PREFIX) else None


def _is_wildcard(query: str) -> bool:
    """``ns:`` or ``ns:sub:`` queries that LIST expands (NBD_OPT_LIST_META_CONTEXT in NBD spec
    "Option types"; QEMU docs/interop/nbd.rst, "qemu namespace")."""
    return query.endswith(":") and query.index(":") > 0


def match_query(query: str, available: Sequence[str], listing: bool) -> list[str]:
    """The context names ``query`` selects among ``available``.

    SET (``listing=False``) selects only exact names. LIST also expands a
    query ending in ``:`` to every available name it prefixes, so ``base:``,
    ``qemu:`` and ``qemu:dirty-bitmap:`` list their sets. Queries without a
    namespace (no colon, empty) and unknown names select nothing: the spec
    says ignore them, not fail.
    """
    if ":" not in query or query.startswith(":"):
        return []
    if listing and _is_wildcard(query):
        return [name for name in available if name.startswith(query) and name != query]
    return [query] if query in available else []


def resolve_queries(queries: Iterable[str], available: Sequence[str], listing: bool) -> list[str]:
    """All names the queries select, each once, in the export's listing order (a duplicate query
    selects nothing more, as with qemu-nbd)."""
    chosen: set[str] = set()
    for query in queries:
        chosen.update(match_query(query, available, listing))
    return [name for name in available if name in chosen]
