"""Where ``qemu-img create -f qcow2`` puts everything: the layout of a new qcow2 image.

Not merely an equivalent layout, the same one as QEMU 7.2, cluster for cluster:
:class:`_ClusterAllocator` replays the host cluster allocator QEMU runs while it
creates an image (block/qcow2-refcount.c: ``alloc_clusters_noref``,
``update_refcount`` with its undo-and-retry on ``-EAGAIN``,
``alloc_refcount_block``, ``qcow2_refcount_area``) and :func:`plan_qcow2` makes
the allocation calls QEMU makes (block/qcow2.c: ``qcow2_co_create``,
``qcow2_co_truncate``, ``preallocate_co``; block/qcow2-cluster.c:
``qcow2_alloc_host_offset``). So where every table lands, what a preallocated
guest cluster maps to and how long the file is match what ``qemu-img map`` and
``qemu-img check`` report for QEMU's own image. The structures are those of the
qcow2 spec (docs/interop/qcow2.txt in QEMU), sections 'Host cluster management'
and 'Cluster mapping'; :mod:`pynbd.tools.create` turns a layout into bytes.

Pure computation on the caller's thread; nothing here touches a file.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pynbd.image.qcow2.header import MAX_L1_BYTES, MAX_REFTABLE_BYTES

PREALLOC_MODES = ("off", "metadata", "falloc", "full")
#: Extended L2 entries split a cluster into 32 subclusters.
SUBCLUSTERS = 32
REFCOUNT_ORDER = 4  # 16-bit refcounts, qemu-img's default
_INT_MAX = (1 << 31) - 1


class LayoutError(Exception):
    """The image cannot be laid out (its tables would exceed QEMU's limits)."""


def round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def l1_entries(size: int, cluster_bits: int, extended_l2: bool) -> int:
    """L1 entries needed for a virtual size (qcow2 spec, 'Cluster mapping')."""
    span = (1 << cluster_bits) * l2_entries(cluster_bits, extended_l2)
    return -(-size // span)


def l2_entries(cluster_bits: int, extended_l2: bool) -> int:
    return (1 << cluster_bits) // (16 if extended_l2 else 8)


def refcount_metadata_blocks(clusters: int, cluster_size: int, generous: bool) -> int:
    """Refcount blocks needed to count ``clusters`` plus the refcount structures
    themselves: the fixed point QEMU's ``qcow2_refcount_metadata_size`` finds
    (with ``generous``, room for a table half as large again)."""
    blocks_per_table_cluster = cluster_size // 8
    per_block = cluster_size * 8 >> REFCOUNT_ORDER
    table = blocks = n = 0
    while True:
        last = n
        blocks = -(-(clusters + table + blocks) // per_block)
        table = -(-blocks // blocks_per_table_cluster)
        n = clusters + blocks + table
        if n == last and generous:
            clusters += -(-table // 2)
            n = 0
            generous = False
        elif n == last:
            return blocks


class _Retry(Exception):
    """QEMU's -EAGAIN: new refcount metadata was placed; search for free clusters again."""


class _ClusterAllocator:
    """QEMU 7.2's host cluster allocator for an image that only grows.

    Refcounts during creation are 0 or 1, so one byte per cluster holds them.
    ``written_end`` is the file length the writes so far have produced.
    """

    def __init__(self, cluster_bits: int) -> None:
        self.cluster_size = 1 << cluster_bits
        self.per_block = self.cluster_size * 8 >> REFCOUNT_ORDER
        self.used = bytearray()
        # What qcow2_co_create writes before it opens the image: the header in
        # cluster 0, a one-cluster refcount table in cluster 1 naming the empty
        # refcount block in cluster 2.
        self.reftable: list[int] = [2] + [0] * (self.cluster_size // 8 - 1)
        self.reftable_cluster = 1
        self.free_index = 0
        self.written_end = 3 * self.cluster_size
        #: Refcount tables replaced by bigger ones: (cluster, entries) as left in the file.
        self.old_reftables: list[tuple[int, list[int]]] = []
        if self.alloc(3) != 0:
            raise AssertionError("the header cluster is not the first free cluster")

    # --- refcount state -----------------------------------------------------------------

    def _grow(self, end: int) -> None:
        if end > len(self.used):
            self.used.extend(bytes(max(end - len(self.used), len(self.used) // 2)))

    def _set(self, start: int, count: int, value: int) -> None:
        self._grow(start + count)
        self.used[start:start + count] = bytes([value]) * count

    def last_used(self) -> int:
        return self.used.rfind(1)

    def extend_file(self, end: int) -> None:
        """Something was written up to byte ``end``: the file is at least that long."""
        self.written_end = max(self.written_end, end)

    def wrote(self, cluster: int, count: int) -> None:
        self.extend_file((cluster + count) * self.cluster_size)

    # --- QEMU's allocation functions ---------------------------------------------------

    def _alloc_noref(self, count: int) -> int:
        """alloc_clusters_noref: the first ``count`` free clusters from the free index on."""
        start = self.free_index
        while True:
            self._grow(start + count)
            busy = self.used.rfind(1, start, start + count)
            if busy < 0:
                self.free_index = start + count
                return start
            start = busy + 1

    def _update_refcount(self, start: int, count: int) -> None:
        """update_refcount(+1): raises _Retry after undoing its partial increments."""
        pos = start
        while pos < start + count:
            block_end = min(start + count, (pos // self.per_block + 1) * self.per_block)
            try:
                self._alloc_refcount_block(pos)
            except _Retry:
                # QEMU retries the same clusters first, and undoes the increments so far.
                self.free_index = min(self.free_index, start)
                self._set(start, pos - start, 0)
                raise
            self._set(pos, block_end - pos, 1)
            pos = block_end

    def _free(self, start: int, count: int) -> None:
        self._set(start, count, 0)
        self.free_index = min(self.free_index, start)

    def _alloc_refcount_block(self, index: int) -> None:
        """alloc_refcount_block: make the block counting cluster ``index`` exist."""
        table_index = index // self.per_block
        if table_index < len(self.reftable) and self.reftable[table_index]:
            return
        new_block = self._alloc_noref(1)
        if new_block // self.per_block == table_index:
            self._set(new_block, 1, 1)  # the block counts itself
        else:
            self._update_refcount(new_block, 1)
        self.wrote(new_block, 1)
        if table_index < len(self.reftable):
            self.reftable[table_index] = new_block
            raise _Retry
        blocks_used = -(-max(index + 1, new_block + 1) // self.per_block)
        self.refcount_area(blocks_used * self.per_block, 0, False, table_index, new_block)
        raise _Retry

    def refcount_area(self, start: int, additional: int, exact: bool,
                      new_index: int = 0, new_block: int = 0) -> int:
        """qcow2_refcount_area: at cluster ``start`` (the end of the used space), a new
        refcount table and the blocks that count it and ``additional`` clusters after
        it; switches to the new table, frees the old one. Returns the first cluster
        after the new structures."""
        cs = self.cluster_size
        total_blocks = refcount_metadata_blocks(start + additional, cs, not exact)
        area_index = start // self.per_block
        table_size = total_blocks if exact else total_blocks + -(-total_blocks // 2)
        table_size = round_up(table_size, cs // 8)
        if table_size * 8 > MAX_REFTABLE_BYTES:
            raise LayoutError(f"its refcount table would exceed {MAX_REFTABLE_BYTES >> 20} MiB")
        top = max((i for i, block in enumerate(self.reftable) if block), default=0)
        keep = top + 1 if table_size > top else table_size
        table = self.reftable[:keep] + [0] * (table_size - keep)
        if new_block:
            table[new_index] = new_block
        missing = sum(1 for i in range(area_index, total_blocks) if not table[i])
        table_cluster = start + missing
        end = table_cluster + table_size * 8 // cs
        block = start
        for i in range(area_index, total_blocks):
            if not table[i]:
                table[i] = block
                block += 1
        self._set(start, end - start, 1)
        self.wrote(start, end - start)
        old_cluster, old_clusters = self.reftable_cluster, len(self.reftable) * 8 // cs
        self.old_reftables.append((old_cluster, self.reftable))
        self.reftable, self.reftable_cluster = table, table_cluster
        self._free(old_cluster, old_clusters)
        return end

    def alloc(self, count: int) -> int:
        """qcow2_alloc_clusters: ``count`` contiguous clusters, refcounted."""
        while True:
            start = self._alloc_noref(count)
            try:
                self._update_refcount(start, count)
                return start
            except _Retry:
                continue

    def alloc_at(self, start: int, count: int) -> int:
        """qcow2_alloc_clusters_at: as many of ``count`` clusters from ``start`` as are free."""
        while True:
            self._grow(start + count)
            busy = self.used.find(1, start, start + count)
            free = count if busy < 0 else busy - start
            try:
                if free:
                    self._update_refcount(start, free)
                return free
            except _Retry:
                continue


@dataclass
class Qcow2Layout:
    """Where everything of a new qcow2 image lives. Positions are cluster numbers,
    except in ``zero_tail`` and ``file_length`` (bytes)."""

    size: int
    cluster_bits: int
    extended_l2: bool
    l1_cluster: int = 0
    l1_size: int = 0
    #: L1 index -> cluster of its L2 table.
    l2_tables: dict[int, int] = field(default_factory=dict)
    #: (first guest cluster, first host cluster, clusters) for every mapped guest cluster.
    data_runs: list[tuple[int, int, int]] = field(default_factory=list)
    reftable_cluster: int = 1
    reftable: list[int] = field(default_factory=list)
    refcounted: bytearray = field(default_factory=bytearray)
    #: Refcount tables QEMU outgrew while allocating: (cluster, entries); their
    #: clusters are free, and the bytes stay in the file unless reused.
    old_reftables: list[tuple[int, list[int]]] = field(default_factory=list)
    #: Clusters whose content preallocation provides (falloc/full), as (first, count).
    data_area: tuple[int, int] | None = None
    #: (byte offset, length) of zeros QEMU's copy-on-write writes into the last cluster.
    zero_tail: tuple[int, int] | None = None
    file_length: int = 0

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits


def plan_qcow2(size: int, cluster_bits: int, extended_l2: bool, preallocation: str) -> Qcow2Layout:
    """The layout qemu-img 7.2 gives ``size`` bytes (a multiple of 512) with these options.

    Raises LayoutError when QEMU's table limits refuse the size (L1 table over
    32 MiB, refcount table over 8 MiB).
    """
    cs = 1 << cluster_bits
    layout = Qcow2Layout(size, cluster_bits, extended_l2)
    layout.l1_size = l1_entries(size, cluster_bits, extended_l2)
    if layout.l1_size * 8 > MAX_L1_BYTES:
        raise LayoutError(f"its L1 table would exceed {MAX_L1_BYTES >> 20} MiB")
    alloc = _ClusterAllocator(cluster_bits)
    if layout.l1_size:  # qcow2_grow_l1_table writes exactly the entries, no padding
        layout.l1_cluster = alloc.alloc(-(-layout.l1_size * 8 // cs))
        alloc.extend_file(layout.l1_cluster * cs + layout.l1_size * 8)
    if preallocation == "metadata":
        _preallocate_metadata(alloc, layout)
    elif preallocation in ("falloc", "full"):
        _preallocate_data(alloc, layout)
    layout.reftable_cluster, layout.reftable = alloc.reftable_cluster, alloc.reftable
    layout.refcounted = alloc.used
    layout.old_reftables = alloc.old_reftables
    layout.file_length = alloc.written_end
    return layout


class _Mapper:
    """The L2 side of QEMU's preallocation: L2 tables on demand, data runs linked."""

    def __init__(self, alloc: _ClusterAllocator, layout: Qcow2Layout) -> None:
        self.alloc = alloc
        self.layout = layout
        self.span = l2_entries(layout.cluster_bits, layout.extended_l2)

    def l2_table(self, guest_cluster: int) -> None:
        """get_cluster_table: allocates the L2 table covering ``guest_cluster``."""
        index = guest_cluster // self.span
        if index not in self.layout.l2_tables:
            table = self.alloc.alloc(1)
            self.alloc.wrote(table, 1)
            self.layout.l2_tables[index] = table

    def clusters_to_table_end(self, guest_cluster: int) -> int:
        return self.span - guest_cluster % self.span

    def link(self, guest_cluster: int, host_cluster: int, count: int) -> None:
        self.layout.data_runs.append((guest_cluster, host_cluster, count))


def _preallocate_metadata(alloc: _ClusterAllocator, layout: Qcow2Layout) -> None:
    """preallocate_co: per qcow2_alloc_host_offset call, L2 tables and data runs in guest
    order; then the file grows to the end of the last run, and a partial last cluster
    gets QEMU's copy-on-write of zeros up to its (sub)cluster end."""
    cs = layout.cluster_size
    mapper = _Mapper(alloc, layout)
    offset, remaining = 0, layout.size
    host = done = 0
    while remaining:
        chunk = min(remaining, _INT_MAX // cs * cs)
        host, done = _alloc_host_offset(mapper, offset, chunk)
        offset += done
        remaining -= done
    if layout.size % cs:
        granule = cs // SUBCLUSTERS if layout.extended_l2 else cs
        last_guest = layout.size // cs
        last_host = next(h + last_guest - g for g, h, n in layout.data_runs if g <= last_guest < g + n)
        cow_end = round_up(layout.size, granule)
        if cow_end > layout.size:
            layout.zero_tail = (last_host * cs + layout.size % cs, cow_end - layout.size)
            alloc.extend_file(last_host * cs + cow_end - last_guest * cs)
    alloc.extend_file(host + done)  # preallocate_co's final truncate


def _alloc_host_offset(mapper: _Mapper, offset: int, length: int) -> tuple[int, int]:
    """qcow2_alloc_host_offset on an empty range: returns (host byte offset, bytes mapped).

    Each round looks up (allocating) the L2 table of the next guest cluster, then
    allocates data up to that table's end: fresh clusters in the first round,
    afterwards only a contiguous continuation of the previous run (stopping where
    the continuation is taken, typically by the L2 table just allocated).
    """
    cs = mapper.layout.cluster_size
    host = continuation = -1
    start, remaining, step = offset, length, 0
    while True:
        if host < 0 <= continuation:
            host = continuation
        start += step
        remaining -= step
        if continuation >= 0:
            continuation += step
        if not remaining:
            break
        guest_cluster = start // cs
        step = min(remaining, mapper.clusters_to_table_end(guest_cluster) * cs)
        mapper.l2_table(guest_cluster)
        want = -(-step // cs)
        if continuation < 0:
            first, got = mapper.alloc.alloc(want), want
        else:
            first = continuation // cs
            got = mapper.alloc.alloc_at(first, want)
            if not got:
                break
        mapper.link(guest_cluster, first, got)
        step = min(step, got * cs)
        continuation = first * cs
    return host, length - remaining


def _preallocate_data(alloc: _ClusterAllocator, layout: Qcow2Layout) -> None:
    """qcow2_co_truncate for falloc/full: one contiguous data area after a new refcount
    area sized for it, then the L2 tables (allocated as they are linked)."""
    cs = layout.cluster_size
    data_clusters = -(-layout.size // cs)
    mapper = _Mapper(alloc, layout)
    # One L2 table more than the data needs, as QEMU counts (a range need not start
    # at a table boundary); even an empty image gets a new refcount table.
    tables = -(-data_clusters // mapper.span) + 1
    start = alloc.refcount_area(alloc.last_used() + 1, data_clusters + tables, True)
    if alloc.alloc_at(start, data_clusters) != data_clusters:
        raise AssertionError("the new refcount area does not leave room for the data")
    if data_clusters:
        layout.data_area = (start, data_clusters)
    alloc.wrote(start, data_clusters)  # the file is extended over the data area
    guest = 0
    while guest < data_clusters:
        count = min(data_clusters - guest, mapper.clusters_to_table_end(guest))
        mapper.l2_table(guest)
        mapper.link(guest, start + guest, count)
        guest += count
