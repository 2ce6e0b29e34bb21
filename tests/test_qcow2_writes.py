"""qcow2 writes through pynbd, with qemu-nbd as the oracle.

**Command lists** (:func:`test_qemu_io_lists_like_qemu_nbd`): for each fixture of the
matrix (v3 and v2 with 64 KiB clusters, 512 B and 2 MiB clusters, extended L2 with 64 KiB
and 16 KiB clusters over shorter backing files, compressed clusters, a 3-layer chain whose
base is shorter than the top, a size that is not a cluster multiple with refcount_bits=1,
external data files with and without data_file_raw, 512 B clusters with compressed
clusters over a shorter qcow2 backing file), two copies are made; one qemu-io sends the
same deterministic command list (tests/support/qcow2_writes.py: writes of 1 byte to 3
clusters, aligned or not, straddling cluster, cluster/32 and backing-file ends and ending
at the last byte or reaching into the fixture's own data, zero and compressed clusters;
zeroes with and without ``-u``; discards; flushes; FUA writes; batches of aio writes racing
for the same clusters) to ``pynbd serve`` on copy A and to ``qemu-nbd --discard=unmap`` on
copy B. After both servers stopped:

* every command succeeded on both (qemu-io's outcome lines equal);
* ``qemu-img check`` of A exits 0 (no errors and no leaks; B too, or the oracle is off);
* the backing files and everything else the copy was made of, but the top image and its
  data file, are byte-identical to before;
* A reads like B (``qemu-img compare``; in trimmed ranges zeros are allowed too);
* ``qemu-img map`` of A equals B's on (data, zero, depth, host cluster), but where a
  range was trimmed or zeroed in part of a cluster (the rules and why: the docstring of
  tests/support/qcow2_writes.py).

The lists are generated from seeds (the test id names it), and one more is written to
place shapes a random list may miss (:func:`edge_commands`); a failure names the fixture,
the seed, the list (written next to the images as ``commands.txt``) and the first
difference. :func:`test_harness_self_check` runs the same harness with qemu-nbd on both
sides, to show that the comparisons are deterministic and the rules not too strict;
:func:`test_harness_finds_what_differs` gives the subject one request more, to show that
they are not too lax.

**Concurrency**: nbdcopy with 4 connections from a raw file into an empty qcow2
(compared with the raw file); four qemu-io processes writing quarters of the same clusters,
overlapping ranges with equal bytes, then zeroes racing with writes in one cluster
(compared with a model of the result: QEMU 7.2 loses that last race itself);
fio verify with several jobs on disjoint ranges, 4 KiB and 64 KiB blocks, re-verified
through qemu-nbd after pynbd stopped. Each then ``qemu-img check``.
"""

from __future__ import annotations

import json
import random
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.qcow2_fixtures import session_fixtures
from tests.support.qcow2_writes import (
    DATA,
    NONE,
    TRIM,
    ZERO,
    Geometry,
    IoCommand,
    Leeway,
    MapState,
    add_range,
    allocation_map,
    build_extl2_64k,
    check_image,
    content_mismatch,
    copy_fixture,
    covers,
    file_digests,
    first_content_mismatch,
    generate_commands,
    leeway,
    map_mismatches,
    merge_extents,
    parse_command,
    probe_geometry,
    qemu_io_argv,
    run_tool,
    send_commands,
    states_agree,
    trimmed_ranges,
    zeroed_allocated,
)
from tests.support.servers import PynbdServer, QemuNbdServer, nbdcopy

pytestmark = [pytest.mark.interop, pytest.mark.needs("qemu-img", "qemu-io", "qemu-nbd"),
              pytest.mark.timeout(180)]

KiB, MiB = 1 << 10, 1 << 20

READ_ONLY_WARNING = "is served read-only"
MISMATCHES_SHOWN = 6

# (id, fixture file, commands per list): SEEDS lists per fixture; ids are short because
# the test directory (and the unix sockets in it) are named after them.
MATRIX = (
    ("v3", "v3-64k.qcow2", 50),
    ("v2", "v2.qcow2", 50),
    ("cs512", "cs512.qcow2", 60),
    ("cs2m", "cs2m.qcow2", 30),
    ("extl2-64k", "extl2-64k.qcow2", 60),
    ("extl2-16k", "extl2-16k.qcow2", 60),
    ("compressed", "comp-zlib.qcow2", 50),
    ("chain", "chain-top.qcow2", 60),
    ("odd", "odd.qcow2", 50),
    ("extdata", "extdata.qcow2", 50),
    ("extdata-raw", "extdata-raw.qcow2", 50),
    ("rnd512", "rnd-top.qcow2", 60),
)
SEEDS = (None, 301, 302, 303, 304)  # None: the edge list (edge_commands)
CASES = [pytest.param(case, image, count, seed, id=f"{case}-{seed or 'edges'}")
         for case, image, count in MATRIX for seed in SEEDS]


@pytest.fixture(scope="module")
def fixture_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The session's fixture images plus this module's own (extended L2, 64 KiB clusters)."""
    images = dict(session_fixtures(tmp_path_factory))
    images["extl2-64k.qcow2"] = build_extl2_64k(tmp_path_factory.mktemp("qcow2w"))
    return images


def start_server(kind: str, image: Path) -> PynbdServer | QemuNbdServer:
    """pynbd or ``qemu-nbd --discard=unmap`` serving ``image`` writable on a unix socket in
    its directory, run there (QEMU opens a relative data file name from its working
    directory). A pynbd that serves the image read-only fails the test at once."""
    if kind == "qemu-nbd":
        return QemuNbdServer(image, "--discard=unmap", fmt="qcow2", workdir=image.parent)
    server = PynbdServer(image, "-f", "qcow2", workdir=image.parent)
    if READ_ONLY_WARNING in server.log():
        server.stop(check=False)
        pytest.fail(f"pynbd serves {image.name} read-only (no qcow2 writes yet):\n{server.log()}")
    return server


def run_lists(subject_kind: str, source: Path, commands: Sequence[IoCommand], workdir: Path,
              label: str, subject_extra: Sequence[str] = ()) -> list[str]:
    """Copy the fixture ``source`` twice, send ``commands`` to ``subject_kind`` serving copy A
    and to qemu-nbd serving copy B (then ``subject_extra``, to A only: how the harness
    tests itself), stop both, compare; returns the problems found, each naming ``label``
    and the list written to ``workdir/commands.txt`` (empty: none)."""
    geometry = probe_geometry(source)
    subject_dir, oracle_dir = workdir / "a", workdir / "b"
    images = [copy_fixture(geometry, source.parent, d) for d in (subject_dir, oracle_dir)]
    untouched = [n for n in geometry.files if n not in (geometry.image, geometry.data_file)]
    before = file_digests(subject_dir, untouched)
    (workdir / "commands.txt").write_text("".join(f"{c.text}\n" for c in commands))

    servers: list[PynbdServer | QemuNbdServer] = []
    try:
        servers.append(start_server(subject_kind, images[0]))
        servers.append(start_server("qemu-nbd", images[1]))
        outcomes = [send_commands(s.socket, commands) for s in servers]
        if subject_extra:
            send_commands(servers[0].socket, [IoCommand(text) for text in subject_extra])
    finally:
        codes = [s.stop(check=False) for s in servers]
    where = (f"{label} ({geometry.image}, size {geometry.size}, cluster {geometry.cluster}, "
             f"list {workdir / 'commands.txt'})")
    problems = []
    if codes != [0, 0]:
        problems.append(f"exit codes {codes} after SIGTERM\n{servers[0].log()[-3000:]}")
    failed = [line for out in outcomes for line in out if "failed" in line]
    if failed or outcomes[0] != outcomes[1]:
        diff = sorted(set(outcomes[0]) ^ set(outcomes[1]))
        problems.append(f"qemu-io outcomes differ or failed: {(failed or diff)[:5]}")
    for name, directory in (("subject", subject_dir),
                            ("oracle (qemu-nbd: a QEMU bug or a fault of the harness)", oracle_dir)):
        check = check_image(directory, geometry)
        if check.returncode != 0:
            problems.append(f"qemu-img check of the {name}'s image exits {check.returncode}:\n"
                            f"{check.stdout}{check.stderr}")
    if file_digests(subject_dir, untouched) != before:
        problems.append(f"the subject changed files it must not write: {untouched}")
    allowed = leeway(commands, geometry)
    mismatch = content_mismatch(subject_dir, oracle_dir, geometry, allowed.trimmed, workdir)
    if mismatch:
        problems.append(f"content: {mismatch}")
    mismatches = map_mismatches(allocation_map(subject_dir, geometry),
                                allocation_map(oracle_dir, geometry), allowed)
    if mismatches:
        problems.append(f"the map differs in {len(mismatches)} ranges: "
                        + "; ".join(map(str, mismatches[:MISMATCHES_SHOWN])))
    return [f"{where}: {p}" for p in problems]


def edge_commands(geometry: Geometry) -> list[IoCommand]:
    """A fixed list of shapes a random list may miss, placed by the fixture's geometry:
    zeroing a cluster twice with NO_HOLE (it must stay allocated), zeroing a cluster partly
    and then wholly, zeroing and discarding the last cluster (short when the size is not a
    cluster multiple: whole all the same), writing into a discarded cluster, a partial
    write across a shorter backing file's end, a write across an edge of the fixture's
    layout."""
    c, size = geometry.cluster, geometry.size
    last = (size - 1) // c * c
    edge = geometry.backing_ends[0] if geometry.backing_ends else size // 2
    layout = next((e for e in geometry.layout_edges if e > 3 * c + 3), 4 * c)
    texts = [f"write -z 0 {c}", f"write -z 0 {c}", f"write -z {c + c // 4} {c // 2}", f"write -z {c} {c}",
             f"discard {2 * c} {c}", f"write -P 7 {2 * c + 5} 5", f"write -P 8 {edge - 100} 300",
             f"write -P 9 {max(layout - 3, 0)} 7", f"write -z -u {last} {size - last}",
             f"write -P 10 {last} 1", f"discard {last} {size - last}",
             f"write -P 11 {last - c} {c}", f"write -z {last - c} {size - last + c}"]
    return [parse_command(text) for text in texts]


def generated_lists(subject_kind: str, source: Path, count: int, seed: int | None, workdir: Path,
                    label: str) -> list[str]:
    """:func:`run_lists` with the list generated for the fixture and seed (None: the list
    of :func:`edge_commands`)."""
    geometry = probe_geometry(source)
    if seed is None:
        commands, label = edge_commands(geometry), f"{label}, edge list"
    else:
        commands, label = generate_commands(geometry, seed, count), f"{label}, seed {seed}"
    return run_lists(subject_kind, source, commands, workdir, label)


@pytest.mark.pynbd
@pytest.mark.parametrize("case,image,count,seed", CASES)
def test_qemu_io_lists_like_qemu_nbd(fixture_images, tmp_path, case, image, count, seed):
    """The same qemu-io list leaves pynbd's copy checked clean, reading and mapped like
    qemu-nbd's (module docstring)."""
    problems = generated_lists("pynbd", fixture_images[image], count, seed, tmp_path, case)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("case,image,count,seed",
                         [pytest.param(case, image, count, seed, id=f"{case}-{seed or 'edges'}")
                          for case, image, count in MATRIX for seed in SEEDS[:2]])
def test_harness_self_check(fixture_images, tmp_path, case, image, count, seed):
    """qemu-nbd against qemu-nbd (each fixture's edge list and first generated list): the
    harness finds nothing (the comparisons are deterministic and the rules allow what one
    correct server does twice)."""
    problems = generated_lists("qemu-nbd", fixture_images[image], count, seed, tmp_path, case)
    assert not problems, "\n".join(problems)


# v3-64k.qcow2 (tests/qcow2_fixtures.py F2): 4 KiB of 0x22 data at 1M in an allocated
# cluster, a zero-flag cluster at 2M.
HARNESS_PROBES = (
    # (id, common list, then to the subject only, the problem expected or None)
    ("content", [], ["write -P 0x77 1M 1"], "content: Content mismatch at offset 1048576!"),
    ("map", [], ["write -P 0 2M 64k"],
     "the map differs in 1 ranges: allocation differs at [0x200000, 0x210000) (range): "
     "subject data depth=0 host cluster, oracle zero depth=0"),
    ("trim-zeros", ["discard 1048576 4096"], ["write -z 1M 4k"], None),
    ("trim-data", ["discard 1048576 4096"], ["write -P 0x55 1M 4k"],
     "first disallowed difference at 0x100000"),
)


@pytest.mark.parametrize("common,extra,expected", [p[1:] for p in HARNESS_PROBES],
                         ids=[p[0] for p in HARNESS_PROBES])
def test_harness_finds_what_differs(fixture_images, tmp_path, common, extra, expected):
    """qemu-nbd on both sides, the subject then given one more request: the harness names
    the first difference, and lets through zeros where the list trimmed."""
    commands = [parse_command(text) for text in common]
    problems = run_lists("qemu-nbd", fixture_images["v3-64k.qcow2"], commands, tmp_path, "probe",
                         subject_extra=extra)
    if expected is None:
        assert not problems, "\n".join(problems)
    else:
        assert len(problems) == 1 and expected in problems[0], "\n".join(problems)


# --- Concurrency -------------------------------------------------------------------------


def stop_and_check(server: PynbdServer, image: Path) -> None:
    """Stop pynbd: it must exit 0 on SIGTERM; then ``qemu-img check`` of ``image`` must exit
    0 (no errors, no leaks)."""
    code = server.stop(check=False)
    assert code == 0, f"pynbd exited with {code} after SIGTERM\n{server.log()[-3000:]}"
    check = run_tool(["qemu-img", "check", image], check=False)
    assert check.returncode == 0, f"qemu-img check exits {check.returncode}:\n{check.stdout}{check.stderr}"


def random_sparse_source(path: Path, size: int, seed: int) -> None:
    """A sparse raw file: in every 128 MiB (nbdcopy's work unit per connection) runs of
    random bytes with some 4 KiB blocks of zeros inside (sent as zero requests), holes
    between (sent as zero requests too)."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for unit in range(0, size, 128 * MiB):
            for _ in range(16):
                length = rng.randrange(1, 64) * 4 * KiB + rng.randrange(0, 4 * KiB)
                offset = unit + rng.randrange(0, min(128 * MiB, size - unit) - length)
                data = bytearray(rng.randbytes(length))
                for _ in range(length // (32 * KiB)):
                    block = rng.randrange(0, length // (4 * KiB)) * 4 * KiB
                    data[block:block + 4 * KiB] = bytes(4 * KiB)
                f.seek(offset)
                f.write(data)


@pytest.mark.pynbd
@pytest.mark.needs("nbdcopy", "nbdinfo")
def test_nbdcopy_four_connections_into_empty_qcow2(tmp_path):
    """nbdcopy with 4 connections (one per 128 MiB work unit: the source is larger than
    four) into an empty qcow2 served by pynbd: reads like the source, checks clean."""
    size = 520 * MiB
    source = tmp_path / "source.raw"
    random_sparse_source(source, size, seed=41)
    target = tmp_path / "target.qcow2"
    run_tool(["qemu-img", "create", "-q", "-f", "qcow2", target, str(size)])
    server = start_server("pynbd", target)
    try:
        multi_conn = run_tool(["nbdinfo", "--can", "multi-conn", server.uri], check=False)
        assert multi_conn.returncode == 0, "pynbd does not offer multi-conn: nbdcopy would use one connection"
        nbdcopy("--connections=4", "--flush", str(source), server.uri, timeout=300)
    except BaseException:
        server.stop(check=False)
        raise
    stop_and_check(server, target)
    run_tool(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", source, target])


Round = list[list[str]]  # one qemu-io command list per writer, run at the same time


def concurrent_rounds(cluster: int, clusters: int, writers: int) -> tuple[list[Round], bytearray]:
    """Rounds of aio command lists (all writers of a round run at once, rounds one after
    the other) and the image's expected bytes, from zeros:

    1. in every cluster, in its own order, writer w writes quarter w with its own
       pattern: the writers race for each cluster's allocation;
    2. every writer writes a different overlapping part of region r (1.5 clusters from
       the middle of cluster 3r) with the region's pattern: equal bytes, so the result
       does not depend on the order;
    3. in the clusters no region touches (3k + 2), one writer zeroes its quarter, with
       and without ``-u``, while the others write theirs: zeroing and allocating writes
       race in one cluster (races QEMU 7.2 itself loses, which is why the command
       lists' aio batches leave zeroes out)."""
    rng = random.Random(cluster)
    expected = bytearray(cluster * clusters)
    part = cluster // writers
    rounds: list[Round] = [[[] for _ in range(writers)] for _ in range(3)]
    for w in range(writers):
        order = list(range(clusters))
        rng.shuffle(order)
        for k in order:
            start, pattern = k * cluster + w * part, 1 + (k * writers + w) % 200
            rounds[0][w].append(f"aio_write -P {pattern} {start} {part}")
            expected[start:start + part] = bytes([pattern]) * part
    for r in range(0, clusters - 1, 3):
        start, length, pattern = r * cluster + cluster // 2, cluster + cluster // 2, 0xE0 + r % 16
        for w in range(writers):
            a = start + rng.randrange(0, length // 2)
            b = start + length - rng.randrange(0, length // 2)
            rounds[1][w].append(f"aio_write -P {pattern} {a} {b - a}")
            expected[a:b] = bytes([pattern]) * (b - a)
    for k in range(2, clusters, 3):
        for w in range(writers):
            start = k * cluster + w * part
            if w == k % writers:
                rounds[2][w].append(f"aio_write -z{' -u' if k % 2 else ''} {start} {part}")
                expected[start:start + part] = bytes(part)
            else:
                pattern = 0x80 + (k + w) % 64
                rounds[2][w].append(f"aio_write -P {pattern} {start} {part}")
                expected[start:start + part] = bytes([pattern]) * part
    for commands in (c for round_ in rounds for c in round_):
        commands.append("aio_flush")
    return rounds, expected


def run_round(uri: str, round_: Round) -> None:
    """Every writer's list in its own qemu-io (its own connection), all at once; each
    request must succeed."""
    procs = [subprocess.Popen(qemu_io_argv(commands, uri), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for commands in round_]
    for commands, proc in zip(round_, procs):
        out = proc.communicate(timeout=120)[0]
        assert "failed" not in out, out[-2000:]
        assert out.count("wrote ") == len(commands) - 1, out[-2000:]  # all but aio_flush


@pytest.mark.pynbd
@pytest.mark.parametrize("cluster,extended_l2", [(512, False), (64 * KiB, False), (64 * KiB, True)],
                         ids=["512", "64k", "64k-extl2"])
def test_concurrent_writers_on_the_same_clusters(tmp_path, cluster, extended_l2):
    """Four connections (four qemu-io) writing quarters of the same clusters, then
    overlapping ranges with equal bytes, then zeroes, each round all at once: the image
    reads like the model and checks clean (with extended L2 entries: racing for the
    subclusters of one cluster)."""
    rounds, expected = concurrent_rounds(cluster, clusters=256 if cluster == 512 else 48, writers=4)
    image = tmp_path / "shared.qcow2"
    options = f"cluster_size={cluster}" + (",extended_l2=on" if extended_l2 else "")
    run_tool(["qemu-img", "create", "-q", "-f", "qcow2", "-o", options, image, str(len(expected))])
    server = start_server("pynbd", image)
    try:
        for round_ in rounds:
            run_round(server.uri, round_)
    except BaseException:
        server.stop(check=False)
        raise
    stop_and_check(server, image)
    model = tmp_path / "expected.raw"
    model.write_bytes(expected)
    run_tool(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", image, model])


def fio(uri: str, *, block: str, jobs: int, per_job: int, verify_only: bool) -> None:
    """fio's nbd engine: ``jobs`` jobs on disjoint ranges write each block once at random
    (crc32c checksums inside), then read everything back and verify; with
    ``verify_only`` the same jobs (same seed) only read and verify."""
    argv = ["fio", "--name=verify", "--ioengine=nbd", f"--uri={uri}", "--rw=randwrite",
            f"--bs={block}", "--iodepth=8", f"--numjobs={jobs}", f"--size={per_job}",
            f"--offset_increment={per_job}", "--verify=crc32c", "--verify_fatal=1",
            "--do_verify=1", "--randrepeat=1", "--randseed=4242", "--verify_state_save=0",
            "--output-format=json"]
    if verify_only:
        argv.append("--verify_only")
    r = run_tool(argv, check=False, timeout=300)
    assert r.returncode == 0, f"fio exits {r.returncode}:\n{r.stderr[-3000:]}\n{r.stdout[-1000:]}"
    result = json.loads(r.stdout[r.stdout.index("{"):])
    for job in result["jobs"]:
        assert job["error"] == 0, job
        assert job["read"]["io_bytes"] >= per_job, job  # every block verified
        if not verify_only:
            assert job["write"]["io_bytes"] >= per_job, job


@pytest.mark.pynbd
@pytest.mark.needs("fio")
@pytest.mark.parametrize("block", ["4k", "64k"])
def test_fio_verify_into_fresh_qcow2(tmp_path, block):
    """fio verify, four jobs on disjoint ranges of a fresh qcow2 (64 KiB clusters) served
    by pynbd; after pynbd stopped, the image checks clean and the same jobs verify it again
    through qemu-nbd (the data is in the file, as QEMU reads it)."""
    jobs, per_job = 4, (4 * MiB if block == "4k" else 16 * MiB)
    image = tmp_path / "fio.qcow2"
    run_tool(["qemu-img", "create", "-q", "-f", "qcow2", image, str(jobs * per_job)])
    server = start_server("pynbd", image)
    try:
        fio(server.uri, block=block, jobs=jobs, per_job=per_job, verify_only=False)
    except BaseException:
        server.stop(check=False)
        raise
    stop_and_check(server, image)
    oracle = QemuNbdServer(image, "-r", fmt="qcow2", workdir=tmp_path)
    try:
        fio(oracle.uri, block=block, jobs=jobs, per_job=per_job, verify_only=True)
    finally:
        oracle.stop()


# --- The harness's range logic, against per-byte models ----------------------------------

SPAN = 48
_spans = st.tuples(st.integers(0, SPAN), st.integers(0, SPAN)).map(sorted)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([DATA, ZERO, TRIM]), _spans), max_size=12))
def test_trimmed_ranges_like_a_byte_model(ops):
    """trimmed_ranges: the bytes discarded and not written or zeroed since, as sorted,
    disjoint, non-touching ranges."""
    model: set[int] = set()
    commands = []
    for effect, (a, b) in ops:
        commands.append(IoCommand("", effect, a, b - a))
        model = model | set(range(a, b)) if effect == TRIM else model - set(range(a, b))
    ranges = trimmed_ranges(commands)
    assert {i for a, b in ranges for i in range(a, b)} == model
    assert all(a < b for a, b in ranges)
    assert all(b1 < a2 for (_, b1), (a2, _) in zip(ranges, ranges[1:]))


_STATES = [MapState(True, False, 0, True), MapState(False, True, 0, False),
           MapState(False, True, 0, True), MapState(True, False, 1, True), MapState(False, False, 1, False)]


def _extents(units: list[int]) -> list:
    return merge_extents((i, i + 1, _STATES[u]) for i, u in enumerate(units))


def _ranges(spans: list) -> list:
    ranges: list = []
    for a, b in spans:
        ranges = add_range(ranges, a, b)
    return ranges


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_map_mismatches_like_a_byte_model(data):
    """map_mismatches: exactly the bytes whose states break the rule (module docstring of
    tests/support/qcow2_writes.py), with both states and the leeways that applied, merged."""
    n = data.draw(st.integers(1, SPAN))
    # runs of equal states, so that extents are longer than the leeway ranges' pieces
    runs = st.lists(st.tuples(st.integers(1, 12), st.integers(0, len(_STATES) - 1)), min_size=1)
    subject, oracle = ([u for length, u in data.draw(runs) for _ in range(length)] for _ in range(2))
    subject, oracle = ((units * n)[:n] for units in (subject, oracle))
    allowed = Leeway(*(_ranges(data.draw(st.lists(_spans, max_size=4))) for _ in range(2)))
    context = [(covers(allowed.trimmed, i), covers(allowed.zeroed_allocated, i)) for i in range(n)]
    bad = [i for i in range(n) if not states_agree(_STATES[subject[i]], _STATES[oracle[i]], *context[i])]
    found = map_mismatches(_extents(subject), _extents(oracle), allowed)
    assert [i for m in found for i in range(m.start, m.end)] == bad
    for m in found:
        assert (m.subject, m.oracle) == (_STATES[subject[m.start]], _STATES[oracle[m.start]])
        assert (m.trimmed, m.zeroed) == context[m.start]
    assert all(a.end < b.start or (a.subject, a.oracle, a.trimmed, a.zeroed)
               != (b.subject, b.oracle, b.trimmed, b.zeroed) for a, b in zip(found, found[1:]))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=SPAN), st.binary(max_size=SPAN), st.lists(_spans, max_size=4),
       st.integers(0, 3))
def test_first_content_mismatch_like_a_byte_model(subject, oracle, spans, base):
    """first_content_mismatch: the first byte that differs and is not a zero in a trimmed
    range (or where one side ends)."""
    subject, oracle = bytes(b % 3 for b in subject), bytes(b % 3 for b in oracle)
    trimmed = _ranges(spans)
    bad = [i for i, (s, o) in enumerate(zip(subject, oracle))
           if s != o and not (s == 0 and covers(trimmed, base + i))]
    if not bad and len(subject) != len(oracle):
        bad = [min(len(subject), len(oracle))]
    expected = base + bad[0] if bad else None
    assert first_content_mismatch(subject, oracle, base, trimmed) == expected


@settings(max_examples=200, deadline=None)
@given(st.integers(9, 21), st.integers(1, 64), st.lists(st.integers(1, 1 << 20), max_size=2),
       st.integers(0, 2**32))
def test_generated_lists_stay_inside_the_image(cluster_bits, clusters, ends, seed):
    """Every generated request lies inside the image and is 1 byte to 3 clusters long (an
    aio batch: inside a window of 2 clusters)."""
    cluster = 1 << cluster_bits
    size = clusters * cluster + seed % cluster
    edges = tuple(sorted({e % size for e in ends} - {0}))
    geometry = Geometry("x", size, cluster, edges, ("x",), None, edges)
    for command in generate_commands(geometry, seed, 30):
        if command.effect == NONE:
            assert command.text in ("flush", "aio_flush")
            continue
        assert 0 <= command.offset and command.offset + command.length <= size, command
        assert 1 <= command.length <= 3 * cluster, command
        assert command.text.endswith(f" {command.offset} {command.length}"), command


_V3 = Geometry("x", 4 * 64 * KiB, 64 * KiB, (), ("x",), None)
ZEROED_ALLOCATED = (
    # (id, geometry, commands, expected ranges)
    ("partial", _V3, ["write -z 1000 100"], [(0, 64 * KiB)]),
    ("edges", _V3, ["write -z 1000 200000"], [(0, 64 * KiB), (192 * KiB, 256 * KiB)]),
    ("then-whole", _V3, ["write -z 1000 100", "write -z -u 0 65536"], []),
    ("then-data", _V3, ["write -z 1000 100", "write -P 1 65535 1"], []),
    ("then-partial-trim", _V3, ["write -z 1000 100", "discard 0 4096"], [(0, 64 * KiB)]),
    ("then-cluster-trim", _V3, ["write -z 1000 100", "discard 0 65536"], []),
    ("v3-whole", _V3, ["write -z 0 131072"], []),
    ("then-no-hole", _V3, ["write -z 1000 100", "write -z 0 65536"], [(0, 64 * KiB)]),
    ("v2-no-hole", Geometry("x", 256 * KiB, 64 * KiB, (), ("x",), None, zero_flag=False),
     ["write -z 0 131072", "write -z -u 131072 65536"], [(0, 128 * KiB)]),
    ("extl2", Geometry("x", 256 * KiB, 64 * KiB, (), ("x",), None, extended_l2=True),
     ["write -z 1000 100", "write -z 4096 2048"], [(0, 2 * KiB)]),
    ("short-last-cluster", Geometry("x", 200 * KiB, 64 * KiB, (), ("x",), None),
     ["write -z 196608 8192", "write -z 196608 100"], [(192 * KiB, 200 * KiB)]),
)


@pytest.mark.parametrize("geometry,texts,expected", [z[1:] for z in ZEROED_ALLOCATED],
                         ids=[z[0] for z in ZEROED_ALLOCATED])
def test_zeroed_allocated_ranges(geometry, texts, expected):
    """zeroed_allocated: the units zeroed partly (or v2 with NO_HOLE), in their own zeroing
    unit, up to the virtual size, kept by NO_HOLE zeroes of the whole unit; data, whole-unit
    zeroes that may trim and whole-cluster discards take them out."""
    assert zeroed_allocated([parse_command(t) for t in texts], geometry) == expected
