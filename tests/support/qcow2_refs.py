"""The refcount side of a qcow2 file, read and edited with plain ``struct`` code (not
pynbd's), and the QEMU tools that make and judge dirty images: the oracle of
tests/test_qcow2_repair.py.

* :func:`lazy_session` runs qemu-io on an image created with ``lazy_refcounts=on`` and
  has it kill itself (``sigraise 9``), so the dirty bit stays set and the refcounts on
  disk lag behind (qcow2 spec, 'Header', incompatible bit 0);
* :func:`refcounts`, :func:`refcount_clusters`, :func:`set_refcount` read and write the
  refcount table and blocks entry by entry (qcow2 spec, 'Host cluster management');
* :func:`check` is ``qemu-img check`` and requires a clean result (exit 0: no
  corruption, no leaks).

Every function runs on the calling (test) thread; a tool failure raises AssertionError
with its output.
"""

from __future__ import annotations

import json
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

TOOL_TIMEOUT = 120


def tool(*argv: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
    argv_s = [str(a) for a in argv]
    proc = subprocess.run(argv_s, capture_output=True, text=True, timeout=TOOL_TIMEOUT, stdin=subprocess.DEVNULL)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv_s)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def lazy_session(image: Path, commands: list[str]) -> None:
    """qemu-io runs ``commands`` on ``image`` and then kills itself with SIGKILL: what it
    wrote stays, the refcount updates that lazy refcounts delayed are lost, the dirty
    bit stays set. Fails unless every command ran (qemu-io stops at a failing one)."""
    argv = ["qemu-io", "-f", "qcow2"]
    for command in [*commands, "sigraise 9"]:
        argv += ["-c", command]
    proc = tool(*argv, image, check=False)
    assert proc.returncode == -9, f"qemu-io did not reach sigraise 9 ({proc.returncode}):\n{proc.stdout}{proc.stderr}"


def check(image: Path) -> dict:
    """``qemu-img check`` must find nothing (exit 0); returns its JSON report."""
    proc = tool("qemu-img", "check", "--output=json", image, check=False)
    assert proc.returncode == 0, f"qemu-img check {image}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout)


def dirty_flag(image: Path) -> bool:
    """QEMU's view of incompatible bit 0 (``qemu-img info``), which must agree with the header byte."""
    info = json.loads(tool("qemu-img", "info", "-U", "--output=json", image).stdout)
    header_bit = bool(Geometry.read(image).incompatible & 1)
    assert info.get("dirty-flag", False) == header_bit
    return header_bit


@dataclass(frozen=True)
class Geometry:
    """The header fields the refcount structure depends on (qcow2 spec, 'Header')."""

    cluster_bits: int
    l1_offset: int
    reftable_offset: int
    reftable_clusters: int
    incompatible: int
    refcount_order: int

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def width(self) -> int:
        return 1 << self.refcount_order

    @property
    def per_block(self) -> int:
        return self.cluster_size * 8 // self.width

    @classmethod
    def read(cls, image: Path) -> Geometry:
        head = _pread(image, 0, 112)
        version, = struct.unpack_from(">I", head, 4)
        cluster_bits, = struct.unpack_from(">I", head, 20)
        l1_offset, reftable, clusters = struct.unpack_from(">QQI", head, 40)
        incompatible, order = (struct.unpack_from(">Q", head, 72)[0], struct.unpack_from(">I", head, 96)[0]) \
            if version == 3 else (0, 4)
        return cls(cluster_bits, l1_offset, reftable, clusters, incompatible, order)


def _pread(image: Path, offset: int, length: int) -> bytes:
    """``length`` bytes at ``offset``, zeros past the end of the file (images may be huge and sparse)."""
    with open(image, "rb") as f:
        f.seek(offset)
        return f.read(length).ljust(length, b"\0")


def _table(image: Path, geo: Geometry) -> list[int]:
    raw = _pread(image, geo.reftable_offset, geo.reftable_clusters * geo.cluster_size)
    return list(struct.unpack(f">{len(raw) // 8}Q", raw))


def dangling_refcount_blocks(image: Path) -> list[int]:
    """Refcount table slots whose block (or the table itself: slot -1) is not inside the file."""
    geo = Geometry.read(image)
    size = image.stat().st_size
    out = [-1] if geo.reftable_offset + geo.reftable_clusters * geo.cluster_size > size else []
    return out + [slot for slot, entry in enumerate(_table(image, geo)) if entry and entry + geo.cluster_size > size]


def _entry_position(geo: Geometry, k: int) -> tuple[int, int]:
    """(byte, shift) of entry ``k`` in a block: entries of 8 bits or more are big-endian
    integers; narrower ones are packed from the least significant bit of each byte."""
    bit = k * geo.width
    return bit // 8, bit % 8


def _get(block: bytes, geo: Geometry, k: int) -> int:
    byte, shift = _entry_position(geo, k)
    if geo.width >= 8:
        return int.from_bytes(block[byte:byte + geo.width // 8], "big")
    return (block[byte] >> shift) & ((1 << geo.width) - 1)


def refcounts(image: Path) -> dict[int, int]:
    """Cluster index -> refcount, for every cluster whose refcount is not 0."""
    geo = Geometry.read(image)
    out = {}
    for slot, entry in enumerate(_table(image, geo)):
        if not entry:
            continue
        block = _pread(image, entry, geo.cluster_size)
        for k in range(geo.per_block):
            value = _get(block, geo, k)
            if value:
                out[slot * geo.per_block + k] = value
    return out


def refcount_clusters(image: Path) -> set[int]:
    """The clusters of the refcount table and blocks."""
    geo = Geometry.read(image)
    first = geo.reftable_offset >> geo.cluster_bits
    return {*range(first, first + geo.reftable_clusters),
            *(entry >> geo.cluster_bits for entry in _table(image, geo) if entry)}


def set_refcount(image: Path, cluster: int, value: int) -> None:
    """Write ``value`` as cluster ``cluster``'s refcount; its block must exist."""
    geo = Geometry.read(image)
    slot, k = divmod(cluster, geo.per_block)
    block_offset = _table(image, geo)[slot]
    assert block_offset, f"{image}: no refcount block for cluster {cluster}"
    byte, shift = _entry_position(geo, k)
    with open(image, "r+b") as f:
        if geo.width >= 8:
            f.seek(block_offset + byte)
            f.write(value.to_bytes(geo.width // 8, "big"))
        else:
            mask = ((1 << geo.width) - 1) << shift
            old = _pread(image, block_offset + byte, 1)[0]
            f.seek(block_offset + byte)
            f.write(bytes([(old & ~mask) | (value << shift)]))


def write_u64(image: Path, offset: int, value: int) -> None:
    with open(image, "r+b") as f:
        f.seek(offset)
        f.write(struct.pack(">Q", value))


def read_u64(image: Path, offset: int) -> int:
    return struct.unpack(">Q", _pread(image, offset, 8))[0]


def l2_entry_offset(image: Path, guest: int) -> int:
    """Where the L2 entry (standard, 8 bytes) of guest offset ``guest`` lies; its L2 table must exist."""
    geo = Geometry.read(image)
    l2_bits = geo.cluster_bits - 3
    l1_entry = read_u64(image, geo.l1_offset + 8 * (guest >> (geo.cluster_bits + l2_bits)))
    table = l1_entry & 0x00FFFFFFFFFFFE00
    assert table, f"{image}: no L2 table for guest offset {guest:#x}"
    return table + 8 * ((guest >> geo.cluster_bits) & ((1 << l2_bits) - 1))
