"""qcow2 writes to images with extended L2 entries and with external data files, beyond
what tests/test_qcow2_writes.py compares (content, maps, ``qemu-img check``):

* **extended L2 entries like QEMU's**: the same qemu-io lists (the harness' edge list,
  generated lists, a list of shapes) leave pynbd's and qemu-nbd's copy with the same L2
  entries and the same subcluster bitmaps, host offsets aside (allocation order). The
  harness' map leeway lets a subcluster zeroed by writing zeros where QEMU sets its zero
  bit pass; this comparison does not;
* **a byte model**: random writes, zeroes (with and without NO_HOLE) and trims done in
  the process, on an extended-L2 image over a shorter backing file, on one with an
  external data file, and on images with a raw and a non-raw data file: the image reads
  like the model (pynbd and ``qemu-img compare``), ``qemu-img check`` is clean, the
  bitmaps are valid (no subcluster allocated and zero, no allocated one without a host
  cluster), a raw data file reads as the guest sees the image;
* **FAST_ZERO** on extended L2: the same replies as qemu-nbd (ENOTSUP where a subcluster
  would have to be written) and the same entries afterwards;
* **the data file**: locked as qemu-nbd locks it; a FLUSH syncs data written to it
  before the L2 table that maps it, and a raw data file's discarded cluster before the
  L2 table that zeroes it (strace, as tests/test_qcow2_durability.py).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pynbd.image.locking import DATA_FILE_WRITABLE
from pynbd.image.qcow2 import open_qcow2
from tests.qcow2_fixtures import session_fixtures
from tests.support.nbdclient import CMD_FLAG_FAST_ZERO, CMD_FLUSH, CMD_TRIM, CMD_WRITE, NbdClient
from tests.support.qcow2_writes import (
    build_extl2_64k,
    copy_fixture,
    generate_commands,
    parse_command,
    probe_geometry,
    run_tool,
    send_commands,
)
from tests.support.servers import PynbdServer, QemuNbdServer
from tests.support.strace import WRITE, StracedPynbd, check_durable
from tests.test_locking import lock_bytes_held_by_others, qemu_nbd_lock_bytes
from tests.test_qcow2_durability import _synced_between, _tables, cookie
from tests.test_qcow2_writes import edge_commands, start_server

pytestmark = [pytest.mark.interop, pytest.mark.needs("qemu-img", "qemu-io", "qemu-nbd"),
              pytest.mark.timeout(180)]

KiB = 1 << 10
L1E_OFFSET = L2E_OFFSET = 0x00FFFFFFFFFFFE00
COPIED, COMPRESSED = 1 << 63, 1 << 62
ALLOC_HALF = (1 << 32) - 1


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The session's fixtures plus the harness' extended-L2 image with 64 KiB clusters."""
    found = dict(session_fixtures(tmp_path_factory))
    found["extl2-64k.qcow2"] = build_extl2_64k(tmp_path_factory.mktemp("subcl"))
    return found


def extended_entries(image: Path) -> dict[int, tuple[int, int]]:
    """``{guest cluster offset: (entry, bitmap)}`` of every non-zero entry of an extended-L2
    image, read from the file with the qcow2 spec's header offsets (not pynbd's reader)."""
    raw = image.read_bytes()

    def word(at: int, n: int = 8) -> int:
        return int.from_bytes(raw[at:at + n], "big")

    cluster_bits, size, l1_size, l1_offset = word(20, 4), word(24), word(36, 4), word(40)
    per_table = (1 << cluster_bits) // 16
    found = {}
    for i in range(l1_size):
        table = word(l1_offset + 8 * i) & L1E_OFFSET
        for j in range(per_table if table else 0):
            guest = (i * per_table + j) << cluster_bits
            entry, bitmap = word(table + 16 * j), word(table + 16 * j + 8)
            if (entry or bitmap) and guest < size:
                found[guest] = (entry, bitmap)
    return found


def without_hosts(entries: dict[int, tuple[int, int]]) -> dict[int, tuple[int, bool, int]]:
    """Entries with their host offsets reduced to "has one": flags, host, bitmap."""
    return {g: (e & (COPIED | COMPRESSED | 1), bool(e & L2E_OFFSET), b) for g, (e, b) in entries.items()}


def assert_bitmaps_valid(image: Path) -> None:
    """qcow2 spec 'Extended L2 Entries': no subcluster allocated and zero, no allocated
    subcluster without a host cluster (data file images: offset 0 with COPIED is one)."""
    for guest, (entry, bitmap) in extended_entries(image).items():
        alloc, zero = bitmap & ALLOC_HALF, bitmap >> 32
        assert not alloc & zero, f"{guest:#x}: {entry:#x} {bitmap:#x} allocated and zero"
        if entry & COMPRESSED:
            assert not bitmap, f"{guest:#x}: compressed with bitmap {bitmap:#x}"
        elif alloc:
            assert entry & (L2E_OFFSET | COPIED), f"{guest:#x}: {entry:#x} {bitmap:#x} allocated, no host"


def run_both(source: Path, texts: list[str], workdir: Path) -> tuple[Path, Path]:
    """The commands through pynbd on one copy of ``source`` and qemu-nbd on another;
    both must succeed alike. Returns the two copies."""
    geometry = probe_geometry(source)
    commands = [parse_command(t) for t in texts]
    copies = [copy_fixture(geometry, source.parent, workdir / side) for side in ("pynbd", "qemu")]
    outcomes = []
    for kind, image in zip(("pynbd", "qemu-nbd"), copies):
        server = start_server(kind, image)
        try:
            outcomes.append(send_commands(server.socket, commands))
        finally:
            server.stop(check=False)
    assert outcomes[0] == outcomes[1] and not any("failed" in line for line in outcomes[0]), outcomes
    return copies[0], copies[1]


# Shapes placed on extl2-64k.qcow2 (2 KiB subclusters; backing file up to 3M+1536): partial
# subclusters zeroed beyond the backing file (zero bit) and over it or over data (written),
# across a subcluster boundary, at the image's end, whole clusters with and without unmap,
# partial and whole discards, writes into zero, unallocated and allocated subclusters.
def _bytes(size: str) -> int:
    return int(size[:-1]) * {"k": KiB, "M": 1024 * KiB}[size[-1]] if size[-1] in "kM" else int(size)


SHAPES = [f"{cmd} {_bytes(offset)} {_bytes(length)}" for cmd, offset, length in (
    ("write -z", "4M", "1000"), ("write -z", "4000k", "100"), ("write -z", "5M", "1000"),
    ("write -z", "100k", "100"), ("write -z", "4100k", "3000"), ("write -z", "6143k", "1k"),
    ("write -z", "1M", "66k"), ("write -z -u", "5000k", "100k"), ("write -z", "3M", "64k"),
    ("write -z -u", "5M", "32k"), ("discard", "0", "64k"), ("discard", "5100k", "100k"),
    ("write -P 1", "4001k", "3k"), ("write -P 2", "70k", "100"), ("write -P 3", "3070k", "100k"),
    ("write -P 4", "200k", "1"), ("write -P 5", "128k", "64k"), ("write -P 6", "4M", "2048"),
    ("discard", "4M", "64k"), ("write -P 7", "4M", "3000"))]

EXACT_CASES = [("extl2-64k.qcow2", "shapes"), ("extl2.qcow2", 311),  # (extl2.qcow2: no backing file)
               *((image, seed) for image in ("extl2-64k.qcow2", "extl2-16k.qcow2")
                 for seed in (None, 311, 312))]


@pytest.mark.pynbd
@pytest.mark.parametrize("name,seed", EXACT_CASES, ids=[f"{n[:-6]}-{s or 'edges'}" for n, s in EXACT_CASES])
def test_extended_l2_entries_like_qemu_nbd(images, tmp_path, name, seed):
    """Same list, same L2 entries and subcluster bitmaps as qemu-nbd (host offsets aside)."""
    source = images[name]
    geometry = probe_geometry(source)
    if seed == "shapes":
        texts = SHAPES
    else:
        commands = edge_commands(geometry) if seed is None else generate_commands(geometry, seed, 60)
        texts = [c.text for c in commands]
    ours, theirs = run_both(source, texts, tmp_path)
    mine, reference = without_hosts(extended_entries(ours)), without_hosts(extended_entries(theirs))
    differ = {f"{g:#x}": (mine.get(g), reference.get(g)) for g in sorted(mine.keys() | reference.keys())
              if mine.get(g) != reference.get(g)}
    assert not differ, f"entries differ (pynbd, qemu-nbd): {differ}"
    assert_bitmaps_valid(ours)


# --- a byte model, in the process ---------------------------------------------------------

#: name -> (qemu-img create options, size, backing file size or 0, qemu-io commands)
MODEL_IMAGES = {
    "extl2": ("extended_l2=on,cluster_size=16k", 320 * KiB, 100 * KiB + 512,
              ["write -P 0x31 1k 2k", "write -z 20k 4k", "write -z 48k 16k", "write -P 0x32 70k 120k",
               "discard 96k 16k", "write -P 0x33 250k 1k"]),
    "extl2-data": ("extended_l2=on,cluster_size=16k,data_file=m.data", 192 * KiB, 0,
                   ["write -P 0x34 0 1k", "write -P 0x35 40k 100k", "write -z 64k 16k"]),
    "data-raw": ("cluster_size=4k,data_file=m.data,data_file_raw=on", 128 * KiB, 0,
                 ["write -P 0x41 0 120k", "write -z 16k 4k", "write -P 0x42 20k 100"]),
    "data-backed": ("cluster_size=4k,data_file=m.data", 128 * KiB, 50 * KiB + 512,
                    ["write -P 0x51 4k 40k", "write -z 40k 8k", "write -P 0x52 60k 1"]),
}


@pytest.fixture(scope="module")
def model_images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, bytes]]:
    """Each MODEL_IMAGES image in its own directory (``m.qcow2``, maybe ``m.data`` and a raw
    backing file ``b.raw`` of pattern 0xb0), with what QEMU reads from it."""
    built = {}
    for name, (options, size, backing, writes) in MODEL_IMAGES.items():
        directory = tmp_path_factory.mktemp(f"model-{name}")
        create = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", options]
        if backing:
            with open(directory / "b.raw", "wb") as f:
                f.write(bytes([0xB0]) * backing)
            create += ["-b", "b.raw", "-F", "raw"]
        run_tool([*create, "m.qcow2", str(size)], cwd=directory)
        run_tool(["qemu-io", "-f", "qcow2", *(a for w in writes for a in ("-c", w)), "m.qcow2"],
                 cwd=directory)
        run_tool(["qemu-img", "convert", "-O", "raw", "m.qcow2", "start.raw"], cwd=directory)
        built[name] = (directory, (directory / "start.raw").read_bytes())
    return built


def apply_to_model(model: bytearray, kind: str, offset: int, length: int, pattern: int, cluster: int) -> None:
    """What pynbd promises for the request: data or zeros; a trim zeroes the whole clusters
    in the range (the last one when the range reaches the end), leaves the rest."""
    end = offset + length
    if kind == "write":
        model[offset:end] = bytes([pattern]) * length
    elif kind in ("zero", "zero-trim"):
        model[offset:end] = bytes(length)
    else:
        first = -(-offset // cluster) * cluster
        last = len(model) if end >= len(model) else end // cluster * cluster
        if first < last:
            model[first:last] = bytes(last - first)


@st.composite
def requests(draw: st.DrawFn, size: int, cluster: int) -> list[tuple[str, int, int, int]]:
    """Up to 10 requests: kind, offset, length (1 byte to 3 clusters, inside), pattern."""
    out = []
    for _ in range(draw(st.integers(1, 10))):
        kind = draw(st.sampled_from(["write", "write", "zero", "zero-trim", "trim"]))
        # Often cluster or subcluster aligned: whole units are where the metadata changes.
        unit = draw(st.sampled_from([1, cluster // 32, cluster]))
        offset = draw(st.integers(0, (size - 1) // unit)) * unit
        length = draw(st.integers(1, max(min(3 * cluster, size - offset) // unit, 1))) * unit
        out.append((kind, offset, min(length, size - offset), draw(st.integers(1, 255))))
    return out


@pytest.mark.parametrize("name", list(MODEL_IMAGES))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_requests_keep_the_image_like_a_byte_model(model_images, name, data):
    """In-process writes, zeroes and trims: the image reads like the model, checks clean,
    its bitmaps valid; a raw data file reads like the guest."""
    source, start = model_images[name]
    options, size = MODEL_IMAGES[name][:2]
    cluster = int(options.split("cluster_size=")[1].split("k")[0]) * KiB
    ops = data.draw(requests(size, cluster))
    model = bytearray(start)
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        for f in source.iterdir():
            shutil.copy(f, work / f.name)
        image = open_qcow2(str(work / "m.qcow2"), read_only=False)
        try:
            assert not image.read_only
            for kind, offset, length, pattern in ops:
                if kind == "write":
                    image.write(offset, bytes([pattern]) * length)
                elif kind == "trim":
                    image.trim(offset, length)
                else:
                    image.write_zeroes(offset, length, may_trim=kind == "zero-trim")
                apply_to_model(model, kind, offset, length, pattern, cluster)
            image.flush()
            assert image.read(0, size) == model
        finally:
            image.close()
        (work / "model.raw").write_bytes(model)
        run_tool(["qemu-img", "check", "m.qcow2"], cwd=work)
        run_tool(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", "m.qcow2", "model.raw"], cwd=work)
        if "extended_l2" in options:
            assert_bitmaps_valid(work / "m.qcow2")
        if "data_file_raw" in options:
            assert (work / "m.data").read_bytes()[:size] == model


# --- FAST_ZERO ----------------------------------------------------------------------------

# extl2-64k.qcow2: (offset, length) of WRITE_ZEROES with FAST_ZERO: a partial subcluster beyond
# the backing file (zero bit), one over backing data and one over allocated data (would be
# written: ENOTSUP), whole subclusters, a whole cluster, a range with an unzeroable edge.
FAST_ZEROES = [(4 * 1024 * KiB + 100, 1000), (100 * KiB, 100), (5 * 1024 * KiB + 1, 10),
               (4100 * KiB, 6 * KiB), (4 * 1024 * KiB + 64 * KiB, 64 * KiB), (100 * KiB, 10 * KiB)]


@pytest.mark.pynbd
def test_fast_zero_like_qemu_nbd(images, tmp_path):
    """WRITE_ZEROES with FAST_ZERO: each reply as qemu-nbd's, then the same entries."""
    source = images["extl2-64k.qcow2"]
    geometry = probe_geometry(source)
    copies = [copy_fixture(geometry, source.parent, tmp_path / side) for side in ("pynbd", "qemu")]
    servers = (lambda: PynbdServer(copies[0], "-f", "qcow2", workdir=copies[0].parent),
               lambda: QemuNbdServer(copies[1], fmt="qcow2", workdir=copies[1].parent))
    replies = []
    for start in servers:
        with start() as server:
            with NbdClient.connect(server) as client:
                replies.append([client.write_zeroes(o, n, CMD_FLAG_FAST_ZERO).error for o, n in FAST_ZEROES])
                assert client.request(CMD_FLUSH).error == 0
    assert replies[0] == replies[1] and 0 in replies[0] and any(replies[0]), replies
    assert without_hosts(extended_entries(copies[0])) == without_hosts(extended_entries(copies[1]))


# --- the data file ------------------------------------------------------------------------


@pytest.mark.pynbd
def test_data_file_locked_like_qemu_nbd(images, tmp_path):
    """Served writable, the data file holds qemu-nbd's lock bytes (DATA_FILE_WRITABLE):
    another writer may write it (QEMU shares that), nobody may resize it; released at stop."""
    source = images["extdata.qcow2"]
    geometry = probe_geometry(source)
    image = copy_fixture(geometry, source.parent, tmp_path)
    data = tmp_path / geometry.data_file
    [_, theirs] = qemu_nbd_lock_bytes(image, [image, data], fmt="qcow2")
    resize = ["qemu-img", "resize", "-q", "-f", "raw", str(data), "+64k"]
    with PynbdServer(image, "-f", "qcow2", workdir=tmp_path):
        ours = lock_bytes_held_by_others(data)
        refused = run_tool(resize, check=False)
    assert ours == theirs == set(DATA_FILE_WRITABLE.lock_bytes())
    assert refused.returncode != 0 and "resize" in refused.stderr, refused
    assert not lock_bytes_held_by_others(data)
    run_tool(resize)


@pytest.mark.pynbd
@pytest.mark.needs("strace")
@pytest.mark.timeout(90)
def test_flush_syncs_the_data_file_before_the_l2_table(tmp_path):
    """Data written to an external data file and a raw data file's discarded cluster are
    synced before the L2 table that maps them is written; the FLUSH reply after all."""
    image, data = tmp_path / "d.qcow2", tmp_path / "d.data"
    run_tool(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=d.data,data_file_raw=on",
              image, "4M"], cwd=tmp_path)
    run_tool(["qemu-io", "-f", "qcow2", "-c", "write -P 0x61 0 128k", image], cwd=tmp_path)
    _, l2, _ = _tables(image)
    server = StracedPynbd(image, workdir=tmp_path)
    try:
        with NbdClient.connect(server) as c:
            assert c.request(CMD_WRITE, 1024 * KiB, payload=b"\x33" * 4 * KiB, cookie=cookie(1)).error == 0
            assert c.request(CMD_TRIM, 64 * KiB, 64 * KiB, cookie=cookie(2)).error == 0
            assert c.request(CMD_FLUSH, cookie=cookie(3)).error == 0
            c.disconnect()
        trace = server.trace()
    finally:
        server.stop(check=False)
    check_durable(trace, cookie(3), [image, data],
                  expect=[(data, 1024 * KiB, 4 * KiB, (WRITE,)), (image, l2, 16, (WRITE,))])
    changes = [ch for ch in trace.changes if ch.call.end is not None]
    to_data = [ch for ch in changes if ch.path == str(data.resolve())]
    l2_writes = [ch for ch in changes if ch.path == str(image.resolve()) and ch.covers(l2, 16)]
    assert any(ch.kind != WRITE for ch in to_data), "the discarded cluster was not punched out"
    assert to_data and l2_writes
    for d in to_data:
        assert all(_synced_between(trace, d, w) for w in l2_writes), f"L2 written before {d.call} was synced"
    run_tool(["qemu-img", "compare", "-f", "raw", "-F", "qcow2", data, image], cwd=tmp_path)
    run_tool(["qemu-img", "check", image], cwd=tmp_path)
