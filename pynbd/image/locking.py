"""Image file locks that QEMU understands: open file description (OFD) byte-range locks.

QEMU's file driver (``block/file-posix.c``: ``raw_apply_lock_bytes``,
``raw_check_lock_bytes``) marks each permission a user of an image file holds,
and each one it does not share, with a *shared* (read) OFD lock on one byte:

* byte ``100 + bit`` for each permission held,
* byte ``200 + bit`` for each permission *not* shared with other users,

where the permission bits are those of QEMU 7.2's ``include/block/block-common.h``:
``BLK_PERM_CONSISTENT_READ`` (bit 0), ``WRITE`` (1), ``WRITE_UNCHANGED`` (2) and
``RESIZE`` (3). After taking its locks a user checks for conflicts by asking
(``F_OFD_GETLK``) whether an exclusive lock could be had on

* byte ``200 + bit`` for each permission it holds (someone refuses to share it),
* byte ``100 + bit`` for each permission it does not share (someone holds it).

Taking first and checking second means that of two users starting at the same
time at least one sees the other. Locks belong to the open file description,
so they go away when the image's file descriptor is closed, or the process ends
in any way; they do not conflict with other locks taken through the same
descriptor, but do with those of another ``open()`` of the same file, even in
this process.

Which permissions a pynbd image holds (the :class:`LockPermissions` constants
below) is what QEMU 7.2 takes for the same role, read from ``/proc/locks``
under qemu-nbd, with one exception: a raw image served writable does not share
WRITE (qemu-nbd does), so that a second writer (another pynbd, a qemu-nbd, a
``qemu-io`` writing, a VM) is refused, as a VM's disk without ``share-rw``
refuses them. ``qemu-img info`` on a raw file takes no lock at all, so it is
never refused by a raw export; on a qcow2 image it is.

All functions here run on the thread that opens or closes the image; each is a
few ``fcntl`` calls and never waits for another process.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass

from pynbd.image.base import ImageError

log = logging.getLogger(__name__)

# include/block/block-common.h (QEMU 7.2). The bit 0x10 (the former
# BLK_PERM_GRAPH_MOD) is neither locked nor checked by QEMU 7.x.
PERM_CONSISTENT_READ = 0x1
PERM_WRITE = 0x2
PERM_WRITE_UNCHANGED = 0x4
PERM_RESIZE = 0x8
PERM_ALL = 0xF

#: QEMU's names (``bdrv_perm_names``), used in its "Failed to get ... lock" message.
PERM_NAMES = {
    PERM_CONSISTENT_READ: "consistent read",
    PERM_WRITE: "write",
    PERM_WRITE_UNCHANGED: "write unchanged",
    PERM_RESIZE: "resize",
}

# block/file-posix.c: the bytes below 100 are left to libvirt.
LOCK_PERM_BASE = 100
LOCK_SHARED_BASE = 200

# linux/fcntl.h; Python's fcntl module has had them since 3.9.
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)

#: errno of a refused F_OFD_SETLK: another description holds a conflicting lock.
_CONFLICT_ERRNOS = (errno.EAGAIN, errno.EACCES)
#: errno of a file system (or kernel) that cannot lock: the image is served unlocked.
_UNSUPPORTED_ERRNOS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _bit_numbers(mask: int) -> Iterator[int]:
    """The numbers of the permission bits set in ``mask``, in QEMU's order (lowest first)."""
    return (i for i in range(PERM_ALL.bit_length()) if mask & (1 << i))


@dataclass(frozen=True)
class LockPermissions:
    """What one user of an image file holds (``held``) and lets others hold (``shared``)."""

    held: int
    shared: int

    @property
    def unshared(self) -> int:
        return PERM_ALL & ~self.shared

    def lock_bytes(self) -> list[int]:
        """The byte offsets this user locks (shared), ascending."""
        return ([LOCK_PERM_BASE + i for i in _bit_numbers(self.held)]
                + [LOCK_SHARED_BASE + i for i in _bit_numbers(self.unshared)])


_NOT_SHARED_BY_METADATA = PERM_WRITE | PERM_RESIZE

#: A raw image served writable: the permissions qemu-nbd holds, but WRITE is not shared
#: (qemu-nbd shares it), as a VM disk without ``share-rw`` does not share it.
RAW_WRITABLE = LockPermissions(PERM_CONSISTENT_READ | PERM_WRITE, PERM_ALL & ~(PERM_WRITE | PERM_RESIZE))
#: A raw image served read-only: exactly ``qemu-nbd -r`` (the export's size must not change).
RAW_READ_ONLY = LockPermissions(PERM_CONSISTENT_READ, PERM_ALL & ~PERM_RESIZE)
#: A raw file as the backing file of a qcow2 image (QEMU locks only "consistent read").
RAW_BACKING = LockPermissions(PERM_CONSISTENT_READ, PERM_ALL)
#: The file of a qcow2 image served writable (its metadata: nobody else may write or resize).
QCOW2_WRITABLE = LockPermissions(PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
                                 PERM_ALL & ~_NOT_SHARED_BY_METADATA)
#: The file of a qcow2 image served read-only, and of every qcow2 backing file.
QCOW2_READ_ONLY = LockPermissions(PERM_CONSISTENT_READ, PERM_ALL & ~_NOT_SHARED_BY_METADATA)
#: The external data file of a qcow2 image served writable.
DATA_FILE_WRITABLE = LockPermissions(PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE, PERM_ALL & ~PERM_RESIZE)
#: The external data file of a qcow2 image served read-only, or of a qcow2 backing file.
DATA_FILE_READ_ONLY = RAW_READ_ONLY


class _Flock(ctypes.Structure):
    """``struct flock`` (the kernel reads all of it, padding included)."""

    _fields_ = [("l_type", ctypes.c_short), ("l_whence", ctypes.c_short),
                ("l_start", ctypes.c_int64), ("l_len", ctypes.c_int64), ("l_pid", ctypes.c_int)]


def _fcntl_lock(fd: int, command: int, lock_type: int, offset: int) -> int:
    """One ``fcntl`` lock call on the byte ``offset``; the ``l_type`` the kernel returns.

    ``l_pid`` must be 0 for OFD locks. Raises OSError (EINTR is retried by Python).
    """
    request = _Flock(lock_type, os.SEEK_SET, offset, 1, 0)
    answer = fcntl.fcntl(fd, command, bytes(request))
    return _Flock.from_buffer_copy(answer).l_type


def unlock_file(fd: int, offsets: list[int] | None = None) -> None:
    """Release this descriptor's locks on ``offsets`` (default: every byte QEMU uses).

    Closing the descriptor releases them too; this is for a descriptor that stays open.
    """
    every_byte = LockPermissions(held=PERM_ALL, shared=0).lock_bytes()  # all of 100-103 and 200-203
    for offset in offsets if offsets is not None else every_byte:
        _fcntl_lock(fd, F_OFD_SETLK, fcntl.F_UNLCK, offset)


def locked_message(path: str, reason: str) -> str:
    """The one line shown when another process's locks refuse ``path``."""
    return (f"{path}: locked by another process (a QEMU, qemu-nbd or pynbd using it for writing); "
            f"failed to get {reason} ('fuser -v {path}' lists the processes that have it open)")


def lock_file(fd: int, path: str, permissions: LockPermissions) -> None:
    """Lock the file open as ``fd`` for ``permissions``, as QEMU's file driver would.

    Takes the locks, then checks that no other open file description holds a
    permission not shared here or refuses to share one held here. On a
    conflict, releases what it took and raises :class:`ImageError` with one
    line naming ``path`` (:func:`locked_message`). A file system that cannot
    lock (NFS without a lock manager, for instance) is logged as a warning and
    the file is used unlocked, rather than refused. Other ``fcntl`` failures
    raise ImageError. Runs on the caller's thread; never blocks on other processes.
    """
    offsets = permissions.lock_bytes()
    taken: list[int] = []
    try:
        for offset in offsets:
            try:
                _fcntl_lock(fd, F_OFD_SETLK, fcntl.F_RDLCK, offset)
            except OSError as exc:
                if exc.errno in _CONFLICT_ERRNOS:  # someone holds an exclusive lock there
                    raise ImageError(locked_message(path, f"the lock on byte {offset}")) from None
                raise
            taken.append(offset)
        reason = _first_conflict(fd, permissions)
        if reason is not None:
            raise ImageError(locked_message(path, reason))
    except OSError as exc:
        unlock_file(fd, taken)
        if exc.errno in _UNSUPPORTED_ERRNOS:
            log.warning("%s: cannot lock it (%s); using it without QEMU's image locks", path, exc.strerror)
            return
        raise ImageError(f"{path}: cannot lock: {exc.strerror}") from None
    except ImageError:
        unlock_file(fd, taken)
        raise
    log.debug("%s: locked bytes %s", path, offsets)


def _first_conflict(fd: int, permissions: LockPermissions) -> str | None:
    """QEMU's ``raw_check_lock_bytes`` on ``fd``: the first lock another description prevents.

    A byte could be locked exclusively through ``fd`` unless another open file
    description holds a lock on it (this one's own locks never conflict).
    """
    for i in _bit_numbers(permissions.held):
        if _fcntl_lock(fd, F_OFD_GETLK, fcntl.F_WRLCK, LOCK_SHARED_BASE + i) != fcntl.F_UNLCK:
            return f'"{PERM_NAMES[1 << i]}" lock'
    for i in _bit_numbers(permissions.unshared):
        if _fcntl_lock(fd, F_OFD_GETLK, fcntl.F_WRLCK, LOCK_PERM_BASE + i) != fcntl.F_UNLCK:
            return f'shared "{PERM_NAMES[1 << i]}" lock'
    return None


def open_locked_for_writing(path: str, permissions: LockPermissions, what: str = "") -> int:
    """A read-write descriptor of ``path``, locked with ``permissions`` (:func:`lock_file`);
    the caller owns it. ImageError (one line naming the file, and ``what`` it is) when it
    cannot be opened for writing or another process holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(f"{path}: cannot open {what + ' ' if what else ''}for writing: {exc.strerror}") from None
    try:
        lock_file(fd, path, permissions)
    except BaseException:
        os.close(fd)
        raise
    return fd


def lock_image(fd: int, path: str, writable: bool) -> None:
    """Lock a raw image served writable (:data:`RAW_WRITABLE`) or read-only (:data:`RAW_READ_ONLY`).

    See :func:`lock_file` for what it promises and raises.
    """
    lock_file(fd, path, RAW_WRITABLE if writable else RAW_READ_ONLY)
