"""A live checkpoint under a write load: pynbd's QMP ``transaction`` on dirty bitmaps
while NBD clients write.

libnbd writers (several connections, random 4 KiB writes, each journalled with its send
and reply times) run while a ``transaction`` adds ``b1`` and disables ``b0``; the journal
says what each bitmap must and may hold. Then an incremental backup across such a
checkpoint rebuilds the image as it was at the checkpoint.

The QMP step builders, image geometry and :func:`connected` are test_qmp_bitmaps.py's.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from typing import Any

import pytest

from tests.support.bitmaps import Range, create_image, describe_difference, req_one_dirty, served_dirty, total
from tests.support.deadline import DEADLINE
from tests.support.qmp import answer, dirty_bitmaps, pynbd_with_qmp
from tests.support.servers import DEBIAN_PYTHON, libnbd_script, nbdcopy
from tests.test_bitmap_backup import COPY_RANGES
from tests.test_qmp_bitmaps import CLUSTER, SIZE, KiB, add, bitmap_op, connected, transaction

pytestmark = [pytest.mark.needs("qemu-storage-daemon", "qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"),
              pytest.mark.pynbd, pytest.mark.timeout(120)]


#: Writers under Debian's Python (libnbd): argv socket, connections, image size, seed.
#: Each connection writes random 4 KiB blocks from its own thread, journalling (send
#: time, reply time, offset) on CLOCK_MONOTONIC (the test's clock too). Commands on
#: stdin, each acknowledged on stdout: "pause" (acknowledged once no write is in flight),
#: "resume", "stop" (answered with the journal as JSON).
WRITERS = r'''
import json, random, sys, threading, time
import nbd

sock, connections, size, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
BLOCK = 4096
handles = []
for _ in range(connections):
    handle = nbd.NBD()
    handle.connect_unix(sock)
    handles.append(handle)
running, stopping = threading.Event(), threading.Event()
running.set()
parked = threading.Condition()
parked_count = 0
journals = [[] for _ in handles]

def write(index):
    global parked_count
    rng = random.Random(seed * 1000 + index)
    while not stopping.is_set():
        if not running.is_set():
            with parked:
                parked_count += 1
                parked.notify_all()
            running.wait()
            with parked:
                parked_count -= 1
            continue
        offset = rng.randrange(size // BLOCK) * BLOCK
        data = rng.randbytes(BLOCK)
        sent = time.monotonic()
        handles[index].pwrite(data, offset)
        journals[index].append((sent, time.monotonic(), offset))

threads = [threading.Thread(target=write, args=(i,)) for i in range(connections)]
for thread in threads:
    thread.start()
print("ready", flush=True)
for line in sys.stdin:
    command = line.strip()
    if command == "pause":
        running.clear()
        with parked:
            parked.wait_for(lambda: parked_count == connections)
    elif command == "resume":
        running.set()
    elif command == "stop":
        break
    print(command, flush=True)
stopping.set()
running.set()
for thread in threads:
    thread.join()
for handle in handles:
    handle.shutdown()
print(json.dumps([entry for journal in journals for entry in journal]), flush=True)
'''

Write = tuple[float, float, int]  # (sent, replied, offset): CLOCK_MONOTONIC seconds
BLOCK = 4 * KiB
#: How long writers write on each side of a checkpoint: long enough for hundreds of
#: writes, short enough that most of the image's granules stay clean.
WINDOW = 0.3


class Writers:
    """The :data:`WRITERS` process on ``socket``; used from the test's thread."""

    def __init__(self, socket: str, connections: int, seed: int) -> None:
        env = {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}
        self.process = subprocess.Popen([DEBIAN_PYTHON, "-c", WRITERS, socket, str(connections), str(SIZE),
                                         str(seed)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env=env)
        self._expect("ready")

    def _expect(self, line: str) -> None:
        got = self.process.stdout.readline().strip()
        assert got == line, f"writers said {got!r}, not {line!r} (exit code {self.process.poll()})"

    def command(self, command: str) -> None:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        self._expect(command)

    def stop(self) -> list[Write]:
        out, _ = self.process.communicate("stop\n", timeout=DEADLINE)
        assert self.process.returncode == 0, out
        return [tuple(entry) for entry in json.loads(out.splitlines()[-1])]

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def written(writes: Sequence[Write]) -> set[int]:
    """The 4 KiB granules (block numbers) ``writes`` touched."""
    return {offset // BLOCK for _, _, offset in writes}


def dirty_blocks(ranges: Sequence[Range]) -> set[int]:
    """The block numbers of a bitmap's dirty ranges (4 KiB granules)."""
    return {block for start, end in ranges for block in range(start // BLOCK, -(-end // BLOCK))}


def missing(needed: set[int], have: set[int]) -> str:
    """The first few blocks of ``needed`` that ``have`` lacks, for messages ("" if none)."""
    lacking = sorted(needed - have)
    return ", ".join(hex(block * BLOCK) for block in lacking[:5]) + (" ..." if len(lacking) > 5 else "")


def exactly(name: str, dirty: set[int], writes: set[int]) -> str:
    """How a bitmap's dirty blocks differ from the blocks written, for messages."""
    return f"{name}: written but clean: {missing(writes, dirty)}; dirty, not written: {missing(dirty, writes)}"


CHECKPOINT = transaction(add("disk0", "b1", granularity=BLOCK, persistent=True), bitmap_op("disable", "disk0", "b0"))


@pytest.mark.needs("libnbd-python")
def test_checkpoint_transaction_under_writes(tmp_path):
    """Writes on four connections run while ``transaction [add b1, disable b0]`` is sent
    (both bitmaps of 4 KiB granules, one granule per write). From the journal, against
    the transaction's send time S and reply time R: a write replied before S is in b0; a
    write sent after R is in b1; one across the transaction is in b0 or b1; and b0 holds
    only granules of writes sent before R, b1 only of writes replied after S (so a write
    sent after R is not in b0, unless an earlier write touched its granule)."""
    image = create_image(tmp_path / "load.qcow2", SIZE, cluster=CLUSTER, bitmaps=())
    with pynbd_with_qmp(image, workdir=tmp_path) as server:
        async def checkpoint_under_load() -> tuple[float, float, list[Write]]:
            client = await connected(server.qmp_path)
            try:
                assert await answer(client, *add("disk0", "b0", granularity=BLOCK, persistent=True)) == \
                    {"return": {}}
                writers = Writers(server.socket, 4, seed=7)
                try:
                    await asyncio.sleep(WINDOW)
                    sent = time.monotonic()
                    reply = await answer(client, *CHECKPOINT)
                    replied = time.monotonic()
                    assert reply == {"return": {}}
                    await asyncio.sleep(WINDOW)
                    journal = writers.stop()
                finally:
                    writers.kill()
                states = {b["name"]: b["recording"] for b in (await dirty_bitmaps(client))["disk0"]}
                assert states == {"b1": True, "b0": False}
                return sent, replied, journal
            finally:
                await client.disconnect()

        sent, replied, journal = asyncio.run(checkpoint_under_load())
        b0, b1 = served_dirty(server.uri, "b0", SIZE), served_dirty(server.uri, "b1", SIZE)

    before = [w for w in journal if w[1] < sent]
    after = [w for w in journal if w[0] > replied]
    across = [w for w in journal if w[1] >= sent and w[0] <= replied]
    assert len(before) > 100 and len(after) > 100, (len(before), len(across), len(after))
    in_b0, in_b1 = dirty_blocks(b0), dirty_blocks(b1)
    assert not missing(written(before), in_b0), "replied before the checkpoint, not in b0: " + \
        missing(written(before), in_b0)
    assert not missing(written(after), in_b1), "sent after the checkpoint, not in b1: " + \
        missing(written(after), in_b1)
    assert not missing(written(across), in_b0 | in_b1), "written across the checkpoint, in neither bitmap: " + \
        missing(written(across), in_b0 | in_b1)
    may_be_in_b0, may_be_in_b1 = written(before + across), written(across + after)
    assert not missing(in_b0, may_be_in_b0), "in b0, only written after the checkpoint: " + \
        missing(in_b0, may_be_in_b0)
    assert not missing(in_b1, may_be_in_b1), "in b1, only written before the checkpoint: " + \
        missing(in_b1, may_be_in_b1)


@pytest.mark.needs("libnbd-python", "nbdcopy")
def test_live_incremental_backup_across_a_checkpoint(tmp_path):
    """An incremental backup while clients write.

    Checkpoint 0: ``b0`` is added (empty) and nbdcopy takes the full backup before any
    writer starts. Writers run; they are paused (no write in flight) for checkpoint 1,
    ``transaction [add b1, disable b0]``, and nbdcopy snapshots the image as it is then
    (the image "at the checkpoint"); then they write on. A backup tool would read b0's
    dirty extents from the live image while it holds still for it (a fleecing
    snapshot); here the snapshot stands for that view: b0's extents, read over NBD
    with ``x-dirty-bitmap`` (QEMU's nbd driver) once the writers are done, copied from
    the snapshot into the full backup, must rebuild the snapshot, and b0 must be as it
    was at the checkpoint. With the writers stopped, round two is the
    plain flow: b1's extents copied from the live export over NBD onto the rebuilt
    backup give the live image. Since no write was in flight at the checkpoint, each
    bitmap holds exactly the granules written on its side of it."""
    image = create_image(tmp_path / "live.qcow2", SIZE, cluster=CLUSTER, bitmaps=(),
                         recorded_by_all=("write -P 0x5a 0 8M", "write -P 0xa5 40M 4M"))
    backup, snapshot = tmp_path / "backup.raw", tmp_path / "checkpoint.raw"
    with pynbd_with_qmp(image, workdir=tmp_path) as server:
        async def qmp(*step: Any) -> None:
            client = await connected(server.qmp_path)
            try:
                assert await answer(client, *step) == {"return": {}}, step
            finally:
                await client.disconnect()

        asyncio.run(qmp(*add("disk0", "b0", granularity=BLOCK, persistent=True)))
        nbdcopy(server.uri, backup)
        writers = Writers(server.socket, 3, seed=11)
        try:
            time.sleep(WINDOW)
            writers.command("pause")
            asyncio.run(qmp(*CHECKPOINT))
            at_checkpoint = time.monotonic()
            nbdcopy(server.uri, snapshot)
            b0_at_checkpoint = req_one_dirty(server.socket, "b0", SIZE)
            writers.command("resume")
            time.sleep(WINDOW)
            journal = writers.stop()
        finally:
            writers.kill()
        b0 = req_one_dirty(server.socket, "b0", SIZE)
        assert b0 == b0_at_checkpoint, "b0 changed after it was disabled: " + \
            describe_difference(b0, b0_at_checkpoint)
        before = [w for w in journal if w[1] < at_checkpoint]
        after = [w for w in journal if w[0] > at_checkpoint]
        assert len(before) + len(after) == len(journal) and before and after
        assert dirty_blocks(b0) == written(before), exactly("b0", dirty_blocks(b0), written(before))

        rebuilt = tmp_path / "rebuilt.raw"
        shutil.copy(backup, rebuilt)
        with open(snapshot, "rb") as source, open(rebuilt, "r+b") as target:
            for start, end in b0:
                source.seek(start)
                target.seek(start)
                target.write(source.read(end - start))
        assert 0 < total(b0) < SIZE
        assert rebuilt.read_bytes() == snapshot.read_bytes(), "full backup + b0's extents != the checkpoint"

        b1 = req_one_dirty(server.socket, "b1", SIZE)
        assert dirty_blocks(b1) == written(after), exactly("b1", dirty_blocks(b1), written(after))
        copied = int(libnbd_script(COPY_RANGES, server.socket, str(rebuilt), json.dumps(b1)).stdout)
        assert copied == total(b1)
        final = tmp_path / "final.raw"
        nbdcopy(server.uri, final)
    assert rebuilt.read_bytes() == final.read_bytes(), "checkpoint + b1's extents != the live image"
