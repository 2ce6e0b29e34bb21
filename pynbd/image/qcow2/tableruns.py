"""Block-status runs of one L2 table, classified once and kept with the cached table.

A :class:`TableRuns` holds the allocation (``base:allocation``) and top-layer
depth (``qemu:allocation-depth``) runs over one L2 table's guest span; the
layer attaches it to the table in the :class:`~pynbd.image.qcow2.l2cache.TableCache`,
so a block-status request costs a slice per table instead of work per cluster.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from pynbd.image.base import STATE_DATA, STATE_HOLE_ZERO
from pynbd.image.qcow2.chain import KIND_COMPRESSED, KIND_DATA, KIND_UNALLOC, KIND_ZERO, Run
from pynbd.runlength import Runs, SpanRuns

#: Per layer kind (chain.KIND_*): its allocation state, and its depth when it is the top layer's answer.
ALLOCATION_OF_KIND = (STATE_DATA, STATE_DATA, STATE_HOLE_ZERO, STATE_HOLE_ZERO)  # DATA, COMPRESSED, ZERO, UNALLOC
TOP_DEPTH_OF_KIND = (1, 1, 1, 0)
assert (KIND_DATA, KIND_COMPRESSED, KIND_ZERO, KIND_UNALLOC) == (0, 1, 2, 3)


def piece_columns(pieces: Iterable[Run]) -> tuple[list[int], list[int]]:
    """``(lengths, kinds)`` of classified pieces."""
    lengths: list[int] = []
    kinds: list[int] = []
    for _pos, n, kind, _host in pieces:
        lengths.append(n)
        kinds.append(kind)
    return lengths, kinds


class TableRuns:
    """One L2 table classified once: allocation and top-layer depth runs over its guest span.

    The depth runs may come from a function called on first use: only clients
    that selected ``qemu:allocation-depth`` need them, and building them was
    half the cost of a table's first classification (the first map of a qcow2
    image, bench/README.md).
    """

    __slots__ = ("allocation", "_depth", "_depth_source")

    def __init__(self, allocation: SpanRuns, depth: SpanRuns | Callable[[], SpanRuns]) -> None:
        self.allocation = allocation
        self._depth: SpanRuns | None = None if callable(depth) else depth
        self._depth_source = depth if callable(depth) else None

    @classmethod
    def classify(cls, start: int, pieces: Iterable[Run]) -> TableRuns:
        lengths, kinds = piece_columns(pieces)
        return cls(SpanRuns(start, Runs(lengths, [ALLOCATION_OF_KIND[k] for k in kinds])),
                   SpanRuns(start, Runs(lengths, [TOP_DEPTH_OF_KIND[k] for k in kinds])))

    @property
    def depth(self) -> SpanRuns:
        if self._depth is None:
            assert self._depth_source is not None
            self._depth = self._depth_source()
            self._depth_source = None
        return self._depth

    @property
    def nbytes(self) -> int:
        """Bytes to count against the cache budget; depth runs not built yet are
        counted as large as the allocation runs (both have at most one run per
        change of cluster kind)."""
        depth = self._depth
        return self.allocation.nbytes + (depth.nbytes if depth is not None else self.allocation.nbytes)


#: Marks a table that has a corrupt entry (its runs are not cached).
CORRUPT_TABLE = TableRuns(SpanRuns(0, Runs([], [])), SpanRuns(0, Runs([], [])))
