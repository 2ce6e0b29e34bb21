"""Persistent dirty bitmaps of a qcow2 image (qcow2 spec, 'Bitmaps'), read-only.

The bitmaps extension points at a directory of variable-length entries; each
entry points at a bitmap table whose entries point at data clusters holding
the bit array (LSB first, one bit per granule). Bitmap data is loaded lazily
into a :class:`bitarray.bitarray` the first time it is needed, and
:meth:`Qcow2Bitmap.dirty_runs` finds the run boundaries with bitarray's C-level
search, so a query costs a few C loops, not Python work per bit or per run.
"""

from __future__ import annotations

import logging
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass
from itertools import repeat
from operator import mul
from threading import Lock, RLock

from bitarray import bitarray

from pynbd.image.base import Bitmap, BitmapInfo, ImageError, ImageIOError
from pynbd.image.qcow2.header import AUTOCLEAR_BITMAPS, Qcow2Header
from pynbd.runlength import Runs, bit_runs, concat
from pynbd.runspans import SpanRuns

log = logging.getLogger(__name__)

# qcow2 spec, 'Bitmaps extension' and 'Bitmap directory', with QEMU 7.2's limits
MAX_BITMAPS = 65535
MAX_DIRECTORY_BYTES = 65535 * 1024
MAX_NAME = 1023
MAX_TABLE_ENTRIES = 0x8000000
MAX_DATA_BYTES = 512 << 20
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31

#: Guest bytes per cached chunk of runs: 2 GiB, so a run inside a chunk fits
#: a u32 and slices go to the wire encoder as arrays.
RUN_CHUNK_BYTES = 1 << 31
#: Chunks kept per bitmap (a full scan of a 256 GiB image).
RUN_CHUNKS_CACHED = 128
#: A chunk with more runs than this (16 bytes each) is not kept: at most 32 MiB per bitmap.
MAX_CACHED_CHUNK_BYTES = 256 * 1024

FLAG_IN_USE = 1 << 0
FLAG_AUTO = 1 << 1
FLAGS_KNOWN = FLAG_IN_USE | FLAG_AUTO  # QEMU 7.2 treats bit 2 as reserved
TYPE_DIRTY_TRACKING = 1

#: One directory entry's fixed part (name and extra data follow).
DIRECTORY_ENTRY = struct.Struct(">QIIBBHI")
# qcow2 spec, 'Bitmap table': its entries
BME_OFFSET_MASK = 0x00FFFFFFFFFFFE00
BME_RESERVED_MASK = 0xFF000000000001FE
BME_ALL_ONES = 1


@dataclass(frozen=True, slots=True)
class DirectoryEntry:
    """One parsed bitmap directory entry (qcow2 spec, 'Bitmap directory')."""

    name: str
    table_offset: int
    table_size: int
    flags: int
    granularity_bits: int
    extra_data_size: int

    @property
    def granularity(self) -> int:
        return 1 << self.granularity_bits

    @property
    def in_use(self) -> bool:
        return bool(self.flags & FLAG_IN_USE)

    @property
    def enabled(self) -> bool:
        return bool(self.flags & FLAG_AUTO)


class Qcow2Bitmap(Bitmap):
    """One bitmap of a qcow2 image. Its bits are read on first use."""

    def __init__(self, path: str, fd: int, file_size: int, cluster_size: int, image_size: int,
                 entry: DirectoryEntry, problem: str | None) -> None:
        self.path = path
        self.name = entry.name
        self.granularity = entry.granularity
        self.entry = entry
        #: Why this bitmap cannot be exported (None when it can be).
        self.problem = problem
        self._fd = fd
        self._file_size = file_size
        self._cluster_size = cluster_size
        self.nbits = -(-image_size // entry.granularity)
        self._bits: bitarray | None = None
        #: The bitmap table's entries, read with the bits (:meth:`bits`).
        self.table: list[int] = []
        self._lock = Lock()
        #: Guards the bits against a writer: the image's metadata lock once the image
        #: that owns the bitmap is made (Qcow2Image), a lock of its own until then.
        self.metadata_lock: RLock = RLock()
        #: chunk index -> its runs (see :meth:`_chunk_runs`), least recently used first.
        self._run_cache: OrderedDict[int, SpanRuns] = OrderedDict()
        self._chunk_granules = max(1, RUN_CHUNK_BYTES // entry.granularity)

    @property
    def consistent(self) -> bool:
        return self.problem is None

    # -- loading --

    def bits(self) -> bitarray:
        """The bit array (loaded on first call); raises ImageIOError if unreadable."""
        if self._bits is None:
            with self._lock:
                if self._bits is None:
                    self._bits = self._load()
        return self._bits

    def _load(self) -> bitarray:
        cs = self._cluster_size
        nbytes = (self.nbits + 7) // 8
        self.table = read_table(self.path, self._fd, self.entry)
        buf = bytearray(nbytes)
        for i, tentry in enumerate(self.table):
            start = i * cs
            n = min(cs, nbytes - start)
            off = tentry & BME_OFFSET_MASK
            if off == 0:
                if tentry & BME_ALL_ONES:
                    buf[start:start + n] = b"\xff" * n
                continue  # all zeros: buf already is
            if tentry & BME_ALL_ONES or off % cs or off + n > self._file_size:
                raise ImageIOError(f"{self.path}: bitmap {self.name!r}: table entry {i}={tentry:#x} "
                                   "points outside the file or is malformed")
            data = os.pread(self._fd, n, off)
            if len(data) != n:
                raise ImageIOError(f"{self.path}: bitmap {self.name!r}: data cluster {off:#x} is truncated")
            buf[start:start + n] = data
        bits = bitarray(endian="little")
        bits.frombytes(bytes(buf))
        del bits[self.nbits:]
        return bits

    # -- queries --

    def dirty_runs(self, offset: int, length: int, limit: int | None = None) -> Runs:
        """See :meth:`Bitmap.dirty_runs`; on the event loop thread. The bits are read
        (on first use) before :attr:`metadata_lock` is taken, and the search runs under it,
        so a writer setting bits under that lock is never seen half done."""
        self.bits()
        with self.metadata_lock:
            return self._dirty_runs(offset, length, limit)

    def _dirty_runs(self, offset: int, length: int, limit: int | None) -> Runs:
        g = self.granularity
        end = offset + length
        first = offset // g
        last = min(-(-end // g), self.nbits)  # granules [first, last) overlap the range
        if first >= last:  # past the last granule (cannot happen inside the image)
            return Runs([length], [0], True)
        if limit is not None and limit < 64:
            return self._few_runs(offset, end, first, last, limit)
        # Whole ranges come from cached chunks of runs: a scan of the bitmap
        # (nbdinfo --map, an incremental backup) then costs slices, not bit searches.
        stop = min(end, self.nbits * g)
        chunk_bytes = self.chunk_bytes
        parts: list[Runs] = []
        pos = offset
        while pos < stop:
            chunk = pos // chunk_bytes
            part_end = min(stop, (chunk + 1) * chunk_bytes)
            parts.append(self._chunk_runs(chunk).slice(pos, part_end))
            pos = part_end
        if end > stop:  # the range runs past the bitmap's last granule: clean
            parts.append(Runs([end - stop], [0], True, end - stop, end - stop))
        runs = concat(parts)
        return runs if limit is None else runs.head(limit)

    def _few_runs(self, offset: int, end: int, first: int, last: int, limit: int) -> Runs:
        """At most ``limit`` runs from ``offset`` (REQ_ONE), found boundary by boundary in C
        without copying the range or caching."""
        g = self.granularity
        bits = self.bits()
        granules: list[int] = []
        values: list[int] = []
        k = first
        while k < last and len(granules) < limit:
            dirty = bits[k]
            nxt = bits.find(not dirty, k + 1, last)
            stop = last if nxt < 0 else nxt
            granules.append(stop - k)
            values.append(dirty)
            k = stop
        # Granules to bytes, clipping the partial first and last granule to the range.
        lengths = list(map(mul, granules, repeat(g)))
        lengths[0] -= offset - first * g
        if k == last:
            overshoot = last * g - end
            if overshoot > 0:
                lengths[-1] -= overshoot
            elif overshoot < 0:  # the range runs past the bitmap's last granule: clean
                if values[-1]:
                    lengths.append(-overshoot)
                    values.append(0)
                else:
                    lengths[-1] -= overshoot
        # Runs found at value changes are non-empty and alternate.
        return Runs(lengths, values, True)

    def forget_runs(self, offset: int, length: int) -> None:
        """Drop the cached run chunks that overlap guest bytes ``[offset, offset+length)``
        (their bits change or will; the bits themselves are the authority and stay).

        A granule never straddles two chunks, so the chunks overlapping the range
        hold every granule the change can dirty. On the event loop thread.
        """
        if length <= 0 or not self._run_cache:
            return
        chunk_bytes = self.chunk_bytes
        first, last = offset // chunk_bytes, (offset + length - 1) // chunk_bytes
        run_cache = self._run_cache
        if last - first < len(run_cache):
            for chunk in range(first, last + 1):
                run_cache.pop(chunk, None)
        else:  # a range wider than the cache: look at what is cached instead
            for chunk in [c for c in run_cache if first <= c <= last]:
                del run_cache[chunk]

    @property
    def cached_chunks(self) -> list[int]:
        """Indexes of the chunks whose runs are cached, least recently used first
        (for tests and statistics); chunk ``k`` covers guest bytes from
        ``k * chunk_bytes`` (:attr:`chunk_bytes`)."""
        return list(self._run_cache)

    @property
    def chunk_bytes(self) -> int:
        """Guest bytes one cached chunk of runs covers."""
        return self._chunk_granules * self.granularity

    def _chunk_runs(self, chunk: int) -> SpanRuns:
        """The runs of one chunk of granules, in bytes (computed once, kept while the cache allows).

        Block status runs on the event loop thread only, so the cache needs no lock.
        """
        cached = self._run_cache.get(chunk)
        if cached is not None:
            self._run_cache.move_to_end(chunk)
            return cached
        g = self.granularity
        first = chunk * self._chunk_granules
        granules = bit_runs(self.bits()[first:min(first + self._chunk_granules, self.nbits)])
        runs = SpanRuns(first * g, Runs(list(map(mul, granules.lengths, repeat(g))), granules.values, True))
        if runs.nbytes <= MAX_CACHED_CHUNK_BYTES:  # a pathological chunk is computed each time instead
            self._run_cache[chunk] = runs
            while len(self._run_cache) > RUN_CHUNKS_CACHED:
                self._run_cache.popitem(last=False)
        return runs

    def preload(self) -> None:
        """Load the bits and compute the runs of the chunks the cache keeps."""
        self.bits()
        for chunk in range(min(RUN_CHUNKS_CACHED, -(-self.nbits // self._chunk_granules))):
            self._chunk_runs(chunk)

    def info(self) -> BitmapInfo:
        dirty: int | None = None
        if not self.entry.in_use:
            try:
                dirty = self.bits().count(1) * self.granularity
            except ImageIOError as exc:
                log.warning("%s", exc)
        return BitmapInfo(name=self.name, granularity=self.granularity, enabled=self.entry.enabled,
                          in_use=self.entry.in_use, consistent=self.consistent and dirty is not None,
                          dirty_bytes=dirty)


def read_table(path: str, fd: int, entry: DirectoryEntry) -> list[int]:
    """The entries of a bitmap's table (qcow2 spec, 'Bitmap table'); ImageIOError if the
    table is truncated or an entry has reserved bits set."""
    raw = os.pread(fd, 8 * entry.table_size, entry.table_offset)
    if len(raw) != 8 * entry.table_size:
        raise ImageIOError(f"{path}: bitmap {entry.name!r}: table at {entry.table_offset:#x} is truncated")
    table = list(struct.unpack(f">{entry.table_size}Q", raw))
    for i, tentry in enumerate(table):
        if tentry & BME_RESERVED_MASK:
            raise ImageIOError(f"{path}: bitmap {entry.name!r}: table entry {i}={tentry:#x} "
                               "has reserved bits set")
    return table


def load_bitmaps(path: str, fd: int, file_size: int, hdr: Qcow2Header) -> list[Qcow2Bitmap]:
    """Parse the bitmap directory of a qcow2 image (qcow2 spec, 'Bitmaps extension', 'Bitmap directory').

    A malformed extension or directory raises ImageError (the image is
    refused); a bitmap that is merely unusable (in_use, unsupported flags or
    extra data) is returned with :attr:`Qcow2Bitmap.problem` set.
    """
    ext = hdr.bitmaps_ext
    if ext is None:
        return []
    if not hdr.autoclear_features & AUTOCLEAR_BITMAPS:
        # Autoclear bit 0 (qcow2 spec, 'Header'): the extension is stale; QEMU considers every bitmap lost.
        log.warning("%s: bitmaps extension present but autoclear bit 0 is clear: "
                    "the bitmaps are stale and ignored", path)
        return []
    cs = hdr.cluster_size

    def bad(what: str) -> ImageError:
        return ImageError(f"{path}: bitmaps extension: {what}")

    if not 1 <= ext.nb_bitmaps <= MAX_BITMAPS:
        raise bad(f"nb_bitmaps={ext.nb_bitmaps} is outside 1..{MAX_BITMAPS}")
    if not 0 < ext.directory_size <= MAX_DIRECTORY_BYTES:
        raise bad(f"bitmap_directory_size={ext.directory_size} is invalid")
    if ext.directory_offset % cs or ext.directory_offset == 0:
        raise bad(f"bitmap_directory_offset={ext.directory_offset:#x} is not a cluster offset")
    if ext.directory_offset + ext.directory_size > file_size:
        raise bad(f"bitmap_directory_offset={ext.directory_offset:#x} is past the end of the file")
    directory = os.pread(fd, ext.directory_size, ext.directory_offset)
    if len(directory) != ext.directory_size:
        raise bad("bitmap directory is truncated")
    bitmaps: list[Qcow2Bitmap] = []
    names: set[str] = set()
    pos = 0
    for i in range(ext.nb_bitmaps):
        if pos + DIRECTORY_ENTRY.size > len(directory):
            raise bad(f"directory entry {i} runs past bitmap_directory_size")
        (table_offset, table_size, flags, btype, gbits, name_size,
         extra_size) = DIRECTORY_ENTRY.unpack_from(directory, pos)
        name_start = pos + DIRECTORY_ENTRY.size + extra_size
        entry_end = name_start + name_size
        if entry_end > len(directory):
            raise bad(f"directory entry {i} runs past bitmap_directory_size")
        if not 1 <= name_size <= MAX_NAME:
            raise bad(f"directory entry {i}: name_size={name_size} is outside 1..{MAX_NAME}")
        try:
            name = directory[name_start:entry_end].decode("utf-8")
        except UnicodeDecodeError:
            raise bad(f"directory entry {i}: name is not valid UTF-8") from None
        where = f"bitmap {name!r}"
        if name in names:
            raise bad(f"{where}: duplicate name")
        names.add(name)
        if btype != TYPE_DIRTY_TRACKING:
            raise bad(f"{where}: type={btype} is not 1 (dirty tracking)")
        if not MIN_GRANULARITY_BITS <= gbits <= MAX_GRANULARITY_BITS:
            raise bad(f"{where}: granularity_bits={gbits} is outside "
                      f"{MIN_GRANULARITY_BITS}..{MAX_GRANULARITY_BITS}")
        if table_offset % cs or table_offset == 0:
            raise bad(f"{where}: bitmap_table_offset={table_offset:#x} is not a cluster offset")
        expected = -(-hdr.size // ((1 << gbits) * 8 * cs))
        if table_size != expected or table_size > MAX_TABLE_ENTRIES:
            raise bad(f"{where}: bitmap_table_size={table_size} does not match the image "
                      f"(expected {expected})")
        if table_offset + 8 * table_size > file_size:
            raise bad(f"{where}: bitmap_table_offset={table_offset:#x} is past the end of the file")
        entry = DirectoryEntry(name, table_offset, table_size, flags, gbits, extra_size)
        problem = None
        if flags & FLAG_IN_USE:
            problem = "is in use (inconsistent: the image was not closed cleanly)"
        elif flags & ~FLAGS_KNOWN:
            problem = f"has unsupported flags {flags:#x}"
        elif extra_size:
            problem = f"has extra data ({extra_size} bytes), which is not supported"
        elif -(-hdr.size // (1 << gbits)) > 8 * MAX_DATA_BYTES:
            problem = f"is larger than {MAX_DATA_BYTES} bytes"
        bitmaps.append(Qcow2Bitmap(path, fd, file_size, cs, hdr.size, entry, problem))
        pos = (entry_end + 7) & ~7
    if pos < len(directory) and any(directory[pos:]):
        raise bad("bitmap_directory_size is larger than the entries it holds")
    return bitmaps
