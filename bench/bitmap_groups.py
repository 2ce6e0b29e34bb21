"""Dirty-bitmap groups of the end-to-end benchmark (``bench/e2e.py``), pynbd against qemu-nbd.

- ``bitmap-write-N`` / ``bitmap-write-allocated-N`` (N = 0, 1, 4): the qcow2 write groups
  (nbdcopy 1 and 4 connections with ``--flush`` into an empty image, fio 4 KiB random writes
  into an empty and into an allocated one) on a target with N enabled persistent bitmaps
  (``qemu-img bitmap --add``). pynbd exports every bitmap by itself; qemu-nbd gets ``-B`` for
  each and ``--discard=unmap`` (TRIM reaches the image, as with pynbd). After each write,
  with the server up, every bitmap must show the writes (NBD spec "Block status metadata
  context", ``qemu:dirty-bitmap:NAME``). :func:`recording_cost` reports N bitmaps against 0.
- ``bitmap-map`` / ``bitmap-map-qemu``: block status of a bitmap that the server itself
  has just dirtied: a 100 × ``--size`` qcow2 with one enabled bitmap gets 4 KiB written
  every 1 MiB through the server being measured (fio), then ``nbdinfo --map`` (the first
  map after the writes and the median of the reps), the first map once the writes have
  stopped for a second (``bitmap-map-pause``: a backup reads after the writes), or QEMU's
  one-extent-per-request scan (``qemu-img map`` with ``x-dirty-bitmap``), each on a server
  started for it.

Imported by ``e2e.build_groups`` once ``e2e`` is loaded (it imports ``e2e``, so not at
e2e's top); everything here runs on the benchmark's main thread.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from e2e import (
    NO_IMAGE,
    BenchError,
    Group,
    Images,
    KiB,
    MiB,
    Results,
    ServerSpec,
    TargetMaker,
    Workloads,
    WriteCheck,
    copy_target,
    metric,
    run_cmd,
    write_groups,
)

#: Bitmap counts of the write groups; 0 is the reference for the cost of recording.
BITMAP_COUNTS = (0, 1, 4)
#: Granularity of every bitmap made here (qemu-img's default for 64 KiB clusters, made explicit
#: because the expected maps depend on it).
GRANULARITY = 64 * KiB
#: The fragmented map: one 4 KiB write every STRIDE, so one dirty granule every STRIDE.
STRIDE = 1 * MiB
WRITE_SIZE = 4 * KiB
#: The map groups' export is this many times ``--size`` (100 GiB at the default 1 GiB).
MAP_SCALE = 100
MAP_BITMAP = "b0"


def bitmap_names(count: int) -> list[str]:
    """Names of the ``count`` bitmaps of a target: b0, b1, ..."""
    return [f"b{i}" for i in range(count)]


def add_bitmaps(path: str, names: list[str]) -> None:
    """Add enabled persistent bitmaps ``names`` to the qcow2 at ``path``; BenchError on failure."""
    for name in names:
        run_cmd(["qemu-img", "bitmap", "--add", "--granularity", str(GRANULARITY), path, name],
                timeout=60, what="qemu-img bitmap --add")


def empty_target_with_bitmaps(count: int) -> TargetMaker:
    """An empty qcow2 (qemu-img's defaults: 64 KiB clusters) with ``count`` enabled bitmaps."""
    def make(path: Path, size: int, images: Images) -> None:
        run_cmd(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], timeout=60,
                what="qemu-img create")
        add_bitmaps(str(path), bitmap_names(count))
    return make


def allocated_target_with_bitmaps(count: int) -> TargetMaker:
    """A copy of the fully allocated ``qcow2-full`` image with ``count`` enabled bitmaps."""
    copy = copy_target("qcow2-full")

    def make(path: Path, size: int, images: Images) -> None:
        copy(path, size, images)
        add_bitmaps(str(path), bitmap_names(count))
    return make


def preallocated_target_with_bitmap(path: Path, size: int, images: Images) -> None:
    """A sparse qcow2 of ``size`` with metadata preallocated (every cluster has its host
    cluster, the host file is all holes) and bitmap ``MAP_BITMAP``: the map groups' writes
    overwrite, so the target stays small (4 KiB of data per write) instead of allocating a
    64 KiB cluster each (qemu-nbd zero-fills the rest of it with fallocate)."""
    run_cmd(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", str(path), str(size)],
            timeout=120, what="qemu-img create")
    add_bitmaps(str(path), [MAP_BITMAP])


def dirty_runs(uri: str, name: str) -> list[tuple[int, int, bool]]:
    """(offset, length, dirty) of every extent of ``qemu:dirty-bitmap:NAME`` as the live
    server reports it (``nbdinfo --map``); BenchError if it cannot."""
    proc = run_cmd(["nbdinfo", f"--map=qemu:dirty-bitmap:{name}", uri], timeout=120,
                   what=f"nbdinfo --map of bitmap {name}")
    runs = []
    try:
        for line in proc.stdout.splitlines():
            if line.strip():
                offset, length, flags = line.split()[:3]
                runs.append((int(offset), int(length), bool(int(flags) & 1)))
    except ValueError:
        raise BenchError(f"nbdinfo --map of bitmap {name}: cannot parse {line!r}") from None
    return runs


def check_recorded(names: list[str]) -> WriteCheck:
    """An ``after_write`` check (see ``e2e.write_groups``): every bitmap in ``names`` shows
    the step's writes, all the same (they were all clean before the same writes); all dirty
    when the step wrote the whole export. Raises BenchError naming the bitmap."""
    def check(w: Workloads, uri: str, size: int, whole: bool) -> None:
        maps = {name: dirty_runs(uri, name) for name in names}
        for name, runs in maps.items():
            dirty = sum(length for _, length, is_dirty in runs if is_dirty)
            if dirty == 0:
                raise BenchError(f"bitmap {name} is clean after the writes (not recorded)")
            if whole and dirty != size:
                raise BenchError(f"bitmap {name}: {dirty} of {size} bytes dirty after writing all of them")
        first = maps[names[0]]
        for name in names[1:]:
            if maps[name] != first:
                raise BenchError(f"bitmaps {names[0]} and {name} differ after the same writes")
    return check


def write_key(count: int, allocated: bool) -> str:
    return f"bitmap-write-{'allocated-' if allocated else ''}{count}"


def bitmap_write_groups(servers: list[ServerSpec]) -> list[Group]:
    """The qcow2 write groups on targets with 0, 1 and 4 enabled bitmaps (module doc)."""
    groups = []
    for count in BITMAP_COUNTS:
        names = bitmap_names(count)
        qemu_args = ["--discard=unmap"] + [arg for name in names for arg in ("-B", name)]
        groups += write_groups(
            "qcow2", "unix", servers,
            keys=(write_key(count, False), write_key(count, True)),
            title=f"qcow2, {count} enabled bitmap{'' if count == 1 else 's'}, unix",
            targets=(empty_target_with_bitmaps(count), allocated_target_with_bitmaps(count)),
            extra={"qemu-nbd": qemu_args},
            after_write=check_recorded(names) if names else None,
        )
    return groups


def expected_map_extents(size: int) -> int:
    """Extents of ``MAP_BITMAP`` after one ``WRITE_SIZE`` write every ``STRIDE`` from 0:
    a dirty granule per write, a clean run between two, and one after the last if any."""
    writes = math.ceil(size / STRIDE)
    tail_clean = (writes - 1) * STRIDE + GRANULARITY < size
    return 2 * writes - 1 + int(tail_clean)


def dirty_fragmented(w: Workloads, uri: str, size: int) -> float:
    """Write ``WRITE_SIZE`` every ``STRIDE`` of the export through the server (fio's nbd
    engine, 16 in flight); returns fio's IOPS. BenchError if fio fails or did fewer writes."""
    writes = math.ceil(size / STRIDE)
    out = w.st.workdir / "fio-fill.json"
    argv = ["fio", "--name=dirty", "--ioengine=nbd", f"--uri={uri}", f"--rw=write:{STRIDE - WRITE_SIZE}",
            f"--bs={WRITE_SIZE}", "--iodepth=16", "--numjobs=1", f"--size={size}", f"--number_ios={writes}",
            "--output-format=json", f"--output={out}"]
    run_cmd(argv, timeout=600, what="fio (dirtying the bitmap)")
    try:
        job = json.loads(out.read_text())["jobs"][0]
        done, iops = int(job["write"]["total_ios"]), float(job["write"]["iops"])
    except (OSError, ValueError, KeyError, IndexError) as exc:
        raise BenchError(f"fio (dirtying the bitmap): cannot parse output: {exc}") from None
    if done != writes:
        raise BenchError(f"fio (dirtying the bitmap): {done} writes, expected {writes}")
    return iops


def check_map_extents(what: str, got: int, size: int) -> None:
    expected = expected_map_extents(size)
    if got != expected:
        raise BenchError(f"{what}: {got} extents after the writes, expected {expected} (writes not recorded?)")


#: How long the writes have stopped when the ``bitmap-map-pause`` map starts.
MAP_PAUSE = 1.0


def bitmap_map_groups(servers: list[ServerSpec]) -> list[Group]:
    """``bitmap-map`` (nbdinfo --map) and ``bitmap-map-qemu`` (qemu-img map, x-dirty-bitmap)
    of a bitmap the server has just dirtied (module doc). Targets in memory: removing one
    from the run's ext4 (``discard``) took ~20 s after the writes, longer than the steps."""
    context = f"qemu:dirty-bitmap:{MAP_BITMAP}"
    title = f"dirty bitmap just written through the server (qcow2, {MAP_SCALE}× virtual size, 4 KiB every 1 MiB)"
    fill = metric("bitmap-map/fill-iops", f"{title}: the writes, fio nbd QD16", "IOPS")
    first = metric("bitmap-map/first-map-ms", f"{title}: first nbdinfo --map after the writes", "ms",
                   higher_better=False)
    per_map = metric("bitmap-map/map-ms", f"{title}: time per full map (nbdinfo --map)", "ms",
                     higher_better=False)
    rate = metric("bitmap-map/extents-per-s", f"{title}: block status, nbdinfo --map", "extents/s")
    paused = metric("bitmap-map-pause/first-map-ms",
                    f"{title}: first nbdinfo --map {MAP_PAUSE:g} s after the writes", "ms", higher_better=False)
    qemu_rate = metric("bitmap-map-qemu/qemu-map-extents-per-s",
                       f"{title}: block status, qemu-img map, x-dirty-bitmap (REQ_ONE)", "extents/s")

    def nbdinfo_maps(w: Workloads, uri: str, size: int) -> dict[str, float]:
        iops = dirty_fragmented(w, uri, size)
        extents_per_s, ms, first_ms, n = w.block_status(uri, context)
        check_map_extents("nbdinfo --map", n, size)
        return {fill.key: iops, first.key: first_ms, per_map.key: ms, rate.key: extents_per_s,
                "bitmap-map/extents": n}

    def nbdinfo_map_after_a_pause(w: Workloads, uri: str, size: int) -> dict[str, float]:
        dirty_fragmented(w, uri, size)
        time.sleep(MAP_PAUSE)  # (a backup reads the bitmap after the writes, not during them)
        _, _, first_ms, n = w.block_status(uri, context)
        check_map_extents("nbdinfo --map", n, size)
        return {paused.key: first_ms, "bitmap-map-pause/extents": n}

    def qemu_scan(w: Workloads, uri: str, size: int) -> dict[str, float]:
        dirty_fragmented(w, uri, size)
        extents_per_s, n = w.qemu_map(uri, context)
        check_map_extents("qemu-img map", n, size)
        return {qemu_rate.key: extents_per_s, "bitmap-map-qemu/extents": n}

    common = dict(image=NO_IMAGE, fmt="qcow2", transport="unix", servers=servers,
                  extra={"qemu-nbd": ["--discard=unmap", "-B", MAP_BITMAP]}, context=context,
                  target=preallocated_target_with_bitmap, size_scale=MAP_SCALE, target_in_memory=True)
    return [
        Group("bitmap-map", title, steps=[([fill, first, per_map, rate], nbdinfo_maps)], **common),
        Group("bitmap-map-pause", title, steps=[([paused], nbdinfo_map_after_a_pause)], **common),
        Group("bitmap-map-qemu", title, steps=[([qemu_rate], qemu_scan)], **common),
    ]


def recording_cost(res: Results, groups: list[Group]) -> list[str]:
    """A table of each server's write figures with 1 and 4 bitmaps against 0 (value / value
    with 0 bitmaps, so 0.90 is 10 % slower), for the bitmap-write groups that ran; [] if none."""
    ran = {g.key: g for g in groups}
    counts = [c for c in BITMAP_COUNTS if write_key(c, False) in ran or write_key(c, True) in ran]
    if 0 not in counts or len(counts) < 2:
        return []
    others = [c for c in counts if c]
    lines = [
        "| workload | server | " + " | ".join(f"{c} bitmap{'' if c == 1 else 's'}" for c in counts) + " | "
        + " | ".join(f"{c} vs 0" for c in others) + " |",
        "|---|---|" + "---:|" * (len(counts) + len(others)),
    ]
    for allocated in (False, True):
        base = ran.get(write_key(0, allocated))
        if base is None:
            continue
        for m in base.metrics:
            step = m.key.split("/", 1)[1]
            label = m.title.split(": ", 1)[1]
            for spec in base.servers:
                values = {c: res.value(f"{write_key(c, allocated)}/{step}", spec.id) for c in counts}
                if values[0] is None:
                    continue
                cells = [f"{v:,.0f}" if v is not None else "n/a" for v in values.values()]
                ratios = [f"{values[c] / values[0]:.2f}" if values[c] is not None else "n/a" for c in others]
                lines.append(f"| {label} ({m.unit}) | {spec.id} | " + " | ".join(cells + ratios) + " |")
    return lines
