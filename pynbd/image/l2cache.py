"""A bounded LRU cache of qcow2 metadata tables (L2 tables).

Tables are kept as ``array('Q')`` in host byte order: one machine word per
entry, exactly as many bytes as on disk, and indexing is a C operation. The
cache is shared by every layer of a backing chain and bounded in bytes, so
memory stays bounded whatever the image size (qcow2-format.md §3).
"""

from __future__ import annotations

import logging
import sys
from array import array
from collections import OrderedDict
from collections.abc import Callable
from threading import Lock

log = logging.getLogger(__name__)

#: Default budget: 32 MiB of tables (512 L2 tables of 64 KiB = 256 GiB mapped).
DEFAULT_CACHE_BYTES = 32 << 20


class Table:
    """One cached table: its entries and whether all of them are zero."""

    __slots__ = ("entries", "all_zero")

    def __init__(self, raw: bytes) -> None:
        entries = array("Q")
        entries.frombytes(raw)
        if sys.byteorder == "little":
            entries.byteswap()  # qcow2 is big-endian
        self.entries = entries
        self.all_zero = raw.count(0) == len(raw)


class TableCache:
    """LRU of :class:`Table` keyed by ``(owner, host_offset)``; thread safe."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._bytes = 0
        self._tables: OrderedDict[tuple[int, int], Table] = OrderedDict()
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
        table = Table(load())  # I/O outside the lock; a racing load is harmless
        size = len(table.entries) * 8
        with self._lock:
            self.misses += 1
            if key not in self._tables:
                self._tables[key] = table
                self._bytes += size
                while self._bytes > self.max_bytes and len(self._tables) > 1:
                    _, old = self._tables.popitem(last=False)
                    self._bytes -= len(old.entries) * 8
        return table

    def drop_owner(self, owner: int) -> None:
        """Forget every table of one layer (when it is closed)."""
        with self._lock:
            for key in [k for k in self._tables if k[0] == owner]:
                self._bytes -= len(self._tables.pop(key).entries) * 8

    @property
    def size_bytes(self) -> int:
        return self._bytes
