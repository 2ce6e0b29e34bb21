"""The block nodes of pynbd's images as ``query-named-block-nodes`` and
``query-blockstats`` describe them (pynbd/qmp/blockinfo.py, pynbd/server/stats.py),
with qemu-storage-daemon 7.2 as the oracle.

Each fixture shape (tests/qcow2_fixtures.py: raw; qcow2 v2 and v3; dirty; bitmaps
enabled, disabled, in use, stale; backing chains qcow2 -> qcow2 -> raw with and
without backing formats; extended L2 over a short raw backing file; external data
files; compressed; internal snapshot; odd sizes and cluster sizes) is copied twice:
qemu-storage-daemon opens one copy as ``--blockdev`` file node ``disk0-file`` and
format node ``disk0`` (read-only and read-write), pynbd opens the other with
``open_image`` and builds the answers for the same nodes. They are compared field by
field, but for what must differ: the copies' directories, ``actual-size`` (each copy
allocates its own blocks), automatic node names (``#block`` + random digits in QEMU),
the ``wr_highest_offset`` of file nodes (QEMU rewrites headers when it opens an image
writable) and the documented departures (the module doc of pynbd/qmp/blockinfo.py):
the data file's name, a dirty image asked for writable, a raw image's exact size.

Then the same NBD writes go to both, each serving its copy (qemu-storage-daemon's NBD
export, pynbd's NbdServer in process), and the answers still agree: dirty counts, busy
exported bitmaps, ``wr_highest_offset`` of the format node, and pynbd's own counters.
"""

from __future__ import annotations

import json

import asyncio
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient
from qemu.qmp.protocol import ConnectError

from pynbd.image import open_image
from pynbd.qmp.blockinfo import AutoNodeNames, BlockNode, image_nodes, query_named_block_nodes
from pynbd.server.exports import Export, ExportConfig
from pynbd.server.stats import query_blockstats
from tests.qcow2_fixtures import session_fixtures
from tests.test_io_stats import run_tool, serving

pytestmark = pytest.mark.needs("qemu-storage-daemon", "qemu-img", "qemu-io")

NAMED_FLAT = ("query-named-block-nodes", {"flat": True})
NAMED_NESTED = ("query-named-block-nodes", {"flat": False})
NODE_STATS = ("query-blockstats", {"query-nodes": True})
QUERIES = (NAMED_FLAT, NAMED_NESTED, NODE_STATS)


def key(query: tuple[str, dict[str, Any]]) -> str:
    """The name of a query's answer in the answers' dicts."""
    return query[0] + str(query[1])


@dataclass(frozen=True)
class Shape:
    """A fixture image and the files it needs beside it (backing files, data files)."""

    image: str
    needs: tuple[str, ...] = ()

    @property
    def fmt(self) -> str:
        return "raw" if self.image.endswith(".raw") else "qcow2"

    def copy(self, fixtures_dir: Path, to: Path) -> Path:
        for name in (self.image, *self.needs):
            (to / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(fixtures_dir / name, to / name)
        return to / self.image


SHAPES = (
    Shape("raw-sparse.raw"),
    Shape("v3-64k.qcow2"),
    Shape("v2.qcow2"),
    Shape("bitmaps.qcow2"),
    Shape("bitmaps-inuse.qcow2"),
    Shape("bitmaps-noautoclear.qcow2"),
    Shape("bm-top.qcow2", ("bm-base.raw",)),
    Shape("extl2.qcow2"),
    Shape("extl2-16k.qcow2", ("extl2-base.raw",)),
    Shape("extdata.qcow2", ("extdata.data",)),
    Shape("extdata-raw.qcow2", ("extdata-raw.data",)),
    Shape("comp-zlib.qcow2"),
    Shape("comp-zstd.qcow2"),
    Shape("snap.qcow2"),
    Shape("odd.qcow2"),
    Shape("cs512.qcow2"),
    Shape("chain-top.qcow2", ("chain-mid.qcow2", "chain-base.raw")),
    Shape("probe/top.qcow2", ("probe/mid.qcow2", "probe/base.raw")),
)
DIRTY = Shape("dirty.qcow2")


@pytest.fixture(scope="module")
def fixtures_dir(tmp_path_factory) -> Path:
    return session_fixtures(tmp_path_factory)["v3-64k.qcow2"].parent


# --- the two sides -----------------------------------------------------------------------------


class Qsd:
    """qemu-storage-daemon with ``image`` as nodes ``disk0-file`` and ``disk0`` and a QMP
    monitor; with ``export_bitmaps`` (not None) also a writable NBD export ``exp0``
    naming those bitmaps (``uri``). Sockets live in a short directory of their own (unix
    socket paths are short); the process runs in the image's directory (QEMU 7.2 opens a
    relative data file name from there) and is stopped by PID."""

    def __init__(self, image: Path, fmt: str, read_only: bool, export_bitmaps: Sequence[str] | None = None):
        self.sockets = Path(tempfile.mkdtemp(prefix="qsd-"))
        ro = ",read-only=on" if read_only else ""
        args = ["qemu-storage-daemon",
                "--blockdev", f"driver=file,node-name=disk0-file,filename={image}{ro}",
                # discard=unmap: TRIM reaches the image (and its bitmaps), as in pynbd.
                "--blockdev", f"driver={fmt},node-name=disk0,file=disk0-file,discard=unmap{ro}",
                "--chardev", f"socket,id=m,path={self.sockets / 'qmp.sock'},server=on,wait=off",
                "--monitor", "chardev=m"]
        if export_bitmaps is not None:
            args += ["--nbd-server", f"addr.type=unix,addr.path={self.sockets / 'nbd.sock'}",
                     "--export", "type=nbd,id=exp0,node-name=disk0,name=exp0,writable=on"
                     + "".join(f",bitmaps.{i}={name}" for i, name in enumerate(export_bitmaps))]
        self.uri = f"nbd+unix:///exp0?socket={self.sockets / 'nbd.sock'}"
        self.proc = subprocess.Popen(args, cwd=image.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.client = QMPClient("test")

    async def __aenter__(self) -> Qsd:
        deadline = time.monotonic() + 20
        while not (self.sockets / "qmp.sock").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                await self._stop()
                raise RuntimeError(f"qemu-storage-daemon did not start: {self.proc.stderr.read().decode()}")
            await asyncio.sleep(0.02)
        while True:  # the path exists from bind(); connecting is refused until listen()
            try:
                await self.client.connect(str(self.sockets / "qmp.sock"))
                return self
            except ConnectError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    await self._stop()
                    raise
                self.client = QMPClient("test")
                await asyncio.sleep(0.02)

    async def ask(self, command: str, arguments: dict[str, Any]) -> Any:
        return await self.client.execute(command, arguments)

    async def __aexit__(self, *exc: object) -> None:
        await self._stop()

    async def _stop(self) -> None:
        try:
            await self.client.disconnect()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc.stderr.close()
            shutil.rmtree(self.sockets, ignore_errors=True)


def qsd_answers(image: Path, fmt: str, read_only: bool) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        async with Qsd(image, fmt, read_only) as qsd:
            return {key(query): await qsd.ask(*query) for query in QUERIES}
    return asyncio.run(main())


def pynbd_answers(nodes: Sequence[BlockNode]) -> dict[str, Any]:
    return {key(NAMED_FLAT): query_named_block_nodes(nodes, flat=True),
            key(NAMED_NESTED): query_named_block_nodes(nodes, flat=False),
            key(NODE_STATS): query_blockstats(nodes, query_nodes=True)}


def comparable(answer: Any, directory: Path) -> Any:
    """``answer`` with what must differ between the two sides made equal (module doc)."""
    if isinstance(answer, list):
        return [comparable(item, directory) for item in answer]
    if not isinstance(answer, dict):
        return answer.replace(str(directory), "DIR") if isinstance(answer, str) else answer
    out = {}
    for key, value in answer.items():
        if key == "actual-size":
            continue
        if key == "node-name" and value.startswith("#block"):
            value = "#auto"
        elif key in ("file", "filename") and not value.startswith("/"):
            # QEMU 7.2 names a data file as the header does (relative to its working
            # directory, the image's here); pynbd by the path it opened.
            value = f"{directory}/{value}"
        out[key] = comparable(value, directory)
    if "driver-specific" in out:  # a file node's stats: QEMU writes headers at a writable open
        out["stats"].pop("wr_highest_offset")
    return out


def open_nodes(image: Path, fmt: str, read_only: bool, **kw: Any) -> tuple[Any, list[BlockNode]]:
    opened = open_image(str(image), fmt, read_only=read_only)
    return opened, image_nodes(opened, "disk0", AutoNodeNames(), **kw)


# --- the same images, the same answers --------------------------------------------------------


@pytest.mark.parametrize("read_only", [True, False], ids=["ro", "rw"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.image)
def test_answers_are_qemu_storage_daemons(shape, read_only, fixtures_dir, tmp_path):
    (tmp_path / "qsd").mkdir()
    (tmp_path / "pynbd").mkdir()
    expected = qsd_answers(shape.copy(fixtures_dir, tmp_path / "qsd"), shape.fmt, read_only)
    image, nodes = open_nodes(shape.copy(fixtures_dir, tmp_path / "pynbd"), shape.fmt, read_only)
    try:
        got = pynbd_answers(nodes)
    finally:
        image.close()
    for query in expected:
        assert comparable(got[query], tmp_path / "pynbd") == comparable(expected[query], tmp_path / "qsd"), query


def test_a_dirty_image_opened_writable_is_repaired_as_qemu_repairs_it(fixtures_dir, tmp_path):
    (tmp_path / "qsd").mkdir()
    (tmp_path / "pynbd").mkdir()
    expected = qsd_answers(DIRTY.copy(fixtures_dir, tmp_path / "qsd"), "qcow2", False)
    image, nodes = open_nodes(DIRTY.copy(fixtures_dir, tmp_path / "pynbd"), "qcow2", False)
    try:
        got = pynbd_answers(nodes)
    finally:
        image.close()
    # Both repair the image (refcounts, dirty bit) and open it writable. QEMU rebuilds the
    # refcount structures at the end of the file where pynbd corrects them in place, so
    # the file node's size (the host file's) differs.
    def without_file_size(answer):
        answer = json.loads(json.dumps(answer))
        for node in answer if isinstance(answer, list) else []:
            if node.get("drv") == "file":
                node["image"].pop("virtual-size", None)
        return answer

    for query in expected:
        assert without_file_size(comparable(got[query], tmp_path / "pynbd")) == \
            without_file_size(comparable(expected[query], tmp_path / "qsd")), query
    assert got[key(NAMED_FLAT)][0]["image"]["dirty-flag"] is False
    assert got[key(NAMED_FLAT)][0]["ro"] is False


def test_a_raw_images_size_is_the_size_served_and_its_file_node_qemus(tmp_path):
    path = tmp_path / "odd.raw"
    with open(path, "wb") as f:
        f.truncate(3 * 1024 * 1024 + 1000)
    image, nodes = open_nodes(path, "raw", True)
    try:
        raw_node, file_node = query_named_block_nodes(nodes, True)
    finally:
        image.close()
    assert raw_node["image"]["virtual-size"] == 3 * 1024 * 1024 + 1000  # QEMU says 3146752
    assert file_node["image"]["virtual-size"] == 3146752


def test_implicit_nodes_get_reproducible_automatic_names(fixtures_dir, tmp_path):
    shape = SHAPES[-2]  # chain-top: two backing files
    image, nodes = open_nodes(shape.copy(fixtures_dir, tmp_path), "qcow2", True)
    image.close()
    assert [n.node_name for n in nodes] == ["disk0-file", "disk0", "#block000", "#block100", "#block200",
                                            "#block300"]


# --- the same writes, the same answers ------------------------------------------------------------

WRITES = ("write -P 0x55 2M 64k", "write -z 6M 128k", "discard 10M 64k", "write -P 0x66 15M 4k",
          "write -P 0x77 1M 512", "flush")


def test_after_the_same_nbd_writes_the_answers_agree(fixtures_dir, tmp_path):
    shape = Shape("bitmaps.qcow2")
    (tmp_path / "qsd").mkdir()
    (tmp_path / "pynbd").mkdir()
    qsd_image = shape.copy(fixtures_dir, tmp_path / "qsd")
    qemu_io = ["qemu-io", "-f", "raw"] + [arg for write in WRITES for arg in ("-c", write)]

    async def qsd_side() -> dict[str, Any]:
        async with Qsd(qsd_image, "qcow2", False, export_bitmaps=["b0"]) as qsd:
            await run_tool(*qemu_io, qsd.uri)
            return {key(query): await qsd.ask(*query) for query in QUERIES}

    expected = asyncio.run(qsd_side())

    export = Export.open(ExportConfig(name="exp0", path=str(shape.copy(fixtures_dir, tmp_path / "pynbd")),
                                      fmt="qcow2", bitmaps=("b0",)))
    sockets = Path(tempfile.mkdtemp(prefix="pynbd-"))
    try:
        uri = f"nbd+unix:///exp0?socket={sockets / 'nbd.sock'}"
        asyncio.run(serving(export, sockets / "nbd.sock", lambda: run_tool(*qemu_io, uri)))
        nodes = image_nodes(export.image, "disk0", AutoNodeNames(), busy_bitmaps=export.bitmaps,
                            stats=export.stats)
        got = pynbd_answers(nodes)
    finally:
        export.close()
        shutil.rmtree(sockets, ignore_errors=True)

    for query in (key(NAMED_FLAT), key(NAMED_NESTED)):
        assert comparable(got[query], tmp_path / "pynbd") == comparable(expected[query], tmp_path / "qsd"), query
    dirty = {b["name"]: b for b in got[key(NAMED_FLAT)][0]["dirty-bitmaps"]}
    assert dirty["b0"]["busy"] and not dirty["b1"]["busy"]

    # Node statistics: the same nodes and keys; QEMU counts no NBD request, pynbd every one.
    theirs = comparable(expected[key(NODE_STATS)], tmp_path / "qsd")
    ours = comparable(got[key(NODE_STATS)], tmp_path / "pynbd")
    assert [n["node-name"] for n in ours] == [n["node-name"] for n in theirs] == ["disk0-file", "disk0"]
    their_disk0, our_disk0 = theirs[1], ours[1]
    assert our_disk0["parent"] == their_disk0["parent"]
    assert set(our_disk0["stats"]) == set(their_disk0["stats"]) | {"idle_time_ns"}
    assert our_disk0["stats"]["wr_highest_offset"] == their_disk0["stats"]["wr_highest_offset"] == 15 * 2**20 + 4096
    counted = {k: our_disk0["stats"][k] for k in ("rd_operations", "wr_operations", "wr_bytes", "unmap_operations",
                                                   "unmap_bytes", "account_invalid", "account_failed")}
    assert counted == {"rd_operations": 0, "wr_operations": 4, "wr_bytes": 65536 + 131072 + 4096 + 512,
                       "unmap_operations": 1, "unmap_bytes": 65536, "account_invalid": True,
                       "account_failed": True}
    assert our_disk0["stats"]["flush_operations"] >= 1  # qemu-io's flush, and its own at exit
