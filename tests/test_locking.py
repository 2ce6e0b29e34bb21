"""Image locks as QEMU takes them (pynbd/image/locking.py), checked against the kernel and QEMU.

* In one process, two ``open()`` s of a file are two open file descriptions, whose
  OFD locks conflict as two processes' would: a hypothesis test takes random
  permission pairs through both and expects exactly QEMU's rule (a user is refused
  when the other holds a permission it does not share, or does not share one it
  holds), and no lock left behind by a refused attempt.
* Which bytes a user locks is read back with ``F_OFD_GETLK`` from another open file
  description (``lock_bytes_held_by_others`` below, independent of the module), and
  compared with what qemu-nbd locks in the same role (raw and qcow2 files, top,
  backing and data files; writable and ``-r``).
* Real processes: pynbd serving writable refuses qemu-io writers, qemu-nbd and a
  second pynbd (exit code 2, one line); qemu-nbd writable refuses pynbd; pynbd -r
  lets through exactly what qemu-nbd -r lets through; SIGTERM releases the locks.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.image.base import ImageError
from pynbd.image.locking import (
    DATA_FILE_READ_ONLY,
    DATA_FILE_WRITABLE,
    PERM_ALL,
    QCOW2_READ_ONLY,
    QCOW2_WRITABLE,
    RAW_BACKING,
    RAW_READ_ONLY,
    RAW_WRITABLE,
    LockPermissions,
    lock_file,
    lock_image,
    unlock_file,
)
from pynbd.image.raw import RawImage
from tests.support.servers import PynbdServer, QemuNbdServer, ServerError, make_raw_image, run

MiB = 1 << 20
#: Every byte QEMU 7.2 locks: 100 + permission bit, 200 + permission bit (bits 0-3).
QEMU_LOCK_BYTES = (100, 101, 102, 103, 200, 201, 202, 203)
LOCKED_PREFIX = ": locked by another process (a QEMU, qemu-nbd or pynbd using it for writing); "

permissions = st.builds(LockPermissions, st.integers(0, PERM_ALL), st.integers(0, PERM_ALL))


class _Flock(ctypes.Structure):
    _fields_ = [("l_type", ctypes.c_short), ("l_whence", ctypes.c_short),
                ("l_start", ctypes.c_int64), ("l_len", ctypes.c_int64), ("l_pid", ctypes.c_int)]


def lock_bytes_held_by_others(path: str | os.PathLike) -> set[int]:
    """The bytes of QEMU's lock range that some open file description locks (probed from a new one)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        held = set()
        for offset in QEMU_LOCK_BYTES:
            request = _Flock(fcntl.F_WRLCK, os.SEEK_SET, offset, 1, 0)
            answer = _Flock.from_buffer_copy(fcntl.fcntl(fd, 36, bytes(request)))  # F_OFD_GETLK
            if answer.l_type != fcntl.F_UNLCK:
                held.add(offset)
        return held
    finally:
        os.close(fd)


def qemu_refuses(first: LockPermissions, second: LockPermissions) -> bool:
    """QEMU's rule (raw_check_lock_bytes): ``second`` cannot join ``first``."""
    return bool(second.held & first.unshared or second.unshared & first.held)


@contextmanager
def opened(path: Path, flags: int = os.O_RDWR) -> Iterator[int]:
    fd = os.open(path, flags | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


# --- the rule, on real locks in one process ---------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(first=permissions, second=permissions)
def test_two_users_conflict_exactly_as_qemu_decides(tmp_path_factory, first, second):
    path = tmp_path_factory.mktemp("rule") / "disk.img"
    path.write_bytes(b"")
    with opened(path) as fd1, opened(path) as fd2:
        lock_file(fd1, str(path), first)
        assert lock_bytes_held_by_others(path) == set(first.lock_bytes())
        if qemu_refuses(first, second):
            with pytest.raises(ImageError) as refused:
                lock_file(fd2, str(path), second)
            assert str(refused.value).startswith(str(path) + LOCKED_PREFIX)
            expected_second: set[int] = set()  # a refused attempt leaves nothing behind
        else:
            lock_file(fd2, str(path), second)
            expected_second = set(second.lock_bytes())
        unlock_file(fd1)
        assert lock_bytes_held_by_others(path) == expected_second


def test_closing_the_descriptor_releases_the_locks(tmp_path):
    path = make_raw_image(tmp_path / "disk.img", MiB)
    fd = os.open(path, os.O_RDWR)
    lock_image(fd, str(path), writable=True)
    with opened(path) as other:
        with pytest.raises(ImageError):
            lock_image(other, str(path), writable=True)
        os.close(fd)
        lock_image(other, str(path), writable=True)


def test_refused_raw_image_is_one_line_and_closes_its_file(tmp_path):
    path = make_raw_image(tmp_path / "disk.img", MiB)
    with RawImage(str(path)) as first:
        open_fds = len(os.listdir("/proc/self/fd"))
        with pytest.raises(ImageError) as refused:
            RawImage(str(path))
        assert len(os.listdir("/proc/self/fd")) == open_fds
        message = str(refused.value)
        assert message.startswith(str(path) + LOCKED_PREFIX) and "\n" not in message
        assert 'failed to get "write" lock' in message
        with RawImage(str(path), read_only=True):  # a reader sharing writes still can
            pass
        assert not first.read_only


# --- the bytes, against qemu-nbd -------------------------------------------------------------


@contextmanager
def qemu_nbd(image: Path, *args: str, fmt: str = "raw") -> Iterator[QemuNbdServer]:
    """qemu-nbd serving ``image``, killed at the end: qemu-nbd 7.2 sometimes hangs on a
    SIGTERM that comes right after it started, and its exit is not what is tested here."""
    server = QemuNbdServer(image, *args, fmt=fmt, workdir=image.parent)
    try:
        yield server
    finally:
        server.kill()


def assert_qemu_nbd_refused(image: Path, message: str) -> None:
    """qemu-nbd started on ``image`` gives up with ``message`` (it may create its socket
    before it fails, so the exit is what is waited for, not the socket)."""
    sock = image.parent / "refused.sock"
    try:
        p = subprocess.run(["qemu-nbd", "-f", "raw", "-k", str(sock), str(image)], capture_output=True,
                           text=True, timeout=20, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"qemu-nbd was not refused: it served {image}")
    assert p.returncode != 0 and message in p.stderr, p


def qemu_nbd_lock_bytes(image: Path, files: list[Path], *args: str, fmt: str) -> list[set[int]]:
    """The bytes locked on each of ``files`` while qemu-nbd serves ``image`` (nothing else uses them)."""
    with qemu_nbd(image, *args, fmt=fmt):
        # qemu-nbd may still be settling the chain's permissions when its socket appears
        # (backing files locked a moment later): read until every file holds locks.
        deadline = time.monotonic() + 10
        while True:
            held = [lock_bytes_held_by_others(f) for f in files]
            if all(held) or time.monotonic() > deadline:
                return held
            time.sleep(0.05)


@pytest.mark.needs("qemu-nbd")
@pytest.mark.parametrize("read_only", [False, True])
def test_raw_read_only_locks_what_qemu_nbd_locks(tmp_path, read_only):
    """pynbd -r locks what qemu-nbd -r does; pynbd writable adds "does not share write" (201)."""
    image = make_raw_image(tmp_path / "disk.img", MiB)
    flag = ["-r"] if read_only else []
    [theirs] = qemu_nbd_lock_bytes(image, [image], *flag, fmt="raw")
    with PynbdServer(image, *flag, workdir=tmp_path):
        ours = lock_bytes_held_by_others(image)
    assert ours == set((RAW_READ_ONLY if read_only else RAW_WRITABLE).lock_bytes())
    assert ours == (theirs if read_only else theirs | {201})


@pytest.mark.needs("qemu-nbd", "qemu-img")
@pytest.mark.parametrize("read_only", [False, True])
def test_qcow2_roles_lock_what_qemu_nbd_locks(tmp_path, read_only):
    """The constants the qcow2 driver uses, against qemu-nbd on a chain with every role:
    top.qcow2 -> mid.qcow2 (external data file mid.data) -> base.raw, and data.qcow2 with
    its own external data file."""
    def create(*args: str) -> None:
        run(["qemu-img", "create", "-q", *args])

    base, mid, top = tmp_path / "base.raw", tmp_path / "mid.qcow2", tmp_path / "top.qcow2"
    create("-f", "raw", str(base), "1M")
    create("-f", "qcow2", "-o", f"data_file={tmp_path / 'mid.data'}", "-b", str(base), "-F", "raw", str(mid))
    create("-f", "qcow2", "-b", str(mid), "-F", "qcow2", str(top))
    with_data = tmp_path / "data.qcow2"
    create("-f", "qcow2", "-o", f"data_file={tmp_path / 'own.data'}", str(with_data), "1M")
    flag = ["-r"] if read_only else []

    chain = qemu_nbd_lock_bytes(top, [top, mid, tmp_path / "mid.data", base], *flag, fmt="qcow2")
    assert chain == [set(QCOW2_READ_ONLY.lock_bytes() if read_only else QCOW2_WRITABLE.lock_bytes()),
                     set(QCOW2_READ_ONLY.lock_bytes()),
                     set(DATA_FILE_READ_ONLY.lock_bytes()),
                     set(RAW_BACKING.lock_bytes())]
    own = qemu_nbd_lock_bytes(with_data, [with_data, tmp_path / "own.data"], *flag, fmt="qcow2")
    top_role, data_role = (QCOW2_READ_ONLY, DATA_FILE_READ_ONLY) if read_only else \
        (QCOW2_WRITABLE, DATA_FILE_WRITABLE)
    assert own == [set(top_role.lock_bytes()), set(data_role.lock_bytes())]


# --- real processes ----------------------------------------------------------------------------


def serve_refused(image: Path, *args: str) -> subprocess.CompletedProcess:
    """``pynbd serve IMAGE ARGS`` that must give up at once: its CompletedProcess (text)."""
    server = PynbdServer(image, *args, workdir=image.parent, start=False)
    return subprocess.run(server.argv(), env=server.env(), capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)


def assert_locked_line(p: subprocess.CompletedProcess, image: Path, reason: str) -> None:
    assert p.returncode == 2, p
    lines = p.stderr.strip().splitlines()
    assert lines[-1].startswith(f"pynbd: error: {image}{LOCKED_PREFIX}failed to get {reason} "), p.stderr
    assert "Traceback" not in p.stderr


def qemu_io_write(image: Path) -> subprocess.CompletedProcess:
    return run(["qemu-io", "-f", "raw", "-c", "write -P 0x55 0 512", image], check=False)


@pytest.mark.pynbd
@pytest.mark.needs("qemu-io", "qemu-img", "qemu-nbd")
def test_writable_pynbd_refuses_other_writers(tmp_path):
    image = make_raw_image(tmp_path / "disk.img", MiB)
    with PynbdServer(image, workdir=tmp_path):
        p = qemu_io_write(image)
        assert p.returncode != 0 and 'Failed to get "write" lock' in p.stderr, p
        assert_qemu_nbd_refused(image, 'Failed to get "write" lock')
        assert_locked_line(serve_refused(image), image, '"write" lock')
        # Readers that share writes still open it. (qemu-img info takes no lock on a
        # raw file at all, with -U or without, whoever serves it.)
        run(["qemu-io", "-r", "-f", "raw", "-c", "read 0 512", image])
        run(["qemu-img", "info", "-U", image])
        run(["qemu-img", "info", image])
        with qemu_nbd(image, "-r"), PynbdServer(image, "-r", workdir=tmp_path):
            pass
    assert image.read_bytes()[:512] == bytes(512)


@pytest.mark.pynbd
@pytest.mark.needs("qemu-nbd")
def test_writable_qemu_nbd_refuses_writable_pynbd(tmp_path):
    image = make_raw_image(tmp_path / "disk.img", MiB)
    with qemu_nbd(image):
        assert_locked_line(serve_refused(image), image, 'shared "write" lock')
        with PynbdServer(image, "-r", workdir=tmp_path):  # as qemu-nbd -r would be let in
            pass


@pytest.mark.pynbd
@pytest.mark.needs("qemu-io", "qemu-img", "qemu-nbd")
def test_read_only_pynbd_lets_in_what_qemu_nbd_r_lets_in(tmp_path):
    def outcomes(image: Path) -> dict[str, bool]:
        """Which of QEMU's users can open ``image`` now (each leaves it as it found it)."""
        def opens(argv: list) -> bool:
            return run(argv, check=False).returncode == 0

        writer = qemu_io_write(image)
        try:
            with qemu_nbd(image):
                qemu_nbd_writable = True
        except ServerError:
            qemu_nbd_writable = False
        return {
            "qemu-img info": opens(["qemu-img", "info", image]),
            "qemu-img info -U": opens(["qemu-img", "info", "-U", image]),
            "qemu-io -r": opens(["qemu-io", "-r", "-f", "raw", "-c", "read 0 512", image]),
            "qemu-io write": writer.returncode == 0 and "wrote 512/512" in writer.stdout,
            "qemu-nbd writable": qemu_nbd_writable,
        }

    image = make_raw_image(tmp_path / "disk.img", MiB)
    with qemu_nbd(image, "-r"):
        theirs = outcomes(image)
    with PynbdServer(image, "-r", workdir=tmp_path):
        ours = outcomes(image)
    assert ours == theirs


@pytest.mark.pynbd
@pytest.mark.needs("qemu-io")
def test_sigterm_releases_the_lock(tmp_path):
    image = make_raw_image(tmp_path / "disk.img", MiB)
    server = PynbdServer(image, workdir=tmp_path)
    assert lock_bytes_held_by_others(image) == set(RAW_WRITABLE.lock_bytes())
    assert server.stop() == 0
    assert lock_bytes_held_by_others(image) == set()
    p = qemu_io_write(image)
    assert p.returncode == 0 and "wrote 512/512" in p.stdout, p
