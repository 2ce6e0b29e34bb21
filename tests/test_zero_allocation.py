"""WRITE_ZEROES (with and without NO_HOLE, with FAST_ZERO) and TRIM: what the export maps
and what the host file keeps allocated, with qemu-nbd 7.2 as the oracle.

pynbd and ``qemu-nbd --discard=unmap`` serve two copies of one raw image (data, a
fragmented stretch, a hole), a real client (libnbd with explicit command flags, or
qemu-io through QEMU's nbd driver) sends both the same requests, and then:

* every request has the same outcome on both (FAST_ZERO: both succeed or both ENOTSUP);
* ``nbdinfo --map`` (before the FLUSH: pynbd answers from lseek; after it: from FIEMAP
  past its first 16 runs) and ``qemu-img map`` of both exports are the same, and the same
  as ``qemu-img map`` of each host file;
* the host files have the same allocation: the same SEEK_DATA/SEEK_HOLE runs, the same
  state of every block by FIEMAP (hole / unwritten / written; the extents' boundaries and
  physical places may differ, the state of a block may not), ``st_blocks`` equal up to the
  file system's extent-tree blocks;
* both files hold the content of a model built here (initial patterns, zeroed ranges);
* on each file, checked independently of the other server: a NO_HOLE range leaves every
  block it touches that was allocated allocated (zeroed as an unwritten extent or written
  zeros: never a hole); a WRITE_ZEROES without NO_HOLE, or a TRIM, leaves a hole in every
  block wholly inside its range and keeps the partly covered edge blocks allocated (zeros
  written in place). That is qemu-nbd's strategy with ``--discard=unmap`` (fallocate
  PUNCH_HOLE of the range, ZERO_RANGE for NO_HOLE) and the tolerance: nothing finer than
  a block is compared, and "allocated" includes unwritten extents, which ext4 and xfs
  report as holes to SEEK_DATA (so a NO_HOLE range maps as ``hole,zero`` on both servers:
  the map alone cannot tell NO_HOLE from a punched hole, the host allocation can).

qemu-nbd keeps ``--detect-zeroes`` off (its default): pynbd has no such option, and with
it qemu-nbd would turn WRITEs of zero bytes into holes where pynbd writes them.
The file system must have FIEMAP (ext4, xfs, btrfs); without it the test skips (an allowed
skip, tests/support/skips.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import KiB, MiB, copy_sparse
from tests.support.hostfile import HOLE, block_states, seek_runs
from tests.support.servers import (
    libnbd_script,
    make_raw_image,
    merge_map,
    merge_qemu_map,
    nbdinfo_map,
    qemu_img_map_argv,
    qemu_io,
    run,
)

pytestmark = [pytest.mark.pynbd, pytest.mark.interop,
              pytest.mark.needs("qemu-nbd", "qemu-img", "qemu-io", "nbdinfo"),
              pytest.mark.timeout(120)]

BLOCK = 4 * KiB
SIZE = 4 * MiB

# The image: a fragmented start (32 x 8 KiB of data then an 8 KiB hole: 64 runs, so that
# pynbd's block status past its first 16 runs comes from FIEMAP once flushed), data from
# 512 KiB to 3 MiB, a hole to 3.5 MiB, data to the end. (pattern, offset, length)
INITIAL = tuple((0x10 + i, i * 16 * KiB, 8 * KiB) for i in range(32)) + (
    (0x5A, 512 * KiB, 3 * MiB - 512 * KiB),
    (0x5B, 3584 * KiB, 512 * KiB),
)


@dataclass(frozen=True)
class Op:
    """One request: WRITE_ZEROES (``zero``) or TRIM (``trim``) of [offset, offset+length)."""

    kind: str
    offset: int
    length: int
    no_hole: bool = False
    fast: bool = False

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def may_punch(self) -> bool:
        return self.kind == "trim" or not self.no_hole


# Requests on disjoint ranges, at least a block apart (each one's effect on the host file
# is checked alone), aligned and not, inside data, over the data/hole edge, up to EOF.
OPS = (
    Op("zero", 640 * KiB, 64 * KiB, no_hole=True),                 # aligned
    Op("zero", 800_000, 50_000, no_hole=True),                     # partial blocks at both ends
    Op("zero", 1 * MiB, 256 * KiB),                                # may punch, aligned
    Op("zero", 1_441_000, 70_000),                                 # may punch, unaligned
    Op("zero", 2 * MiB, 64 * KiB, no_hole=True, fast=True),        # FAST_ZERO, NO_HOLE
    Op("zero", 2_200_000, 60_000, fast=True),                      # FAST_ZERO, may punch
    Op("trim", 2560 * KiB, 128 * KiB),                             # aligned
    Op("trim", 2_850_000, 10_000),                                 # two whole blocks inside
    Op("zero", 3 * MiB - 8 * KiB, 24 * KiB, no_hole=True),         # over the data/hole edge
    Op("trim", 3_300_000, 100_000),                                # inside the hole: nothing
    Op("zero", SIZE - 5000, 5000, no_hole=True),                   # up to EOF, unaligned
    Op("zero", 96 * KiB, 40 * KiB),                                # over fragments and holes
)

def blocks_inside(op: Op) -> range:
    """The blocks wholly inside the request's range."""
    return range(-(-op.offset // BLOCK), op.end // BLOCK)


def blocks_touched(op: Op) -> range:
    """Every block the request's range touches (wholly or partly)."""
    return range(op.offset // BLOCK, -(-op.end // BLOCK))


# --------------------------------------------------------------------------
# The model, the image, the clients
# --------------------------------------------------------------------------


def expected_content() -> bytes:
    """The image's bytes after OPS, from INITIAL and OPS alone."""
    data = bytearray(SIZE)
    for pattern, offset, length in INITIAL:
        data[offset:offset + length] = bytes([pattern]) * length
    for op in OPS:
        data[op.offset:op.end] = bytes(op.length)
    return bytes(data)


def make_image(tmp_path: Path) -> Path:
    return make_raw_image(tmp_path / "base.img", SIZE,
                          [f"write -P {p:#x} {o} {n}" for p, o, n in INITIAL])


LIBNBD_SEQUENCE = r"""
import json, sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
out = []
for kind, offset, length, no_hole, fast in json.loads(sys.argv[2]):
    flags = (nbd.CMD_FLAG_NO_HOLE if no_hole else 0) | (nbd.CMD_FLAG_FAST_ZERO if fast else 0)
    try:
        if kind == "zero":
            h.zero(length, offset, flags)
        else:
            h.trim(length, offset)
        out.append("ok")
    except nbd.Error as e:
        out.append(e.errno or e.string)
h.shutdown()
print(json.dumps(out))
"""

LIBNBD_FLUSH = r"""
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.flush()
h.shutdown()
"""


def send_libnbd(uri: str) -> list[str]:
    """OPS with libnbd, the command flags set explicitly; "ok" or the errno name each."""
    ops = [[op.kind, op.offset, op.length, op.no_hole, op.fast] for op in OPS]
    return json.loads(libnbd_script(LIBNBD_SEQUENCE, uri, json.dumps(ops)).stdout)


def qemu_io_command(op: Op) -> str:
    """QEMU's nbd driver sends NO_HOLE unless the write may unmap (-u, which the image
    opened with discard=unmap lets through), FAST_ZERO for -n; discard is TRIM."""
    if op.kind == "trim":
        return f"discard {op.offset} {op.length}"
    flags = ("" if op.no_hole else " -u") + (" -n" if op.fast else "")
    return f"write -z{flags} {op.offset} {op.length}"


_QEMU_IO_RESULT = re.compile(r"^(?:(?:wrote|discard) (\d+)/\d+ bytes at offset (\d+)"
                             r"|(?:write|discard) failed: (.*))$", re.M)


def send_qemu_io(uri: str) -> list[str]:
    """OPS with qemu-io over NBD (-d unmap: else QEMU drops discards and never unmaps)."""
    # (qemu-io exits 1 when a command failed: the outcomes are read from its output)
    out = qemu_io(uri, *map(qemu_io_command, OPS), extra=("-d", "unmap"), check=False).stdout
    results = []
    for match in _QEMU_IO_RESULT.finditer(out):
        if match.group(3) is not None:
            results.append("ENOTSUP" if "not supported" in match.group(3) else match.group(3))
        else:
            results.append("ok")
    assert len(results) == len(OPS), out
    return results


def flush(uri: str, client: str) -> None:
    if client == "libnbd":
        libnbd_script(LIBNBD_FLUSH, uri)
    else:
        out = qemu_io(uri, "flush").stdout
        assert "failed" not in out, out


def nbd_map(uri: str) -> list[tuple[int, int, int]]:
    """base:allocation of the export by nbdinfo, equal neighbours merged."""
    return merge_map(nbdinfo_map(uri, "base:allocation"), SIZE)


def qemu_map(target: list[str]) -> list:
    """``qemu-img map --output=json`` of the export or file, equal neighbours merged."""
    return merge_qemu_map(json.loads(run(target).stdout), SIZE)


# --------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------


@pytest.mark.parametrize("client", [
    pytest.param("libnbd", marks=pytest.mark.needs("libnbd-python")), "qemu-io"])
def test_zero_and_trim_allocation_like_qemu_nbd(launch, tmp_path, client):
    """The same WRITE_ZEROES/TRIM requests leave both servers' exports with the same map and
    their host files with the same allocation; NO_HOLE never leaves a hole where there was
    data; a zero that may punch, and TRIM, free the blocks inside and keep the edges."""
    base = make_image(tmp_path)
    before = block_states(base, BLOCK)
    p = launch.pynbd(copy_sparse(base, tmp_path / "pynbd.img"))
    q = launch.qemu(copy_sparse(base, tmp_path / "qemu.img"), "--discard=unmap")
    assert block_states(Path(p.image), BLOCK) == block_states(Path(q.image), BLOCK) == before

    send = send_libnbd if client == "libnbd" else send_qemu_io
    p_results, q_results = send(p.uri), send(q.uri)
    assert p_results == q_results
    for op, result in zip(OPS, q_results):
        assert result == "ok" or (op.fast and result == "ENOTSUP"), (op, result)

    # Unflushed (pynbd: lseek; qemu-io flushes when it closes the image, libnbd does not),
    # then flushed (pynbd: FIEMAP past the fragmented start).
    assert nbd_map(p.uri) == nbd_map(q.uri)
    for s in (p, q):
        flush(s.uri, client)
    p_map = nbd_map(p.uri)
    assert p_map == nbd_map(q.uri)
    assert len(p_map) > 16 * 2  # the flushed map reaches past pynbd's lseek prefix
    p_qmap = qemu_map(qemu_img_map_argv(p))
    assert p_qmap == qemu_map(qemu_img_map_argv(q))
    p.stop()
    q.stop()

    # Allocation before content: reading an unwritten extent caches its pages, and from
    # then on SEEK_DATA (so qemu-img map and both servers) reports it as data.
    files = {"pynbd": Path(p.image), "qemu-nbd": Path(q.image)}
    assert seek_runs(files["pynbd"]) == seek_runs(files["qemu-nbd"])
    for path in files.values():
        assert qemu_map(["qemu-img", "map", "--output=json", "-f", "raw", str(path)]) == p_qmap

    states = {name: block_states(path, BLOCK) for name, path in files.items()}
    for name, got in states.items():
        for op, result in zip(OPS, q_results):
            if result != "ok":
                continue
            if not op.may_punch:  # NO_HOLE: every block that had data still allocated
                lost = [b for b in blocks_touched(op) if before[b] != HOLE and got[b] == HOLE]
                assert not lost, f"{name}: {op} left holes at blocks {lost}"
            else:  # may punch: blocks wholly inside freed, partly covered edges kept
                kept = [b for b in blocks_inside(op) if got[b] != HOLE]
                assert not kept, f"{name}: {op} left blocks {kept} allocated"
                edges = {op.offset // BLOCK, (op.end - 1) // BLOCK} - set(blocks_inside(op))
                lost = [b for b in sorted(edges) if before[b] != HOLE and got[b] == HOLE]
                assert not lost, f"{name}: {op} freed the partly covered blocks {lost}"
        # nothing outside the requests changed state
        touched = {b for op in OPS for b in blocks_touched(op)}
        changed = [b for b in range(len(got)) if b not in touched and got[b] != before[b]]
        assert not changed, f"{name}: blocks {changed} changed outside the requests"
    assert states["pynbd"] == states["qemu-nbd"], [
        (b * BLOCK, s, t) for b, (s, t) in enumerate(zip(states["pynbd"], states["qemu-nbd"]))
        if s != t]
    # st_blocks also counts the file system's extent-tree blocks, which depend on how the
    # extents fell: equal within two blocks (a lost NO_HOLE range is 16 blocks or more).
    p_blocks, q_blocks = (path.stat().st_blocks * 512 for path in files.values())
    assert abs(p_blocks - q_blocks) <= 2 * BLOCK, (p_blocks, q_blocks)
    for path in files.values():
        assert path.read_bytes() == expected_content()
