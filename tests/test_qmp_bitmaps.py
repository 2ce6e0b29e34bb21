"""pynbd's QMP bitmap commands (``block-dirty-bitmap-*``, ``transaction``) against
qemu-storage-daemon 7.2 (a live checkpoint under a write load: test_qmp_checkpoint.py).

**The same commands, the same answers.** Copies of the same images are opened by
qemu-storage-daemon (``--blockdev`` file and qcow2 nodes, an NBD server but no export, so
no bitmap of qsd is busy) and by ``pynbd serve --qmp`` (``--export`` per image, no NBD
client, so none of pynbd's is). Through the ``qemu.qmp`` library both get the same
command sequences (one per theme: add, enable/disable/clear/remove, merge, transaction,
...; and an image with an inconsistent bitmap); each answer (the return value, or the
error's class and description) must be equal, and so must every node's
``dirty-bitmaps`` in ``query-named-block-nodes`` after each step, every field (``busy``
too: false on both sides here) in QEMU's order. Once both have stopped, the image files
hold the same bitmaps: ``qemu-img info`` (names, flags, granularities), ``qemu-img
check`` clean, and the same bits as read-only ``qemu-nbd -B NAME`` serves them.

Where pynbd departs on purpose (pynbd/qmp/bitmapcmds.py) only pynbd is asked: bitmaps on a
node that is not a served qcow2 image's top node (qsd takes them on a file node), a
merge with an empty list of sources (qsd 7.2 crashes), transaction actions other than
bitmap ones (qsd runs ``abort``). The sequences stay on the top nodes and never merge
an empty list, so the departures do not touch them. Not compared: the image's
``format-specific`` bitmaps while it is open (pynbd writes a change to the bitmap
directory at once, QEMU when it closes the image).

**Busy.** qsd keeps a bitmap named in an export busy for the export's lifetime; pynbd while
an NBD connection has its ``qemu:dirty-bitmap:`` context selected. The refusals are
compared with qsd's (a qsd export naming the bitmap, pynbd with a client reading it),
then both release it (``block-export-del``; the clients disconnect) and the same
commands work.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from qemu.qmp import QMPClient

from tests.support.bitmaps import BitmapSpec, bitmap_states, create_image, qemu_io_local, qemu_nbd_dirty
from tests.support.deadline import DEADLINE, wait_connections_closed
from tests.support.nbdclient import NbdClient
from tests.support.qcow2_writes import run_tool
from tests.support.qmp import QsdServer, answer, dirty_bitmaps, pynbd_with_qmp, qsd_blockdev
from tests.support.servers import PynbdServer

pytestmark = [pytest.mark.needs("qemu-storage-daemon", "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"),
              pytest.mark.pynbd, pytest.mark.timeout(120)]

KiB, MiB = 1 << 10, 1 << 20
SIZE = 64 * MiB
CLUSTER = 64 * KiB

Step = tuple[str, dict[str, Any]]


# --- Commands ----------------------------------------------------------------------------------


def add(node: str, name: str, **options: Any) -> Step:
    """``block-dirty-bitmap-add``; ``options``: granularity, persistent, disabled."""
    return "block-dirty-bitmap-add", {"node": node, "name": name, **options}


def bitmap_op(verb: str, node: str, name: str) -> Step:
    """``block-dirty-bitmap-VERB`` (remove, clear, enable, disable)."""
    return f"block-dirty-bitmap-{verb}", {"node": node, "name": name}


def merge(node: str, target: str, *sources: str | dict[str, str]) -> Step:
    return "block-dirty-bitmap-merge", {"node": node, "target": target, "bitmaps": list(sources)}


def transaction(*actions: Step, **properties: str) -> Step:
    arguments: dict[str, Any] = {"actions": [{"type": command, "data": data} for command, data in actions]}
    if properties:
        arguments["properties"] = {key.replace("_", "-"): value for key, value in properties.items()}
    return "transaction", arguments


def described(step: Step) -> str:
    """A step for assertion messages (long names shortened)."""
    text = json.dumps(step)
    return text if len(text) < 300 else text[:150] + " ... " + text[-100:]


# --- Images ----------------------------------------------------------------------------------------


def build_images(directory: Path) -> dict[str, Path]:
    """The images the comparisons serve, by node name: ``disk0`` (64 MiB, bitmaps ``b0``
    enabled, ``old`` disabled with bits of its own, ``fine`` of 4 KiB granules), ``twin``
    (the same size, ``t0`` of 128 KiB granules), ``small`` (32 MiB, ``s0``), ``v2`` (qcow2
    v2: no persistent bitmaps) and ``scarred`` (an inconsistent ``bad`` beside ``b0`` and
    ``old``)."""
    directory.mkdir(parents=True, exist_ok=True)
    images = {
        "disk0": create_image(directory / "disk0.qcow2", SIZE, cluster=CLUSTER, bitmaps=(
            BitmapSpec("b0", 64 * KiB), BitmapSpec("old", 64 * KiB, enabled=False), BitmapSpec("fine", 4 * KiB)),
            recorded_by_all=("write -P 0x11 0 100k", "write -P 0x12 5M 4k"),
            recorded_by_enabled=("write -P 0x13 9M 1k", "write -P 0x14 20M 3M")),
        "twin": create_image(directory / "twin.qcow2", SIZE, cluster=CLUSTER, bitmaps=(
            BitmapSpec("t0", 128 * KiB),), recorded_by_all=("write -P 0x21 30M 4k", "write -P 0x22 63M 1M")),
        "small": create_image(directory / "small.qcow2", 32 * MiB, cluster=CLUSTER, bitmaps=(
            BitmapSpec("s0", 64 * KiB),), recorded_by_all=("write -P 0x31 1M 64k",)),
    }
    v2 = directory / "v2.qcow2"
    run_tool(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, str(SIZE)])
    images["v2"] = v2
    scarred = create_image(directory / "scarred.qcow2", SIZE, cluster=CLUSTER, bitmaps=(BitmapSpec("bad", 64 * KiB),))
    # QEMU killed while recording: "bad" stays flagged in use on disk, inconsistent.
    run_tool(["qemu-io", "-f", "qcow2", "-c", "write 0 64k", "-c", "sigraise 9", scarred.name], cwd=directory,
             check=False)
    assert bitmap_states(scarred)["bad"].in_use
    for spec in (BitmapSpec("b0", 64 * KiB), BitmapSpec("old", 32 * KiB)):
        run_tool(["qemu-img", "bitmap", "--add", "-g", str(spec.granularity), scarred.name, spec.name],
                 cwd=directory)
    qemu_io_local(scarred, ("write -P 0x41 2M 64k",))
    run_tool(["qemu-img", "bitmap", "--disable", scarred.name, "old"], cwd=directory)
    qemu_io_local(scarred, ("write -P 0x42 7M 64k",))
    images["scarred"] = scarred
    return images


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, Path]:
    return build_images(tmp_path_factory.mktemp("templates"))


def copies(templates: dict[str, Path], nodes: Sequence[str], directory: Path) -> dict[str, Path]:
    """Copies of the images of ``nodes`` in ``directory``."""
    directory.mkdir()
    return {node: Path(shutil.copy(templates[node], directory / templates[node].name)) for node in nodes}


def start_qsd(images: dict[str, Path], *extra: str) -> QsdServer:
    """qemu-storage-daemon with ``images`` as nodes (the first as ``disk0``)."""
    first, *others = images
    assert first == "disk0"
    blockdevs = [arg for node in others for arg in qsd_blockdev(node, images[node])]
    return QsdServer(images["disk0"], *blockdevs, *extra, workdir=images["disk0"].parent)


def start_pynbd(images: dict[str, Path], *extra: str) -> PynbdServer:
    """``pynbd serve --qmp`` with an export per image, named as its node."""
    exports = [arg for node, path in images.items() for arg in ("--export", f"{node}={path}")]
    return pynbd_with_qmp(None, *exports, *extra, workdir=images["disk0"].parent)


async def connected(path: str) -> QMPClient:
    client = QMPClient("test")
    await client.connect(path)
    return client


# --- The same answers ------------------------------------------------------------------------------


async def compare_steps(qsd: QMPClient, pynbd: QMPClient, steps: Sequence[Step]) -> None:
    """Each step to both: the same answer, then the same bitmaps (every BlockDirtyInfo
    field, in QEMU's order: newest first) on every node, before the first step too."""
    assert await dirty_bitmaps(pynbd) == await dirty_bitmaps(qsd), "bitmaps before the first step"
    for number, step in enumerate(steps):
        theirs, ours = await answer(qsd, *step), await answer(pynbd, *step)
        assert ours == theirs, f"step {number}: {described(step)}"
        their_bitmaps, our_bitmaps = await dirty_bitmaps(qsd), await dirty_bitmaps(pynbd)
        assert our_bitmaps == their_bitmaps, f"bitmaps after step {number}: {described(step)}"


def compare_files(theirs: Path, ours: Path) -> None:
    """Two stopped servers' copies hold the same bitmaps (names, flags, granularities; the
    directory's order is test_bitmap_directory_order_as_qsd's) with the same bits, and
    ours is clean."""
    their_states, our_states = bitmap_states(theirs), bitmap_states(ours)
    assert our_states == their_states, ours.name
    check = json.loads(run_tool(["qemu-img", "check", "--output=json", ours], check=False).stdout)
    assert check.get("check-errors", 0) == 0 and not check.get("leaks") and not check.get("corruptions"), check
    size = json.loads(run_tool(["qemu-img", "info", "--output=json", ours]).stdout)["virtual-size"]
    readable = [name for name, state in our_states.items() if not state.in_use]
    assert qemu_nbd_dirty(ours, readable, size) == qemu_nbd_dirty(theirs, readable, size), ours.name


#: Command sequences by theme, each run on fresh copies of disk0, twin, small and v2
#: (:func:`build_images`). Bitmaps kept in memory only are added after the persistent
#: ones, except in "order", which is about that.
SEQUENCES: dict[str, tuple[Step, ...]] = {
    "add": (
        add("disk0", "b0"),  # exists (on disk)
        add("disk0", "b0", persistent=True),
        add("disk0", ""),  # empty name
        add("nope", "x"),  # unknown node
        add("nope", ""),  # the name is checked before the node
        add("disk0", "g", granularity=256),
        add("disk0", "g", granularity=3000),
        add("disk0", "g", granularity=0),
        add("disk0", "g", granularity=2**32),  # past uint32: the argument's type
        add("disk0", "g", granularity=2**31 + 512),
        add("disk0", "g4k", granularity=4 * KiB, persistent=True),
        add("disk0", "huge", granularity=2**31, persistent=True),
        add("disk0", "y" * 1024, persistent=True),  # too long to store
        add("disk0", "L" * 1023, persistent=True),  # the longest
        add("v2", "p", persistent=True),  # qcow2 v2 stores no bitmaps
        add("v2", "np"),
        add("disk0", "pd", persistent=True, disabled=True),
        add("disk0", "pd"),
        add("small", "s1", granularity=512, disabled=True),
        add("disk0", "n1"),
        add("disk0", "n1"),
    ),
    "long name": (
        add("disk0", "z" * 1024),  # too long for any bitmap
        add("disk0", "z" * 1023),
    ),
    "order": (
        add("disk0", "n1"),
        add("disk0", "p1", persistent=True),
        add("disk0", "n2", granularity=4 * KiB),
        add("disk0", "p2", persistent=True, disabled=True),
        bitmap_op("remove", "disk0", "b0"),
        add("disk0", "b0", persistent=True),
    ),
    "enable, disable, clear, remove": (
        *(bitmap_op(verb, "disk0", "nope") for verb in ("remove", "clear", "enable", "disable")),
        bitmap_op("disable", "disk0", "b0"),
        bitmap_op("disable", "disk0", "b0"),
        bitmap_op("enable", "disk0", "old"),
        bitmap_op("enable", "disk0", "b0"),
        bitmap_op("enable", "disk0", "b0"),
        bitmap_op("clear", "disk0", "old"),
        bitmap_op("clear", "disk0", "fine"),
        bitmap_op("clear", "disk0", "fine"),
        bitmap_op("remove", "disk0", "b0"),
        bitmap_op("remove", "disk0", "b0"),
        add("v2", "np"),
        bitmap_op("disable", "v2", "np"),
        bitmap_op("remove", "v2", "np"),
    ),
    "unknown node": (
        *(bitmap_op(verb, "nope", "b0") for verb in ("remove", "clear", "enable", "disable")),
        merge("nope", "n1", "b0"),
        merge("disk0", "b0", {"node": "nope", "name": "t0"}),
    ),
    "merge": (
        add("disk0", "p1", persistent=True),
        add("v2", "np"),
        add("disk0", "n1"),
        merge("disk0", "n1", "b0", "old"),
        merge("disk0", "p1", "fine"),  # 4 KiB granules into 64 KiB ones
        merge("disk0", "fine", "old"),  # and the other way
        merge("disk0", "b0", "b0"),  # into itself: nothing to do
        merge("disk0", "old", "old", "b0"),  # into a disabled bitmap
        merge("disk0", "nope", "b0"),
        merge("disk0", "n1", "nope"),
        merge("disk0", "p1", "b0", "nope"),  # the second source is missing: nothing merged
        merge("disk0", "n1", {"node": "twin", "name": "t0"}),  # another node, 128 KiB granules
        merge("disk0", "n1", {"node": "small", "name": "s0"}),  # different sizes
        merge("small", "s0", {"node": "disk0", "name": "b0"}),
        merge("disk0", "n1", {"node": "twin", "name": "nope"}),
        merge("twin", "t0", "b0"),  # a name is looked up on the target's node
        merge("twin", "t0", {"node": "disk0", "name": "fine"}, {"node": "twin", "name": "t0"}),
        merge("v2", "np", {"node": "disk0", "name": "fine"}),
        bitmap_op("clear", "disk0", "n1"),
        merge("disk0", "n1", {"node": "v2", "name": "np"}),
    ),
    "transaction": (
        transaction(add("disk0", "t1", persistent=True), bitmap_op("clear", "disk0", "b0"),
                    add("disk0", "b0")),  # the third fails: nothing changes
        transaction(add("disk0", "x1", persistent=True), merge("twin", "t0", {"node": "disk0", "name": "b0"}),
                    bitmap_op("remove", "twin", "nope")),  # two nodes: neither changes
        transaction(bitmap_op("disable", "disk0", "b0"), merge("disk0", "b0", {"node": "small", "name": "s0"})),
        transaction(add("disk0", "t2"), completion_mode="grouped"),
        transaction(),
        transaction(completion_mode="grouped"),
        transaction(add("disk0", "cp1", granularity=4 * KiB, persistent=True), bitmap_op("disable", "disk0", "fine"),
                    merge("disk0", "cp1", "fine"), bitmap_op("clear", "disk0", "fine"),
                    bitmap_op("enable", "disk0", "old")),
        transaction(add("disk0", "t2"), completion_mode="individual"),
        transaction(add("disk0", "d1"), add("disk0", "d1")),
        transaction(add("disk0", "q"), bitmap_op("remove", "disk0", "q")),
        transaction(add("twin", "tw", persistent=True), merge("twin", "tw", "t0"), bitmap_op("clear", "disk0", "b0"),
                    bitmap_op("remove", "small", "s0")),
    ),
    "remove in a transaction": (  # QEMU removes at commit: until then the bitmap is busy
        transaction(bitmap_op("remove", "disk0", "old"), add("disk0", "old", persistent=True, disabled=True)),
        transaction(bitmap_op("remove", "disk0", "b0"), bitmap_op("clear", "disk0", "b0")),
        transaction(bitmap_op("remove", "disk0", "b0"), bitmap_op("remove", "disk0", "b0")),
        transaction(bitmap_op("remove", "disk0", "b0"), merge("disk0", "fine", "b0")),
        transaction(bitmap_op("remove", "disk0", "b0"), bitmap_op("remove", "disk0", "old")),
    ),
}


def run_on_both(theirs: dict[str, Path], ours: dict[str, Path], steps: Sequence[Step]) -> None:
    """qsd on ``theirs``, pynbd on ``ours`` (images by node name): ``steps`` compared
    (:func:`compare_steps`), then both stopped and every qcow2 v3 image compared
    (:func:`compare_files`)."""
    async def scenario(qsd: QsdServer, pynbd: PynbdServer) -> None:
        qsd_client, pynbd_client = await connected(qsd.qmp_path), await connected(pynbd.qmp_path)
        try:
            await compare_steps(qsd_client, pynbd_client, steps)
        finally:
            await qsd_client.disconnect()
            await pynbd_client.disconnect()

    with start_qsd(theirs) as qsd, start_pynbd(ours) as pynbd:
        asyncio.run(scenario(qsd, pynbd))
    for node in theirs:
        if node != "v2":
            compare_files(theirs[node], ours[node])


NODES = ("disk0", "twin", "small", "v2")


@pytest.mark.parametrize("theme", list(SEQUENCES))
def test_bitmap_commands_answer_as_qsd(templates, tmp_path, theme):
    ours = copies(templates, NODES, tmp_path / "pynbd")
    run_on_both(copies(templates, NODES, tmp_path / "qsd"), ours, SEQUENCES[theme])
    assert bitmap_states(ours["v2"]) == {}


def directory_order(image: Path) -> list[str]:
    """The image's bitmaps in bitmap directory order (``qemu-img info``)."""
    info = json.loads(run_tool(["qemu-img", "info", "--output=json", image]).stdout)
    return [bitmap["name"] for bitmap in info["format-specific"]["data"].get("bitmaps", [])]


def test_bitmap_directory_order_as_qsd(templates, tmp_path):
    """New persistent bitmaps land in the bitmap directory in qsd's order (the one QEMU
    lists them in once it opens the image again): after the bitmaps the image had,
    the new ones newest first."""
    theirs, ours = copies(templates, ("disk0",), tmp_path / "qsd"), copies(templates, ("disk0",), tmp_path / "pynbd")
    run_on_both(theirs, ours, (
        add("disk0", "p1", persistent=True),
        bitmap_op("remove", "disk0", "b0"),
        add("disk0", "b0", persistent=True),
        transaction(add("disk0", "p2", persistent=True), add("disk0", "p3", persistent=True, disabled=True)),
        bitmap_op("clear", "disk0", "old"),
    ))
    assert directory_order(ours["disk0"]) == directory_order(theirs["disk0"])


def test_departures_change_nothing(templates, tmp_path):
    """pynbd's documented departures from qsd (module doc), each changing nothing."""
    ours = copies(templates, ("disk0", "twin"), tmp_path / "pynbd")

    async def scenario(pynbd: PynbdServer) -> None:
        client = await connected(pynbd.qmp_path)
        try:
            before = await dirty_bitmaps(client)
            assert await answer(client, *merge("disk0", "b0")) == {"return": {}}  # qsd 7.2: SIGSEGV
            assert await answer(client, *transaction(merge("disk0", "old"))) == {"return": {}}
            for node in ("disk0-file", "twin-file"):  # qsd adds them (in memory)
                refused = f"Node '{node}': pynbd changes the bitmaps of the writable qcow2 images it serves " \
                          "(their top node) only"
                assert await answer(client, *add(node, "f")) == {"error": {"class": "GenericError", "desc": refused}}
            assert await answer(client, "transaction", {"actions": [{"type": "abort", "data": {}}]}) == \
                {"error": {"class": "GenericError", "desc": "Action 'abort' is not supported by pynbd"}}
            assert await dirty_bitmaps(client) == before
        finally:
            await client.disconnect()

    states = bitmap_states(ours["disk0"])
    with start_pynbd(ours) as pynbd:
        asyncio.run(scenario(pynbd))
    assert bitmap_states(ours["disk0"]) == states


#: Commands around an inconsistent bitmap (``bad``), and on an image that has one.
INCONSISTENT_SEQUENCE: tuple[Step, ...] = (
    *(bitmap_op(verb, "disk0", "bad") for verb in ("clear", "enable", "disable")),
    merge("disk0", "bad", "b0"),
    merge("disk0", "b0", "bad"),
    merge("disk0", "b0", "old"),
    add("disk0", "bad"),
    add("disk0", "p", persistent=True),
    bitmap_op("disable", "disk0", "b0"),
    bitmap_op("clear", "disk0", "old"),
    transaction(add("disk0", "cp", persistent=True), bitmap_op("clear", "disk0", "bad")),
    transaction(add("disk0", "cp", persistent=True), bitmap_op("enable", "disk0", "b0")),
    bitmap_op("remove", "disk0", "bad"),
    add("disk0", "bad", persistent=True),
    add("disk0", "x"),
)


def test_an_inconsistent_bitmap_as_qsd(templates, tmp_path):
    """Only ``remove`` works on an inconsistent bitmap; the image's other bitmaps work as
    ever, persistent ones included (the inconsistent one stays flagged in use on disk
    until removed)."""
    theirs = {"disk0": copies(templates, ("scarred",), tmp_path / "qsd")["scarred"]}
    ours = {"disk0": copies(templates, ("scarred",), tmp_path / "pynbd")["scarred"]}
    run_on_both(theirs, ours, INCONSISTENT_SEQUENCE)


# --- Busy ------------------------------------------------------------------------------------------

#: What a busy ``b0`` refuses (``b1`` beside it is free), and what ``add`` does not check.
BUSY_STEPS: tuple[Step, ...] = (
    *(bitmap_op(verb, "disk0", "b0") for verb in ("clear", "enable", "disable", "remove")),
    merge("disk0", "b1", "b0"),
    merge("disk0", "b0", "b1"),
    merge("disk0", "b1", {"node": "disk0", "name": "b0"}),
    transaction(bitmap_op("clear", "disk0", "b1"), bitmap_op("disable", "disk0", "b0")),
    add("disk0", "b0"),
    bitmap_op("disable", "disk0", "b1"),
    bitmap_op("enable", "disk0", "b1"),
)
#: The same operations once ``b0`` is free again.
FREE_STEPS: tuple[Step, ...] = (
    merge("disk0", "b1", "b0"),
    transaction(bitmap_op("clear", "disk0", "b1"), bitmap_op("disable", "disk0", "b0")),
    bitmap_op("enable", "disk0", "b0"),
    merge("disk0", "b0", "b1"),
    bitmap_op("clear", "disk0", "b0"),
    bitmap_op("remove", "disk0", "b0"),
)
B0 = "qemu:dirty-bitmap:b0"


def test_a_bitmap_is_busy_while_a_client_reads_it(tmp_path):
    """pynbd: ``b0`` is busy from the moment a connection selects its context until the
    last such connection has closed, and refuses what qsd refuses for an exported
    bitmap; it records writes meanwhile. Freed (qsd: ``block-export-del``), it works."""
    template = create_image(tmp_path / "busy.qcow2", SIZE, cluster=CLUSTER,
                            bitmaps=(BitmapSpec("b0", 64 * KiB), BitmapSpec("b1", 64 * KiB)),
                            recorded_by_all=("write -P 1 0 1M",), recorded_by_enabled=())
    theirs = {"disk0": Path(shutil.copy(template, tmp_path / "qsd.qcow2"))}
    ours = Path(shutil.copy(template, tmp_path / "pynbd.qcow2"))
    export = "type=nbd,id=exp0,node-name=disk0,name=exp0,writable=on,bitmaps.0=b0"

    async def busy_flags(client: QMPClient) -> dict[str, bool]:
        return {b["name"]: b["busy"] for b in (await dirty_bitmaps(client))["disk0"]}

    async def b0_count(client: QMPClient) -> int:
        return next(b["count"] for b in (await dirty_bitmaps(client))["disk0"] if b["name"] == "b0")

    async def wait_free(client: QMPClient) -> None:
        deadline = time.monotonic() + DEADLINE
        while (await busy_flags(client))["b0"]:
            assert time.monotonic() < deadline, "b0 still busy"
            await asyncio.sleep(0.02)

    async def scenario(qsd: QsdServer, pynbd: PynbdServer) -> None:
        qsd_client, pynbd_client = await connected(qsd.qmp_path), await connected(pynbd.qmp_path)
        try:
            assert await busy_flags(pynbd_client) == {"b0": False, "b1": False}
            loop = asyncio.get_running_loop()
            for _ in range(2):
                readers.append(await loop.run_in_executor(None, lambda: NbdClient.connect(pynbd, meta=[B0])))
            assert await busy_flags(pynbd_client) == await busy_flags(qsd_client) == {"b0": True, "b1": False}
            await compare_steps(qsd_client, pynbd_client, BUSY_STEPS)
            # A busy bitmap records: the same write to both.
            count = await b0_count(pynbd_client)
            assert readers[0].write(40 * MiB, b"\x07" * 4096).error == 0
            with NbdClient.connect(qsd, "exp0") as writer:
                assert writer.write(40 * MiB, b"\x07" * 4096).error == 0
                writer.disconnect()
            assert await b0_count(pynbd_client) == await b0_count(qsd_client) == count + 64 * KiB

            readers[0].disconnect()
            await loop.run_in_executor(None, lambda: wait_connections_closed(pynbd, 1, open_left=1))
            assert (await busy_flags(pynbd_client))["b0"], "b0 freed while a connection still reads it"
            readers[1].disconnect()
            assert await answer(qsd_client, "block-export-del", {"id": "exp0"}) == {"return": {}}
            await wait_free(pynbd_client)
            await wait_free(qsd_client)
            await compare_steps(qsd_client, pynbd_client, FREE_STEPS)
        finally:
            for reader in readers:
                reader.close()
            await qsd_client.disconnect()
            await pynbd_client.disconnect()

    readers: list[NbdClient] = []
    with start_qsd(theirs, "--export", export) as qsd, pynbd_with_qmp(ours, "-v", workdir=tmp_path) as pynbd:
        asyncio.run(scenario(qsd, pynbd))
    compare_files(theirs["disk0"], ours)
