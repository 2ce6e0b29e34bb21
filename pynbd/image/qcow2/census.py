"""Counting the references to every host cluster of a qcow2 file: the refcounts it should have.

Counted ('Host cluster management'): the header cluster; the refcount table and
blocks; each L1 table (the active one, each snapshot's: 'Snapshots') and each L2 table
once per L1 entry naming it; the host clusters each L2 entry maps, once per time its
table is named ('Cluster mapping': normal and zero-allocated clusters, a compressed
cluster on every host cluster its sectors touch, nothing in an external data file);
the snapshot table; the bitmap directory, tables and data clusters ('Bitmaps'). Only
L2 tables and data clusters may be named twice (snapshots share them); any other
cluster named twice is overlapping metadata and the image is refused (ImageError
naming the file and the offset), as is a misaligned reference or one that lies a
cluster or more past the end of the file. L2 tables are classified in batches by byte
and bit operations on whole tables (:func:`scan_tables`), not per entry in Python,
since images have millions of clusters.

Nothing here writes: :mod:`pynbd.image.qcow2.repair` turns the counts into corrections.
"""

from __future__ import annotations

import os
import sys
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import compress, count

from bitarray import bitarray
from bitarray.util import zeros

from pynbd.image.base import ImageError
from pynbd.image.qcow2.bitmaps import BME_OFFSET_MASK, BME_RESERVED_MASK, load_bitmaps
from pynbd.image.qcow2.compression import compressed_range
from pynbd.image.qcow2.header import Qcow2Header, read_snapshot_table
from pynbd.image.qcow2.layer import L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_OFFSET_MASK

#: L2 entries classified per batch (8 bytes each in memory, a few bits more).
_BATCH_ENTRIES = 1 << 20
#: The array typecode of unsigned 32-bit integers (the expected refcounts).
U32 = "I" if array("I").itemsize == 4 else "L"

# Byte translations for whole-table scans of big-endian L2 entries (qcow2 spec, 'Cluster
# mapping'): byte 0 holds bits 56-63 (63 COPIED, 62 COMPRESSED), bytes 1-6 the host offset
# (bits 9-55; bit 8, in byte 6, is reserved).
_BIT7 = bytes(b >> 7 for b in range(256))
_BIT6 = bytes((b >> 6) & 1 for b in range(256))
_HOST_BYTES = L2E_OFFSET_MASK.to_bytes(8, "big")


def _flags(column: bytes, mask: int) -> bitarray:
    """One bit per byte of ``column``: whether it has a bit of ``mask``."""
    bits = bitarray()
    bits.pack(column.translate(bytes(1 if b & mask else 0 for b in range(256))))
    return bits


@dataclass(slots=True)
class TableScan:
    """A batch of L2 tables (``tables``, ``per_table`` entries each), classified per entry."""

    tables: list[int]
    per_table: int
    entries: array  # the standard (first) words of the entries, host byte order
    data: bitarray  # maps a host cluster: normal or zero-allocated, not compressed
    compressed: bitarray
    copied: bitarray
    misaligned: bitarray  # data whose host offset has bits below the cluster size
    clusters: array  # host cluster index of each data entry, 0 for the others

    def where(self, index: int, extended: bool) -> str:
        table, k = divmod(index, self.per_table)
        return (f"L2 entry {self.entries[index]:#x} (at {self.tables[table] + (16 if extended else 8) * k:#x})")


def scan_tables(path: str, fd: int, hdr: Qcow2Header, tables: list[int]) -> TableScan:
    """Read and classify the L2 tables at ``tables`` (sorted offsets) with byte and bit
    operations on whole columns; adjacent tables are read in one call."""
    cs, extended = hdr.cluster_size, hdr.extended_l2
    raw = b"".join(_read_runs(path, fd, tables, cs))
    if extended:  # keep the first word of each 16-byte entry (the second is the subcluster bitmap)
        words = bytearray(len(raw) // 2)
        for k in range(8):
            words[k::8] = raw[k::16]
        raw = bytes(words)
    top = raw[0::8]
    compressed, copied = bitarray(), bitarray()
    compressed.pack(top.translate(_BIT6))
    copied.pack(top.translate(_BIT7))
    data = _flags(raw[6::8], _HOST_BYTES[6])
    misaligned = _flags(raw[6::8], ((cs - 1) >> 8) & _HOST_BYTES[6])
    for k in range(1, 6):
        data |= _flags(raw[k::8], _HOST_BYTES[k])
        misaligned |= _flags(raw[k::8], ((cs - 1) >> (8 * (7 - k))) & 0xFF)
    data &= ~compressed
    misaligned &= data
    # Host cluster indexes: the offset bits of data entries only, the whole stream shifted
    # by cluster_bits (an aligned entry's low bits are zero: nothing lands in the next
    # entry; misaligned entries are refused before their indexes are used).
    chosen = data.unpack(one=b"\x01")
    mask = bytearray(len(raw))
    for k in range(8):
        mask[k::8] = chosen.translate(bytes([0, _HOST_BYTES[k]]) + bytes(254))
    stream, keep = bitarray(), bitarray()
    stream.frombytes(raw)
    keep.frombytes(bytes(mask))
    stream &= keep
    stream >>= hdr.cluster_bits
    clusters = be_u64s(stream.tobytes())
    return TableScan(tables, cs // hdr.l2_entry_size, be_u64s(raw), data, compressed, copied, misaligned,
                      clusters)


def _read_runs(path: str, fd: int, offsets: list[int], cs: int) -> Iterator[bytes]:
    """The clusters at sorted ``offsets``, adjacent ones read together."""
    i = 0
    while i < len(offsets):
        j = i + 1
        while j < len(offsets) and offsets[j] == offsets[j - 1] + cs:
            j += 1
        yield pread_padded(path, fd, (j - i) * cs, offsets[i], "L2 tables")
        i = j


def batches(offsets: list[int], per_table: int) -> Iterator[list[int]]:
    """``offsets`` of L2 tables (``per_table`` entries each), sorted, in lists of at most
    :data:`_BATCH_ENTRIES` entries (at least one table each), for :func:`scan_tables`."""
    step = max(1, _BATCH_ENTRIES // per_table)
    ordered = sorted(offsets)
    for i in range(0, len(ordered), step):
        yield ordered[i:i + step]


class Census:
    """The refcount every host cluster should have, counted from the image's structures (see
    the module doc): ``counts[c]`` for cluster ``c`` once :meth:`count` has run. While it
    runs, data clusters named once are marked in ``once``, set for a whole batch of L2
    tables at a time, and added to ``counts`` at the end. ImageError for what cannot be
    counted safely."""

    def __init__(self, path: str, fd: int, hdr: Qcow2Header, file_size: int) -> None:
        self.path, self.fd, self.hdr, self.file_size = path, fd, hdr, file_size
        self.cb, self.cs = hdr.cluster_bits, hdr.cluster_size
        self.file_clusters = -(-file_size // self.cs)
        # A referenced range may end up to a cluster past the end of the file (QEMU's
        # check tolerates less than a cluster): one cluster more than the file has.
        n = self.file_clusters + 1
        self.counts = array(U32, bytes(4 * n))
        self.once = zeros(n)
        #: Clusters of structures named exactly once (all but L2 tables and data), and by what.
        self.exclusive = zeros(n)
        self._owners: dict[int, str] = {}
        self.l2_tables = zeros(n)
        #: L2 table offset -> how many L1 entries (of all L1 tables) name it.
        self.l2_refs: dict[int, int] = {}
        #: (index, entry) of each active L1 entry that names an L2 table.
        self.active_l1: list[tuple[int, int]] = []

    def count(self, refcount_blocks: dict[int, int]) -> None:
        """Count everything; ``refcount_blocks`` maps refcount table slots to block offsets."""
        hdr, cs = self.hdr, self.cs
        self._exclusive(0, cs, "the header")
        self._exclusive(hdr.refcount_table_offset, hdr.refcount_table_clusters * cs, "the refcount table")
        for slot, offset in refcount_blocks.items():
            self._exclusive(offset, cs, f"refcount block {slot}")
        self._l1(hdr.l1_table_offset, hdr.l1_size, "the active L1 table", active=True)
        snapshots = read_snapshot_table(self.path, self.fd, self.file_size, hdr)
        if snapshots:
            self._exclusive(hdr.snapshots_offset, sum(snap.entry_bytes for snap in snapshots),
                            "the snapshot table")
        for snap in snapshots:
            self._l1(snap.l1_table_offset, snap.l1_size, f"the L1 table of snapshot {snap.id!r}", active=False)
        self._bitmaps()
        for offset, refs in self.l2_refs.items():
            cluster = offset >> self.cb
            if self.exclusive[cluster]:
                raise self._refuse(f"the L2 table at {offset:#x} overlaps {self._owners[cluster]}")
            self.l2_tables[cluster] = 1
            self.counts[cluster] += refs
        if not hdr.has_data_file:  # data in an external data file has no refcounts
            # What data may not share; as long as the file, so that indexing it with a
            # data cluster past the end of the file fails.
            self._taken = (self.exclusive | self.l2_tables)[:self.file_clusters]
            by_refs: dict[int, list[int]] = {}
            for offset, refs in self.l2_refs.items():
                by_refs.setdefault(refs, []).append(offset)
            for refs, offsets in by_refs.items():
                for batch in batches(offsets, cs // hdr.l2_entry_size):
                    self._data(scan_tables(self.path, self.fd, hdr, batch), refs)
        self._merge_once()

    def _refuse(self, what: str) -> ImageError:
        return ImageError(f"{self.path}: {what}; pynbd does not repair this (try 'qemu-img check -r all')")

    def _check_range(self, offset: int, length: int, what: str) -> None:
        """As QEMU's check: a range may not end a cluster or more past the end of the file."""
        if offset + length - self.file_size >= self.cs:
            raise self._refuse(f"{what} at {offset:#x} (+{length}) lies past the end of the file "
                               f"({self.file_size} bytes)")

    def _exclusive(self, offset: int, length: int, what: str) -> None:
        """Count the clusters of a structure that nothing else may share."""
        if length <= 0:
            return
        self._check_range(offset, length, what)
        first, stop = offset >> self.cb, ((offset + length - 1) >> self.cb) + 1
        taken = self.exclusive.find(1, first, stop)
        if taken >= 0:
            raise self._refuse(f"{what} at {offset:#x} overlaps {self._owners[taken]} "
                               f"(host cluster {taken << self.cb:#x})")
        self.exclusive[first:stop] = 1
        for cluster in range(first, stop):
            self._owners[cluster] = what
            self.counts[cluster] += 1

    def _l1(self, offset: int, size: int, what: str, active: bool) -> None:
        """Count an L1 table and note the L2 tables it names."""
        self._exclusive(offset, 8 * size, what)
        entries = be_u64s(pread_padded(self.path, self.fd, 8 * size, offset, what))
        for index in compress(count(), entries):  # the entries that are not 0
            entry = entries[index]
            l2 = entry & L1E_OFFSET_MASK
            if not l2:
                continue
            where = f"{what}: entry {index} ({entry:#x}, at {offset + 8 * index:#x})"
            if entry & L1E_RESERVED_MASK or l2 & (self.cs - 1):
                raise self._refuse(f"{where} has reserved bits set or is not cluster aligned")
            self._check_range(l2, self.cs, where)
            self.l2_refs[l2] = self.l2_refs.get(l2, 0) + 1
            if active:
                self.active_l1.append((index, entry))

    def _bitmaps(self) -> None:
        """Bitmap directory, tables and data clusters; none when the bitmaps extension is
        stale (autoclear bit 0 clear: QEMU drops it, and its clusters are leaks)."""
        bitmaps = load_bitmaps(self.path, self.fd, self.file_size, self.hdr)
        ext = self.hdr.bitmaps_ext
        if not bitmaps or ext is None:
            return
        self._exclusive(ext.directory_offset, ext.directory_size, "the bitmap directory")
        for bitmap in bitmaps:
            entry = bitmap.entry
            what = f"the table of bitmap {entry.name!r}"
            self._exclusive(entry.table_offset, 8 * entry.table_size, what)
            table = be_u64s(pread_padded(self.path, self.fd, 8 * entry.table_size, entry.table_offset, what))
            for index in compress(count(), table):
                tentry = table[index]
                offset = tentry & BME_OFFSET_MASK
                if tentry & BME_RESERVED_MASK or offset & (self.cs - 1):
                    raise self._refuse(f"{what}: entry {index} ({tentry:#x}) is malformed")
                if offset:  # 0: all zeros (or all ones) without a cluster
                    self._exclusive(offset, self.cs, f"data cluster {index} of bitmap {entry.name!r}")

    def _data(self, scan: TableScan, refs: int) -> None:
        """Count the host clusters a batch of L2 tables maps, ``refs`` times each."""
        extended = self.hdr.extended_l2
        bad = scan.misaligned.find(1)
        if bad >= 0:
            raise self._refuse(f"{scan.where(bad, extended)} is not cluster aligned")
        for index in scan.compressed.search(1):
            self._compressed(scan.where(index, extended), scan.entries[index], refs)
        data, clusters = scan.data, scan.clusters
        if not data.any():
            return
        try:
            bad = (self._taken[clusters] & data).find(1)
        except IndexError:
            past = next(i for i in data.search(1) if clusters[i] >= self.file_clusters)
            raise self._refuse(f"{scan.where(past, extended)} points past the end of the file "
                               f"({self.file_size} bytes)") from None
        if bad >= 0:
            owner = self._owners.get(clusters[bad], "an L2 table")
            raise self._refuse(f"{scan.where(bad, extended)} overlaps {owner}")
        once = self.once
        if refs == 1 and not (once[clusters] & data).any():
            before = once.count()
            once[clusters] = 1
            once[0] = 0  # the index of the entries that are not data (cluster 0 is the header)
            if once.count() - before == data.count():
                return
            once[clusters] = 0  # a cluster named twice in the batch (none was set before): count one by one
        counts = self.counts
        for cluster in compress(clusters, data):
            counts[cluster] += refs

    def _compressed(self, where: str, entry: int, refs: int) -> None:
        """+refs on every host cluster the compressed stream's sectors touch."""
        rng = compressed_range(entry, self.cb)
        self._check_range(rng.offset, rng.length, where)
        for cluster in range(rng.offset >> self.cb, ((rng.offset + rng.length - 1) >> self.cb) + 1):
            if self.exclusive[cluster] or self.l2_tables[cluster]:
                raise self._refuse(f"{where} overlaps {self._owners.get(cluster, 'an L2 table')}")
            self.counts[cluster] += refs

    def _merge_once(self) -> None:
        """Add ``once`` to ``counts``, a chunk at a time as two big integers (no count
        carries into the next: none nears 2**32)."""
        low = 0 if sys.byteorder == "little" else 3
        for start in range(0, len(self.counts), _BATCH_ENTRIES):
            part = self.counts[start:start + _BATCH_ENTRIES]
            ones = bytearray(4 * len(part))
            ones[low::4] = self.once[start:start + len(part)].unpack()
            total = int.from_bytes(part.tobytes(), sys.byteorder) + int.from_bytes(ones, sys.byteorder)
            self.counts[start:start + len(part)] = array(U32, total.to_bytes(4 * len(part), sys.byteorder))

    # -- the counts, for the refcount structure --

    def add(self, first: int, count: int, delta: int) -> None:
        """``delta`` more references to clusters ``[first, first+count)`` (metadata placed
        for the repair, or the replaced refcount table)."""
        missing = first + count - len(self.counts)
        if missing > 0:
            self.counts.frombytes(bytes(4 * missing))
        for cluster in range(first, first + count):
            self.counts[cluster] += delta

    def exactly_once(self) -> bitarray:
        """Per cluster: whether it has exactly one reference (from the bytes of the counts,
        a chunk at a time)."""
        low = 0 if sys.byteorder == "little" else 3
        out = bitarray()
        for start in range(0, len(self.counts), _BATCH_ENTRIES):
            raw = self.counts[start:start + _BATCH_ENTRIES].tobytes()  # native 32-bit integers
            one = bitarray()
            one.pack(raw[low::4].translate(bytes([0, 1]) + bytes(254)))
            for k in {0, 1, 2, 3} - {low}:
                one &= ~_flags(raw[k::4], 0xFF)
            out += one
        return out

    def slice(self, start: int, stop: int) -> array:
        """The counts of clusters ``[start, stop)``, zeros past their end."""
        part = self.counts[start:stop]
        part.frombytes(bytes(4 * (stop - start - len(part))))
        return part


def u64s_be(values: Sequence[int]) -> bytes:
    """``values`` as big-endian u64 words (the inverse of :func:`be_u64s`)."""
    out = array("Q", values)
    if sys.byteorder == "little":
        out.byteswap()
    return out.tobytes()


def be_u64s(raw: bytes) -> array:
    """The big-endian u64 words of ``raw`` (a multiple of 8 bytes), as host integers."""
    values = array("Q")
    values.frombytes(raw)
    if sys.byteorder == "little":
        values.byteswap()
    return values


def pread_padded(path: str, fd: int, length: int, offset: int, what: str) -> bytes:
    """``length`` bytes at ``offset``, zeros past the end of the file."""
    try:
        raw = os.pread(fd, length, offset)
    except OSError as exc:
        raise ImageError(f"{path}: cannot read {what} at {offset:#x}: {exc.strerror}") from None
    return raw + bytes(length - len(raw))
