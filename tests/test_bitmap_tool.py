"""``pynbd bitmap IMAGE BITMAP --OPERATION...`` against ``qemu-img bitmap``.

Each case copies one image twice, runs ``qemu-img bitmap`` on copy A and ``pynbd bitmap``
(in-process, :func:`pynbd.cli.main`) on copy B with the same arguments: both succeed or
both fail. On success ``qemu-img check`` finds B clean, ``qemu-img info`` lists the same
bitmaps with the same flags and granularities for A and B, and qemu-nbd serves the same
dirty map of every consistent bitmap of A and of B. On failure pynbd exits 1 with one
line naming the file and the bitmap, and B is byte for byte as before (qemu-img may have
applied the operations before the failing one: pynbd applies all or nothing).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pynbd import cli
from pynbd.image.qcow2.bitmapdir import default_granularity
from pynbd.image.qcow2.bitmaps import BME_OFFSET_MASK, load_bitmaps, read_table
from pynbd.image.qcow2.header import parse_header
from pynbd.tools.bitmap import BitmapOpError, parse_granularity
from tests.qcow2_fixtures import QemuNbd, merge_rows, requires_qemu, session_fixtures
from tests.support.servers import REPO_ROOT, PynbdServer, QemuNbdServer, nbdinfo, qemu_io
from tests.support.strace import parse, strace_argv

pytestmark = requires_qemu

MiB = 1 << 20


def qimg(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True, text=True, timeout=120,
                          check=check)


def make_image(path: Path, size: str, cluster_size: str, bitmaps: Sequence[tuple[str, str, bool]],
               writes: Sequence[str] = ()) -> Path:
    """A qcow2 image with ``bitmaps`` (name, granularity, enabled) added by qemu-img,
    then ``writes`` (qemu-io commands) recorded in the enabled ones."""
    qimg("create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}", path, size)
    for name, granularity, enabled in bitmaps:
        qimg("bitmap", "--add", "-g", granularity, *([] if enabled else ["--disable"]), path, name)
    if writes:
        qemu_io(path, *writes, fmt="qcow2")
    return path


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The session fixtures plus images made here for bitmap operations."""
    images = dict(session_fixtures(tmp_path_factory))
    d = tmp_path_factory.mktemp("bmtool")
    images["cs512-bm.qcow2"] = make_image(
        d / "cs512-bm.qcow2", "2M", "512", [("g512", "512", True), ("g64k", "64k", True), ("off", "4k", False)],
        ["write -P 1 0 700", "write -P 2 1000k 5k", "write -z 1536k 100k"])
    images["cs2m-bm.qcow2"] = make_image(
        d / "cs2m-bm.qcow2", "256M", "2M", [("g64m", "64M", True), ("g4k", "4k", True), ("g2m", "2M", False)],
        ["write -P 3 0 4k", "write -P 4 100M 3M", "write -P 5 255M 1M"])
    # Same size as bitmaps.qcow2 (16 MiB), other granularities: merge sources.
    images["src.qcow2"] = make_image(
        d / "src.qcow2", "16M", "64k", [("s32k", "32k", True), ("s1m", "1M", True)],
        ["write -P 6 96k 1k", "write -P 7 5M 300k", "write -P 8 16382k 2k"])
    images["big.qcow2"] = make_image(d / "big.qcow2", "32M", "64k", [("s32k", "32k", True)], ["write 0 1M"])
    # An in-use bitmap as a crash leaves it: qemu-io killed by itself right after a write.
    inuse = make_image(d / "crashed.qcow2", "16M", "64k", [("on", "64k", True), ("off", "128k", False)],
                       ["write -P 9 1M 64k"])
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 10 3M 64k", "-c", "sigraise 9", str(inuse)],
                   capture_output=True, timeout=60)
    assert [b["flags"] for b in qemu_bitmaps(inuse)] == [["in-use", "auto"], ["in-use"]]
    images["crashed.qcow2"] = inuse
    # 8 TiB: a bitmap of 512-byte granules would take 2 GiB, more than QEMU allows.
    qimg("create", "-q", "-f", "qcow2", d / "huge.qcow2", "8T")
    images["huge.qcow2"] = d / "huge.qcow2"
    return images


# --- running both ------------------------------------------------------------------------


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def qemu_bitmaps(path: Path) -> list[dict]:
    info = json.loads(qimg("info", "-U", "--output=json", path).stdout)
    return info.get("format-specific", {}).get("data", {}).get("bitmaps", [])


def pynbd_bitmap(*argv: str | Path) -> tuple[int, str, str]:
    """``pynbd bitmap ARGV`` in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(["bitmap", *map(str, argv)])
    return rc, out.getvalue(), err.getvalue()


def dirty_maps(path: Path, sock: Path) -> dict[str, list[tuple[int, int, int]]]:
    """Every consistent bitmap's dirty map as qemu-nbd serves it."""
    names = [b["name"] for b in qemu_bitmaps(path) if "in-use" not in b["flags"]]
    if not names:
        return {}
    with QemuNbd(path, sock, bitmaps=names, allocation_depth=False) as server:
        return {n: merge_rows(server.map(f"qemu:dirty-bitmap:{n}")) for n in names}


#: Images with a backing file (copied next to them).
BACKING = {"bm-top.qcow2": "bm-base.raw"}


@dataclass
class Outcome:
    ok: bool
    qemu_stderr: str
    pynbd_stderr: str
    a: Path
    b: Path


def compare(fx: dict[str, Path], image: str, args: Sequence[str | Path], bitmap: str, work: Path) -> Outcome:
    """Run ``qemu-img bitmap ARGS A BITMAP`` and ``pynbd bitmap ARGS B BITMAP`` on copies of
    ``image`` and check the module doc's promises; returns what happened."""
    a, b = work / "a" / image, work / "b" / image
    for copy in (a, b):
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(fx[image], copy)
        if image in BACKING:  # qemu-img check and qemu-nbd open it
            shutil.copyfile(fx[BACKING[image]], copy.parent / BACKING[image])
    before = sha256(b)
    ref = qimg("bitmap", *args, a, bitmap, check=False)
    rc, out, err = pynbd_bitmap(*args, b, bitmap)
    assert (ref.returncode == 0) == (rc == 0), f"qemu-img: {ref.returncode} {ref.stderr}\npynbd: {rc} {err}"
    if rc:
        assert rc == 1 and out == "", (rc, out, err)
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("pynbd: error: "), err
        assert sha256(b) == before, "a refused operation changed the file"
        return Outcome(False, ref.stderr, err, a, b)
    assert out == err == ""
    check = qimg("check", b, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert qemu_bitmaps(b) == qemu_bitmaps(a)
    assert dirty_maps(b, work / "b.sock") == dirty_maps(a, work / "a.sock")
    return Outcome(True, ref.stderr, err, a, b)


def refused(outcome: Outcome, path_named: bool = True, *fragments: str) -> None:
    """Both failed; pynbd's line names B and each fragment."""
    assert not outcome.ok
    if path_named:
        assert str(outcome.b) in outcome.pynbd_stderr
    for fragment in fragments:
        assert fragment in outcome.pynbd_stderr, outcome.pynbd_stderr


# --- add ----------------------------------------------------------------------------------


@pytest.mark.parametrize("image,args", [
    ("v3-64k.qcow2", ["--add"]),                          # the first bitmap: the extension appears
    ("v3-64k.qcow2", ["--add", "-g", "512"]),
    ("v3-64k.qcow2", ["--add", "-g", "64M", "--disable"]),
    ("v3-64k.qcow2", ["--add", "-g", "2G"]),
    ("v3-64k.qcow2", ["--add", "-g", "0"]),                 # 0: the default
    ("v3-64k.qcow2", ["-g", "0x800", "--add"]),
    ("v3-64k.qcow2", ["--add", "-g", "1.5K", "-g", "1K"]),  # the last -g counts
    ("bitmaps.qcow2", ["--add", "-g", "4k"]),
    ("bm-top.qcow2", ["--add"]),                            # the backing file name moves
    ("snap.qcow2", ["--add", "-g", "16k"]),
    ("cs512.qcow2", ["--add"]),                             # default 4 KiB, not the cluster size
    ("cs2m.qcow2", ["--add"]),                              # default 64 KiB
    ("cs512-bm.qcow2", ["--add", "-g", "1M"]),
    ("cs2m-bm.qcow2", ["--add", "-g", "512"]),
    ("crashed.qcow2", ["--add", "-g", "32k"]),              # in-use bitmaps stay as they are
    ("odd.qcow2", ["--add", "-g", "1k"]),
    ("extl2.qcow2", ["--add"]),
    ("comp-zlib.qcow2", ["--add", "-g", "8k"]),
])
def test_add(fx: dict[str, Path], tmp_path: Path, image: str, args: list[str]) -> None:
    assert compare(fx, image, args, "new", tmp_path).ok


def test_add_over_a_stale_extension(fx: dict[str, Path], tmp_path: Path) -> None:
    """Autoclear bit 0 clear: the old bitmaps are lost (their clusters leak, as QEMU
    leaves them); the new one replaces the extension and sets the bit again."""
    results = []
    for tool, where in (("qemu", "a"), ("pynbd", "b")):
        image = tmp_path / where / "stale.qcow2"
        image.parent.mkdir()
        shutil.copyfile(fx["bitmaps-noautoclear.qcow2"], image)
        if tool == "qemu":
            assert qimg("bitmap", "--add", "-g", "4k", image, "x", check=False).returncode == 0
        else:
            assert pynbd_bitmap("--add", "-g", "4k", image, "x")[0] == 0
        check = qimg("check", image, check=False)
        results.append((qemu_bitmaps(image), check.returncode, check.stdout.count("Leaked cluster")))
    assert results[0] == results[1]
    assert results[1][1] == 3 and results[1][0] == [{"flags": ["auto"], "name": "x", "granularity": 4096}]


def test_add_default_granularity_is_qemus() -> None:
    assert [default_granularity(1 << bits) for bits in range(9, 22)] == [
        4096, 4096, 4096, 4096, 8192, 16384, 32768, 65536, 65536, 65536, 65536, 65536, 65536]


def test_add_longest_name_and_unicode(fx: dict[str, Path], tmp_path: Path) -> None:
    assert compare(fx, "bitmaps.qcow2", ["--add"], "n" * 1023, tmp_path / "long").ok
    assert compare(fx, "bitmaps.qcow2", ["--add"], "\u00e9t\u00e9-\U0001f600", tmp_path / "utf8").ok


@pytest.mark.parametrize("image,args,bitmap,fragment", [
    ("bitmaps.qcow2", ["--add"], "b0", "exists"),
    ("crashed.qcow2", ["--add"], "on", "exists"),
    ("bitmaps.qcow2", ["--add"], "n" * 1024, "1024 bytes"),
    ("bitmaps.qcow2", ["--add"], "\u00e9" * 512, "1024 bytes"),  # 512 characters, 1024 bytes
    ("bitmaps.qcow2", ["--add"], "", "empty"),
    ("bitmaps.qcow2", ["--add", "-g", "1000"], "x", "power of 2"),
    ("bitmaps.qcow2", ["--add", "-g", "256"], "x", "power of 2"),
    ("bitmaps.qcow2", ["--add", "-g", "3G"], "x", "power of 2"),
    ("bitmaps.qcow2", ["--add", "-g", "4G"], "x", "exceeds"),
    ("bitmaps.qcow2", ["--add", "-g", "64 k"], "x", "invalid granularity"),
    ("bitmaps.qcow2", ["--add", "-g", "-512"], "x", "invalid granularity"),
    ("bitmaps.qcow2", ["--add", "-g", "16E"], "x", "invalid granularity"),
    ("huge.qcow2", ["--add", "-g", "512"], "x", "larger granularity"),
    ("v2.qcow2", ["--add"], "x", "v2"),
    ("raw-sparse.raw", ["--add"], "x", "raw"),
    ("bitmaps.qcow2", ["--add", "--add"], "x", "exists"),  # qemu-img added it before failing
])
def test_add_refused(fx: dict[str, Path], tmp_path: Path, image: str, args: list[str], bitmap: str,
                     fragment: str) -> None:
    outcome = compare(fx, image, args, bitmap, tmp_path)
    refused(outcome, "invalid granularity" not in fragment, fragment)
    if bitmap and len(bitmap) < 100 and "granularity" not in fragment:
        assert repr(bitmap) in outcome.pynbd_stderr


# --- remove, clear, enable, disable ------------------------------------------------------------


@pytest.mark.parametrize("image,args,bitmap", [
    ("bitmaps.qcow2", ["--remove"], "b0"),
    ("bitmaps.qcow2", ["--remove"], "b1"),
    ("bm-top.qcow2", ["--remove"], "top16k"),           # the last one: the extension goes
    ("crashed.qcow2", ["--remove"], "on"),              # the one thing an in-use bitmap allows
    ("bitmaps-inuse.qcow2", ["--remove"], "b1"),
    ("bitmaps.qcow2", ["--clear"], "b0"),
    ("bitmaps.qcow2", ["--clear"], "b1"),               # disabled ones too
    ("bm-gran.qcow2", ["--clear"], "g512"),
    ("cs2m-bm.qcow2", ["--clear"], "g64m"),
    ("bitmaps.qcow2", ["--enable"], "b1"),
    ("bitmaps.qcow2", ["--enable"], "b0"),              # already: nothing to write
    ("bitmaps.qcow2", ["--disable"], "b0"),
    ("cs512-bm.qcow2", ["--disable"], "g512"),
    ("cs512-bm.qcow2", ["--enable"], "off"),
])
def test_remove_clear_enable_disable(fx: dict[str, Path], tmp_path: Path, image: str, args: list[str],
                                     bitmap: str) -> None:
    assert compare(fx, image, args, bitmap, tmp_path).ok


def test_remove_every_bitmap_restores_the_header(fx: dict[str, Path], tmp_path: Path) -> None:
    """Adding a first bitmap and removing it leaves cluster 0 as it was (the backing file
    name back in its place) and qemu-img check clean: every cluster was freed."""
    image = tmp_path / "top.qcow2"
    shutil.copyfile(fx["bm-top.qcow2"], image)
    shutil.copyfile(fx["bm-base.raw"], tmp_path / "bm-base.raw")
    assert pynbd_bitmap(image, "top16k", "--remove")[0] == 0
    header = image.read_bytes()[:65536]
    assert pynbd_bitmap(image, "x", "--add", "-g", "1k")[0] == 0
    assert [b["name"] for b in qemu_bitmaps(image)] == ["x"]
    assert qimg("info", image).stdout.count("backing file: bm-base.raw") == 1
    assert pynbd_bitmap(image, "x", "--remove")[0] == 0
    assert image.read_bytes()[:65536] == header
    assert qimg("check", image, check=False).returncode == 0


@pytest.mark.parametrize("image,args,bitmap,fragment", [
    ("bitmaps.qcow2", ["--remove"], "nope", "no such bitmap"),
    ("bitmaps.qcow2", ["--clear"], "nope", "no such bitmap"),
    ("bitmaps.qcow2", ["--enable"], "nope", "no such bitmap"),
    ("bitmaps.qcow2", ["--disable"], "nope", "no such bitmap"),
    ("v3-64k.qcow2", ["--remove"], "b0", "no such bitmap"),
    ("v2.qcow2", ["--clear"], "b0", "no such bitmap"),
    ("raw-sparse.raw", ["--remove"], "b0", "no such bitmap"),
    ("bitmaps-noautoclear.qcow2", ["--remove"], "b0", "no such bitmap"),  # stale: no bitmaps
    ("crashed.qcow2", ["--clear"], "on", "inconsistent"),
    ("crashed.qcow2", ["--enable"], "off", "inconsistent"),
    ("crashed.qcow2", ["--disable"], "on", "inconsistent"),
    ("bitmaps-inuse.qcow2", ["--clear"], "b0", "inconsistent"),
])
def test_remove_clear_enable_disable_refused(fx: dict[str, Path], tmp_path: Path, image: str,
                                             args: list[str], bitmap: str, fragment: str) -> None:
    outcome = compare(fx, image, args, bitmap, tmp_path)
    refused(outcome, True, fragment, repr(bitmap))


# --- merge -------------------------------------------------------------------------------------


@pytest.mark.parametrize("image,args,bitmap", [
    ("bitmaps.qcow2", ["--merge", "b1"], "b0"),        # 128k granules into 64k ones
    ("bitmaps.qcow2", ["--merge", "b0"], "b1"),        # 64k into 128k (a disabled target)
    ("bitmaps.qcow2", ["--merge", "b0"], "b0"),        # itself: nothing changes
    ("bm-gran.qcow2", ["--merge", "g512"], "g1m"),
    ("bm-gran.qcow2", ["--merge", "g1m"], "g512"),
    ("bm-gran.qcow2", ["--merge", "g32k", "--merge", "g4k"], "g512"),
    ("cs2m-bm.qcow2", ["--merge", "g64m"], "g4k"),
    ("cs2m-bm.qcow2", ["--merge", "g4k"], "g2m"),
    ("cs512-bm.qcow2", ["--merge", "g512"], "off"),
    ("crashed.qcow2", ["--add", "-g", "4k"], "new"),
])
def test_merge(fx: dict[str, Path], tmp_path: Path, image: str, args: list[str], bitmap: str) -> None:
    assert compare(fx, image, args, bitmap, tmp_path).ok


@pytest.mark.parametrize("args,bitmap", [
    (["--merge", "s32k", "-b", "{src}"], "b0"),
    (["--merge", "s1m", "-b", "{src}", "-F", "qcow2"], "b1"),
    (["--merge", "s32k", "--merge", "s1m", "-b", "{src}"], "b0"),
    (["--add", "-g", "512", "--merge", "s1m", "-b", "{src}", "--disable"], "fresh"),
])
def test_merge_from_another_file(fx: dict[str, Path], tmp_path: Path, args: list[str], bitmap: str) -> None:
    args = [a.format(src=fx["src.qcow2"]) for a in args]
    assert compare(fx, "bitmaps.qcow2", args, bitmap, tmp_path).ok


@pytest.mark.parametrize("image,args,bitmap,fragment", [
    ("bitmaps.qcow2", ["--merge", "b1"], "nope", "no such bitmap"),
    ("bitmaps.qcow2", ["--merge", "nope"], "b0", "'nope' not found"),
    ("bitmaps-inuse.qcow2", ["--merge", "b1"], "b0", "inconsistent"),
    ("crashed.qcow2", ["--merge", "on"], "on", "inconsistent"),
    ("crashed.qcow2", ["--add", "--merge", "off"], "new", "inconsistent"),
    ("bitmaps.qcow2", ["--merge", "s32k", "-b", "{big}"], "b0", "another size"),
    ("bitmaps.qcow2", ["--merge", "zz", "-b", "{src}"], "b0", "'zz' not found"),
    ("bitmaps.qcow2", ["--merge", "b0", "-b", "{raw}"], "b0", "not found"),     # raw: no bitmaps
    ("bitmaps.qcow2", ["--merge", "s32k", "-b", "{src}", "-F", "raw"], "b0", "not found"),
    ("bitmaps.qcow2", ["--merge", "b0", "-b", "{inuse}"], "b1", "inconsistent"),
    ("bitmaps.qcow2", ["--merge", "b0", "-b", "{missing}"], "b1", "No such file"),
])
def test_merge_refused(fx: dict[str, Path], tmp_path: Path, image: str, args: list[str], bitmap: str,
                       fragment: str) -> None:
    names = {"big": fx["big.qcow2"], "src": fx["src.qcow2"], "raw": fx["raw-sparse.raw"],
             "inuse": fx["bitmaps-inuse.qcow2"], "missing": tmp_path / "missing.qcow2"}
    args = [a.format(**names) for a in args]
    refused(compare(fx, image, args, bitmap, tmp_path), True, fragment)


def test_merge_from_itself_through_b_refused(fx: dict[str, Path], tmp_path: Path) -> None:
    """qemu-img cannot open the image a second time (its own lock refuses it); pynbd says why."""
    image = tmp_path / "img.qcow2"
    shutil.copyfile(fx["bitmaps.qcow2"], image)
    before = sha256(image)
    assert qimg("bitmap", "--merge", "b0", "-b", image, image, "b1", check=False).returncode == 1
    assert sha256(image) != before  # qemu-img rewrote the directory on its way
    shutil.copyfile(fx["bitmaps.qcow2"], image)
    rc, _, err = pynbd_bitmap("--merge", "b0", "-b", image, image, "b1")
    assert rc == 1 and "itself" in err and "'b1'" in err and sha256(image) == before


# --- several operations, usage errors -----------------------------------------------------------


@pytest.mark.parametrize("image,args,bitmap,ok", [
    ("bitmaps.qcow2", ["--disable", "--merge", "b1", "--enable"], "b0", True),
    ("bitmaps.qcow2", ["--clear", "--merge", "b0", "--enable"], "b1", True),
    ("bitmaps.qcow2", ["--remove", "--add", "-g", "512"], "b0", True),   # back, empty, last
    ("bitmaps.qcow2", ["--add", "-g", "128k", "--disable", "--enable", "--clear"], "new", True),
    ("bitmaps.qcow2", ["--add", "--remove"], "new", True),               # nothing left to write
    ("crashed.qcow2", ["--remove", "--add", "--merge", "off"], "on", False),  # at the merge
    ("bitmaps.qcow2", ["--clear", "--remove", "--remove"], "b0", False),      # at the second remove
    ("bitmaps.qcow2", ["--enable", "--merge", "b1", "--clear", "--disable"], "b0", True),
])
def test_several_operations(fx: dict[str, Path], tmp_path: Path, image: str, args: list[str],
                            bitmap: str, ok: bool) -> None:
    assert compare(fx, image, args, bitmap, tmp_path).ok == ok


def test_nothing_to_change_writes_nothing(fx: dict[str, Path], tmp_path: Path) -> None:
    image = tmp_path / "b.qcow2"
    shutil.copyfile(fx["bitmaps.qcow2"], image)
    before = image.read_bytes()
    for args in (["--enable"], ["--merge", "b0"], ["--disable", "--enable"], ["--add", "--remove"]):
        assert pynbd_bitmap(image, "b0" if "--add" not in args else "new", *args)[0] == 0
        assert image.read_bytes() == before, args


@pytest.mark.parametrize("args,fragment", [
    (["{img}", "b0"], "at least one of"),
    (["-g", "64k", "--clear", "{img}", "b0"], "-g"),
    (["-F", "qcow2", "--clear", "{img}", "b0"], "-F"),
    (["-b", "{img}", "--clear", "{img}", "b0"], "-b"),
    (["--clear", "{img}"], "IMAGE and BITMAP"),
    (["-g", "abc", "--add", "{img}", "b0"], "invalid granularity"),
])
def test_usage_errors(fx: dict[str, Path], tmp_path: Path, args: list[str], fragment: str) -> None:
    image = tmp_path / "b.qcow2"
    shutil.copyfile(fx["bitmaps.qcow2"], image)
    before = sha256(image)
    args = [a.format(img=image) for a in args]
    assert qimg("bitmap", *args, check=False).returncode == 1
    rc, out, err = pynbd_bitmap(*args)
    assert rc == 1 and out == "" and len(err.splitlines()) == 1 and fragment in err, err
    assert sha256(image) == before


def test_command_line(fx: dict[str, Path], tmp_path: Path) -> None:
    """The real ``python -m pynbd bitmap``: silent exit 0, or one line and exit 1."""
    image = tmp_path / "b.qcow2"
    shutil.copyfile(fx["bitmaps.qcow2"], image)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    def pynbd(*argv: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "pynbd", "bitmap", *map(str, argv)], capture_output=True,
                              text=True, timeout=60, env=env, stdin=subprocess.DEVNULL)

    ok = pynbd("--clear", "--disable", image, "b0")
    assert (ok.returncode, ok.stdout, ok.stderr) == (0, "", "")
    assert qemu_bitmaps(image)[0]["flags"] == []
    before = sha256(image)
    bad = pynbd(image, "b0", "--enable", "--merge", "nope")
    assert bad.returncode == 1 and bad.stdout == ""
    assert bad.stderr == f"pynbd: error: {image}: cannot merge into bitmap 'b0': source bitmap 'nope' not found\n"
    assert sha256(image) == before


def test_granularity_zero_goes_without_add(fx: dict[str, Path], tmp_path: Path) -> None:
    """-g 0 is no granularity at all, so qemu-img takes it with any operation."""
    assert compare(fx, "bitmaps.qcow2", ["-g", "0", "--clear"], "b0", tmp_path).ok


@pytest.mark.parametrize("text", [
    "512", "64k", "64K", "0.5k", "1.0k", "0x200", "0X1000", "0x1k", "+512", " 512", "0200", "512b", "512B",
    "1024.", "1m", "1g", "2G", "0", "00", "0k", "0.0625M", "1.00000000000000000001k",
    "1.5", "512.5", "4096.3", ".5k", "1kb", "1KiB", "512 ", "", "-0", "0x1.0k", "1k5", "abc",
    "99999999999999999999", "16E", "8E", "7E", "0xffffffffffffffff",
])
def test_granularity_syntax_is_qemus(fx: dict[str, Path], tmp_path: Path, text: str) -> None:
    """Spelled as qemu-img reads it (qemu_strtosz): the same values, the same refusals."""
    image = tmp_path / "g.qcow2"
    shutil.copyfile(fx["v3-64k.qcow2"], image)
    ref = qimg("bitmap", "--add", "-g", text, image, "x", check=False)
    try:
        value = parse_granularity(text)
    except BitmapOpError:
        assert ref.returncode == 1 and "Invalid granularity" in ref.stderr, ref.stderr
        return
    if ref.returncode == 0:
        assert qemu_bitmaps(image)[0]["granularity"] == (value or 65536)
    else:  # parsed, then refused as a granularity
        assert "Granularity" in ref.stderr, ref.stderr
        assert value < 512 or value & (value - 1) or value > 1 << 31


# --- refusals pynbd adds or words its own way ------------------------------------------------------


def test_dirty_image_refused(fx: dict[str, Path], tmp_path: Path) -> None:
    """qemu-img repairs the refcounts of an image with the dirty bit first; pynbd says so."""
    image = tmp_path / "dirty.qcow2"
    shutil.copyfile(fx["dirty.qcow2"], image)
    before = sha256(image)
    rc, _, err = pynbd_bitmap(image, "x", "--add")
    assert rc == 1 and "qemu-img check -r all" in err and "'x'" in err and str(image) in err
    assert sha256(image) == before


def serving(server: QemuNbdServer) -> None:
    """Wait until qemu-nbd answers a client, so that stop()'s SIGTERM finds it in its main
    loop (one sent right after it started listening was seen lost: stop() then timed out)."""
    nbdinfo("--size", server.uri)


def test_locked_by_qemu_nbd(fx: dict[str, Path], tmp_path: Path) -> None:
    image = tmp_path / "served.qcow2"
    shutil.copyfile(fx["bitmaps.qcow2"], image)
    for extra in ((), ("-r",)):
        with QemuNbdServer(image, *extra, fmt="qcow2", workdir=tmp_path) as server:
            serving(server)
            before = sha256(image)
            rc, _, err = pynbd_bitmap(image, "b0", "--clear")
            assert rc == 1 and "locked by another process" in err and "'b0'" in err, err
            assert len(err.splitlines()) == 1 and sha256(image) == before
    assert pynbd_bitmap(image, "b0", "--clear")[0] == 0  # once it is gone


@pytest.mark.pynbd
def test_locked_by_pynbd_serve(fx: dict[str, Path], tmp_path: Path) -> None:
    image = tmp_path / "served.qcow2"
    shutil.copyfile(fx["bitmaps.qcow2"], image)
    with PynbdServer(image, workdir=tmp_path):
        before = sha256(image)
        rc, _, err = pynbd_bitmap(image, "new", "--add")
        assert rc == 1 and "locked by another process" in err and str(image) in err, err
        assert sha256(image) == before
    assert pynbd_bitmap(image, "new", "--add")[0] == 0


def test_merge_source_locked_by_a_writer(fx: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    image = tmp_path / "img.qcow2"
    shutil.copyfile(fx["src.qcow2"], src)
    shutil.copyfile(fx["bitmaps.qcow2"], image)
    before = sha256(image)
    with QemuNbdServer(src, fmt="qcow2", workdir=tmp_path) as server:
        serving(server)
        rc, _, err = pynbd_bitmap(image, "b0", "--merge", "s32k", "-b", src)
    assert rc == 1 and "locked" in err and str(src) in err and sha256(image) == before


# --- the order of the writes ----------------------------------------------------------------------


def old_metadata(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of the clusters the bitmaps use now: directory, tables, data."""
    fd = os.open(path, os.O_RDONLY)
    try:
        header = parse_header(str(path), fd, os.fstat(fd).st_size)
        cs = header.cluster_size
        spans = []
        if header.bitmaps_ext is not None:
            spans.append((header.bitmaps_ext.directory_offset, header.bitmaps_ext.directory_size))
        for bitmap in load_bitmaps(str(path), fd, os.fstat(fd).st_size, header):
            table = read_table(str(path), fd, bitmap.entry)
            spans.append((bitmap.entry.table_offset, 8 * len(table)))
            spans += [(entry & BME_OFFSET_MASK, cs) for entry in table if entry & BME_OFFSET_MASK]
        return spans
    finally:
        os.close(fd)


@pytest.mark.needs("strace")
@pytest.mark.parametrize("image,args,header_bytes,new_clusters", [
    ("bitmaps.qcow2", ["b0", "--clear", "--merge", "b1"], 24, True),  # the extension's 24 bytes at most
    ("v3-64k.qcow2", ["new", "--add"], 4096, True),                   # the extension area, in one write
    ("bm-top.qcow2", ["top16k", "--remove"], 4096, False),            # the last one: no new directory
])
def test_write_order(fx: dict[str, Path], tmp_path: Path, image: str, args: list[str], header_bytes: int,
                     new_clusters: bool) -> None:
    """New clusters written and synced, then one write into cluster 0 (synced), then the
    frees; nothing the old bitmaps use is overwritten before the switch."""
    path = tmp_path / image
    shutil.copyfile(fx[image], path)
    if image in BACKING:
        shutil.copyfile(fx[BACKING[image]], tmp_path / BACKING[image])
    old = old_metadata(path)
    log = tmp_path / "strace.log"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    subprocess.run(strace_argv(log, [sys.executable, "-m", "pynbd", "bitmap", str(path), *args],
                               ("pwrite64", "fdatasync", "fsync")),
                   check=True, env=env, timeout=120, stdin=subprocess.DEVNULL, capture_output=True)
    calls = [c for c in parse(log.read_text()) if c.fd()[1] == str(path)]
    assert all(c.ok for c in calls), [str(c) for c in calls]
    cluster_size = 65536
    switches = [i for i, c in enumerate(calls) if c.name == "pwrite64" and c.int_arg(3) < cluster_size]
    assert len(switches) == 1, [str(c) for c in calls]
    switch = switches[0]
    assert calls[switch].int_arg(2) <= header_bytes
    before, after = calls[:switch], calls[switch + 1:]
    assert before[-1].name == "fdatasync"
    assert any(c.name == "pwrite64" for c in before) == new_clusters
    for c in before:
        if c.name == "pwrite64":
            start, end = c.int_arg(3), c.int_arg(3) + c.int_arg(2)
            assert not any(start < o + n and o < end for o, n in old), f"{c} overwrites old bitmap metadata"
    assert after[0].name == "fdatasync" and after[-1].name == "fdatasync"
    assert qimg("check", path, check=False).returncode == 0


# --- random sequences ----------------------------------------------------------------------------

#: The bitmaps of the images the random sequences start from.
SEQUENCE_IMAGES = {
    "bitmaps.qcow2": ("b0", "b1"),
    "bm-gran.qcow2": ("g512", "g4k", "g32k", "g1m"),
    "cs512-bm.qcow2": ("g512", "g64k", "off"),
    "crashed.qcow2": ("on", "off"),
}


@st.composite
def sequences(draw: st.DrawFn) -> tuple[str, list[str], str]:
    """(image, arguments, bitmap): mostly operations that work, some that do not."""
    image = draw(st.sampled_from(sorted(SEQUENCE_IMAGES)))
    names = SEQUENCE_IMAGES[image]
    bitmap = draw(st.sampled_from([*names, "new"]))
    operation = st.one_of(
        st.sampled_from([["--remove"], ["--clear"], ["--enable"], ["--disable"], ["--add"]]),
        st.builds(lambda source: ["--merge", source], st.sampled_from([*names, "new"])),
    )
    operations = draw(st.lists(operation, min_size=1, max_size=4))
    if bitmap == "new" and draw(st.integers(0, 9)):
        operations.insert(0, ["--add"])
    args = [word for op in operations for word in op]
    if "--add" in args and draw(st.booleans()):
        args += ["-g", draw(st.sampled_from(["512", "4k", "64k", "2M", "64M"]))]
    return image, args, bitmap


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=sequences())
def test_random_sequences(fx: dict[str, Path], case: tuple[str, list[str], str]) -> None:
    image, args, bitmap = case
    with tempfile.TemporaryDirectory() as work:
        compare(fx, image, args, bitmap, Path(work))
