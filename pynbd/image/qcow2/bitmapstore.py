"""Writing the persistent bitmaps of a qcow2 file (qcow2 spec, 'Bitmaps extension',
'Bitmap directory', 'Bitmap table').

:class:`BitmapStore` writes a bitmap's bits into its data clusters and table, and a
directory in place; it is shared by the live server (recording writes,
:mod:`pynbd.image.qcow2.recording`) and the offline ``pynbd bitmap`` operations.
It writes, never syncs on its own: the caller orders the stages (data clusters
synced, then the refcounts that count them, then the table pointing at them,
then the directory flags) as the crash rules of its own module say.

Every call runs on the caller's thread with the image's metadata lock held (the
lock the :class:`~pynbd.image.qcow2.refcounts.Refcounts` it allocates from needs).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

from bitarray import bitarray

from pynbd.image.base import ImageIOError
from pynbd.image.qcow2.bitmaps import (
    BME_OFFSET_MASK,
    TYPE_DIRTY_TRACKING,
    DIRECTORY_ENTRY,
    DirectoryEntry,
)
from pynbd.image.qcow2.census import u64s_be
from pynbd.image.qcow2.refcounts import Refcounts


def encode_directory(entries: Sequence[DirectoryEntry]) -> bytes:
    """The bitmap directory holding ``entries`` in order, each padded to 8 bytes
    (qcow2 spec, 'Bitmap directory'); extra data is not written (pynbd never
    writes a bitmap that has some)."""
    out = bytearray()
    for entry in entries:
        name = entry.name.encode("utf-8")
        out += DIRECTORY_ENTRY.pack(entry.table_offset, entry.table_size, entry.flags, TYPE_DIRTY_TRACKING,
                                 entry.granularity_bits, len(name), 0)
        out += name
        out += bytes(-len(out) % 8)
    return bytes(out)


class BitmapStore:
    """Writes bitmap data, tables and directories into one qcow2 file.

    ``fd`` is open for writing; clusters come from ``refcounts`` (allocated at
    refcount 1 in memory, freed by recording a free the caller applies once the
    table no longer pointing at them is durable). ImageIOError on a failed
    write, naming the file, the offset and what was written.
    """

    def __init__(self, fd: int, path: str, cluster_size: int, refcounts: Refcounts) -> None:
        self.fd = fd
        self.path = path
        self.cluster_size = cluster_size
        self.refcounts = refcounts

    def write_bits(self, table: list[int], bits: bitarray, slots: Iterable[int] | None = None) -> list[int]:
        """Write the data clusters of ``slots`` (every slot when None) of a bitmap whose
        table entries are ``table`` (changed in place) from ``bits`` (little endian,
        one bit per granule).

        A slot whose bits are all clear becomes entry 0 and its cluster is returned
        for the caller to free; a slot with bits set is written into its cluster, a
        new one allocated if it had none (or was the 'all ones' marker). Clusters
        are written whole, padded with zeros, as QEMU writes them. The table itself
        is not written (:meth:`write_table`). Returns the host offsets to free.
        """
        cs = self.cluster_size
        bits_per_cluster = cs * 8
        frees: list[int] = []
        for slot in range(len(table)) if slots is None else slots:
            part = bits[slot * bits_per_cluster:(slot + 1) * bits_per_cluster]
            host = table[slot] & BME_OFFSET_MASK
            if not part.any():
                if host:
                    frees.append(host)
                table[slot] = 0
                continue
            data = part.tobytes()
            if not host:
                host = self.refcounts.allocate(1)
                table[slot] = host
            self.pwrite(data + bytes(cs - len(data)), host, f"bitmap data cluster (slot {slot})")
        return frees

    def write_table(self, table_offset: int, table: Sequence[int]) -> None:
        """Write a bitmap table in place at ``table_offset``."""
        self.pwrite(u64s_be(table), table_offset, "bitmap table")

    def write_directory_in_place(self, directory_offset: int, entries: Sequence[DirectoryEntry]) -> None:
        """Rewrite the directory at ``directory_offset`` with ``entries``, which must encode
        to the size it has (only flags or table fields changed). A torn write leaves
        each entry either as it was or as it is now."""
        self.pwrite(encode_directory(entries), directory_offset, "bitmap directory")

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise ImageIOError(f"{self.path}: cannot sync bitmaps: {exc.strerror}", exc.errno) from None

    def pwrite(self, data: bytes, offset: int, what: str) -> None:
        try:
            written = os.pwrite(self.fd, data, offset)
        except OSError as exc:
            raise ImageIOError(f"{self.path}: cannot write the {what} at {offset:#x}: {exc.strerror}",
                               exc.errno) from None
        if written != len(data):
            raise ImageIOError(f"{self.path}: cannot write the {what} at {offset:#x}: short write")

