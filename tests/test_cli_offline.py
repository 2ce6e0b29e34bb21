"""Offline CLI tools against QEMU: ``pynbd map`` vs ``qemu-img map``, ``pynbd bitmap``
vs ``qemu-img info`` (and qemu-nbd's bitmap maps), ``pynbd create`` and its sizes.

The bulk comparisons call :func:`pynbd.cli.main` in-process (one interpreter start
per call would cost ~0.3 s x 80); the exit-code / one-line-error contract is
checked on the real ``python -m pynbd`` command line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pynbd import cli
from tests.qcow2_fixtures import (
    MiB,
    QemuNbd,
    merge_rows,
    qemu_img_map_text,
    requires_qemu,
    session_fixtures,
)
from tests.support.servers import REPO_ROOT

pytestmark = requires_qemu

# Every fixture qemu-img can open. Left out: aes.qcow2 (pynbd refuses encryption),
# unknown-incompat.qcow2 (both refuse it) and corrupt.qcow2 (qemu-img maps it
# read-only, pynbd refuses it: see test_map_refused_images).
MAP_FIXTURES = [
    "raw-sparse.raw", "raw-created.raw", "chain-base.raw", "comp-src.raw", "extl2-base.raw", "bm-base.raw",
    "v3-64k.qcow2", "chain-mid.qcow2", "chain-top.qcow2", "probe/base.raw", "probe/mid.qcow2", "probe/top.qcow2",
    "comp-zlib.qcow2", "comp-zstd.qcow2", "comp-zlib-512.qcow2", "comp-zlib-4k.qcow2", "comp-zlib-2M.qcow2",
    "comp-zstd-4k.qcow2", "comp-io.qcow2", "extl2.qcow2", "extl2-16k.qcow2", "bitmaps.qcow2", "bm-gran.qcow2",
    "bm-top.qcow2", "extdata-raw.qcow2", "extdata.qcow2", "cs512.qcow2", "cs2m.qcow2", "odd.qcow2", "snap.qcow2",
    "v2.qcow2", "dirty.qcow2", "bitmaps-inuse.qcow2", "bitmaps-noautoclear.qcow2", "rnd-base.qcow2",
    "rnd-top.qcow2",
]

# qemu-img's human map stops at the first compressed cluster (no host offset) and fails.
COMPRESSED = {"comp-zlib.qcow2", "comp-zstd.qcow2", "comp-zlib-512.qcow2", "comp-zlib-4k.qcow2",
              "comp-zlib-2M.qcow2", "comp-zstd-4k.qcow2", "comp-io.qcow2", "rnd-top.qcow2"}


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return session_fixtures(tmp_path_factory)


def pynbd_main(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def pynbd_cli(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """The real command line (exit code, stderr)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run([sys.executable, "-m", "pynbd", *argv], capture_output=True, text=True, timeout=60,
                          env=env, cwd=cwd, stdin=subprocess.DEVNULL)


def qemu_img(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    # cwd = the image's directory: QEMU 7.2 opens a relative external data file name
    # relative to the current directory.
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, timeout=60, cwd=cwd)


def fmt_of(name: str) -> str:
    return "raw" if name.endswith(".raw") else "qcow2"


# --- pynbd map ------------------------------------------------------------------------


@pytest.mark.parametrize("name", MAP_FIXTURES)
def test_map_json_identical(fx: dict[str, Path], capsys: pytest.CaptureFixture[str], name: str) -> None:
    path = fx[name]
    expected = qemu_img_map_text(path)
    rc, out, _ = pynbd_main(capsys, "map", "--output", "json", str(path))
    assert rc == 0
    assert json.loads(out)  # non-empty, valid JSON
    assert out == expected


def qemu_human_map(path: Path) -> tuple[subprocess.CompletedProcess[str], str]:
    """qemu-img's human map and a JSON map of the same file-system state.

    The F6 heuristic's answer can change while the host file system writes the
    fresh fixtures back, so the human map is bracketed by two equal JSON maps.
    """
    for _ in range(5):
        before = qemu_img_map_text(path)
        ref = qemu_img("map", str(path), cwd=path.parent)
        if qemu_img_map_text(path) == before:
            return ref, before
    raise AssertionError(f"qemu-img map of {path} keeps changing")


@pytest.mark.parametrize("name", MAP_FIXTURES)
def test_map_human_identical(fx: dict[str, Path], capsys: pytest.CaptureFixture[str], name: str) -> None:
    path = fx[name]
    ref, _ = qemu_human_map(path)
    rc, out, err = pynbd_main(capsys, "map", str(path))
    assert out == ref.stdout
    assert out.startswith("Offset          Length          Mapped to       File\n")
    if name in COMPRESSED:
        # qemu-img: "File contains external, encrypted or compressed clusters.", exit 1;
        # pynbd prints the same lines, then one error line (exit 2, its usage-error code).
        assert ref.returncode == 1 and "compressed clusters" in ref.stderr
        assert rc == 2
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"pynbd: error: {path}: ") and "compressed" in lines[0]
    else:
        assert ref.returncode == 0 and rc == 0


def test_map_human_concrete(fx: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Concrete values (fixtures F3 and F7): backing files and the external data file by name."""
    top = fx["chain-top.qcow2"]
    d = top.parent
    rc, out, _ = pynbd_main(capsys, "map", str(top))
    assert rc == 0
    assert out.splitlines()[1:] == [
        f"0               0x10000         0x70000         {d}/chain-top.qcow2",
        f"0x10000         0x10000         0x50000         {d}/chain-mid.qcow2",
        f"0x20000         0x10000         0x50000         {d}/chain-top.qcow2",
        f"0x500000        0x10000         0x60000         {d}/chain-mid.qcow2",
        f"0x900000        0x10000         0x60000         {d}/chain-top.qcow2",
    ]
    rc, out, _ = pynbd_main(capsys, "map", str(fx["extdata.qcow2"]))
    assert rc == 0
    assert out.splitlines()[1:] == [
        "0               0x10000         0               extdata.data",
        "0x100000        0x10000         0x100000        extdata.data",
    ]


def test_map_json_concrete(fx: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """F2 literally (not only 'same as qemu-img')."""
    rc, out, _ = pynbd_main(capsys, "map", "--output", "json", str(fx["v3-64k.qcow2"]))
    assert rc == 0
    rows = [(r["start"], r["length"], r["present"], r["zero"], r["data"]) for r in json.loads(out)]
    assert rows == [
        (0, 65536, True, False, True),
        (65536, 983040, False, True, False),
        (MiB, 65536, True, False, True),
        (MiB + 65536, 983040, False, True, False),
        (2 * MiB, 65536, True, True, False),
        (2 * MiB + 65536, 983040, False, True, False),
        (3 * MiB, 65536, True, True, False),
        (3 * MiB + 65536, 983040, False, True, False),
        (4 * MiB, 65536, True, True, False),
        (4 * MiB + 65536, 983040, False, True, False),
        (5 * MiB, 65536, True, True, False),
        (5 * MiB + 65536, 65536, True, False, True),
        (5 * MiB + 131072, 3014656, False, True, False),
    ]


def test_map_format_option(fx: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """-f raw on a qcow2 file maps the file itself, like qemu-img map -f raw."""
    path = fx["v3-64k.qcow2"]
    rc, out, _ = pynbd_main(capsys, "map", "-f", "raw", "--output", "json", str(path))
    assert rc == 0
    assert out == qemu_img_map_text(path, "raw")
    assert json.loads(out)[-1]["start"] + json.loads(out)[-1]["length"] == path.stat().st_size


def one_line_error(p: subprocess.CompletedProcess[str], path: Path | str, fragment: str) -> None:
    assert p.returncode == 2, (p.returncode, p.stdout, p.stderr)
    assert p.stdout == ""
    lines = p.stderr.splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"pynbd: error: {path}: "), lines[0]
    assert fragment in lines[0]
    assert "Traceback" not in p.stderr


def test_map_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.qcow2"
    one_line_error(pynbd_cli("map", str(missing)), missing, "No such file or directory")
    one_line_error(pynbd_cli("map", "--output", "json", str(missing)), missing, "No such file or directory")


def test_map_refused_images(fx: dict[str, Path], tmp_path: Path) -> None:
    """Corrupt/unsupported images: one line naming the file, exit 2, nothing on stdout."""
    one_line_error(pynbd_cli("map", str(fx["unknown-incompat.qcow2"])), fx["unknown-incompat.qcow2"],
                   "incompatible_features=0x20 has unknown feature bit(s) 5")
    short = tmp_path / "short.qcow2"
    short.write_bytes(fx["v3-64k.qcow2"].read_bytes()[:50])
    one_line_error(pynbd_cli("map", "--output", "json", str(short)), short, "too short")
    # A qcow2 whose L1 entry points past the end of the file.
    bad = tmp_path / "badl1.qcow2"
    data = bytearray(fx["v3-64k.qcow2"].read_bytes())
    data[0x30000:0x30008] = (0x8000000100000000).to_bytes(8, "big")
    bad.write_bytes(bytes(data))
    one_line_error(pynbd_cli("map", str(bad)), bad, "points past the end of the file")
    # A chain whose backing file is missing.
    lonely = tmp_path / "lonely.qcow2"
    lonely.write_bytes(fx["chain-top.qcow2"].read_bytes())
    one_line_error(pynbd_cli("map", str(lonely)), lonely, "'chain-mid.qcow2'")


def test_map_corrupt_bit_refused(fx: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 3 refuses images with the corrupt bit at open (qemu-img map would still read it)."""
    path = fx["corrupt.qcow2"]
    rc, out, err = pynbd_main(capsys, "map", "--output", "json", str(path))
    assert rc == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and "corrupt bit" in err and str(path) in err


# --- pynbd bitmap -----------------------------------------------------------------------

BITMAP_FIXTURES = ["bitmaps.qcow2", "bm-gran.qcow2", "bm-top.qcow2", "bitmaps-inuse.qcow2",
                   "bitmaps-noautoclear.qcow2", "v3-64k.qcow2", "raw-sparse.raw"]


def qemu_bitmaps(path: Path) -> list[dict]:
    p = qemu_img("info", "--output=json", "-f", fmt_of(path.name), str(path), cwd=path.parent)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout).get("format-specific", {}).get("data", {}).get("bitmaps", [])


def qemu_dirty_bytes(path: Path, sock: Path, names: list[str]) -> dict[str, int]:
    """Dirty bytes per bitmap as qemu-nbd reports them."""
    out = {}
    with QemuNbd(path, sock, bitmaps=names, allocation_depth=False) as q:
        for n in names:
            out[n] = sum(length for _, length, v in merge_rows(q.map(f"qemu:dirty-bitmap:{n}")) if v == 1)
    return out


@pytest.mark.parametrize("name", BITMAP_FIXTURES)
def test_bitmap_list_matches_qemu(fx: dict[str, Path], capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                  name: str) -> None:
    """BlockDirtyInfo's keys, with QEMU's values: an in-use bitmap is inconsistent, counts 0
    and does not record; a consistent one counts the dirty bytes qemu-nbd serves."""
    path = fx[name]
    ref = qemu_bitmaps(path)
    rc, out, _ = pynbd_main(capsys, "bitmap", "--output", "json", str(path))
    assert rc == 0
    mine = json.loads(out)
    assert [(b["name"], b["granularity"]) for b in mine] == [(b["name"], b["granularity"]) for b in ref]
    for b, r in zip(mine, ref):
        assert list(b) == ["name", "count", "granularity", "recording", "busy", "persistent", "inconsistent"]
        assert b["inconsistent"] == ("in-use" in r["flags"])
        assert b["recording"] == ("auto" in r["flags"] and not b["inconsistent"])
        assert not b["busy"] and b["persistent"]
        if b["inconsistent"]:
            assert b["count"] == 0
    valid = [b["name"] for b in mine if not b["inconsistent"]]
    if valid:
        expected = qemu_dirty_bytes(path, tmp_path / "q.sock", valid)
        assert {b["name"]: b["count"] for b in mine if not b["inconsistent"]} == expected
    rc, human, _ = pynbd_main(capsys, "bitmap", str(path))
    assert rc == 0
    if not mine:
        assert human == "bitmaps: none\n"
    for b in mine:
        assert f"        name: {b['name']}\n        granularity: {b['granularity']}\n" in human


def test_bitmap_concrete(fx: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """F6 / F12 literally."""
    rc, out, _ = pynbd_main(capsys, "bitmap", str(fx["bitmaps.qcow2"]))
    assert rc == 0
    assert out == (
        "bitmaps:\n"
        "    [0]:\n"
        "        flags:\n"
        "            [0]: auto\n"
        "        name: b0\n"
        "        granularity: 65536\n"
        "        count: 1245184\n"
        "        recording: true\n"
        "        busy: false\n"
        "        persistent: true\n"
        "        inconsistent: false\n"
        "    [1]:\n"
        "        flags:\n"
        "        name: b1\n"
        "        granularity: 131072\n"
        "        count: 262144\n"
        "        recording: false\n"
        "        busy: false\n"
        "        persistent: true\n"
        "        inconsistent: false\n"
    )
    rc, out, _ = pynbd_main(capsys, "bitmap", "--output", "json", str(fx["bitmaps-inuse.qcow2"]))
    assert rc == 0
    assert json.loads(out) == [
        {"name": "b0", "count": 0, "granularity": 65536, "recording": False, "busy": False,
         "persistent": True, "inconsistent": True},
        {"name": "b1", "count": 0, "granularity": 131072, "recording": False, "busy": False,
         "persistent": True, "inconsistent": True},
    ]
    rc, out, _ = pynbd_main(capsys, "bitmap", str(fx["bitmaps-inuse.qcow2"]))
    assert rc == 0
    assert "            [0]: in-use\n            [1]: auto\n        name: b0\n" in out
    assert out.count("        inconsistent: true\n        problem: is in use") == 2


def test_bitmap_missing_and_corrupt(fx: dict[str, Path], tmp_path: Path) -> None:
    missing = tmp_path / "gone.qcow2"
    one_line_error(pynbd_cli("bitmap", str(missing)), missing, "No such file or directory")
    one_line_error(pynbd_cli("bitmap", str(fx["unknown-incompat.qcow2"])), fx["unknown-incompat.qcow2"],
                   "unknown feature bit(s) 5")


# --- pynbd create --------------------------------------------------------------------------


@pytest.mark.parametrize("text,size", [
    ("0", 0), ("512", 512), ("1000", 1000), ("64K", 64 << 10), ("64k", 64 << 10), ("64KiB", 64 << 10),
    ("64KB", 64 << 10), ("10M", 10 << 20), ("1G", 1 << 30), ("2T", 2 << 40), ("2TiB", 2 << 40),
    (" 3M ", 3 << 20),
])
def test_size_parsing(text: str, size: int) -> None:
    assert cli._size(text) == size


@pytest.mark.parametrize("text", ["", "abc", "1.5G", "-1", "10X", "1P", "M", "8388608T", "1 G B"])
def test_size_parsing_rejects(text: str) -> None:
    with pytest.raises(Exception) as info:
        cli._size(text)
    assert type(info.value).__name__ == "ArgumentTypeError"


@pytest.mark.parametrize("text,size", [("512", 512), ("64K", 65536), ("10M", 10 * MiB), ("1G", 1 << 30)])
def test_create(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, size: int) -> None:
    image = tmp_path / "new.img"
    rc, out, _ = pynbd_main(capsys, "create", str(image), text)
    assert rc == 0
    assert out == f"created {image}: raw, {size} bytes (sparse)\n"
    st = image.stat()
    assert st.st_size == size
    assert st.st_blocks == 0  # sparse: nothing allocated
    info = json.loads(qemu_img("info", "--output=json", str(image), cwd=tmp_path).stdout)
    assert (info["format"], info["virtual-size"]) == ("raw", size)


def test_create_cli_errors(tmp_path: Path) -> None:
    existing = tmp_path / "exists.img"
    existing.write_bytes(b"keep me")
    p = pynbd_cli("create", str(existing), "1M")
    one_line_error(p, existing, "File exists")
    assert existing.read_bytes() == b"keep me"
    p = pynbd_cli("create", str(tmp_path / "x.img"), "1.5G")
    assert p.returncode == 2 and len(p.stderr.splitlines()) == 1 and "bad size '1.5G'" in p.stderr
    assert not (tmp_path / "x.img").exists()
    p = pynbd_cli("create", str(tmp_path / "no-such-dir" / "x.img"), "1M")
    one_line_error(p, tmp_path / "no-such-dir" / "x.img", "No such file or directory")
    p = pynbd_cli("create", str(tmp_path / "ok.img"), "2M")
    assert p.returncode == 0 and (tmp_path / "ok.img").stat().st_size == 2 * MiB
