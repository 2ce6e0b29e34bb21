"""qcow2 block status where a data cluster lies over a hole in its host file, as QEMU 7.2 reports it.

QEMU asks the host file inside data clusters only when the qcow2 file looks
metadata-preallocated (block/qcow2.c ``qcow2_co_block_status`` sets
BDRV_BLOCK_RECURSE when ``qcow2_detect_metadata_preallocation`` found more clusters
in use than clusters of storage); then the parts over holes are
``zero: true, data: true`` in ``qemu-img map`` and NBD_STATE_ZERO without HOLE in
``base:allocation``. Otherwise they stay plain data.

The images are made by qemu-io partial writes. A partial write into a new cluster
zeroes the rest of the cluster with ``fallocate(ZERO_RANGE)``: on ext4 those are
unwritten extents, which SEEK_DATA calls holes or data depending on the page cache.
Copying the files with ``cp --sparse=always`` turns every zeroed block into a
real hole, so every reader sees the same host file, whichever ran first. The oracles are
``qemu-img map --output=json`` on the file and ``qemu-nbd -A`` (``nbdinfo --map``
of ``base:allocation`` and ``qemu:allocation-depth``) serving the same image.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd import cli
from pynbd.image import open_image
from pynbd.image.qcow2 import Qcow2Image
from pynbd.image.qcow2.chain import (
    KIND_COMPRESSED,
    KIND_DATA,
    KIND_HOST_HOLE,
    KIND_UNALLOC,
    KIND_ZERO,
    Run,
    nonzero_entries,
    split_host_holes,
)
from tests.qcow2_fixtures import QemuNbd, merge_rows, qemu_img_map_text
from tests.support.servers import PynbdServer, nbdinfo_map, qemu_img_map_argv, run

KiB = 1 << 10
MiB = 1 << 20
FS_BLOCK = 4096

qemu_tools = pytest.mark.needs("qemu-img", "qemu-io")
nbd_tools = pytest.mark.needs("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")


# --- images -------------------------------------------------------------------------------


def sh(cwd: Path, *args: str) -> None:
    subprocess.run(list(args), cwd=cwd, check=True, capture_output=True, text=True, timeout=120)


def create(d: Path, name: str, size: str, *opts: str, backing: str | None = None) -> None:
    args = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if opts:
        args += ["-o", ",".join(opts)]
    if backing:
        args += ["-b", backing, "-F", "qcow2"]
    sh(d, *args, name, size)


def write(d: Path, name: str, *cmds: str) -> None:
    args = ["qemu-io", "-f", "qcow2"]
    for c in cmds:
        args += ["-c", c]
    sh(d, *args, name)


def dig_holes(d: Path, *names: str) -> None:
    """Every all-zero 4 KiB block of the files becomes a hole, qemu-io's zeroed COW areas too.

    By copying (``cp --sparse=always``): ``fallocate --dig-holes`` skips unwritten extents
    that SEEK_DATA calls holes, so they would stay, and what SEEK_DATA says of them
    would keep depending on the page cache.
    """
    for name in names:
        sh(d, "cp", "--sparse=always", name, f"{name}.sparse")
        os.replace(d / f"{name}.sparse", d / name)


def _cs64k(d: Path) -> None:
    create(d, "cs64k.qcow2", "8M")
    write(d, "cs64k.qcow2",
          "write -P 0x11 0 4k",  # a new cluster: 60 KiB of it a hole
          "write -P 0x12 200k 8k",  # inside a cluster
          "write -P 0 256k 64k",  # a whole cluster of written zeros
          "write -P 0x13 1M 64k",  # a full cluster
          f"write -P 0x14 {2 * MiB + 60 * KiB} 4k",  # a cluster's last 4 KiB
          "write -z 3M 64k",  # a zero cluster
          "write -P 0x15 5M 100k")  # over two clusters, the second in part
    dig_holes(d, "cs64k.qcow2")


def _sizes(d: Path) -> None:
    create(d, "cs16k.qcow2", "2M", "cluster_size=16k")
    write(d, "cs16k.qcow2", "write -P 1 0 4k", "write -P 2 40k 2k", "write -P 3 1M 16k")
    create(d, "cs512.qcow2", "1M", "cluster_size=512")
    write(d, "cs512.qcow2", "write -P 1 0 1k", "write -P 0 8k 8k", "write -P 2 64k 700")
    create(d, "cs512k.qcow2", "8M", "cluster_size=512k")
    write(d, "cs512k.qcow2", "write -P 1 0 4k", f"write -P 2 {MiB + 100 * KiB} 8k", "write -P 3 4M 512k")
    create(d, "cs2m.qcow2", "8M", "cluster_size=2M")
    write(d, "cs2m.qcow2", "write -P 1 0 4k", "write -P 2 3M 1k")
    dig_holes(d, "cs16k.qcow2", "cs512.qcow2", "cs512k.qcow2", "cs2m.qcow2")


def _extended_l2(d: Path) -> None:
    create(d, "extl2.qcow2", "4M", "extended_l2=on", "cluster_size=256k")  # 8 KiB subclusters
    write(d, "extl2.qcow2", "write -P 1 0 4k", "write -P 2 100k 20k", "write -P 3 1M 256k")
    create(d, "extl2-2m.qcow2", "8M", "extended_l2=on", "cluster_size=2M")  # 64 KiB subclusters
    write(d, "extl2-2m.qcow2", "write -P 1 0 4k", "write -P 2 3M 1k", "write -z 5M 64k")
    dig_holes(d, "extl2.qcow2", "extl2-2m.qcow2")


def _chain(d: Path) -> None:
    create(d, "base.qcow2", "4M")
    write(d, "base.qcow2", "write -P 0x21 0 4k", "write -P 0x22 1M 64k", "write -P 0x23 3M 8k")
    create(d, "top.qcow2", "6M", backing="base.qcow2")
    write(d, "top.qcow2",
          "write -P 0x31 2M 4k",  # base has nothing here: the rest of the cluster is zeroed
          f"write -P 0x32 {MiB + 4 * KiB} 4k",  # the rest is copied from the base's data
          "write -P 0x33 8k 4k",  # copies the base's 4 KiB and its zeros
          "write -P 0x34 5M 4k")  # past the base's end
    dig_holes(d, "base.qcow2", "top.qcow2")


def _data_file(d: Path) -> None:
    for name, dig_metadata in (("ext.qcow2", True), ("ext-dense.qcow2", False)):
        data = name.replace(".qcow2", ".data")
        create(d, name, "4M", f"data_file={data}")
        write(d, name, "write -P 1 0 4k", f"write -P 2 {MiB + 8 * KiB} 4k", "write -P 0 2M 64k",
              "write -P 3 3M 64k")
        dig_holes(d, data, *([name] if dig_metadata else []))


def _compressed(d: Path) -> None:
    create(d, "comp.qcow2", "4M")
    write(d, "comp.qcow2", "write -c -P 0x41 0 64k", "write -P 0x42 1M 4k", "write -c -P 0 2M 64k")
    dig_holes(d, "comp.qcow2")


def _plain(d: Path) -> None:
    """No hole dug: the zeroed rest of the cluster is allocated (unwritten) and counts in
    st_blocks, so QEMU does not ask the file (and the page cache cannot matter)."""
    create(d, "plain.qcow2", "4M")
    write(d, "plain.qcow2", "write -P 1 0 4k", "write -P 2 1M 64k")


RECIPES: tuple[Callable[[Path], None], ...] = (_cs64k, _sizes, _extended_l2, _chain, _data_file, _compressed,
                                               _plain)
#: Images whose qcow2 file looks metadata-preallocated and that have data over holes.
ASKING = ("cs64k.qcow2", "cs16k.qcow2", "cs512.qcow2", "cs512k.qcow2", "cs2m.qcow2", "extl2.qcow2",
          "extl2-2m.qcow2", "top.qcow2", "ext.qcow2", "comp.qcow2")
NOT_ASKING = ("ext-dense.qcow2", "plain.qcow2")
IMAGES = ASKING + NOT_ASKING


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("host-holes")
    for recipe in RECIPES:
        recipe(d)
    return {name: d / name for name in IMAGES}


# --- pynbd map and qemu-img map -----------------------------------------------------------


def pynbd_map(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    capsys.readouterr()
    assert cli.main(["map", *argv]) == 0
    return capsys.readouterr().out


@qemu_tools
@pytest.mark.parametrize("name", IMAGES)
def test_map_json_equals_qemu_img(images: dict[str, Path], capsys: pytest.CaptureFixture[str], name: str) -> None:
    path = images[name]
    expected = qemu_img_map_text(path)
    assert pynbd_map(capsys, "--output", "json", str(path)) == expected
    # The images test what they are meant to: data over holes where QEMU asks the file.
    data_zero = any(r["data"] and r["zero"] for r in json.loads(expected))
    assert data_zero == (name in ASKING)


@qemu_tools
@pytest.mark.parametrize("name", IMAGES)
def test_human_map_equals_qemu_img(images: dict[str, Path], capsys: pytest.CaptureFixture[str], name: str) -> None:
    """qemu-img lists only data not known to be zero."""
    path = images[name]
    ref = subprocess.run(["qemu-img", "map", str(path)], cwd=path.parent, capture_output=True, text=True,
                         timeout=60)
    capsys.readouterr()
    rc = cli.main(["map", str(path)])
    out = capsys.readouterr().out
    assert out == ref.stdout
    assert (rc == 0) == (ref.returncode == 0)


@qemu_tools
def test_shapes(images: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """What QEMU reports, spelt out for a few ranges (the comparisons above say it equals pynbd's)."""
    cs64k = json.loads(pynbd_map(capsys, "--output", "json", str(images["cs64k.qcow2"])))
    rows = {r["start"]: (r["length"], r["zero"], r["data"]) for r in cs64k if r["present"]}
    assert rows == {
        0: (4 * KiB, False, True), 4 * KiB: (60 * KiB, True, True),  # the 4 KiB written, the hole
        192 * KiB: (8 * KiB, True, True), 200 * KiB: (8 * KiB, False, True),
        208 * KiB: (112 * KiB, True, True),  # the cluster's hole and the next one (written zeros)
        1 * MiB: (64 * KiB, False, True),
        2 * MiB: (60 * KiB, True, True), 2 * MiB + 60 * KiB: (4 * KiB, False, True),
        3 * MiB: (64 * KiB, True, False),  # a zero cluster is not data
        5 * MiB: (100 * KiB, False, True), 5 * MiB + 100 * KiB: (28 * KiB, True, True)}
    top = json.loads(pynbd_map(capsys, "--output", "json", str(images["top.qcow2"])))
    # The top's cluster 0 holds the base's 4 KiB, zeros (now a hole), its own 4 KiB, a hole.
    assert [(r["start"], r["length"], r["depth"], r["zero"], r["data"]) for r in top[:4]] == [
        (0, 4 * KiB, 0, False, True), (4 * KiB, 4 * KiB, 0, True, True),
        (8 * KiB, 4 * KiB, 0, False, True), (12 * KiB, 52 * KiB, 0, True, True)]
    comp = json.loads(pynbd_map(capsys, "--output", "json", str(images["comp.qcow2"])))
    assert [(r["zero"], r["data"], "offset" in r) for r in comp if r["start"] in (0, 2 * MiB)] == [
        (False, True, False)] * 2  # compressed clusters are never asked


# --- NBD: pynbd vs qemu-nbd -A -------------------------------------------------------------


def nbd_rows(uri: str, context: str) -> list[tuple[int, int, int]]:
    return merge_rows(nbdinfo_map(uri, context))


@nbd_tools
@pytest.mark.pynbd
@pytest.mark.parametrize("name", IMAGES)
def test_block_status_equals_qemu_nbd(images: dict[str, Path], tmp_path: Path, name: str) -> None:
    path = images[name]
    with QemuNbd(path, tmp_path / "ref.sock") as ref:
        want = {c: merge_rows(ref.map(c)) for c in ("base:allocation", "qemu:allocation-depth")}
        ref_walk = run(["qemu-img", "map", "--output=json", "--image-opts",
                        f"driver=nbd,server.type=unix,server.path={ref.sock}"]).stdout
    with PynbdServer(path, "-r", workdir=tmp_path) as server:
        for context, rows in want.items():
            assert nbd_rows(server.uri, context) == rows, context
        # QEMU's client: one extent per request (REQ_ONE), from where the last one ended.
        assert run(qemu_img_map_argv(server)).stdout == ref_walk
    flags = {value for _off, _n, value in want["base:allocation"]}
    assert (2 in flags) == (name in ASKING)  # NBD_STATE_ZERO without HOLE


# --- QEMU's threshold -----------------------------------------------------------------------


@qemu_tools
@pytest.mark.parametrize("refcount_bits", [1, 4, 16, 64])
def test_threshold_equals_qemu(tmp_path: Path, capsys: pytest.CaptureFixture[str], refcount_bits: int) -> None:
    """K full data clusters and one with a hole, the metadata dug sparse: QEMU asks the file
    while the clusters in use (five of metadata, K + 1 of data) reach
    max(real * 10 // 9, real + 2) for ``real`` clusters of storage (about K), so between
    some K and the next it stops asking. pynbd must agree on each side, with every
    refcount width (the refcount blocks are read to count the clusters in use)."""
    answers = set()
    for full in range(56, 68, 2):
        name = f"k{full}.qcow2"
        create(tmp_path, name, "16M", f"refcount_bits={refcount_bits}")
        write(tmp_path, name, f"write -P 0x51 0 {full * 64}k", f"write -P 0x52 {full * 64}k 4k")
        dig_holes(tmp_path, name)  # the metadata's zeros and the last cluster's 60 KiB
        path = tmp_path / name
        expected = qemu_img_map_text(path)
        assert pynbd_map(capsys, "--output", "json", str(path)) == expected, full
        answers.add(any(r["data"] and r["zero"] for r in json.loads(expected)))
    assert answers == {True, False}  # the sweep crossed QEMU's threshold


# --- cached runs are dropped by the change feed ------------------------------------------------


@qemu_tools
def test_filled_hole_is_seen_after_the_announcement(images: dict[str, Path], tmp_path: Path) -> None:
    """The host file's holes are kept with the classified L2 table; writing into one (what a
    write into an allocated cluster does) is seen once the guest range is announced."""
    path = tmp_path / "copy.qcow2"
    sh(tmp_path, "cp", "--sparse=always", str(images["cs64k.qcow2"]), str(path))
    with open_image(str(path), read_only=True) as image:
        assert isinstance(image, Qcow2Image) and image.top.asks_host_file
        assert states(image, 0, 64 * KiB) == [(0, 4 * KiB, 0), (4 * KiB, 60 * KiB, 2)]
        host = next(h for _pos, _n, kind, h in image.top.runs(0, 64 * KiB) if kind == KIND_DATA)
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\x77" * 8 * KiB, host + 16 * KiB)
        finally:
            os.close(fd)
        assert states(image, 0, 64 * KiB)[1] == (4 * KiB, 60 * KiB, 2)  # the cached runs
        image.changes.announce(16 * KiB, 8 * KiB)
        assert states(image, 0, 64 * KiB) == [(0, 4 * KiB, 0), (4 * KiB, 12 * KiB, 2), (16 * KiB, 8 * KiB, 0),
                                              (24 * KiB, 40 * KiB, 2)]
        assert image.read(16 * KiB, 8 * KiB) == b"\x77" * 8 * KiB


def states(image: Qcow2Image, offset: int, length: int) -> list[tuple[int, int, int]]:
    """Merged ``(offset, length, base:allocation state)`` rows, as the server sends them."""
    rows = []
    pos = offset
    for n, state in image.extents(offset, length).allocation:
        rows.append((pos, n, state))
        pos += n
    return merge_rows(rows)


# --- the pieces, against models ---------------------------------------------------------------


def _naive_nonzero(block: bytes, order: int, entries: int) -> int:
    """Refcount entries decoded one by one as QEMU's get_refcount_ro<order> do."""
    bits = 1 << order
    count = 0
    for i in range(entries):
        if bits >= 8:
            width = bits // 8
            value = int.from_bytes(block[i * width:(i + 1) * width], "big")
        else:
            per_byte = 8 // bits
            value = (block[i // per_byte] >> (bits * (i % per_byte))) & ((1 << bits) - 1)
        count += value != 0
    return count


@given(order=st.integers(0, 6), data=st.data())
def test_nonzero_entries_equals_naive_decoding(order: int, data: st.DataObject) -> None:
    block_size = data.draw(st.sampled_from([512, 1024]))
    block = data.draw(st.binary(min_size=block_size, max_size=block_size)
                      | st.lists(st.sampled_from([0, 0, 0, 1, 0x80, 0xFF]), min_size=block_size,
                                 max_size=block_size).map(bytes))
    entries = data.draw(st.integers(0, block_size * 8 >> order))
    assert nonzero_entries(block, order, entries) == _naive_nonzero(block, order, entries)


_BLOCKS = 24


@st.composite
def _layout_and_runs(draw: st.DrawFn) -> tuple[list[bool], int, list[Run]]:
    """A host file of 4 KiB blocks (data or hole) and a file length, and guest runs over it."""
    blocks = draw(st.lists(st.booleans(), min_size=_BLOCKS, max_size=_BLOCKS))
    file_size = draw(st.integers(0, _BLOCKS * 8)) * 512
    runs: list[Run] = []
    pos = 0
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.sampled_from([KIND_DATA, KIND_DATA, KIND_ZERO, KIND_UNALLOC, KIND_COMPRESSED]))
        n = draw(st.integers(1, 6)) * 512
        if kind == KIND_DATA:
            host = draw(st.integers(0, (_BLOCKS + 4) * 8)) * 512  # may lie past the end of the file
        elif kind == KIND_COMPRESSED:
            host = 0x4000_0000_0000_0000 | draw(st.integers(0, 1 << 20))
        else:
            host = draw(st.sampled_from([-1, 512 * draw(st.integers(0, 64))]))
        runs.append((pos, n, kind, host))
        pos += n
    return blocks, file_size, runs


@settings(max_examples=150)
@given(case=_layout_and_runs())
def test_split_host_holes_equals_per_byte_model(case: tuple[list[bool], int, list[Run]]) -> None:
    blocks, file_size, runs = case
    with tempfile.TemporaryFile() as f:
        for index, is_data in enumerate(blocks):
            if is_data:
                os.pwrite(f.fileno(), b"\x01" * FS_BLOCK, index * FS_BLOCK)
        os.ftruncate(f.fileno(), file_size)
        # The model: a byte is data where its 4 KiB block was written and lies before the end.
        def host_is_data(h: int) -> bool:
            return h < file_size and blocks[h // FS_BLOCK]
        got = split_host_holes(list(runs), f.fileno())
    # Same guest coverage, in order; other kinds untouched; data split byte-exactly.
    assert [p for p, *_ in got] == sorted(p for p, *_ in got)
    assert sum(n for _p, n, *_ in got) == sum(n for _p, n, *_ in runs)
    model = []
    for pos, n, kind, host in runs:
        if kind != KIND_DATA:
            model += [(pos + i, kind, host) for i in range(0, n, 512)]
        else:
            model += [(pos + i, KIND_DATA if host_is_data(host + i) else KIND_HOST_HOLE, host + i)
                      for i in range(0, n, 512)]
    pieces = []
    for pos, n, kind, host in got:
        assert n > 0 and n % 512 == 0
        if kind in (KIND_DATA, KIND_HOST_HOLE):
            pieces += [(pos + i, kind, host + i) for i in range(0, n, 512)]
        else:
            assert n == next(m for p, m, *_ in runs if p == pos)
            pieces += [(pos + i, kind, host) for i in range(0, n, 512)]
    assert pieces == model
