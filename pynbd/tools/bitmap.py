"""``pynbd bitmap``: an image's persistent dirty bitmaps, listed as QEMU reports them,
or changed with ``qemu-img bitmap``'s operations.

Listing: one entry per bitmap with the fields of QEMU's ``BlockDirtyInfo``
(``query-named-block-nodes``), as text like the ``bitmaps:`` section of ``qemu-img
info`` or as JSON. Changing: :func:`change_bitmaps` takes the operations in the order
given, checks them in ``qemu-img bitmap``'s order and applies them to the image all or
nothing (:mod:`pynbd.image.qcow2.bitmapdir`): where qemu-img stops at the first failure
keeping the operations before it, pynbd leaves the file byte for byte as it was.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass

from pynbd.image import probe_format
from pynbd.image.base import BitmapInfo, ImageError
from pynbd.image.locking import QCOW2_READ_ONLY, QCOW2_WRITABLE, lock_file
from pynbd.image.qcow2.bitmapdir import BitmapOpError, BitmapSource, DirectoryEdit, commit
from pynbd.image.qcow2.bitmaps import Qcow2Bitmap, load_bitmaps
from pynbd.image.qcow2.header import INCOMPAT_DIRTY, Qcow2Header, parse_header
from pynbd.image.qcow2.refcounts import Refcounts

#: The keys of one bitmap in ``--output json``: QEMU's BlockDirtyInfo.
JSON_KEYS = ("name", "count", "granularity", "recording", "busy", "persistent", "inconsistent")


def format_bitmaps_json(infos: Sequence[BitmapInfo]) -> str:
    """The bitmaps as a JSON list of objects with exactly the keys :data:`JSON_KEYS`."""
    return json.dumps([{key: getattr(info, key) for key in JSON_KEYS} for info in infos], indent=2) + "\n"


def format_bitmap_list(infos: Sequence[BitmapInfo]) -> str:
    """Text like the ``bitmaps:`` section of ``qemu-img info`` (flags, name, granularity),
    then the other :data:`JSON_KEYS`, and why a bitmap is inconsistent."""
    if not infos:
        return "bitmaps: none\n"
    out = ["bitmaps:"]
    for i, info in enumerate(infos):
        out.append(f"    [{i}]:")
        out.append("        flags:")
        out.extend(f"            [{j}]: {flag}" for j, flag in enumerate(info.flags))
        out.append(f"        name: {info.name}")
        out.append(f"        granularity: {info.granularity}")
        out.append(f"        count: {info.count}")
        out.extend(f"        {key}: {'true' if getattr(info, key) else 'false'}"
                   for key in ("recording", "busy", "persistent", "inconsistent"))
        if info.problem:
            out.append(f"        problem: {info.problem}")
    return "\n".join(out) + "\n"


# --- changing bitmaps ---------------------------------------------------------------------


@dataclass(frozen=True)
class BitmapRequest:
    """One ``pynbd bitmap IMAGE BITMAP`` call with operations, as typed."""

    image: str
    bitmap: str | None
    #: (operation, as qemu-img spells it: add, remove, clear, enable, disable, merge; its
    #: argument: the source bitmap of ``merge``, else None).
    operations: Sequence[tuple[str, str | None]]
    fmt: str | None = None
    #: ``-g`` as typed (qemu-img's size syntax), None when not given.
    granularity: str | None = None
    #: ``-b``: the file that ``merge`` reads its source bitmap from.
    source_file: str | None = None
    #: ``-F``: that file's format (default: probed).
    source_fmt: str | None = None


def change_bitmaps(request: BitmapRequest) -> None:
    """Apply the operations of ``request`` to bitmap ``request.bitmap`` of the image,
    in order, all or nothing. BitmapOpError (an ImageError) with one line naming the
    file and the bitmap when one is refused, the image cannot be opened or is locked
    by a process using it (a QEMU, qemu-nbd or pynbd); the file is then unchanged.
    Runs on the caller's thread."""
    granularity = check_request(request)
    path, name = request.image, request.bitmap
    assert name is not None
    with ExitStack() as stack:
        try:
            fmt = request.fmt or probe_format(path)
            if fmt == "raw":
                raise _raw_refusal(path, name, request.operations[0][0])
            fd, header, bitmaps = _open_qcow2(path, True, stack)
            edit = DirectoryEdit(path, header, bitmaps)
        except BitmapOpError:
            raise
        except ImageError as exc:
            raise _in_context(exc, path, f"cannot change bitmap {name!r}") from None
        source = None
        if request.source_file is not None:
            try:
                source = _open_source(request.source_file, request.source_fmt, path, stack)
            except ImageError as exc:
                raise BitmapOpError(f"{path}: cannot merge into bitmap {name!r}: {exc}") from None
        for op, arg in request.operations:
            if op == "add":
                edit.add(name, granularity or None)
            elif op == "merge":
                assert arg is not None
                edit.merge(name, arg, source)
            else:
                getattr(edit, op)(name)
        commit(fd, path, header, Refcounts(fd, path, header, os.fstat(fd).st_size), edit)


def check_request(request: BitmapRequest) -> int:
    """``qemu-img bitmap``'s checks of its command line, in its order; the granularity
    (0: not given or 0, the default). BitmapOpError naming what is wrong."""
    granularity = 0 if request.granularity is None else parse_granularity(request.granularity)
    ops = {op for op, _ in request.operations}
    if not ops:
        raise BitmapOpError("pynbd bitmap: with BITMAP, give at least one of --add, --remove, --clear, "
                            "--enable, --disable or --merge")
    if granularity and "add" not in ops:
        raise BitmapOpError("pynbd bitmap: -g (granularity) goes only with --add")
    if request.source_fmt is not None and request.source_file is None:
        raise BitmapOpError("pynbd bitmap: -F (source format) goes only with -b")
    if request.source_file is not None and "merge" not in ops:
        raise BitmapOpError("pynbd bitmap: -b (merge source file) goes only with --merge")
    if request.bitmap is None:
        raise BitmapOpError("pynbd bitmap: the operations need IMAGE and BITMAP")
    return granularity


_SIZE_SYNTAX = re.compile(r"[ \t\n\v\f\r]*\+?(?:0[xX](?P<hex>[0-9a-fA-F]+)|(?P<int>[0-9]+)(?P<frac>\.[0-9]*)?)"
                          r"(?P<suffix>[bBkKmMgGtTpPeE]?)")
_SUFFIX_SHIFT = {"": 0, "B": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}
_INT64_MAX = (1 << 63) - 1


def parse_granularity(text: str) -> int:
    """``-g`` in QEMU's size syntax (``qemu_strtosz``): a decimal number, optionally with a
    fraction, or a hex number (``0x``), then an optional suffix B, K, M, G, T, P or E (any
    case, binary units); a fraction needs a suffix that makes it whole bytes. BitmapOpError
    if malformed or above 2^63-1."""
    match = _SIZE_SYNTAX.fullmatch(text)
    if not match:
        raise BitmapOpError(f"pynbd bitmap: invalid granularity {text!r}: use a number of bytes, "
                            "optionally with a suffix k, M, G, T, P or E")
    scale = 1 << _SUFFIX_SHIFT[match["suffix"].upper()]
    if match["hex"] is not None:
        value = int(match["hex"], 16) * scale
    else:
        fraction = float("0" + (match["frac"] or ".0"))
        if fraction and scale == 1:
            raise BitmapOpError(f"pynbd bitmap: invalid granularity {text!r}: a fraction needs a suffix")
        value = int(match["int"]) * scale + int(fraction * scale)
    if value > _INT64_MAX:
        raise BitmapOpError(f"pynbd bitmap: invalid granularity {text!r}: more than {_INT64_MAX}")
    return value


def _open_qcow2(path: str, writable: bool, stack: ExitStack) -> tuple[int, Qcow2Header, list[Qcow2Bitmap]]:
    """Open, lock (as QEMU does, for writing or reading) and parse a qcow2 file; its
    descriptor is closed with ``stack``. ImageError naming the file."""
    try:
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(f"{path}: cannot open: {exc.strerror}") from None
    stack.callback(os.close, fd)
    lock_file(fd, path, QCOW2_WRITABLE if writable else QCOW2_READ_ONLY)
    size = os.fstat(fd).st_size
    header = parse_header(path, fd, size)
    if writable and header.incompatible_features & INCOMPAT_DIRTY:
        # QEMU rebuilds the refcounts first; pynbd does not, and cannot allocate without them.
        raise ImageError(f"{path}: its dirty bit is set (lazy refcounts): repair it with "
                         "'qemu-img check -r all' first")
    return fd, header, load_bitmaps(path, fd, size, header)


def _open_source(path: str, fmt: str | None, image: str, stack: ExitStack) -> BitmapSource:
    """The bitmaps of the ``-b`` file (a raw file has none)."""
    try:
        same = os.path.samefile(path, image)
    except OSError:
        same = False  # the open below says why
    if same:
        raise ImageError(f"{path}: -b names the image itself (leave -b out to merge its own bitmaps)")
    if (fmt or probe_format(path)) == "raw":
        try:
            return BitmapSource(path, os.path.getsize(path), [])
        except OSError as exc:
            raise ImageError(f"{path}: cannot open: {exc.strerror}") from None
    fd, header, bitmaps = _open_qcow2(path, False, stack)
    return BitmapSource(path, header.size, bitmaps)


def _raw_refusal(path: str, name: str, op: str) -> BitmapOpError:
    """What the first operation meets on a raw image: no bitmaps, and no place for one."""
    why = "a raw image cannot hold persistent bitmaps (a qcow2 v3 image can)" if op == "add" else "no such bitmap"
    into = " into" if op == "merge" else ""
    return BitmapOpError(f"{path}: cannot {op}{into} bitmap {name!r}: {why}")


def _in_context(exc: ImageError, path: str, context: str) -> BitmapOpError:
    """``exc`` (which names ``path`` first) as '``path``: ``context``: what went wrong'."""
    text = str(exc)
    prefix = f"{path}: "
    return BitmapOpError(f"{path}: {context}: {text[len(prefix):] if text.startswith(prefix) else text}")
