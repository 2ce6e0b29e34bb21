"""One qcow2 file of a chain: header, L1 and L2 tables, and the runs they map.

:class:`Qcow2Layer` opens one qcow2 file (header, active L1 table, snapshot
table, bitmaps, external data file) and classifies its guest ranges L1 → L2 →
clusters (qcow2 spec, 'Cluster mapping' and 'Extended L2 Entries') into runs of
the :mod:`pynbd.image.qcow2.chain` kinds, without looking at its backing file.
It also reads its compressed clusters. Whole L2 tables are classified once for
block status and the runs kept with the cached table
(:mod:`pynbd.image.qcow2.tableruns`). Where QEMU would, block status also asks
the host file where data clusters lie over holes (:attr:`Qcow2Layer.asks_host_file`).
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import sys
from array import array
from collections.abc import Iterator
from itertools import repeat
from operator import and_

from pynbd.image.base import ImageError, ImageIOError
from pynbd.image.qcow2.bitmaps import Qcow2Bitmap, load_bitmaps
from pynbd.image.qcow2.chain import (
    KIND_COMPRESSED,
    KIND_DATA,
    KIND_EOF,
    KIND_UNALLOC,
    KIND_ZERO,
    Run,
    looks_metadata_preallocated,
    merge_runs,
    resolve_backing_path,
    split_host_holes,
)
from pynbd.image.qcow2.compression import ClusterCache, DecompressError, compressed_range, decompress_cluster
from pynbd.image.qcow2.header import (
    INCOMPAT_DIRTY,
    Qcow2Header,
    Snapshot,
    parse_header,
    pread_exact,
    read_snapshot_table,
)
from pynbd.image.qcow2.l2cache import Table, TableCache
from pynbd.image.qcow2.tableruns import CORRUPT_TABLE, ClusterKinds, TableRuns, piece_columns
from pynbd.unitruns import unit_runs
from pynbd.runlength import NONZERO_TO_ONE, Runs, concat

log = logging.getLogger(__name__)

# qcow2 spec, 'Cluster mapping': L1 and L2 entry masks
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L1E_RESERVED_MASK = 0x7F000000000001FF
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
OFLAG_COPIED = 1 << 63
OFLAG_COMPRESSED = 1 << 62
OFLAG_ZERO = 1
#: qcow2 spec, 'Extended L2 Entries': 32 subclusters per cluster.
SUBCLUSTERS = 32
_ALL_SC = (1 << SUBCLUSTERS) - 1

_layer_ids = itertools.count(1)


def split_clusters(offset: int, length: int, unit_bits: int) -> Iterator[tuple[int, int, int]]:
    """Split a guest range at ``1 << unit_bits`` boundaries.

    Yields ``(unit_index, offset_in_unit, piece_length)``; the pieces are
    contiguous and cover ``[offset, offset+length)`` exactly. This is the
    cluster (or subcluster) arithmetic in one place.
    """
    unit = 1 << unit_bits
    end = offset + length
    pos = offset
    while pos < end:
        index = pos >> unit_bits
        in_unit = pos & (unit - 1)
        n = min(unit - in_unit, end - pos)
        yield index, in_unit, n
        pos += n


#: A classified table with at most one run per this many clusters keeps its kinds as runs
#: (smaller, and mapped per run cheaply); one with more keeps a kind byte per cluster.
FEW_RUNS_PER_CLUSTER = 32

#: Byte translations for the vectorised L2 classification (one byte column per entry byte).
_COMPRESSED_BIT = bytes((b >> 6) & 1 for b in range(256))  # bit 62 is bit 6 of the top byte
_LOW_BIT = bytes(b & 1 for b in range(256))  # bit 0: the zero flag
_HOST_BITS_OF_BYTE1 = bytes(b & 0xFE for b in range(256))  # bits 9..15 (bit 8 is reserved)


@functools.lru_cache(maxsize=None)
def _mask_table(mask: int) -> bytes:
    """A ``translate`` table that keeps the bits of ``mask`` in a byte (made on first use:
    a few masks per process)."""
    return bytes(b & mask for b in range(256))


class Qcow2Layer:
    """One qcow2 file of a chain: header, active L1 table, cached L2 tables, bitmaps."""

    format_name = "qcow2"

    def __init__(self, path: str, cache: TableCache, compressed_cache: ClusterCache) -> None:
        self.path = path
        self._cache = cache
        self._compressed_cache = compressed_cache
        self._id = next(_layer_ids)
        self._fds: list[int] = []
        self._asks_host_file: bool | None = None
        try:
            self.fd = self._open(path)
            self.file_size = os.fstat(self.fd).st_size
            self.header: Qcow2Header = parse_header(path, self.fd, self.file_size)
            hdr = self.header
            self.size = hdr.size
            self.cluster_bits = hdr.cluster_bits
            self.cluster_size = hdr.cluster_size
            self.l2_bits = hdr.l2_entries.bit_length() - 1
            self.extended_l2 = hdr.extended_l2
            self.zero_flag_allowed = hdr.version >= 3
            if hdr.incompatible_features & INCOMPAT_DIRTY:
                log.warning("%s: dirty bit set (lazy refcounts, not closed cleanly); "
                            "reading is safe, refcounts are not used", path)
            self.l1 = self._load_l1()
            self.snapshots: list[Snapshot] = read_snapshot_table(path, self.fd, self.file_size, hdr)
            self.bitmaps: list[Qcow2Bitmap] = load_bitmaps(path, self.fd, self.file_size, hdr)
            self._open_data_file()
            self.has_data_file = self.data_fd != self.fd
        except BaseException:
            self.close()
            raise

    def _open(self, path: str) -> int:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise ImageError(f"{path}: cannot open: {exc.strerror}") from None
        self._fds.append(fd)
        return fd

    def _load_l1(self) -> array:
        """Read and validate the active L1 entries that map the virtual size (qcow2 spec,
        'Cluster mapping')."""
        hdr = self.header
        n = hdr.l1_needed
        raw = pread_exact(self.fd, 8 * n, hdr.l1_table_offset, self.path, "L1 table") if n else b""
        l1 = array("Q")
        l1.frombytes(raw)
        if l1.itemsize != 8:  # pragma: no cover - every supported platform has 8-byte Q
            raise ImageError(f"{self.path}: unsupported platform (array 'Q' is not 64-bit)")
        if sys.byteorder == "little":
            l1.byteswap()
        cs = self.cluster_size
        for i, entry in enumerate(l1):
            if not entry:
                continue
            where = f"L1 entry {i}={entry:#x} (at {hdr.l1_table_offset + 8 * i:#x})"
            if entry & L1E_RESERVED_MASK:
                raise ImageError(f"{self.path}: {where} has reserved bits set")
            off = entry & L1E_OFFSET_MASK
            if off % cs:
                raise ImageError(f"{self.path}: {where} is not cluster aligned")
            if off and off + cs > self.file_size:
                raise ImageError(f"{self.path}: {where} points past the end of the file")
        return l1

    def _open_data_file(self) -> None:
        """External data file (qcow2 spec, incompatible feature bit 2): host offset == guest offset."""
        hdr = self.header
        if not hdr.has_data_file:
            self.data_fd = self.fd
            self.data_file_size = self.file_size
            self.data_file_path: str | None = None
            return
        if not hdr.data_file:
            raise ImageError(f"{self.path}: external data file bit set but no data file name extension")
        data_path = resolve_backing_path(self.path, hdr.data_file)
        if not os.path.exists(data_path) and os.path.exists(hdr.data_file):
            # QEMU 7.2 opens a relative data file name relative to the CWD (later
            # versions use the image's directory, like backing files): accept both.
            log.warning("%s: external data file %r found relative to the current directory, "
                        "not the image's directory", self.path, hdr.data_file)
            data_path = hdr.data_file
        self.data_file_path = data_path
        self.data_fd = self._open(data_path)
        self.data_file_size = os.fstat(self.data_fd).st_size

    # -- mapping --

    def _l2_table(self, l1_index: int, l2_offset: int) -> array:
        def load() -> bytes:
            try:
                data = os.pread(self.fd, self.cluster_size, l2_offset)
            except OSError as exc:
                raise ImageIOError(f"{self.path}: cannot read L2 table at {l2_offset:#x}: {exc.strerror}",
                                   exc.errno) from None
            if len(data) != self.cluster_size:
                raise ImageIOError(f"{self.path}: L2 table at {l2_offset:#x} (L1 index {l1_index}) "
                                   "is truncated")
            return data
        return self._cache.get(self._id, l2_offset, load)

    def runs(self, offset: int, end: int) -> Iterator[Run]:
        stop = min(end, self.size)
        if offset < stop:
            yield from merge_runs(self._pieces(offset, stop))
        else:
            stop = offset
        if stop < end:
            yield stop, end - stop, KIND_EOF, -1

    def status_runs(self, offset: int, end: int) -> Iterator[Run] | list[Run]:
        """:meth:`runs` as block status reports them: where the layer
        :attr:`asks_host_file`, data over host-file holes is KIND_HOST_HOLE."""
        if self.asks_host_file:
            return split_host_holes(self.runs(offset, end), self.data_fd)
        return self.runs(offset, end)

    @property
    def asks_host_file(self) -> bool:
        """Whether block status asks the host file where data clusters lie over holes.

        QEMU does where the image looks metadata-preallocated (block/qcow2.c
        ``qcow2_co_block_status`` sets BDRV_BLOCK_RECURSE only then); it decides once,
        at its first block-status call, and so does this (:func:`looks_metadata_preallocated`
        on the qcow2 file, also when the data is in an external data file). Caller holds
        the image's metadata lock where there is one.
        """
        if self._asks_host_file is None:
            self._asks_host_file = looks_metadata_preallocated(self.fd, self.path, self.header)
        return self._asks_host_file

    def _tables(self, offset: int, stop: int) -> Iterator[tuple[int, int, int, Table | None]]:
        """``(l1_index, pos, table_end, table)`` for each L2 table's part of ``[offset, stop)``.

        ``table`` is None where the L1 entry has no table or the table is all zeros.
        """
        span_bits = self.cluster_bits + self.l2_bits
        pos = offset
        while pos < stop:
            l1_index = pos >> span_bits
            table_end = min(stop, (l1_index + 1) << span_bits)
            l2_offset = self.l1[l1_index] & L1E_OFFSET_MASK
            table = self._l2_table(l1_index, l2_offset) if l2_offset else None
            yield l1_index, pos, table_end, None if table is None or table.all_zero else table
            pos = table_end

    def forget_derived(self, offset: int, length: int) -> None:
        """Drop what was derived from the L2 tables that map guest bytes
        ``[offset, offset+length)`` (their runs, their all-zero mark); the entries stay.

        The tables are found through the L1 table as it is now: a change that moves a
        table announces its range before and after the move, so both the old and the
        new table are reached. Caller holds the image's metadata lock.
        """
        end = min(offset + length, self.size)
        if offset >= end:
            return
        span_bits = self.cluster_bits + self.l2_bits
        first, last = offset >> span_bits, (end - 1) >> span_bits
        if first == last:  # (most changes: inside one table's span)
            table_offset = self.l1[first] & L1E_OFFSET_MASK
            if table_offset:
                self._cache.forget_derived_of(self._id, table_offset)
            return
        in_range = self.l1[first:last + 1]
        offsets = set(map(and_, in_range, repeat(L1E_OFFSET_MASK)))
        offsets.discard(0)
        self._cache.forget_derived(self._id, offsets)

    def _pieces(self, offset: int, stop: int) -> Iterator[Run]:
        """Unmerged per-cluster (or per-subcluster-run) classification of ``[offset, stop)``."""
        for _l1_index, pos, table_end, table in self._tables(offset, stop):
            if table is None:
                yield pos, table_end - pos, KIND_UNALLOC, -1
            else:
                yield from self._table_pieces(table, pos, table_end)

    def _table_pieces(self, table: Table, pos: int, end: int) -> Iterator[Run]:
        if self.extended_l2:
            return self._extended_pieces(table.entries, pos, end)
        return self._standard_pieces(table.entries, pos, end)

    def _status_pieces(self, table: Table, pos: int, end: int) -> Iterator[Run] | list[Run]:
        """:meth:`_table_pieces` as block status reports them (see :meth:`status_runs`)."""
        if self.asks_host_file:
            return split_host_holes(self._table_pieces(table, pos, end), self.data_fd)
        return self._table_pieces(table, pos, end)

    def top_runs(self, offset: int, stop: int, value_of_kind: tuple[int, ...]) -> Runs:
        """Runs of ``[offset, stop)`` (inside the layer) with each kind reported as
        ``value_of_kind[kind]`` (tableruns.ALLOCATION_OF_KIND, TOP_DEPTH_OF_KIND),
        when this is the only layer.

        Each L2 table is classified once, as a whole, and its runs are kept
        with the cached table (:class:`TableRuns`); a request then costs a
        bisection and a slice per table instead of Python work per cluster.
        A table with a corrupt entry is not cached: its ranges are classified
        on each request, so the error comes only for requests that touch it.
        Where the layer :attr:`asks_host_file`, the host file's holes are asked
        when a table is classified and kept with its runs: they change only when
        the table's guest range is written, which drops the runs (:meth:`forget_derived`).
        """
        parts: list[Runs] = []
        for l1_index, pos, table_end, table in self._tables(offset, stop):
            runs = None if table is None else self._classified(l1_index, table)
            if runs is not None:
                parts.append(runs.column(value_of_kind).slice(pos, table_end))
            elif table is None:
                n = table_end - pos
                parts.append(Runs([n], [value_of_kind[KIND_UNALLOC]], True, n, n))
            else:
                lengths, kinds = piece_columns(self._status_pieces(table, pos, table_end))
                parts.append(Runs(lengths, [value_of_kind[k] for k in kinds]))
        return concat(parts)

    def _classified(self, l1_index: int, table: Table) -> TableRuns | None:
        """The whole table's runs (computed on first use), None if an entry is corrupt."""
        runs = table.derived
        if runs is None:
            span_bits = self.cluster_bits + self.l2_bits
            start = l1_index << span_bits
            end = min(self.size, start + (1 << span_bits))
            try:
                runs = ((not self.asks_host_file and self._classify_plain_table(table, start, end))
                        or TableRuns.classify(start, self._status_pieces(table, start, end)))
            except ImageIOError:
                runs = CORRUPT_TABLE
            self._cache.attach(table, runs, runs.nbytes)
        return None if runs is CORRUPT_TABLE else runs

    def _classify_plain_table(self, table: Table, start: int, end: int) -> TableRuns | None:
        """Classify a whole standard L2 table with byte-wise C operations instead of a loop.

        Works on one byte column per entry byte: the compressed flag, the zero
        flag and "any host offset bit" become one 0/1 byte per entry, combined
        as big integers into one kind byte per cluster (:class:`ClusterKinds`,
        whose runs come from byte operations too). Gives the same runs as
        :meth:`_standard_pieces`; returns None (use that loop) for what needs
        its per-entry rules and exact errors: extended L2, external data
        files, compressed clusters, zero flags in a v2 image, misaligned offsets.
        """
        if self.extended_l2 or self.has_data_file:
            return None
        cluster_size = self.cluster_size
        count = -(-(end - start) // cluster_size)
        entries = table.entries if count == len(table.entries) else table.entries[:count]
        raw = entries.tobytes()  # host byte order
        column = (lambda k: raw[k::8]) if sys.byteorder == "little" else (lambda k: raw[7 - k::8])
        if column(7).translate(_COMPRESSED_BIT).count(1):
            return None
        zero = int.from_bytes(column(0).translate(_LOW_BIT), "big")
        if zero and not self.zero_flag_allowed:
            return None
        host_bits = int.from_bytes(column(1).translate(_HOST_BITS_OF_BYTE1), "big")
        for k in range(2, 7):
            host_bits |= int.from_bytes(column(k), "big")
        host = int.from_bytes(host_bits.to_bytes(count, "big").translate(NONZERO_TO_ONE), "big")
        # Host offset bits below the cluster size (bits 9 .. cluster_bits-1) must be clear.
        misaligned = L2E_OFFSET_MASK & (cluster_size - 1)
        for k in range(1, 7):
            mask = (misaligned >> (8 * k)) & 0xFF
            if mask and column(k).translate(_mask_table(mask)).count(0) != count:
                return None  # a misaligned host offset: the loop names it
        ones = int.from_bytes(b"\x01" * count, "big")
        data = host & (zero ^ ones)  # NORMAL: an offset and no zero flag ('Standard Cluster Descriptor')
        unallocated = (host | zero) ^ ones  # no offset and no zero flag
        # One kind byte per cluster: 2 - 2*data + unallocated is KIND_DATA (0), KIND_ZERO (2)
        # or KIND_UNALLOC (3); each byte stays within 0..3, so no byte borrows or carries.
        kinds = 2 * ones - 2 * data + unallocated
        # Where neighbouring kinds differ (the XOR with the kinds shifted by one cluster).
        kind_runs = 1 + ((kinds >> 8) ^ kinds).to_bytes(count, "big")[1:].translate(NONZERO_TO_ONE).count(1)
        kind_bytes = kinds.to_bytes(count, "big")
        if kind_runs <= count // FEW_RUNS_PER_CLUSTER:  # few runs: keep them, not a byte per cluster
            return TableRuns(unit_runs(start, kind_bytes, self.cluster_bits, end - start))
        return ClusterKinds(start, kind_bytes, self.cluster_bits, end - start, kind_runs)

    def _standard_pieces(self, entries: array, pos: int, end: int) -> Iterator[Run]:
        """Classify standard 8-byte L2 entries (qcow2 spec, 'Cluster mapping') in QEMU's order.

        Neighbouring clusters of one kind with contiguous host offsets come
        out as one run. This loop runs once per cluster for block status,
        reads and maps, so it is written flat (no per-cluster helpers).
        """
        cb = self.cluster_bits
        cluster_size = 1 << cb
        mask = (1 << self.l2_bits) - 1
        has_data_file = self.has_data_file
        run_pos = pos
        run_kind = -1
        run_host = -1  # host offset of run_pos, or -1
        while pos < end:
            in_cluster = pos & (cluster_size - 1)
            n = cluster_size - in_cluster
            if n > end - pos:
                n = end - pos
            entry = entries[(pos >> cb) & mask]
            if entry & OFLAG_COMPRESSED:
                if run_kind != -1:
                    yield run_pos, pos - run_pos, run_kind, run_host
                yield pos, n, KIND_COMPRESSED, entry  # never merged: host is the entry
                run_kind = -1
                pos += n
                run_pos = pos
                continue
            host = entry & L2E_OFFSET_MASK
            if entry & OFLAG_ZERO:
                if not self.zero_flag_allowed:
                    raise self._corrupt(pos, entry, "zero cluster entry found in a pre-v3 image")
                kind = KIND_ZERO
                here = self._host(pos, entry, host) + in_cluster if host else -1
            elif host or (has_data_file and entry & OFLAG_COPIED):
                kind = KIND_DATA
                here = self._host(pos, entry, host) + in_cluster
            else:
                kind = KIND_UNALLOC
                here = -1
            if kind != run_kind or (here == -1) != (run_host == -1) or (
                    here != -1 and run_host + (pos - run_pos) != here):
                if run_kind != -1:
                    yield run_pos, pos - run_pos, run_kind, run_host
                run_pos, run_kind, run_host = pos, kind, here
            pos += n
        if run_kind != -1:
            yield run_pos, pos - run_pos, run_kind, run_host

    def _extended_pieces(self, entries: array, pos: int, end: int) -> Iterator[Run]:
        """Extended L2 entries (qcow2 spec, 'Extended L2 Entries'), classified per subcluster."""
        cb = self.cluster_bits
        sc_bits = cb - 5
        mask = (1 << self.l2_bits) - 1
        for index, in_cluster, n in split_clusters(pos, end - pos, cb):
            i = (index & mask) * 2
            entry, bitmap = entries[i], entries[i + 1]
            if entry & OFLAG_COMPRESSED:
                yield pos, n, KIND_COMPRESSED, entry
                pos += n
                continue
            alloc, zero = bitmap & _ALL_SC, bitmap >> SUBCLUSTERS
            if alloc & zero:
                raise self._corrupt(pos, entry, f"subcluster bitmap {bitmap:#x} marks a subcluster "
                                    "both allocated and zero")
            host = entry & L2E_OFFSET_MASK
            cluster_allocated = bool(host) or (self.has_data_file and bool(entry & OFLAG_COPIED))
            if not cluster_allocated:
                if alloc:
                    raise self._corrupt(pos, entry, f"subcluster bitmap {bitmap:#x} has allocated "
                                        "subclusters but the cluster has no host offset")
                base = -1
            else:
                base = self._host(pos, entry, host)
            if (alloc == _ALL_SC or zero == _ALL_SC or not (alloc | zero)):  # uniform cluster
                kind = KIND_DATA if alloc else KIND_ZERO if zero else KIND_UNALLOC
                yield pos, n, kind, base + in_cluster if base >= 0 else -1
                pos += n
                continue
            for sc, in_sc, m in split_clusters(in_cluster, n, sc_bits):
                bit = 1 << sc
                kind = KIND_DATA if alloc & bit else KIND_ZERO if zero & bit else KIND_UNALLOC
                yield pos, m, kind, base + (sc << sc_bits) + in_sc if base >= 0 else -1
                pos += m

    def _host(self, pos: int, entry: int, host: int) -> int:
        """Validate a host cluster offset the way QEMU does at lookup (qcow2_get_host_offset)."""
        if host & (self.cluster_size - 1):
            raise self._corrupt(pos, entry, f"host cluster offset {host:#x} is not cluster aligned")
        if self.has_data_file:
            guest_cluster = pos & ~(self.cluster_size - 1)
            if host != guest_cluster:
                raise self._corrupt(pos, entry, f"external data file offset {host:#x} does not match "
                                    f"the guest cluster offset {guest_cluster:#x}")
        return host

    def _corrupt(self, pos: int, entry: int, what: str) -> ImageIOError:
        guest = pos & ~(self.cluster_size - 1)
        return ImageIOError(f"{self.path}: L2 entry {entry:#x} for guest offset {guest:#x}: {what}")

    def read_compressed(self, pos: int, entry: int) -> bytes:
        """Decompress the cluster whose compressed descriptor is ``entry``; ImageIOError
        names the guest offset."""
        key = (self._id, entry)
        data = self._compressed_cache.get(key)
        if data is not None:
            return data
        guest = pos & ~(self.cluster_size - 1)
        if self.has_data_file:
            raise ImageIOError(f"{self.path}: compressed cluster at guest offset {guest:#x} "
                               "in an image with an external data file")
        rng = compressed_range(entry, self.cluster_bits)
        try:
            # The range may run past EOF ('Compressed Clusters Descriptor'): a short read is normal.
            buf = os.pread(self.fd, rng.length, rng.offset)
            data = decompress_cluster(buf, self.cluster_size, self.header.compression_type)
        except (OSError, DecompressError) as exc:
            raise ImageIOError(f"{self.path}: compressed cluster at guest offset {guest:#x} "
                               f"(host {rng.offset:#x}+{rng.length}) cannot be read: {exc}") from None
        self._compressed_cache.put(key, data)
        return data

    def close(self) -> None:
        self._cache.drop_owner(self._id)
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)


