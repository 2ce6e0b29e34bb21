"""Writes to the top image of a qcow2 chain that keep it a valid qcow2 (qcow2 spec,
'Cluster mapping' and 'Host cluster management').

Thread model: :class:`Qcow2Writer` runs in worker threads (the server's WRITE,
WRITE_ZEROES, TRIM and FLUSH handlers). Lookups and changes of the in-memory
metadata (L1, L2 entries, refcounts) happen under the image's ``metadata_lock``,
held briefly and never across data I/O, so the event loop's readers are not held
up. Changes of the mapping (allocating, zeroing, freeing clusters) are serialised
by ``_mapping_lock``; data written to clusters already allocated to the guest
(COPIED) goes in place, in parallel.

Data clusters live in the qcow2 file, refcounted, or in an external data file
(qcow2 spec, 'External data file'; :mod:`pynbd.image.qcow2.datafile`): there guest
cluster N is at N * cluster_size, not refcounted, its L2 entry still COPIED, and a
cluster the mapping drops is discarded from the data file at once (with
``data_file_raw``, zeroed: that file stays the guest's raw image). Images with
extended L2 entries are written by the subclass in :mod:`pynbd.image.qcow2.subclusters`.

Crash safety: changed L2 tables and L1 entries stay in memory (L2 tables pinned in
the cache) until :meth:`Qcow2Writer.flush` (:mod:`pynbd.image.qcow2.writeback`),
which writes in dependency order, each stage synced before the next: data (the data
file first), then refcount increments (new clusters), then L2 tables, then L1
entries, then refcount decrements (freed clusters). A crash at any point leaves the
image as of the last flush plus at most leaked clusters (refcount 1, no reference); a
freed cluster is reused only after its free is durable, and not while a read's lease
pins it (:mod:`pynbd.image.leases`). Backing files are never written.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from pynbd.image.base import FastZeroUnsupported
from pynbd.image.qcow2 import datafile
from pynbd.image.qcow2.compression import compressed_range
from pynbd.image.qcow2.layer import L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO
from pynbd.image.qcow2.writeback import MetadataWriteBack, Pair

if TYPE_CHECKING:
    from array import array


class Qcow2Writer(MetadataWriteBack):
    """The write path of one qcow2 image (see the module doc). ``image`` is the
    :class:`~pynbd.image.qcow2.image.Qcow2Image` whose top layer it writes; ``fd`` a
    read-write descriptor of the top file (the writer owns it). An external data file
    is opened for writing and locked here (ImageError when it cannot be)."""

    # -- mapping ----------------------------------------------------------------------------

    def _has_own_host(self, entry: int) -> bool:
        """The entry has a host cluster owned by this image alone (COPIED), flagged zero or
        not; in an external data file offset 0 is guest cluster 0's (qcow2 spec)."""
        return bool(entry & OFLAG_COPIED) and not entry & OFLAG_COMPRESSED and (
            bool(entry & L2E_OFFSET_MASK) or self.external)

    def _allocated(self, entry: int) -> bool:
        """Anything in the host file: a host cluster (shared or not, zero flag or not) or
        compressed data (QEMU's ``qcow2_cluster_is_allocated``)."""
        return bool(entry & (OFLAG_COMPRESSED | L2E_OFFSET_MASK)) or (
            self.external and bool(entry & OFLAG_COPIED))

    def _in_place_ok(self, entry: int) -> bool:
        """A normal cluster owned by this image alone (COPIED), not a zero cluster."""
        return self._has_own_host(entry) and not entry & OFLAG_ZERO

    def _in_place_host(self, entries: array, index: int, start: int, end: int) -> int | None:
        """The host cluster that bytes ``[start, end)`` of the cluster whose entry is at
        ``entries[index]`` can be written to in place, without a change of the mapping
        (None: they cannot). Under the metadata lock."""
        entry = entries[index]
        return entry & L2E_OFFSET_MASK if self._in_place_ok(entry) else None

    def _new_host(self, guest: int, count: int) -> int:
        """Host offset of ``count`` new clusters for the guest clusters from ``guest``: in
        an external data file their own place, else allocated in the qcow2 file."""
        if self.external:
            return guest
        with self.lock:
            return self.refcounts.allocate(count)

    def _map_whole(self, guest: int, host: int) -> int:
        """Map guest cluster ``guest``, written whole, to its own new ``host`` cluster;
        returns the entry replaced."""
        return self._set_pair(guest, host | OFLAG_COPIED)[0]

    def _release(self, entry: int) -> None:
        """Free what a replaced entry pointed at: refcounts are decremented once the new
        mapping is durable (flush); a data file cluster is discarded now, once no in-place
        write can still land in it."""
        if self.external:
            if self._has_own_host(entry):
                self._wait_in_place()
                datafile.discard_range(self.data_fd, self.data_path, entry & L2E_OFFSET_MASK,
                                       self.cluster_size, must_zero=self.data_raw)
            return
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
            if self._has_own_host(entry):
                break
            entries.append(entry)
        if not entries:
            self._write_cluster_locked(guest, 0, data[:cs])
            return cs
        host = self._new_host(guest, len(entries))
        self._write_data(data[:len(entries) * cs], host)
        for i, _ in enumerate(entries):
            self._release(self._map_whole(guest + i * cs, host + i * cs))
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
            hosts: list[int] | None = []
            for cluster in range(offset - (offset & (cs - 1)), end, cs):
                table, index = self._table_for(cluster, create=False, load=False)
                host = None if table is None else self._in_place_host(
                    table.entries, index, max(offset - cluster, 0), min(end - cluster, cs))
                if host is None:
                    hosts = None
                    break
                hosts.append(host)
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
                self._write_data(view[pos:pos + n], host + start)
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
            if entry & OFLAG_ZERO and self._has_own_host(entry):
                self._fill_zero_cluster(cluster, entry, start, data)
            else:
                self._allocate_and_write(cluster, entry, start, data)

    def _write_in_place(self, cluster: int, start: int, data: memoryview) -> bool:
        """Write into the cluster's own host cluster if that needs no change of the
        mapping (True), else nothing."""
        with self.lock:
            table, index = self._table_for(cluster, create=False)
            host = None if table is None else self._in_place_host(table.entries, index, start,
                                                                   start + len(data))
            if host is None:
                return False
            self._claim(1)
        try:
            self._write_data(data, host + start)
        finally:
            self._unclaim(1)
        return True

    def _fill_zero_cluster(self, cluster: int, entry: int, start: int, data: memoryview) -> None:
        """A write to an allocated cluster flagged zero (left by WRITE_ZEROES with NO_HOLE):
        zeros and ``data`` into its own host cluster, then the flag goes. With the mapping lock."""
        buf = bytearray(self.cluster_size)
        buf[start:start + len(data)] = data
        self._write_data(buf, entry & L2E_OFFSET_MASK)
        self._set_pair(cluster, entry & ~OFLAG_ZERO)

    def _current(self, guest: int, length: int) -> bytes:
        """What guest bytes ``[guest, guest+length)`` read now (zeros past the end)."""
        n = max(min(length, self.image.size - guest), 0)
        data = self.image.read(guest, n) if n else b""
        return data if n == length else data + bytes(length - n)

    def _allocate_and_write(self, cluster: int, entry: int, start: int, data: memoryview) -> None:
        """Copy-on-write into a new cluster: the cluster's current content (backing file,
        zeros, a compressed or shared cluster) with ``data`` over it. With the mapping lock."""
        cs = self.cluster_size
        whole = start == 0 and len(data) == cs
        # Unallocated with nothing below, or a zero cluster: its content is zeros.
        known_zero = entry == OFLAG_ZERO or (not entry and not self.has_backing)
        current = b"" if whole else self._zero_cluster if known_zero else self._current(cluster, cs)
        host = self._new_host(cluster, 1)
        fresh = host >= os.fstat(self.data_fd).st_size
        if whole:
            self._write_data(data, host)
        elif fresh and (known_zero or current.count(0) == cs):
            # Only the bytes written: the rest of a cluster past the end of the file reads
            # as zeros (a hole in the host file, as QEMU leaves it).
            self._write_data(data, host + start)
        else:
            buf = bytearray(current)
            buf[start:start + len(data)] = data
            self._write_data(buf, host)
        self._release(self._set_pair(cluster, host | OFLAG_COPIED)[0])

    # -- zeroing and discarding -------------------------------------------------------------

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fast: bool = False) -> None:
        """Make the range read as zeros (NBD_CMD_WRITE_ZEROES): whole clusters by the zero
        flag (v3) or by unmapping them (v2 without a backing file, when ``may_trim``),
        the rest by writing zeros; a raw data file is zeroed there first. With ``fast``,
        FastZeroUnsupported before anything changes when zeros would have to be written."""
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
        if first < last:
            with self._mapping_lock:
                self._zero_data_file(first, last, may_trim, fast)
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

    def _zero_data_file(self, offset: int, end: int, may_trim: bool, fast: bool) -> None:
        """A raw data file reads zeros over guest ``[offset, end)`` before the metadata says
        so (as QEMU's zeroing does first; ``fast``: see :func:`datafile.zero_range`)."""
        end = min(end, self.image.size)
        if self.data_raw and offset < end:
            datafile.zero_range(self.data_fd, self.data_path, offset, end - offset,
                                may_trim=may_trim, fast=fast)

    def _zero_cluster_entry(self, cluster: int, may_trim: bool) -> None:
        """One whole cluster reads as zeros from now on (with the mapping lock)."""
        entry = self._entry(cluster)
        if not self.zero_flag:  # v2: no backing file here (see write_zeroes)
            if entry:
                self._release(self._set_pair(cluster, 0)[0])
            return
        if not may_trim and self._has_own_host(entry):
            # NO_HOLE: the cluster stays allocated, flagged zero (qcow2 v3 'zero flag').
            if not entry & OFLAG_ZERO:
                self._set_pair(cluster, entry | OFLAG_ZERO)
            return
        if entry == OFLAG_ZERO:
            return
        self._release(self._set_pair(cluster, OFLAG_ZERO)[0])

    def _discarded(self) -> Pair:
        """What a discarded cluster's entry becomes (QEMU's discard): the zero flag (v3),
        else unallocated (v2 without a backing file)."""
        return (OFLAG_ZERO if self.zero_flag else 0), 0

    def trim(self, offset: int, length: int) -> None:
        """NBD_CMD_TRIM as QEMU's discard: whole clusters that hold something, or all of them
        over a backing file, are freed and read as zeros (:meth:`_discarded`); a v2 image
        over a backing file keeps them (no zero flag to hide the backing file's data);
        partial clusters are left as they are."""
        if self.has_backing and not self.zero_flag:
            return
        cs = self.cluster_size
        first, last = self._whole_clusters(offset, offset + length)
        discarded = self._discarded()
        with self._mapping_lock:
            for cluster in range(first, last, cs):
                pair = self._pair(cluster)
                if pair != discarded and (self.has_backing or self._allocated(pair[0])):
                    self._release(self._set_pair(cluster, *discarded)[0])
