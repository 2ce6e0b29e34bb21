"""Writes to qcow2 images with extended L2 entries (qcow2 spec, 'Extended L2 Entries'):
allocation, zeroing and discarding at subcluster granularity, with QEMU's rules
(block/qcow2-cluster.c and block/qcow2.c of QEMU 7.2), so that the same requests leave
the same subcluster bitmaps.

Each L2 entry is followed by a 64-bit subcluster bitmap: bit i (0-31) says subcluster
i is allocated (its data at host + i * subcluster size), bit 32 + i that it reads as
zeros. A subcluster is never both, and no bit is allocated without a host cluster.

* A write to a cluster without its own host cluster gets a new one (in an external
  data file: the cluster's own place) but allocates only the subclusters it touches;
  the parts of those it covers partly are first filled with what they read (backing
  file, zeros): copy-on-write per subcluster. The other subclusters stay as they were
  (unallocated: reading the backing file; zero). A compressed cluster moves whole; a
  shared one (not COPIED) with every allocated subcluster. Into a cluster with its own
  host cluster the same happens in place.
* WRITE_ZEROES is split at subcluster boundaries. Whole clusters get every zero bit:
  the host cluster stays with NO_HOLE, is freed without (a compressed cluster always).
  Whole subclusters of a partly covered cluster get their zero bits (alloc bits
  cleared, host cluster kept). A partly covered subcluster gets its zero bit when it is
  not allocated and the rest of it reads zeros (block status); else zeros are written.
* TRIM works on whole clusters only: one that holds something, or any over a backing
  file, becomes unallocated with every zero bit (:meth:`ExtendedL2Writer._discarded`).

Threads and locks: as :mod:`pynbd.image.qcow2.writer` (worker threads; mapping changes
under the mapping lock, entries read and changed under the metadata lock).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pynbd.image.base import STATE_DATA, FastZeroUnsupported, ImageIOError
from pynbd.image.qcow2.chain import resolve
from pynbd.image.qcow2.layer import L2E_OFFSET_MASK, OFLAG_COMPRESSED, OFLAG_COPIED, SUBCLUSTERS
from pynbd.image.qcow2.tableruns import ALLOCATION_OF_KIND
from pynbd.image.qcow2.writeback import Pair
from pynbd.image.qcow2.writer import Qcow2Writer

if TYPE_CHECKING:
    from array import array

    from pynbd.image.qcow2.image import Qcow2Image

#: The alloc half of a subcluster bitmap, all set; the zero half is this shifted up.
ALL_ALLOCATED = (1 << SUBCLUSTERS) - 1
ALL_ZERO = ALL_ALLOCATED << SUBCLUSTERS


def subcluster_bits(first: int, stop: int) -> int:
    """Bits ``first`` to ``stop - 1`` (subcluster numbers) of one half of a bitmap."""
    return (1 << stop) - (1 << first)


class ExtendedL2Writer(Qcow2Writer):
    """The write path of an image with extended L2 entries (see the module doc)."""

    def __init__(self, image: Qcow2Image, fd: int) -> None:
        super().__init__(image, fd)
        self.sc_bits = self.cluster_bits - (SUBCLUSTERS - 1).bit_length()  # 32 per cluster
        self.subcluster_size = 1 << self.sc_bits

    # -- mapping ----------------------------------------------------------------------------

    def _in_place_ok(self, entry: int) -> bool:
        # Bit 0 is reserved here, not a zero flag (QEMU ignores it).
        return self._has_own_host(entry)

    def _touched(self, start: int, end: int) -> int:
        """The alloc bits of the subclusters bytes ``[start, end)`` of a cluster touch."""
        return subcluster_bits(start >> self.sc_bits, ((end - 1) >> self.sc_bits) + 1)

    def _in_place_host(self, entries: array, index: int, start: int, end: int) -> int | None:
        """The host cluster if it is this image's and every subcluster touched is
        allocated: then the write changes no bitmap."""
        entry = entries[index]
        touched = self._touched(start, end)
        if not self._in_place_ok(entry) or entries[index + 1] & touched != touched:
            return None
        return entry & L2E_OFFSET_MASK

    def _map_whole(self, guest: int, host: int) -> int:
        return self._set_pair(guest, host | OFLAG_COPIED, ALL_ALLOCATED)[0]

    def _discarded(self) -> Pair:
        """A discarded cluster: unallocated, every subcluster zero (QEMU's discard)."""
        return 0, ALL_ZERO

    def _checked_pair(self, cluster: int) -> Pair:
        """The entry and bitmap of guest cluster ``cluster``; ImageIOError (as QEMU's
        "Invalid cluster entry") if a subcluster is allocated and zero at once, or
        allocated without a host cluster."""
        entry, bitmap = self._pair(cluster)
        alloc, zero = bitmap & ALL_ALLOCATED, bitmap >> SUBCLUSTERS
        if not entry & OFLAG_COMPRESSED and (alloc & zero or (alloc and not self._allocated(entry))):
            raise ImageIOError(f"{self.path}: L2 entry {entry:#x} with subcluster bitmap {bitmap:#x} "
                               f"for guest offset {cluster:#x} is invalid (a subcluster allocated "
                               "and zero, or allocated without a host cluster)")
        return entry, bitmap

    # -- writes -----------------------------------------------------------------------------

    def _write_cluster_locked(self, cluster: int, start: int, data: memoryview) -> None:
        """With the mapping lock: ``data`` at ``start`` in guest cluster ``cluster``, with
        copy-on-write of the subclusters it covers partly (QEMU's COW regions), their
        alloc bits set and zero bits cleared."""
        if self._write_in_place(cluster, start, data):
            return
        entry, bitmap = self._checked_pair(cluster)
        alloc = bitmap & ALL_ALLOCATED
        sc_bits = self.sc_bits
        end = start + len(data)
        first, stop = start >> sc_bits, ((end - 1) >> sc_bits) + 1
        if self._in_place_ok(entry):
            # Its own host cluster: only the touched subclusters not allocated yet are filled.
            host, replaced = entry & L2E_OFFSET_MASK, None
            cow_from = start if alloc >> first & 1 else first << sc_bits
            cow_to = end if alloc >> (stop - 1) & 1 else stop << sc_bits
        else:
            if entry & OFLAG_COMPRESSED:
                first, stop = 0, SUBCLUSTERS
            elif alloc:  # shared: the new cluster takes every allocated subcluster along
                first, stop = min(first, (alloc & -alloc).bit_length() - 1), max(stop, alloc.bit_length())
            host, replaced = self._new_host(cluster, 1), entry
            entry = host | OFLAG_COPIED
            cow_from, cow_to = first << sc_bits, stop << sc_bits
        if (cow_from, cow_to) == (start, end):
            self._write_data(data, host + start)
        else:
            buf = bytearray(self._current(cluster + cow_from, cow_to - cow_from))
            buf[start - cow_from:end - cow_from] = data
            self._write_data(buf, host + cow_from)
        written = self._touched(cow_from, cow_to)
        self._set_pair(cluster, entry, (bitmap | written) & ~(written << SUBCLUSTERS))
        if replaced is not None:
            self._release(replaced)

    # -- zeroing ----------------------------------------------------------------------------

    def write_zeroes(self, offset: int, length: int, may_trim: bool, fast: bool = False) -> None:
        """NBD_CMD_WRITE_ZEROES by subcluster zero bits where QEMU sets them (module doc),
        else by writing zeros. With ``fast``, FastZeroUnsupported before anything changes
        when zeros would have to be written."""
        sc = self.subcluster_size
        end = offset + length
        first = -(-offset // sc) * sc
        last = end if end >= self.image.size else end // sc * sc
        # Within one subcluster: one piece; else the partly covered ones on each side.
        partial = [(offset, end)] if first > last else [(a, b) for a, b in ((offset, first), (last, end))
                                                       if a < b]
        aligned = (first, last) if first < last else None
        rewrite = []
        with self._mapping_lock:
            zeroable = [self._zeroable(a, b) for a, b in partial]
            if fast and (not all(zeroable) or (aligned and self._compressed_edge(*aligned))):
                raise FastZeroUnsupported(f"{self.path}: zeroing {offset}+{length} means writing zeros")
            for (a, b), ok in zip(partial, zeroable):
                if ok:
                    self._zeroize(a - a % sc, a - a % sc + sc, may_trim, fast)
                else:
                    rewrite.append((a, b))
            if aligned and not self._zeroize(*aligned, may_trim, fast):
                rewrite.append(aligned)
        for a, b in rewrite:
            self._write_zeros(a, b - a)

    def _zeroable(self, start: int, end: int) -> bool:
        """Whether the subcluster holding ``[start, end)`` (less than one) can get its zero
        bit: it is not allocated (nor compressed) and its other bytes read zeros."""
        sc, cs = self.subcluster_size, self.cluster_size
        sub = start - start % sc
        entry, bitmap = self._pair(sub - sub % cs)
        if entry & OFLAG_COMPRESSED or bitmap >> ((sub % cs) >> self.sc_bits) & 1:
            return False
        return self._reads_zero(sub, start) and self._reads_zero(end, min(sub + sc, self.image.size))

    def _reads_zero(self, start: int, end: int) -> bool:
        """Block status calls guest bytes ``[start, end)`` zero (QEMU's ``is_zero``): the
        chain walked now (not the runs cached for block status, which the server renews
        only when a request ends)."""
        if start >= end:
            return True
        with self.lock:
            return all(ALLOCATION_OF_KIND[kind] != STATE_DATA
                       for _, _, _, kind, _ in resolve(self.image.layers, start, end, block_status=True))

    def _edges(self, start: int, end: int) -> tuple[int, int]:
        """How QEMU's zeroing splits ``[start, end)`` (subcluster aligned, or ``end`` at the
        image's end): ``[start, head_end)`` in a partly covered first cluster, whole
        clusters up to ``tail_start`` (the image's last one whole when reached), then a
        partly covered last cluster."""
        cs = self.cluster_size
        head_end = min(end, -(-start // cs) * cs)
        tail_start = end if end >= self.image.size else max(head_end, end // cs * cs)
        return head_end, tail_start

    def _compressed_edge(self, start: int, end: int) -> bool:
        """A partly covered cluster of the zeroing of ``[start, end)`` is compressed."""
        head_end, tail_start = self._edges(start, end)
        cs = self.cluster_size
        return any(self._entry(a - a % cs) & OFLAG_COMPRESSED
                   for a, b in ((start, head_end), (tail_start, end)) if a < b)

    def _zeroize(self, start: int, end: int, may_trim: bool, fast: bool) -> bool:
        """QEMU's ``qcow2_subcluster_zeroize`` of ``[start, end)`` (see :meth:`_edges`), with
        the mapping lock. False when a partly covered cluster is compressed (its
        subclusters cannot be zeroed: the caller writes zeros over the range)."""
        self._zero_data_file(start, end, may_trim, fast)
        head_end, tail_start = self._edges(start, end)
        if start < head_end and not self._zero_subclusters(start, head_end):
            return False
        for cluster in range(head_end, tail_start, self.cluster_size):
            self._zero_whole_cluster(cluster, may_trim)
        return tail_start >= end or self._zero_subclusters(tail_start, end)

    def _zero_subclusters(self, start: int, end: int) -> bool:
        """Zero bits for the subclusters of ``[start, end)``, inside one cluster: alloc bits
        cleared, the host cluster kept. False (nothing changed) for a compressed cluster."""
        cs = self.cluster_size
        cluster = start - start % cs
        entry, bitmap = self._checked_pair(cluster)
        if entry & OFLAG_COMPRESSED:
            return False
        bits = subcluster_bits((start - cluster) >> self.sc_bits,
                               min(-(-(end - cluster) // self.subcluster_size), SUBCLUSTERS))
        zeroed = (bitmap | bits << SUBCLUSTERS) & ~bits
        if zeroed != bitmap:
            self._set_pair(cluster, entry, zeroed)
        return True

    def _zero_whole_cluster(self, cluster: int, may_trim: bool) -> None:
        """Every subcluster of ``cluster`` zero; its host cluster freed when ``may_trim``
        (a compressed cluster's always), else kept."""
        entry, bitmap = self._pair(cluster)
        unmap = bool(entry & OFLAG_COMPRESSED) or (may_trim and self._allocated(entry))
        zeroed = (0 if unmap else entry), ALL_ZERO
        if zeroed != (entry, bitmap):
            self._set_pair(cluster, *zeroed)
            if unmap:
                self._release(entry)
