"""Block-status runs of one L2 table, classified once and kept with the cached table.

A :class:`TableRuns` holds the runs of cluster kinds (data, compressed, zero,
unallocated) over one L2 table's guest span; every block-status context of
the top layer (``base:allocation``, ``qemu:allocation-depth``) is those runs
with each kind mapped to the context's value (:meth:`TableRuns.column`),
derived once per context and kept with the kinds. The layer attaches it to the
table in the :class:`~pynbd.image.qcow2.l2cache.TableCache`, so a block-status
request costs a slice per table instead of work per cluster.
"""

from __future__ import annotations

from collections.abc import Iterable

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
    """One L2 table classified once: the runs of cluster kinds over its guest span, and
    the runs of each context derived from them on first use (:meth:`column`).

    A context's runs are the kinds' runs with the values mapped: where the
    mapping keeps neighbours apart (a table with data and unallocated
    clusters, but no zero clusters, for both contexts), they share the kinds'
    run boundaries and only the value bytes are rewritten (:meth:`SpanRuns.mapped`),
    so a second context costs microseconds instead of a second classification.
    """

    __slots__ = ("kinds", "_columns")

    def __init__(self, kinds: SpanRuns) -> None:
        self.kinds = kinds
        self._columns: dict[tuple[int, ...], SpanRuns] = {}

    @classmethod
    def classify(cls, start: int, pieces: Iterable[Run]) -> TableRuns:
        lengths, kinds = piece_columns(pieces)
        return cls(SpanRuns(start, Runs(lengths, kinds)))

    def column(self, value_of_kind: tuple[int, ...]) -> SpanRuns:
        """The runs with each kind ``k`` reported as ``value_of_kind[k]`` (neighbours merged)."""
        runs = self._columns.get(value_of_kind)
        if runs is None:
            runs = self._columns[value_of_kind] = self.kinds.mapped(value_of_kind)
        return runs

    @property
    def allocation(self) -> SpanRuns:
        return self.column(ALLOCATION_OF_KIND)

    @property
    def depth(self) -> SpanRuns:
        return self.column(TOP_DEPTH_OF_KIND)

    @property
    def nbytes(self) -> int:
        """Bytes to count against the cache budget: the kinds, and the two contexts'
        runs (derived on first use) at their size when they share the kinds' boundaries
        (their values only, half the kinds' bytes each)."""
        return 2 * self.kinds.nbytes


#: Marks a table that has a corrupt entry (its runs are not cached).
CORRUPT_TABLE = TableRuns(SpanRuns(0, Runs([], [])))
