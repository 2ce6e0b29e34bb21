"""The meta-context registry: which contexts an export offers and how each answers.

Each provider knows one family of contexts (``base:allocation``,
``qemu:allocation-depth``, ``qemu:dirty-bitmap:*``). Adding a context is
adding a provider to :data:`PROVIDERS`; nothing else branches on names.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from pynbd.image.base import STATE_HOLE_ZERO, Bitmap, Extents, Image
from pynbd.protocol.constants import AllocationState
from pynbd.protocol.contexts import (
    BASE_ALLOCATION,
    QEMU_ALLOCATION_DEPTH,
    bitmap_of_context,
    dirty_bitmap_context,
)
from pynbd.runlength import Runs


class ExtentQuery:
    """The image's extents for one BLOCK_STATUS request, fetched once for every context."""

    def __init__(self, image: Image, offset: int, length: int, limit: int | None = None) -> None:
        self.image = image
        self.offset = offset
        self.length = length
        #: At most this many runs are needed (REQ_ONE); None for a full answer.
        self.limit = limit
        self._extents: Extents | None = None

    @property
    def extents(self) -> Extents:
        if self._extents is None:
            self._extents = self.image.extents(self.offset, self.length, self.limit)
        return self._extents


class ContextProvider(abc.ABC):
    #: Status that is safe to report when the lookup fails (NBD spec "BLOCK_STATUS":
    #: a server that cannot tell reports the safe status), None if there is none.
    safe_status: int | None = None

    @abc.abstractmethod
    def names(self, image: Image, bitmaps: Mapping[str, Bitmap]) -> list[str]:
        """The context names this provider offers for an export."""

    @abc.abstractmethod
    def runs(self, name: str, query: ExtentQuery, bitmaps: Mapping[str, Bitmap]) -> Runs:
        """Status runs from the query offset (may cover a prefix of the range)."""


# The image's allocation values are the base:allocation bits (NBD spec "base:allocation metadata context").
assert STATE_HOLE_ZERO == AllocationState.HOLE | AllocationState.ZERO


class BaseAllocation(ContextProvider):
    """``base:allocation``: HOLE when not data, ZERO when it reads as zeros (NBD spec
    "base:allocation metadata context")."""

    safe_status = 0  # allocated, contents unknown

    def names(self, image: Image, bitmaps: Mapping[str, Bitmap]) -> list[str]:
        return [BASE_ALLOCATION]

    def runs(self, name: str, query: ExtentQuery, bitmaps: Mapping[str, Bitmap]) -> Runs:
        return query.extents.allocation


class AllocationDepth(ContextProvider):
    """``qemu:allocation-depth``: which layer of the chain owns the range (QEMU's docs/interop/nbd.txt).

    Offered always (qemu-nbd needs ``-A``). No safe status exists for it.
    """

    def names(self, image: Image, bitmaps: Mapping[str, Bitmap]) -> list[str]:
        return [QEMU_ALLOCATION_DEPTH]

    def runs(self, name: str, query: ExtentQuery, bitmaps: Mapping[str, Bitmap]) -> Runs:
        return query.extents.depth


class DirtyBitmaps(ContextProvider):
    """``qemu:dirty-bitmap:NAME`` for every exportable persistent bitmap (QEMU's docs/interop/nbd.txt)."""

    safe_status = 1  # dirty: reporting clean could make a backup skip data

    def names(self, image: Image, bitmaps: Mapping[str, Bitmap]) -> list[str]:
        return [dirty_bitmap_context(name) for name in bitmaps]

    def runs(self, name: str, query: ExtentQuery, bitmaps: Mapping[str, Bitmap]) -> Runs:
        bitmap_name = bitmap_of_context(name)
        assert bitmap_name is not None  # (one of the names names() gave)
        bitmap = bitmaps[bitmap_name]
        return bitmap.dirty_runs(query.offset, query.length, query.limit)  # values: 1 dirty, 0 clean


PROVIDERS: Sequence[ContextProvider] = (BaseAllocation(), AllocationDepth(), DirtyBitmaps())


@dataclass(frozen=True, slots=True)
class ContextTable:
    """The contexts one export offers, in listing order (the index is the context id)."""

    names: tuple[str, ...]
    providers: Mapping[str, ContextProvider]

    @classmethod
    def for_image(cls, image: Image, bitmaps: Mapping[str, Bitmap]) -> "ContextTable":
        names: list[str] = []
        providers: dict[str, ContextProvider] = {}
        for provider in PROVIDERS:
            for name in provider.names(image, bitmaps):
                names.append(name)
                providers[name] = provider
        return cls(tuple(names), providers)
