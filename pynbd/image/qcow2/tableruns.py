"""Block-status runs of one L2 table, classified once and kept with the cached table.

A :class:`TableRuns` holds the cluster kinds (data, compressed, zero,
unallocated, and data over host-file holes where the layer asks the host file)
over one L2 table's guest span; every block-status context of
the top layer (``base:allocation``, ``qemu:allocation-depth``) is those kinds
with each mapped to the context's value (:meth:`TableRuns.column`), derived
once per context and kept with the kinds. The kinds are runs, or for a
standard L2 table one byte per cluster (:class:`ClusterKinds`), whose context
runs come from byte operations (:mod:`pynbd.unitruns`). The layer
attaches it to the table in the :class:`~pynbd.image.qcow2.l2cache.TableCache`,
so a block-status request costs a slice per table instead of work per cluster.
"""

from __future__ import annotations

from collections.abc import Iterable

from pynbd.image.base import STATE_DATA, STATE_DATA_ZERO, STATE_HOLE_ZERO
from pynbd.image.qcow2.chain import (
    KIND_COMPRESSED,
    KIND_DATA,
    KIND_EOF,
    KIND_HOST_HOLE,
    KIND_UNALLOC,
    KIND_ZERO,
    RESOLVED_ABSENT,
    RESOLVED_SHORT,
    Run,
)
from pynbd.unitruns import unit_runs
from pynbd.runlength import Runs
from pynbd.runspans import SpanRuns

#: Per kind (chain.KIND_* and chain.RESOLVED_*): its base:allocation state.
ALLOCATION_OF_KIND = (
    STATE_DATA,  # KIND_DATA
    STATE_DATA,  # KIND_COMPRESSED
    STATE_HOLE_ZERO,  # KIND_ZERO
    STATE_HOLE_ZERO,  # KIND_UNALLOC
    STATE_DATA_ZERO,  # KIND_HOST_HOLE
    STATE_HOLE_ZERO,  # KIND_EOF
    STATE_HOLE_ZERO,  # RESOLVED_SHORT
    STATE_HOLE_ZERO,  # RESOLVED_ABSENT
)
#: Per layer kind of an L2 table: its qemu:allocation-depth when it is the top layer's answer.
TOP_DEPTH_OF_KIND = (1, 1, 1, 0, 1)  # DATA, COMPRESSED, ZERO, UNALLOC, HOST_HOLE
assert (KIND_DATA, KIND_COMPRESSED, KIND_ZERO, KIND_UNALLOC, KIND_HOST_HOLE, KIND_EOF, RESOLVED_SHORT,
        RESOLVED_ABSENT) == tuple(range(8))


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
            runs = self._columns[value_of_kind] = self._derive(value_of_kind)
        return runs

    def _derive(self, value_of_kind: tuple[int, ...]) -> SpanRuns:
        return self.kinds.mapped(value_of_kind)

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


class ClusterKinds(TableRuns):
    """A table classified as one kind byte per cluster (a standard L2 table, see
    ``Qcow2Layer._classify_plain_table``). Its runs come from the bytes with no work per
    run (:func:`~pynbd.unitruns.unit_runs`): the kinds' runs once, and each
    context's from them with the values rewritten, or where the context merges kinds
    (zero and unallocated clusters are both holes for ``base:allocation``), from the
    bytes mapped.
    """

    __slots__ = ("start", "cluster_bits", "span", "kind_runs", "_kind_span")

    def __init__(self, start: int, kinds: bytes, cluster_bits: int, span: int, kind_runs: int) -> None:
        self.kinds = kinds  # type: ignore[assignment]
        self._columns = {}
        self.start = start
        self.cluster_bits = cluster_bits
        self.span = span
        #: How many runs the kinds make: no context has more.
        self.kind_runs = kind_runs
        self._kind_span: SpanRuns | None = None

    def _derive(self, value_of_kind: tuple[int, ...]) -> SpanRuns:
        kinds: bytes = self.kinds  # type: ignore[assignment]
        present = [k for k in range(len(value_of_kind)) if k in kinds]
        mapped = {value_of_kind[k] for k in present}
        if max(value_of_kind) > 0xFF:  # not bytes: the general mapping
            return self._kinds_span().mapped(value_of_kind)
        table = bytearray(range(256))
        table[:len(value_of_kind)] = bytes(value_of_kind)
        if len(mapped) == len(present) > 1:  # the context keeps the kinds apart: their runs, revalued
            kind_span = self._kinds_span()
            if kind_span.packed is None:  # a run longer than a u32
                return kind_span.mapped(value_of_kind)
            return kind_span.revalued(kind_span.packed[7::8].translate(table))
        return unit_runs(self.start, kinds.translate(table), self.cluster_bits, self.span)

    def _kinds_span(self) -> SpanRuns:
        """The kinds' runs (made on first use)."""
        if self._kind_span is None:
            self._kind_span = unit_runs(self.start, self.kinds, self.cluster_bits,  # type: ignore[arg-type]
                                        self.span)
        return self._kind_span

    @property
    def nbytes(self) -> int:
        """The kind bytes, and the kinds' and both contexts' runs at their largest (a u16
        start and a packed pair a run each)."""
        return len(self.kinds) + 3 * (2 + 8) * self.kind_runs


#: Marks a table that has a corrupt entry (its runs are not cached).
CORRUPT_TABLE = TableRuns(SpanRuns(0, Runs([], [])))
