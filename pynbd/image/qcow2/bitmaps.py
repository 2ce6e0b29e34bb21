"""Persistent dirty bitmaps of a qcow2 image (qcow2 spec, 'Bitmaps'): parsing and loading.

The bitmaps extension points at a directory of variable-length entries; each
entry points at a bitmap table whose entries point at data clusters holding
the bit array (LSB first, one bit per granule). Bitmap data is loaded lazily
into the :class:`~pynbd.image.dirtybitmap.DirtyBitmap` the first time it is
needed. Writing them back: :mod:`pynbd.image.qcow2.bitmapstore` and
:mod:`pynbd.image.qcow2.bitmapdir`.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass

from bitarray import bitarray

from pynbd.image.base import BitmapInfo, ImageError, ImageIOError
from pynbd.image.dirtybitmap import DirtyBitmap
from pynbd.image.qcow2.header import AUTOCLEAR_BITMAPS, Qcow2Header

log = logging.getLogger(__name__)

# qcow2 spec, 'Bitmaps extension' and 'Bitmap directory', with QEMU 7.2's limits
MAX_BITMAPS = 65535
MAX_DIRECTORY_BYTES = 65535 * 1024
MAX_NAME = 1023
MAX_TABLE_ENTRIES = 0x8000000
MAX_DATA_BYTES = 512 << 20
MIN_GRANULARITY_BITS = 9
MAX_GRANULARITY_BITS = 31

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


class Qcow2Bitmap(DirtyBitmap):
    """One persistent bitmap of a qcow2 image, its directory entry and table. Its bits are
    read on first use; it records writes when its entry says so (flag ``auto``) and it is
    consistent (``problem`` None: not in use, nothing pynbd cannot read)."""

    persistent = True

    def __init__(self, path: str, fd: int, file_size: int, cluster_size: int, image_size: int,
                 entry: DirectoryEntry, problem: str | None, bits: bitarray | None = None) -> None:
        super().__init__(entry.name, entry.granularity, image_size, bits)
        self.path = path
        self.entry = entry
        self.problem = problem
        self.recording = entry.enabled and problem is None
        self._fd = fd
        self._file_size = file_size
        self._cluster_size = cluster_size
        #: The bitmap table's entries, read with the bits (:meth:`bits`).
        self.table: list[int] = []

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

    def info(self) -> BitmapInfo:
        """See :meth:`DirtyBitmap.info`; busy False unless a reader says so, and an
        unreadable bitmap is logged as a warning."""
        info = super().info()
        if info.problem and self.problem is None:
            log.warning("%s: bitmap %r %s", self.path, self.name, info.problem)
        return info

    def flags(self) -> tuple[str, ...]:
        return tuple(word for flag, word in ((FLAG_IN_USE, "in-use"), (FLAG_AUTO, "auto"))
                     if self.entry.flags & flag)


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
