"""qcow2 header, header extensions and snapshot table: parsing and validation.

Everything here is pure parsing of bytes read from the image file; nothing is
allocated in proportion to a size field before that field has been checked
against the file size and QEMU 7.2's implementation limits (qcow2 spec,
'Header'). Every problem is reported as one :class:`~pynbd.image.base.ImageError` line that
names the image and the offending field.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass, field

from pynbd.image.base import ImageError

log = logging.getLogger(__name__)

MAGIC = b"QFI\xfb"

# qcow2 spec, 'Header': the fixed header (v2 part is 72 bytes, v3 adds 32).
_V2_HEADER = struct.Struct(">4sIQIIQIIQQIIQ")
_V3_EXTRA = struct.Struct(">QQQII")
V2_HEADER_LENGTH = 72
V3_MIN_HEADER_LENGTH = 104

# qcow2 spec, 'Header': incompatible feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
INCOMPAT_DATA_FILE = 1 << 2
INCOMPAT_COMPRESSION = 1 << 3
INCOMPAT_EXTL2 = 1 << 4
INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2
# Compatible bits.
COMPAT_LAZY_REFCOUNTS = 1 << 0
# Autoclear bits.
AUTOCLEAR_BITMAPS = 1 << 0
AUTOCLEAR_DATA_FILE_RAW = 1 << 1

# qcow2 spec, 'Header extensions': extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_FDE = 0x0537BE77
EXT_DATA_FILE = 0x44415441

COMPRESSION_ZLIB = 0
COMPRESSION_ZSTD = 1

# QEMU 7.2's implementation limits.
MIN_CLUSTER_BITS = 9
MAX_CLUSTER_BITS = 21
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MAX_BACKING_NAME = 1023
MAX_SNAPSHOTS = 65536
MAX_SNAPSHOT_EXTRA = 1024
MAX_SNAPSHOT_TABLE_BYTES = 64 << 20

_SNAPSHOT_ENTRY = struct.Struct(">QIHHIIQII")
#: qcow2 spec, 'Snapshots': the icount of a snapshot taken without one.
_ICOUNT_UNSET = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class BitmapsExtension:
    """The bitmaps header extension (qcow2 spec, 'Bitmaps extension')."""

    nb_bitmaps: int
    directory_size: int
    directory_offset: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """One internal snapshot table entry (qcow2 spec, 'Snapshots'); parsed for information only."""

    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    vm_state_size: int
    disk_size: int | None
    date_sec: int = 0
    date_nsec: int = 0
    vm_clock_nsec: int = 0
    #: The instruction counter (extra data), None when the entry has none or it is unset.
    icount: int | None = None
    #: Bytes the entry takes in the table, padding included.
    entry_bytes: int = 0


@dataclass(slots=True)
class Qcow2Header:
    """The validated fields of a qcow2 header and its extensions."""

    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V2_HEADER_LENGTH
    compression_type: int = COMPRESSION_ZLIB
    backing_file: str | None = None
    backing_format: str | None = None
    data_file: str | None = None
    bitmaps_ext: BitmapsExtension | None = None
    unknown_extensions: list[int] = field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_EXTL2)

    @property
    def has_data_file(self) -> bool:
        return bool(self.incompatible_features & INCOMPAT_DATA_FILE)

    @property
    def data_file_raw(self) -> bool:
        return bool(self.autoclear_features & AUTOCLEAR_DATA_FILE_RAW)

    @property
    def l2_entry_size(self) -> int:
        return 16 if self.extended_l2 else 8

    @property
    def l2_entries(self) -> int:
        """Entries per L2 table (qcow2 spec, 'Cluster mapping')."""
        return self.cluster_size // self.l2_entry_size

    @property
    def l1_needed(self) -> int:
        """L1 entries needed to map ``size`` (qcow2 spec, 'Cluster mapping')."""
        span = self.cluster_size * self.l2_entries
        return -(-self.size // span)


class _Checker:
    """Builds the one-line error messages, so every check reads the same."""

    def __init__(self, path: str, file_size: int) -> None:
        self.path = path
        self.file_size = file_size

    def fail(self, what: str) -> ImageError:
        return ImageError(f"{self.path}: {what}")

    def field(self, name: str, value: int, problem: str) -> ImageError:
        return self.fail(f"header field {name}={value:#x} {problem}")

    def aligned(self, name: str, value: int, cluster_size: int) -> None:
        if value % cluster_size:
            raise self.field(name, value, f"is not aligned to the cluster size ({cluster_size})")

    def inside(self, name: str, offset: int, length: int) -> None:
        """``[offset, offset+length)`` must lie inside the file."""
        if offset >= self.file_size:
            raise self.field(name, offset, "is past the end of the file")
        if offset + length > self.file_size:
            raise self.field(name, offset,
                             f"+ {length} bytes extends past the end of the file ({self.file_size} bytes)")


def pread_exact(fd: int, length: int, offset: int, path: str, what: str) -> bytes:
    """``pread`` that raises ImageError naming ``what`` on a short read or an error."""
    try:
        data = os.pread(fd, length, offset)
    except OSError as exc:
        raise ImageError(f"{path}: cannot read {what} at {offset:#x}: {exc.strerror}") from None
    if len(data) != length:
        raise ImageError(f"{path}: {what} at {offset:#x} is truncated ({len(data)} of {length} bytes)")
    return data


def parse_header(path: str, fd: int, file_size: int) -> Qcow2Header:
    """Read, parse and validate the header of the qcow2 file open as ``fd``."""
    chk = _Checker(path, file_size)
    if file_size < V2_HEADER_LENGTH:
        raise chk.fail(f"file is too short for a qcow2 header ({file_size} bytes)")
    head = pread_exact(fd, min(file_size, 1 << MAX_CLUSTER_BITS), 0, path, "header")
    (magic, version, backing_file_offset, backing_file_size, cluster_bits, size, crypt_method,
     l1_size, l1_table_offset, refcount_table_offset, refcount_table_clusters,
     nb_snapshots, snapshots_offset) = _V2_HEADER.unpack_from(head)
    if magic != MAGIC:
        raise chk.fail(f"header field magic={magic.hex()} is not a qcow2 magic (514649fb)")
    if version not in (2, 3):
        raise chk.field("version", version, "is not supported (only 2 and 3)")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise chk.field("cluster_bits", cluster_bits, f"is outside {MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}")
    cs = 1 << cluster_bits
    hdr = Qcow2Header(
        version=version, cluster_bits=cluster_bits, size=size, l1_size=l1_size,
        l1_table_offset=l1_table_offset, refcount_table_offset=refcount_table_offset,
        refcount_table_clusters=refcount_table_clusters, nb_snapshots=nb_snapshots,
        snapshots_offset=snapshots_offset,
    )
    cluster0 = head[:cs]
    if version == 3:
        if len(cluster0) < V3_MIN_HEADER_LENGTH:
            raise chk.fail(f"file is too short for a qcow2 v3 header ({file_size} bytes)")
        (hdr.incompatible_features, hdr.compatible_features, hdr.autoclear_features,
         hdr.refcount_order, hdr.header_length) = _V3_EXTRA.unpack_from(cluster0, V2_HEADER_LENGTH)
        if hdr.header_length < V3_MIN_HEADER_LENGTH or hdr.header_length > cs or hdr.header_length % 8:
            raise chk.field("header_length", hdr.header_length, f"is invalid (must be 104..{cs}, a multiple of 8)")
        if hdr.header_length > V3_MIN_HEADER_LENGTH:
            hdr.compression_type = cluster0[104]  # qcow2 spec, 'Additional fields'
    _check_features(chk, hdr, crypt_method)
    _check_geometry(chk, hdr)
    ext_start = hdr.header_length
    ext_end = backing_file_offset if backing_file_offset else cs
    _parse_extensions(chk, hdr, cluster0, ext_start, min(ext_end, cs))
    if backing_file_offset:
        if backing_file_size > MAX_BACKING_NAME:
            raise chk.field("backing_file_size", backing_file_size, f"is larger than {MAX_BACKING_NAME}")
        if backing_file_offset + backing_file_size > cs:
            raise chk.field("backing_file_offset", backing_file_offset, "is outside the header cluster")
        raw_name = cluster0[backing_file_offset:backing_file_offset + backing_file_size]
        if len(raw_name) != backing_file_size:
            raise chk.field("backing_file_offset", backing_file_offset, "is past the end of the file")
        hdr.backing_file = _decode_name(chk, "backing file name", raw_name)
    if hdr.data_file_raw and hdr.backing_file:
        raise chk.fail("raw external data file (autoclear bit 1) together with a backing file is invalid")
    return hdr


def _check_features(chk: _Checker, hdr: Qcow2Header, crypt_method: int) -> None:
    """Feature bits (qcow2 spec, 'Header'): refuse what pynbd cannot serve."""
    unknown = hdr.incompatible_features & ~INCOMPAT_KNOWN
    if unknown:
        bits = ", ".join(str(b) for b in range(64) if unknown >> b & 1)
        raise chk.field("incompatible_features", hdr.incompatible_features, f"has unknown feature bit(s) {bits}")
    if hdr.incompatible_features & INCOMPAT_CORRUPT:
        # QEMU still reads such images read-only; pynbd refuses them outright,
        # because serving data QEMU flagged as inconsistent hides the problem.
        raise chk.field("incompatible_features", hdr.incompatible_features,
                        "has the corrupt bit set (run 'qemu-img check -r all')")
    if crypt_method != 0:
        raise chk.field("crypt_method", crypt_method, "is set: encrypted qcow2 images are not supported")
    if hdr.extended_l2 and hdr.cluster_bits < 14:
        raise chk.field("cluster_bits", hdr.cluster_bits, "is below 14, which extended L2 entries require")
    if hdr.compression_type not in (COMPRESSION_ZLIB, COMPRESSION_ZSTD):
        raise chk.field("compression_type", hdr.compression_type, "is unknown")
    has_type_bit = bool(hdr.incompatible_features & INCOMPAT_COMPRESSION)
    if has_type_bit != (hdr.compression_type != COMPRESSION_ZLIB):
        raise chk.field("compression_type", hdr.compression_type,
                        "does not agree with incompatible feature bit 3")
    if hdr.refcount_order > 6:
        raise chk.field("refcount_order", hdr.refcount_order, "is larger than 6")


def _check_geometry(chk: _Checker, hdr: Qcow2Header) -> None:
    """Table offsets and sizes against the cluster size, QEMU's limits and the file size."""
    cs = hdr.cluster_size
    if hdr.size >= 1 << 63:
        raise chk.field("size", hdr.size, "is too large")
    if hdr.l1_size < hdr.l1_needed:
        raise chk.field("l1_size", hdr.l1_size, f"is too small for the virtual size {hdr.size} "
                        f"({hdr.l1_needed} entries needed)")
    if hdr.l1_size * 8 > MAX_L1_BYTES:
        raise chk.field("l1_size", hdr.l1_size, f"exceeds {MAX_L1_BYTES} bytes of L1 table")
    if hdr.l1_needed:
        chk.aligned("l1_table_offset", hdr.l1_table_offset, cs)
        if hdr.l1_table_offset == 0:
            raise chk.field("l1_table_offset", 0, "points at the header")
        chk.inside("l1_table_offset", hdr.l1_table_offset, 8 * hdr.l1_needed)
    chk.aligned("refcount_table_offset", hdr.refcount_table_offset, cs)
    reftable_bytes = hdr.refcount_table_clusters * cs
    if reftable_bytes > MAX_REFTABLE_BYTES:
        raise chk.field("refcount_table_clusters", hdr.refcount_table_clusters,
                        f"exceeds {MAX_REFTABLE_BYTES} bytes of refcount table")
    if hdr.refcount_table_clusters == 0 or hdr.refcount_table_offset == 0:
        raise chk.field("refcount_table_offset", hdr.refcount_table_offset, "is missing")
    chk.inside("refcount_table_offset", hdr.refcount_table_offset, 1)
    if hdr.nb_snapshots > MAX_SNAPSHOTS:
        raise chk.field("nb_snapshots", hdr.nb_snapshots, f"exceeds {MAX_SNAPSHOTS}")
    if hdr.nb_snapshots:
        chk.aligned("snapshots_offset", hdr.snapshots_offset, cs)
        chk.inside("snapshots_offset", hdr.snapshots_offset, 1)


def _decode_name(chk: _Checker, what: str, raw: bytes) -> str:
    try:
        name = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise chk.fail(f"{what} {raw!r} is not valid UTF-8") from None
    if not name or "\0" in name:
        raise chk.fail(f"{what} {raw!r} is empty or contains NUL")
    return name


def _parse_extensions(chk: _Checker, hdr: Qcow2Header, cluster0: bytes, start: int, end: int) -> None:
    """The header extension list (qcow2 spec, 'Header extensions'), which must end inside cluster 0."""
    pos = start
    seen: set[int] = set()
    while True:
        if pos + 8 > end:
            raise chk.fail(f"header extension at {pos:#x} runs past the header area (end {end:#x})")
        ext_type, ext_len = struct.unpack_from(">II", cluster0, pos)
        if ext_type == EXT_END:
            return
        data_start = pos + 8
        if data_start + ext_len > end:
            raise chk.fail(f"header extension {ext_type:#010x} at {pos:#x} (length {ext_len}) "
                           f"runs past the header area (end {end:#x})")
        data = cluster0[data_start:data_start + ext_len]
        if ext_type in seen:
            raise chk.fail(f"header extension {ext_type:#010x} appears twice")
        seen.add(ext_type)
        if ext_type == EXT_BACKING_FORMAT:
            hdr.backing_format = _decode_name(chk, "backing format extension", data)
        elif ext_type == EXT_DATA_FILE:
            hdr.data_file = _decode_name(chk, "external data file extension", data)
        elif ext_type == EXT_BITMAPS:
            if ext_len != 24:
                raise chk.fail(f"bitmaps header extension has length {ext_len}, not 24")
            nb, reserved, dir_size, dir_off = struct.unpack(">IIQQ", data)
            if reserved:
                raise chk.fail(f"bitmaps header extension reserved field={reserved:#x} is not zero")
            hdr.bitmaps_ext = BitmapsExtension(nb, dir_size, dir_off)
        elif ext_type == EXT_FDE:
            # Only meaningful with crypt_method 2, which _check_features refuses.
            pass
        elif ext_type != EXT_FEATURE_TABLE:
            hdr.unknown_extensions.append(ext_type)
        pos = data_start + ((ext_len + 7) & ~7)


def read_snapshot_table(path: str, fd: int, file_size: int, hdr: Qcow2Header) -> list[Snapshot]:
    """Parse the internal snapshot table (qcow2 spec, 'Snapshots'). The snapshots are left intact."""
    if not hdr.nb_snapshots:
        return []
    chk = _Checker(path, file_size)
    cs = hdr.cluster_size
    # Read the table incrementally: each entry is at least 40 bytes, at most
    # 40 + 1024 + 2 * 65535, so bound the read by QEMU's table limit and EOF.
    limit = min(MAX_SNAPSHOT_TABLE_BYTES, file_size - hdr.snapshots_offset)
    table = os.pread(fd, limit, hdr.snapshots_offset)
    snapshots = []
    pos = 0
    for i in range(hdr.nb_snapshots):
        if pos + _SNAPSHOT_ENTRY.size > len(table):
            raise chk.fail(f"snapshot table entry {i} at {hdr.snapshots_offset + pos:#x} is truncated")
        (l1_off, l1_size, id_len, name_len, date_s, date_ns, clock,
         vm_state_32, extra_size) = _SNAPSHOT_ENTRY.unpack_from(table, pos)
        if extra_size > MAX_SNAPSHOT_EXTRA:
            raise chk.fail(f"snapshot {i}: extra_data_size={extra_size} exceeds {MAX_SNAPSHOT_EXTRA}")
        body = pos + _SNAPSHOT_ENTRY.size
        extra = table[body:body + extra_size]
        strings = body + extra_size
        entry_end = strings + id_len + name_len
        if entry_end > len(table):
            raise chk.fail(f"snapshot table entry {i} at {hdr.snapshots_offset + pos:#x} is truncated")
        if l1_off % cs or l1_off == 0:
            raise chk.fail(f"snapshot {i}: l1_table_offset={l1_off:#x} is not a valid cluster offset")
        if l1_size * 8 > MAX_L1_BYTES:
            raise chk.fail(f"snapshot {i}: l1_size={l1_size:#x} exceeds {MAX_L1_BYTES} bytes")
        vm_state = struct.unpack_from(">Q", extra)[0] if extra_size >= 8 else vm_state_32
        disk_size = struct.unpack_from(">Q", extra, 8)[0] if extra_size >= 16 else None
        icount = struct.unpack_from(">Q", extra, 16)[0] if extra_size >= 24 else _ICOUNT_UNSET
        next_pos = (entry_end + 7) & ~7
        snapshots.append(Snapshot(
            id=table[strings:strings + id_len].decode("utf-8", "replace"),
            name=table[strings + id_len:entry_end].decode("utf-8", "replace"),
            l1_table_offset=l1_off, l1_size=l1_size, vm_state_size=vm_state, disk_size=disk_size,
            date_sec=date_s, date_nsec=date_ns, vm_clock_nsec=clock,
            icount=None if icount == _ICOUNT_UNSET else icount, entry_bytes=next_pos - pos,
        ))
        pos = next_pos
    return snapshots
