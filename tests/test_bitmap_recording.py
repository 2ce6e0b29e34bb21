"""Writes recorded into the persistent dirty bitmaps of a qcow2 image served writable,
with qemu-nbd (``--discard=unmap``, ``-B`` per bitmap) as the oracle.

The rule (qemu's bitmaps, NBD spec "Block status metadata context" for
``qemu:dirty-bitmap:NAME``): every WRITE, WRITE_ZEROES and TRIM dirties the granules its
range touches in every enabled bitmap (flag ``auto``) of the top image, whichever
connection sent it and whichever bitmaps the export names; disabled bitmaps, bitmaps
found in use at open and the backing files' bitmaps never change. A client sees the
change in block status as soon as the reply came, and after a clean stop the image holds
the bits: ``qemu-img info`` shows the flags as before, ``qemu-img check`` is clean and
qemu-nbd ``-B`` serves the same bits.

**Lists** (:func:`test_lists_record_like_qemu_nbd`): images with several bitmaps
(enabled and disabled ones holding bits of their own; granularities 512 B to 64 MiB,
equal to the cluster size or not; clusters 512 B to 2 MiB; sizes that end inside a
granule; a backing file with bitmaps of its own, one of the same name) get the same
seeded qemu-io list (tests/support/bitmaps.py: writes, FUA writes, zeroings with and
without NO_HOLE, discards and flushes, straddling granules and clusters) through the
subject and through qemu-nbd, each serving its copy. Whole-image maps come first (so
that whatever a server keeps or makes ahead is there); then, while serving, after a
restart (stopped by SIGINT) and from the files once both stopped (SIGTERM), each
bitmap's dirty ranges equal the model's (the granules the list touched added to the
bits it had; the oracle is checked against the model too), by nbdinfo and by the
REQ_ONE walk (``qemu-img map`` with ``x-dirty-bitmap``); ``qemu-img info`` shows the
flags and granularities as before, ``qemu-img check`` is clean, the backing files are
byte for byte as before. :func:`test_harness_self_check` runs qemu-nbd as the subject,
:func:`test_model_finds_a_missed_write` shows the comparison catches one write more.

Then: a write followed at once by block status on the same connection and on another
that had mapped the range before (libnbd), nbdcopy with 4 connections, a bitmap in use
at open (left out, named in a warning, untouched), and ``-B`` restricting the export
(every enabled bitmap records all the same).
"""

from __future__ import annotations

import json
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.bitmaps import (
    WRITE_THEN_MAP,
    BitmapSpec,
    bitmap_states,
    changed_ranges,
    context,
    create_image,
    describe_difference,
    expected_dirty,
    file_data_ranges,
    generate_changes,
    granules,
    qemu_io_local,
    qemu_nbd_dirty,
    req_one_dirty,
    served_contexts,
    served_dirty,
    serve_writable,
    sparse_source,
    total,
    uncovered,
    union,
)
from tests.support.qcow2_writes import file_digests, parse_command, run_tool, send_commands
from tests.support.servers import PynbdServer, QemuNbdServer, libnbd_script, nbdcopy

pytestmark = [pytest.mark.interop, pytest.mark.needs("qemu-img", "qemu-io", "qemu-nbd", "nbdinfo"),
              pytest.mark.timeout(120)]

KiB, MiB = 1 << 10, 1 << 20


@dataclass(frozen=True)
class Chain:
    """A qcow2 backing file with bitmaps of its own (dirtied by ``writes`` before the top
    image exists)."""

    size: int
    cluster: int
    bitmaps: tuple[BitmapSpec, ...]
    writes: tuple[str, ...]


@dataclass(frozen=True)
class Case:
    """One image of the matrix: the top image's geometry and bitmaps, the qemu-io
    commands that give them bits before serving, an optional backing file."""

    size: int
    cluster: int
    bitmaps: tuple[BitmapSpec, ...]
    prewrites: tuple[str, ...]
    backing: Chain | None = None
    count: int = 40
    max_zero: int = 8 * MiB

    @property
    def units(self) -> tuple[int, ...]:
        """The sizes whose edges the list's ranges straddle."""
        return tuple(sorted({512, self.cluster, *(b.granularity for b in self.bitmaps)}))


CASES = {
    # 64 KiB clusters; granularities below, at and above it; the size ends inside a granule.
    "c64k": Case(24 * MiB + 1536, 64 * KiB,
                 (BitmapSpec("e64k", 64 * KiB), BitmapSpec("e512", 512), BitmapSpec("e1m", MiB),
                  BitmapSpec("d4k", 4 * KiB, enabled=False)),
                 ("write -P 1 0 100k", "write -z 5M 3M", "write -P 2 24M 1536")),
    # 512-byte clusters under a 64 MiB granule (three granules, the last short).
    "c512": Case(160 * MiB + 512, 512,
                 (BitmapSpec("e4k", 4 * KiB), BitmapSpec("e64m", 64 * MiB),
                  BitmapSpec("d512", 512, enabled=False)),
                 ("write -P 3 1000 3000", "discard 70M 1M"), max_zero=MiB),
    # 2 MiB clusters: granules far below and above the cluster.
    "c2m": Case(40 * MiB, 2 * MiB,
                (BitmapSpec("e512", 512), BitmapSpec("e4m", 4 * MiB), BitmapSpec("e32k", 32 * KiB),
                 BitmapSpec("d2m", 2 * MiB, enabled=False)),
                ("write -P 4 3M 5M", "write -z -u 30M 2M")),
    # A backing file whose bitmaps (one named like the top's) must not record nor count.
    "chain": Case(20 * MiB, 4 * KiB,
                  (BitmapSpec("b0", 16 * KiB), BitmapSpec("top-off", MiB, enabled=False)),
                  ("write -P 5 1M 8k",),
                  backing=Chain(12 * MiB, 64 * KiB,
                                (BitmapSpec("b0", 64 * KiB), BitmapSpec("base-only", 512)),
                                ("write -P 6 0 12M",))),
}
SEEDS = {"c64k": (11, 12), "c512": (13,), "c2m": (14,), "chain": (15,)}


def build(case: Case, directory: Path) -> Path:
    """The case's image (and backing file) in ``directory``; returns the top image."""
    directory.mkdir(parents=True)
    backing = None
    if case.backing is not None:
        chain = case.backing
        backing = create_image(directory / "base.qcow2", chain.size, cluster=chain.cluster,
                               bitmaps=chain.bitmaps, recorded_by_all=chain.writes)
    split = len(case.prewrites) // 2 + 1
    return create_image(directory / "top.qcow2", case.size, cluster=case.cluster, bitmaps=case.bitmaps,
                        backing=backing, recorded_by_all=case.prewrites[:split],
                        recorded_by_enabled=case.prewrites[split:])


def check_served(label: str, server: PynbdServer | QemuNbdServer, expected: dict[str, list],
                 size: int, req_one: bool = True) -> list[str]:
    """The problems with the bits ``server`` serves against ``expected`` (per bitmap),
    by nbdinfo and, with ``req_one``, by QEMU's REQ_ONE walk."""
    problems = []
    offered = served_contexts(server.uri)
    for name, want in expected.items():
        if context(name) not in offered:
            problems.append(f"{label}, {server.kind}: {name} is not offered (contexts: {offered})")
            continue
        got = served_dirty(server.uri, name, size)
        if got != want:
            problems.append(f"{label}, {server.kind}, {name} (nbdinfo): {describe_difference(got, want)}")
        if req_one:
            walked = req_one_dirty(server.socket, name, size)
            if walked != want:
                problems.append(f"{label}, {server.kind}, {name} (qemu-img map, REQ_ONE): "
                                f"{describe_difference(walked, want)}")
    return problems


def run_case(subject: str, case_id: str, seed: int, tmp_path: Path) -> list[str]:
    """The list of ``seed`` through ``subject`` (on copy a) and qemu-nbd (on copy b); the
    problems found, each naming the case, seed and list file (module docstring)."""
    case = CASES[case_id]
    source = build(case, tmp_path / "src")
    names = [b.name for b in case.bitmaps]
    states = bitmap_states(source)
    initial = qemu_nbd_dirty(source, names, case.size)
    files = sorted(p.name for p in source.parent.glob("*.qcow2"))
    copies = []
    for side in ("a", "b"):
        (tmp_path / side).mkdir()
        for name in files:
            shutil.copy(source.parent / name, tmp_path / side / name)
        copies.append(tmp_path / side / source.name)
    untouched = [name for name in files if name != source.name]
    before = file_digests(copies[0].parent, untouched)
    backing_states = {n: bitmap_states(copies[0].parent / n) for n in untouched}
    commands = generate_changes(case.size, case.units, seed, case.count, max_zero=case.max_zero)
    (tmp_path / "commands.txt").write_text("".join(f"{c.text}\n" for c in commands))
    touched = changed_ranges(commands)
    expected = {n: expected_dirty(initial[n], touched, states[n], case.size) for n in names}
    problems: list[str] = []
    servers = [serve_writable(subject, copies[0], names), serve_writable("qemu-nbd", copies[1], names)]
    try:
        # Whole-image walks first: what a server keeps or makes ahead must not hide the list.
        for server in servers:
            problems += check_served("before the list", server, initial, case.size)
        outcomes = [send_commands(s.socket, commands) for s in servers]
        failed = [line for out in outcomes for line in out if "failed" in line]
        if failed or outcomes[0] != outcomes[1]:
            problems.append(f"qemu-io outcomes differ or failed: {failed[:3] or outcomes}")
        for server in servers:
            problems += check_served("while serving", server, expected, case.size)
        # A restart, stopped by SIGINT (the final stop is SIGTERM): a clean stop either way.
        for i, server in enumerate(servers):
            server.proc.send_signal(signal.SIGINT)
            code = server.wait_exit()
            if code != 0:
                problems.append(f"{server.kind} exited {code} on SIGINT:\n{server.log()[-2000:]}")
            servers[i] = serve_writable(server.kind, copies[i], names)
        for server in servers:
            problems += check_served("after a restart", server, expected, case.size, req_one=False)
    finally:
        codes = [s.stop(check=False) for s in servers]
    if codes != [0, 0]:
        problems.append(f"exit codes {codes} on SIGTERM:\n{servers[0].log()[-2000:]}")
    for side, image in zip(("subject", "oracle"), copies):
        after = bitmap_states(image)
        if after != states:
            problems.append(f"{side}: qemu-img info bitmaps {after}, before {states}")
        check = run_tool(["qemu-img", "check", image.name], cwd=image.parent, check=False)
        if check.returncode != 0:
            problems.append(f"{side}: qemu-img check exits {check.returncode}:\n{check.stdout}{check.stderr}")
        valid = [name for name in names if name in after and not after[name].in_use]
        on_disk = qemu_nbd_dirty(image, valid, case.size)
        for name in valid:
            if on_disk[name] != expected[name]:
                problems.append(f"{side}: {name} on disk (qemu-nbd -B): "
                                f"{describe_difference(on_disk[name], expected[name])}")
    if file_digests(copies[0].parent, untouched) != before:
        problems.append(f"the subject changed the backing files {untouched}")
    if {n: bitmap_states(copies[0].parent / n) for n in untouched} != backing_states:
        problems.append("the backing files' bitmaps changed")
    return [f"{case_id}, seed {seed} (list {tmp_path / 'commands.txt'}): {p}" for p in problems]


@pytest.mark.pynbd
@pytest.mark.parametrize("case_id,seed", [(c, s) for c in CASES for s in SEEDS[c]],
                         ids=[f"{c}-{s}" for c in CASES for s in SEEDS[c]])
def test_lists_record_like_qemu_nbd(tmp_path, case_id, seed):
    """The seeded list leaves pynbd's bitmaps as qemu-nbd's and the model's, while serving,
    after a restart and on disk (module docstring)."""
    problems = run_case("pynbd", case_id, seed, tmp_path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("case_id", ["c64k", "chain"])
def test_harness_self_check(tmp_path, case_id):
    """qemu-nbd as the subject: the harness, its model included, finds nothing."""
    problems = run_case("qemu-nbd", case_id, SEEDS[case_id][0], tmp_path)
    assert not problems, "\n".join(problems)


def test_model_finds_a_missed_write(tmp_path):
    """The comparison is not lax: qemu-nbd given one write more than the model knows of
    is reported, with the granule it dirtied."""
    case = CASES["c64k"]
    image = build(case, tmp_path / "img")
    names = [b.name for b in case.bitmaps]
    initial = qemu_nbd_dirty(image, names, case.size)
    server = serve_writable("qemu-nbd", image, names)
    try:
        send_commands(server.socket, [parse_command("write -P 9 20971520 1")])
        problems = check_served("probe", server, initial, case.size, req_one=False)
    finally:
        server.stop(check=False)
    assert any("e64k" in p and "0x1400000" in p for p in problems), problems
    assert not any("d4k" in p for p in problems), problems


# --- A write, then block status at once ------------------------------------------------



@pytest.mark.pynbd
@pytest.mark.needs("libnbd-python")
@pytest.mark.parametrize("kind", ["pynbd", "qemu-nbd"])
def test_write_then_map_sees_it_at_once(tmp_path, kind):
    """One connection writes (WRITE, WRITE_ZEROES with and without NO_HOLE, TRIM) and at
    once asks block status of the range; another connection, which mapped the range
    just before, asks too: both see every touched granule dirty, after whole-image walks
    on both (whatever the server cached or made ahead); every 25 requests the whole
    image's dirty granules are exactly the ones written."""
    image = create_image(tmp_path / "disk.qcow2", 64 * MiB, cluster=64 * KiB,
                         bitmaps=(BitmapSpec("g4k", 4 * KiB),))
    server = serve_writable(kind, image, ["g4k"], *(["-e", "2"] if kind == "qemu-nbd" else []))
    try:
        out = libnbd_script(WRITE_THEN_MAP, server.socket, "g4k", str(64 * MiB), str(4 * KiB), "7", "150",
                            timeout=120)
    finally:
        code = server.stop(check=False)
    result = json.loads(out.stdout)
    assert not result["failures"], f"{kind}: {result['failures'][:5]}"
    assert result["fresh"] > 100, f"only {result['fresh']} of 150 requests hit a clean granule"
    assert code == 0, server.log()[-2000:]


# --- Several connections at once -------------------------------------------------------


@pytest.mark.pynbd
@pytest.mark.needs("nbdcopy")
def test_nbdcopy_four_connections_records_every_write(tmp_path):
    """nbdcopy with 4 connections (the source spans more than four 128 MiB work units)
    into an empty image with bitmaps, served by pynbd and by ``qemu-nbd -e 4``: each
    enabled bitmap holds the granules of every non-zero byte and none outside the
    source file's data extents, equal to qemu-nbd's; the disabled one stays empty; after the
    stop qemu-nbd ``-B`` serves the same bits."""
    size = 520 * MiB
    source = tmp_path / "source.raw"
    nonzero = sparse_source(source, size, seed=23)
    data = file_data_ranges(source)
    specs = (BitmapSpec("e64k", 64 * KiB), BitmapSpec("e512", 512), BitmapSpec("off", 64 * KiB, enabled=False))
    names = [s.name for s in specs]
    images = []
    for side in ("a", "b"):
        (tmp_path / side).mkdir()
        images.append(create_image(tmp_path / side / "disk.qcow2", size, cluster=64 * KiB, bitmaps=specs))
    served = []
    for kind, image in zip(("pynbd", "qemu-nbd"), images):
        server = serve_writable(kind, image, names, *(["-e", "4"] if kind == "qemu-nbd" else []))
        try:
            can = run_tool(["nbdinfo", "--can", "multi-conn", server.uri], check=False)
            assert can.returncode == 0, f"{kind} does not offer multi-conn: nbdcopy would use one connection"
            nbdcopy("--connections=4", "--destination-is-zero", "--flush", str(source), server.uri, timeout=120)
            served.append({n: served_dirty(server.uri, n, size) for n in names})
        finally:
            code = server.stop(check=False)
        assert code == 0, server.log()[-2000:]
    mine, oracle = served
    for spec in specs:
        if spec.enabled:
            low, high = granules(nonzero, spec.granularity, size), granules(data, spec.granularity, size)
            assert not uncovered(low, oracle[spec.name]) and not uncovered(oracle[spec.name], high), \
                f"the oracle's {spec.name} is off the model (harness)"
        else:
            assert oracle[spec.name] == []
        assert mine[spec.name] == oracle[spec.name], \
            f"{spec.name}: {describe_difference(mine[spec.name], oracle[spec.name])}"
    on_disk = qemu_nbd_dirty(images[0], names, size)
    assert on_disk == mine, {n: describe_difference(on_disk[n], mine[n]) for n in names}
    assert bitmap_states(images[0]) == bitmap_states(images[1])
    check = run_tool(["qemu-img", "check", images[0]], check=False)
    assert check.returncode == 0, check.stdout + check.stderr


# --- Which bitmaps are exported and record ---------------------------------------------


@pytest.mark.pynbd
def test_bitmap_in_use_at_open_is_left_out_and_untouched(tmp_path):
    """A bitmap flagged in use (QEMU killed while it recorded) is not exported, a
    warning names it, and writes leave it as it was (still in use): the valid enabled
    bitmap records them, the disabled one keeps its bits."""
    image = create_image(tmp_path / "disk.qcow2", 16 * MiB, cluster=64 * KiB,
                         bitmaps=(BitmapSpec("bad", 4 * KiB),))
    # qemu-io killed after a write leaves every bitmap of the image in use.
    run_tool(["qemu-io", "-f", "qcow2", "-c", "write -P 3 0 64k", "-c", "sigraise 9", image.name],
             cwd=tmp_path, check=False)
    for spec in (BitmapSpec("good", 64 * KiB), BitmapSpec("off", 32 * KiB)):
        run_tool(["qemu-img", "bitmap", "--add", "-g", str(spec.granularity), image.name, spec.name], cwd=tmp_path)
    qemu_io_local(image, ["write -P 4 4M 100k"])
    run_tool(["qemu-img", "bitmap", "--disable", image.name, "off"], cwd=tmp_path)
    states = bitmap_states(image)
    assert states["bad"].in_use and not states["good"].in_use, states
    initial = qemu_nbd_dirty(image, ["good", "off"], 16 * MiB)
    writes = generate_changes(16 * MiB, (512, 4 * KiB, 64 * KiB), 31, 20)
    server = serve_writable("pynbd", image, [])
    try:
        contexts = served_contexts(server.uri)
        send_commands(server.socket, writes)
    finally:
        code = server.stop(check=False)
    log = server.log()
    assert code == 0, log[-2000:]
    assert "qemu:dirty-bitmap:bad" not in contexts, contexts
    assert {"qemu:dirty-bitmap:good", "qemu:dirty-bitmap:off"} <= set(contexts), contexts
    assert any("WARNING" in line and "'bad'" in line for line in log.splitlines()), log
    assert bitmap_states(image) == states
    on_disk = qemu_nbd_dirty(image, ["good", "off"], 16 * MiB)
    touched = changed_ranges(writes)
    assert on_disk["off"] == initial["off"]
    want = expected_dirty(initial["good"], touched, states["good"], 16 * MiB)
    assert on_disk["good"] == want, describe_difference(on_disk["good"], want)


@pytest.mark.pynbd
def test_export_restricted_by_B_still_records_every_enabled_bitmap(tmp_path):
    """``pynbd serve -B one``: only ``one`` is offered, but the writes land in every
    enabled bitmap of the image (``two`` too), as qemu-nbd -B shows after the stop."""
    size = 8 * MiB
    specs = (BitmapSpec("one", 64 * KiB), BitmapSpec("two", 4 * KiB))
    image = create_image(tmp_path / "disk.qcow2", size, cluster=4 * KiB, bitmaps=specs)
    states = bitmap_states(image)
    commands = generate_changes(size, (512, 4 * KiB, 64 * KiB), 41, 25)
    server = serve_writable("pynbd", image, [], "-B", "one")
    try:
        contexts = served_contexts(server.uri)
        send_commands(server.socket, commands)
    finally:
        code = server.stop(check=False)
    assert code == 0, server.log()[-2000:]
    assert [c for c in contexts if c.startswith("qemu:dirty-bitmap:")] == ["qemu:dirty-bitmap:one"], contexts
    on_disk = qemu_nbd_dirty(image, ["one", "two"], size)
    for name in ("one", "two"):
        want = expected_dirty([], changed_ranges(commands), states[name], size)
        assert total(want) > 0
        assert on_disk[name] == want, f"{name}: {describe_difference(on_disk[name], want)}"
    assert bitmap_states(image) == states


# --- The model's range arithmetic ------------------------------------------------------

_ranges = st.lists(st.tuples(st.integers(0, 600), st.integers(0, 80)).map(lambda t: (t[0], t[0] + t[1])),
                   max_size=8)


def _bytes_of(ranges) -> set[int]:
    return {b for start, end in ranges for b in range(start, end)}


@settings(max_examples=150, deadline=None)
@given(_ranges, _ranges, st.sampled_from([1, 2, 8, 64, 512]), st.integers(1, 700))
def test_range_helpers_match_a_per_byte_model(a, b, granularity, size):
    """union, granules and uncovered (tests/support/bitmaps.py) against sets of bytes."""
    merged = union(a, b)
    assert _bytes_of(merged) == _bytes_of(a) | _bytes_of(b)
    assert all(x[1] < y[0] for x, y in zip(merged, merged[1:])), merged  # disjoint, not touching
    touched = {byte // granularity for byte in _bytes_of(a)}
    assert _bytes_of(granules(a, granularity, size)) == {
        byte for g in touched for byte in range(g * granularity, min((g + 1) * granularity, size))}
    assert _bytes_of(uncovered(a, union(b))) == _bytes_of(a) - _bytes_of(b)
