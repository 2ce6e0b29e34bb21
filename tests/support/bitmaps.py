"""Persistent dirty bitmaps seen from outside pynbd, for the bitmap tests
(tests/test_bitmap_recording.py, test_bitmap_backup.py, test_bitmap_crash.py):

* images with bitmaps made by qemu-img and qemu-io (:func:`create_image`), their
  directory as ``qemu-img info`` shows it (:func:`bitmap_states`);
* a bitmap's dirty ranges as a server serves them: ``nbdinfo --map=qemu:dirty-bitmap:NAME``
  (:func:`served_dirty`) and QEMU's REQ_ONE walk, ``qemu-img map`` with ``x-dirty-bitmap``,
  where dirty reads as ``"data": false`` (:func:`req_one_dirty`); the bits on disk as
  read-only qemu-nbd ``-B NAME`` serves them, the oracle (:func:`qemu_nbd_dirty`);
* the model: a WRITE, WRITE_ZEROES or TRIM dirties every granule its range touches
  in every enabled bitmap, nothing else changes a bitmap (:func:`expected_dirty`);
* seeded qemu-io change lists whose ranges straddle granules of every size, clusters
  and the image's end (:func:`generate_changes`);
* a libnbd client that writes and at once asks block status (:data:`WRITE_THEN_MAP`),
  and a sparse source file for nbdcopy (:func:`sparse_source`, :func:`file_data_ranges`).

Dirty sets are lists of ``[start, end)`` ranges in guest bytes, sorted, disjoint and not
touching, clipped to the virtual size (a granule that runs past the end counts up to it).

Every function runs on the calling (test) thread; a tool that fails raises
AssertionError with its output.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.qcow2_writes import DATA, NONE, TRIM, ZERO, IoCommand, add_range, parse_command, run_tool
from tests.support.servers import PynbdServer, QemuNbdServer, merge_map, nbdinfo_map

Range = tuple[int, int]  # [start, end)

KiB, MiB = 1 << 10, 1 << 20

NBD_STATE_DIRTY = 1  # NBD spec, "Metadata contexts": qemu:dirty-bitmap, bit 0


@dataclass(frozen=True)
class BitmapSpec:
    """A bitmap to create: its name, granularity in bytes, and whether it records
    (flag ``auto``) once the image is built."""

    name: str
    granularity: int
    enabled: bool = True


@dataclass(frozen=True)
class BitmapState:
    """A bitmap's directory entry as ``qemu-img info`` shows it."""

    flags: tuple[str, ...]
    granularity: int

    @property
    def in_use(self) -> bool:
        return "in-use" in self.flags

    @property
    def enabled(self) -> bool:
        return "auto" in self.flags


def create_image(path: Path, size: int, *, cluster: int, bitmaps: Sequence[BitmapSpec],
                 backing: Path | None = None, backing_fmt: str = "qcow2",
                 recorded_by_all: Sequence[str] = (), recorded_by_enabled: Sequence[str] = ()) -> Path:
    """A qcow2 image at ``path`` (``backing`` named relative to its directory) with
    ``bitmaps`` added in order, then the qemu-io commands ``recorded_by_all`` (dirtying
    every bitmap), then the disabled ones disabled, then ``recorded_by_enabled`` (dirtying
    the enabled ones only): so disabled bitmaps hold bits of their own. Returns ``path``."""
    cwd = path.parent
    create = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster}"]
    if backing is not None:
        create += ["-b", backing.name, "-F", backing_fmt]
    run_tool([*create, path.name, str(size)], cwd=cwd)
    for spec in bitmaps:
        run_tool(["qemu-img", "bitmap", "--add", "-g", str(spec.granularity), path.name, spec.name], cwd=cwd)
    qemu_io_local(path, recorded_by_all)
    for spec in bitmaps:
        if not spec.enabled:
            run_tool(["qemu-img", "bitmap", "--disable", path.name, spec.name], cwd=cwd)
    qemu_io_local(path, recorded_by_enabled)
    return path


def qemu_io_local(image: Path, commands: Sequence[str]) -> None:
    """Run qemu-io ``commands`` on the qcow2 file ``image`` itself (QEMU records them in
    the image's enabled bitmaps)."""
    if commands:
        run_tool(["qemu-io", "-f", "qcow2", *(a for c in commands for a in ("-c", c)), image.name],
                 cwd=image.parent)


def bitmap_states(image: Path) -> dict[str, BitmapState]:
    """Every bitmap of ``image`` (not of its backing files) by name, from ``qemu-img info
    -U`` (it may be open elsewhere)."""
    info = json.loads(run_tool(["qemu-img", "info", "-U", "--output=json", image.name],
                               cwd=image.parent).stdout)
    entries = info.get("format-specific", {}).get("data", {}).get("bitmaps", [])
    return {e["name"]: BitmapState(tuple(sorted(e["flags"])), e["granularity"]) for e in entries}


# --- Range sets ------------------------------------------------------------------------


def union(*sets: Iterable[Range]) -> list[Range]:
    """The union of range sets, merged (touching ranges join)."""
    out: list[Range] = []
    for ranges in sets:
        for start, end in ranges:
            out = add_range(out, start, end)
    return out


def granules(ranges: Iterable[Range], granularity: int, size: int) -> list[Range]:
    """The granules ``ranges`` touch, as ranges clipped to ``size``."""
    return union((start // granularity * granularity, min(-(-end // granularity) * granularity, size))
                 for start, end in ranges if end > start)


def total(ranges: Iterable[Range]) -> int:
    return sum(end - start for start, end in ranges)


def uncovered(needed: Iterable[Range], have: Sequence[Range]) -> list[Range]:
    """The parts of ``needed`` that ``have`` does not cover."""
    missing: list[Range] = []
    for start, end in needed:
        pos = start
        for a, b in have:
            if b <= pos or a >= end:
                continue
            if a > pos:
                missing.append((pos, a))
            pos = max(pos, b)
        if pos < end:
            missing.append((pos, end))
    return union(missing)


def describe_difference(got: Sequence[Range], want: Sequence[Range], limit: int = 4) -> str:
    """Where two dirty sets differ: the ranges dirty in only one of them, first few."""
    extra, missing = uncovered(got, want), uncovered(want, got)
    return (f"dirty but should be clean: {[(hex(a), hex(b)) for a, b in extra[:limit]]}"
            f"{' ...' if len(extra) > limit else ''}; clean but should be dirty: "
            f"{[(hex(a), hex(b)) for a, b in missing[:limit]]}{' ...' if len(missing) > limit else ''}")


# --- The model -----------------------------------------------------------------------


def changed_ranges(commands: Iterable[IoCommand]) -> list[Range]:
    """What a list of changes touches: its writes, zeroings and discards."""
    return [(c.offset, c.end) for c in commands if c.effect in (DATA, ZERO, TRIM)]


def expected_dirty(initial: Sequence[Range], changes: Iterable[Range], spec: BitmapState | BitmapSpec,
                   size: int) -> list[Range]:
    """The bits of a bitmap that held ``initial`` once ``changes`` were made: every granule
    they touch added if it records, nothing otherwise."""
    if not spec.enabled:
        return list(initial)
    return union(initial, granules(changes, spec.granularity, size))


# --- Reading bits ----------------------------------------------------------------------


def context(name: str) -> str:
    return f"qemu:dirty-bitmap:{name}"


def served_dirty(uri: str, name: str, size: int) -> list[Range]:
    """The dirty ranges of bitmap ``name`` as the server at ``uri`` serves them (nbdinfo,
    block status without REQ_ONE)."""
    rows = merge_map(nbdinfo_map(uri, context(name)), size)
    covered = sum(length for _, length, _ in rows)
    assert covered == size, f"the map of {context(name)} covers {covered} of {size} bytes: {rows[:8]}"
    return union((off, off + length) for off, length, value in rows if value & NBD_STATE_DIRTY)


def req_one_dirty(socket_path: str, name: str, size: int) -> list[Range]:
    """The dirty ranges of bitmap ``name`` by QEMU's nbd driver (one extent per request,
    REQ_ONE): ``qemu-img map`` with ``x-dirty-bitmap``, which reports a dirty extent as
    ``"data": false``."""
    opts = (f"driver=nbd,server.type=unix,server.path={socket_path},"
            f"x-dirty-bitmap={context(name)}")
    entries = json.loads(run_tool(["qemu-img", "map", "--output=json", "--image-opts", opts]).stdout)
    return union((e["start"], min(e["start"] + e["length"], size)) for e in entries
                 if not e["data"] and e["start"] < size)


def served_contexts(uri: str) -> list[str]:
    """The metadata contexts an export offers (nbdinfo's LIST_META_CONTEXT answer)."""
    info = json.loads(run_tool(["nbdinfo", "--json", uri]).stdout)
    return list(info["exports"][0].get("contexts", []))


def serve_writable(kind: str, image: Path, bitmaps: Sequence[str], *extra: str) -> PynbdServer | QemuNbdServer:
    """``kind`` ("pynbd" or "qemu-nbd") serving ``image`` writable on a socket in its
    directory: pynbd as it is (it exports every valid bitmap itself), qemu-nbd with
    ``--discard=unmap`` (else TRIM never reaches the image, nor its bitmaps) and ``-B``
    for each of ``bitmaps``; ``extra`` arguments last."""
    if kind == "pynbd":
        return PynbdServer(image, "-f", "qcow2", *extra, workdir=image.parent)
    args = ["--discard=unmap", *(a for name in bitmaps for a in ("-B", name)), *extra]
    return QemuNbdServer(image, *args, fmt="qcow2", workdir=image.parent)


@contextmanager
def qemu_nbd_reader(image: Path, names: Sequence[str]) -> Iterator[QemuNbdServer]:
    """Read-only qemu-nbd serving ``image`` with ``-B NAME`` for each of ``names`` (none
    may be in use: qemu-nbd refuses those), on a socket in the image's directory."""
    args = ["-r", *(a for n in names for a in ("-B", n))]
    server = QemuNbdServer(image, *args, fmt="qcow2", workdir=image.parent)
    try:
        yield server
    finally:
        server.stop(check=False)


def qemu_nbd_dirty(image: Path, names: Sequence[str], size: int) -> dict[str, list[Range]]:
    """The bits of ``names`` on disk, as read-only qemu-nbd ``-B`` serves them."""
    if not names:
        return {}
    with qemu_nbd_reader(image, names) as server:
        return {name: served_dirty(server.uri, name, size) for name in names}


# --- Change lists --------------------------------------------------------------------

#: Longest data write and longest zeroing or discard of a list.
MAX_WRITE = 1 << 20
MAX_ZERO = 8 << 20


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    """An integer in [low, high], log-uniformly (small as likely as large)."""
    if high <= low:
        return low
    return min(high, max(low, int(math.exp(rng.uniform(math.log(low), math.log(high + 1))))))


def pick_change_range(rng: random.Random, size: int, units: Sequence[int], longest: int) -> Range:
    """A range of 1 byte to ``longest`` inside the image, shaped against a unit of
    ``units`` (granularities, the cluster size, 512): straddling one of its edges, exactly
    covering whole units, inside one unit without touching its edges, or ending at the
    image's last byte."""
    unit = rng.choice(units)
    style = rng.choice(("straddle", "straddle", "straddle", "exact", "inside", "end"))
    if style == "exact" and unit <= longest and unit <= size:
        count = rng.randint(1, max(1, min(longest // unit, 3)))
        start = rng.randrange(0, size // unit) * unit
        return start, min(start + count * unit, size)
    if style == "inside" and unit >= 4:
        start = rng.randrange(0, max(size // unit, 1)) * unit
        end_of_unit = min(start + unit, size)
        a = rng.randrange(start + 1, end_of_unit - 1)
        b = rng.randrange(a + 1, min(end_of_unit, a + longest + 1))
        return a, b
    if style == "end":
        length = _log_uniform(rng, 1, min(longest, size))
        return size - length, size
    edge = min(rng.randint(1, max(size // unit, 1)) * unit, size)
    before = _log_uniform(rng, 1, min(edge, longest))
    after = _log_uniform(rng, 1, max(1, min(size - edge, longest - before) + 1)) - 1
    return edge - before, edge + min(after, size - edge)


def generate_changes(size: int, units: Sequence[int], seed: int, count: int, *,
                     max_zero: int = MAX_ZERO) -> list[IoCommand]:
    """``count`` qemu-io commands, the same for the same arguments: data writes (some
    FUA, up to :data:`MAX_WRITE`), zeroings with NO_HOLE (``write -z``) and without
    (``-u``) and discards (up to ``max_zero``), and flushes, each range from
    :func:`pick_change_range`."""
    rng = random.Random(seed)
    kinds = ("write",) * 5 + ("fua", "zero", "zero", "unmap", "unmap", "trim", "trim", "trim", "flush")
    commands: list[IoCommand] = []
    for _ in range(count):
        kind = rng.choice(kinds)
        if kind == "flush":
            commands.append(IoCommand("flush", NONE))
            continue
        longest = MAX_WRITE if kind in ("write", "fua") else max_zero
        start, end = pick_change_range(rng, size, units, longest)
        verb = {"write": f"write -P {rng.randrange(1, 256)}", "fua": f"write -f -P {rng.randrange(1, 256)}",
                "zero": "write -z", "unmap": "write -z -u", "trim": "discard"}[kind]
        commands.append(parse_command(f"{verb} {start} {end - start}"))
    return commands


# --- Clients ---------------------------------------------------------------------------

#: A libnbd client (run by :func:`tests.support.servers.libnbd_script`; arguments: socket,
#: bitmap name, image size, granularity, seed, request count) that writes, zeroes (with
#: and without NO_HOLE) or trims a random range on one connection and asks block status
#: of its granules at once, on that connection and on a second one that mapped them just
#: before; both connections first walk the whole image, and every 25 requests the second
#: walks it again and compares with the granules written (the image starts clean). Prints
#: JSON: ``failures`` (what was seen clean, by which connection) and ``fresh`` (requests
#: that hit a granule clean before).
WRITE_THEN_MAP = r'''
import json, random, sys
import nbd

sock, name = sys.argv[1], sys.argv[2]
size, granularity, seed, count = (int(a) for a in sys.argv[3:7])
ctx = "qemu:dirty-bitmap:" + name


def connect():
    h = nbd.NBD()
    h.add_meta_context(ctx)
    h.connect_unix(sock)
    assert h.can_meta_context(ctx), ctx
    return h


def extents(h, offset, length):
    """(start, end, dirty) over [offset, offset+length), in as many requests as needed."""
    out, pos, end = [], offset, offset + length
    while pos < end:
        got = []

        def cb(meta, off, entries, err):
            if meta == ctx:
                got.extend(entries)
            return 0

        h.block_status(end - pos, pos, cb)
        assert got, ("no extents", pos)
        for i in range(0, len(got), 2):
            stop = min(pos + got[i], end)
            out.append((pos, stop, bool(got[i + 1] & 1)))
            pos = stop
            if pos >= end:
                break
    return out


rng = random.Random(seed)
writer, watcher = connect(), connect()
for h in (writer, watcher):
    extents(h, 0, size)  # whole-image walks: whatever the server keeps or makes ahead
dirty = set()  # granule indexes (the image starts clean)
failures, fresh = [], 0
for step in range(count):
    length = rng.randint(1, 3 * granularity)
    offset = rng.randrange(0, size - length + 1)
    first, last = offset // granularity, -(-(offset + length) // granularity)
    start, end = first * granularity, min(last * granularity, size)
    before = extents(watcher, start, end - start)  # the watcher looked first
    fresh += any(not d for _, _, d in before)
    op = rng.choice(("write", "zero", "zero-no-hole", "trim"))
    if op == "write":
        writer.pwrite(bytes([step % 255 + 1]) * length, offset)
    elif op == "trim":
        writer.trim(length, offset)
    else:
        writer.zero(length, offset, nbd.CMD_FLAG_NO_HOLE if op == "zero-no-hole" else 0)
    dirty.update(range(first, last))
    for who, h in (("same connection", writer), ("other connection", watcher)):
        clean = [(a, b) for a, b, d in extents(h, start, end - start) if not d]
        if clean:
            failures.append({"step": step, "op": op, "offset": offset, "length": length,
                             "seen by": who, "clean": clean})
    if step % 25 == 24:  # the rest of the image too: nothing else turned dirty or clean
        seen = set()
        for a, b, d in extents(watcher, 0, size):
            if d:
                seen.update(range(a // granularity, -(-b // granularity)))
        if seen != dirty:
            failures.append({"step": step, "whole image": "differs",
                             "dirty, not written": sorted(seen - dirty)[:5],
                             "written, clean": sorted(dirty - seen)[:5]})
for h in (writer, watcher):
    h.shutdown()
print(json.dumps({"failures": failures, "fresh": fresh}))
'''


def file_data_ranges(path: Path) -> list[Range]:
    """The data ranges of a file by SEEK_DATA/SEEK_HOLE: what nbdcopy reads as data
    (whole file system blocks)."""
    ranges = []
    with open(path, "rb") as f:
        fd, end, pos = f.fileno(), os.fstat(f.fileno()).st_size, 0
        while pos < end:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            pos = os.lseek(fd, start, os.SEEK_HOLE)
            ranges.append((start, pos))
    return ranges


def sparse_source(path: Path, size: int, seed: int) -> list[Range]:
    """A sparse raw file with, in every 128 MiB (nbdcopy's work unit per connection),
    runs of random bytes with 4 KiB blocks of zeros inside; returns the ranges holding
    non-zero bytes."""
    rng = random.Random(seed)
    nonzero = []
    with open(path, "wb") as f:
        f.truncate(size)
        for unit in range(0, size, 128 * MiB):
            for _ in range(12):
                length = rng.randrange(1, 48) * 4 * KiB + rng.randrange(1, 4 * KiB)
                offset = unit + rng.randrange(0, min(128 * MiB, size - unit) - length)
                data = bytearray(rng.randbytes(length).replace(b"\0", b"\1"))
                holes = {rng.randrange(0, length // (4 * KiB)) for _ in range(length // (32 * KiB))}
                for block in holes:
                    data[block * 4 * KiB:(block + 1) * 4 * KiB] = bytes(4 * KiB)
                f.seek(offset)
                f.write(data)
                pos = offset
                for block in sorted(holes):
                    if offset + block * 4 * KiB > pos:
                        nonzero.append((pos, offset + block * 4 * KiB))
                    pos = offset + (block + 1) * 4 * KiB
                if pos < offset + length:
                    nonzero.append((pos, offset + length))
    return union(nonzero)
