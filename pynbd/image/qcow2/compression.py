"""Compressed qcow2 clusters: where a stream lies and how it decompresses.

qcow2 spec: 'Compressed Clusters Descriptor' (in 'Cluster mapping') and the
``compression_type`` header field ('Additional fields').

A compressed L2 entry is a byte-granular descriptor; the stream decompresses
to exactly one cluster. Output is always capped at the cluster size, so a
malicious stream cannot inflate beyond it.
"""

from __future__ import annotations

import logging
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from threading import Lock

import zstandard

from pynbd.image.qcow2.header import COMPRESSION_ZLIB, COMPRESSION_ZSTD

log = logging.getLogger(__name__)

#: Mask of the 62 descriptor bits of a compressed L2 entry.
_DESCRIPTOR_MASK = (1 << 62) - 1
SECTOR = 512


@dataclass(frozen=True, slots=True)
class CompressedRange:
    """Where a compressed cluster's stream lies in the host file."""

    offset: int
    length: int


def compressed_range(entry: int, cluster_bits: int) -> CompressedRange:
    """Decode a compressed L2 entry: ``x = 62 - (cluster_bits - 8)`` splits offset and sector count."""
    x = 62 - (cluster_bits - 8)
    desc = entry & _DESCRIPTOR_MASK
    offset = desc & ((1 << x) - 1)
    nsec_extra = desc >> x
    end = (offset & ~(SECTOR - 1)) + (nsec_extra + 1) * SECTOR
    return CompressedRange(offset, end - offset)


class DecompressError(Exception):
    """The stream does not decompress to exactly one cluster."""


def _inflate_zlib(buf: bytes, cluster_size: int) -> bytes:
    # Raw deflate (no header). QEMU writes with wbits -12; -15 accepts every
    # window size, so it is the robust choice.
    d = zlib.decompressobj(-15)
    try:
        return d.decompress(buf, cluster_size)
    except zlib.error as exc:
        raise DecompressError(f"zlib: {exc}") from None


def _inflate_zstd(buf: bytes, cluster_size: int) -> bytes:
    reader = zstandard.ZstdDecompressor().stream_reader(buf, read_across_frames=True)
    out = bytearray()
    try:
        while len(out) < cluster_size:
            chunk = reader.read(cluster_size - len(out))
            if not chunk:
                break
            out += chunk
    except zstandard.ZstdError as exc:
        raise DecompressError(f"zstd: {exc}") from None
    return bytes(out)


_INFLATERS = {COMPRESSION_ZLIB: _inflate_zlib, COMPRESSION_ZSTD: _inflate_zstd}


def decompress_cluster(buf: bytes, cluster_size: int, compression_type: int) -> bytes:
    """Decompress one cluster; raises :class:`DecompressError` unless exactly ``cluster_size`` bytes come out."""
    out = _INFLATERS[compression_type](buf, cluster_size)
    if len(out) != cluster_size:
        raise DecompressError(f"stream produced {len(out)} bytes instead of {cluster_size}")
    return out


class ClusterCache:
    """A small LRU of decompressed clusters, keyed by L2 entry.

    Sequential small reads of one compressed cluster would otherwise
    decompress it again for every request. Bounded by ``max_bytes``.

    The key is the compressed descriptor (where the stream lies and how long
    it is), not a guest range, so writes do not make an entry wrong: a write
    maps the guest cluster elsewhere and the old descriptor is not looked up
    again. Only writing a new compressed stream at the place of one still
    cached would, which nothing in pynbd does (a writer that starts to must
    drop the key).
    """

    def __init__(self, max_bytes: int = 8 << 20) -> None:
        self._max_bytes = max_bytes
        self._bytes = 0
        self._items: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._lock = Lock()

    def get(self, key: tuple[int, int]) -> bytes | None:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
            return data

    def put(self, key: tuple[int, int], data: bytes) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = data
            self._bytes += len(data)
            while self._bytes > self._max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self._bytes -= len(old)
