"""Incremental backup with pynbd's dirty bitmaps and real clients, two rounds.

An image with bitmap ``b0`` (enabled) is served; nbdcopy makes a full backup (a raw
file); qemu-io changes the image over NBD (writes, zeroings with and without NO_HOLE,
discards, flushes); the server stops; a new checkpoint is made offline (``qemu-img
bitmap --disable IMG b0``, ``--add IMG b1``); the image is served again, ``qemu-img
map`` with ``x-dirty-bitmap=qemu:dirty-bitmap:b0`` (QEMU's nbd driver, one extent per
request) gives b0's dirty extents, and a libnbd client copies just those ranges from
the export into the backup. The rebuilt backup must read as the live image
(``qemu-img compare``), having copied only part of it; b0's extents are exactly the
granules the changes touched; once disabled, b0 no longer changes. The second round
does the same with ``b1`` (then ``b2``) into the same backup.

:func:`test_two_incremental_rounds` runs the round trip against pynbd and, as the
harness's own check, against qemu-nbd (``--discard=unmap``, ``-B`` per bitmap).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.bitmaps import (
    changed_ranges,
    create_image,
    describe_difference,
    generate_changes,
    granules,
    qemu_io_local,
    req_one_dirty,
    serve_writable,
    total,
)
from tests.support.qcow2_writes import run_tool, send_commands
from tests.support.servers import PynbdServer, QemuNbdServer, libnbd_script, nbdcopy

pytestmark = [pytest.mark.interop, pytest.mark.needs("qemu-img", "qemu-io", "qemu-nbd", "nbdcopy",
                                                     "libnbd-python"),
              pytest.mark.timeout(120)]

KiB, MiB = 1 << 10, 1 << 20
SIZE = 64 * MiB
CLUSTER = 64 * KiB
GRANULARITY = 64 * KiB

# What the image holds before the first checkpoint (the full backup copies it).
BASE_CONTENT = ("write -P 0x11 0 3M", "write -P 0x22 10M 512k", "write -P 0x33 33M 4M",
                "write -z 40M 2M", "write -P 0x44 64511k 1k")

COPY_RANGES = r'''
import json, sys
import nbd

sock, target, ranges = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
h = nbd.NBD()
h.connect_unix(sock)
copied = 0
with open(target, "r+b") as f:
    for start, end in ranges:
        pos = start
        while pos < end:
            n = min(end - pos, 4 << 20)
            f.seek(pos)
            f.write(h.pread(n, pos))
            pos += n
            copied += n
h.shutdown()
print(copied)
'''


def stop(server: PynbdServer | QemuNbdServer) -> None:
    code = server.stop(check=False)
    assert code == 0, f"{server.kind} exited {code} on SIGTERM:\n{server.log()[-2000:]}"


def checkpoint(image: Path, old: str, new: str) -> None:
    """Offline, as a backup tool between two backups: stop recording into ``old``, start
    ``new``."""
    run_tool(["qemu-img", "bitmap", "--disable", image.name, old], cwd=image.parent)
    run_tool(["qemu-img", "bitmap", "--add", "-g", str(GRANULARITY), image.name, new], cwd=image.parent)


def compare(backup: Path, server: PynbdServer | QemuNbdServer) -> None:
    """The backup reads as the live export (``qemu-img compare`` over NBD)."""
    result = run_tool(["qemu-img", "compare", "-f", "raw", "-F", "raw", backup,
                       f"nbd+unix:///?socket={server.socket}"], check=False)
    assert result.returncode == 0, f"backup and live image differ: {result.stdout}{result.stderr}"


def incremental(server: PynbdServer | QemuNbdServer, bitmap: str, backup: Path,
                changes: list[tuple[int, int]]) -> None:
    """Copy ``bitmap``'s dirty extents from the export into ``backup``: they are exactly
    the granules ``changes`` touched, and the backup then reads as the export."""
    dirty = req_one_dirty(server.socket, bitmap, SIZE)
    want = granules(changes, GRANULARITY, SIZE)
    assert dirty == want, f"{server.kind}, {bitmap}: {describe_difference(dirty, want)}"
    copied = int(libnbd_script(COPY_RANGES, server.socket, str(backup), json.dumps(dirty)).stdout)
    assert copied == total(dirty) < SIZE // 2
    compare(backup, server)


@pytest.mark.pynbd
@pytest.mark.parametrize("kind", ["pynbd", "qemu-nbd"])
def test_two_incremental_rounds(tmp_path, kind):
    live = create_image(tmp_path / "live.qcow2", SIZE, cluster=CLUSTER, bitmaps=())
    qemu_io_local(live, BASE_CONTENT)
    run_tool(["qemu-img", "bitmap", "--add", "-g", str(GRANULARITY), live.name, "b0"], cwd=tmp_path)
    units = (512, 4 * KiB, CLUSTER, MiB)
    rounds = [generate_changes(SIZE, units, seed, 40, max_zero=4 * MiB) for seed in (51, 52)]
    backup = tmp_path / "backup.raw"
    backup.write_bytes(b"")

    server = serve_writable(kind, live, ["b0"])
    try:
        nbdcopy(server.uri, backup)  # the full backup, before any change
        compare(backup, server)
        send_commands(server.socket, rounds[0])
    finally:
        stop(server)
    checkpoint(live, "b0", "b1")

    server = serve_writable(kind, live, ["b0", "b1"])
    try:
        incremental(server, "b0", backup, changed_ranges(rounds[0]))
        send_commands(server.socket, rounds[1])
        disabled = req_one_dirty(server.socket, "b0", SIZE)
        assert disabled == granules(changed_ranges(rounds[0]), GRANULARITY, SIZE), \
            "b0 changed after it was disabled"
    finally:
        stop(server)
    checkpoint(live, "b1", "b2")

    server = serve_writable(kind, live, ["b1", "b2"])
    try:
        incremental(server, "b1", backup, changed_ranges(rounds[1]))
    finally:
        stop(server)
    result = run_tool(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", backup, live], check=False)
    assert result.returncode == 0, f"backup and image file differ: {result.stdout}{result.stderr}"
    check = run_tool(["qemu-img", "check", live.name], cwd=tmp_path, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
