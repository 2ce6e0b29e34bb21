"""The qcow2 write conformance harness (tests/test_qcow2_writes.py): a fixture's geometry
(by ``qemu-img info``) and copies of it with its backing chain and data file,
deterministic qemu-io command lists, and the comparisons of the two images two servers
left, with their rules:

* **content**: equal byte for byte, except in *trimmed* ranges (discarded and not written
  or zeroed since), where the NBD spec ("NBD_CMD_TRIM") leaves the content unspecified:
  there the subject may read what the oracle reads, or zeros (and nothing else: never
  stale or foreign data);
* **allocation** (``qemu-img map --output=json`` of each image file, neighbours with equal
  states merged): each byte's :class:`MapState` (data, zero, depth, host cluster) equal,
  with two leeways (:class:`Leeway`), both about ranges that read zeros either way:

  - in trimmed ranges only "no data where the oracle has none" is required (how a trimmed
    range is represented, a zero flag or a freed cluster, is the server's choice);
  - *zeroed, allocated*: a zeroing unit (cluster; subcluster with extended L2) zeroed
    partly, or on an image without the zero flag (v2) zeroed with NO_HOLE, may be a data
    cluster of zeros where QEMU has no host cluster, and stay allocated (a data or a
    zero-flag cluster with its host cluster) through later NO_HOLE zeroings. QEMU
    zero-flags a partly zeroed unit when the rest already reads zeros, and frees a v2
    cluster even under NO_HOLE; writing the zeros is as correct (and keeps NO_HOLE).

  ``present`` is not compared (an unallocated cluster without a backing file and a
  zero-flag cluster both read zeros from the metadata: same data, zero and depth), nor
  host offsets (allocation order). Where QEMU marks a data cluster zero too (its
  preallocation heuristic: the host range is a hole in the file), the zero flag is
  dropped: the qcow2 state is "data" either way.

Every function runs on the calling (test) thread; tools are run with a deadline and a
failure raises AssertionError with the tool's output.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import math
import random
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

TOOL_TIMEOUT = 120

Range = tuple[int, int]  # [start, end)


def run_tool(argv: Sequence[str | Path], *, cwd: Path | None = None, check: bool = True,
             timeout: float = TOOL_TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run a tool and capture its text output; with ``check``, a non-zero exit raises
    AssertionError with the command and everything it printed."""
    argv = [str(a) for a in argv]
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(argv)}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


# --- Fixtures: geometry and copies -------------------------------------------------------


@dataclass(frozen=True)
class Geometry:
    """What a command list needs to know about a qcow2 fixture (from ``qemu-img info``)."""

    image: str                       # the top image's file name
    size: int                        # virtual size
    cluster: int
    backing_ends: tuple[int, ...]    # virtual sizes of backing layers shorter than the image
    files: tuple[str, ...]           # every file of the fixture: top, backing chain, data file
    data_file: str | None            # the top image's external data file, if any
    layout_edges: tuple[int, ...] = ()  # where the fixture's map changes (data, zero, depth)
    extended_l2: bool = False
    zero_flag: bool = True           # qcow2 v3 (v2 has no zero flag)

    @property
    def sub_unit(self) -> int:
        """cluster/32: the subcluster size of an extended-L2 image, and a boundary every
        image's writes should straddle too."""
        return max(self.cluster // 32, 1)

    @property
    def zero_unit(self) -> int:
        """What one L2 entry (or extended-L2 bit) can mark zero: the subcluster or cluster."""
        return self.sub_unit if self.extended_l2 else self.cluster


def probe_geometry(image: Path) -> Geometry:
    """The geometry of ``image`` and the files it is made of, by ``qemu-img info -U
    --backing-chain`` and ``qemu-img map`` run in the image's directory (QEMU opens a
    relative external data file name relative to its working directory)."""
    chain = json.loads(run_tool(["qemu-img", "info", "-U", "--backing-chain", "--output=json",
                                 image.name], cwd=image.parent).stdout)
    top = chain[0]
    data = top.get("format-specific", {}).get("data", {})
    data_file = data.get("data-file")
    files = [layer["filename"] for layer in chain] + ([data_file] if data_file else [])
    size = top["virtual-size"]
    ends = sorted({layer["virtual-size"] for layer in chain[1:] if layer["virtual-size"] < size})
    extents = run_tool(["qemu-img", "map", "-U", "--output=json", image.name], cwd=image.parent).stdout
    edges = sorted({e["start"] for e in json.loads(extents)} - {0})
    return Geometry(image=image.name, size=size, cluster=top["cluster-size"],
                    backing_ends=tuple(ends), files=tuple(files), data_file=data_file,
                    layout_edges=tuple(e for e in edges if e < size),
                    extended_l2=bool(data.get("extended-l2")), zero_flag=data.get("compat") != "0.10")


def copy_fixture(geometry: Geometry, src_dir: Path, dst_dir: Path) -> Path:
    """Copy the fixture's files (sparse) into ``dst_dir`` under the same relative names, so
    the copy's backing and data file names resolve to the copy's own files; returns the
    copied top image."""
    dst_dir.mkdir(parents=True, exist_ok=True)
    for name in geometry.files:
        (dst_dir / name).parent.mkdir(parents=True, exist_ok=True)
        run_tool(["cp", "--sparse=always", src_dir / name, dst_dir / name])
    return dst_dir / geometry.image


def build_extl2_64k(directory: Path) -> Path:
    """An extended-L2 image with 64 KiB clusters (2 KiB subclusters), 6 MiB, over a raw
    backing file of 3 MiB + 1536 bytes (its end inside a subcluster), with allocated,
    zeroed and untouched subclusters; returns the image. Built with qemu-img and qemu-io
    like the recipes of tests/qcow2_fixtures.py."""
    directory.mkdir(parents=True, exist_ok=True)
    base, image = "extl2-64k-base.raw", "extl2-64k.qcow2"
    with open(directory / base, "wb") as f:
        f.truncate(3 * 1024 * 1024 + 1536)
    run_tool(["qemu-io", "-f", "raw", "-c", "write -P 0xb5 0 3M", "-c", "write -P 0xb6 3M 1536",
              base], cwd=directory)
    run_tool(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k",
              "-b", base, "-F", "raw", image, "6M"], cwd=directory)
    writes = ("write -P 0x51 0 2k", "write -P 0x52 5k 3k", "write -z 64k 8k", "write -z 128k 64k",
              "write -P 0x53 200k 100k", "write -z -u 256k 2k", "discard 320k 64k",
              "write -P 0x54 3070k 10k", "write -z 3M 2k", "write -P 0x55 5M 64k")
    run_tool(["qemu-io", "-f", "qcow2", *(a for w in writes for a in ("-c", w)), image], cwd=directory)
    return directory / image


def file_digests(directory: Path, names: Iterable[str]) -> dict[str, str]:
    """sha256 of each named file (to show that backing files stayed untouched)."""
    return {name: hashlib.sha256((directory / name).read_bytes()).hexdigest() for name in names}


def image_opts(directory: Path, geometry: Geometry) -> str:
    """``--image-opts`` of the fixture copy in ``directory``: the data file named
    explicitly, so one qemu-img can open two copies whose data files have the same
    relative name."""
    opts = f"driver=qcow2,file.driver=file,file.filename={directory / geometry.image}"
    if geometry.data_file:
        opts += f",data-file.driver=file,data-file.filename={directory / geometry.data_file}"
    return opts


# --- Command lists -----------------------------------------------------------------------

DATA, ZERO, TRIM, NONE = "data", "zero", "trim", "none"


@dataclass(frozen=True)
class IoCommand:
    """One qemu-io command and what it does to [offset, offset+length): writes data
    (DATA), zeroes (ZERO), discards (TRIM) or nothing (NONE: flushes)."""

    text: str
    effect: str = NONE
    offset: int = 0
    length: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length

    @property
    def no_hole(self) -> bool:
        """A zeroing without ``-u``: NBD_CMD_WRITE_ZEROES with NO_HOLE."""
        return self.effect == ZERO and "-u" not in self.text.split()


def parse_command(text: str) -> IoCommand:
    """The :class:`IoCommand` of a qemu-io command line of the kinds the lists use (sizes in
    bytes)."""
    words = text.split()
    if words[0] in ("flush", "aio_flush"):
        return IoCommand(text)
    effect = TRIM if words[0] == "discard" else (ZERO if "-z" in words else DATA)
    return IoCommand(text, effect, int(words[-2]), int(words[-1]))


def _log_uniform(rng: random.Random, low: int, high: int) -> int:
    """An integer in [low, high], log-uniformly: small sizes as likely as large ones."""
    return min(high, max(low, int(math.exp(rng.uniform(math.log(low), math.log(high + 1))))))


def pick_boundary(geometry: Geometry, rng: random.Random) -> int:
    """A boundary worth straddling: a cluster or cluster/32 edge, the end of a shorter
    backing layer, an edge of the fixture's own layout (so that requests reach into its
    data, zero, compressed and unallocated clusters), the end of the image."""
    kind = rng.choice(("cluster", "cluster", "sub", "backing", "layout", "layout", "end"))
    if kind == "backing" and geometry.backing_ends:
        return rng.choice(geometry.backing_ends)
    if kind == "layout" and geometry.layout_edges:
        return rng.choice(geometry.layout_edges)
    if kind == "end":
        return geometry.size
    unit = geometry.cluster if kind == "cluster" else geometry.sub_unit
    return rng.randrange(1, max(geometry.size // unit, 2)) * unit


def pick_range(geometry: Geometry, rng: random.Random) -> Range:
    """A request range inside the image: 1 byte to 3 clusters, aligned or not, often
    straddling a boundary of :func:`pick_boundary` or ending at the image's last byte."""
    size, cluster = geometry.size, geometry.cluster
    longest = min(3 * cluster, size)
    style = rng.choice(("tiny", "sectors", "clusters", "subclusters", "straddle", "straddle",
                        "straddle", "any"))
    if style == "tiny":
        length = rng.randint(1, 511)
        start = rng.randrange(0, size - length + 1)
    elif style in ("sectors", "clusters", "subclusters"):
        unit = {"sectors": 512, "clusters": cluster, "subclusters": geometry.sub_unit}[style]
        length = min(rng.randint(1, max(longest // unit, 1)) * unit, size)
        start = rng.randrange(0, (size - length) // unit + 1) * unit
    elif style == "straddle":
        edge = pick_boundary(geometry, rng)
        before = rng.randint(1, min(edge, longest))
        after = rng.randint(0, min(size - edge, longest - before))
        start, length = edge - before, before + after
    else:
        length = _log_uniform(rng, 1, longest)
        start = rng.randrange(0, size - length + 1)
    return start, start + min(length, size - start)


def _aio_batch(geometry: Geometry, rng: random.Random) -> list[IoCommand]:
    """2-6 ``aio_write``s in flight at once on disjoint byte ranges of the same one or two
    clusters (requests racing for one cluster's allocation), then ``aio_flush``."""
    window = min(2 * geometry.cluster, geometry.size)
    base = rng.randrange(0, (geometry.size - window) // geometry.cluster + 1) * geometry.cluster
    cuts = sorted(rng.sample(range(1, window), k=min(rng.randint(4, 12), window - 1)))
    pieces = [(base + a, base + b) for a, b in zip([0, *cuts], [*cuts, window])]
    chosen = rng.sample(pieces[::2], k=min(rng.randint(2, 6), len(pieces[::2])))
    # Data only: QEMU 7.2, the oracle, loses races between zeroing and writing in one
    # cluster (a zeroing that may unmap frees the zero-flagged host cluster a concurrent
    # write then links back: refcount 0, referenced; with a raw external data file a
    # partial zeroing zeroes the whole cluster under a concurrent write).
    return [*(parse_command(f"aio_write -P {rng.randrange(1, 256)} {a} {b - a}") for a, b in chosen),
            IoCommand("aio_flush")]


def generate_commands(geometry: Geometry, seed: int, count: int) -> list[IoCommand]:
    """``count`` qemu-io commands (aio batches count as one), the same for the same
    geometry and seed: data writes (some FUA: ``-f``; some of zero bytes: written as
    data), zeroes that must stay allocated (``write -z``, NBD_CMD_WRITE_ZEROES with
    NO_HOLE) or may be punched (``-u``), discards, flushes and aio batches."""
    rng = random.Random(seed)
    ops = ("write",) * 9 + ("fua",) * 2 + ("zero",) * 3 + ("unmap",) * 3 + ("trim",) * 3 + (
        "flush", "aio", "aio")
    commands: list[IoCommand] = []
    for _ in range(count):
        op = rng.choice(ops)
        if op == "flush":
            commands.append(IoCommand("flush"))
            continue
        if op == "aio":
            commands.extend(_aio_batch(geometry, rng))
            continue
        start, end = pick_range(geometry, rng)
        if op in ("write", "fua"):
            pattern = 0 if rng.random() < 0.05 else rng.randrange(1, 256)
            text = f"write {'-f ' if op == 'fua' else ''}-P {pattern}"
        elif op in ("zero", "unmap"):
            text = "write -z -u" if op == "unmap" else ("write -z -f" if rng.random() < 0.2 else "write -z")
        else:
            text = "discard"
        commands.append(parse_command(f"{text} {start} {end - start}"))
    return commands


# --- Range sets and the trimmed ranges of a list -----------------------------------------


def add_range(ranges: list[Range], start: int, end: int) -> list[Range]:
    """``ranges`` (sorted, disjoint, not touching) with [start, end) added, merged."""
    if start >= end:
        return list(ranges)
    out: list[Range] = []
    for a, b in ranges:
        if b < start or a > end:
            out.append((a, b))
        else:
            start, end = min(a, start), max(b, end)
    out.append((start, end))
    return sorted(out)


def remove_range(ranges: list[Range], start: int, end: int) -> list[Range]:
    """``ranges`` (sorted, disjoint) without [start, end)."""
    if start >= end:
        return list(ranges)
    out: list[Range] = []
    for a, b in ranges:
        if b <= start or a >= end:
            out.append((a, b))
            continue
        if a < start:
            out.append((a, start))
        if b > end:
            out.append((end, b))
    return out


def trimmed_ranges(commands: Iterable[IoCommand]) -> list[Range]:
    """The ranges discarded by a list and not written or zeroed after (in list order: the
    commands of one aio batch are disjoint, so their order does not matter)."""
    ranges: list[Range] = []
    for command in commands:
        if command.effect == TRIM:
            ranges = add_range(ranges, command.offset, command.end)
        elif command.effect in (DATA, ZERO):
            ranges = remove_range(ranges, command.offset, command.end)
    return ranges


def zeroed_allocated(commands: Iterable[IoCommand], geometry: Geometry) -> list[Range]:
    """The zeroing units (:attr:`Geometry.zero_unit`, clipped to the virtual size) where
    the subject may hold a host cluster reading zeros and the oracle none (module
    docstring). A partial zeroing, or without the zero flag a NO_HOLE one, puts a unit in;
    a NO_HOLE zeroing of the whole unit keeps it (what is allocated stays so); a data
    write (data on both sides), a zeroing that may trim the whole unit and a discard of
    its whole cluster (QEMU ignores the rest) take it out."""
    unit, size = geometry.zero_unit, geometry.size
    units: set[int] = set()
    for command in commands:
        if command.effect == NONE:
            continue
        for u in range(command.offset // unit, -(-command.end // unit)):
            start, end = u * unit, min((u + 1) * unit, size)
            whole = command.offset <= start and end <= command.end
            if command.effect == TRIM:
                cluster = start // geometry.cluster * geometry.cluster
                if command.offset <= cluster and min(cluster + geometry.cluster, size) <= command.end:
                    units.discard(u)
            elif command.effect == ZERO and (not whole or (command.no_hole and not geometry.zero_flag)):
                units.add(u)
            elif not (command.effect == ZERO and command.no_hole):
                units.discard(u)
    ranges: list[Range] = []
    for u in sorted(units):
        ranges = add_range(ranges, u * unit, min((u + 1) * unit, size))
    return ranges


@dataclass(frozen=True)
class Leeway:
    """Where the subject's map may differ from the oracle's (module docstring)."""

    trimmed: list[Range]
    zeroed_allocated: list[Range]


def leeway(commands: Sequence[IoCommand], geometry: Geometry) -> Leeway:
    return Leeway(trimmed_ranges(commands), zeroed_allocated(commands, geometry))


def covers(ranges: Sequence[Range], offset: int) -> bool:
    """``offset`` lies in one of ``ranges`` (sorted, disjoint)."""
    i = bisect.bisect_right(ranges, (offset, math.inf)) - 1
    return i >= 0 and ranges[i][0] <= offset < ranges[i][1]


# --- Sending a list ----------------------------------------------------------------------

_OUTCOME = re.compile(r"^(?:wrote|discard) \d+/\d+ bytes at offset \d+$|^\S+ failed: .*$", re.M)


def send_commands(socket_path: str, commands: Sequence[IoCommand]) -> list[str]:
    """Run the list in one qemu-io over one NBD connection to ``socket_path``; returns
    qemu-io's outcome lines ("wrote N/N bytes at offset X", "discard ...", "... failed:
    ..."), sorted (aio completions come in any order). ``-d unmap`` lets discards through
    as NBD_CMD_TRIM and ``write -z -u`` as WRITE_ZEROES without NO_HOLE (else QEMU drops
    discards and always sets NO_HOLE)."""
    argv = qemu_io_argv([c.text for c in commands], f"nbd+unix:///?socket={socket_path}")
    # qemu-io exits 1 when a command failed: the outcomes are read from its output.
    return sorted(_OUTCOME.findall(run_tool(argv, check=False).stdout))


def qemu_io_argv(commands: Iterable[str], uri: str) -> list[str]:
    """qemu-io running ``commands`` on the NBD export ``uri`` (``-d unmap``: see
    :func:`send_commands`)."""
    return ["qemu-io", "-f", "raw", "-d", "unmap", *(a for c in commands for a in ("-c", c)), uri]


# --- Allocation maps ---------------------------------------------------------------------


@dataclass(frozen=True)
class MapState:
    """What ``qemu-img map`` says of a byte: read from a data cluster, known zero from the
    metadata, the layer answering (0 = top), whether a host cluster backs it."""

    data: bool
    zero: bool
    depth: int
    host: bool

    def __str__(self) -> str:
        kind = "data" if self.data else ("zero" if self.zero else "backing")
        return f"{kind} depth={self.depth} {'host cluster' if self.host else 'no host cluster'}"


Extent = tuple[int, int, MapState]  # start, end, state


def map_state(entry: dict) -> MapState:
    """The compared state of one ``qemu-img map --output=json`` record (module docstring)."""
    return MapState(data=entry["data"], zero=entry["zero"] and not entry["data"],
                    depth=entry["depth"], host="offset" in entry)


def merge_extents(extents: Iterable[Extent]) -> list[Extent]:
    """Neighbours with equal states merged, empty extents dropped."""
    out: list[Extent] = []
    for start, end, state in extents:
        if start >= end:
            continue
        if out and out[-1][2] == state and out[-1][1] == start:
            out[-1] = (out[-1][0], end, state)
        else:
            out.append((start, end, state))
    return out


def allocation_map(directory: Path, geometry: Geometry) -> list[Extent]:
    """``qemu-img map --output=json`` of the fixture copy in ``directory``, as merged
    extents clipped to the virtual size."""
    out = run_tool(["qemu-img", "map", "--output=json", "--image-opts",
                    image_opts(directory, geometry)], cwd=directory).stdout
    return merge_extents((e["start"], min(e["start"] + e["length"], geometry.size), map_state(e))
                         for e in json.loads(out) if e["start"] < geometry.size)


ALLOCATED_ZEROS = (MapState(True, False, 0, True), MapState(False, True, 0, True))


def states_agree(subject: MapState, oracle: MapState, trimmed: bool, zeroed: bool) -> bool:
    """The comparison rule of one byte, in a trimmed range or not, in a zeroed unit that
    may stay allocated or not (module docstring)."""
    if subject == oracle or (trimmed and (oracle.data or not subject.data)):
        return True
    return zeroed and subject in ALLOCATED_ZEROS and not oracle.data and oracle.zero


@dataclass(frozen=True)
class MapMismatch:
    """A range where the two maps disagree under :func:`states_agree`."""

    start: int
    end: int
    subject: MapState
    oracle: MapState
    trimmed: bool
    zeroed: bool

    def __str__(self) -> str:
        where = ", ".join(["range", *["trimmed"] * self.trimmed,
                           *["zeroed, may stay allocated"] * self.zeroed])
        return (f"allocation differs at [{self.start:#x}, {self.end:#x}) ({where}): "
                f"subject {self.subject}, oracle {self.oracle}")


def _state_at(extents: Sequence[Extent], starts: Sequence[int], offset: int) -> MapState:
    i = bisect.bisect_right(starts, offset) - 1
    assert i >= 0 and offset < extents[i][1], f"map has no extent at {offset:#x}"
    return extents[i][2]


def map_mismatches(subject: Sequence[Extent], oracle: Sequence[Extent],
                   leeway: Leeway) -> list[MapMismatch]:
    """Every range where the subject's map breaks the rule against the oracle's (both maps
    cover the same bytes without gaps), in order, neighbours that differ alike merged."""
    edges = [p for ranges in (leeway.trimmed, leeway.zeroed_allocated) for r in ranges for p in r]
    cuts = sorted({0, *(p for e in (*subject, *oracle) for p in e[:2]), *edges})
    end = min(subject[-1][1], oracle[-1][1]) if subject and oracle else 0
    s_starts, o_starts = [e[0] for e in subject], [e[0] for e in oracle]
    found: list[MapMismatch] = []
    for a, b in zip(cuts, cuts[1:]):
        if a >= end:
            break
        s, o = _state_at(subject, s_starts, a), _state_at(oracle, o_starts, a)
        trimmed, zeroed = covers(leeway.trimmed, a), covers(leeway.zeroed_allocated, a)
        if states_agree(s, o, trimmed, zeroed):
            continue
        mismatch = MapMismatch(a, b, s, o, trimmed, zeroed)
        if found and found[-1].end == a and replace(found[-1], start=a, end=b) == mismatch:
            found[-1] = replace(found[-1], end=b)
        else:
            found.append(mismatch)
    return found


# --- Content -----------------------------------------------------------------------------


def first_content_mismatch(subject: bytes, oracle: bytes, base: int,
                           trimmed: Sequence[Range]) -> int | None:
    """The first offset (``base`` + index) where ``subject`` breaks the content rule against
    ``oracle`` (equal, or zero inside a trimmed range), or None."""
    if subject == oracle:
        return None
    for i, (s, o) in enumerate(zip(subject, oracle)):
        if s != o and not (s == 0 and covers(trimmed, base + i)):
            return base + i
    if len(subject) != len(oracle):
        return base + min(len(subject), len(oracle))
    return None


def content_mismatch(subject_dir: Path, oracle_dir: Path, geometry: Geometry,
                     trimmed: Sequence[Range], scratch: Path) -> str | None:
    """None when the two copies read the same (``qemu-img compare``), or differ only where
    the content rule allows; else the first offending offset with both sides' bytes."""
    compare = run_tool(["qemu-img", "compare", "--image-opts", image_opts(subject_dir, geometry),
                        image_opts(oracle_dir, geometry)], check=False)
    if compare.returncode == 0:
        return None
    if compare.returncode != 1:
        raise AssertionError(f"qemu-img compare failed:\n{compare.stdout}{compare.stderr}")
    raws = [scratch / "subject.raw", scratch / "oracle.raw"]
    for raw, directory in zip(raws, (subject_dir, oracle_dir)):
        run_tool(["qemu-img", "convert", "--image-opts", image_opts(directory, geometry), "-O", "raw", raw])
    chunk = 1 << 20
    with open(raws[0], "rb") as s, open(raws[1], "rb") as o:
        base = 0
        while True:
            a, b = s.read(chunk), o.read(chunk)
            if not a and not b:
                return None
            bad = first_content_mismatch(a, b, base, trimmed)
            if bad is not None:
                i = bad - base
                return (f"{compare.stdout.strip()} first disallowed difference at {bad:#x}: "
                        f"subject reads {a[i:i + 16].hex()}, oracle {b[i:i + 16].hex()}"
                        f"{' (trimmed range: zeros allowed)' if covers(trimmed, bad) else ''}")
            base += len(a)


def check_image(directory: Path, geometry: Geometry) -> subprocess.CompletedProcess[str]:
    """``qemu-img check`` of the fixture copy in ``directory`` (exit 0 = no errors, no leaks)."""
    return run_tool(["qemu-img", "check", "--image-opts", image_opts(directory, geometry)],
                    cwd=directory, check=False)
