"""Refcount repair of a qcow2 file, as QEMU does when it opens a dirty image for writing.

qcow2 spec, 'Header': with incompatible bit 0 (dirty) set, as a writer using lazy
refcounts (compatible bit 0) leaves an image it did not close, the refcounts may be
inconsistent, so "make sure to scan L1/L2 tables to repair refcounts before accessing
the image". QEMU does it at each read-write open (qcow2_do_open: qcow2_check with
BDRV_FIX_ERRORS | BDRV_FIX_LEAKS, then the bit is cleared); :func:`repair_refcounts` too.

What is counted, and which images are refused before anything is written:
:mod:`pynbd.image.qcow2.census`.

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
from dataclasses import dataclass
from itertools import repeat
from operator import gt, lt

from pynbd.image.base import ImageError
from pynbd.image.qcow2.census import U32, Census, batches, be_u64s, pread_padded, scan_tables, u64s_be
from pynbd.image.qcow2.header import INCOMPAT_DIRTY, Qcow2Header, parse_header, pread_exact
from pynbd.image.qcow2.layer import L1E_OFFSET_MASK, OFLAG_COPIED
from pynbd.image.qcow2.refcounts import REFT_RESERVED, REFTABLE_FIELDS, REFTABLE_FIELDS_OFFSET

log = logging.getLogger(__name__)

#: qcow2 spec, 'Header': incompatible_features (u64) at byte 72.
_INCOMPAT_OFFSET = 72


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
    the dirty bit (see :mod:`pynbd.image.qcow2.census` for what is counted, the module doc
    for the order of the writes).

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
    census = Census(path, fd, hdr, file_size)
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


class _Codec:
    """Refcount block entries of one width (qcow2 spec, 'Host cluster management'):
    big-endian integers of 8 to 64 bits, or 1, 2 or 4 bits packed from the least
    significant bit of each byte; whole blocks at a time, in C loops."""

    def __init__(self, refcount_order: int, cluster_size: int) -> None:
        self.width = w = 1 << refcount_order
        self.per_block = cluster_size * 8 // w
        self.max = (1 << w) - 1
        self.typecode = {16: "H", 32: U32, 64: "Q"}.get(w, "B")
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
        self.table = be_u64s(raw)
        for slot, entry in enumerate(self.table):
            offset = entry & ~REFT_RESERVED
            if entry and (entry & REFT_RESERVED or offset & (self.cs - 1) or offset >= file_size):
                raise ImageError(f"{path}: refcount table entry {slot} ({entry:#x}, at "
                                 f"{hdr.refcount_table_offset + 8 * slot:#x}) is malformed or past the end of "
                                 "the file; pynbd does not repair this (try 'qemu-img check -r all')")

    def block_offsets(self) -> dict[int, int]:
        return {slot: entry for slot, entry in enumerate(self.table) if entry}

    def plan(self, census: Census) -> _Plan:
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
            plan.new_table = (start, clusters, u64s_be(entries))
        return plan

    def _place(self, census: Census) -> tuple[dict[int, int], tuple[int, int] | None]:
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
            fields = REFTABLE_FIELDS.pack(plan.new_table[0] << cb, plan.new_table[1])
            _write_synced(self.path, self.fd, [(fields, REFTABLE_FIELDS_OFFSET, "the header's refcount table")])
        else:
            _write_synced(self.path, self.fd, [
                (struct.pack(">Q", cluster << cb), self.hdr.refcount_table_offset + 8 * slot,
                 f"refcount table entry {slot}") for slot, (cluster, _content) in sorted(plan.new_blocks.items())])
        _write_synced(self.path, self.fd, [(content, self.table[slot], f"refcount block {slot}")
                                           for slot, content in plan.lowers.items()])


def _fix_copied(census: Census) -> int:
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
    for batch in batches(tables, cs // hdr.l2_entry_size):
        scan = scan_tables(path, fd, hdr, batch)
        want = scan.data if exactly_once is None else exactly_once[scan.clusters] & scan.data
        wrong = (want ^ (scan.copied & scan.data)) | (scan.copied & scan.compressed)
        changed: dict[int, array] = {}
        for index in wrong.search(1):
            table, k = divmod(index, scan.per_table)
            offset = batch[table]
            if table not in changed:
                changed[table] = be_u64s(pread_padded(path, fd, cs, offset, f"the L2 table at {offset:#x}"))
            changed[table][stride * k] ^= OFLAG_COPIED
            fixed += 1
        writes += [(u64s_be(entries), batch[table], f"the L2 table at {batch[table]:#x}")
                   for table, entries in changed.items()]
    _write_synced(path, fd, writes)
    return fixed


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
