"""A bounded LRU cache of qcow2 metadata tables (L2 tables).

Tables are kept as ``array('Q')`` in host byte order: one machine word per
entry, exactly as many bytes as on disk, and indexing is a C operation. The
cache is shared by every layer of a backing chain and bounded in bytes, so
memory stays bounded whatever the image size (qcow2 spec, 'Cluster mapping').
"""

from __future__ import annotations

import logging
import sys
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable
from threading import Lock

log = logging.getLogger(__name__)

#: Default budget: 32 MiB of tables (512 L2 tables of 64 KiB = 256 GiB mapped).
DEFAULT_CACHE_BYTES = 32 << 20


def all_zero(data: bytes | array) -> bool:
    """Whether every byte of ``data`` is zero (a comparison in C that stops at the first other byte)."""
    raw = data.tobytes() if isinstance(data, array) else data
    return raw == bytes(len(raw))


class Table:
    """One cached table: its entries, whether all of them are zero, and what was derived from it.

    ``entries`` are the authority (a writer updates them in place, under the image's
    metadata lock); ``all_zero`` and ``derived`` are computed from them and renewed
    by :meth:`TableCache.forget_derived` when the table's guest span changes.
    """

    __slots__ = ("key", "entries", "all_zero", "derived", "derived_nbytes", "nbytes")

    def __init__(self, key: tuple[int, int], raw: bytes) -> None:
        self.key = key
        entries = array("Q")
        entries.frombytes(raw)
        if sys.byteorder == "little":
            entries.byteswap()  # qcow2 is big-endian
        self.entries = entries
        self.all_zero = all_zero(raw)
        #: Something computed once from the entries (the layer's run
        #: classification), kept as long as the table and counted in the budget.
        self.derived: object = None
        #: What ``derived`` counts in the budget (included in ``nbytes``).
        self.derived_nbytes = 0
        self.nbytes = len(raw)


class TableCache:
    """LRU of :class:`Table` keyed by ``(owner, host_offset)``; thread safe."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._bytes = 0
        self._tables: OrderedDict[tuple[int, int], Table] = OrderedDict()
        #: Tables changed in memory and not yet written (a writer's): never evicted.
        self._pinned: set[tuple[int, int]] = set()
        self._lock = Lock()
        self.hits = 0
        self.misses = 0

    def get(self, owner: int, offset: int, load: Callable[[], bytes]) -> Table:
        """Return the table at ``offset`` of ``owner``, calling ``load()`` on a miss."""
        key = (owner, offset)
        with self._lock:
            table = self._tables.get(key)
            if table is not None:
                self._tables.move_to_end(key)
                self.hits += 1
                return table
        table = Table(key, load())  # I/O outside the lock; a racing load is harmless
        with self._lock:
            self.misses += 1
            if key not in self._tables:
                self._tables[key] = table
                self._bytes += table.nbytes
                self._evict()
        return table

    def attach(self, table: Table, derived: object, nbytes: int) -> None:
        """Keep ``derived`` with ``table`` (first caller wins), counting ``nbytes`` against the budget."""
        with self._lock:
            if table.derived is not None:
                return
            table.derived = derived
            table.derived_nbytes = nbytes
            table.nbytes += nbytes
            if self._tables.get(table.key) is table:
                self._bytes += nbytes
                self._evict()
            # else: already evicted; the object lives as long as its user holds it

    def forget_derived(self, owner: int, offsets: Iterable[int]) -> None:
        """Drop what was derived from the cached tables of ``owner`` at ``offsets`` (their
        entries changed or will): ``derived`` goes, ``all_zero`` becomes False ("look at
        the entries"). The entries stay; tables not cached are skipped."""
        with self._lock:
            for offset in offsets:
                self._forget_derived(self._tables.get((owner, offset)))

    def forget_derived_of(self, owner: int, offset: int) -> None:
        """:meth:`forget_derived` of one table (a change inside one table's span: most)."""
        with self._lock:
            self._forget_derived(self._tables.get((owner, offset)))

    def _forget_derived(self, table: Table | None) -> None:
        if table is None:
            return
        # (Not computed again here: that is a pass over the table per change. False
        # only means "look at the entries", which is right whatever they hold.)
        table.all_zero = False
        if table.derived is not None:
            table.derived = None
            table.nbytes -= table.derived_nbytes
            self._bytes -= table.derived_nbytes
            table.derived_nbytes = 0

    def cached(self, owner: int) -> list[Table]:
        """The tables of ``owner`` in the cache now (for tests and statistics)."""
        with self._lock:
            return [table for key, table in self._tables.items() if key[0] == owner]

    def peek(self, owner: int, offset: int) -> Table | None:
        """The table if it is cached (no load, no change of its place in the LRU)."""
        with self._lock:
            return self._tables.get((owner, offset))

    def put(self, owner: int, offset: int, raw: bytes) -> Table:
        """Cache a table made in memory (a new L2 table) and return it."""
        table = Table((owner, offset), raw)
        with self._lock:
            old = self._tables.pop(table.key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._tables[table.key] = table
            self._bytes += table.nbytes
            self._evict()
        return table

    def pin(self, table: Table) -> None:
        """Keep ``table`` cached until :meth:`unpin`: its entries changed and are not written yet."""
        with self._lock:
            self._pinned.add(table.key)

    def unpin(self, table: Table) -> None:
        with self._lock:
            self._pinned.discard(table.key)

    def _evict(self) -> None:
        tables = self._tables
        skipped = 0
        while self._bytes > self.max_bytes and len(tables) - skipped > 1:
            key, old = tables.popitem(last=False)
            if key in self._pinned:
                tables[key] = old  # (to the most recent end: looked at again after the others)
                skipped += 1
                continue
            self._bytes -= old.nbytes

    def drop_owner(self, owner: int) -> None:
        """Forget every table of one layer (when it is closed)."""
        with self._lock:
            for key in [k for k in self._tables if k[0] == owner]:
                self._bytes -= self._tables.pop(key).nbytes

    @property
    def size_bytes(self) -> int:
        return self._bytes
