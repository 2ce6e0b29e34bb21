"""Refcount repair of a qcow2 file, as QEMU does when it opens a dirty image for writing.

qcow2 spec, 'Header': with incompatible bit 0 (dirty) set, as a writer using lazy
refcounts (compatible bit 0) leaves an image it did not close, the refcounts may be
inconsistent, so "make sure to scan L1/L2 tables to repair refcounts before accessing
the image". QEMU does it at each read-write open (qcow2_do_open: qcow2_check with
BDRV_FIX_ERRORS | BDRV_FIX_LEAKS, then the bit is cleared); :func:`repair_refcounts` too.

Counted ('Host cluster management'): the header cluster; the refcount table and
blocks; each L1 table (the active one, each snapshot's: 'Snapshots') and each L2 table
once per L1 entry naming it; the host clusters each L2 entry maps, once per time its
table is named ('Cluster mapping': normal and zero-allocated clusters, a compressed
cluster on every host cluster its sectors touch, nothing in an external data file);
the snapshot table; the bitmap directory, tables and data clusters ('Bitmaps'). Only
L2 tables and data clusters may be named twice (snapshots share them); any other
cluster named twice is overlapping metadata and the image is refused (ImageError
naming the file and the offset), as is a misaligned reference or one that lies a
cluster or more past the end of the file, before anything is written. L2 tables are
classified in batches by byte and bit operations on whole tables, not per entry in
Python, since images have millions of clusters.

The corrections are written in stages, each synced before the next, so that every
reference on disk keeps at least its refcount at every instant (a crash leaves leaks
at worst, and the dirty bit, cleared last, makes the next open repair again):
1. refcounts that go up, in existing blocks and in new ones (placed past the end of the
   file, where nothing lies), and a larger refcount table if one is needed;
2. the table entries of the new blocks, or the header switched to the new table in one write;
3. refcounts that go down (leaks, the replaced table);
4. the COPIED flags of the active L1 and L2 tables (set exactly where the refcount is 1),
   which pynbd's writer trusts to write in place;
5. the dirty bit cleared.
"""

from __future__ import annotations

import logging
import os
import struct
import sys
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import compress, count, repeat
from operator import gt, lt

from bitarray import bitarray
from bitarray.util import zeros

from pynbd.image.base import ImageError
from pynbd.image.qcow2.bitmaps import BME_OFFSET_MASK, BME_RESERVED_MASK, load_bitmaps
from pynbd.image.qcow2.compression import compressed_range
from pynbd.image.qcow2.header import INCOMPAT_DIRTY, Qcow2Header, parse_header, pread_exact, read_snapshot_table
from pynbd.image.qcow2.layer import L1E_OFFSET_MASK, L1E_RESERVED_MASK, L2E_OFFSET_MASK, OFLAG_COPIED

log = logging.getLogger(__name__)

#: qcow2 spec, 'Header': incompatible_features (u64) at byte 72; refcount_table_offset
#: (u64) and refcount_table_clusters (u32) at byte 48.
_INCOMPAT_OFFSET = 72
_REFTABLE_FIELDS_OFFSET = 48
_REFTABLE_FIELDS = struct.Struct(">QI")
#: qcow2 spec, 'Host cluster management': bits 0-8 of a refcount table entry are reserved.
_REFT_RESERVED = 0x1FF
#: qcow2 spec, 'Snapshots': the fixed part of a snapshot table entry.
_SNAPSHOT_FIXED = struct.Struct(">QIHHIIQII")
#: L2 entries classified per batch (8 bytes each in memory, a few bits more).
_BATCH_ENTRIES = 1 << 20
#: The array typecode of unsigned 32-bit integers (the expected refcounts).
_U32 = "I" if array("I").itemsize == 4 else "L"

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


@dataclass(frozen=True, slots=True)
class RepairReport:
    """What :func:`repair_refcounts` changed in one file (all zero/False: nothing)."""

    path: str
    #: Clusters whose refcount was too low (referenced beyond their count) and was raised.
    raised: int
    #: Clusters whose refcount was too high (leaked) and was lowered.
    lowered: int
    #: Refcount blocks created for referenced clusters that had none.
    blocks_created: int
    #: Whether the refcount table was replaced by a larger one.
    table_moved: bool
    #: Active L1 and L2 entries whose COPIED flag was corrected.
    copied_fixed: int
    #: Whether the header's dirty bit was set and is now clear.
    dirty_cleared: bool

    @property
    def changed(self) -> bool:
        return bool(self.raised or self.lowered or self.blocks_created or self.table_moved
                    or self.copied_fixed or self.dirty_cleared)


def repair_refcounts(path: str, fd: int) -> RepairReport:
    """Make the refcounts of the qcow2 file open as ``fd`` (O_RDWR, locked for writing by
    the caller) match its references, fix the COPIED flags of the active tables, and clear
    the dirty bit (see the module doc for what is counted and the order of the writes).

    Raises ImageError (one line naming ``path`` and the offset) for what it does not repair
    (a reference past the end of the file or misaligned, overlapping metadata, a refcount
    that would overflow, a malformed header or bitmap directory) before writing anything,
    and for a failed read, write or sync. Runs on the caller's thread; the caller opens
    the image afterwards (tables and header fields may have changed).
    """
    try:
        file_size = os.fstat(fd).st_size
    except OSError as exc:
        raise ImageError(f"{path}: cannot stat: {exc.strerror}") from None
    hdr = parse_header(path, fd, file_size)
    structure = _RefcountStructure(path, fd, hdr, file_size)
    census = _Census(path, fd, hdr, file_size)
    census.count(structure.block_offsets())
    plan = structure.plan(census)
    structure.write(plan)
    copied_fixed = _fix_copied(census)
    dirty = bool(hdr.incompatible_features & INCOMPAT_DIRTY)
    if dirty:
        _write_synced(path, fd, [(struct.pack(">Q", hdr.incompatible_features & ~INCOMPAT_DIRTY),
                                  _INCOMPAT_OFFSET, "the header's incompatible features")])
    report = RepairReport(path, plan.raised, plan.lowered, len(plan.new_blocks), plan.new_table is not None,
                          copied_fixed, dirty)
    if report.changed:
        log.info("%s: refcounts repaired: %d raised, %d lowered (leaks), %d new refcount blocks%s, "
                 "%d COPIED flags fixed%s", path, report.raised, report.lowered, report.blocks_created,
                 ", refcount table moved" if report.table_moved else "", report.copied_fixed,
                 ", dirty bit cleared" if dirty else "")
    return report


@dataclass(slots=True)
class _TableScan:
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


def _scan_tables(path: str, fd: int, hdr: Qcow2Header, tables: list[int]) -> _TableScan:
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
    clusters = _be_u64s(stream.tobytes())
    return _TableScan(tables, cs // hdr.l2_entry_size, _be_u64s(raw), data, compressed, copied, misaligned,
                      clusters)


def _read_runs(path: str, fd: int, offsets: list[int], cs: int) -> Iterator[bytes]:
    """The clusters at sorted ``offsets``, adjacent ones read together."""
    i = 0
    while i < len(offsets):
        j = i + 1
        while j < len(offsets) and offsets[j] == offsets[j - 1] + cs:
            j += 1
        yield _pread_padded(path, fd, (j - i) * cs, offsets[i], "L2 tables")
        i = j


def _batches(offsets: list[int], per_table: int) -> Iterator[list[int]]:
    step = max(1, _BATCH_ENTRIES // per_table)
    ordered = sorted(offsets)
    for i in range(0, len(ordered), step):
        yield ordered[i:i + step]


class _Census:
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
        self.counts = array(_U32, bytes(4 * n))
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
            self._exclusive(hdr.snapshots_offset, _snapshot_table_length(self.path, self.fd, hdr),
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
                for batch in _batches(offsets, cs // hdr.l2_entry_size):
                    self._data(_scan_tables(self.path, self.fd, hdr, batch), refs)
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
        entries = _be_u64s(_pread_padded(self.path, self.fd, 8 * size, offset, what))
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
            table = _be_u64s(_pread_padded(self.path, self.fd, 8 * entry.table_size, entry.table_offset, what))
            for index in compress(count(), table):
                tentry = table[index]
                offset = tentry & BME_OFFSET_MASK
                if tentry & BME_RESERVED_MASK or offset & (self.cs - 1):
                    raise self._refuse(f"{what}: entry {index} ({tentry:#x}) is malformed")
                if offset:  # 0: all zeros (or all ones) without a cluster
                    self._exclusive(offset, self.cs, f"data cluster {index} of bitmap {entry.name!r}")

    def _data(self, scan: _TableScan, refs: int) -> None:
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
            self.counts[start:start + len(part)] = array(_U32, total.to_bytes(4 * len(part), sys.byteorder))

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


def _snapshot_table_length(path: str, fd: int, hdr: Qcow2Header) -> int:
    """Bytes of the snapshot table (validated by read_snapshot_table): entries padded to 8."""
    pos = 0
    for _ in range(hdr.nb_snapshots):
        fixed = pread_exact(fd, _SNAPSHOT_FIXED.size, hdr.snapshots_offset + pos, path, "a snapshot table entry")
        _l1, _size, id_len, name_len, _s, _ns, _clock, _vm, extra = _SNAPSHOT_FIXED.unpack(fixed)
        pos += (_SNAPSHOT_FIXED.size + extra + id_len + name_len + 7) & ~7
    return pos


class _Codec:
    """Refcount block entries of one width (qcow2 spec, 'Host cluster management'):
    big-endian integers of 8 to 64 bits, or 1, 2 or 4 bits packed from the least
    significant bit of each byte; whole blocks at a time, in C loops."""

    def __init__(self, refcount_order: int, cluster_size: int) -> None:
        self.width = w = 1 << refcount_order
        self.per_block = cluster_size * 8 // w
        self.max = (1 << w) - 1
        self.typecode = {16: "H", 32: _U32, 64: "Q"}.get(w, "B")
        self._per_byte = max(1, 8 // w)
        # Packed widths: byte -> its j-th entry, and entry -> its bits at the j-th place of a byte.
        self._fields = [bytes((b >> (j * w)) & self.max for b in range(256)) for j in range(self._per_byte)]
        self._places = [bytes((b << (j * w)) & 0xFF for b in range(256)) for j in range(self._per_byte)]

    def decode(self, raw: bytes) -> array:
        if self.width >= 8:
            values = array(self.typecode)
            values.frombytes(raw)
            if sys.byteorder == "little" and self.width > 8:
                values.byteswap()
            return values
        out = bytearray(len(raw) * self._per_byte)
        for j, field in enumerate(self._fields):
            out[j::self._per_byte] = raw.translate(field)
        return array("B", out)

    def encode(self, values: array) -> bytes:
        """A block's bytes for ``values`` (each at most :attr:`max`)."""
        if self.width >= 8:
            out = array(self.typecode, values)
            if sys.byteorder == "little" and self.width > 8:
                out.byteswap()
            return out.tobytes()
        entries = array("B", values).tobytes()
        packed = 0
        for j, place in enumerate(self._places):
            packed |= int.from_bytes(entries[j::self._per_byte].translate(place), "big")
        return packed.to_bytes(len(entries) // self._per_byte, "big")


@dataclass(slots=True)
class _Plan:
    """The writes that make the refcounts on disk equal the counted ones."""

    #: Existing blocks (by table slot) whose refcounts go up: their content with only those changes.
    raises: dict[int, bytes]
    #: Existing blocks whose refcounts go down: their final content.
    lowers: dict[int, bytes]
    #: New blocks: table slot -> (cluster, content).
    new_blocks: dict[int, tuple[int, bytes]]
    #: A larger refcount table: (cluster, clusters, content), or None.
    new_table: tuple[int, int, bytes] | None
    raised: int = 0
    lowered: int = 0


class _RefcountStructure:
    """The refcount table and blocks on disk: what they say, and the writes that correct them."""

    def __init__(self, path: str, fd: int, hdr: Qcow2Header, file_size: int) -> None:
        self.path, self.fd, self.hdr, self.file_size = path, fd, hdr, file_size
        self.cb, self.cs = hdr.cluster_bits, hdr.cluster_size
        self.codec = _Codec(hdr.refcount_order, self.cs)
        raw = pread_exact(fd, hdr.refcount_table_clusters * self.cs, hdr.refcount_table_offset, path,
                          "the refcount table")
        self.table = _be_u64s(raw)
        for slot, entry in enumerate(self.table):
            offset = entry & ~_REFT_RESERVED
            if entry and (entry & _REFT_RESERVED or offset & (self.cs - 1) or offset >= file_size):
                raise ImageError(f"{path}: refcount table entry {slot} ({entry:#x}, at "
                                 f"{hdr.refcount_table_offset + 8 * slot:#x}) is malformed or past the end of "
                                 "the file; pynbd does not repair this (try 'qemu-img check -r all')")

    def block_offsets(self) -> dict[int, int]:
        return {slot: entry for slot, entry in enumerate(self.table) if entry}

    def plan(self, census: _Census) -> _Plan:
        """The writes that give the refcounts ``census`` counted (after it has counted the
        metadata placed here)."""
        codec, pb = self.codec, self.codec.per_block
        references = max(census.counts)
        if references > codec.max:
            cluster = census.counts.index(references)
            raise ImageError(f"{self.path}: host cluster {cluster << self.cb:#x} has {references} references, "
                             f"more than refcount_bits={codec.width} can count")
        new_blocks, new_table = self._place(census)
        plan = _Plan({}, {}, {}, None)
        for slot, offset in self.block_offsets().items():
            want_raw = codec.encode(census.slice(slot * pb, (slot + 1) * pb))
            raw = pread_exact(self.fd, self.cs, offset, self.path, f"refcount block {slot}")
            if raw == want_raw:
                continue
            want, disk = codec.decode(want_raw), codec.decode(raw)
            up, down = sum(map(gt, want, disk)), sum(map(lt, want, disk))
            plan.raised += up
            plan.lowered += down
            if up:
                plan.raises[slot] = want_raw if not down else codec.encode(array("Q", map(max, want, disk)))
            if down:
                plan.lowers[slot] = want_raw
        for slot, cluster in new_blocks.items():
            want_raw = codec.encode(census.slice(slot * pb, (slot + 1) * pb))
            plan.raised += pb - codec.decode(want_raw).count(0)
            plan.new_blocks[slot] = (cluster, want_raw)
        if new_table is not None:
            start, clusters = new_table
            entries = array("Q", self.table)
            entries.extend(repeat(0, clusters * self.cs // 8 - len(entries)))
            for slot, cluster in new_blocks.items():
                entries[slot] = cluster << self.cb
            plan.new_table = (start, clusters, _be_bytes(entries))
        return plan

    def _place(self, census: _Census) -> tuple[dict[int, int], tuple[int, int] | None]:
        """Clusters for the blocks that referenced clusters lack, and for a larger table if
        the slots no longer fit it: past the end of the file, where nothing is referenced,
        and counted in ``census``. A new block may need a block, a table blocks, and those a
        larger table: placed until nothing is missing."""
        pb, cs = self.codec.per_block, self.cs
        has_block = set(self.block_offsets())
        new_blocks: dict[int, int] = {}
        new_table: tuple[int, int] | None = None
        past_used = (len(census.counts.tobytes().rstrip(b"\0")) + 3) // 4
        next_free = max(census.file_clusters, past_used)

        def take(n: int) -> int:
            nonlocal next_free
            start, next_free = next_free, next_free + n
            census.add(start, n, 1)
            return start

        pending = [slot for slot in range(-(-len(census.counts) // pb))
                   if slot not in has_block and any(census.counts[slot * pb:(slot + 1) * pb])]
        while True:
            while pending:
                slot = pending.pop()
                if slot not in has_block and slot not in new_blocks:
                    new_blocks[slot] = take(1)
                    pending.append(new_blocks[slot] // pb)
            needed = max(has_block | new_blocks.keys(), default=0) + 1
            capacity = (new_table[1] if new_table else self.hdr.refcount_table_clusters) * cs // 8
            if needed <= capacity:
                return new_blocks, new_table
            if new_table is None:  # the old table's clusters are free once the header names the new one
                census.add(self.hdr.refcount_table_offset >> self.cb, self.hdr.refcount_table_clusters, -1)
            else:  # too small after all: its clusters (never written) stay free
                census.add(new_table[0], new_table[1], -1)
            clusters = -(-needed * 8 // cs) + 1  # a cluster of entries to spare, as QEMU grows it
            new_table = (take(clusters), clusters)
            pending.extend(range(new_table[0] // pb, (new_table[0] + clusters - 1) // pb + 1))

    def write(self, plan: _Plan) -> None:
        """Write ``plan`` in the order of the module doc (stages 1-3), synced after each stage."""
        cb = self.cb
        stage = [(content, self.table[slot], f"refcount block {slot}") for slot, content in plan.raises.items()]
        stage += [(content, cluster << cb, f"new refcount block {slot}")
                  for slot, (cluster, content) in plan.new_blocks.items()]
        if plan.new_table is not None:
            stage.append((plan.new_table[2], plan.new_table[0] << cb, "the new refcount table"))
        _write_synced(self.path, self.fd, stage)
        if plan.new_table is not None:
            fields = _REFTABLE_FIELDS.pack(plan.new_table[0] << cb, plan.new_table[1])
            _write_synced(self.path, self.fd, [(fields, _REFTABLE_FIELDS_OFFSET, "the header's refcount table")])
        else:
            _write_synced(self.path, self.fd, [
                (struct.pack(">Q", cluster << cb), self.hdr.refcount_table_offset + 8 * slot,
                 f"refcount table entry {slot}") for slot, (cluster, _content) in sorted(plan.new_blocks.items())])
        _write_synced(self.path, self.fd, [(content, self.table[slot], f"refcount block {slot}")
                                           for slot, content in plan.lowers.items()])


def _fix_copied(census: _Census) -> int:
    """Stage 4: COPIED on the active L1 entries and the entries of their L2 tables exactly
    where the refcount is 1 (always, for data in an external data file), never on
    compressed entries. The changed entries and tables are written, then synced.
    Returns how many entries changed."""
    path, fd, hdr = census.path, census.fd, census.hdr
    cb, cs = hdr.cluster_bits, hdr.cluster_size
    writes: list[tuple[bytes, int, str]] = []
    for index, entry in census.active_l1:
        exclusive = census.counts[(entry & L1E_OFFSET_MASK) >> cb] == 1
        if exclusive != bool(entry & OFLAG_COPIED):
            writes.append((struct.pack(">Q", entry ^ OFLAG_COPIED), hdr.l1_table_offset + 8 * index,
                           f"L1 entry {index}"))
    fixed = len(writes)
    exactly_once = None if hdr.has_data_file else census.exactly_once()
    stride = 2 if hdr.extended_l2 else 1
    tables = sorted({entry & L1E_OFFSET_MASK for _index, entry in census.active_l1})
    for batch in _batches(tables, cs // hdr.l2_entry_size):
        scan = _scan_tables(path, fd, hdr, batch)
        want = scan.data if exactly_once is None else exactly_once[scan.clusters] & scan.data
        wrong = (want ^ (scan.copied & scan.data)) | (scan.copied & scan.compressed)
        changed: dict[int, array] = {}
        for index in wrong.search(1):
            table, k = divmod(index, scan.per_table)
            offset = batch[table]
            if table not in changed:
                changed[table] = _be_u64s(_pread_padded(path, fd, cs, offset, f"the L2 table at {offset:#x}"))
            changed[table][stride * k] ^= OFLAG_COPIED
            fixed += 1
        writes += [(_be_bytes(entries), batch[table], f"the L2 table at {batch[table]:#x}")
                   for table, entries in changed.items()]
    _write_synced(path, fd, writes)
    return fixed


def _be_u64s(raw: bytes) -> array:
    values = array("Q")
    values.frombytes(raw)
    if sys.byteorder == "little":
        values.byteswap()
    return values


def _be_bytes(values: array) -> bytes:
    out = array("Q", values)
    if sys.byteorder == "little":
        out.byteswap()
    return out.tobytes()


def _pread_padded(path: str, fd: int, length: int, offset: int, what: str) -> bytes:
    """``length`` bytes at ``offset``, zeros past the end of the file."""
    try:
        raw = os.pread(fd, length, offset)
    except OSError as exc:
        raise ImageError(f"{path}: cannot read {what} at {offset:#x}: {exc.strerror}") from None
    return raw + bytes(length - len(raw))


def _write_synced(path: str, fd: int, writes: list[tuple[bytes, int, str]]) -> None:
    """Write each ``(data, offset, what)``, then sync (nothing to do for no writes)."""
    if not writes:
        return
    try:
        for data, offset, what in writes:
            if os.pwrite(fd, data, offset) != len(data):
                raise ImageError(f"{path}: cannot write {what} at {offset:#x}: short write")
        os.fdatasync(fd)
    except OSError as exc:
        raise ImageError(f"{path}: cannot write the refcount repair: {exc.strerror}") from None
