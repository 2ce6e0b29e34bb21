"""Crash safety of the persistent dirty bitmaps: pynbd, serving a qcow2 image with
enabled and disabled bitmaps, is killed (SIGKILL) at a seeded moment while a client
writes; what is on disk afterwards must never lie.

The rule (qcow2 spec, "Bitmap directory": ``in_use`` marks a bitmap whose bits may be
stale): after the kill

* every disabled bitmap has the flags and bits it had before (``qemu-img info``,
  read-only ``qemu-nbd -B``);
* every enabled bitmap is either flagged in use, or not in use and dirty over the
  granules of every request the client saw acknowledged (WRITE, WRITE_ZEROES, TRIM),
  with every bit it had before; never valid-looking with a written range clean;
* when the last thing that happened was a completed FLUSH (no change after it), every
  enabled bitmap is valid (not in use) and holds exactly its old bits plus the
  granules of the acknowledged changes: a FLUSH stores the bits;
* ``qemu-img check`` finds no corruption (leaked clusters at most);
* pynbd serving the image again leaves the in-use bitmaps out, with a warning naming
  each, and serves the others' bits as qemu-nbd does.

The client (tests/support/nbdclient.py) keeps a journal of the acknowledged requests.
Each seed picks the image (cluster size, granularities), a number of random requests
(ranges straddling granules; FLUSH now and then) and one of four ends: the kill right
after a completed FLUSH, right after an acknowledged change, with changes in flight,
or with a FLUSH in flight.
"""

from __future__ import annotations

import json
import random
import signal
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.bitmaps import (
    BitmapSpec,
    BitmapState,
    bitmap_states,
    create_image,
    describe_difference,
    expected_dirty,
    granules,
    pick_change_range,
    qemu_nbd_dirty,
    served_contexts,
    served_dirty,
    uncovered,
    union,
)
from tests.support.nbdclient import CMD_FLAG_NO_HOLE, CMD_FLUSH, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, NbdClient
from tests.support.qcow2_writes import run_tool
from tests.support.servers import PynbdServer

pytestmark = [pytest.mark.pynbd, pytest.mark.needs("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"),
              pytest.mark.timeout(120)]

KiB, MiB = 1 << 10, 1 << 20
SIZE = 32 * MiB + 512  # the last granule of every bitmap is short

AFTER_FLUSH, AFTER_CHANGE, CHANGES_IN_FLIGHT, FLUSH_IN_FLIGHT = (
    "after a completed flush", "after an acknowledged change", "changes in flight", "flush in flight")
ENDS = (AFTER_FLUSH, AFTER_CHANGE, CHANGES_IN_FLIGHT, FLUSH_IN_FLIGHT)
SEEDS = range(16)  # seed % 4 picks the end: four runs of each


@dataclass
class Journal:
    """What the client saw acknowledged: the ranges changed, and whether a completed
    FLUSH came after the last change sent (acknowledged or not)."""

    acknowledged: list[tuple[int, int]] = field(default_factory=list)
    flushed: bool = True


def build_image(directory: Path, rng: random.Random) -> Path:
    """32 MiB (+512) with two enabled and two disabled bitmaps, each holding bits
    before pynbd opens it; cluster size and granularities from ``rng``."""
    specs = (BitmapSpec("on-small", rng.choice((512, 4 * KiB, 16 * KiB))),
             BitmapSpec("on-big", rng.choice((64 * KiB, MiB, 4 * MiB))),
             BitmapSpec("off", 64 * KiB, enabled=False),
             BitmapSpec("off-512", 512, enabled=False))
    return create_image(directory / "disk.qcow2", SIZE, cluster=rng.choice((4 * KiB, 64 * KiB)), bitmaps=specs,
                        recorded_by_all=("write -P 1 0 100k", "write -P 2 20M 3k"),
                        recorded_by_enabled=("write -P 3 9M 1M",))


def random_change(client: NbdClient, rng: random.Random, units: tuple[int, ...]) -> tuple[int, int, int]:
    """Send one random WRITE, WRITE_ZEROES (NO_HOLE or not) or TRIM; returns (cookie,
    start, end)."""
    kind = rng.choice((CMD_WRITE, CMD_WRITE, CMD_WRITE_ZEROES, CMD_TRIM))
    start, end = pick_change_range(rng, SIZE, units, 256 * KiB if kind == CMD_WRITE else 2 * MiB)
    if kind == CMD_WRITE:
        cookie = client.send_request(CMD_WRITE, start, payload=bytes([rng.randrange(1, 256)]) * (end - start))
    else:
        flags = CMD_FLAG_NO_HOLE if kind == CMD_WRITE_ZEROES and rng.random() < 0.5 else 0
        cookie = client.send_request(kind, start, end - start, flags)
    return cookie, start, end


def drive_and_kill(server: PynbdServer, rng: random.Random, end: str, units: tuple[int, ...]) -> Journal:
    """The client's requests (module docstring), then SIGKILL at ``end``; returns the
    journal of what was acknowledged."""
    journal = Journal()
    client = NbdClient.connect(server)
    in_flight: dict[int, tuple[int, int]] = {}

    def send_change() -> None:
        cookie, start, stop = random_change(client, rng, units)
        in_flight[cookie] = (start, stop)
        journal.flushed = False

    def acknowledge() -> None:
        reply = client.read_reply()
        assert reply.error == 0, reply
        journal.acknowledged.append(in_flight.pop(reply.cookie))

    def flush() -> None:
        assert client.request(CMD_FLUSH).error == 0
        journal.flushed = True

    try:
        for _ in range(rng.randrange(5, 50)):
            if rng.random() < 0.12:
                flush()
            else:
                send_change()
                acknowledge()
        if end == AFTER_FLUSH:
            flush()
        elif end == AFTER_CHANGE:
            send_change()
            acknowledge()
        elif end == CHANGES_IN_FLIGHT:
            # Some answered (and journaled), the rest still in flight at the kill.
            count = rng.randrange(1, 8)
            for _ in range(count):
                send_change()
            for _ in range(rng.randrange(0, count)):
                acknowledge()
        else:
            send_change()
            client.send_request(CMD_FLUSH)
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(10)
    finally:
        client.close()
    return journal


@pytest.mark.parametrize("seed", SEEDS)
def test_sigkill_leaves_bitmaps_valid_or_in_use(tmp_path, seed):
    rng = random.Random(seed)
    end = ENDS[seed % len(ENDS)]
    image = build_image(tmp_path, rng)
    states = bitmap_states(image)
    names = sorted(states)
    initial = qemu_nbd_dirty(image, names, SIZE)
    units = tuple(sorted({512, *(s.granularity for s in states.values())}))
    server = PynbdServer(image, "-f", "qcow2", workdir=tmp_path)
    server.expected_exit_codes = (-signal.SIGKILL,)
    try:
        journal = drive_and_kill(server, rng, end, units)
    finally:
        server.stop(check=False)
    where = f"seed {seed} ({end}, {len(journal.acknowledged)} changes acknowledged)"

    check = run_tool(["qemu-img", "check", "--output=json", image.name], cwd=tmp_path, check=False)
    assert check.returncode in (0, 3), f"{where}: qemu-img check:\n{check.stdout}{check.stderr}"
    report = json.loads(check.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("check-errors", 0) == 0, f"{where}: {report}"

    after = bitmap_states(image)
    assert sorted(after) == names, f"{where}: bitmaps {sorted(after)}, before {names}"
    valid = [n for n in names if not after[n].in_use]
    for name in names:
        if states[name].enabled:
            assert after[name] in (states[name], BitmapState(tuple(sorted((*states[name].flags, "in-use"))),
                                                             states[name].granularity)), \
                f"{where}: {name} was {states[name]}, now {after[name]}"
        else:
            assert after[name] == states[name], f"{where}: disabled {name} was {states[name]}, now {after[name]}"
    if journal.flushed:
        assert valid == names, f"{where}: in use after a completed FLUSH and nothing since: {after}"
    bits = qemu_nbd_dirty(image, valid, SIZE)
    for name in valid:
        spec = states[name]
        if not spec.enabled:
            assert bits[name] == initial[name], \
                f"{where}: disabled {name} changed: {describe_difference(bits[name], initial[name])}"
            continue
        needed = union(initial[name], granules(journal.acknowledged, spec.granularity, SIZE))
        missing = uncovered(needed, bits[name])
        assert not missing, (f"{where}: {name} is not in use but clean where it was dirty or an "
                             f"acknowledged change went: {missing[:4]}")
        if journal.flushed:
            exact = expected_dirty(initial[name], journal.acknowledged, spec, SIZE)
            assert bits[name] == exact, f"{where}: {name} after FLUSH: {describe_difference(bits[name], exact)}"

    # pynbd serving it again: the in-use ones left out (named in a warning), the others as qemu-nbd serves them.
    with PynbdServer(image, "-f", "qcow2", "--read-only", workdir=tmp_path) as again:
        contexts = served_contexts(again.uri)
        served = {name: served_dirty(again.uri, name, SIZE) for name in valid}
        log = again.log()
    assert sorted(c.removeprefix("qemu:dirty-bitmap:") for c in contexts
                  if c.startswith("qemu:dirty-bitmap:")) == valid, f"{where}: {contexts}"
    for name in set(names) - set(valid):
        assert any("WARNING" in line and f"'{name}'" in line for line in log.splitlines()), \
            f"{where}: no warning names the in-use bitmap {name}:\n{log}"
    assert served == bits, f"{where}: pynbd serves other bits than qemu-nbd -B"

