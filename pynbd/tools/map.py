"""``qemu-img map --output=json`` and ``qemu-img info`` style reports.

:func:`image_map` walks an image the way qemu-img's ``get_block_status``
does (QEMU's block/io.c and qemu-img.c): ``depth`` is 0-based and names
the first layer that answered DATA or ZERO — including the zeros a layer
reports because its backing file is short or absent, which are *not*
``present``; ``offset`` appears only where QEMU knows a host offset.
Data over a hole in its host file is ``zero: true, data: true`` where QEMU asks
the host file (:attr:`pynbd.image.qcow2.layer.Qcow2Layer.asks_host_file`).
Neighbouring records are merged with qemu-img's ``entry_mergeable`` rules,
so the output equals qemu-img's record for record.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence

from pynbd.image.base import Image
from pynbd.image.qcow2 import Qcow2Image
from pynbd.image.qcow2.chain import (
    KIND_COMPRESSED,
    KIND_DATA,
    KIND_HOST_HOLE,
    KIND_ZERO,
    RESOLVED_ABSENT,
    RESOLVED_SHORT,
    resolve,
)
from pynbd.image.raw import RawImage, data_runs

log = logging.getLogger(__name__)

#: qemu-img map probes at most 1 GiB per block-status call; pynbd walks in
#: chunks of the same size so memory stays bounded on huge images.
_CHUNK = 1 << 30

#: (start, length, depth, present, zero, data, offset or None)
MapRecord = tuple[int, int, int, bool, bool, bool, int | None]


def _qcow2_records(image: Qcow2Image) -> Iterator[MapRecord]:
    layers = image.layers
    for chunk in range(0, image.size, _CHUNK):
        end = min(image.size, chunk + _CHUNK)
        for pos, n, idx, kind, host in resolve(layers, chunk, end, block_status=True):
            offset = host if host >= 0 else None
            if kind == KIND_DATA:
                yield pos, n, idx, True, False, True, offset
            elif kind == KIND_HOST_HOLE:
                yield pos, n, idx, True, True, True, offset
            elif kind == KIND_COMPRESSED:
                yield pos, n, idx, True, False, True, None
            elif kind == KIND_ZERO:
                yield pos, n, idx, True, True, False, offset
            elif kind == RESOLVED_SHORT:
                # The layer above answered ZERO because this backing file is short.
                yield pos, n, idx - 1, False, True, False, offset
            else:
                assert kind == RESOLVED_ABSENT
                yield pos, n, idx, False, True, False, offset


def _raw_records(image: RawImage) -> Iterator[MapRecord]:
    for start, stop, is_data in data_runs(image.fd, 0, image.size):
        yield start, stop - start, 0, True, not is_data, is_data, start


def _generic_records(image: Image) -> Iterator[MapRecord]:
    """Any other driver: derived from extents(), without host offsets."""
    pos = 0
    while pos < image.size:
        for ext in image.extents(pos, image.size - pos):
            yield ext.offset, ext.length, max(ext.depth - 1, 0), ext.depth > 0, ext.zero, ext.data, None
            pos = ext.end


def _mergeable(cur: MapRecord, nxt: MapRecord) -> bool:
    """qemu-img.c ``entry_mergeable`` (the file name is implied by depth here)."""
    if cur[2:6] != nxt[2:6] or (cur[6] is None) != (nxt[6] is None):
        return False
    return cur[6] is None or cur[6] + cur[1] == nxt[6]


def merge_map_records(records: Iterable[MapRecord]) -> list[MapRecord]:
    out: list[MapRecord] = []
    for rec in records:
        if rec[1] == 0:
            continue
        if out and out[-1][0] + out[-1][1] == rec[0] and _mergeable(out[-1], rec):
            last = out[-1]
            out[-1] = (last[0], last[1] + rec[1], *last[2:])
        else:
            out.append(rec)
    return out


def _as_dict(rec: MapRecord) -> dict:
    start, length, depth, present, zero, data, offset = rec
    d: dict = {"start": start, "length": length, "depth": depth, "present": present, "zero": zero, "data": data}
    if offset is not None:
        d["offset"] = offset
    return d


def map_records(image: Image) -> list[MapRecord]:
    """The merged map of ``image`` as tuples (see :data:`MapRecord`)."""
    if isinstance(image, Qcow2Image):
        records: Iterable[MapRecord] = _qcow2_records(image)
    elif isinstance(image, RawImage):
        records = _raw_records(image)
    else:
        records = _generic_records(image)
    return merge_map_records(records)


def image_map(image: Image) -> list[dict]:
    """Records equal to ``json.loads(qemu-img map --output=json IMAGE)``."""
    return [_as_dict(r) for r in map_records(image)]


def dicts_to_records(records: Sequence[dict]) -> list[MapRecord]:
    """The inverse of :func:`image_map`'s dicts (for comparing with qemu-img output)."""
    return [(r["start"], r["length"], r["depth"], r["present"], r["zero"], r["data"], r.get("offset"))
            for r in records]


def format_map_json(records: Sequence[dict]) -> str:
    """Text byte-identical to ``qemu-img map --output=json`` (qemu-img.c dump_map_entry)."""
    def b(v: bool) -> str:
        return "true" if v else "false"

    lines = []
    for r in records:
        s = (f'{{ "start": {r["start"]}, "length": {r["length"]}, "depth": {r["depth"]}, '
             f'"present": {b(r["present"])}, "zero": {b(r["zero"])}, "data": {b(r["data"])}')
        if "offset" in r:
            s += f', "offset": {r["offset"]}'
        lines.append(s + "}")
    return "[" + ",\n".join(lines) + "]\n"


def layer_paths(image: Image) -> list[str]:
    """File names by 0-based depth (what qemu-img's human map prints in its File column)."""
    if isinstance(image, Qcow2Image):
        return [_data_path(layer) for layer in image.layers]
    return [image.path]


def _data_path(layer: object) -> str:
    """The file that holds a layer's data: its external data file if it has one.

    qemu-img 7.2 names the data file as written in the header (it opens a relative
    name relative to the current directory), so that is what is printed.
    """
    header = getattr(layer, "header", None)
    if getattr(layer, "has_data_file", False) and header is not None and header.data_file:
        return header.data_file
    return layer.path  # type: ignore[attr-defined]


def format_map_human(records: Sequence[dict], paths: Sequence[str]) -> str:
    """Text like ``qemu-img map`` without --output: the data runs that are not known
    to be zero, and their host offsets (qemu-img.c ``dump_map_entry``).

    Like qemu-img, the listing stops before the first data run without a host
    offset (a compressed cluster); :func:`human_map_complete` tells whether it did.
    """
    def hx(v: int) -> str:
        return f"{v:#x}" if v else "0"

    lines = [f"{'Offset':<16}{'Length':<16}{'Mapped to':<16}File"]
    for r in records:
        if r["data"] and "offset" not in r:
            break
        if r["data"] and not r["zero"]:
            path = paths[r["depth"]] if r["depth"] < len(paths) else "?"
            lines.append(f"{hx(r['start']):<16}{hx(r['length']):<16}{hx(r['offset']):<16}{path}")
    return "\n".join(lines) + "\n"


def human_map_complete(records: Sequence[dict]) -> bool:
    """False when :func:`format_map_human` cannot show every data run (no host offset)."""
    return all("offset" in r for r in records if r["data"])
