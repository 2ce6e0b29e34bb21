"""Changing the bitmaps of a served, writable qcow2 image: QMP's ``block-dirty-bitmap-*``
commands and their ``transaction``, with QEMU 7.2's checks and messages.

:func:`apply_actions` runs a list of :class:`BitmapAction` on one image, all or nothing:
each action is checked and applied in memory in order (a later action sees the earlier
ones, as in a QEMU transaction), and the first refusal undoes the earlier ones and
raises :class:`~pynbd.image.qcow2.bitmapdir.BitmapOpError` with QEMU's message. Then
what changed in persistent bitmaps is written with
:func:`pynbd.image.qcow2.bitmapdir.commit` (new clusters, one header switch, the old ones
freed at the writer's next flush), after the recorded bits were stored, so the file
never holds a bitmap that looks valid but lies.

Atomic against writes: the recorder's disk lock is held and new granules wait
(:meth:`~pynbd.image.qcow2.recording.BitmapRecorder.quiesced`), and the in-memory
changes happen under the image's metadata lock, where every write records its range.
A write recorded before the call is in the bitmaps as they were; one recorded after,
in the bitmaps as they are now.

Runs in a worker thread (it writes and syncs). The caller announces the whole image on
its change feed before and after, so block status caches drop the bitmaps' runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bitarray import bitarray
from bitarray.util import zeros

from pynbd.image.base import ImageIOError
from pynbd.image.dirtybitmap import DirtyBitmap
from pynbd.image.qcow2.bitmapdir import BitmapOpError, DirectoryEdit, commit, default_granularity, granules_covering
from pynbd.image.qcow2.bitmaps import (
    FLAG_AUTO,
    MAX_GRANULARITY_BITS,
    MAX_NAME,
    DirectoryEntry,
    Qcow2Bitmap,
    read_table,
)
from pynbd.image.qcow2.recording import BitmapRecorder

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BitmapAction:
    """One ``block-dirty-bitmap-OP`` on this image's bitmap ``name`` (merge: the target).

    ``sources`` (merge) are names of this image's bitmaps or bitmaps of other images,
    which the caller looked up."""

    op: str
    name: str
    granularity: int | None = None
    persistent: bool = False
    disabled: bool = False
    sources: tuple[str | DirtyBitmap, ...] = ()


def apply_actions(recorder: BitmapRecorder, node: str, actions: Sequence[BitmapAction],
                  dry_run: bool = False) -> None:
    """Apply ``actions`` to the image ``recorder`` records for (node name ``node`` in
    messages), all or nothing (module doc). BitmapOpError: an action was refused, nothing
    changed; ImageIOError: writing the persistent bitmaps failed (memory is rolled back
    unless the file already holds the new directory). ``dry_run``: only check that they
    would apply now (applied in memory, then undone)."""
    with recorder.quiesced():
        with recorder.lock:
            try:
                _apply_all(recorder, node, actions, dry_run)
            finally:
                recorder.refresh()


def _apply_all(recorder: BitmapRecorder, node: str, actions: Sequence[BitmapAction], dry_run: bool) -> None:
    """apply_actions' work, with the recorder quiesced and its metadata lock held."""
    stored_before = recorder.stored
    undo: list[Callable[[], None]] = []
    rewritten: set[str] = set()  # names whose bits an action changed
    removing: list[DirtyBitmap] = []
    try:
        for action in actions:
            _apply(recorder, node, action, undo, rewritten, removing)
        _remove(recorder, removing, undo)
    except BaseException:
        _roll_back(undo)
        raise
    if dry_run:
        _roll_back(undo)
        return
    header = recorder.image.top.header
    old_directory = header.bitmaps_ext
    try:
        _persist(recorder, stored_before, rewritten)
    except BaseException:
        if header.bitmaps_ext == old_directory:  # the file still holds the old ones
            _roll_back(undo)
        raise


def _roll_back(undo: list[Callable[[], None]]) -> None:
    for step in reversed(undo):
        step()


def _find(recorder: BitmapRecorder, name: str) -> DirtyBitmap:
    for bitmap in recorder.bitmaps:
        if bitmap.name == name:
            return bitmap
    raise BitmapOpError(f"Dirty bitmap '{name}' not found")


def _check(bitmap: DirtyBitmap, allow_inconsistent: bool = False) -> None:
    """QEMU's bdrv_dirty_bitmap_check: busy first, then inconsistent."""
    if bitmap.busy:
        raise BitmapOpError(f"Bitmap '{bitmap.name}' is currently in use by another operation "
                            "and cannot be used")
    if not allow_inconsistent and not bitmap.consistent:
        raise BitmapOpError(f"Bitmap '{bitmap.name}' is inconsistent and cannot be used")


def _apply(recorder: BitmapRecorder, node: str, action: BitmapAction, undo: list[Callable[[], None]],
           rewritten: set[str], removing: list[DirtyBitmap]) -> None:
    bitmaps = recorder.bitmaps
    if action.op == "add":
        bitmap = _new_bitmap(recorder, node, action)
        bitmaps.append(bitmap)
        undo.append(lambda: bitmaps.remove(bitmap))
        return
    bitmap = _find(recorder, action.name)
    if action.op == "remove":
        # As in a QEMU transaction: the bitmap goes at the end, busy until then.
        _check(bitmap, allow_inconsistent=True)
        bitmap.readers += 1
        removing.append(bitmap)
        undo.append(lambda: setattr(bitmap, "readers", bitmap.readers - 1))
    elif action.op in ("enable", "disable"):
        _check(bitmap)
        was = bitmap.recording
        bitmap.recording = action.op == "enable"
        undo.append(lambda: setattr(bitmap, "recording", was))
    elif action.op == "clear":
        _check(bitmap)
        _set_bits(bitmap, zeros(bitmap.nbits, "little"), undo, rewritten)
    elif action.op == "merge":
        _check(bitmap)
        merged = bitmap.bits().copy()
        for source in action.sources:
            src = _find(recorder, source) if isinstance(source, str) else source
            _check(src)
            if src.image_size != bitmap.image_size:
                raise BitmapOpError(f"Bitmaps are of different sizes (destination size is "
                                    f"{bitmap.image_size}, source size is {src.image_size}) "
                                    "and can't be merged")
            merged |= granules_covering(src.bits(), src.granularity, bitmap.granularity, bitmap.image_size)
        _set_bits(bitmap, merged, undo, rewritten)
    else:
        raise BitmapOpError(f"unknown bitmap operation {action.op!r}")


def _remove(recorder: BitmapRecorder, removing: list[DirtyBitmap], undo: list[Callable[[], None]]) -> None:
    """The removals of the actions, once every action was accepted."""
    bitmaps = recorder.bitmaps
    for bitmap in removing:
        bitmap.readers -= 1
        index = bitmaps.index(bitmap)
        del bitmaps[index]
        undo.append(lambda bitmap=bitmap, index=index: (bitmaps.insert(index, bitmap),
                                                         setattr(bitmap, "readers", bitmap.readers + 1)))


def _set_bits(bitmap: DirtyBitmap, bits: bitarray, undo: list[Callable[[], None]],
              rewritten: set[str]) -> None:
    """The bitmap's bits become ``bits`` in place (readers hold the same array)."""
    current = bitmap.bits()
    if bits == current:
        return
    saved = current.copy()
    current[:] = bits
    undo.append(lambda: current.__setitem__(slice(None), saved))
    rewritten.add(bitmap.name)


def _new_bitmap(recorder: BitmapRecorder, node: str, action: BitmapAction) -> DirtyBitmap:
    """A new bitmap after QEMU's checks, in QEMU's order (qmp_block_dirty_bitmap_add)."""
    name = action.name
    if not name:
        raise BitmapOpError("Bitmap name cannot be empty")
    image = recorder.image
    granularity = action.granularity
    if granularity is None:
        granularity = default_granularity(image.top.cluster_size)
    elif granularity < 512 or granularity & (granularity - 1):
        raise BitmapOpError("Granularity must be power of 2 and at least 512")
    if action.persistent:
        problem = _cannot_store(recorder, name, granularity)
        if problem:
            raise BitmapOpError(f"Can't make bitmap '{name}' persistent in '{node}': {problem}")
    if any(b.name == name for b in recorder.bitmaps):
        raise BitmapOpError(f"Bitmap already exists: {name}")
    if len(name.encode("utf-8")) > MAX_NAME:
        raise BitmapOpError(f"Bitmap name too long: {name}")
    if action.persistent:
        top = image.top
        entry = DirectoryEntry(name, 0, 0, 0 if action.disabled else FLAG_AUTO,
                               granularity.bit_length() - 1, 0)
        bitmap: DirtyBitmap = Qcow2Bitmap(top.path, top.fd, top.file_size, top.cluster_size, image.size,
                                          entry, None, bits=zeros(-(-image.size // granularity), "little"))
    else:
        bitmap = DirtyBitmap(name, granularity, image.size, zeros(-(-image.size // granularity), "little"))
    bitmap.recording = not action.disabled
    bitmap.metadata_lock = image.metadata_lock
    return bitmap


def _cannot_store(recorder: BitmapRecorder, name: str, granularity: int) -> str | None:
    """Why a new persistent bitmap cannot go into this file (QEMU's
    qcow2_co_can_store_new_dirty_bitmap), or None."""
    header = recorder.image.top.header
    if header.version < 3:
        return "Cannot store dirty bitmaps in qcow2 v2 files"
    if len(name.encode("utf-8")) > MAX_NAME:
        return f"Name length exceeds maximum ({MAX_NAME} characters)"
    if granularity.bit_length() - 1 > MAX_GRANULARITY_BITS:
        return f"Granularity exceeds maximum ({1 << MAX_GRANULARITY_BITS} bytes)"
    return None


def _persist(recorder: BitmapRecorder, stored_before: list[Qcow2Bitmap], rewritten_names: set[str]) -> None:
    """Write the persistent bitmaps' changes (module doc), then point the live bitmaps at
    their new directory entries and tables. ``stored_before``: the file's bitmaps before
    the actions, in directory order."""
    after = recorder.stored
    new = [b for b in after if b not in stored_before]
    rewritten = [b for b in after if b.name in rewritten_names and b not in new]
    changed_flags = [b for b in after if b in stored_before and b.consistent and b.recording != b.entry.enabled]
    removed = [b for b in stored_before if b not in after]
    if not (rewritten or new or changed_flags or removed):
        return
    image = recorder.image
    top = image.top
    edit = DirectoryEdit(top.path, top.header, stored_before)
    for bitmap in removed:
        edit.remove(bitmap.name)
    for bitmap in changed_flags:
        (edit.enable if bitmap.recording else edit.disable)(bitmap.name)
    for bitmap in new:
        edit.add(bitmap.name, bitmap.granularity, enabled=bitmap.recording)
        if bitmap.bits().any():  # merged into in the same transaction
            edit.set_bits(bitmap.name, bitmap.bits())
    # QEMU's order when it stores them: the bitmaps it loaded, then the others newest first.
    loaded = [b.name for b in after if b in recorder.loaded]
    later = [b.name for b in recorder.bitmaps if b in after and b not in recorder.loaded]  # (oldest first)
    edit.reorder(loaded + later[::-1])
    for bitmap in rewritten:
        edit.set_bits(bitmap.name, bitmap.bits())
    writer = recorder.writer
    entries = commit(writer.fd, top.path, top.header, writer.refcounts, edit, apply_frees=False)
    if entries is None:
        return
    by_name = {entry.name: entry for entry in entries}
    for bitmap in after:
        bitmap.entry = by_name[bitmap.name]
        try:
            bitmap.table = read_table(top.path, writer.fd, bitmap.entry)
        except ImageIOError:
            log.exception("%s: bitmap %r: its new table cannot be read back", top.path, bitmap.name)
            raise
    recorder.directory_order = [entry.name for entry in entries]
    top.bitmaps = recorder.stored  # (the layer's list: what the file holds)
    log.info("%s: bitmaps now %s", top.path, ", ".join(e.name for e in entries) or "none")
