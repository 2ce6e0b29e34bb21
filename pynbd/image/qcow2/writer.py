"""Writes to the top image of a qcow2 chain that keep it a valid qcow2 (qcow2 spec,
'Cluster mapping' and 'Host cluster management').

Thread model: :class:`Qcow2Writer` runs in worker threads (the server's WRITE,
WRITE_ZEROES, TRIM and FLUSH handlers). Lookups and changes of the in-memory
metadata (L1, L2 entries, refcounts) happen under the image's ``metadata_lock``,
held briefly and never across data I/O, so the event loop's readers are not held
up. Changes of the mapping (allocating, zeroing, freeing clusters) are serialised
by ``_mapping_lock``; data written to clusters already allocated to the guest
(COPIED) goes in place, in parallel.

Crash safety: changed L2 tables and L1 entries stay in memory (L2 tables pinned in
the cache) until :meth:`Qcow2Writer.flush`, which writes in dependency order, each
stage synced before the next: data, then refcount increments (new clusters), then
L2 tables, then L1 entries, then refcount decrements (freed clusters). A crash at
any point leaves the image as of the last flush plus at most leaked clusters
(refcount 1, no reference); a freed cluster is reused only after its free is
durable, and not while a read's lease pins it (:mod:`pynbd.image.leases`). Backing
files are never written.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from array import array
from typing import TYPE_CHECKING

from pynbd.image.base import FastZeroUnsupported, ImageIOError
from pynbd.image.qcow2.compression import compressed_range
from pynbd.image.qcow2.header import INCOMPAT_DIRTY
from pynbd.image.qcow2.l2cache import Table, TableCache
from pynbd.image.qcow2.layer import (
    L1E_OFFSET_MASK,
    L2E_OFFSET_MASK,
    OFLAG_COMPRESSED,
    OFLAG_COPIED,
    OFLAG_ZERO,
    Qcow2Layer,
)
from pynbd.image.qcow2.refcounts import Refcounts

if TYPE_CHECKING:
    from pynbd.image.qcow2.image import Qcow2Image

log = logging.getLogger(__name__)


class Qcow2Writer:
    """The write path of one qcow2 image (see the module doc). ``image`` is the
    :class:`~pynbd.image.qcow2.image.Qcow2Image` whose top layer it writes; ``fd`` a
    read-write descriptor of the top file (the writer owns it)."""

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
        self.cache: TableCache = image.cache
        self.lock: threading.RLock = image.metadata_lock
        self.refcounts = Refcounts(fd, self.path, top.header, os.fstat(fd).st_size, image.leases)
        #: Serialises changes of the mapping (allocations, zeroing, frees, flushes).
        self._mapping_lock = threading.Lock()
        #: In-place data writes running: frees are applied only when none is (a write that
        #: looked its cluster up before a trim freed it must land before the cluster is reused).
        self._in_place = 0
        self._in_place_done = threading.Condition(threading.Lock())
        #: L2 tables changed in memory (pinned in the cache until written), by cache key.
        self._dirty_tables: dict[tuple[int, int], Table] = {}
        self._dirty_l1: set[int] = set()
        self._zero_cluster = bytes(cs)

    # -- mapping ----------------------------------------------------------------------------

    def _table_for(self, guest: int, create: bool, load: bool = True) -> tuple[Table | None, int]:
        """The L2 table mapping guest offset ``guest`` and the entry's index in it; a new
        (zeroed) table is allocated when ``create`` and the L1 entry is empty; with
        ``load`` False, None for a table not in the cache. Under the metadata lock."""
        top = self.top
        l1_index = guest >> (self.cluster_bits + self.l2_bits)
        index = (guest >> self.cluster_bits) & ((1 << self.l2_bits) - 1)
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

    def _entry(self, guest: int) -> int:
        with self.lock:
            table, index = self._table_for(guest, create=False)
            return table.entries[index] if table is not None else 0

    def _set_entry(self, guest: int, entry: int) -> int:
        """Map guest cluster ``guest`` with ``entry``; returns the entry it replaced. Under the
        metadata lock (taken here)."""
        with self.lock:
            table, index = self._table_for(guest, create=True)
            assert table is not None
            old = table.entries[index]
            table.entries[index] = entry
            self._mark(table)
            return old

    def _release(self, entry: int) -> None:
        """Free what a replaced entry pointed at (deferred until the new mapping is durable)."""
        if entry & OFLAG_COMPRESSED:
            rng = compressed_range(entry, self.cluster_bits)
            with self.lock:
                self.refcounts.free_bytes(rng.offset, rng.length)
            return
        host = entry & L2E_OFFSET_MASK
        if host:
            with self.lock:
                self.refcounts.free(host, 1)

    # -- writes -----------------------------------------------------------------------------

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write guest bytes (in a worker thread). Raises ImageIOError on I/O errors."""
        self._write_clusters(offset, data, locked=False)

    def _write_clusters(self, offset: int, data: bytes | memoryview, locked: bool) -> None:
        """Write cluster by cluster; ``locked``: the caller holds the mapping lock. Whole
        clusters that all need new host clusters in a row get them in one allocation and
        one write (a sequential copy into an empty image)."""
        view = memoryview(data)
        cs = self.cluster_size
        pos = 0
        while pos < len(view):
            guest = offset + pos
            start = guest & (cs - 1)
            n = min(cs - start, len(view) - pos)
            whole = (len(view) - pos) // cs if not start else 0
            if whole > 1:
                if self._write_in_place(guest, 0, view[pos:pos + cs]):
                    pos += cs
                    continue
                if locked:
                    done = self._allocate_run(guest, view[pos:pos + whole * cs])
                else:
                    with self._mapping_lock:
                        done = self._allocate_run(guest, view[pos:pos + whole * cs])
                pos += done
                continue
            if locked:
                self._write_cluster_locked(guest - start, start, view[pos:pos + n])
            else:
                self._write_cluster(guest - start, start, view[pos:pos + n])
            pos += n

    def _allocate_run(self, guest: int, data: memoryview) -> int:
        """With the mapping lock: new host clusters for the whole clusters from ``guest`` that
        need one (unallocated, zero, compressed or shared), as many in a row as there are,
        written at once; returns the bytes written (at least one cluster)."""
        cs = self.cluster_size
        count = len(data) // cs
        entries = []
        for i in range(count):
            entry = self._entry(guest + i * cs)
            if self._in_place_ok(entry) or (entry & OFLAG_ZERO and entry & OFLAG_COPIED
                                            and entry & L2E_OFFSET_MASK):
                break
            entries.append(entry)
        if not entries:
            self._write_cluster_locked(guest, 0, data[:cs])
            return cs
        with self.lock:
            host = self.refcounts.allocate(len(entries))
        self._pwrite(data[:len(entries) * cs], host)
        for i, _ in enumerate(entries):
            self._release(self._set_entry(guest + i * cs, (host + i * cs) | OFLAG_COPIED))
        return len(entries) * cs

    def write_now(self, offset: int, data: bytes | memoryview) -> bool:
        """The whole write in place, now, if every cluster it touches is allocated to this
        image alone and the metadata lock is free (True); else nothing (False). On the
        event loop thread: it never waits for a lock another thread holds long."""
        cs = self.cluster_size
        end = offset + len(data)
        if not self.lock.acquire(blocking=False):
            return False
        try:
            hosts = []
            for cluster in range(offset - (offset & (cs - 1)), end, cs):
                table, index = self._table_for(cluster, create=False, load=False)
                entry = table.entries[index] if table is not None else 0
                if not self._in_place_ok(entry):
                    hosts = None
                    break
                hosts.append(entry & L2E_OFFSET_MASK)
            else:
                self._claim(len(hosts))
        finally:
            self.lock.release()
        if hosts is None:
            # Clusters to allocate: now too, unless a flush or another allocation runs.
            if not self._mapping_lock.acquire(blocking=False):
                return False
            try:
                self._write_clusters(offset, data, locked=True)
            finally:
                self._mapping_lock.release()
            return True
        view = memoryview(data)
        pos = 0
        try:
            for host in hosts:
                start = (offset + pos) & (cs - 1)
                n = min(cs - start, len(view) - pos)
                self._pwrite(view[pos:pos + n], host + start)
                pos += n
        finally:
            self._unclaim(len(hosts))
        return True

    def _write_cluster(self, cluster: int, start: int, data: memoryview) -> None:
        if self._write_in_place(cluster, start, data):
            return
        with self._mapping_lock:
            self._write_cluster_locked(cluster, start, data)

    def _write_cluster_locked(self, cluster: int, start: int, data: memoryview) -> None:
        """With the mapping lock: in place if the cluster has its own host cluster (another
        write may have allocated it meanwhile), else a new one."""
        if not self._write_in_place(cluster, start, data):
            entry = self._entry(cluster)
            if entry & OFLAG_ZERO and entry & OFLAG_COPIED and entry & L2E_OFFSET_MASK:
                self._fill_zero_cluster(cluster, entry, start, data)
            else:
                self._allocate_and_write(cluster, entry, start, data)

    def _in_place_ok(self, entry: int) -> bool:
        """A normal cluster owned by this image alone (COPIED), not a zero cluster."""
        return bool(entry & OFLAG_COPIED) and not entry & (OFLAG_COMPRESSED | OFLAG_ZERO) \
            and bool(entry & L2E_OFFSET_MASK)

    def _write_in_place(self, cluster: int, start: int, data: memoryview) -> bool:
        """Write into the cluster's own host cluster if it has one (True), else nothing."""
        with self.lock:
            entry = self._entry(cluster)
            if not self._in_place_ok(entry):
                return False
            self._claim(1)
        try:
            self._pwrite(data, (entry & L2E_OFFSET_MASK) + start)
        finally:
            self._unclaim(1)
        return True

    def _claim(self, n: int) -> None:
        """In-place writes start (under the metadata lock, with their lookup): no free is
        applied until they are done (flush), so their clusters are not reused under them."""
        with self._in_place_done:
            self._in_place += n

    def _unclaim(self, n: int) -> None:
        with self._in_place_done:
            self._in_place -= n
            self._in_place_done.notify_all()

    def _fill_zero_cluster(self, cluster: int, entry: int, start: int, data: memoryview) -> None:
        """A write to an allocated cluster flagged zero (left by WRITE_ZEROES with NO_HOLE):
        zeros and ``data`` into its own host cluster, then the flag goes. With the mapping lock."""
        buf = bytearray(self.cluster_size)
        buf[start:start + len(data)] = data
        self._pwrite(buf, entry & L2E_OFFSET_MASK)
        self._set_entry(cluster, entry & ~OFLAG_ZERO)

    def _current(self, cluster: int) -> bytes:
        """What guest cluster ``cluster`` reads now, a whole cluster (zeros past the end)."""
        cs = self.cluster_size
        n = min(cs, self.image.size - cluster)
        data = self.image.read(cluster, n)
        return data if n == cs else data + bytes(cs - n)

    def _allocate_and_write(self, cluster: int, entry: int, start: int, data: memoryview) -> None:
        """Copy-on-write into a new cluster: the cluster's current content (backing file,
        zeros, a compressed or shared cluster) with ``data`` over it. With the mapping lock."""
        cs = self.cluster_size
        whole = start == 0 and len(data) == cs
        # Unallocated with nothing below, or a zero cluster: its content is zeros.
        known_zero = entry == OFLAG_ZERO or (not entry and not self.has_backing)
        current = b"" if whole else self._zero_cluster if known_zero else self._current(cluster)
        with self.lock:
            host = self.refcounts.allocate(1)
        fresh = host >= os.fstat(self.fd).st_size
        if whole:
            self._pwrite(data, host)
        elif fresh and (known_zero or current.count(0) == cs):
            # Only the bytes written: the rest of a cluster past the end of the file reads
            # as zeros (a hole in the host file, as QEMU leaves it).
            self._pwrite(data, host + start)
        else:
            buf = bytearray(current)
            buf[start:start + len(data)] = data
            self._pwrite(buf, host)
        old = self._set_entry(cluster, host | OFLAG_COPIED)
        self._release(old)

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fast: bool = False) -> None:
        """Make the range read as zeros (NBD_CMD_WRITE_ZEROES): whole clusters by the zero
        flag (v3) or by unmapping them (v2 without a backing file, when ``may_trim``),
        the rest by writing zeros. With ``fast``, FastZeroUnsupported before anything
        changes when zeros would have to be written."""
        cs = self.cluster_size
        end = offset + length
        first, last = self._whole_clusters(offset, end)
        by_metadata = first < last and (self.zero_flag or (may_trim and not self.has_backing))
        edges = [(offset, min(end, first) - offset), (max(last, offset), end - max(last, offset))]
        if not by_metadata:
            edges = [(offset, length)]
            first = last = 0
        slow = any(n > 0 for _, n in edges)
        if fast and slow:
            raise FastZeroUnsupported(f"{self.path}: zeroing {offset}+{length} means writing zeros")
        for pos, n in edges:
            if n > 0:
                self._write_zeros(pos, n)
        with self._mapping_lock:
            for cluster in range(first, last, cs):
                self._zero_cluster_entry(cluster, may_trim)

    def _whole_clusters(self, offset: int, end: int) -> tuple[int, int]:
        """The clusters wholly inside ``[offset, end)`` as ``[first, last)`` offsets; the
        image's last cluster counts as whole when the range reaches the end of the image
        (its part past the virtual size is never read), as in QEMU."""
        cs = self.cluster_size
        first = -(-offset // cs) * cs
        last = -(-end // cs) * cs if end >= self.image.size else end // cs * cs
        return first, max(first, last)

    def _write_zeros(self, offset: int, length: int) -> None:
        cs = self.cluster_size
        pos = offset
        end = offset + length
        while pos < end:
            n = min(end - pos, cs - (pos & (cs - 1)) if pos & (cs - 1) else cs)
            self.write(pos, self._zero_cluster[:n])
            pos += n

    def _zero_cluster_entry(self, cluster: int, may_trim: bool) -> None:
        """One whole cluster reads as zeros from now on (with the mapping lock)."""
        entry = self._entry(cluster)
        if not self.zero_flag:  # v2: no backing file here (see write_zeroes)
            if entry:
                self._release(self._set_entry(cluster, 0))
            return
        if not may_trim and self._in_place_ok(entry & ~OFLAG_ZERO):
            # NO_HOLE: the cluster stays allocated, flagged zero (qcow2 v3 'zero flag').
            if not entry & OFLAG_ZERO:
                self._set_entry(cluster, entry | OFLAG_ZERO)
            return
        if entry == OFLAG_ZERO:
            return
        self._release(self._set_entry(cluster, OFLAG_ZERO))

    def trim(self, offset: int, length: int) -> None:
        """NBD_CMD_TRIM: whole clusters are freed, reading as zeros where a backing file
        would show through (v3 zero flag; v2 keeps them), as QEMU's discard does; partial
        clusters are left as they are."""
        cs = self.cluster_size
        first, last = self._whole_clusters(offset, offset + length)
        with self._mapping_lock:
            for cluster in range(first, last, cs):
                entry = self._entry(cluster)
                if self.has_backing:
                    if not self.zero_flag:
                        continue
                    new = OFLAG_ZERO
                else:
                    new = 0
                if entry != new:
                    self._release(self._set_entry(cluster, new))

    # -- durability -------------------------------------------------------------------------

    def flush(self) -> None:
        """Make every completed write durable, metadata in dependency order (module doc)."""
        with self._mapping_lock:
            self._sync()
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
            with self._in_place_done:
                while self._in_place:
                    self._in_place_done.wait()
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
            images = []
            for table in dirty:
                entries = array("Q", table.entries)
                if sys.byteorder == "little":
                    entries.byteswap()
                images.append((entries.tobytes(), table.key[1], table))
        for raw, l2_offset, table in images:
            self._pwrite(raw, l2_offset)
            self.cache.unpin(table)

    def _write_l1(self) -> None:
        top = self.top
        base = top.header.l1_table_offset
        with self.lock:
            indices = sorted(self._dirty_l1)
            self._dirty_l1.clear()
            values = [(i, top.l1[i]) for i in indices]
        for i, value in values:
            self._pwrite(value.to_bytes(8, "big"), base + 8 * i)

    def _sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise ImageIOError(f"{self.path}: cannot sync: {exc.strerror}", exc.errno) from None

    def _pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self.fd, view, offset)
                view = view[n:]
                offset += n
        except OSError as exc:
            raise ImageIOError(f"{self.path}: cannot write at {offset:#x}: {exc.strerror}",
                               exc.errno) from None
        top = self.top
        if offset > top.data_file_size:
            # Readers take bytes past the file's end as zeros: they must see it grow.
            top.data_file_size = top.file_size = offset

    def close(self) -> None:
        """Flush, then release the descriptor."""
        try:
            self.flush()
        finally:
            os.close(self.fd)


def writable_problem(image: Qcow2Image) -> str | None:
    """Why pynbd cannot write this image yet (None: it can)."""
    top = image.top
    if top.extended_l2:
        return "it has extended L2 entries"
    if top.has_data_file:
        return "it has an external data file"
    if top.header.incompatible_features & INCOMPAT_DIRTY:
        return "its dirty bit is set (lazy refcounts: repair it with qemu-img check -r all)"
    return None
