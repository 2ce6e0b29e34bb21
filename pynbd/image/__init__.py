"""Image drivers behind one interface (see :mod:`pynbd.image.base`).

:func:`open_image` probes the format (unless told) and returns an
:class:`~pynbd.image.base.Image`. Drivers register themselves in
:data:`DRIVERS`; the probe order is the order of :data:`PROBES`.
"""

from __future__ import annotations

from collections.abc import Callable

from pynbd.image.base import Image, ImageError
from pynbd.image.qcow2 import open_qcow2
from pynbd.image.raw import RawImage

QCOW2_MAGIC = b"QFI\xfb"

#: format name -> opener(path, read_only, fiemap=...) -> Image
DRIVERS: dict[str, Callable[..., Image]] = {
    "raw": RawImage,
    "qcow2": open_qcow2,
}


def probe_format(path: str) -> str:
    """Guess an image's format from its first bytes, as qemu-img does."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError as exc:
        raise ImageError(f"{path}: cannot open: {exc.strerror}") from None
    if head == QCOW2_MAGIC:
        return "qcow2"
    return "raw"


def open_image(path: str, fmt: str | None = None, read_only: bool = False, fiemap: bool = True) -> Image:
    """Open ``path`` as ``fmt`` (probed when None); raises ImageError.

    ``fiemap``: a raw image may answer block status from FIEMAP (see
    :mod:`pynbd.image.fiemap`); False keeps it to SEEK_DATA/SEEK_HOLE.
    """
    fmt = fmt or probe_format(path)
    try:
        opener = DRIVERS[fmt]
    except KeyError:
        raise ImageError(f"{path}: unsupported image format {fmt!r}") from None
    return opener(path, read_only, fiemap=fiemap)
