"""``pynbd create``: raw and qcow2 images against what qemu-img makes of the same request.

The reference is ``qemu-img create`` itself: for each size, cluster size, extended
L2, backing file and preallocation mode the image pynbd writes must be the same
file as qemu-img's (byte for byte, holes compared as zeros), pass ``qemu-img
check``, be described by ``qemu-img info`` as asked, map the same
(``qemu-img map``), hold the same content (``qemu-img compare``), take writes from
qemu-io, and be served by pynbd. The allocator replay in
:mod:`pynbd.tools.create_qcow2` is also checked on its own (hypothesis): whatever
it plans is a self-consistent image.

Creation runs :func:`pynbd.cli.main` in-process; the exit-code / one-line-error
contract is checked on the real ``python -m pynbd`` command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pynbd import cli
from pynbd.tools.create_qcow2 import PREALLOC_MODES, Qcow2Layout, l1_entries, l2_entries, plan_qcow2
from tests.support.servers import REPO_ROOT, PynbdServer, nbdinfo

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
SIZES = {"1M": MiB, "1G": GiB, "1G+512": GiB + 512, "3G-1": 3 * GiB - 1}
CLUSTERS = {"512": 512, "4K": 4 * KiB, "64K": 64 * KiB, "2M": 2 * MiB}

needs_qemu = pytest.mark.needs("qemu-img", "qemu-io")


def sector_round(size: int) -> int:
    return -(-size // 512) * 512


@pytest.fixture
def work(tmp_path: Path) -> Iterator[Path]:
    """tmp_path, emptied afterwards: preallocated images take real disk space."""
    yield tmp_path
    for path in tmp_path.rglob("*"):
        if path.is_file():
            path.unlink()


def pynbd_create(*argv: str | Path) -> str:
    """``pynbd create ARGV`` in-process; returns its stdout line. Fails on an error."""
    from contextlib import redirect_stdout
    from io import StringIO

    out = StringIO()
    with redirect_stdout(out):
        rc = cli.main(["create", *map(str, argv)])
    assert rc == 0
    return out.getvalue()


def qemu_img(*args: str | Path, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *map(str, args)], cwd=cwd, check=check, capture_output=True,
                          text=True, timeout=300)


def qemu_create(image: Path, size: int | None, *, cluster: int = 64 * KiB, extended_l2: bool = False,
                prealloc: str = "off", backing: str | None = None, backing_fmt: str | None = None) -> None:
    opts = f"cluster_size={cluster},extended_l2={'on' if extended_l2 else 'off'},preallocation={prealloc}"
    args: list[str | Path] = ["create", "-q", "-f", "qcow2", "-o", opts]
    if backing:
        args += ["-b", backing, "-F", backing_fmt or "raw"]
    qemu_img(*args, image, *([] if size is None else [str(size)]))


def pynbd_create_qcow2(image: Path, size: int | None, *, cluster: int = 64 * KiB, extended_l2: bool = False,
                       prealloc: str = "off", backing: str | None = None, backing_fmt: str | None = None) -> str:
    args: list[str | Path] = [image, *([] if size is None else [str(size)]), "-f", "qcow2",
                              "--cluster-size", str(cluster), "--preallocation", prealloc]
    if extended_l2:
        args.append("--extended-l2")
    if backing:
        args += ["-b", backing]
    if backing_fmt:
        args += ["-F", backing_fmt]
    return pynbd_create(*args)


def check_clean(image: Path) -> None:
    """``qemu-img check``: no corruption, no leak (exit code 0)."""
    p = qemu_img("check", "--output=json", image, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    result = json.loads(p.stdout)
    assert result.get("corruptions", 0) == 0 and result.get("leaks", 0) == 0, result


def info(image: Path) -> dict:
    return json.loads(qemu_img("info", "--output=json", image).stdout)


def qemu_map(image: Path) -> list[dict]:
    return json.loads(qemu_img("map", "--output=json", image).stdout)


def data_extents(path: Path) -> list[tuple[int, int]]:
    """The file's data ranges (SEEK_DATA/SEEK_HOLE); holes read as zeros."""
    out = []
    with open(path, "rb") as f:
        fd, end, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            out.append((start, pos))
    return out


def assert_same_file(mine: Path, ref: Path) -> None:
    """Same length and same bytes; ranges that are holes in both files are not read."""
    assert mine.stat().st_size == ref.stat().st_size
    ranges = sorted(data_extents(mine) + data_extents(ref))
    with open(mine, "rb") as a, open(ref, "rb") as b:
        for start, end in ranges:
            for pos in range(start, end, 8 * MiB):
                length = min(8 * MiB, end - pos)
                a.seek(pos)
                b.seek(pos)
                chunk_a, chunk_b = a.read(length), b.read(length)
                if chunk_a != chunk_b:
                    first = next(i for i, (x, y) in enumerate(zip(chunk_a, chunk_b)) if x != y)
                    pytest.fail(f"{mine} and {ref} differ at byte {pos + first:#x}")


def assert_info(image: Path, size: int, cluster: int, extended_l2: bool = False,
                backing: str | None = None, backing_fmt: str | None = None) -> None:
    got = info(image)
    assert (got["format"], got["virtual-size"], got["cluster-size"]) == ("qcow2", sector_round(size), cluster)
    data = got["format-specific"]["data"]
    assert (data["compat"], data["extended-l2"], data["refcount-bits"], data["lazy-refcounts"],
            data["corrupt"], data["compression-type"]) == ("1.1", extended_l2, 16, False, False, "zlib")
    assert got.get("backing-filename") == backing
    assert got.get("backing-filename-format") == backing_fmt


def assert_like_qemu(work: Path, size: int, *, cluster: int = 64 * KiB, extended_l2: bool = False,
                     prealloc: str = "off", backing: str | None = None, backing_fmt: str | None = None) -> Path:
    """pynbd's image and qemu-img's for the same request: same file, clean, described
    as asked, same map, same content. Returns pynbd's image."""
    mine, ref = work / "mine.qcow2", work / "ref.qcow2"
    opts = dict(cluster=cluster, extended_l2=extended_l2, prealloc=prealloc, backing=backing,
                backing_fmt=backing_fmt)
    pynbd_create_qcow2(mine, size, **opts)
    qemu_create(ref, size, **opts)
    assert_same_file(mine, ref)
    check_clean(mine)
    virtual = size if size is not None else info(ref)["virtual-size"]
    assert_info(mine, virtual, cluster, extended_l2, backing, backing_fmt if backing else None)
    assert qemu_map(mine) == qemu_map(ref)
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", mine, ref)
    return mine


# --- the same file as qemu-img ----------------------------------------------------------


def _matrix() -> list:
    cases = []
    for size_name in SIZES:
        for cluster_name in CLUSTERS:
            cases.append((size_name, cluster_name, "off"))
            # qemu-img takes minutes to preallocate gigabytes in 512-byte clusters;
            # those images are checked without it (test_small_clusters_large_metadata).
            if cluster_name != "512" or size_name == "1M":
                cases.append((size_name, cluster_name, "metadata"))
    for cluster_name in CLUSTERS:
        cases += [("1M", cluster_name, "falloc"), ("1M", cluster_name, "full")]
    cases += [("1G+512", "4K", "falloc"), ("1G+512", "2M", "falloc"), ("1G+512", "64K", "full")]
    return [pytest.param(*case, id="-".join(case)) for case in cases]


@needs_qemu
@pytest.mark.parametrize("size_name,cluster_name,prealloc", _matrix())
def test_qcow2_like_qemu_img(work: Path, size_name: str, cluster_name: str, prealloc: str) -> None:
    assert_like_qemu(work, SIZES[size_name], cluster=CLUSTERS[cluster_name], prealloc=prealloc)


@needs_qemu
@pytest.mark.parametrize("size", [MiB, GiB + 512], ids=["1M", "1G+512"])
@pytest.mark.parametrize("cluster", [16 * KiB, 64 * KiB, 2 * MiB], ids=["16K", "64K", "2M"])
@pytest.mark.parametrize("prealloc", ["off", "metadata", "falloc"])
def test_extended_l2_like_qemu_img(work: Path, size: int, cluster: int, prealloc: str) -> None:
    if prealloc == "falloc" and size > MiB:
        size = MiB + 512  # the same unaligned tail, without reserving a gigabyte twice
    assert_like_qemu(work, size, cluster=cluster, extended_l2=True, prealloc=prealloc)


@needs_qemu
def test_small_clusters_large_metadata(work: Path) -> None:
    """1 GiB, 512-byte clusters, metadata preallocation: the refcount table grows ten
    times while QEMU allocates, and QEMU 7.2 then maps guest data onto an outgrown
    table (its image reads that table's bytes at guest offset 756449280). pynbd's
    image is QEMU's layout with zeros there."""
    image = work / "big.qcow2"
    pynbd_create_qcow2(image, GiB, cluster=512, prealloc="metadata")
    check_clean(image)
    assert_info(image, GiB, 512)
    layout = plan_qcow2(GiB, 9, False, "metadata")
    assert len(layout.old_reftables) == 10
    reused = next(host + 756449280 // 512 - guest for guest, host, count in layout.data_runs
                  if guest <= 756449280 // 512 < guest + count)
    assert reused in {cluster for cluster, _entries in layout.old_reftables}
    out = qemu_io(image, "read -P 0 756449280 64k", "write -P 5 0 64k", "read -P 5 0 64k",
                  f"write -P 6 {GiB - 64 * KiB} 64k", f"read -P 6 {GiB - 64 * KiB} 64k")
    assert out.count("read 65536/65536") == 3
    check_clean(image)


# --- backing files ----------------------------------------------------------------------


@pytest.fixture
def backings(work: Path) -> dict[str, Path]:
    """A raw (3 MiB + 1000 bytes) and a qcow2 (5 MiB) backing file with data, in work/."""
    raw, qcow2 = work / "base.raw", work / "base.qcow2"
    raw.write_bytes(bytes(range(256)) * (3 * 4096) + b"\x07" * 1000)
    qemu_img("create", "-q", "-f", "qcow2", qcow2, "5M")
    qemu_io(qcow2, "write -P 9 1M 1M", fmt="qcow2")
    return {"raw": raw, "qcow2": qcow2}


@needs_qemu
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("size", [None, 8 * MiB], ids=["no-size", "8M"])
@pytest.mark.parametrize("cluster", [512, 64 * KiB], ids=["512", "64K"])
def test_backing_like_qemu_img(work: Path, backings: dict[str, Path], fmt: str, size: int | None,
                               cluster: int) -> None:
    name = backings[fmt].name
    mine = assert_like_qemu(work, size, cluster=cluster, backing=name, backing_fmt=fmt)
    if size is None:  # the backing file's size (the raw one rounded up to a sector)
        assert info(mine)["virtual-size"] == sector_round(info(backings[fmt])["virtual-size"])
    # Nothing allocated: every byte reads from the backing file (zeros past its end).
    qemu_img("compare", "-f", "qcow2", "-F", fmt, mine, backings[fmt])


@needs_qemu
@pytest.mark.parametrize("prealloc", ["metadata", "falloc", "full"])
def test_backing_with_extended_l2_preallocation(work: Path, backings: dict[str, Path], prealloc: str) -> None:
    """Preallocated clusters with unallocated subclusters still read the backing file."""
    mine = assert_like_qemu(work, 4 * MiB, extended_l2=True, prealloc=prealloc, backing="base.qcow2",
                            backing_fmt="qcow2")
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", mine, backings["qcow2"])


@needs_qemu
def test_backing_name_relative_to_image(work: Path, backings: dict[str, Path],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The name is stored as given and found next to the image, not in the CWD; the
    format is probed when -F is left out."""
    sub = work / "sub"
    sub.mkdir()
    os.replace(backings["qcow2"], sub / "base.qcow2")
    monkeypatch.chdir(work)
    out = pynbd_create("sub/top.qcow2", "-b", "base.qcow2")
    assert out == "created sub/top.qcow2: qcow2, 5242880 bytes, 65536-byte clusters, " \
                  "backing file base.qcow2 (qcow2)\n"
    assert_info(sub / "top.qcow2", 5 * MiB, 64 * KiB, backing="base.qcow2", backing_fmt="qcow2")
    check_clean(sub / "top.qcow2")
    qemu_img("compare", "-f", "qcow2", "-F", "qcow2", sub / "top.qcow2", sub / "base.qcow2")


# --- writes after creation --------------------------------------------------------------


def qemu_io(image: Path, *commands: str, fmt: str = "qcow2") -> str:
    args = ["qemu-io", "-f", fmt]
    for command in commands:
        args += ["-c", command]
    p = subprocess.run([*args, str(image)], check=True, capture_output=True, text=True, timeout=300)
    assert "failed" not in p.stdout + p.stderr, p.stdout + p.stderr
    return p.stdout


@needs_qemu
@pytest.mark.parametrize("size_name,cluster_name,prealloc,extended_l2", [
    ("1M", "512", "off", False), ("1M", "512", "metadata", False), ("1M", "4K", "full", False),
    ("1G", "4K", "off", False), ("1G+512", "64K", "metadata", False), ("3G-1", "2M", "off", False),
    ("1G+512", "64K", "off", True), ("1M", "64K", "falloc", True),
])
def test_qemu_io_writes_and_reads(work: Path, size_name: str, cluster_name: str, prealloc: str,
                                  extended_l2: bool) -> None:
    """Writes at both ends need new L2 tables and refcount blocks (512-byte clusters:
    a block counts only 256 clusters); afterwards the image is still clean."""
    size, cluster = SIZES[size_name], CLUSTERS[cluster_name]
    image = work / "rw.qcow2"
    pynbd_create_qcow2(image, size, cluster=cluster, prealloc=prealloc, extended_l2=extended_l2)
    last = sector_round(size) - 64 * KiB
    out = qemu_io(image, "write -P 5 0 64k", "read -P 5 0 64k", f"write -P 6 {last} 64k",
                  f"read -P 6 {last} 64k", "read -P 0 64k 64k")
    assert out.count("read 65536/65536") == 3
    check_clean(image)


# --- the planner on its own -------------------------------------------------------------


def assert_consistent(layout: Qcow2Layout, preallocation: str) -> None:
    """Every cluster in use is exactly one structure and is refcounted, nothing else is;
    the preallocated guest clusters are each mapped once; the file holds every cluster."""
    cs = layout.cluster_size
    span = l2_entries(layout.cluster_bits, layout.extended_l2)
    owners: dict[int, str] = {}

    def claim(first: int, count: int, what: str) -> None:
        for cluster in range(first, first + count):
            assert cluster not in owners, f"cluster {cluster}: {what} and {owners[cluster]}"
            owners[cluster] = what

    claim(0, 1, "header")
    claim(layout.reftable_cluster, len(layout.reftable) * 8 // cs, "refcount table")
    for index, block in enumerate(layout.reftable):
        if block:
            claim(block, 1, f"refcount block {index}")
    assert layout.l1_size == l1_entries(layout.size, layout.cluster_bits, layout.extended_l2)
    if layout.l1_size:
        claim(layout.l1_cluster, -(-layout.l1_size * 8 // cs), "L1 table")
    for index, table in layout.l2_tables.items():
        assert index < layout.l1_size
        claim(table, 1, f"L2 table {index}")
    guest = []
    for first_guest, host, count in layout.data_runs:
        assert first_guest // span == (first_guest + count - 1) // span, "a run crosses an L2 table"
        assert first_guest // span in layout.l2_tables
        claim(host, count, "data")
        guest += range(first_guest, first_guest + count)
    refcounted = {i for i, used in enumerate(layout.refcounted) if used}
    assert refcounted == set(owners)
    per_block = cs * 8 // 16
    assert all(layout.reftable[c // per_block] for c in refcounted)
    wanted = -(-layout.size // cs) if preallocation != "off" else 0
    assert sorted(guest) == list(range(wanted))
    # qemu-img check: every referenced cluster starts before the end of the file.
    assert layout.file_length > max(owners) * cs


@settings(max_examples=300, deadline=None)
@given(st.integers(9, 21), st.booleans(), st.sampled_from(PREALLOC_MODES), st.data())
def test_planner_consistent(cluster_bits: int, extended_l2: bool, preallocation: str, data: st.DataObject) -> None:
    extended_l2 = extended_l2 and cluster_bits >= 14
    # Up to ~20000 clusters: several refcount blocks, refcount table growth at 512 bytes.
    size = data.draw(st.integers(0, 20000)) << cluster_bits
    size = sector_round(max(0, size - data.draw(st.integers(0, 1 << cluster_bits))))
    assert_consistent(plan_qcow2(size, cluster_bits, extended_l2, preallocation), preallocation)


@needs_qemu
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(9, 21), st.booleans(), st.sampled_from(["off", "metadata", "falloc"]), st.data())
def test_random_images_like_qemu_img(cluster_bits: int, extended_l2: bool, preallocation: str,
                                     data: st.DataObject) -> None:
    """Random sizes (not sector aligned) and cluster sizes: the same file as qemu-img's, clean."""
    extended_l2 = extended_l2 and cluster_bits >= 14
    # qemu-img is slow to preallocate many small clusters: at most 16384 clusters.
    size = data.draw(st.integers(0, min(16384 << cluster_bits, 256 * MiB)), label="size")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        opts = dict(cluster=1 << cluster_bits, extended_l2=extended_l2, prealloc=preallocation)
        pynbd_create_qcow2(work / "mine.qcow2", size, **opts)
        qemu_create(work / "ref.qcow2", size, **opts)
        assert_same_file(work / "mine.qcow2", work / "ref.qcow2")
        check_clean(work / "mine.qcow2")


# --- raw, defaults, errors, serving -----------------------------------------------------


@needs_qemu
@pytest.mark.parametrize("prealloc", ["off", "falloc", "full"])
@pytest.mark.parametrize("size", [0, 1000, MiB, 3 * MiB - 1])
def test_raw(work: Path, prealloc: str, size: int) -> None:
    """Raw keeps the exact size, which pynbd serves (qemu-img would round it up to a
    sector, and QEMU reads a raw file in whole sectors); falloc reserves the blocks,
    full writes them; the content is zeros either way."""
    image = work / "disk.img"
    out = pynbd_create(image, str(size), "--preallocation", prealloc)
    mode = "sparse" if prealloc == "off" else f"preallocation={prealloc}"
    assert out == f"created {image}: raw, {size} bytes ({mode})\n"
    st_ = image.stat()
    assert st_.st_size == size
    if prealloc == "off":
        assert st_.st_blocks == 0
    else:
        assert st_.st_blocks * 512 >= size
    assert (info(image)["format"], info(image)["virtual-size"]) == ("raw", sector_round(size))
    assert image.read_bytes() == bytes(size)


@needs_qemu
def test_format_from_name_and_size_rounding(work: Path) -> None:
    out = pynbd_create(work / "a.QCOW2", str(3 * GiB - 1))
    assert out == f"created {work / 'a.QCOW2'}: qcow2, {3 * GiB} bytes, 65536-byte clusters\n"
    assert_info(work / "a.QCOW2", 3 * GiB, 64 * KiB)
    pynbd_create(work / "b.qcow2.img", "1M")
    assert info(work / "b.qcow2.img")["format"] == "raw"
    pynbd_create(work / "c.img", "1M", "-f", "qcow2", "--cluster-size", "2M", "--extended-l2",
                 "--preallocation", "metadata")
    assert_info(work / "c.img", MiB, 2 * MiB, extended_l2=True)


def pynbd_cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pynbd", "create", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})


# (pynbd create args, qemu-img create args for the same request, words of pynbd's error)
REFUSED = [
    (["x.qcow2", "1M", "--cluster-size", "4K", "--extended-l2"],
     ["-f", "qcow2", "-o", "cluster_size=4k,extended_l2=on", "x.qcow2", "1M"], "at least 16384 bytes"),
    (["x.qcow2", "1M", "--cluster-size", "3K"], ["-f", "qcow2", "-o", "cluster_size=3k", "x.qcow2", "1M"],
     "not a power of two"),
    (["x.qcow2", "1M", "--cluster-size", "4M"], ["-f", "qcow2", "-o", "cluster_size=4M", "x.qcow2", "1M"],
     "not a power of two"),
    (["x.img", "1M", "-b", "base.raw"], ["-f", "raw", "-b", "base.raw", "-F", "raw", "x.img", "1M"],
     "is for qcow2 images"),
    (["x.img", "1M", "--preallocation", "metadata"], ["-f", "raw", "-o", "preallocation=metadata", "x.img", "1M"],
     "not metadata"),
    (["x.qcow2", "-b", "base.raw", "--preallocation", "metadata"],
     ["-f", "qcow2", "-b", "base.raw", "-F", "raw", "-o", "preallocation=metadata", "x.qcow2"],
     "need --extended-l2"),
    (["x.qcow2", "1M", "-F", "raw"], ["-f", "qcow2", "-o", "backing_fmt=raw", "x.qcow2", "1M"],
     "needs a backing file"),
    (["x.qcow2", "-b", "missing.raw"], ["-f", "qcow2", "-b", "missing.raw", "-F", "raw", "x.qcow2"],
     "No such file or directory"),
    (["x.qcow2", "200G", "--cluster-size", "512"], ["-f", "qcow2", "-o", "cluster_size=512", "x.qcow2", "200G"],
     "L1 table would exceed 32 MiB"),
    # base.raw by a 388-byte name; a 512-byte header cluster has room for 376.
    (["x.qcow2", "1M", "-b", "./" * 190 + "base.raw", "--cluster-size", "512"],
     ["-f", "qcow2", "-b", "./" * 190 + "base.raw", "-F", "raw", "-o", "cluster_size=512", "x.qcow2", "1M"],
     "does not fit"),
    (["x.qcow2"], None, "a size is needed"),
    (["base.raw", "1M"], None, "File exists"),
]


@needs_qemu
@pytest.mark.parametrize("args,qemu_args,words", REFUSED, ids=[words for _a, _q, words in REFUSED])
def test_refused(work: Path, args: list[str], qemu_args: list[str] | None, words: str) -> None:
    """One line, exit code 2, no file left; qemu-img refuses the same request."""
    (work / "base.raw").write_bytes(b"\0" * 4096)
    before = set(work.iterdir())
    p = pynbd_cli(*args, cwd=work)
    assert p.returncode == 2, p.stderr
    assert len(p.stderr.splitlines()) == 1 and p.stderr.startswith("pynbd: error: ") and words in p.stderr, p.stderr
    assert p.stdout == ""
    assert set(work.iterdir()) == before
    if qemu_args:
        assert qemu_img("create", *qemu_args, cwd=work, check=False).returncode != 0


@pytest.mark.pynbd
@pytest.mark.needs("qemu-img", "qemu-io", "nbdinfo")
@pytest.mark.parametrize("name,args,size", [
    ("served.qcow2", [str(GiB + 512)], GiB + 512),
    ("served-backing.qcow2", ["-b", "base.raw", "--extended-l2", "--preallocation", "metadata"], 3 * MiB + 1024),
    ("served.img", ["1000"], 1000),
])
def test_pynbd_serves_created_image(work: Path, backings: dict[str, Path], name: str, args: list[str],
                                    size: int) -> None:
    image = work / name
    pynbd_create(image, *args)
    with PynbdServer(image, "-r", workdir=work) as server:
        exports = json.loads(nbdinfo("--json", "--no-content", server.uri))["exports"]
    assert exports[0]["export-size"] == size
