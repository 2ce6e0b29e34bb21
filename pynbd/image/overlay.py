"""Temporary qcow2 overlays: the writes of ``pynbd serve --snapshot`` (as ``qemu-nbd -s``)."""

from __future__ import annotations

import logging
import os
import tempfile

from pynbd.image.base import ImageError
from pynbd.tools.create import CreateError, CreateOptions, create_image

log = logging.getLogger(__name__)


def snapshot_overlay(path: str, fmt: str | None, export: str) -> str:
    """A new qcow2 overlay in $TMPDIR whose backing file is the image at ``path`` (read
    only, locked as a backing file when opened); the caller deletes it when done. Raises
    ImageError naming ``path``."""
    image = os.path.abspath(path)
    fd, overlay = tempfile.mkstemp(prefix="pynbd-snapshot-", suffix=".qcow2")
    os.close(fd)
    os.unlink(overlay)  # (create_image never overwrites: it makes the file itself)
    try:
        create_image(overlay, CreateOptions(fmt="qcow2", backing=image, backing_format=fmt))
    except CreateError as exc:
        raise ImageError(f"{path}: cannot make the snapshot overlay: {exc}") from None
    log.info("export %r: writes go to the temporary overlay %s", export, overlay)
    return overlay
