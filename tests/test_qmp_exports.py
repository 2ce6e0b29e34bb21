"""pynbd's QMP node and export commands (``blockdev-add``, ``blockdev-del``,
``block-export-add``, ``block-export-del``, ``query-block-exports``, the
``BLOCK_EXPORT_DELETED`` event) against qemu-storage-daemon 7.2.

**The same sequences, the same answers.** ``pynbd serve --qmp Q --socket S`` without an
image and a qemu-storage-daemon with only its monitor and ``--nbd-server`` (no node, no
export) get the same commands through the ``qemu.qmp`` library, each on its own copies of
the same images. After every step the answers (return value, or error class and
description), ``query-block-exports`` and ``query-named-block-nodes`` (flat) must be
equal field by field, but for what must differ: the copies' directory, ``actual-size``
(each copy allocates its own blocks) and automatic node names (``#block`` and digits:
those nodes are compared with their names masked). Then what NBD clients see: ``nbdinfo
--list --json`` of both servers, the same reads (``qemu-img compare`` of the two NBD URIs)
after the same writes; clients cut by ``block-export-del`` and the events; and, once both
have quit, the image written through a runtime export: ``qemu-img check`` clean, the same
bitmaps as qsd's copy, stored (not flagged in use).

Where pynbd departs on purpose (the module docs of pynbd/qmp/exportcmds.py and
pynbd/qmp/bitmapcmds.py) only pynbd's documented answer is asserted, and the test says so.

**TLS.** An export added at run time to ``pynbd serve --tls`` is served over TLS only.

**Known bugs.** :data:`BUG_CASES` are short sequences where pynbd still answers otherwise
than qemu-storage-daemon once (each fixed since, each kept as a case).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.bitmaps import BitmapSpec, bitmap_states, create_image
from tests.support.deadline import DEADLINE
from tests.support.nbdclient import FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, REP_ERR_TLS_REQD, NbdClient
from tests.support.qmp import (
    NodelessQsd, Side, Step, answer, comparable, connected, pynbd_with_qmp, quit_and_wait, sides)
from tests.support.servers import PynbdServer, make_raw_image, nbdcopy, nbdinfo, qemu_img, qemu_io, run
from tests.test_qmp_bitmaps import compare_files

pytestmark = [pytest.mark.needs("qemu-storage-daemon", "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"),
              pytest.mark.pynbd, pytest.mark.timeout(120)]

KiB, MiB = 1 << 10, 1 << 20

ALLOCATION_DEPTH = "qemu:allocation-depth"


# --- Commands ----------------------------------------------------------------------------------


def dashed(options: dict[str, Any]) -> dict[str, Any]:
    """Python keyword names as QAPI member names (``read_only`` -> ``read-only``)."""
    return {key.replace("_", "-"): value for key, value in options.items()}


def blockdev(driver: str, node_name: str | None, **options: Any) -> Step:
    """``blockdev-add``; a ``filename`` is relative to each server's directory of copies."""
    arguments = {"driver": driver, **dashed(options)}
    if node_name is not None:
        arguments["node-name"] = node_name
    return "blockdev-add", arguments


def inline(filename: str) -> dict[str, str]:
    """An inline file node (BlockdevRef as an object) for a format node's ``file``."""
    return {"driver": "file", "filename": filename}


def export(export_id: str, node: str, **options: Any) -> Step:
    """``block-export-add`` of type nbd; ``options``: name, description, writable, bitmaps,
    allocation_depth."""
    return "block-export-add", {"type": "nbd", "id": export_id, "node-name": node, **dashed(options)}


def export_del(export_id: str, **options: str) -> Step:
    return "block-export-del", {"id": export_id, **options}


def blockdev_del(node: str) -> Step:
    return "blockdev-del", {"node-name": node}


# --- Images --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> Path:
    """The directory of the images both servers get copies of:

    - ``disk.qcow2`` (64 MiB): bitmaps ``b0``, ``b1`` (enabled) and ``d0`` (disabled, bits of its own);
    - ``top.qcow2`` (32 MiB) over ``base.raw`` (its header names the backing file);
    - ``flat.raw`` (16 MiB), ``frozen.qcow2`` (8 MiB, enabled bitmap ``e0``), ``spare.raw``;
    - for :data:`BUG_CASES`: ``ro.qcow2``, ``twice.qcow2`` (bitmap ``t0``), ``rw.raw``, ``other.raw``,
      ``order.raw``.
    """
    directory = tmp_path_factory.mktemp("templates")
    disk_bitmaps = (BitmapSpec("b0", 64 * KiB), BitmapSpec("b1", 4 * KiB), BitmapSpec("d0", 64 * KiB, enabled=False))
    create_image(directory / "disk.qcow2", 64 * MiB, cluster=64 * KiB, bitmaps=disk_bitmaps,
                 recorded_by_all=("write -P 0x11 0 1M",), recorded_by_enabled=("write -P 0x12 8M 64k",))
    make_raw_image(directory / "base.raw", 32 * MiB, ["write -P 0x33 0 2M", "write -P 0x34 30M 1M"])
    create_image(directory / "top.qcow2", 32 * MiB, cluster=64 * KiB, bitmaps=(), backing=directory / "base.raw",
                 backing_fmt="raw", recorded_by_all=("write -P 0x44 1M 64k",))
    make_raw_image(directory / "flat.raw", 16 * MiB, ["write -P 0x22 1M 1M"])
    create_image(directory / "frozen.qcow2", 8 * MiB, cluster=64 * KiB, bitmaps=(BitmapSpec("e0", 64 * KiB),),
                 recorded_by_all=("write -P 0x55 0 64k",))
    create_image(directory / "ro.qcow2", 8 * MiB, cluster=64 * KiB, bitmaps=())
    create_image(directory / "twice.qcow2", 8 * MiB, cluster=64 * KiB, bitmaps=(BitmapSpec("t0", 64 * KiB),))
    for name in ("spare.raw", "rw.raw", "other.raw", "order.raw"):
        make_raw_image(directory / name, 1 * MiB)
    return directory


@contextmanager
def both_servers(templates: Path, tmp_path: Path) -> Iterator[tuple[NodelessQsd, PynbdServer]]:
    """qsd and pynbd, neither with a node nor an export, each running in its own
    directory of copies of the templates (``tmp_path / "qsd"``, ``tmp_path / "pynbd"``)."""
    theirs, ours = (Path(shutil.copytree(templates, tmp_path / kind)) for kind in ("qsd", "pynbd"))
    with NodelessQsd(workdir=theirs) as qsd, pynbd_with_qmp(None, workdir=ours) as pynbd:
        yield qsd, pynbd


# --- Comparing -------------------------------------------------------------------------------------


def busy_bitmaps(nodes: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    """(node, bitmap) of every bitmap flagged ``busy``."""
    return [(node["node-name"], bitmap["name"]) for node in nodes
            for bitmap in node.get("dirty-bitmaps", []) if bitmap["busy"]]


async def compare_state(qsd: Side, pynbd: Side, after: str) -> None:
    """The same exports and the same nodes on both."""
    assert await pynbd.query("query-block-exports") == await qsd.query("query-block-exports"), after
    their_nodes, our_nodes = await qsd.nodes(), await pynbd.nodes()
    # pynbd flags a bitmap busy while a client reads it (has its qemu:dirty-bitmap:
    # context selected), not for an export's lifetime (pynbd/qmp/bitmapcmds.py): no client
    # here selects one.
    assert busy_bitmaps(our_nodes) == [], after
    theirs, ours = comparable(their_nodes), comparable(our_nodes)
    assert sorted(ours["named"]) == sorted(theirs["named"]), after
    for name, node in theirs["named"].items():
        assert ours["named"][name] == node, f"node {name!r} after {after}"
    assert ours["automatic"] == theirs["automatic"], after


async def compare_steps(qsd: Side, pynbd: Side, steps: Sequence[Step]) -> None:
    """Each step to both: the same answer, then the same exports and nodes."""
    for step in steps:
        after = json.dumps(step)
        assert await pynbd.run(step) == await qsd.run(step), after
        await compare_state(qsd, pynbd, after)


# --- The sequences -------------------------------------------------------------------------------

NODE_STEPS: tuple[Step, ...] = (
    blockdev("file", "f0", filename="disk.qcow2"),
    blockdev("file", "1f", filename="disk.qcow2"),  # not a well-formed name
    blockdev("file", "f0", filename="flat.raw"),  # a duplicate
    blockdev("file", "fx", filename="missing.qcow2"),
    blockdev("file", None, filename="flat.raw"),  # no name
    blockdev("qcow2", "disk0", file="nofile"),  # an unknown file node
    blockdev("qcow2", "f0", file="f0"),  # the name of its own file node
    blockdev("qcow2", "disk0", file="f0"),
    blockdev("raw", "flat", file=inline("flat.raw")),
    blockdev("qcow2", "top", file=inline("top.qcow2"), read_only=True),  # its backing file from its header
    blockdev("qcow2", "frozen", file=inline("frozen.qcow2"), read_only=True),
    blockdev("file", "spare", filename="spare.raw"),  # a file node alone
)

EXPORT_STEPS: tuple[Step, ...] = (
    export("e0", "disk0", writable=True, description="the disk", bitmaps=["b0"], allocation_depth=True),
    export("e0", "flat"),  # the id is in use
    export("e1", "nope"),
    export("e1", "top", writable=True),  # a read-only node
    export("e1", "flat", name="disk0"),  # e0's name (the node's, by default)
    export("e1", "disk0", name="disk0-ro", bitmaps=["d0", "nope"]),
    export("e1", "disk0", name="disk0-ro", bitmaps=["d0", "b1"]),  # b1 records: refused on a read-only export
    export("e1", "disk0", name="disk0-ro", bitmaps=[{"node": "disk0", "name": "d0"}], allocation_depth=True),
    export("e2", "top", allocation_depth=True),
    export("e3", "frozen", bitmaps=["e0"], allocation_depth=True),  # a read-only node's bitmap records nothing
    export("e4", "flat", name="raw", description="flat, no allocation-depth", writable=True),
)

#: The same writes to the writable exports of both.
WRITES = {"disk0": ("write -P 0x5a 3M 256k", "write -z 200k 64k", "write -P 0x5b 63M 1M"),
          "raw": ("write -P 0x66 0 4k", "write -z 1M 512k")}


async def check_departures(pynbd: Side) -> None:
    """pynbd's documented departures (pynbd/qmp/exportcmds.py), each changing nothing:
    a host file opened by one format node at a time (qsd: a permission conflict), a
    qcow2 node's backing chain from its header or none (qsd also takes a node by name), NBD
    exports of a format node only (qsd exports a file node too)."""
    before = (await pynbd.nodes(), await pynbd.query("query-block-exports"))
    refusals = [
        (blockdev("qcow2", "again", file="f0"), "Node 'f0' is in use by another image; pynbd opens a host file once"),
        (blockdev("qcow2", "chain", file=inline("frozen.qcow2"), backing="top"),
         "pynbd opens the backing chain a qcow2 header names (or none with 'backing': null), "
         "not a node given by name"),
        (export("ef", "spare"), "Node 'spare': pynbd exports the top node of an image (raw or qcow2)"),
    ]
    for step, desc in refusals:
        assert await pynbd.run(step) == {"error": {"class": "GenericError", "desc": desc}}, json.dumps(step)
    assert (await pynbd.nodes(), await pynbd.query("query-block-exports")) == before


def listing(side: Side) -> dict[str, dict[str, Any]]:
    """What ``nbdinfo --list --json`` shows of each export, by name (but its URI)."""
    exports = json.loads(nbdinfo("--list", "--json", f"nbd+unix://?socket={side.server.socket}"))["exports"]
    return {e["export-name"]: {k: v for k, v in e.items() if k != "uri"} for e in exports}


def compare_listings(qsd: Side, pynbd: Side) -> None:
    """The same exports with the same sizes, descriptions, flags and contexts; but pynbd
    offers qemu:allocation-depth on every export, ``allocation-depth`` given or not."""
    theirs, ours = listing(qsd), listing(pynbd)
    assert sorted(ours) == sorted(theirs) == ["disk0", "disk0-ro", "frozen", "raw", "top"]
    assert ours["disk0"].get("description") == "the disk"
    assert ours["raw"].get("description") == "flat, no allocation-depth"
    assert ALLOCATION_DEPTH not in theirs["raw"]["contexts"]
    for name, info in theirs.items():
        if ALLOCATION_DEPTH not in info["contexts"]:
            info["contexts"] = sorted([*info["contexts"], ALLOCATION_DEPTH])
        assert {**ours[name], "contexts": sorted(ours[name]["contexts"])} == \
            {**info, "contexts": sorted(info["contexts"])}, name
    assert sorted(ours["disk0"]["contexts"]) == ["base:allocation", ALLOCATION_DEPTH, "qemu:dirty-bitmap:b0"]
    assert sorted(ours["disk0-ro"]["contexts"]) == ["base:allocation", ALLOCATION_DEPTH, "qemu:dirty-bitmap:d0"]
    assert [ours[name]["is_read_only"] for name in ("disk0", "disk0-ro", "frozen", "raw", "top")] == \
        [False, True, True, False, True]


def compare_reads(qsd: Side, pynbd: Side, export_names: Sequence[str]) -> None:
    for name in export_names:
        qemu_img("compare", "-f", "raw", "-F", "raw", qsd.uri(name), pynbd.uri(name))


async def deleted_event(side: Side, *, timeout: float = DEADLINE) -> dict[str, Any]:
    """The next event, as ``{"event": NAME, "data": DATA}``."""
    try:
        event = await asyncio.wait_for(side.client.events.get(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"{side.server.kind}: no event within {timeout} s") from None
    return {"event": event["event"], "data": dict(event["data"])}


def open_files(pid: int) -> set[Path]:
    """The files process ``pid`` has open."""
    fds = Path(f"/proc/{pid}/fd")
    paths = set()
    for fd in os.listdir(fds):
        try:
            paths.add(Path(os.readlink(fds / fd)))
        except FileNotFoundError:  # (closed meanwhile)
            pass
    return paths


async def export_deletions(qsd: Side, pynbd: Side) -> None:
    """``block-export-del``: an unknown id; ``safe`` refused while a client is connected;
    ``hard`` cuts the client, then BLOCK_EXPORT_DELETED; ``safe`` without clients: the
    event at once."""
    await compare_steps(qsd, pynbd, [export_del("nope")])
    clients = {side: NbdClient.connect(side.server, "disk0") for side in (qsd, pynbd)}
    try:
        await compare_steps(qsd, pynbd, [export_del("e0"), export_del("e0", mode="safe")])
        for side in (qsd, pynbd):
            side.client.events.clear()
        hard = export_del("e0", mode="hard")
        assert await pynbd.run(hard) == await qsd.run(hard) == {"return": {}}
        loop = asyncio.get_running_loop()
        for side, client in clients.items():
            assert await loop.run_in_executor(None, client.wait_for_disconnect, DEADLINE) is not None, \
                f"{side.server.kind}: the client of a hard-deleted export is still connected"
            assert await deleted_event(side) == {"event": "BLOCK_EXPORT_DELETED", "data": {"id": "e0"}}
    finally:
        for client in clients.values():
            client.close()
    await compare_state(qsd, pynbd, "block-export-del e0 hard")
    safe = export_del("e2")
    assert await pynbd.run(safe) == await qsd.run(safe) == {"return": {}}
    for side in (qsd, pynbd):
        # (No client to wait for: a few seconds mean "at once" on a loaded machine.)
        assert await deleted_event(side, timeout=5) == {"event": "BLOCK_EXPORT_DELETED", "data": {"id": "e2"}}
    # (After the event: qsd removes an export from its list in a bottom half.)
    await compare_state(qsd, pynbd, "block-export-del e2")


async def node_deletions(qsd: Side, pynbd: Side) -> None:
    """``blockdev-del``: a node an export uses, a file node a format node uses, an unknown
    node; then a chain and a file node alone, which pynbd closes."""
    await compare_steps(qsd, pynbd, [blockdev_del("disk0"), blockdev_del("f0"), blockdev_del("nope")])
    top_files = {(pynbd.directory / name).resolve() for name in ("top.qcow2", "base.raw")}
    assert top_files <= open_files(pynbd.server.pid)
    await compare_steps(qsd, pynbd, [blockdev_del("top"), blockdev_del("spare"), blockdev_del("spare")])
    still_open = open_files(pynbd.server.pid)
    assert not (top_files | {(pynbd.directory / "spare.raw").resolve()}) & still_open
    assert (pynbd.directory / "disk.qcow2").resolve() in still_open


# --- Tests ---------------------------------------------------------------------------------------


def test_node_and_export_commands_answer_as_qsd(templates, tmp_path):
    """The whole life of runtime nodes and exports, step by step the same as qsd's; after
    ``quit``, the qcow2 image written through a runtime export is clean and its bitmaps
    are qsd's, stored."""
    with both_servers(templates, tmp_path) as (qsd_server, pynbd_server):
        async def scenario() -> None:
            async with sides(qsd_server, pynbd_server) as (qsd, pynbd):
                await compare_steps(qsd, pynbd, NODE_STEPS)
                await compare_steps(qsd, pynbd, EXPORT_STEPS)
                await check_departures(pynbd)
                compare_listings(qsd, pynbd)
                for side in (qsd, pynbd):
                    for name, commands in WRITES.items():
                        assert "failed" not in qemu_io(side.uri(name), *commands).stdout
                compare_reads(qsd, pynbd, ["disk0", "disk0-ro", "top", "frozen", "raw"])
                await compare_state(qsd, pynbd, "the writes")
                await export_deletions(qsd, pynbd)
                await node_deletions(qsd, pynbd)
        asyncio.run(scenario())
        for server in (qsd_server, pynbd_server):
            quit_and_wait(server)  # (its events: test_quit_deletes_the_exports_as_qsd)
    theirs, ours = tmp_path / "qsd", tmp_path / "pynbd"
    compare_files(theirs / "disk.qcow2", ours / "disk.qcow2")
    stored = bitmap_states(ours / "disk.qcow2")
    assert {name: state.in_use for name, state in stored.items()} == {"b0": False, "b1": False, "d0": False}
    assert stored["b0"].enabled and not stored["d0"].enabled
    for name in ("disk.qcow2", "flat.raw", "top.qcow2", "base.raw", "frozen.qcow2"):
        qemu_img("compare", theirs / name, ours / name)


@pytest.mark.needs("nbdcopy")
def test_runtime_export_served_over_tls_only(tmp_path):
    """``pynbd serve --tls`` without an image: an export added over QMP is read over TLS
    (with the generated client credentials); a plain client is refused."""
    image = make_raw_image(tmp_path / "disk.raw", 4 * MiB, ["write -P 0x5a 0 1M", "write -P 0xa5 3M 64k"])
    state = tmp_path / "tls"
    with pynbd_with_qmp(None, "--tls", "--tls-state-dir", state, workdir=tmp_path) as server:
        async def add() -> None:
            client = await connected(server.qmp_path)
            try:
                assert await answer(client, *blockdev("raw", "disk0", file=inline(str(image)))) == {"return": {}}
                assert await answer(client, *export("exp0", "disk0", description="runtime")) == {"return": {}}
            finally:
                await client.disconnect()
        asyncio.run(add())
        uri = f"nbds+unix:///disk0?socket={server.socket}&tls-certificates={state / 'client'}"
        info = json.loads(nbdinfo("--json", uri))
        assert info["TLS"] is True
        assert [(e["export-name"], e["export-size"], e["description"]) for e in info["exports"]] == \
            [("disk0", 4 * MiB, "runtime")]
        nbdcopy(uri, tmp_path / "copy.raw")
        assert (tmp_path / "copy.raw").read_bytes() == image.read_bytes()
        assert run(["nbdinfo", f"nbd+unix:///disk0?socket={server.socket}"], check=False).returncode != 0
        # The refusal is NBD_REP_ERR_TLS_REQD (NBD spec, "Option reply types"), to a list
        # as to a GO naming the runtime export.
        with NbdClient.for_server(server) as plain:
            plain.read_greeting()
            plain.send_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            assert plain.list_exports()[1].type == REP_ERR_TLS_REQD
            assert plain.go("disk0").final.type == REP_ERR_TLS_REQD


# --- Known bugs ----------------------------------------------------------------------------------

#: Sequences pynbd answers otherwise than qsd, which no documented departure explains.
BUG_CASES: dict[str, tuple[tuple[Step, ...], str]] = {
    "read-only file node under a writable format node": ((
        blockdev("file", "ro-file", filename="ro.qcow2", read_only=True),
        blockdev("qcow2", "ro-disk", file="ro-file"),  # qsd: "Block node is read-only"; pynbd opens it writable
    ), "pynbd ignores a file node's read-only flag"),
    "read-only format node over a writable file node": ((
        blockdev("file", "rw-file", filename="rw.raw"),
        blockdev("raw", "rw-disk", file="rw-file", read_only=True),  # pynbd then reports rw-file "ro": true
    ), "pynbd reports a file node's read-only flag as its format node's"),
    "qcow2 over a file of another format": ((
        blockdev("qcow2", "not-qcow2", file=inline("other.raw")),  # qsd: "Image is not in qcow2 format"
    ), "pynbd's message is its parser's"),
    "missing file under a format node": ((
        blockdev("raw", "lost", file=inline("missing.raw")),  # qsd: "Could not open '...': No such file or directory"
    ), "pynbd repeats the path and adds its own words"),
    "directory as a file node": ((
        blockdev("file", "dir", filename="."),  # qsd: "Could not open '<DIR>': Is a directory"
    ), "pynbd opens a directory as a file node"),
    "file node added after an image": ((
        blockdev("raw", "older", file=inline("order.raw")),
        blockdev("file", "newer", filename="spare.raw"),  # qsd lists it first; pynbd after every image's nodes
    ), "pynbd lists a file node alone after the images, whenever it was added"),
}


@pytest.fixture(scope="module")
def shared_servers(templates, tmp_path_factory) -> Iterator[tuple[NodelessQsd, PynbdServer]]:
    """One qsd and one pynbd for every bug case (each case names its own nodes)."""
    with both_servers(templates, tmp_path_factory.mktemp("bugs")) as servers:
        yield servers


def case_nodes(nodes: Sequence[dict[str, Any]], steps: Sequence[Step]) -> list[dict[str, Any]]:
    """The nodes ``steps`` name, newest first, busy flags left out."""
    names = {arguments.get("node-name") for _, arguments in steps}
    return [comparable([node])["named"][node["node-name"]] for node in nodes if node["node-name"] in names]


@pytest.mark.parametrize("case", list(BUG_CASES))
def test_cases_that_differed_from_qsd(shared_servers, case):
    """Each step's answer, then the nodes the case names (fields, and order: newest
    first), as qsd's."""
    steps, _ = BUG_CASES[case]
    qsd_server, pynbd_server = shared_servers

    async def scenario() -> None:
        async with sides(qsd_server, pynbd_server) as (qsd, pynbd):
            for step in steps:
                assert await pynbd.run(step) == await qsd.run(step), json.dumps(step)
            assert case_nodes(await pynbd.nodes(), steps) == case_nodes(await qsd.nodes(), steps)
    asyncio.run(scenario())


def test_quit_deletes_the_exports_as_qsd(templates, tmp_path):
    """qsd emits BLOCK_EXPORT_DELETED for each export left, oldest first, before quit's answer."""
    steps = (blockdev("raw", "flat", file=inline("flat.raw")), export("x0", "flat"),
             export("x1", "flat", name="again"))
    with both_servers(templates, tmp_path) as (qsd_server, pynbd_server):
        async def scenario() -> None:
            async with sides(qsd_server, pynbd_server) as (qsd, pynbd):
                await compare_steps(qsd, pynbd, steps)
        asyncio.run(scenario())
        assert quit_and_wait(pynbd_server) == quit_and_wait(qsd_server)


def test_a_bitmap_may_be_named_by_two_exports(shared_servers):
    """pynbd's documented departure (docs/serving.md, "Busy bitmaps"): a bitmap is busy
    while an NBD client reads it, not because an export names it, so a second export may
    name it too (qemu-storage-daemon refuses: "Bitmap 't0' is currently in use by another
    operation and cannot be used")."""
    qsd_server, pynbd_server = shared_servers
    steps = (blockdev("qcow2", "twice", file=inline("twice.qcow2")),
             export("t1", "twice", writable=True, bitmaps=["t0"]),
             export("t2", "twice", name="twice-again", writable=True, bitmaps=["t0"]))

    async def scenario() -> None:
        async with sides(qsd_server, pynbd_server) as (_, pynbd):
            for step in steps:
                assert await pynbd.run(step) == {"return": {}}, json.dumps(step)
    asyncio.run(scenario())
    listing = json.loads(nbdinfo("--json", "--list", pynbd_server.uri))
    contexts = {e["export-name"]: e["contexts"] for e in listing["exports"]}
    assert "qemu:dirty-bitmap:t0" in contexts["twice"] and "qemu:dirty-bitmap:t0" in contexts["twice-again"]


def test_qcow2_node_without_its_backing_file(shared_servers):
    """``backing: null``: the qcow2 node alone, its unallocated clusters read as zeros
    (the backing file's data does not show through), the same bytes as qsd's; a backing
    node given by name is pynbd's documented refusal."""
    qsd_server, pynbd_server = shared_servers
    steps = (blockdev("qcow2", "alone", file=inline("top.qcow2"), read_only=True, backing=None),
             export("alone", "alone"))

    async def scenario() -> None:
        async with sides(qsd_server, pynbd_server) as (qsd, pynbd):
            for step in steps:
                assert await pynbd.run(step) == await qsd.run(step) == {"return": {}}, json.dumps(step)
            compare_reads(qsd, pynbd, ["alone"])
            with_node = blockdev("qcow2", "named", file=inline("frozen.qcow2"), read_only=True, backing="alone")
            refused = await pynbd.run(with_node)
            assert refused["error"]["class"] == "GenericError" and "not a node given by name" in \
                refused["error"]["desc"], refused
    asyncio.run(scenario())
    # The top image over base.raw: without its backing file some bytes read differently.
    with_backing = run(["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2",
                        f"nbd+unix:///alone?socket={pynbd_server.socket}", str(pynbd_server.workdir / "top.qcow2")],
                       check=False)
    assert with_backing.returncode == 1, with_backing.stdout
