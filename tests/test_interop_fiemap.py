"""Raw block status on a file fragmented enough that pynbd answers from FIEMAP, against
qemu-nbd serving an identical file and against the layout the test itself wrote.

pynbd's raw driver (pynbd/image/raw.py) finds the first runs of a range with lseek
(SEEK_DATA/SEEK_HOLE) and the rest with FS_IOC_FIEMAP (pynbd/image/fiemap.py), and keeps
to lseek while it has unflushed writes. Images with a handful of extents never reach
FIEMAP; these have thousands of data and hole runs of irregular lengths (so a shifted,
truncated or inverted extent list shows), and the server runs under strace so that each
test sees FIEMAP really serve (``--fiemap auto``) or never serve (``--fiemap off``) the
clients' requests.

Oracles, none of them pynbd's code: the block map the test wrote (:class:`BlockModel`),
qemu-nbd (SEEK_DATA/SEEK_HOLE in QEMU's file-posix driver) serving a file made the same
way and changed by the same requests, and the files themselves (content and SEEK_DATA
map).
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.servers import QemuNbdServer, nbdcopy, nbdinfo_map, qemu_img_map_argv, qemu_io, run
from tests.support.deadline import wait_until
from tests.support.hostfile import fs_has_fiemap, seek_runs
from tests.support.strace import StracedPynbd

pytestmark = [pytest.mark.pynbd, pytest.mark.needs("qemu-nbd", "qemu-img", "qemu-io", "nbdinfo", "nbdcopy",
                                                   "strace")]

BLOCK = 4096
#: Data runs in the image (as many holes): far more than the lseeks pynbd makes before FIEMAP.
DATA_RUNS = 3000
#: Run lengths in blocks, drawn per run: irregular, so that an extent list shifted by one
#: run, or with data and holes swapped, cannot look right.
DATA_BLOCKS = (1, 2, 3)
HOLE_BLOCKS = (1, 2, 3, 5, 9, 16)


class BlockModel:
    """Which 4 KiB blocks of a raw file hold data: what the test wrote, kept by the test."""

    def __init__(self, blocks: int) -> None:
        self.data = bytearray(blocks)  # 1: data, 0: hole

    @property
    def size(self) -> int:
        return len(self.data) * BLOCK

    def mark(self, offset: int, length: int, is_data: bool) -> None:
        assert offset % BLOCK == 0 and length % BLOCK == 0
        first, count = offset // BLOCK, length // BLOCK
        self.data[first:first + count] = (b"\x01" if is_data else b"\x00") * count

    def runs(self) -> list[tuple[int, int, bool]]:
        """(offset, length, is_data) of the maximal runs, in order."""
        runs: list[tuple[int, int, bool]] = []
        start = 0
        for i in range(1, len(self.data) + 1):
            if i == len(self.data) or self.data[i] != self.data[start]:
                runs.append((start * BLOCK, (i - start) * BLOCK, bool(self.data[start])))
                start = i
        return runs


def make_layout(seed: int = 1307) -> BlockModel:
    """The irregular layout: DATA_RUNS data runs, each followed by a hole."""
    rng = random.Random(seed)
    lengths = [(rng.choice(DATA_BLOCKS), rng.choice(HOLE_BLOCKS)) for _ in range(DATA_RUNS)]
    model = BlockModel(sum(d + h for d, h in lengths))
    block = 0
    for data, hole in lengths:
        model.mark(block * BLOCK, data * BLOCK, True)
        block += data + hole
    return model


def write_image(path: Path, model: BlockModel) -> Path:
    """A sparse file with data (a different byte per run) exactly where ``model`` says."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, model.size)
        for n, (offset, length, is_data) in enumerate(model.runs()):
            if is_data:
                os.pwrite(fd, bytes([n % 251 + 1]) * length, offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def data_bytes(path: Path, model: BlockModel) -> bytes:
    """The bytes of ``path`` where ``model`` has data. With the file's SEEK_DATA map equal
    to the model's (the rest is holes, which read as zeros), two files with the same size
    and the same data bytes are byte-identical."""
    with open(path, "rb") as f:
        assert os.fstat(f.fileno()).st_size == model.size
        return b"".join(os.pread(f.fileno(), length, offset)
                        for offset, length, is_data in model.runs() if is_data)


def fiemap_calls(server: StracedPynbd) -> int:
    """FIEMAP calls the traced server made so far."""
    return server.calls("FS_IOC_FIEMAP")


@dataclass
class Exports:
    """pynbd and qemu-nbd, each serving its own copy of the same image."""

    pynbd: StracedPynbd
    qemu: QemuNbdServer
    pynbd_image: Path
    qemu_image: Path
    fiemap: str


def qemu_img_map(server) -> list[dict]:
    """``qemu-img map --output=json`` over NBD: QEMU asks one extent at a time (REQ_ONE)."""
    return json.loads(run(qemu_img_map_argv(server)).stdout)


def as_nbdinfo(model: BlockModel) -> list[tuple[int, int, int]]:
    return [(offset, length, 0 if is_data else 3) for offset, length, is_data in model.runs()]


def as_qemu_img(model: BlockModel) -> list[tuple[int, int, bool, bool]]:
    return [(offset, length, is_data, not is_data) for offset, length, is_data in model.runs()]


def served_by_fiemap(exports: Exports, before: int, what: str) -> int:
    """With --fiemap auto, wait for the FIEMAP calls the last client caused to show in the
    trace (strace writes them as they happen); returns the new count."""
    if exports.fiemap == "off":
        return before
    return wait_until(lambda: fiemap_calls(exports.pynbd) > before and fiemap_calls(exports.pynbd),
                      what=f"FIEMAP calls by pynbd serving {what}")


def check_exports_agree(exports: Exports, model: BlockModel, tmp_path: Path, stage: str) -> None:
    """nbdinfo --map, qemu-img map (REQ_ONE) and nbdcopy give the same answers from both
    servers, equal to the model, and pynbd's answers come from FIEMAP (--fiemap auto)."""
    p, q = exports.pynbd, exports.qemu
    calls = fiemap_calls(p)

    ours = nbdinfo_map(p.uri, "base:allocation")
    calls = served_by_fiemap(exports, calls, "nbdinfo --map")
    assert ours == nbdinfo_map(q.uri, "base:allocation"), f"{stage}: nbdinfo --map differs from qemu-nbd's"
    assert ours == as_nbdinfo(model), f"{stage}: nbdinfo --map differs from the layout written"

    ours_one = qemu_img_map(p)
    calls = served_by_fiemap(exports, calls, "qemu-img map (REQ_ONE)")
    assert ours_one == qemu_img_map(q), f"{stage}: qemu-img map differs from qemu-nbd's"
    assert [(r["start"], r["length"], r["data"], r["zero"]) for r in ours_one] == as_qemu_img(model), stage

    copies = {}
    for name, server in (("pynbd", p), ("qemu-nbd", q)):
        copies[name] = tmp_path / f"{stage}-{name}.raw"
        nbdcopy(server.uri, copies[name])
        if name == "pynbd":
            served_by_fiemap(exports, calls, "nbdcopy")
    # nbdcopy reads only what block status calls data and zeroes the rest on the
    # destination: a wrong hole would lose data, a wrong data extent would allocate.
    expected = data_bytes(exports.qemu_image, model)
    for name, copy in copies.items():
        assert seek_runs(copy) == model.runs(), f"{stage}: nbdcopy from {name}: sparseness differs"
        assert data_bytes(copy, model) == expected, f"{stage}: nbdcopy from {name} differs from the image"


def writes_and_trims(model: BlockModel, seed: int = 77) -> list[str]:
    """qemu-io commands that write into holes, over data and across run boundaries, and
    trim (punch) ranges, each applied to ``model`` too, then a FLUSH (after which pynbd
    uses FIEMAP again)."""
    rng = random.Random(seed)
    blocks = len(model.data)
    commands = []
    for n in range(60):
        offset = rng.randrange(blocks - 16) * BLOCK
        if n % 3 == 2:
            length = rng.randint(1, 8) * BLOCK
            commands.append(f"discard {offset} {length}")
            model.mark(offset, length, False)
        else:
            length = rng.randint(1, 12) * BLOCK
            commands.append(f"write -P {0x40 + n} {offset} {length}")
            model.mark(offset, length, True)
    return commands + ["flush"]


@pytest.fixture
def exports(tmp_path, request) -> Exports:
    model = make_layout()
    pynbd_image = write_image(tmp_path / "pynbd.raw", model)
    qemu_image = write_image(tmp_path / "qemu.raw", model)
    fiemap = request.param
    if fiemap == "auto" and not fs_has_fiemap(pynbd_image):
        pytest.skip(f"the file system of {tmp_path} has no FIEMAP")
    with StracedPynbd(pynbd_image, "--fiemap", fiemap, syscalls=["ioctl"], workdir=tmp_path) as p, \
            QemuNbdServer(qemu_image, "--discard=unmap", workdir=tmp_path) as q:
        yield Exports(p, q, pynbd_image, qemu_image, fiemap)


@pytest.mark.parametrize("exports", ["auto", "off"], indirect=True)
def test_fragmented_raw_matches_qemu_nbd_and_the_layout(exports, tmp_path):
    """On a raw file of 6000 irregular runs, nbdinfo --map, qemu-img map (one extent per
    request) and nbdcopy get from pynbd what they get from qemu-nbd and what the test
    wrote; with --fiemap auto FIEMAP serves each of them (strace), with off never. Then the
    same writes, trims and FLUSH go through both exports, and the maps, copies and files
    still agree with each other and with the model (pynbd back on FIEMAP after the FLUSH)."""
    model = make_layout()
    assert seek_runs(exports.pynbd_image) == model.runs()  # the file is what the model says
    assert len(model.runs()) == 2 * DATA_RUNS
    check_exports_agree(exports, model, tmp_path, "as written")

    commands = writes_and_trims(model)
    for server in (exports.pynbd, exports.qemu):
        out = qemu_io(server.uri, *commands).stdout
        assert out.count("wrote ") + out.count("discard ") == len(commands) - 1, out
    assert seek_runs(exports.pynbd_image) == seek_runs(exports.qemu_image) == model.runs()
    assert data_bytes(exports.pynbd_image, model) == data_bytes(exports.qemu_image, model)
    check_exports_agree(exports, model, tmp_path, "after writes")
    assert exports.pynbd.stop() == 0  # (strace has written every call when pynbd has exited)
    if exports.fiemap == "off":
        assert fiemap_calls(exports.pynbd) == 0, "--fiemap off: pynbd called FIEMAP"
