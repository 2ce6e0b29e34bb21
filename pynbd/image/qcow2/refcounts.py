"""The refcount table and blocks of one qcow2 file, and its host cluster allocator.

qcow2 spec, 'Host cluster management': refcount blocks (one cluster each),
found through the refcount table, count the references to every host cluster;
no block means refcount 0. :class:`Refcounts` changes them in memory and writes
them when told, in the order that leaves a crash at most leaked clusters, never
a reference to a cluster at refcount 0 (as QEMU's block/qcow2-refcount.c):
allocations and increments are written by ``write_allocations()``, before the
writer writes what references them; frees are recorded and applied by
``apply_frees()``, after the references are durably gone. A new refcount block
counts itself when it lies in its own range, as QEMU places it; a full table
grows in memory and gets its clusters at the next ``write_allocations()``,
which syncs the blocks, writes and syncs the new table, switches the header to
it in one write, then frees the old one like any free.

A cluster that drops to 0 is not reused while a read may still be sending it
(:mod:`pynbd.image.leases`): the lease action, which may run on the event loop
thread without the metadata lock, only queues it for the next allocation.
Entries of every width (refcount_order 0..6) are slices of one bitarray per
block, so searches for free or used entries run in C.
"""

from __future__ import annotations

import bisect
import logging
import os
import struct
import sys
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from itertools import groupby
from operator import itemgetter

from bitarray import bitarray
from bitarray.util import ba2int, int2ba, zeros

from pynbd.image.base import ImageError, ImageIOError
from pynbd.image.leases import HostLeases
from pynbd.image.qcow2.header import MAX_REFTABLE_BYTES, Qcow2Header, pread_exact

log = logging.getLogger(__name__)

#: qcow2 spec, 'Header': refcount_table_offset (u64) then refcount_table_clusters (u32), at byte 48.
REFTABLE_FIELDS_OFFSET = 48
REFTABLE_FIELDS = struct.Struct(">QI")
#: qcow2 spec, 'Host cluster management': bits 0-8 of a refcount table entry are reserved.
REFT_RESERVED = 0x1FF
#: qcow2 spec, 'Cluster mapping': L1/L2 entries hold host offsets in bits 9-55.
_MAX_HOST_END = 1 << 56


class _Entries:
    """Reads, writes and searches the entries of refcount blocks held as bitarrays.

    Entry ``k`` is bits ``[k*width, (k+1)*width)`` in both encodings of the spec:
    entries of 8 bits or more are big-endian integers (a big-endian bitarray
    reads them MSB first), narrower ones are packed from the least significant
    bit of each byte (a little-endian bitarray reads their low bit first). Any
    set bit makes an entry non-zero.
    """

    def __init__(self, refcount_order: int, cluster_size: int) -> None:
        self.width = 1 << refcount_order
        self.endian = "big" if self.width >= 8 else "little"
        self.per_block = cluster_size * 8 // self.width
        self.max = (1 << self.width) - 1
        self._zero = zeros(self.width, self.endian)
        self._one = int2ba(1, self.width, self.endian)

    def load(self, raw: bytes | None) -> bitarray:
        """A block from its bytes, or a zeroed one."""
        if raw is None:
            return zeros(self.per_block * self.width, self.endian)
        block = bitarray(endian=self.endian)
        block.frombytes(raw)
        return block

    def get(self, block: bitarray, k: int) -> int:
        return ba2int(block[k * self.width:(k + 1) * self.width])

    def set(self, block: bitarray, k: int, value: int) -> None:
        block[k * self.width:(k + 1) * self.width] = int2ba(value, self.width, self.endian)

    def fill(self, block: bitarray, start: int, stop: int, value: int) -> None:
        """Entries ``[start, stop)`` become ``value`` (0 or 1)."""
        block[start * self.width:stop * self.width] = self._one * (stop - start) if value else 0

    def find(self, block: bitarray, start: int, stop: int, nonzero: bool) -> int:
        """The first zero (or non-zero) entry in ``[start, stop)``, or -1."""
        w = self.width
        if nonzero:
            pos = block.find(1, start * w, stop * w)
            return pos // w if pos >= 0 else -1
        pos = block.find(self._zero, start * w, stop * w)
        while pos >= 0 and pos % w:  # zero bits straddling two entries: go on from the next entry
            pos = block.find(self._zero, (pos // w + 1) * w, stop * w)
        return pos // w if pos >= 0 else -1


def _runs(indexes: list[int]) -> Iterator[tuple[int, int]]:
    """``[start, end)`` runs of consecutive values in sorted, distinct ``indexes``."""
    for _, run in groupby(enumerate(indexes), lambda pair: pair[1] - pair[0]):  # constant within a run
        values = [value for _, value in run]
        yield values[0], values[-1] + 1


class Refcounts:
    """The refcount table and blocks of one qcow2 file, and its cluster allocator.

    Callers hold the image's metadata lock (:attr:`pynbd.image.base.Image.metadata_lock`)
    around every call, which runs on the caller's thread. ImageError: an unusable image
    or a limit; ImageIOError: corruption found while serving (a refcount below 0, a bad
    table entry), a failed read or write; ValueError: offsets or counts not whole clusters.
    """

    def __init__(self, fd: int, path: str, header: Qcow2Header, file_size: int,
                 leases: HostLeases | None = None) -> None:
        """Load the refcount table (ImageError naming the header field if it is not
        cluster aligned, too large or not inside the file); blocks are read on demand.
        ``header`` is kept: write_allocations() updates its refcount table fields."""
        self._fd = fd
        self._path = path
        self._header = header
        self._file_size = file_size
        self._leases = leases
        self._cluster_bits = header.cluster_bits
        self._entries = _Entries(header.refcount_order, header.cluster_size)
        self._per_block = self._entries.per_block
        self._table = self._read_table()
        #: Where the in-memory table lives; None once it has grown and has no clusters yet.
        self._table_offset: int | None = header.refcount_table_offset
        #: (offset, clusters) of the table the header on disk points to.
        self._disk_table = (header.refcount_table_offset, header.refcount_table_clusters)
        self._blocks: dict[int, bitarray] = {}
        self._dirty_blocks: set[int] = set()
        self._dirty_links: set[int] = set()  # table slots given a block since write_allocations()
        self._pending_frees: dict[int, int] = {}  # cluster index -> decrements to apply
        #: Sorted, disjoint ``(start, end)`` cluster spans at refcount 0 not reusable yet (leases).
        self._held: list[tuple[int, int]] = []
        #: Held spans whose leases ended (appended by lease actions, on any thread).
        self._released: deque[tuple[int, int]] = deque()
        self._hint = 0  # no cluster below this one is free
        #: Where a search for several clusters in a row starts: past the holes an earlier
        #: one skipped as too small (QEMU's free_cluster_index), so a small hole low in
        #: the file does not make every such search scan the whole file again; they stay
        #: for single clusters (the hint) and a free below brings it back down.
        self._run_hint = 0

    def get(self, host_offset: int) -> int:
        """The refcount of the cluster containing ``host_offset`` as in memory
        (allocations counted, frees not yet applied not deducted)."""
        if host_offset < 0:
            raise ValueError(f"negative host offset {host_offset}")
        return self._refcount(host_offset >> self._cluster_bits)

    def end(self) -> int:
        """The offset after the last cluster with a refcount (0 if none)."""
        last = (len(self._table_bytes(0, len(self._table)).rstrip(b"\0")) + 7) // 8  # past the last block
        for slot in range(last - 1, -1, -1):
            if self._table[slot]:
                pos = self._block(slot).find(1, right=True)
                if pos >= 0:
                    return (slot * self._per_block + pos // self._entries.width + 1) << self._cluster_bits
        return 0

    @property
    def dirty(self) -> bool:
        """Whether write_allocations() or apply_frees() has something to write."""
        return self.allocations_pending or self.frees_pending

    @property
    def allocations_pending(self) -> bool:
        """Whether write_allocations() has something to write."""
        return bool(self._dirty_blocks or self._dirty_links or self._table_offset != self._disk_table[0])

    @property
    def frees_pending(self) -> bool:
        """Whether apply_frees() has something to apply."""
        return bool(self._pending_frees)

    def allocate(self, count: int = 1) -> int:
        """The host offset of ``count`` contiguous free clusters, now at refcount 1 (in memory).

        Free: refcount 0, and not waiting for apply_frees() or a lease. The
        lowest such run from the first possibly free cluster is taken; past the
        last cluster with a refcount all are free, so without a hole the run is
        at the end of the file (the caller writes it). Blocks the run needs are
        created first. ImageError if the table would exceed QEMU's limit or the
        run would end beyond what an L2 entry can address.
        """
        if count < 1:
            raise ValueError(f"cannot allocate {count} clusters")
        return self._allocate_clusters(count) << self._cluster_bits

    def increment(self, host_offset: int, count: int = 1) -> None:
        """+1 for each of ``count`` clusters from ``host_offset``; all or nothing.

        ImageError if one would overflow (QEMU refuses too); ImageIOError if one
        has refcount 0 (a free cluster is allocated, not referenced).
        """
        first = self._first_cluster(host_offset, count)
        for cluster in range(first, first + count):
            value = self._refcount(cluster)
            where = f"{self._path}: host cluster at {cluster << self._cluster_bits:#x}"
            if value == 0:
                raise ImageIOError(f"{where} has refcount 0: it is free and cannot gain a reference")
            if value == self._entries.max:
                raise ImageError(f"{where}: refcount would overflow (maximum {value} with "
                                 f"refcount_bits={self._entries.width})")
        for cluster in range(first, first + count):
            slot, k = divmod(cluster, self._per_block)
            self._entries.set(self._blocks[slot], k, self._entries.get(self._blocks[slot], k) + 1)
            self._dirty_blocks.add(slot)

    def free(self, host_offset: int, count: int = 1) -> None:
        """Record -1 for each of ``count`` clusters from ``host_offset`` (apply_frees() applies it).

        All or nothing: ImageIOError naming the cluster if its refcount, less
        the frees already recorded, would go below 0.
        """
        first = self._first_cluster(host_offset, count)
        pending = self._pending_frees
        for cluster in range(first, first + count):
            if self._refcount(cluster) - pending.get(cluster, 0) < 1:
                raise ImageIOError(f"{self._path}: freeing host cluster at {cluster << self._cluster_bits:#x}"
                                   " would take its refcount below 0 (corrupt image or double free)")
        for cluster in range(first, first + count):
            pending[cluster] = pending.get(cluster, 0) + 1

    def free_bytes(self, host_offset: int, length: int) -> None:
        """free() of each cluster that host bytes ``[host_offset, host_offset+length)`` touch:
        a compressed cluster's range counts on every cluster it touches (as in QEMU)."""
        if host_offset < 0 or length < 1:
            raise ValueError(f"invalid host byte range: offset {host_offset}, length {length}")
        first = host_offset >> self._cluster_bits
        self.free(first << self._cluster_bits, ((host_offset + length - 1) >> self._cluster_bits) - first + 1)

    def write_allocations(self) -> None:
        """Write the changed refcount blocks, then the table changes, then the header.

        A table that grew gets its clusters here. The blocks are synced before
        the table entries (or new table) that point to them, a new table before
        the header's refcount_table_offset/clusters switch to it in one write
        (``header`` follows); then the old table is freed like any free. The
        caller syncs afterwards. ImageIOError if a write fails (the rest stays dirty).
        """
        if self._table_offset is None:
            self._locate_table()
        assert self._table_offset is not None
        moved = self._table_offset != self._disk_table[0]
        self._write_blocks(sorted(self._dirty_blocks))
        if not moved and not self._dirty_links:
            return
        self._sync()  # the blocks durable before anything points to them
        if moved:
            self._pwrite(self._table_bytes(0, len(self._table)), self._table_offset, "refcount table")
            self._sync()
            self._switch_header()
        else:
            for start, end in _runs(sorted(self._dirty_links)):
                self._pwrite(self._table_bytes(start, end), self._table_offset + 8 * start, "refcount table")
        self._dirty_links.clear()

    def apply_frees(self) -> None:
        """Apply the recorded frees and write the blocks they changed (once the references
        they drop are durably gone). Clusters reaching 0 become reusable once no lease
        pins them (at once without leases); after a failed write, never."""
        if not self._pending_frees:
            return
        entries = self._entries
        zeroed: list[int] = []
        touched: set[int] = set()
        for cluster, decrements in sorted(self._pending_frees.items()):
            slot, k = divmod(cluster, self._per_block)
            value = entries.get(self._blocks[slot], k) - decrements
            entries.set(self._blocks[slot], k, value)
            touched.add(slot)
            if not value:
                zeroed.append(cluster)
        self._pending_frees = {}
        self._dirty_blocks |= touched
        runs = list(_runs(zeroed))
        for span in runs:
            bisect.insort(self._held, span)  # not reusable before written and unpinned
        self._write_blocks(sorted(touched))
        for span in runs:
            self._put_back_when_unpinned(span)
        self._take_released()

    def _read_table(self) -> array:
        hdr = self._header
        cs = hdr.cluster_size
        offset, clusters = hdr.refcount_table_offset, hdr.refcount_table_clusters

        def bad(name: str, value: int, problem: str) -> ImageError:
            return ImageError(f"{self._path}: header field {name}={value:#x} {problem}")
        if offset % cs or offset == 0:
            raise bad("refcount_table_offset", offset, f"is 0 or not aligned to a cluster ({cs})")
        if clusters == 0 or clusters * cs > MAX_REFTABLE_BYTES:
            raise bad("refcount_table_clusters", clusters, f"is not 1..{MAX_REFTABLE_BYTES // cs} clusters")
        if offset + clusters * cs > self._file_size:
            raise bad("refcount_table_offset", offset, f"+ {clusters} clusters extends past the end of the "
                      f"file ({self._file_size} bytes)")
        table = array("Q")
        table.frombytes(pread_exact(self._fd, clusters * cs, offset, self._path, "refcount table"))
        if sys.byteorder == "little":
            table.byteswap()  # qcow2 is big-endian
        return table

    def _block(self, slot: int) -> bitarray:
        """The refcount block of table slot ``slot`` (which must have one), read once."""
        block = self._blocks.get(slot)
        if block is None:
            block = self._blocks[slot] = self._entries.load(self._read_block(slot))
        return block

    def _read_block(self, slot: int) -> bytes:
        entry = self._table[slot]
        offset = entry & ~REFT_RESERVED
        cs = 1 << self._cluster_bits
        where = f"{self._path}: refcount table entry {slot} ({entry:#x})"
        if entry & REFT_RESERVED:
            raise ImageIOError(f"{where} has reserved bits set")
        if offset % cs:
            raise ImageIOError(f"{where} is not aligned to the cluster size ({cs})")
        if offset + cs > self._file_size:
            raise ImageIOError(f"{where} points past the end of the file ({self._file_size} bytes)")
        try:
            raw = os.pread(self._fd, cs, offset)
        except OSError as exc:
            raise ImageIOError(f"{where}: cannot read its block: {exc.strerror}", exc.errno) from None
        if len(raw) != cs:
            raise ImageIOError(f"{where}: its block is truncated")
        return raw

    def _has_block(self, slot: int) -> bool:
        return slot < len(self._table) and self._table[slot] != 0

    def _refcount(self, cluster: int) -> int:
        slot, k = divmod(cluster, self._per_block)
        return self._entries.get(self._block(slot), k) if self._has_block(slot) else 0

    def _first_cluster(self, host_offset: int, count: int) -> int:
        if host_offset < 0 or host_offset & ((1 << self._cluster_bits) - 1) or count < 1:
            raise ValueError(f"not whole clusters: host offset {host_offset:#x}, count {count}")
        return host_offset >> self._cluster_bits

    def _allocate_clusters(self, count: int) -> int:
        """allocate() in cluster indexes."""
        self._take_released()
        pb = self._per_block
        hint = self._hint if count == 1 else max(self._hint, self._run_hint)
        while True:
            first_free = self._first_free(hint)
            start = self._free_run(first_free, count)
            if (start + count) << self._cluster_bits > _MAX_HOST_END:
                raise ImageError(f"{self._path}: no room for {count} clusters below {_MAX_HOST_END:#x}")
            missing = [slot for slot in range(start // pb, (start + count - 1) // pb + 1)
                       if not self._has_block(slot)]
            if not missing:
                break
            # New blocks go after the run, so the next search finds the same run.
            for slot in missing:
                if not self._has_block(slot):  # placing an earlier one may have created it
                    self._place_block(slot, start + count)
        self._fill(start, start + count, 1)
        if hint == self._hint:  # (a run search that started higher knows nothing below)
            self._hint = first_free if first_free < start else start + count
        if count > 1:
            self._run_hint = start + count
        return start

    def _first_free(self, pos: int) -> int:
        """The first cluster from ``pos`` at refcount 0 and not held."""
        pb = self._per_block
        while True:
            slot = pos // pb
            while self._has_block(slot):
                k = self._entries.find(self._block(slot), pos - slot * pb, pb, nonzero=False)
                if k >= 0:
                    pos = slot * pb + k
                    break
                slot += 1
                pos = slot * pb
            span = self._held_after(pos)
            if span is None or span[0] > pos:
                return pos
            pos = span[1]

    def _held_after(self, pos: int) -> tuple[int, int] | None:
        """The first held span that ends after ``pos`` (it contains ``pos`` or lies above)."""
        i = bisect.bisect_right(self._held, pos, key=itemgetter(1))
        return self._held[i] if i < len(self._held) else None

    def _free_run(self, pos: int, count: int) -> int:
        """The start of the first run of ``count`` free clusters from the free cluster ``pos``."""
        while True:
            limit = pos + count
            span = self._held_after(pos)
            if span is not None:
                limit = min(limit, span[0])
            end = self._first_used(pos, limit)
            if end == pos + count:
                return pos
            pos = self._first_free(end)

    def _first_used(self, pos: int, limit: int) -> int:
        """The first cluster in ``[pos, limit)`` with a refcount, else ``limit``."""
        pb = self._per_block
        while pos < limit:
            slot = pos // pb
            stop = min(limit - slot * pb, pb)
            if self._has_block(slot):
                k = self._entries.find(self._block(slot), pos - slot * pb, stop, nonzero=True)
                if k >= 0:
                    return slot * pb + k
            pos = slot * pb + stop
        return limit

    def _fill(self, start: int, end: int, value: int) -> None:
        """Clusters ``[start, end)``, all in existing blocks, to refcount ``value`` (0 or 1)."""
        pb = self._per_block
        while start < end:
            slot = start // pb
            stop = min(end - slot * pb, pb)
            self._entries.fill(self._block(slot), start - slot * pb, stop, value)
            self._dirty_blocks.add(slot)
            start = slot * pb + stop

    def _place_block(self, slot: int, after: int) -> None:
        """Create the block of table slot ``slot`` at the first free cluster from ``after``.

        As in QEMU, a block in its own range counts itself; otherwise the block
        of the range it lands in counts it, created first (in its own range) if missing.
        """
        pb = self._per_block
        while True:
            pos = self._first_free(after)
            pos_slot = pos // pb  # >= slot: ``after`` is past the clusters that need ``slot``
            self._ensure_capacity(pos_slot)
            if pos_slot == slot or not self._has_block(pos_slot):
                self._link_block(pos_slot, pos, describes_itself=True)
                if pos_slot == slot:
                    return
                after = pos + 1
                continue
            self._entries.set(self._block(pos_slot), pos - pos_slot * pb, 1)
            self._dirty_blocks.add(pos_slot)
            self._link_block(slot, pos, describes_itself=False)
            return

    def _link_block(self, slot: int, cluster: int, describes_itself: bool) -> None:
        block = self._blocks[slot] = self._entries.load(None)
        if describes_itself:
            self._entries.set(block, cluster - slot * self._per_block, 1)
        self._table[slot] = cluster << self._cluster_bits
        self._dirty_blocks.add(slot)
        self._dirty_links.add(slot)
        log.debug("%s: new refcount block %d at %#x", self._path, slot, cluster << self._cluster_bits)

    def _ensure_capacity(self, slot: int) -> None:
        """Grow the in-memory table to hold ``slot``, sized as QEMU does (x1.5, a cluster to spare)."""
        if slot < len(self._table):
            return
        per_cluster = (1 << self._cluster_bits) // 8
        clusters = max(1, len(self._table) // per_cluster)
        while (slot + 1) // per_cluster + 1 > clusters:
            clusters = (clusters * 3 + 1) // 2
        if clusters << self._cluster_bits > MAX_REFTABLE_BYTES:
            raise ImageError(f"{self._path}: the refcount table would exceed QEMU's limit "
                             f"({MAX_REFTABLE_BYTES} bytes)")
        if self._table_offset is not None and self._table_offset != self._disk_table[0]:
            # Clusters taken for the smaller table by a write_allocations() that then failed: never in use.
            self._unallocate(self._table_offset >> self._cluster_bits, len(self._table) // per_cluster)
        self._table.frombytes(bytes(8 * (clusters * per_cluster - len(self._table))))
        self._table_offset = None
        log.debug("%s: refcount table grows to %d clusters", self._path, clusters)

    def _locate_table(self) -> None:
        """Clusters for a table that grew (taking them may grow it again: then retry)."""
        per_cluster = (1 << self._cluster_bits) // 8
        while True:
            clusters = len(self._table) // per_cluster
            start = self._allocate_clusters(clusters)
            if len(self._table) // per_cluster == clusters:
                self._table_offset = start << self._cluster_bits
                return
            self._unallocate(start, clusters)

    def _unallocate(self, start: int, count: int) -> None:
        """Give back clusters allocated here and never referenced: to 0 at once."""
        self._fill(start, start + count, 0)
        self._hint = min(self._hint, start)
        self._run_hint = min(self._run_hint, start)

    def _put_back_when_unpinned(self, span: tuple[int, int]) -> None:
        if self._leases is None:
            self._released.append(span)
            return
        start, end = span
        released = self._released  # the action may run on the loop thread: it only queues
        self._leases.when_unpinned(self._fd, start << self._cluster_bits, (end - start) << self._cluster_bits,
                                   lambda: released.append(span))

    def _take_released(self) -> None:
        while self._released:
            span = self._released.popleft()
            self._held.remove(span)
            self._hint = min(self._hint, span[0])
            self._run_hint = min(self._run_hint, span[0])

    def _switch_header(self) -> None:
        assert self._table_offset is not None
        offset, clusters = self._table_offset, len(self._table) * 8 >> self._cluster_bits
        self._pwrite(REFTABLE_FIELDS.pack(offset, clusters), REFTABLE_FIELDS_OFFSET, "header")
        old_offset, old_clusters = self._disk_table
        self._disk_table = (offset, clusters)
        self._header.refcount_table_offset, self._header.refcount_table_clusters = offset, clusters
        log.debug("%s: refcount table moved to %#x (%d clusters)", self._path, offset, clusters)
        self.free(old_offset, old_clusters)

    def _table_bytes(self, start: int, end: int) -> bytes:
        part = self._table[start:end]
        if sys.byteorder == "little":
            part.byteswap()
        return part.tobytes()

    def _write_blocks(self, slots: list[int]) -> None:
        for slot in slots:
            self._pwrite(self._blocks[slot].tobytes(), self._table[slot], f"refcount block {slot}")
            self._dirty_blocks.discard(slot)

    def _pwrite(self, data: bytes, offset: int, what: str) -> None:
        self._io(lambda: os.pwrite(self._fd, data, offset) == len(data), f"write the {what} at {offset:#x}")

    def _sync(self) -> None:
        self._io(lambda: os.fdatasync(self._fd) is None, "sync the refcount structures")

    def _io(self, call: Callable[[], bool], what: str) -> None:
        """``call()`` (False: a short write), an OSError or a short write as ImageIOError."""
        try:
            if call():
                return
            problem, errno = "short write", None
        except OSError as exc:
            problem, errno = exc.strerror, exc.errno
        raise ImageIOError(f"{self._path}: cannot {what}: {problem}", errno)
