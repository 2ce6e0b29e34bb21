"""Leases on host ranges a read is sending from (skeleton: filled in by the leases work)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from collections.abc import Iterator

from pynbd.image.base import ReadSegment


class HostLeases:
    """Pins the host ranges of read segments until they are sent (see module doc)."""

    @contextmanager
    def lease(self, segments: Sequence[ReadSegment]) -> Iterator[None]:
        yield
