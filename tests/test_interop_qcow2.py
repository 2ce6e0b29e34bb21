"""pynbd vs qemu-nbd on the qcow2/raw fixtures (tests/qcow2_fixtures.py, F1-F13).

For every servable fixture one pair of servers runs for the whole module:
``pynbd serve IMAGE -r`` and ``qemu-nbd -r -A -B <every valid bitmap>``, both on
unix sockets. The per-fixture tests compare what real clients see:

* ``nbdinfo --map`` for base:allocation (neighbours merged, F6 normalisation),
  qemu:allocation-depth and every qemu:dirty-bitmap:NAME;
* ``qemu-img map --output=json`` over NBD, plain and with ``x-dirty-bitmap=``
  (allocation depth and each bitmap), byte-identical between the two servers;
* the content (``qemu-img compare`` against ``qemu-img convert -O raw``);
* ``nbdinfo --json --no-content`` and ``nbdinfo --list --json``;
* LIST_META_CONTEXT queries and a BLOCK_STATUS selecting every context (libnbd).

Then server-level behaviours: ``--bitmap``, in_use bitmaps (F12), a qcow2 served
without ``-r``, ``-f raw`` on a qcow2, structured reads over zero clusters,
refused images and a compressed cluster that does not decompress (EIO).

Every test needs qemu-img and qemu-io (the fixtures), qemu-nbd (the reference), nbdinfo
and pynbd; the ones marked ``needs_libnbd`` also drive libnbd's Python binding, so
without it only those skip (strict mode: fail).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pynbd.image.qcow2.compression import compressed_range
from tests.qcow2_fixtures import (
    MiB,
    QemuNbd,
    merge_rows,
    normalise_base_allocation,
    qemu_convert_raw,
    session_fixtures,
)
from tests.support import nbdclient as nc
from tests.support.servers import REPO_ROOT, PynbdServer, libnbd_script, nbdinfo, nbdinfo_map, run

pytestmark = [pytest.mark.pynbd, pytest.mark.needs("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo")]
needs_libnbd = pytest.mark.needs("libnbd-python")  # tests that run libnbd_script

KiB = 1024

SERVED = [
    # F1 raw
    "raw-sparse.raw", "raw-created.raw",
    # F2, F3 (+ the chain with probed formats), F4 compressed, F5 extended L2
    "v3-64k.qcow2", "chain-mid.qcow2", "chain-top.qcow2", "probe/top.qcow2",
    "comp-zlib.qcow2", "comp-zstd.qcow2", "comp-zlib-512.qcow2", "comp-zlib-4k.qcow2", "comp-zlib-2M.qcow2",
    "comp-zstd-4k.qcow2", "comp-io.qcow2", "extl2.qcow2", "extl2-16k.qcow2",
    # F6 bitmaps, F7 external data file, F9 cluster sizes, F10 snapshot, F11 v2 / dirty
    "bitmaps.qcow2", "bm-gran.qcow2", "bm-top.qcow2", "extdata-raw.qcow2", "extdata.qcow2",
    "cs512.qcow2", "cs2m.qcow2", "odd.qcow2", "snap.qcow2", "v2.qcow2", "dirty.qcow2",
    # F12 in-use bitmaps (served without them), F13 stale bitmaps, random chain
    "bitmaps-inuse.qcow2", "bitmaps-noautoclear.qcow2", "rnd-base.qcow2", "rnd-top.qcow2",
]


def fmt_of(name: str) -> str:
    return "raw" if name.endswith(".raw") else "qcow2"


def qemu_info(path: Path, fmt: str) -> dict:
    p = run(["qemu-img", "info", "--output=json", "-f", fmt, str(path)])
    return json.loads(p.stdout)


def valid_bitmaps(path: Path, fmt: str) -> list[str]:
    """Bitmaps qemu-img lists without the in-use flag (what qemu-nbd can export)."""
    if fmt != "qcow2":
        return []
    bitmaps = qemu_info(path, fmt).get("format-specific", {}).get("data", {}).get("bitmaps", [])
    return [b["name"] for b in bitmaps if "in-use" not in b["flags"]]


def pynbd_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def nbd_opts(sock: Path | str, ctx: str | None = None) -> str:
    opts = f"driver=nbd,server.type=unix,server.path={sock}"
    return opts + (f",x-dirty-bitmap={ctx}" if ctx else "")


# --- one server pair per fixture -------------------------------------------------------


@dataclass
class Pair:
    name: str
    image: Path
    fmt: str
    size: int
    bitmaps: list[str]
    ref: Path  # raw content reference
    pynbd: PynbdServer
    qemu: QemuNbd
    _cache: dict = field(default_factory=dict)

    @property
    def contexts(self) -> list[str]:
        return ["base:allocation", "qemu:allocation-depth"] + [f"qemu:dirty-bitmap:{b}" for b in self.bitmaps]

    def libnbd_report(self, which: str) -> dict:
        if which not in self._cache:
            uri = self.pynbd.uri if which == "pynbd" else self.qemu.uri
            p = libnbd_script(LIBNBD_REPORT, uri, json.dumps(self.contexts))
            self._cache[which] = json.loads(p.stdout)
        return self._cache[which]


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return session_fixtures(tmp_path_factory)


@pytest.fixture(scope="module", params=SERVED)
def pair(request: pytest.FixtureRequest, fx: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    name = request.param
    image = fx[name]
    fmt = fmt_of(name)
    work = tmp_path_factory.mktemp("ix")
    size = qemu_info(image, fmt)["virtual-size"]
    ref = image if fmt == "raw" else work / "ref.raw"
    if fmt != "raw":
        qemu_convert_raw(image, ref, fmt)
    bitmaps = valid_bitmaps(image, fmt)
    server = PynbdServer(image, "-r", workdir=work)
    try:
        qemu = QemuNbd(image, work / "qemu.sock", fmt=fmt, bitmaps=bitmaps)
    except BaseException:
        server.stop(check=False)
        raise
    p = Pair(name, image, fmt, size, bitmaps, ref, server, qemu)
    yield p
    qemu.close()
    server.stop()


def both_maps(pair: Pair, ctx: str) -> tuple[list, list]:
    mine = merge_rows(nbdinfo_map(pair.pynbd.uri, ctx))
    ref = merge_rows(nbdinfo_map(pair.qemu.uri, ctx))
    if ctx == "base:allocation":
        mine, ref = normalise_base_allocation(mine), normalise_base_allocation(ref)
    return mine, ref


def covers(rows: list, size: int) -> bool:
    pos = 0
    for off, length, _ in rows:
        if off != pos:
            return False
        pos += length
    return pos == size


def test_base_allocation(pair: Pair) -> None:
    mine, ref = both_maps(pair, "base:allocation")
    assert covers(ref, pair.size)
    assert mine == ref


def test_allocation_depth(pair: Pair) -> None:
    mine, ref = both_maps(pair, "qemu:allocation-depth")
    assert covers(ref, pair.size)
    assert mine == ref


def test_dirty_bitmaps(pair: Pair) -> None:
    for b in pair.bitmaps:
        mine, ref = both_maps(pair, f"qemu:dirty-bitmap:{b}")
        assert covers(ref, pair.size)
        assert mine == ref, b


def test_qemu_img_map_over_nbd(pair: Pair) -> None:
    for ctx in [None, "qemu:allocation-depth"] + [f"qemu:dirty-bitmap:{b}" for b in pair.bitmaps]:
        mine = run(["qemu-img", "map", "--output=json", "--image-opts", nbd_opts(pair.pynbd.socket, ctx)])
        ref = run(["qemu-img", "map", "--output=json", "--image-opts", nbd_opts(pair.qemu.sock, ctx)])
        if ctx is None and any(r["data"] and r["zero"] for r in json.loads(ref.stdout)):
            # F6: qemu-nbd's preallocation heuristic answered "zero" (flag 2) inside a data
            # cluster; base:allocation is compared without the ZERO bit on data there.
            assert normalise_json_map(mine.stdout) == normalise_json_map(ref.stdout)
        else:
            assert mine.stdout == ref.stdout, ctx
        assert json.loads(mine.stdout)[-1]["start"] + json.loads(mine.stdout)[-1]["length"] == pair.size


def normalise_json_map(text: str) -> list[tuple]:
    rows = [(r["start"], r["length"], r["present"], False if r["data"] else r["zero"], r["data"])
            for r in json.loads(text)]
    out: list[tuple] = []
    for row in rows:
        if out and out[-1][2:] == row[2:] and out[-1][0] + out[-1][1] == row[0]:
            out[-1] = (out[-1][0], out[-1][1] + row[1], *row[2:])
        else:
            out.append(row)
    return out


def test_content(pair: Pair) -> None:
    p = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(pair.ref), pair.pynbd.uri], check=False)
    assert (p.returncode, p.stdout) == (0, "Images are identical.\n"), p.stderr


def test_nbdinfo_json(pair: Pair) -> None:
    mine = json.loads(nbdinfo("--json", "--no-content", pair.pynbd.uri))
    ref = json.loads(nbdinfo("--json", "--no-content", pair.qemu.uri))
    listed = json.loads(nbdinfo("--list", "--json", pair.pynbd.uri))
    for info in (mine, listed):
        assert (info["protocol"], info["TLS"], info["structured"]) == ("newstyle-fixed", False, True)
        assert len(info["exports"]) == 1
    (e,), (r,), (lst,) = mine["exports"], ref["exports"], listed["exports"]
    assert e["export-name"] == lst["export-name"] == ""
    assert set(e["contexts"]) >= set(r["contexts"])
    assert set(e["contexts"]) == set(pair.contexts)
    assert set(lst["contexts"]) == set(e["contexts"])
    assert e["export-size"] == pair.size
    # qemu-nbd rounds the size up to 512; pynbd serves the exact size.
    assert r["export-size"] == (pair.size + 511) // 512 * 512
    same = ["is_rotational", "is_read_only", "can_cache", "can_df", "can_fast_zero", "can_flush", "can_fua",
            "can_trim", "can_zero", "block_size_minimum", "block_size_preferred", "block_size_maximum"]
    assert {k: e[k] for k in same} == {k: r[k] for k in same}
    assert {k: lst[k] for k in same} == {k: r[k] for k in same}
    assert e["is_read_only"] is True and e["can_multi_conn"] is True  # read-only: multi-conn is safe
    assert lst["export-size"] == pair.size


LIBNBD_REPORT = r'''
import json, sys
import nbd

uri, contexts = sys.argv[1], json.loads(sys.argv[2])
out = {"list": {}}

h = nbd.NBD()
h.set_opt_mode(True)
h.connect_uri(uri)
for key, queries in (("bitmaps", ["qemu:dirty-bitmap:"]), ("qemu", ["qemu:"]), ("base", ["base:"]),
                     ("all", []), ("unknown", ["qemu:dirty-bitmap:no-such", "nope:x", "qemu:other"])):
    h.clear_meta_contexts()
    for q in queries:
        h.add_meta_context(q)
    names = []
    n = h.opt_list_meta_context(lambda name: names.append(name) or 0)
    out["list"][key] = {"count": n, "names": names}
h.opt_abort()

h = nbd.NBD()
for c in contexts:
    h.add_meta_context(c)
h.connect_uri(uri)
size = h.get_size()
out["selected"] = [c for c in contexts if h.can_meta_context(c)]
rows = {c: [] for c in contexts}
calls = []
pos = 0
while pos < size:
    got = {}

    def cb(ctx, off, entries, err):
        got.setdefault(ctx, []).append((off, list(entries)))
        return 0

    h.block_status(min(size - pos, 1 << 30), pos, cb)
    calls.append({c: len(v) for c, v in got.items()})
    ends = []
    for c, chunks in got.items():
        off, entries = chunks[0]
        assert off == pos, (c, off, pos)
        end = off
        for i in range(0, len(entries), 2):
            rows[c].append([end, entries[i], entries[i + 1]])
            end += entries[i]
        ends.append(end)
    pos = min(min(ends), size)
    for c in rows:  # keep rows only up to the common covered offset
        clipped = []
        for o, n, v in rows[c]:
            if o < pos:
                clipped.append([o, min(n, pos - o), v])
        rows[c] = clipped
out["rows"] = rows
out["calls"] = calls

one = {}
def cb1(ctx, off, entries, err):
    one.setdefault(ctx, []).append(list(entries))
    return 0
h.block_status(size, 0, cb1, nbd.CMD_FLAG_REQ_ONE)
out["req_one"] = one


def one_extent(pos, length):
    """REQ_ONE block status: each context's one (length, status)."""
    got = {}

    def cb(ctx, off, entries, err):
        assert off == pos and len(entries) == 2 and ctx not in got, (ctx, off, entries)
        got[ctx] = list(entries)
        return 0

    h.block_status(length, pos, cb, nbd.CMD_FLAG_REQ_ONE)
    return got


# REQ_ONE walks as QEMU's nbd driver does them (qemu-img map, x-dirty-bitmap): each
# request INT_MAX long from where that context's last descriptor ended.
walks = {}
for c in contexts:
    rows_c, pos = [], 0
    while pos < size:
        n, v = one_extent(pos, min(size - pos, 2**31 - 1))[c]
        rows_c.append([pos, n, v])
        pos += n
    walks[c] = rows_c
out["walks"] = walks
# Probes at unaligned offsets, each after a jump (no scan to continue).
probes = {}
for off in sorted({1, 4095, 65536 + 7, size // 3, size // 2 + 511, size - 1, 513}):
    probes[off] = one_extent(off, min(size - off, 3 * 65536 + 5))
out["probes"] = probes
h.shutdown()
print(json.dumps(out))
'''


@needs_libnbd
def test_list_meta_context(pair: Pair) -> None:
    mine = pair.libnbd_report("pynbd")["list"]
    ref = pair.libnbd_report("qemu")["list"]
    bitmap_ctxs = {f"qemu:dirty-bitmap:{b}" for b in pair.bitmaps}
    assert set(mine["bitmaps"]["names"]) == bitmap_ctxs == set(ref["bitmaps"]["names"])
    assert mine["bitmaps"]["count"] == len(pair.bitmaps)
    assert set(mine["qemu"]["names"]) == bitmap_ctxs | {"qemu:allocation-depth"} == set(ref["qemu"]["names"])
    assert mine["base"]["names"] == ["base:allocation"] == ref["base"]["names"]
    assert set(mine["all"]["names"]) == set(pair.contexts) == set(ref["all"]["names"])
    assert len(mine["all"]["names"]) == len(pair.contexts)  # no duplicates
    assert mine["unknown"] == {"count": 0, "names": []} == ref["unknown"]


@needs_libnbd
def test_block_status_all_contexts(pair: Pair) -> None:
    mine = pair.libnbd_report("pynbd")
    ref = pair.libnbd_report("qemu")
    assert mine["selected"] == pair.contexts
    # One BLOCK_STATUS chunk per selected context per request: libnbd calls back once per chunk.
    for calls in mine["calls"]:
        assert calls == {c: 1 for c in pair.contexts}
    for c in pair.contexts:
        a = merge_rows(tuple(r) for r in mine["rows"][c])
        b = merge_rows(tuple(r) for r in ref["rows"][c])
        if c == "base:allocation":
            a, b = normalise_base_allocation(a), normalise_base_allocation(b)
        assert a == b, c
        assert covers(a, pair.size)
    # REQ_ONE: one chunk per context with exactly one descriptor no longer than requested.
    assert set(mine["req_one"]) == set(pair.contexts)
    for c, chunks in mine["req_one"].items():
        assert len(chunks) == 1 and len(chunks[0]) == 2 and 0 < chunks[0][0] <= pair.size, (c, chunks)
        if c != "base:allocation":  # base:allocation may differ by the F6 heuristic
            assert chunks == ref["req_one"][c], c


@needs_libnbd
def test_req_one_walks_and_probes(pair: Pair) -> None:
    """QEMU's client asks for one extent at a time (REQ_ONE), from where the last ended:
    the walks give qemu-nbd's maps, and the full-request map; probes after jumps give
    the status there, and never a descriptor that crosses a change of status."""
    mine = pair.libnbd_report("pynbd")
    ref = pair.libnbd_report("qemu")
    for c in pair.contexts:
        a = merge_rows(tuple(r) for r in mine["walks"][c])
        full = merge_rows(tuple(r) for r in mine["rows"][c])
        assert a == full, c
        assert covers(a, pair.size), c
        b = merge_rows(tuple(r) for r in ref["walks"][c])
        if c == "base:allocation":
            a, b = normalise_base_allocation(a), normalise_base_allocation(b)
        assert a == b, c
    for off_text, per_context in mine["probes"].items():
        off = int(off_text)
        asked = min(pair.size - off, 3 * 65536 + 5)
        assert set(per_context) == set(pair.contexts)
        for c, (length, status) in per_context.items():
            full = merge_rows(tuple(r) for r in mine["rows"][c])
            start, run_length, run_status = next(r for r in full if r[0] <= off < r[0] + r[1])
            assert status == run_status, (c, off)
            # The descriptor reaches the end of the status's run or of the request.
            assert length == min(start + run_length - off, asked), (c, off, length)


# --- raw-socket checks of block status and structured reads ----------------------------


def read_file(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def test_block_status_chunks_raw_socket(fx: dict[str, Path], tmp_path: Path) -> None:
    """Four contexts: exactly four BLOCK_STATUS chunks, distinct ids, DONE only on the last."""
    ctxs = ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"]
    with PynbdServer(fx["bitmaps.qcow2"], "-r", workdir=tmp_path) as server:
        with nc.NbdClient.connect(server, meta=ctxs) as c:
            assert sorted(c.contexts.values()) == sorted(ctxs)
            ids = {name: cid for cid, name in c.contexts.items()}
            reply = c.block_status(0, 16 * MiB)
            assert reply.error == 0
            assert [ch.type for ch in reply.chunks] == [nc.REPLY_TYPE_BLOCK_STATUS] * 4
            assert [ch.done for ch in reply.chunks] == [False, False, False, True]
            ext = reply.extents()
            assert set(ext) == set(ids.values())
            # F6 "Server must report" for b0 and b1 (clean/dirty runs, merged).
            assert merge_rows(runs(ext[ids["qemu:dirty-bitmap:b0"]])) == [
                (0, 65536, 1), (65536, 983040, 0), (MiB, 65536, 1), (MiB + 65536, 3080192, 0),
                (4 * MiB, 65536, 1), (4 * MiB + 65536, 4128768, 0), (8 * MiB, MiB, 1), (9 * MiB, 7 * MiB, 0)]
            assert merge_rows(runs(ext[ids["qemu:dirty-bitmap:b1"]])) == [
                (0, 131072, 1), (131072, 917504, 0), (MiB, 131072, 1), (MiB + 131072, 15597568, 0)]
            one = c.block_status(0, 16 * MiB, nc.CMD_FLAG_REQ_ONE)
            assert {cid: len(d) for cid, d in one.extents().items()} == {cid: 1 for cid in ids.values()}


def runs(descriptors: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    out, pos = [], 0
    for length, status in descriptors:
        out.append((pos, length, status))
        pos += length
    return out


READ_RANGES = {
    # F2: data, zero-flag (plain/alloc), discarded and unallocated clusters, unaligned edges
    "v3-64k.qcow2": [(0, 8 * MiB), (2 * MiB, 65536), (3 * MiB, 65536), (MiB - 100, 300), (5 * MiB + 65000, 1000),
                     (2 * MiB - 1, 2), (4 * MiB + 65535, 3)],
    # F5: zero / unallocated subclusters inside allocated clusters
    "extl2.qcow2": [(0, 4 * MiB), (4096, 8192), (65536 - 10, 4200), (131072, 8192), (2049 * KiB - 3, 1030)],
    # F3: a zero cluster in the top hiding the base, zeros past the end of shorter backing files
    "chain-top.qcow2": [(0, 16 * MiB), (0, 4096 + 1), (3 * MiB - 7, 65536 + 14), (4 * MiB - 5, 10), (8 * MiB - 5, 10)],
    "cs2m.qcow2": [(10 * MiB, 2 * MiB), (4 * MiB, 3 * MiB)],
}


@needs_libnbd
@pytest.mark.parametrize("name", sorted(READ_RANGES))
def test_structured_reads_over_zero_clusters(fx: dict[str, Path], tmp_path: Path, name: str) -> None:
    ref = tmp_path / "ref.raw"
    qemu_convert_raw(fx[name], ref)
    with PynbdServer(fx[name], "-r", workdir=tmp_path) as server:
        with nc.NbdClient.connect(server) as c:
            for off, length in READ_RANGES[name]:
                reply = c.read(off, length)
                assert reply.structured and reply.error == 0
                assert reply.data(off, length) == read_file(ref, off, length), (off, length)
        if name == "v3-64k.qcow2":
            with nc.NbdClient.connect(server) as c:
                # Zero-flag clusters (plain and allocated) read as one OFFSET_HOLE chunk, as qemu-nbd does.
                for off in (2 * MiB, 3 * MiB, 4 * MiB):
                    reply = c.read(off, 65536)
                    assert [(ch.type, ch.offset, ch.hole_size) for ch in reply.chunks] == [
                        (nc.REPLY_TYPE_OFFSET_HOLE, off, 65536)]
                # DF: one data chunk with the zeros in it.
                reply = c.read(2 * MiB - 4, 8, nc.CMD_FLAG_DF)
                assert [ch.type for ch in reply.chunks] == [nc.REPLY_TYPE_OFFSET_DATA]
                assert reply.data(2 * MiB - 4, 8) == bytes(8)
        # Same ranges through libnbd (structured replies negotiated by default).
        code = ("import nbd, sys, json, hashlib\n"
                "h = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
                "assert h.get_structured_replies_negotiated()\n"
                "print(json.dumps([hashlib.sha256(h.pread(n, o)).hexdigest() for o, n in json.loads(sys.argv[2])]))\n")
        got = json.loads(libnbd_script(code, server.uri, json.dumps(READ_RANGES[name])).stdout)
    assert got == [hashlib.sha256(read_file(ref, o, n)).hexdigest() for o, n in READ_RANGES[name]]


# --- bitmap selection, in-use bitmaps ---------------------------------------------------


@needs_libnbd
def test_bitmap_option_restricts(fx: dict[str, Path], tmp_path: Path) -> None:
    image = fx["bitmaps.qcow2"]
    with PynbdServer(image, "-r", "--bitmap", "b1", workdir=tmp_path) as server, \
            QemuNbd(image, tmp_path / "q.sock", bitmaps=["b1"]) as qemu:
        info = json.loads(nbdinfo("--json", "--no-content", server.uri))
        assert info["exports"][0]["contexts"] == ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b1"]
        code = ("import nbd, sys\n"
                "h = nbd.NBD(); h.set_opt_mode(True); h.connect_uri(sys.argv[1])\n"
                "h.add_meta_context('qemu:dirty-bitmap:')\n"
                "names = []; h.opt_list_meta_context(lambda n: names.append(n) or 0)\n"
                "h.clear_meta_contexts(); h.add_meta_context('qemu:dirty-bitmap:b0')\n"
                "n_b0 = h.opt_list_meta_context(lambda n: 0)\n"
                "h.opt_abort(); print(names, n_b0)\n")
        assert libnbd_script(code, server.uri).stdout.strip() == "['qemu:dirty-bitmap:b1'] 0"
        assert merge_rows(nbdinfo_map(server.uri, "qemu:dirty-bitmap:b1")) == \
            merge_rows(nbdinfo_map(qemu.uri, "qemu:dirty-bitmap:b1"))
        # b0 is not offered, so selecting it fails like with qemu-nbd.
        for uri in (server.uri, qemu.uri):
            p = run(["nbdinfo", "--map=qemu:dirty-bitmap:b0", uri], check=False)
            assert p.returncode != 0
        p = run(["qemu-img", "map", "--output=json", "--image-opts",
                 nbd_opts(server.socket, "qemu:dirty-bitmap:b0")], check=False)
        assert p.returncode != 0 and "Invalid argument" in p.stderr


def serve_fails(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pynbd", "serve", *args, "--socket", str(cwd / "never.sock")],
                          capture_output=True, text=True, timeout=30, env=pynbd_env(), cwd=cwd,
                          stdin=subprocess.DEVNULL)


def error_lines(p: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in p.stderr.splitlines() if "pynbd: error:" in line]


def test_bitmap_option_errors(fx: dict[str, Path], tmp_path: Path) -> None:
    p = serve_fails(str(fx["bitmaps.qcow2"]), "-r", "-B", "nope", cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert error_lines(p) == [f"pynbd: error: {fx['bitmaps.qcow2']}: bitmap 'nope' not found or not exportable"]
    # An in-use bitmap cannot be asked for either (qemu-nbd: "Bitmap 'b0' is inconsistent ...").
    p = serve_fails(str(fx["bitmaps-inuse.qcow2"]), "-r", "-B", "b0", cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(error_lines(p)) == 1 and "'b0'" in error_lines(p)[0]
    assert not (tmp_path / "never.sock").exists()


@needs_libnbd
def test_inuse_bitmaps_not_offered(fx: dict[str, Path], tmp_path: Path) -> None:
    image = fx["bitmaps-inuse.qcow2"]
    # The reference: qemu-nbd refuses to export it.
    p = run(["qemu-nbd", "-r", "-f", "qcow2", "-B", "b0", "-k", str(tmp_path / "q.sock"), str(image)],
            check=False, timeout=20)
    assert p.returncode != 0 and "Bitmap 'b0' is inconsistent and cannot be used" in p.stderr
    with PynbdServer(image, "-r", workdir=tmp_path) as server:
        info = json.loads(nbdinfo("--json", "--no-content", server.uri))
        assert info["exports"][0]["contexts"] == ["base:allocation", "qemu:allocation-depth"]
        code = ("import nbd, sys\n"
                "h = nbd.NBD(); h.set_opt_mode(True); h.connect_uri(sys.argv[1])\n"
                "h.add_meta_context('qemu:dirty-bitmap:')\n"
                "print(h.opt_list_meta_context(lambda n: 0)); h.opt_abort()\n")
        assert libnbd_script(code, server.uri).stdout.strip() == "0"
        log = server.log()
    warnings = [line for line in log.splitlines() if "WARNING" in line and "in use" in line]
    assert len(warnings) == 2
    assert "'b0'" in warnings[0] and "'b1'" in warnings[1] and str(image) in warnings[0]
    # The image was not touched (still in use, check clean).
    assert [b["flags"] for b in qemu_info(image, "qcow2")["format-specific"]["data"]["bitmaps"]] == \
        [["in-use", "auto"], ["in-use"]]


def test_unreadable_bitmap_left_out_at_start(fx: dict[str, Path], tmp_path: Path) -> None:
    """Bitmaps are read when the export opens (as qemu does): one whose data points past
    the end of the file is left out with a warning naming it, the others are served,
    and asking for it with --bitmap is a one-line error."""
    image = tmp_path / "bad-bitmap.qcow2"
    shutil.copy(fx["bitmaps.qcow2"], image)
    from pynbd.image.qcow2 import open_qcow2
    with open_qcow2(str(image), True) as opened:
        table = opened.top.bitmaps[0].entry.table_offset  # b0's table
    with open(image, "r+b") as f:
        f.seek(table)
        f.write((0x7FFF0000).to_bytes(8, "big"))
    with PynbdServer(image, "-r", workdir=tmp_path) as server:
        info = json.loads(nbdinfo("--json", "--no-content", server.uri))
        assert info["exports"][0]["contexts"] == ["base:allocation", "qemu:allocation-depth", "qemu:dirty-bitmap:b1"]
        assert merge_rows(nbdinfo_map(server.uri, "qemu:dirty-bitmap:b1"))
        log = server.log()
    warnings = [line for line in log.splitlines() if "WARNING" in line and "left out" in line]
    assert len(warnings) == 1 and "'b0'" in warnings[0] and "0x7fff0000" in warnings[0]
    p = serve_fails(str(image), "-r", "-B", "b0", cwd=tmp_path)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert len(error_lines(p)) == 1 and "'b0'" in error_lines(p)[0] and "0x7fff0000" in error_lines(p)[0]


# --- read-only qcow2, -f raw --------------------------------------------------------------


def test_qcow2_without_r_is_writable_and_with_r_read_only(fx: dict[str, Path], tmp_path: Path) -> None:
    """Served without -r a qcow2 image is writable (the writes land in it, qemu-img check
    stays clean); with -r it is read-only: EPERM, the file untouched."""
    image = tmp_path / "rw.qcow2"
    shutil.copy(fx["v3-64k.qcow2"], image)
    with PynbdServer(image, workdir=tmp_path) as server:
        e = json.loads(nbdinfo("--json", "--no-content", server.uri))["exports"][0]
        assert (e["is_read_only"], e["can_trim"], e["can_zero"], e["can_fast_zero"]) == (False, True, True, True)
        with nc.NbdClient.connect(server) as c:
            assert not c.flags & nc.TF_READ_ONLY
            assert c.write(0, b"x" * 512).error == 0
            assert c.read(0, 4).data(0, 4) == b"xxxx"
        log = server.log()
    assert "read-only" not in log
    run(["qemu-img", "check", str(image)])
    assert run(["qemu-io", "-f", "qcow2", "-r", "-c", "read -P 0x78 0 512", str(image)]).returncode == 0
    before = image.read_bytes()
    with PynbdServer(image, "-r", workdir=tmp_path) as server:
        with nc.NbdClient.connect(server) as c:
            assert c.flags & nc.TF_READ_ONLY
            assert c.write(0, b"y" * 512).error == nc.EPERM
            assert c.write_zeroes(0, 512).error == nc.EPERM
        p = run(["qemu-io", "-f", "raw", "-c", "write -P 0x55 0 512", server.uri], check=False)
        assert "wrote" not in p.stdout
    assert image.read_bytes() == before


def test_dirty_image_is_repaired_and_served_writable(fx: dict[str, Path], tmp_path: Path) -> None:
    """An image left with the dirty bit (lazy refcounts, a crash) is repaired when served
    writable, as QEMU repairs it on open: one warning line naming it, then writes work
    and ``qemu-img check`` finds nothing; served read-only it is left untouched."""
    image = tmp_path / "dirty.qcow2"
    shutil.copy(fx["dirty.qcow2"], image)
    before = image.read_bytes()
    with PynbdServer(image, "-r", workdir=tmp_path) as server:
        with nc.NbdClient.connect(server) as c:
            assert c.flags & nc.TF_READ_ONLY
    assert image.read_bytes() == before
    with PynbdServer(image, workdir=tmp_path) as server:
        with nc.NbdClient.connect(server) as c:
            assert not c.flags & nc.TF_READ_ONLY
            assert c.write(0, b"x" * 512).error == 0
            assert c.flush().error == 0
        log = server.log()
    assert any("dirty bit" in line and "repaired" in line and str(image) in line
               for line in log.splitlines()), log
    check = run(["qemu-img", "check", "--output", "json", str(image)], check=False)
    report = json.loads(check.stdout)
    assert check.returncode == 0 and not report.get("leaks") and not report.get("corruptions"), check.stdout
    info = json.loads(run(["qemu-img", "info", "--output", "json", str(image)]).stdout)
    assert info["dirty-flag"] is False


def test_format_raw_on_qcow2(fx: dict[str, Path], tmp_path: Path) -> None:
    image = fx["v3-64k.qcow2"]
    size = image.stat().st_size
    with PynbdServer(image, "-r", "-f", "raw", workdir=tmp_path) as server, \
            QemuNbd(image, tmp_path / "q.sock", fmt="raw") as qemu:
        e = json.loads(nbdinfo("--json", "--no-content", server.uri))["exports"][0]
        assert e["export-size"] == size and e["contexts"] == ["base:allocation", "qemu:allocation-depth"]
        p = run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), server.uri], check=False)
        assert (p.returncode, p.stdout) == (0, "Images are identical.\n"), p.stderr
        with nc.NbdClient.connect(server) as c:
            assert c.read(0, 8).data(0, 8) == b"QFI\xfb\x00\x00\x00\x03"  # the qcow2 header itself
        for ctx in ("base:allocation", "qemu:allocation-depth"):
            assert merge_rows(nbdinfo_map(server.uri, ctx)) == merge_rows(nbdinfo_map(qemu.uri, ctx)), ctx


# --- corrupt images --------------------------------------------------------------------------


def test_corrupt_image_on_command_line(fx: dict[str, Path], tmp_path: Path) -> None:
    short = tmp_path / "short.qcow2"
    short.write_bytes(fx["v3-64k.qcow2"].read_bytes()[:60])
    badl1 = tmp_path / "badl1.qcow2"
    data = bytearray(fx["v3-64k.qcow2"].read_bytes())
    data[0x30000:0x30008] = (0x8000000000040200).to_bytes(8, "big")
    badl1.write_bytes(bytes(data))
    cases = [
        (fx["unknown-incompat.qcow2"], "unknown feature bit(s) 5"),
        (fx["aes.qcow2"], "encrypted"),
        (short, "too short"),
        (badl1, "not cluster aligned"),
        (tmp_path / "missing.qcow2", "No such file or directory"),
    ]
    for path, fragment in cases:
        p = serve_fails(str(path), "-r", cwd=tmp_path)
        assert p.returncode == 2, (path, p.stderr)
        assert "Traceback" not in p.stderr
        lines = p.stderr.splitlines()
        assert len(lines) == 1, p.stderr
        assert lines[0].startswith(f"pynbd: error: {path}: ") and fragment in lines[0], lines[0]
    assert not (tmp_path / "never.sock").exists()


def test_corrupt_bit_refused_at_start(fx: dict[str, Path], tmp_path: Path) -> None:
    """Issue 3: an image with the corrupt bit is refused at open with a one-line error naming
    the image and the field, even read-only (qemu-nbd -r would serve it; we will not hand out
    data of an image its last writer flagged as inconsistent)."""
    image = fx["corrupt.qcow2"]
    p = run([sys.executable, "-m", "pynbd", "serve", str(image), "-r", "--socket", str(tmp_path / "s")],
            check=False, timeout=30)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and str(image) in lines[0] and "corrupt bit" in lines[0]


def test_req_one_on_unreadable_metadata(fx: dict[str, Path], tmp_path: Path) -> None:
    """REQ_ONE block status where the L2 table cannot be classified (an unaligned entry):
    base:allocation reports its safe status (data) in one descriptor, as a full request
    does, also while the client scans on (the reply to its next request cannot be made
    ahead); with qemu:allocation-depth too (no safe status) the request fails with EIO; the
    connection and the server go on."""
    from pynbd.image.qcow2 import Qcow2Image, open_qcow2

    bad = tmp_path / "bad-l2.qcow2"
    shutil.copy(fx["v3-64k.qcow2"], bad)
    with open_qcow2(str(bad), True) as image:
        assert isinstance(image, Qcow2Image)
        size = image.size
        entry_at = image.top.l1[0] & 0x00FFFFFFFFFFFE00  # guest offset 0: first L2 entry
    with open(bad, "r+b") as f:
        f.seek(entry_at)
        entry = int.from_bytes(f.read(8), "big")
        f.seek(entry_at)
        f.write((entry | 0x200).to_bytes(8, "big"))
    with PynbdServer(bad, "-r", workdir=tmp_path) as server:
        with nc.NbdClient.connect(server, meta=["base:allocation"]) as c:
            one = c.block_status(0, 65536, nc.CMD_FLAG_REQ_ONE)  # the bad cluster
            assert one.error == 0 and [ch.done for ch in one.chunks] == [True]
            assert list(one.extents().values()) == [[(65536, 0)]]
            # The scan goes on past it (the reply to this request was made ahead of it).
            (want,) = c.block_status(65536, MiB).extents().values()
            one = c.block_status(65536, MiB, nc.CMD_FLAG_REQ_ONE)
            assert one.error == 0 and list(one.extents().values()) == [want[:1]]
            (full,) = c.block_status(0, size).extents().values()
            assert full == [(size, 0)]  # a whole request: the safe status for all of it
        with nc.NbdClient.connect(server, meta=["base:allocation", "qemu:allocation-depth"]) as c:
            assert c.block_status(4096, size - 4096, nc.CMD_FLAG_REQ_ONE).error == nc.EIO
            assert c.read(MiB, 4).error == 0
        assert server.proc is not None and server.proc.poll() is None
    assert "reporting safe status" in server.log()


@needs_libnbd
def test_undecompressable_cluster_is_eio(fx: dict[str, Path], tmp_path: Path) -> None:
    """A compressed cluster whose stream is garbage: EIO for that range only; the server
    keeps serving other ranges and new clients."""
    from pynbd.image.qcow2 import Qcow2Image, open_qcow2

    bad = tmp_path / "bad-comp.qcow2"
    shutil.copy(fx["comp-zlib.qcow2"], bad)
    with open_qcow2(str(bad), True) as image:
        assert isinstance(image, Qcow2Image)
        layer = image.top
        l2 = layer.l1[0] & 0x00FFFFFFFFFFFE00
        entry_at = l2  # guest offset 0: first L2 entry
    with open(bad, "r+b") as f:
        f.seek(entry_at)
        entry = int.from_bytes(f.read(8), "big")
        assert entry >> 62 == 1  # compressed
        f.seek(compressed_range(entry, layer.cluster_bits).offset)
        f.write(b"\xff\xfe\xfd\xfc")
    src = fx["comp-src.raw"]
    with PynbdServer(bad, "-r", workdir=tmp_path) as server:
        p = run(["qemu-io", "-r", "-f", "raw", "-c", "read 0 4k", "-c", "read -P 0 64k 64k",
                 "-c", "read 1M 64k", server.uri], check=False)
        assert "read failed: Input/output error" in p.stdout + p.stderr
        assert "read 65536/65536 bytes at offset 65536" in p.stdout
        assert "read 65536/65536 bytes at offset 1048576" in p.stdout
        assert "Pattern verification failed" not in p.stdout
        with nc.NbdClient.connect(server) as c:
            reply = c.read(100, 10)
            assert reply.error == nc.EIO
            reply = c.read(MiB, 65536)  # the next compressed cluster is fine
            assert reply.error == 0 and reply.data(MiB, 65536) == read_file(src, MiB, 65536)
            reply = c.read(65536 - 10, 20)  # straddles into the bad cluster
            assert reply.error == nc.EIO
            assert c.read(2 * MiB, 65536).data(2 * MiB, 65536) == read_file(src, 2 * MiB, 65536)
        # A fresh client: block status is unaffected, other reads work.
        assert merge_rows(nbdinfo_map(server.uri, "base:allocation"))[0] == (0, 65536, 0)
        code = ("import nbd, sys\n"
                "h = nbd.NBD(); h.connect_uri(sys.argv[1])\n"
                "try:\n    h.pread(512, 0)\nexcept nbd.Error as e:\n    print(e.errno)\n"  # libnbd gives the errno name
                "print(h.pread(4, 1 << 20).hex())\n")
        assert libnbd_script(code, server.uri).stdout.split() == ["EIO", "00010203"]
        assert server.alive()


def test_cache_on_qcow2(fx: dict[str, Path], tmp_path: Path) -> None:
    """NBD_CMD_CACHE on a qcow2 export (writable and read-only) succeeds and the
    connection goes on serving (the image's L2 table cache once hid its cache())."""
    image = tmp_path / "cache.qcow2"
    shutil.copy(fx["v3-64k.qcow2"], image)
    for extra in ((), ("-r",)):
        with PynbdServer(image, *extra, workdir=tmp_path) as server:
            with nc.NbdClient.connect(server) as c:
                assert c.flags & nc.TF_SEND_CACHE
                assert c.cache(0, 1 << 20).error == 0
                assert c.read(0, 4096).error == 0
