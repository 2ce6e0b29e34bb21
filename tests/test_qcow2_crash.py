"""Crash safety of qcow2 writes: pynbd is killed (SIGKILL) at a random moment during
mixed writes; afterwards `qemu-img check` finds no corruption (leaked clusters at
most) and everything acknowledged before a completed FLUSH reads back.

Each run writes disjoint regions (so what a region may hold after the crash is known
exactly): a WRITE of the region's own pattern, sometimes followed by WRITE_ZEROES or
TRIM of it. A region whose last change was a WRITE or WRITE_ZEROES acknowledged before
a FLUSH that completed must hold that change; any other region (a change not flushed
may be torn between clusters, and TRIM leaves partial clusters as they were) holds only
its own pattern's words and zeros, never another region's bytes. Seeds differ per run; the kill comes after a random
number of requests, with some still in flight.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess

import pytest

from tests.support.nbdclient import CMD_FLUSH, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, NbdClient
from tests.support.servers import PynbdServer, run

KiB = 1024
MiB = 1024 * KiB
SIZE = 32 * MiB
REGION = 96 * KiB  # not a multiple of the cluster: partial clusters on both sides

pytestmark = [pytest.mark.pynbd, pytest.mark.needs("qemu-img"), pytest.mark.timeout(120)]


def _pattern(region: int, length: int) -> bytes:
    return (region.to_bytes(4, "big") + b"\xA5" * 4) * (length // 8)


@pytest.mark.parametrize("seed", range(12))
def test_sigkill_during_mixed_writes_leaves_a_consistent_image(tmp_path, seed):
    rng = random.Random(seed)
    image = tmp_path / "disk.qcow2"
    cluster = rng.choice([4 * KiB, 64 * KiB])
    run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}", str(image), str(SIZE)])
    regions = list(range(SIZE // REGION))
    rng.shuffle(regions)
    # The regions written, and the state a region must be in: its last change, once a
    # FLUSH completed after that change was acknowledged (and nothing changed it since).
    possible: set[int] = set()
    must: dict[int, bytes] = {}
    acknowledged: dict[int, bytes] = {}  # region -> its last acknowledged state
    trimmed: set[int] = set()
    steps = rng.randrange(20, 120)
    zeros = bytes(REGION)
    with PynbdServer(image) as server:
        c = NbdClient.connect(server)
        used = 0
        for step in range(steps):
            choice = rng.random()
            if choice < 0.1:
                assert c.request(CMD_FLUSH).error == 0
                must.update(acknowledged)
                continue
            if choice < 0.3 and set(acknowledged) - trimmed:
                region = rng.choice(sorted(set(acknowledged) - trimmed))
                command = rng.choice([CMD_TRIM, CMD_WRITE_ZEROES])
                must.pop(region, None)  # (now the flushed state or this one)
                assert c.request(command, region * REGION, REGION).error == 0
                if command == CMD_TRIM:
                    trimmed.add(region)
                    acknowledged.pop(region)
                else:
                    acknowledged[region] = zeros
                continue
            region = regions[used]
            used += 1
            data = _pattern(region, REGION)
            possible.add(region)
            assert c.request(CMD_WRITE, region * REGION, payload=data).error == 0
            acknowledged[region] = data
        # Requests in flight at the kill: they may or may not have happened.
        for _ in range(rng.randrange(0, 6)):
            region = regions[used]
            used += 1
            data = _pattern(region, REGION)
            possible.add(region)
            c.send_request(CMD_WRITE, region * REGION, payload=data)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
        server.expected_exit_codes = (-signal.SIGKILL,)
        c.close()

    check = subprocess.run(["qemu-img", "check", "--output=json", str(image)], capture_output=True, text=True)
    assert check.returncode in (0, 3), check.stdout + check.stderr  # 3: leaked clusters only
    report = json.loads(check.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("check-errors", 0) == 0, report
    raw = tmp_path / "disk.raw"
    run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw)])
    content = raw.read_bytes()
    for region in range(SIZE // REGION):
        got = content[region * REGION:(region + 1) * REGION]
        if region in must:
            assert got == must[region], f"seed {seed}: region {region} lost a flushed change"
        elif region in possible:
            # Not flushed (or trimmed): each cluster holds one of the states the region
            # went through - a write not flushed may be torn between clusters.
            word = _pattern(region, 8)
            assert all(got[i:i + 8] in (word, bytes(8)) for i in range(0, REGION, 8)), \
                f"seed {seed}: region {region} holds something else"
        else:
            assert got == zeros, f"seed {seed}: region {region} was never written"
