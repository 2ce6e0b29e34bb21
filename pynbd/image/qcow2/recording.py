"""Recording writes into the enabled persistent bitmaps of a writable qcow2 image,
and storing them so that a crash never leaves a bitmap that looks valid but lies.

Every WRITE, WRITE_ZEROES and TRIM dirties the granules its range touches in every
enabled bitmap (flag ``auto``) of the top image, before its data is written;
disabled bitmaps and bitmaps found inconsistent at open are never touched.

The crash rule (qcow2 spec, 'Bitmap directory': the ``in_use`` flag marks a bitmap
whose on-disk bits may be stale): on disk, an enabled bitmap is either valid - its
bits cover every write that may have reached the image - or flagged in use.

- A write that dirties a granule not dirty yet waits until the enabled bitmaps are
  flagged in use on disk (the directory written and synced) - once, not per write:
  later writes find them flagged and only set bits in memory. A write whose
  granules are all dirty already needs nothing (the stored bits cover it).
- :meth:`BitmapRecorder.store` (on FLUSH, FUA and at a clean stop) writes the bits
  changed since the last store into their data clusters, syncs, makes the refcounts
  and tables that point at them durable, then clears the in-use flags (synced).
  While it runs, writes that would dirty new granules wait for it.

So after SIGKILL an enabled bitmap is valid exactly when no granule was dirtied
since the last completed store, and flagged in use otherwise; QEMU then reports it
inconsistent, and pynbd leaves it out. Disabled bitmaps are valid always.

Thread model: :meth:`~BitmapRecorder.record` runs in the worker thread of each
change, or on the event loop without waiting (``wait=False``, the inline write
path); :meth:`~BitmapRecorder.store` in the FLUSH worker thread or at close. Bits
change under the image's metadata lock (block status reads them under it);
marking and storing are serialised by a lock of their own, never taken with the
metadata lock held.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import TYPE_CHECKING

from pynbd.image.base import ImageError
from pynbd.image.dirtybitmap import DirtyBitmap
from pynbd.image.qcow2.bitmaps import FLAG_IN_USE, Qcow2Bitmap
from pynbd.image.qcow2.bitmapstore import BitmapStore, encode_directory

if TYPE_CHECKING:
    from pynbd.image.qcow2.image import Qcow2Image
    from pynbd.image.qcow2.writer import Qcow2Writer

log = logging.getLogger(__name__)


class BitmapRecorder:
    """The bitmaps of one writable qcow2 image: recording, storing (see the module doc),
    and the live operations of :mod:`pynbd.image.qcow2.bitmapops`.

    Made by :meth:`Qcow2Image.make_writable`; raises ImageError if a bitmap the image
    records into cannot be read, or if the directory cannot be rewritten in place
    (an entry with extra data), so the image is not opened for writing.
    """

    def __init__(self, image: Qcow2Image, writer: Qcow2Writer) -> None:
        top = image.top
        self.image = image
        self.path = top.path
        self.lock = image.metadata_lock
        self.writer = writer
        #: Every bitmap of the image, oldest first: the file's in directory order, then those
        #: made at run time (persistent or not) in the order they were made; changed under
        #: :attr:`lock`.
        self.bitmaps: list[DirtyBitmap] = list(top.bitmaps)
        #: The bitmaps the file held when it was opened (QEMU keeps them first in the directory).
        self.loaded = tuple(top.bitmaps)
        #: The names in the file's bitmap directory, in its order.
        self.directory_order = [b.name for b in top.bitmaps]
        ext = top.header.bitmaps_ext
        if self.recording:
            assert ext is not None
            if len(encode_directory([b.entry for b in self.stored])) != ext.directory_size:
                raise ImageError(f"{self.path}: the bitmap directory holds data pynbd does not write "
                                 "(extra data in an entry); cannot record writes into its bitmaps")
            for bitmap in self.recording:
                bitmap.bits()  # ImageIOError (an ImageError) if unreadable
        self.store_file = BitmapStore(writer.fd, self.path, top.cluster_size, writer.refcounts)
        #: The persistent recording bitmaps are flagged in use on disk.
        self._flagged = False
        #: A store or an operation is writing: writes that would dirty new granules wait.
        self._storing = False
        #: Table slots whose bits changed since the last store, per persistent bitmap name.
        self._changed: dict[str, set[int]] = {}
        #: Serialises flagging, storing and operations (never taken under the metadata lock).
        self.disk_lock = threading.Lock()
        #: What a write needs of each recording bitmap, gathered once (:meth:`refresh`).
        self._targets: list[_Target] = []
        self._bits_per_cluster = top.cluster_size * 8
        self.refresh()

    @property
    def recording(self) -> list[DirtyBitmap]:
        """The bitmaps writes go into (enabled and consistent)."""
        return [b for b in self.bitmaps if b.recording and b.consistent]

    def refresh(self) -> None:
        """Take the bitmaps' recording flags and the list as they are now (after an
        operation changed them: bitmapops). Under :attr:`lock`."""
        self._targets = [_Target(b) for b in self.recording]

    @property
    def stored(self) -> list[Qcow2Bitmap]:
        """The bitmaps in the image file, in directory order (a persistent bitmap made since
        the last directory write, not in the file yet, last)."""
        position = {name: i for i, name in enumerate(self.directory_order)}
        stored = [b for b in self.bitmaps if isinstance(b, Qcow2Bitmap)]
        return sorted(stored, key=lambda b: position.get(b.name, len(position)))

    # -- recording ------------------------------------------------------------------------

    def record(self, offset: int, length: int, wait: bool = True) -> bool:
        """Dirty guest bytes ``[offset, offset+length)`` in every recording bitmap before
        their data is written. With ``wait`` False (on the event loop), True only if that
        needed no I/O and no lock held elsewhere; else False and nothing changed. With
        ``wait``, flags the bitmaps in use on disk first when needed (ImageIOError if
        that write fails: the change must not go ahead)."""
        targets = self._targets
        if length <= 0 or not targets:
            return True
        # Most writes go where every bitmap is dirty already: nothing to do, and no lock
        # needed to see it. Bits are set (cleared only by bitmap operations, one C-level
        # operation each under the lock), so what this sees the locked check would see
        # too, if only a moment earlier: the write's data comes after either way.
        end = offset + length
        seen = _dirtying(targets, offset, end)
        if not seen:
            return True
        if self.lock.acquire(blocking=wait):
            try:
                if self._set_bits(offset, end, flagging_done=False, seen=(targets, seen)):
                    return True
            finally:
                self.lock.release()
        if not wait:
            return False
        with self.disk_lock:
            with self.lock:
                flagged = self._flagged
            if not flagged:
                self._write_flags(in_use=True)
                with self.lock:
                    self._flagged = True
            with self.lock:
                self._set_bits(offset, end, flagging_done=True)
        return True

    def _set_bits(self, offset: int, end: int, flagging_done: bool,
                  seen: tuple[list[_Target], list[tuple[_Target, int, int]]] | None = None) -> bool:
        """Under the metadata lock: set the bits of guest bytes ``[offset, end)`` and True
        if that is safe now (the bits are all set already, or only bitmaps in memory
        change, or the persistent ones are flagged in use and no store is reading them),
        else False and nothing set. Per request a few operations per bitmap, none per
        granule.

        ``seen``: a target list and what :func:`_dirtying` found in it without the lock a
        moment ago. When every target of the current list was found dirtying, that is
        still so (bits found clean may have been set since: set again, harmless); else
        they are looked at again (a bitmap operation may have cleared others)."""
        targets = self._targets
        if seen is not None and seen[0] is targets and len(seen[1]) == len(targets):
            dirtying = seen[1]
        else:
            dirtying = _dirtying(targets, offset, end)
        if not dirtying:
            return True
        if not flagging_done and (not self._flagged or self._storing) and \
                any(target.persistent for target, _, _ in dirtying):
            return False
        per_cluster = self._bits_per_cluster
        changed = self._changed
        for target, first, last in dirtying:
            if last - first == 1:
                target.bits[first] = 1
            else:
                target.bits[first:last] = 1
            if target.persistent:
                slots = changed.get(target.name)
                if slots is None:
                    slots = changed[target.name] = set()
                first_slot, last_slot = first // per_cluster, (last - 1) // per_cluster
                if first_slot == last_slot:
                    slots.add(first_slot)
                else:
                    slots.update(range(first_slot, last_slot + 1))
        return True

    # -- storing ----------------------------------------------------------------------------

    @contextmanager
    def quiesced(self) -> Iterator[None]:
        """Hold :attr:`disk_lock` with the recorded bits stored and writes that would dirty
        new granules waiting, for an operation that rewrites bitmaps (bitmapops)."""
        with self.disk_lock:
            with self.lock:
                storing, self._storing = self._storing, True
            try:
                self.store_locked()
                yield
            finally:
                with self.lock:
                    self._storing = storing

    def store(self) -> None:
        """Write the bits changed since the last store and clear the in-use flags, each
        stage synced before the next (module doc). Nothing when the bitmaps are not
        flagged. ImageIOError if a write fails: the flags stay set (the bitmaps are then
        inconsistent on disk, never stale-looking) and the next store writes again."""
        with self.disk_lock:
            self.store_locked()

    def store_locked(self) -> None:
        """:meth:`store` for a caller holding :attr:`disk_lock`."""
        with self.lock:
            if not self._flagged:
                return
            storing, self._storing = self._storing, True
            changed, self._changed = self._changed, {}
        try:
            self._store(changed)
        except BaseException:
            with self.lock:
                for name, slots in changed.items():
                    self._changed.setdefault(name, set()).update(slots)
            raise
        finally:
            with self.lock:
                self._storing = storing

    def _store(self, changed: dict[str, set[int]]) -> None:
        """The stages of :meth:`store`. The writer's own allocations may be in flight:
        writing their refcounts early costs at most a leak, and frees are only recorded
        here, for the writer's next flush to apply after its own stages."""
        store = self.store_file
        refcounts = self.writer.refcounts
        frees: list[int] = []
        with self.lock:
            written = [b for b in self.stored if changed.get(b.name)]
            for bitmap in written:
                frees += store.write_bits(bitmap.table, bitmap.bits(), sorted(changed[bitmap.name]))
        store.sync()  # the data clusters, before the refcounts and tables that reach them
        with self.lock:
            if refcounts.allocations_pending:
                refcounts.write_allocations()
        store.sync()
        for bitmap in written:
            store.write_table(bitmap.entry.table_offset, bitmap.table)
        store.sync()
        self._write_flags(in_use=False)
        with self.lock:
            self._flagged = False
            # Applied by the writer's next flush (at the latest when the image closes),
            # after the tables that no longer point at them were synced above.
            for host in frees:
                refcounts.free(host, 1)

    def _write_flags(self, in_use: bool) -> None:
        """Rewrite the directory in place with the persistent recording bitmaps' in-use
        flag set or clear (the others as they are), synced."""
        with self.lock:
            stored = self.stored
            directory = self.image.top.header.bitmaps_ext
        if directory is None:
            return
        entries = []
        for bitmap in stored:
            entry = bitmap.entry
            if bitmap.recording and bitmap.consistent:
                flags = entry.flags | FLAG_IN_USE if in_use else entry.flags & ~FLAG_IN_USE
                entry = replace(entry, flags=flags)
            entries.append(entry)
        self.store_file.write_directory_in_place(directory.directory_offset, entries)
        self.store_file.sync()
        log.debug("%s: bitmaps %s on disk", self.path, "flagged in use" if in_use else "stored")


def _dirtying(targets: list[_Target], offset: int, end: int) -> list[tuple[_Target, int, int]]:
    """The targets with a clean granule among those guest bytes ``[offset, end)`` touch,
    each with those granules ``[first, last)``."""
    dirtying = []
    last_byte = end - 1
    for target in targets:
        shift = target.shift
        first, last = offset >> shift, (last_byte >> shift) + 1
        if last > target.nbits:
            last = target.nbits
        if target.bits.find(0, first, last) >= 0:
            dirtying.append((target, first, last))
    return dirtying


class _Target:
    """What recording a write needs of one bitmap, looked up once (not per request)."""

    __slots__ = ("name", "bits", "shift", "nbits", "persistent")

    def __init__(self, bitmap: DirtyBitmap) -> None:
        self.name = bitmap.name
        self.bits = bitmap.bits()
        #: log2 of the granularity (a power of two).
        self.shift = bitmap.granularity.bit_length() - 1
        self.nbits = bitmap.nbits
        self.persistent = bitmap.persistent
