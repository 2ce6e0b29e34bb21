"""``pynbd create``: new images."""

from __future__ import annotations

import os


class CreateError(Exception):
    """The image cannot be created (it exists, or the directory is not writable);
    the message names the file."""


def create_raw(path: str, size: int) -> None:
    """Create ``path`` as a sparse raw image of ``size`` bytes; never overwrites a file.

    Raises CreateError.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as exc:
        raise CreateError(f"{path}: cannot create: {exc.strerror}") from None
    try:
        os.ftruncate(fd, size)
    finally:
        os.close(fd)
