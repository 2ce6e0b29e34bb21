"""The metadata side of a qcow2 writer: the L1 and L2 entries it changes in memory and
their write-back in dependency order (qcow2 spec, 'Cluster mapping'; the order is
:mod:`pynbd.image.qcow2.writer`'s module doc), the files written (the qcow2 file, and
an external data file where data clusters live, :mod:`pynbd.image.qcow2.datafile`),
and the accounting of in-place data writes that frees wait for.

:class:`MetadataWriteBack` is the base of :class:`~pynbd.image.qcow2.writer.Qcow2Writer`;
its methods run in the writer's worker threads (lookups also on the event loop thread,
under the image's metadata lock) and say which locks they take or need.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

from pynbd.image.base import ImageIOError
from pynbd.image.qcow2 import datafile
from pynbd.image.qcow2.census import u64s_be
from pynbd.image.qcow2.l2cache import Table, TableCache
from pynbd.image.qcow2.layer import L1E_OFFSET_MASK, OFLAG_COPIED, Qcow2Layer
from pynbd.image.qcow2.refcounts import Refcounts

if TYPE_CHECKING:
    from pynbd.image.qcow2.image import Qcow2Image

#: An L2 entry and its subcluster bitmap (0 in a standard image).
Pair = tuple[int, int]


class MetadataWriteBack:
    """Files, locks and pending metadata of the writer of ``image``'s top layer; ``fd`` a
    read-write descriptor of the top file (owned from now on). An external data file is
    opened for writing and locked here (ImageError when it cannot be)."""

    def __init__(self, image: Qcow2Image, fd: int) -> None:
        top: Qcow2Layer = image.top
        self.image = image
        self.top = top
        self.fd = fd
        self.path = top.path
        self.cluster_size = cs = top.cluster_size
        self.cluster_bits = top.cluster_bits
        self.l2_bits = top.l2_bits
        self.zero_flag = top.zero_flag_allowed
        self.has_backing = len(image.layers) > 1
        #: 64-bit words per L2 entry: 2 with extended L2 entries (entry, subcluster bitmap).
        self.words = 2 if top.extended_l2 else 1
        self.external = top.has_data_file
        self.data_raw = top.header.data_file_raw
        self.cache: TableCache = image.table_cache
        self.lock: threading.RLock = image.metadata_lock
        self.refcounts = Refcounts(fd, self.path, top.header, os.fstat(fd).st_size, image.leases)
        self.data_path = top.data_file_path or self.path
        #: Where data clusters are written: the data file's own descriptor, or ``fd``.
        self.data_fd = datafile.open_writable(self.data_path) if self.external else fd
        #: Serialises changes of the mapping (allocations, zeroing, frees, flushes).
        self._mapping_lock = threading.Lock()
        #: In-place data writes running: frees are applied only when none is (a write that
        #: looked its cluster up before a trim freed it must land before the cluster is reused).
        #: (Counted under the metadata lock: a write claims with its lookup, no lock more.)
        self._in_place = 0
        self._in_place_waiters = 0
        self._in_place_done = threading.Condition(self.lock)
        #: L2 tables changed in memory (pinned in the cache until written), by cache key.
        self._dirty_tables: dict[tuple[int, int], Table] = {}
        self._dirty_l1: set[int] = set()
        self._zero_cluster = bytes(cs)

    # -- the mapping in memory ------------------------------------------------------------

    def _table_for(self, guest: int, create: bool, load: bool = True) -> tuple[Table | None, int]:
        """The L2 table mapping guest offset ``guest`` and the index of the entry's first
        word in it; a new (zeroed) table is allocated when ``create`` and the L1 entry is
        empty; with ``load`` False, None for a table not in the cache. Under the metadata lock."""
        top = self.top
        l1_index = guest >> (self.cluster_bits + self.l2_bits)
        index = ((guest >> self.cluster_bits) & ((1 << self.l2_bits) - 1)) * self.words
        l2_offset = top.l1[l1_index] & L1E_OFFSET_MASK
        if not l2_offset:
            if not create:
                return None, index
            l2_offset = self.refcounts.allocate(1)
            table = self.cache.put(top._id, l2_offset, self._zero_cluster)
            top.l1[l1_index] = l2_offset | OFLAG_COPIED
            self._dirty_l1.add(l1_index)
            self._mark(table)
            return table, index
        if not load:
            return self.cache.peek(top._id, l2_offset), index
        return top._l2_table(l1_index, l2_offset), index

    def _mark(self, table: Table) -> None:
        if table.key not in self._dirty_tables:
            self._dirty_tables[table.key] = table
            self.cache.pin(table)

    def _pair(self, guest: int) -> Pair:
        """The entry mapping guest cluster ``guest`` and its subcluster bitmap (0 without
        extended L2). Takes the metadata lock."""
        with self.lock:
            table, index = self._table_for(guest, create=False)
            if table is None:
                return 0, 0
            return table.entries[index], table.entries[index + 1] if self.words == 2 else 0

    def _entry(self, guest: int) -> int:
        return self._pair(guest)[0]

    def _set_pair(self, guest: int, entry: int, bitmap: int = 0) -> Pair:
        """Map guest cluster ``guest`` with ``entry`` (and ``bitmap`` with extended L2);
        returns what it replaced. Takes the metadata lock."""
        with self.lock:
            table, index = self._table_for(guest, create=True)
            assert table is not None
            entries = table.entries
            old = entries[index], entries[index + 1] if self.words == 2 else 0
            entries[index] = entry
            if self.words == 2:
                entries[index + 1] = bitmap
            self._mark(table)
            return old

    # -- in-place writes ---------------------------------------------------------------------

    def _claim(self, n: int) -> None:
        """In-place writes start (under the metadata lock, with their lookup): no free is
        applied until they are done (flush), so their clusters are not reused under them."""
        self._in_place += n

    def _unclaim(self, n: int) -> None:
        with self.lock:
            self._in_place -= n
            if not self._in_place and self._in_place_waiters:
                self._in_place_done.notify_all()

    def _wait_in_place(self) -> None:
        """Until no in-place write is running (none can start on a cluster just unmapped).
        Releases the metadata lock while it waits, if the caller holds it."""
        with self.lock:
            self._in_place_waiters += 1
            try:
                while self._in_place:
                    self._in_place_done.wait()
            finally:
                self._in_place_waiters -= 1

    # -- durability -------------------------------------------------------------------------

    def flush(self) -> None:
        """Make every completed write durable, metadata in dependency order (module doc)."""
        with self._mapping_lock:
            self._sync(self.data_fd, self.data_path)
            with self.lock:
                allocations = self.refcounts.allocations_pending
                if allocations:
                    self.refcounts.write_allocations()
            if allocations:
                self._sync()
            if self._dirty_tables:
                self._write_tables()
                self._sync()
            if self._dirty_l1:
                self._write_l1()
                self._sync()
            # No in-place write started before its cluster was unmapped still runs; later
            # ones cannot find a cluster freed here (no free is recorded during a flush).
            self._wait_in_place()
            with self.lock:
                frees = self.refcounts.frees_pending
                if frees:
                    self.refcounts.apply_frees()
            if frees:
                self._sync()

    def _write_tables(self) -> None:
        with self.lock:
            dirty = list(self._dirty_tables.values())
            self._dirty_tables.clear()
            images = [(u64s_be(table.entries), table.key[1], table) for table in dirty]
        for raw, l2_offset, table in images:
            self._write_meta(raw, l2_offset)
            self.cache.unpin(table)

    def _write_l1(self) -> None:
        top = self.top
        base = top.header.l1_table_offset
        with self.lock:
            indices = sorted(self._dirty_l1)
            self._dirty_l1.clear()
            values = [(i, top.l1[i]) for i in indices]
        for i, value in values:
            self._write_meta(value.to_bytes(8, "big"), base + 8 * i)

    def _sync(self, fd: int | None = None, path: str | None = None) -> None:
        """fdatasync the qcow2 file (or ``fd``, the data file at ``path``)."""
        try:
            os.fdatasync(self.fd if fd is None else fd)
        except OSError as exc:
            raise ImageIOError(f"{path or self.path}: cannot sync: {exc.strerror}", exc.errno) from None

    def _write_data(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Guest data to host ``offset`` of the file data clusters live in."""
        end = self._pwrite(self.data_fd, self.data_path, data, offset)
        top = self.top
        if end > top.data_file_size:
            # Readers take bytes past the file's end as zeros: they must see it grow.
            top.data_file_size = end
            if not self.external:
                top.file_size = end

    def _write_meta(self, data: bytes, offset: int) -> None:
        """Metadata (L2 tables, L1 entries) to the qcow2 file."""
        end = self._pwrite(self.fd, self.path, data, offset)
        top = self.top
        if end > top.file_size:
            top.file_size = end
            if not self.external:
                top.data_file_size = end

    @staticmethod
    def _pwrite(fd: int, path: str, data: bytes | bytearray | memoryview, offset: int) -> int:
        """All of ``data`` at ``offset``; returns where it ended. ImageIOError on failure."""
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(fd, view, offset)
                view = view[n:]
                offset += n
        except OSError as exc:
            raise ImageIOError(f"{path}: cannot write at {offset:#x}: {exc.strerror}",
                               exc.errno) from None
        return offset

    def close(self) -> None:
        """Flush, then release the descriptors."""
        try:
            self.flush()
        finally:
            os.close(self.fd)
            if self.external:
                os.close(self.data_fd)
