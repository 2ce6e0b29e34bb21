"""qcow2/raw fixture images built with qemu-img/qemu-io (recipes F1-F13 below).

Nothing binary is committed: :func:`build_fixtures` runs the recipes F1–F13
(without LUKS, which pynbd refuses anyway and which is slow to create) plus a
few extra images for bitmap granularities, cluster sizes and subclusters.
Test modules share one build per session through :func:`session_fixtures`.

Also here: :class:`QemuNbd` (a read-only qemu-nbd on a unix socket) and
:func:`~tests.support.servers.nbdinfo_map`, the reference side of the comparisons.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

from tests.support.servers import nbdinfo_map
from tests.support.skips import require

MiB = 1 << 20
KiB = 1 << 10

# What build_fixtures runs; the references below also need qemu-nbd (QemuNbd) and nbdinfo.
BUILD_TOOLS = ("qemu-img", "qemu-io")
TOOLS = (*BUILD_TOOLS, "qemu-nbd", "nbdinfo")

# All four; a module that uses fewer should say which with pytest.mark.needs(...) instead.
# A missing one skips, in strict mode (CI=true) fails (tests/support/skips.py).
requires_qemu = pytest.mark.needs(*TOOLS)


def run(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(args), cwd=cwd, check=check, capture_output=True, text=True, timeout=120)


def qimg(cwd: Path, *args: str) -> None:
    run("qemu-img", *args, cwd=cwd)


def qio(cwd: Path, fmt: str, image: str, *cmds: str) -> None:
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(*args, image, cwd=cwd)


def qio_killed(cwd: Path, fmt: str, image: str, *writes: str) -> None:
    """Run qemu-io's ``writes`` then SIGKILL it while it holds the image open: leaves
    in_use bitmaps / the dirty bit. Killed once it has reported every write done (then
    the image's header says so), not after a guessed time."""
    # stdbuf: qemu-io's stdout to a pipe is block-buffered (nothing until it exits).
    args = ["stdbuf", "-oL", "qemu-io", "-f", fmt]
    for c in (*writes, "sleep 30000"):
        args += ["-c", c]
    proc = subprocess.Popen([*args, image], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        assert proc.stdout is not None
        done = 0
        while done < len(writes):
            line = proc.stdout.readline()
            assert line, f"qemu-io {image}: exited before reporting {len(writes)} writes"
            done += line.startswith("wrote ")
    finally:
        proc.kill()
        proc.wait()


def set_u64(path: Path, offset: int, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))


def truncate(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def _f1_raw(d: Path) -> None:
    truncate(d / "raw-sparse.raw", 16 * MiB)
    qio(d, "raw", "raw-sparse.raw", "write -P 0xaa 1M 64k", "write -P 0xbb 8M 4k")
    qimg(d, "create", "-q", "-f", "raw", "raw-created.raw", "16M")


def _f2_v3(d: Path) -> None:
    qimg(d, "create", "-q", "-f", "qcow2", "v3-64k.qcow2", "8M")
    qio(d, "qcow2", "v3-64k.qcow2",
        "write -P 0x11 0 64k", "write -P 0x22 1M 4k", "write -z 2M 64k",
        "write -P 0x33 3M 64k", "write -z 3M 64k",
        "write -P 0x44 4M 64k", "write -z -u 4M 64k",
        "write -P 0x55 5M 128k", "discard 5M 64k")


def _f3_chain(d: Path) -> None:
    truncate(d / "chain-base.raw", 4 * MiB)
    qio(d, "raw", "chain-base.raw", "write -P 0xb0 0 64k", "write -P 0xb1 3M 64k")
    qimg(d, "create", "-q", "-f", "qcow2", "-b", "chain-base.raw", "-F", "raw", "chain-mid.qcow2", "8M")
    qio(d, "qcow2", "chain-mid.qcow2", "write -P 0xc0 64k 64k", "write -P 0xc1 5M 64k", "write -z 3M 64k")
    qimg(d, "create", "-q", "-f", "qcow2", "-b", "chain-mid.qcow2", "-F", "qcow2", "chain-top.qcow2", "16M")
    qio(d, "qcow2", "chain-top.qcow2", "write -P 0xd0 128k 64k", "write -P 0xd1 9M 64k", "write -z 0 4k")
    # The same chain without backing-format extensions (formats are probed), in a subdirectory
    # so that relative names resolve against the naming image's directory, not the CWD.
    sub = d / "probe"
    sub.mkdir()
    shutil.copy(d / "chain-base.raw", sub / "base.raw")
    qimg(sub, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "mid.qcow2", "8M")
    qio(sub, "qcow2", "mid.qcow2", "write -P 0xc0 64k 64k", "write -z 3M 64k")
    qimg(sub, "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", "16M")
    qio(sub, "qcow2", "top.qcow2", "write -P 0xd1 9M 64k")
    # Drop the format extensions: rebase -u without -F is refused by qemu-img 7.2, so
    # rewrite the header extension type to an unknown one (skipped by readers).
    for name in ("mid.qcow2", "top.qcow2"):
        _hide_backing_format(sub / name)


def _hide_backing_format(path: Path) -> None:
    data = bytearray(path.read_bytes()[:4096])
    pos = struct.unpack_from(">I", data, 100)[0]
    while True:
        ext_type, ext_len = struct.unpack_from(">II", data, pos)
        if ext_type == 0:
            raise AssertionError(f"{path}: no backing format extension")
        if ext_type == 0xE2792ACA:
            with open(path, "r+b") as f:
                f.seek(pos)
                f.write(struct.pack(">I", 0x12345678))
            return
        pos += 8 + ((ext_len + 7) & ~7)


def comp_source() -> bytes:
    r = random.Random(1)
    b = bytearray(4 * MiB)
    b[0:65536] = (b"hello qcow2 compressed cluster\n" * 2200)[:65536]
    b[MiB:MiB + 65536] = bytes(range(256)) * 256
    b[2 * MiB:2 * MiB + 65536] = r.randbytes(65536)
    # Extra texture for small-cluster images: text spread over 3M..3M+200k.
    b[3 * MiB:3 * MiB + 200000] = b"".join(b"compressible %d " % i for i in range(20000))[:200000]
    return bytes(b)


def _f4_compressed(d: Path) -> None:
    (d / "comp-src.raw").write_bytes(comp_source())
    qimg(d, "convert", "-c", "-O", "qcow2", "comp-src.raw", "comp-zlib.qcow2")
    qimg(d, "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", "comp-src.raw", "comp-zstd.qcow2")
    for cs in ("512", "4k", "2M"):
        qimg(d, "convert", "-c", "-O", "qcow2", "-o", f"cluster_size={cs}", "comp-src.raw", f"comp-zlib-{cs}.qcow2")
    qimg(d, "convert", "-c", "-O", "qcow2", "-o", "cluster_size=4k,compression_type=zstd",
         "comp-src.raw", "comp-zstd-4k.qcow2")
    qimg(d, "create", "-q", "-f", "qcow2", "comp-io.qcow2", "4M")
    qio(d, "qcow2", "comp-io.qcow2", "write -c -P 0x66 0 64k")


def _f5_extl2(d: Path) -> None:
    qimg(d, "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=128k", "extl2.qcow2", "4M")
    qio(d, "qcow2", "extl2.qcow2",
        "write -P 0x11 0 4k", "write -P 0x12 12k 8k", "write -z 64k 4k",
        "write -P 0x13 128k 128k", "write -z 128k 8k", "write -z 1M 128k", "write -P 0x14 2049k 1k")
    # 16 KiB clusters: 512-byte subclusters, over a shorter backing file.
    truncate(d / "extl2-base.raw", 1 * MiB)
    qio(d, "raw", "extl2-base.raw", "write -P 0xe0 0 1M")
    qimg(d, "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=16k",
         "-b", "extl2-base.raw", "-F", "raw", "extl2-16k.qcow2", "2M")
    qio(d, "qcow2", "extl2-16k.qcow2",
        "write -P 0x21 512 512", "write -P 0x22 3k 2k", "write -z 8k 1k", "write -z 32k 16k",
        "write -P 0x23 1020k 8k", "write -z 1040k 512", "write -P 0x24 1500k 1536")


def _f6_bitmaps(d: Path) -> None:
    qimg(d, "create", "-q", "-f", "qcow2", "bitmaps.qcow2", "16M")
    qimg(d, "bitmap", "--add", "bitmaps.qcow2", "b0")
    qimg(d, "bitmap", "--add", "-g", "128k", "bitmaps.qcow2", "b1")
    qio(d, "qcow2", "bitmaps.qcow2", "write -P 0x11 0 64k", "write -P 0x12 1053576 100")
    qimg(d, "bitmap", "--disable", "bitmaps.qcow2", "b1")
    qio(d, "qcow2", "bitmaps.qcow2", "write -P 0x13 4M 64k", "write -z 8M 1M")
    # Granularities 512 B .. 1 MiB on a 4 KiB-cluster image (all differ from the cluster size but one).
    qimg(d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", "bm-gran.qcow2", "24M")
    for name, g in (("g512", "512"), ("g4k", "4k"), ("g32k", "32k"), ("g1m", "1M")):
        qimg(d, "bitmap", "--add", "-g", g, "bm-gran.qcow2", name)
    qio(d, "qcow2", "bm-gran.qcow2", "write -P 0x31 0 512", "write -P 0x32 5000 3000",
        "write -P 0x33 1048575 2", "write -z 3M 700k", "write -P 0x34 8191k 1k", "discard 12M 64k",
        "write -P 0x35 23M 1M")
    # A bitmap on an image with a backing file (only the top's writes are recorded).
    truncate(d / "bm-base.raw", 6 * MiB)
    qio(d, "raw", "bm-base.raw", "write -P 0x41 0 6M")
    qimg(d, "create", "-q", "-f", "qcow2", "-b", "bm-base.raw", "-F", "raw", "bm-top.qcow2", "8M")
    qimg(d, "bitmap", "--add", "-g", "16k", "bm-top.qcow2", "top16k")
    qio(d, "qcow2", "bm-top.qcow2", "write -P 0x42 100k 10k", "write -z 5M 2M", "write -P 0x43 7M 4k")
    # The zeroed rests of partly written clusters are unwritten extents, which SEEK_DATA calls
    # holes or data depending on the page cache (ext4), and these two files look
    # metadata-preallocated, so QEMU asks them (tests/test_qcow2_host_holes.py): make the
    # zeros real holes, the same for every reader.
    for name in ("bitmaps.qcow2", "bm-top.qcow2"):
        run("cp", "--sparse=always", name, f"{name}.sparse", cwd=d)
        os.replace(d / f"{name}.sparse", d / name)


def _f7_extdata(d: Path) -> None:
    for name, opts in (("extdata-raw", "data_file=extdata-raw.data,data_file_raw=on"),
                       ("extdata", "data_file=extdata.data")):
        qimg(d, "create", "-q", "-f", "qcow2", "-o", opts, f"{name}.qcow2", "4M")
        qio(d, "qcow2", f"{name}.qcow2", "write -P 0x61 0 64k", "write -P 0x62 1M 4k", "write -z 2M 64k")


def _f8_aes(d: Path) -> None:
    run("qemu-img", "create", "-q", "-f", "qcow2", "--object", "secret,id=sec1,data=pass",
        "-o", "encrypt.format=aes,encrypt.key-secret=sec1", "aes.qcow2", "4M", cwd=d)


def _f9_cluster_sizes(d: Path) -> None:
    qimg(d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "cs512.qcow2", "1M")
    qio(d, "qcow2", "cs512.qcow2", "write -P 0x71 0 1k", "write -P 0x72 64k 512", "write -P 0x73 300k 100")
    qimg(d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", "cs2m.qcow2", "64M")
    qio(d, "qcow2", "cs2m.qcow2", "write -P 0x74 0 4k", "write -P 0x75 5M 64k", "write -z 10M 2M")
    # An odd virtual size (not a cluster multiple) with refcount_bits=1.
    qimg(d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k,refcount_bits=1", "odd.qcow2", "3147000")
    qio(d, "qcow2", "odd.qcow2", "write -P 0x76 0 4k", "write -P 0x77 3141632 5368", "write -z 1M 8k")


def _f10_snapshot(d: Path) -> None:
    qimg(d, "create", "-q", "-f", "qcow2", "snap.qcow2", "4M")
    qio(d, "qcow2", "snap.qcow2", "write -P 0x81 0 128k")
    qimg(d, "snapshot", "-c", "snap1", "snap.qcow2")
    qio(d, "qcow2", "snap.qcow2", "write -P 0x82 64k 64k", "write -P 0x83 1M 64k")


def _f11_v2_dirty(d: Path) -> None:
    qimg(d, "create", "-q", "-f", "qcow2", "-o", "compat=0.10", "v2.qcow2", "4M")
    qio(d, "qcow2", "v2.qcow2", "write -P 0x91 0 64k", "write -z 1M 64k", "write -P 0x92 2M 64k", "write -z 2M 64k")
    qimg(d, "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "dirty.qcow2", "4M")
    qio_killed(d, "qcow2", "dirty.qcow2", "write -P 0x93 0 64k")


def _f12_inuse(d: Path) -> None:
    shutil.copy(d / "bitmaps.qcow2", d / "bitmaps-inuse.qcow2")
    qio_killed(d, "qcow2", "bitmaps-inuse.qcow2", "write -P 0x21 12M 64k")


def _f13_features(d: Path) -> None:
    shutil.copy(d / "v3-64k.qcow2", d / "unknown-incompat.qcow2")
    set_u64(d / "unknown-incompat.qcow2", 72, 0x20)
    shutil.copy(d / "v3-64k.qcow2", d / "corrupt.qcow2")
    set_u64(d / "corrupt.qcow2", 72, 0x2)
    shutil.copy(d / "bitmaps.qcow2", d / "bitmaps-noautoclear.qcow2")
    set_u64(d / "bitmaps-noautoclear.qcow2", 88, 0)


def _random_image(d: Path) -> None:
    """512-byte clusters, many scattered writes/zeroes/discards/compressed writes over a shorter qcow2 backing."""
    rnd = random.Random(7)
    qimg(d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "rnd-base.qcow2", "1536k")
    cmds = [f"write -P {rnd.randrange(1, 256)} {rnd.randrange(0, 1500) * 1024} {rnd.randrange(1, 40) * 512}"
            for _ in range(60)]
    qio(d, "qcow2", "rnd-base.qcow2", *cmds)
    qimg(d, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", "-b", "rnd-base.qcow2", "-F", "qcow2",
         "rnd-top.qcow2", "2M")
    cmds = []
    for _ in range(120):
        off = rnd.randrange(0, 2040) * 1024
        n = rnd.randrange(1, 16) * 512
        op = rnd.choice(("write", "write", "zero", "discard", "compress"))
        if op == "write":
            cmds.append(f"write -P {rnd.randrange(1, 256)} {off + rnd.randrange(0, 512)} {n - 7}")
        elif op == "zero":
            cmds.append(f"write -z {off} {n}")
        elif op == "discard":
            cmds.append(f"discard {off} {n}")
        else:
            cmds.append(f"write -c -P {rnd.randrange(1, 256)} {off} 512")
    qio(d, "qcow2", "rnd-top.qcow2", *cmds)


RECIPES = (_f1_raw, _f2_v3, _f3_chain, _f4_compressed, _f5_extl2, _f6_bitmaps, _f7_extdata, _f8_aes,
           _f9_cluster_sizes, _f10_snapshot, _f11_v2_dirty, _f12_inuse, _f13_features, _random_image)


def build_fixtures(dirpath: Path) -> dict[str, Path]:
    """Build every fixture into ``dirpath``; returns ``{file name: path}`` of the images."""
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    for recipe in RECIPES:
        recipe(dirpath)
    images = {p.name: p for p in dirpath.iterdir() if p.suffix in (".qcow2", ".raw")}
    images.update({f"probe/{p.name}": p for p in (dirpath / "probe").iterdir()})
    return images


_BUILT: dict[str, Path] | None = None


def session_fixtures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build the fixtures once per test session (every module calls this from its own fixture)."""
    global _BUILT
    if _BUILT is None:
        require(*BUILD_TOOLS)
        _BUILT = build_fixtures(tmp_path_factory.mktemp("qcow2fx"))
    return _BUILT


# --- reference answers from QEMU ---------------------------------------------------


def qemu_img_map_text(path: Path, fmt: str | None = None) -> str:
    """``qemu-img map --output=json`` (run in the image's directory, see :class:`QemuNbd`)."""
    args = ["qemu-img", "map", "--output=json"]
    if fmt:
        args += ["-f", fmt]
    return subprocess.run([*args, str(path)], check=True, capture_output=True, text=True, timeout=60,
                          cwd=path.parent).stdout


def qemu_img_map(path: Path, fmt: str | None = None) -> list[dict]:
    return json.loads(qemu_img_map_text(path, fmt))


def qemu_convert_raw(path: Path, out: Path, fmt: str | None = None) -> bytes:
    args = ["qemu-img", "convert", "-O", "raw"]
    if fmt:
        args += ["-f", fmt]
    subprocess.run([*args, str(path), str(out)], check=True, capture_output=True, timeout=120, cwd=path.parent)
    return out.read_bytes()


class QemuNbd:
    """``qemu-nbd -r`` on a unix socket; always stopped by PID in :meth:`close`."""

    def __init__(self, image: Path, sock: Path, fmt: str = "qcow2", bitmaps: Sequence[str] = (),
                 allocation_depth: bool = True) -> None:
        self.sock = sock
        if sock.exists():
            sock.unlink()
        args = ["qemu-nbd", "-t", "-r", "-k", str(sock), "-f", fmt]
        if allocation_depth:
            args.append("-A")
        for b in bitmaps:
            args += ["-B", b]
        # cwd: QEMU 7.2 opens a relative external data file name relative to the CWD.
        self.proc = subprocess.Popen([*args, str(image)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     cwd=image.parent)
        try:
            deadline = time.monotonic() + 10
            while not sock.exists():
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                    raise RuntimeError(f"qemu-nbd exited: {err}")
                if time.monotonic() > deadline:
                    raise RuntimeError("qemu-nbd did not create its socket")
                time.sleep(0.02)
        except BaseException:
            self.close()
            raise

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def map(self, context: str) -> list[tuple[int, int, int]]:
        return nbdinfo_map(self.uri, context)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        if self.sock.exists():
            self.sock.unlink()

    def __enter__(self) -> "QemuNbd":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def merge_rows(rows: Iterable[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Merge neighbouring ``(offset, length, value)`` rows with equal values."""
    out: list[tuple[int, int, int]] = []
    for off, length, value in rows:
        if out and out[-1][2] == value and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + length, value)
        elif length:
            out.append((off, length, value))
    return out


def normalise_base_allocation(rows: Iterable[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """Treat flag 2 (data+zero, QEMU's preallocation heuristic) as 0 (docs/testing.md)."""
    return merge_rows((o, n, 0 if v == 2 else v) for o, n, v in rows)


def image_size(path: Path) -> int:
    return os.path.getsize(path)
