"""Changing the persistent bitmaps of a qcow2 file, all or nothing: add, remove, clear,
enable, disable and merge, with the checks of QEMU 7.2's ``block-dirty-bitmap-*``
commands (qcow2 spec, 'Bitmaps extension', 'Bitmap directory', 'Bitmap table').

A :class:`DirectoryEdit` applies operations in order to an in-memory copy of the
directory. Each one checks what QEMU checks and raises :class:`BitmapOpError` (one
line naming the file and the bitmap) without touching the file; :func:`commit` then
writes the result so that a crash at any point leaves the old bitmaps or the new ones,
never a mix (at worst leaked clusters, which ``qemu-img check -r leaks`` reclaims):

1. each bitmap whose bits changed gets a new table and new data clusters (a cluster
   of clear bits is table entry 0, as QEMU stores it), and the directory goes to new
   clusters; nothing on disk points at any of them yet;
2. the refcounts counting them are written (``Refcounts.write_allocations()``), and
   everything is synced;
3. the header switches to the new directory in one write, synced: only the bytes of
   the bitmaps extension that change when the image has one; otherwise the header
   extension area of cluster 0 is rewritten with the extension added (every other
   extension kept byte for byte) and autoclear bit 0 set in the same write; when the
   last bitmap goes, the extension is removed and the bit cleared the same way;
4. the old directory, and the old tables and data clusters of the rewritten and the
   removed bitmaps, are freed (``Refcounts.apply_frees()``), synced.

Nothing else is ever rewritten in place, so an operation that changes nothing (enabling
an enabled bitmap, clearing a clean one, merging a bitmap into itself) writes nothing.
Bitmaps flagged in use (inconsistent: not stored cleanly) keep their entries and
clusters verbatim; only removal works on them, as in QEMU.

Everything runs on the caller's thread; a server calling it holds the image's metadata
lock (the one its :class:`~pynbd.image.qcow2.refcounts.Refcounts` needs).
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, replace

from bitarray import bitarray
from bitarray.util import zeros

from pynbd.image.base import ImageError, ImageIOError
from pynbd.image.qcow2.bitmaps import (
    BME_OFFSET_MASK,
    FLAG_AUTO,
    FLAGS_KNOWN,
    MAX_BITMAPS,
    MAX_DATA_BYTES,
    MAX_DIRECTORY_BYTES,
    MAX_GRANULARITY_BITS,
    MAX_NAME,
    MAX_TABLE_ENTRIES,
    MIN_GRANULARITY_BITS,
    DirectoryEntry,
    Qcow2Bitmap,
    read_table,
)
from pynbd.image.qcow2.bitmapstore import BitmapStore, encode_directory
from pynbd.image.qcow2.header import AUTOCLEAR_BITMAPS, EXT_BITMAPS, EXT_END, BitmapsExtension, Qcow2Header
from pynbd.image.qcow2.refcounts import Refcounts
from pynbd.runlength import bit_runs

log = logging.getLogger(__name__)

# qcow2 spec, 'Header': backing_file_offset at byte 8, autoclear_features at byte 88;
# 'Header extensions': type and length, then the data padded to 8 bytes.
_BACKING_OFFSET_FIELD = 8
_AUTOCLEAR_FIELD = 88
_EXTENSION_HEADER = struct.Struct(">II")
#: qcow2 spec, 'Bitmaps extension': nb_bitmaps, reserved, directory size, directory offset.
_BITMAPS_EXTENSION = struct.Struct(">IIQQ")

#: Why QEMU refuses to use an in-use bitmap (and so does pynbd).
INCONSISTENT = ("is inconsistent (flagged in use: it was not stored cleanly); "
                "only --remove works on it")


class BitmapOpError(ImageError):
    """A bitmap operation refused before anything was written: one line naming the
    file and the bitmap."""


def default_granularity(cluster_size: int) -> int:
    """QEMU's granularity for a bitmap added without one: the cluster size, kept
    within 4 KiB..64 KiB (``bdrv_get_default_bitmap_granularity``)."""
    return min(max(cluster_size, 4096), 65536)


@dataclass(frozen=True, slots=True)
class BitmapSource:
    """Bitmaps of another image that ``merge`` may read: its path (for messages), its
    virtual size and its bitmaps (none for a raw file)."""

    path: str
    size: int
    bitmaps: Sequence[Qcow2Bitmap]


@dataclass(slots=True)
class _Pending:
    """One bitmap of the edited directory."""

    #: The entry the directory will hold; the table fields are the stored ones until commit.
    entry: DirectoryEntry
    #: The bitmap as loaded from the file; None for one added by this edit.
    stored: Qcow2Bitmap | None
    #: The bits, once an operation needed them (a copy: the loaded ones are not changed).
    bits: bitarray | None = None
    #: The bits differ from the stored ones: commit writes a new table and data clusters.
    rewrite: bool = False

    @property
    def inconsistent(self) -> bool:
        return self.stored is not None and self.stored.entry.in_use


class DirectoryEdit:
    """The bitmaps of one qcow2 file with operations applied in memory, in order.

    ``bitmaps`` are the file's bitmaps as :func:`~pynbd.image.qcow2.bitmaps.load_bitmaps`
    returned them. BitmapOpError at once if one cannot be written back as QEMU stores
    it (extra data, unknown flags, a table larger than QEMU's limit): QEMU refuses to
    open such an image for writing. Each operation raises BitmapOpError, or
    ImageIOError for bits it cannot read, and then leaves the edit as it was.
    """

    def __init__(self, path: str, header: Qcow2Header, bitmaps: Sequence[Qcow2Bitmap]) -> None:
        self.path = path
        self.header = header
        for bitmap in bitmaps:
            problem = _unwritable(bitmap.entry, header.cluster_size)
            if problem:
                raise BitmapOpError(f"{path}: cannot change bitmaps: bitmap {bitmap.name!r} {problem}, "
                                    "which QEMU does not write either")
        self._pending = [_Pending(b.entry, b) for b in bitmaps]
        self._removed: list[Qcow2Bitmap] = []
        #: Committed (commit() writes an edit once).
        self.spent = False

    # -- what the edit holds --

    @property
    def changed(self) -> bool:
        """Whether committing would change the file."""
        return bool(self._removed) or any(p.stored is None or p.rewrite or p.entry != p.stored.entry
                                          for p in self._pending)

    @property
    def entries(self) -> list[DirectoryEntry]:
        return [p.entry for p in self._pending]

    # -- operations (qemu-img bitmap's, QEMU's checks in QEMU's order) --

    def add(self, name: str, granularity: int | None = None, enabled: bool = True) -> None:
        """A new bitmap with every bit clear, recording writes unless ``enabled`` is
        False; ``granularity`` None is QEMU's default (:func:`default_granularity`)."""
        cs = self.header.cluster_size

        def refuse(why: str) -> BitmapOpError:
            return self._error("add", name, why)

        if not name:
            raise refuse("the name is empty")
        if granularity is None:
            granularity = default_granularity(cs)
        elif granularity < 1 << MIN_GRANULARITY_BITS or granularity & (granularity - 1):
            raise refuse(f"granularity {granularity} is not a power of 2 of at least {1 << MIN_GRANULARITY_BITS}")
        if self.header.version < 3:
            raise refuse("qcow2 v2 images cannot hold bitmaps ('qemu-img amend -o compat=1.1' upgrades it)")
        granularity_bits = granularity.bit_length() - 1
        if granularity_bits > MAX_GRANULARITY_BITS:
            raise refuse(f"granularity {granularity} exceeds the maximum ({1 << MAX_GRANULARITY_BITS})")
        nbits = -(-self.header.size // granularity)
        nbytes = -(-nbits // 8)
        if nbytes > MAX_DATA_BYTES or nbytes > MAX_TABLE_ENTRIES * cs:
            raise refuse(f"it would take {nbytes} bytes, more than QEMU allows ({MAX_DATA_BYTES}): "
                         "use a larger granularity")
        if nbytes == 0:
            raise refuse("the image is empty (0 bytes): there is nothing to track")
        name_bytes = len(name.encode("utf-8"))
        if name_bytes > MAX_NAME:
            raise refuse(f"the name is {name_bytes} bytes long, more than {MAX_NAME}")
        if len(self._pending) >= MAX_BITMAPS:
            raise refuse(f"the image holds {MAX_BITMAPS} bitmaps already, the most qcow2 allows")
        entry = DirectoryEntry(name, 0, -(-nbytes // cs), FLAG_AUTO if enabled else 0, granularity_bits, 0)
        if len(encode_directory([*self.entries, entry])) > MAX_DIRECTORY_BYTES:
            raise refuse(f"the bitmap directory would exceed {MAX_DIRECTORY_BYTES} bytes")
        if self._find(name) is not None:
            raise refuse("a bitmap of this name exists")
        self._pending.append(_Pending(entry, None, zeros(nbits, "little"), rewrite=True))

    def remove(self, name: str) -> None:
        """Remove the bitmap (an inconsistent one too)."""
        pending = self._existing("remove", name)
        self._pending.remove(pending)
        if pending.stored is not None:
            self._removed.append(pending.stored)

    def clear(self, name: str) -> None:
        """Clear every bit of the bitmap."""
        pending = self._usable("clear", name)
        bits = self._bits(pending)
        if bits.any():
            bits.setall(0)
            pending.rewrite = True

    def enable(self, name: str) -> None:
        """Make the bitmap record writes (flag ``auto``)."""
        self._set_flags("enable", name, FLAG_AUTO, FLAG_AUTO)

    def disable(self, name: str) -> None:
        """Stop the bitmap from recording writes."""
        self._set_flags("disable", name, FLAG_AUTO, 0)

    def reorder(self, names: Sequence[str]) -> None:
        """Put the bitmaps in the directory in the order of ``names`` (all of them)."""
        position = {name: i for i, name in enumerate(names)}
        self._pending.sort(key=lambda pending: position[pending.entry.name])

    def set_bits(self, name: str, bits: bitarray) -> None:
        """The bitmap's bits become a copy of ``bits`` (a running server's, after one of
        its operations changed them)."""
        pending = self._usable("set the bits of", name)
        pending.bits = bits.copy()
        pending.rewrite = True

    def merge(self, target: str, source: str, other: BitmapSource | None = None) -> None:
        """Set in bitmap ``target`` every granule that overlaps a granule set in bitmap
        ``source`` of this image (``other`` None: as this edit holds it now) or of
        ``other``; the two may differ in granularity, not in image size. Merging a
        bitmap into itself changes nothing. Errors in QEMU's order: the target or
        the source not found, the source inconsistent, the sizes, the target inconsistent.
        """
        dst = self._existing("merge", target)
        where = "" if other is None else f" in {other.path}"
        size = self.header.size
        if other is None:
            src = self._find(source)
            if src is None:
                raise self._error("merge", target, f"source bitmap {source!r} not found")
            if src.inconsistent:
                raise self._error("merge", target, f"source bitmap {source!r} {INCONSISTENT}")
            src_bits, src_granularity, src_size = self._bits(src), src.entry.granularity, size
        else:
            found = [b for b in other.bitmaps if b.name == source]
            if not found:
                raise self._error("merge", target, f"source bitmap {source!r} not found{where}")
            if found[0].problem is not None:
                why = INCONSISTENT if found[0].entry.in_use else found[0].problem
                raise self._error("merge", target, f"source bitmap {source!r}{where} {why}")
            src_bits, src_granularity, src_size = found[0].bits(), found[0].granularity, other.size
        if src_size != size:
            raise self._error("merge", target, f"source bitmap {source!r}{where} is of another size "
                              f"(the target's image is {size} bytes, the source's {src_size})")
        if dst.inconsistent:
            raise self._error("merge", target, INCONSISTENT)
        if other is None and src is dst:
            return
        bits = self._bits(dst)
        merged = bits | granules_covering(src_bits, src_granularity, dst.entry.granularity, size)
        if merged != bits:
            dst.bits = merged
            dst.rewrite = True

    # -- helpers --

    def _error(self, op: str, name: str, why: str) -> BitmapOpError:
        into = " into" if op == "merge" else ""
        return BitmapOpError(f"{self.path}: cannot {op}{into} bitmap {name!r}: {why}")

    def _find(self, name: str) -> _Pending | None:
        return next((p for p in self._pending if p.entry.name == name), None)

    def _existing(self, op: str, name: str) -> _Pending:
        pending = self._find(name)
        if pending is None:
            raise self._error(op, name, "no such bitmap")
        return pending

    def _usable(self, op: str, name: str) -> _Pending:
        pending = self._existing(op, name)
        if pending.inconsistent:
            raise self._error(op, name, INCONSISTENT)
        return pending

    def _set_flags(self, op: str, name: str, mask: int, value: int) -> None:
        pending = self._usable(op, name)
        pending.entry = replace(pending.entry, flags=pending.entry.flags & ~mask | value)

    def _bits(self, pending: _Pending) -> bitarray:
        if pending.bits is None:
            assert pending.stored is not None
            pending.bits = pending.stored.bits().copy()
        return pending.bits


def _unwritable(entry: DirectoryEntry, cluster_size: int) -> str | None:
    """Why QEMU would refuse to store a directory holding ``entry`` (None: it would not)."""
    if entry.extra_data_size:
        return f"has extra data ({entry.extra_data_size} bytes)"
    if entry.flags & ~FLAGS_KNOWN:
        return f"has unknown flags {entry.flags:#x}"
    if entry.table_size * cluster_size > MAX_DATA_BYTES:
        return f"has a table of {entry.table_size} clusters, more than {MAX_DATA_BYTES} bytes of bitmap"
    return None


def granules_covering(bits: bitarray, granularity: int, target_granularity: int, size: int) -> bitarray:
    """A bitarray of granules of ``target_granularity`` over ``size`` guest bytes, set where
    they overlap a granule set in ``bits`` (of ``granularity``), as QEMU's merge of bitmaps
    of different granularities does."""
    if granularity == target_granularity:
        return bits
    out = zeros(-(-size // target_granularity), "little")
    pos = 0
    for length, value in bit_runs(bits):
        if value:
            start, end = pos * granularity, min((pos + length) * granularity, size)
            out[start // target_granularity:-(-end // target_granularity)] = 1
        pos += length
    return out


# --- writing -------------------------------------------------------------------------


def commit(fd: int, path: str, header: Qcow2Header, refcounts: Refcounts,
           edit: DirectoryEdit, apply_frees: bool = True) -> list[DirectoryEntry] | None:
    """Write what ``edit`` holds into the qcow2 file open for writing as ``fd`` in the
    order of the module doc; ``header`` is the file's (its bitmaps extension and autoclear
    fields are updated). Returns the new directory's entries, or None when nothing
    changed (nothing is written then).

    Before the first write, everything that could refuse is checked: the old tables
    to free are read (ImageIOError if one is unreadable or points at a cluster not
    in use) and the header cluster must have room for the extension (BitmapOpError).
    A write that fails later raises ImageIOError; the file then still holds the old
    bitmaps (plus leaked clusters) unless the header switch itself was written.

    With ``apply_frees`` False (a server whose writer has frees of its own waiting for
    their L2 tables to be durable) the old clusters' frees are only recorded, for the
    writer's next flush to apply.
    """
    assert not edit.spent, "an edit is committed once"
    if not edit.changed:
        return None
    cs = header.cluster_size
    store = BitmapStore(fd, path, cs, refcounts)
    pending = edit._pending
    stale = [p.stored for p in pending if p.rewrite and p.stored is not None] + edit._removed
    old_clusters = [cluster for bitmap in stale for cluster in _stored_clusters(path, fd, bitmap.entry, cs)]
    old_ext = header.bitmaps_ext if header.autoclear_features & AUTOCLEAR_BITMAPS else None
    if old_ext is not None:
        old_clusters.append((old_ext.directory_offset, -(-old_ext.directory_size // cs)))
    for offset, count in old_clusters:
        _check_in_use(path, refcounts, offset, count, cs)
    entries = [p.entry for p in pending]
    directory = encode_directory(entries)
    placeholder = BitmapsExtension(len(entries), len(directory), 0) if entries else None
    _header_area(_read_cluster0(fd, path, cs), header, placeholder, path)  # room for it?

    # 1. New data clusters, tables and directory, referenced by nothing yet.
    for p in pending:
        if p.rewrite:
            assert p.bits is not None
            table = [0] * p.entry.table_size
            store.write_bits(table, p.bits)  # from an empty table: new clusters, nothing to free
            clusters = -(-8 * len(table) // cs)
            table_offset = refcounts.allocate(clusters)
            store.write_table(table_offset, table + [0] * (clusters * cs // 8 - len(table)))
            p.entry = replace(p.entry, table_offset=table_offset)
    entries = [p.entry for p in pending]
    directory = encode_directory(entries)  # now with the new tables' offsets (same length)
    new_ext = None
    if entries:
        directory_offset = refcounts.allocate(-(-len(directory) // cs))
        store.pwrite(directory + bytes(-len(directory) % cs), directory_offset, "bitmap directory")
        new_ext = BitmapsExtension(len(entries), len(directory), directory_offset)
    # 2. Their refcounts, then everything durable before the header points at it.
    refcounts.write_allocations()
    store.sync()
    # 3. The switch: one write into cluster 0 (read again: write_allocations may have
    #    moved the refcount table, which changes header fields).
    cluster0 = _read_cluster0(fd, path, cs)
    area = _header_area(cluster0, header, new_ext, path)
    first = next(i for i in range(len(area) + 1) if i == len(area) or area[i] != cluster0[i])
    if first < len(area):
        last = max(i for i in range(len(area)) if area[i] != cluster0[i])
        store.pwrite(area[first:last + 1], first, "header")
        store.sync()
    header.bitmaps_ext = new_ext
    header.autoclear_features = struct.unpack_from(">Q", area, _AUTOCLEAR_FIELD)[0]
    log.debug("%s: bitmap directory now %s", path, new_ext)
    # 4. What nothing points at any more.
    for offset, count in old_clusters:
        refcounts.free(offset, count)
    if apply_frees:
        refcounts.apply_frees()
        store.sync()
    edit.spent = True
    return entries


def _stored_clusters(path: str, fd: int, entry: DirectoryEntry, cluster_size: int) -> list[tuple[int, int]]:
    """(offset, clusters) of a stored bitmap's table and data clusters."""
    table = read_table(path, fd, entry)
    spans = [(entry.table_offset, -(-8 * entry.table_size // cluster_size))]
    for i, value in enumerate(table):
        host = value & BME_OFFSET_MASK
        if host % cluster_size:
            raise ImageIOError(f"{path}: bitmap {entry.name!r}: table entry {i}={value:#x} "
                               "is not cluster aligned")
        if host:
            spans.append((host, 1))
    return spans


def _check_in_use(path: str, refcounts: Refcounts, offset: int, count: int, cluster_size: int) -> None:
    """The clusters about to be freed must have a refcount: a free that fails after the
    switch would leave the refcounts half done."""
    for cluster in range(offset, offset + count * cluster_size, cluster_size):
        if refcounts.get(cluster) < 1:
            raise ImageIOError(f"{path}: bitmap metadata at {cluster:#x} has refcount 0 "
                               "(corrupt image: run 'qemu-img check -r all')")


def _read_cluster0(fd: int, path: str, cluster_size: int) -> bytes:
    try:
        data = os.pread(fd, cluster_size, 0)
    except OSError as exc:
        raise ImageIOError(f"{path}: cannot read the header: {exc.strerror}", exc.errno) from None
    if len(data) != cluster_size:
        raise ImageIOError(f"{path}: the header cluster is truncated")
    return data


def _header_area(cluster0: bytes, header: Qcow2Header, ext: BitmapsExtension | None, path: str) -> bytes:
    """Cluster 0 from byte 0 to the end of what the header uses (the extensions and the
    backing file name) as it must be with the bitmaps extension ``ext`` (None: without
    it) and autoclear bit 0 to match; at least as long as the old area, zero padded.

    The extension replaces an existing one where it stands, else goes last; every
    other extension is kept byte for byte; the backing file name follows the end of the
    extensions, where QEMU puts it. BitmapOpError if the area would not fit in cluster 0.
    """
    assert header.version >= 3
    backing_offset, backing_size = struct.unpack_from(">QI", cluster0, _BACKING_OFFSET_FIELD)
    pos = header.header_length
    extensions: list[bytes] = []
    replaced = False
    new = b"" if ext is None else (_EXTENSION_HEADER.pack(EXT_BITMAPS, _BITMAPS_EXTENSION.size)
                                  + _BITMAPS_EXTENSION.pack(ext.nb_bitmaps, 0, ext.directory_size,
                                                            ext.directory_offset))
    while True:  # parse_header checked the list
        ext_type, ext_len = _EXTENSION_HEADER.unpack_from(cluster0, pos)
        if ext_type == EXT_END:
            break
        end = pos + _EXTENSION_HEADER.size + (ext_len + 7 & ~7)
        if ext_type == EXT_BITMAPS:
            extensions.append(new)
            replaced = True
        else:
            extensions.append(cluster0[pos:end])
        pos = end
    if not replaced:
        extensions.append(new)
    old_end = pos + _EXTENSION_HEADER.size
    area = bytearray(cluster0[:header.header_length])
    autoclear = struct.unpack_from(">Q", area, _AUTOCLEAR_FIELD)[0] & ~AUTOCLEAR_BITMAPS
    struct.pack_into(">Q", area, _AUTOCLEAR_FIELD, autoclear | (AUTOCLEAR_BITMAPS if ext else 0))
    area += b"".join(extensions) + bytes(_EXTENSION_HEADER.size)
    if backing_offset:
        old_end = max(old_end, backing_offset + backing_size)
        struct.pack_into(">Q", area, _BACKING_OFFSET_FIELD, len(area))
        area += cluster0[backing_offset:backing_offset + backing_size]
    if len(area) > len(cluster0):
        raise BitmapOpError(f"{path}: cannot change bitmaps: the bitmaps header extension does not fit "
                            f"in the header cluster ({len(cluster0)} bytes)")
    return bytes(area + bytes(max(0, old_end - len(area))))
