"""qcow2 refcount table, blocks and cluster allocator (pynbd/image/qcow2/refcounts.py).

On real images from ``qemu-img create``: the refcounts read are what ``qemu-img
check`` implies; clusters allocated and written with write_allocations() are
exactly the leaks ``qemu-img check`` finds (the refcounts on disk are right),
and after free() + apply_frees() there are none; creating refcount blocks and
growing the refcount table leaves no corruption. Then a model (host cluster ->
refcount) under random allocations, frees, increments, writes and leases, with
a reopen and ``qemu-img check`` at the end; then the errors.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from pynbd.image.base import HostSegment, ImageError, ImageIOError
from pynbd.image.leases import HostLeases
from pynbd.image.qcow2.header import parse_header
from pynbd.image.qcow2.refcounts import Refcounts

pytestmark = pytest.mark.needs("qemu-img", "qemu-io")


def create(path: Path, cluster_size: int, refcount_bits: int, size: str = "64M") -> Path:
    subprocess.run(["qemu-img", "create", "-f", "qcow2", "-o",
                    f"cluster_size={cluster_size},refcount_bits={refcount_bits}", str(path), size],
                   check=True, capture_output=True)
    return path


def check(path: Path) -> dict[str, int]:
    """``qemu-img check``: its JSON report, which must show no corruption."""
    proc = subprocess.run(["qemu-img", "check", "--output=json", str(path)], capture_output=True, text=True)
    assert proc.returncode in (0, 3), f"qemu-img check exit {proc.returncode}:\n{proc.stderr[:3000]}"
    report = json.loads(proc.stdout)
    assert report.get("corruptions", 0) == 0 and report.get("check-errors", 0) == 0
    return report


@contextmanager
def opened(path: Path, leases: HostLeases | None = None) -> Iterator[tuple[int, Refcounts]]:
    """The file open read-write and a Refcounts on it (the header parsed afresh)."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        yield fd, Refcounts(fd, str(path), parse_header(str(path), fd, size), size, leases)
    finally:
        os.close(fd)


def write_data(fd: int, offset: int, count: int, cluster_size: int) -> None:
    """What the writer does with clusters it allocated: whole clusters of data."""
    os.pwrite(fd, b"\xa5" * (count * cluster_size), offset)


# --- real images --------------------------------------------------------------------------


@pytest.mark.parametrize("cluster_size", [512, 4096, 65536])
@pytest.mark.parametrize("refcount_bits", [1, 2, 4, 8, 16, 32, 64])
def test_allocations_are_leaks_until_freed(tmp_path: Path, cluster_size: int, refcount_bits: int) -> None:
    path = create(tmp_path / "a.qcow2", cluster_size, refcount_bits)
    metadata_end = check(path)["image-end-offset"]
    runs = [1, 3, 1, 70]  # 70 spans two refcount blocks at 512-byte clusters, 64 bits
    with opened(path) as (fd, rc):
        # A fresh image is all metadata, every cluster counted once.
        assert rc.end() == metadata_end and not rc.dirty
        assert [rc.get(c * cluster_size) for c in range(metadata_end // cluster_size)] == \
            [1] * (metadata_end // cluster_size)
        assert rc.get(metadata_end) == 0 and rc.get(1 << 50) == 0
        offsets = []
        for count in runs:
            offsets.append(rc.allocate(count))
            write_data(fd, offsets[-1], count, cluster_size)
            assert offsets[-1] % cluster_size == 0 and offsets[-1] >= metadata_end
            assert all(rc.get(offsets[-1] + i * cluster_size) == 1 for i in range(count))
        assert rc.dirty
        rc.write_allocations()
        assert not rc.dirty
    assert check(path).get("leaks", 0) == sum(runs)
    with opened(path) as (fd, rc):  # what was written reads back
        assert all(rc.get(off + i * cluster_size) == 1 for off, count in zip(offsets, runs) for i in range(count))
        for off, count in zip(offsets, runs):
            rc.free(off, count)
        assert rc.get(offsets[0]) == 1  # deferred
        rc.apply_frees()
        assert rc.get(offsets[0]) == 0 and not rc.dirty
        assert rc.allocate(1) == offsets[0]  # reusable at once without leases
    assert check(path).get("leaks", 0) == 0


@pytest.mark.parametrize("refcount_bits", [16, 64])
def test_refcount_blocks_and_table_growth(tmp_path: Path, refcount_bits: int) -> None:
    """512-byte clusters: a refcount table cluster has 64 entries, a block 256 or 64:
    thousands of clusters need new blocks and a table several times larger."""
    cs = 512
    path = create(tmp_path / "g.qcow2", cs, refcount_bits)
    pattern = [1, 2, 7, 300, 1, 65, 900]  # runs longer than a refcount block's range too
    total_wanted = 20000 if refcount_bits == 16 else 6000
    allocated: list[tuple[int, int]] = []
    fd = os.open(path, os.O_RDWR)
    try:
        header = parse_header(str(path), fd, os.fstat(fd).st_size)
        old_table = (header.refcount_table_offset, header.refcount_table_clusters)
        rc = Refcounts(fd, str(path), header, os.fstat(fd).st_size)
        while sum(n for _, n in allocated) < total_wanted:
            count = pattern[len(allocated) % len(pattern)]
            allocated.append((rc.allocate(count), count))
            write_data(fd, allocated[-1][0], count, cs)
        rc.write_allocations()
        on_disk = parse_header(str(path), fd, os.fstat(fd).st_size)
        new_table = (on_disk.refcount_table_offset, on_disk.refcount_table_clusters)
        assert new_table[1] > old_table[1] and new_table != old_table
        assert new_table == (header.refcount_table_offset, header.refcount_table_clusters)  # kept in step
        assert rc.dirty  # the old table's free waits for apply_frees
    finally:
        os.close(fd)
    clusters = sum(n for _, n in allocated)
    spans = sorted((off // cs, off // cs + n) for off, n in allocated)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # disjoint
    assert check(path)["leaks"] == clusters + old_table[1]
    with opened(path) as (fd, rc):
        assert all(rc.get(off + i * cs) == 1 for off, n in allocated for i in range(n))
        rc.apply_frees()  # nothing recorded in this instance
        rc.free(*old_table)
        rc.apply_frees()
    assert check(path)["leaks"] == clusters
    with opened(path) as (fd, rc):
        for off, n in allocated:
            rc.free(off, n)
        rc.apply_frees()
        assert rc.allocate(len(pattern)) < spans[-1][1] * cs  # holes are found again, not only the end
    assert check(path).get("leaks", 0) == 0


def test_freed_clusters_wait_for_leases(tmp_path: Path) -> None:
    cs = 4096
    path = create(tmp_path / "l.qcow2", cs, 16)
    leases = HostLeases()
    with opened(path, leases) as (fd, rc):
        first = rc.allocate(3)
        write_data(fd, first, 3, cs)
        rc.write_allocations()
        lease = leases.lease([HostSegment(cs, fd, first + cs)])  # a READ sending the middle cluster
        lease.__enter__()
        rc.free(first, 3)
        rc.apply_frees()
        assert [rc.get(first + i * cs) for i in range(3)] == [0, 0, 0]
        other = rc.allocate(1)
        assert not first <= other < first + 3 * cs and rc.get(other) == 1
        lease.__exit__(None, None, None)
        assert rc.allocate(3) == first  # back once the read is sent


def test_put_back_by_the_event_loop_thread(tmp_path: Path) -> None:
    """As served: frees in a worker thread, the lease ending on the loop thread, which
    runs the put-back without the metadata lock (it only queues the clusters)."""
    cs = 4096
    path = create(tmp_path / "t.qcow2", cs, 16)
    leases = HostLeases()
    with opened(path, leases) as (fd, rc):
        first = rc.allocate(1)
        write_data(fd, first, 1, cs)
        rc.write_allocations()

        def free_then_allocate() -> int:
            rc.free(first)
            rc.apply_frees()  # when_unpinned() posts its decision to the loop
            return rc.allocate(1)

        async def serve() -> tuple[int, int]:
            lease = leases.lease([HostSegment(cs, fd, first)])
            lease.__enter__()  # on the loop: it becomes the one deciding
            while_leased = await asyncio.to_thread(free_then_allocate)
            lease.__exit__(None, None, None)
            return while_leased, await asyncio.to_thread(rc.allocate, 1)

        while_leased, after = asyncio.run(serve())
        assert while_leased != first and after == first


def test_free_bytes_counts_every_touched_cluster(tmp_path: Path) -> None:
    cs = 4096
    path = create(tmp_path / "c.qcow2", cs, 16)
    with opened(path) as (fd, rc):
        first = rc.allocate(3)
        rc.increment(first + cs)  # shared by two compressed clusters
        rc.free_bytes(first + cs - 10, 20)  # touches the first two
        rc.free_bytes(first + cs + 100, 200)  # the second only
        rc.apply_frees()
        assert [rc.get(first + i * cs) for i in range(3)] == [0, 0, 1]


# --- against a model ------------------------------------------------------------------------

#: (refcount_bits, whether the image already has data): 512-byte clusters, 8 MiB.
TEMPLATES = ((1, False), (2, False), (8, False), (16, False), (64, False), (64, True))
CS = 512


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[int, bool], Path]:
    where = tmp_path_factory.mktemp("refcount-templates")
    made = {}
    for bits, with_data in TEMPLATES:
        path = create(where / f"t{bits}{'d' if with_data else ''}.qcow2", CS, bits, "8M")
        if with_data:  # about 4000 clusters in use: close to the first table growth (4096 at 64 bits)
            subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 1900k", str(path)],
                           check=True, capture_output=True)
        made[bits, with_data] = path
    return made


ANY = st.integers(0, 1 << 20)
ALLOC = st.tuples(st.just("alloc"), st.integers(1, 12))
FREE = st.tuples(st.just("free"), ANY, st.integers(1, 3))
APPLY = st.tuples(st.just("apply"))
LEASE = st.tuples(st.just("lease"), ANY, st.integers(1, 4))
STEPS = st.lists(st.one_of(
    ALLOC, ALLOC, FREE, FREE, APPLY, APPLY, LEASE, LEASE,  # twice: more of them meet
    st.tuples(st.just("alloc"), st.integers(60, 300)),  # across refcount blocks
    st.tuples(st.just("free_bytes"), ANY, st.integers(0, CS - 1), st.integers(1, 700)),
    st.tuples(st.just("increment"), ANY),
    st.tuples(st.just("write")),
    st.tuples(st.just("unlease"), ANY),
), min_size=10, max_size=60)


class Model:
    """Refcounts of the clusters the test allocated; frees recorded; live leases."""

    def __init__(self, max_refcount: int) -> None:
        self.max = max_refcount
        self.refcount: dict[int, int] = {}
        self.pending: dict[int, int] = {}
        self.leases: list[tuple[AbstractContextManager[None], int, int]] = []

    def owned(self, pick: int) -> int | None:
        """One of the clusters followed, at one of 16 places (so that steps meet)."""
        keys = sorted(self.refcount)
        return keys[(pick % 16) * len(keys) // 16] if keys else None

    def owned_run(self, first: int, count: int) -> int:
        """How many of ``count`` clusters from ``first`` the test owns (a prefix)."""
        n = 0
        while n < count and first + n in self.refcount:
            n += 1
        return n

    def free(self, first: int, count: int, call: Callable[[], None]) -> None:
        """``call`` frees ``count`` clusters from ``first``: refused if one would go below 0."""
        clusters = range(first, first + count)
        if any(self.refcount[c] - self.pending.get(c, 0) < 1 for c in clusters):
            with pytest.raises(ImageIOError, match="below 0"):
                call()
            event("underflow refused")
            return
        call()
        for c in clusters:
            self.pending[c] = self.pending.get(c, 0) + 1

    def leased(self, cluster: int) -> bool:
        return any(start <= cluster < end for _, start, end in self.leases)

    def forget_reusable(self) -> None:
        """Stop following clusters at refcount 0 that no lease pins: the allocator may
        take them for its own metadata (a leased one must stay at 0)."""
        for c in [c for c, v in self.refcount.items() if v == 0 and not self.leased(c)]:
            del self.refcount[c]


def run_step(step: tuple, rc: Refcounts, fd: int, leases: HostLeases | None, model: Model) -> None:
    """Do ``step`` on ``rc`` and on the model (``leases``: what ``rc`` was given)."""
    kind = step[0]
    if kind == "alloc":
        count = step[1]
        offset = rc.allocate(count)
        assert offset % CS == 0
        for c in range(offset // CS, offset // CS + count):
            # never a cluster in use, freed but not applied (refcount > 0 still), or still leased
            assert model.refcount.get(c, 0) == 0 and not model.leased(c), f"cluster {c} reused"
            model.refcount[c] = 1
        write_data(fd, offset, count, CS)
    elif kind in ("free", "free_bytes"):
        first = model.owned(step[1])
        if first is None:
            return
        if kind == "free":
            count = model.owned_run(first, step[2])
            model.free(first, count, lambda: rc.free(first * CS, count))
        else:
            start = first * CS + step[2]
            length = step[3]
            touched = (start + length - 1) // CS - first + 1
            if model.owned_run(first, touched) < touched:
                length = CS - step[2]  # stay inside clusters the test owns
                touched = 1
            model.free(first, touched, lambda: rc.free_bytes(start, length))
    elif kind == "increment":
        c = model.owned(step[1])
        if c is None:
            return
        if model.refcount[c] == 0:
            with pytest.raises(ImageIOError, match="refcount 0"):
                rc.increment(c * CS)
        elif model.refcount[c] == model.max:
            with pytest.raises(ImageError, match="overflow"):
                rc.increment(c * CS)
            event("overflow refused")
        else:
            rc.increment(c * CS)
            model.refcount[c] += 1
    elif kind == "write":
        rc.write_allocations()
    elif kind == "apply":
        rc.apply_frees()
        if any(model.leased(c) for c in model.pending):
            event("freed while leased")
        for c, k in model.pending.items():
            model.refcount[c] -= k
        model.pending.clear()
        model.forget_reusable()
    elif kind == "lease":  # a READ sending clusters that are mapped (refcount > 0) now
        first = model.owned(step[1])
        if leases is None or first is None or model.refcount[first] == 0:
            return
        n = 1
        while n < step[2] and model.refcount.get(first + n, 0) > 0:
            n += 1
        lease = leases.lease([HostSegment(n * CS, fd, first * CS)])
        lease.__enter__()
        model.leases.append((lease, first, first + n))
    elif kind == "unlease" and model.leases:
        lease, _, _ = model.leases.pop(step[1] % len(model.leases))
        lease.__exit__(None, None, None)
        model.forget_reusable()


@pytest.mark.parametrize("use_leases", [False, True])
@pytest.mark.parametrize("template", TEMPLATES)
@settings(max_examples=25, deadline=None)
@given(steps=STEPS)
def test_against_model(templates: dict[tuple[int, bool], Path],
                       template: tuple[int, bool], use_leases: bool, steps: list[tuple]) -> None:
    """After every step get() is the model; allocations never take a cluster in use, freed
    but not applied, or leased; reopened after writing, the file has the same refcounts, and
    qemu-img check finds exactly the clusters the test holds as leaks, and no corruption."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch, "m.qcow2")
        shutil.copyfile(templates[template], path)
        before = check(path).get("leaks", 0)
        leases = HostLeases() if use_leases else None
        model = Model((1 << template[0]) - 1)
        with opened(path, leases) as (fd, rc):
            table_offset = parse_header(str(path), fd, os.fstat(fd).st_size).refcount_table_offset
            for step in steps:
                run_step(step, rc, fd, leases, model)
                assert {c: rc.get(c * CS) for c in model.refcount} == model.refcount, step
            run_step(("write",), rc, fd, leases, model)
            run_step(("apply",), rc, fd, leases, model)
            end = rc.end()
            if parse_header(str(path), fd, os.fstat(fd).st_size).refcount_table_offset != table_offset:
                event("refcount table moved")
            for lease, _, _ in model.leases:
                lease.__exit__(None, None, None)
        with opened(path) as (fd, rc):
            assert {c: rc.get(c * CS) for c in model.refcount} == model.refcount
            assert rc.end() == end
        assert check(path).get("leaks", 0) == before + sum(1 for v in model.refcount.values() if v)


# --- errors ---------------------------------------------------------------------------------


def test_refcount_table_outside_the_file(tmp_path: Path) -> None:
    path = create(tmp_path / "e.qcow2", 65536, 16)
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        header = parse_header(str(path), fd, size)
        header.refcount_table_offset = 1 << 30
        with pytest.raises(ImageError, match="refcount_table_offset=0x40000000 .*past the end of the file"):
            Refcounts(fd, str(path), header, size)
        header = parse_header(str(path), fd, size)
        header.refcount_table_clusters = 3  # inside, but runs past the end
        with pytest.raises(ImageError, match="refcount_table_offset=0x10000 .*past the end of the file"):
            Refcounts(fd, str(path), header, size)
        header.refcount_table_clusters, header.refcount_table_offset = 1, 65536 + 8
        with pytest.raises(ImageError, match="refcount_table_offset=0x10008 .*not aligned"):
            Refcounts(fd, str(path), header, size)
    finally:
        os.close(fd)


@pytest.mark.parametrize("entry, message", [
    ((2 << 16) | 1, "reserved bits"),
    ((2 << 16) + 512, "not aligned"),
    (1 << 40, "past the end of the file"),
])
def test_bad_refcount_table_entry(tmp_path: Path, entry: int, message: str) -> None:
    path = create(tmp_path / "e.qcow2", 65536, 16)
    with open(path, "r+b") as f:
        f.seek(65536)  # table entry 0
        f.write(entry.to_bytes(8, "big"))
    with opened(path) as (fd, rc):
        with pytest.raises(ImageIOError, match=f"refcount table entry 0 .*{message}"):
            rc.get(0)


def test_underflow_and_overflow(tmp_path: Path) -> None:
    cs = 65536
    path = create(tmp_path / "e.qcow2", cs, 1)
    with opened(path) as (fd, rc):
        free_cluster = rc.end()
        with pytest.raises(ImageIOError, match=f"at {free_cluster:#x} would take its refcount below 0"):
            rc.free(free_cluster)
        rc.free(0)  # the header, refcount 1: recorded
        with pytest.raises(ImageIOError, match="at 0x0 would take"):
            rc.free(0)  # the frees recorded count
        with pytest.raises(ImageIOError, match=f"at {free_cluster:#x} would take"):
            rc.free(free_cluster - cs, 2)  # all or nothing
        rc.apply_frees()
        assert (rc.get(0), rc.get(free_cluster - cs)) == (0, 1)
        with pytest.raises(ImageError, match="overflow .*refcount_bits=1"):
            rc.increment(cs)
        with pytest.raises(ImageIOError, match="refcount 0"):
            rc.increment(free_cluster)
        with pytest.raises(ValueError):
            rc.free(100)
        with pytest.raises(ValueError):
            rc.allocate(0)
