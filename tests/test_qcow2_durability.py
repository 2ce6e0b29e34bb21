"""Durability of qcow2 writes observed: a FLUSH (or FUA) reply only after the data and
every metadata update it depends on (refcount blocks, L2 tables, L1 entries) were
written and synced, and those written in dependency order - data synced before the
refcounts that count its clusters, refcounts synced before the L2 entries that point
at them, L2 synced before the L1 entries that point at new tables - so a crash at any
moment leaves at most leaked clusters.

pynbd runs under strace (tests/support/strace.py, as tests/test_durability.py does for
raw images); where the data and the tables landed in the file is read afterwards from
the image itself (pynbd's qcow2 layer, checked against qemu-img map).
"""

from __future__ import annotations

import json

import pytest

from pynbd.image.qcow2 import open_qcow2
from pynbd.image.qcow2.layer import L1E_OFFSET_MASK
from tests.support.nbdclient import CMD_FLAG_FUA, CMD_FLUSH, CMD_TRIM, CMD_WRITE, CMD_WRITE_ZEROES, NbdClient
from tests.support.servers import run
from tests.support.strace import WRITE, StracedPynbd, check_durable

KiB = 1024
MiB = 1024 * KiB
CLUSTER = 64 * KiB

pytestmark = [pytest.mark.pynbd, pytest.mark.needs("strace", "qemu-img"), pytest.mark.timeout(90)]


def cookie(n: int) -> int:
    return 0x5EED_D15C_0000_0000 | n


@pytest.fixture
def traced(tmp_path):
    image = tmp_path / "disk.qcow2"
    run(["qemu-img", "create", "-q", "-f", "qcow2", str(image), "16M"])
    server = StracedPynbd(image, workdir=tmp_path)
    yield server, image
    server.stop(check=False)


def _ok(client: NbdClient, type: int, offset: int = 0, length: int | None = None, flags: int = 0,
        payload: bytes = b"", *, n: int) -> None:
    reply = client.request(type, offset, length, flags, payload, cookie=cookie(n))
    assert reply.error == 0, reply


def _host_of(image, guest: int) -> int:
    """Where guest offset ``guest`` is stored in the file, by qemu-img map."""
    out = run(["qemu-img", "map", "--output=json", str(image)]).stdout
    for entry in json.loads(out):
        if entry["start"] <= guest < entry["start"] + entry["length"] and entry.get("offset") is not None:
            return entry["offset"] + guest - entry["start"]
    raise AssertionError(f"guest offset {guest} is not mapped: {out}")


def _tables(image) -> tuple[int, int, int]:
    """(L1 table offset, L2 table offset of L1 entry 0, refcount table offset)."""
    with open_qcow2(str(image), read_only=True) as img:
        top = img.top
        return top.header.l1_table_offset, top.l1[0] & L1E_OFFSET_MASK, top.header.refcount_table_offset


def _synced_between(trace, first, then) -> bool:
    """A sync of the file started after ``first`` returned and returned before ``then`` began."""
    return trace.sync_after(first, then.call.start) is not None


def test_flush_after_allocating_writes_syncs_data_and_metadata_in_order(traced):
    server, image = traced
    with NbdClient.connect(server) as c:
        _ok(c, CMD_WRITE, 0, payload=b"\x11" * 4 * KiB, n=1)
        _ok(c, CMD_WRITE, 3 * CLUSTER + 512, payload=b"\x22" * 8 * KiB, n=2)
        _ok(c, CMD_FLUSH, n=3)
        c.disconnect()
    trace = server.trace()
    host = [_host_of(image, 0), _host_of(image, 3 * CLUSTER + 512)]
    l1, l2, _ = _tables(image)
    check_durable(trace, cookie(3), [image],
                  expect=[(image, host[0], 4 * KiB, (WRITE,)), (image, host[1], 8 * KiB, (WRITE,)),
                          (image, l2, 8, (WRITE,)), (image, l1, 8, (WRITE,))])
    changes = [ch for ch in trace.changes if ch.path == str(image.resolve()) and ch.kind == WRITE]
    data = [ch for ch in changes if any(ch.covers(h, 4 * KiB) for h in host)]
    l2_writes = [ch for ch in changes if ch.covers(l2, 8)]
    l1_writes = [ch for ch in changes if ch.covers(l1, 8)]
    assert data and l2_writes and l1_writes
    for d in data:
        assert all(_synced_between(trace, d, w) for w in l2_writes), "L2 written before its data was synced"
    for w in l2_writes:
        assert all(_synced_between(trace, w, x) for x in l1_writes), "L1 written before the new L2 was synced"
    reference = run(["qemu-img", "check", "--output=json", str(image)]).stdout
    assert json.loads(reference).get("leaks", 0) == 0 and "corruptions" not in json.loads(reference)


def test_fua_write_is_durable_with_its_metadata(traced):
    server, image = traced
    with NbdClient.connect(server) as c:
        _ok(c, CMD_WRITE, 5 * CLUSTER, payload=b"\x33" * CLUSTER, flags=CMD_FLAG_FUA, n=1)
        c.disconnect()
    trace = server.trace()
    host = _host_of(image, 5 * CLUSTER)
    _, l2, _ = _tables(image)
    check_durable(trace, cookie(1), [image],
                  expect=[(image, host, CLUSTER, (WRITE,)), (image, l2, 8, (WRITE,))])


@pytest.mark.parametrize("command", ["trim", "write-zeroes"])
def test_flush_after_trim_or_zeroes_syncs_the_tables(traced, command):
    server, image = traced
    with NbdClient.connect(server) as c:
        _ok(c, CMD_WRITE, 0, payload=b"\x44" * 2 * CLUSTER, n=1)
        _ok(c, CMD_FLUSH, n=2)
        if command == "trim":
            _ok(c, CMD_TRIM, 0, 2 * CLUSTER, n=3)
        else:
            _ok(c, CMD_WRITE_ZEROES, 0, 2 * CLUSTER, n=3)
        _ok(c, CMD_FLUSH, n=4)
        c.disconnect()
    trace = server.trace()
    _, l2, _ = _tables(image)
    check_durable(trace, cookie(4), [image], since=cookie(2), expect=[(image, l2, 8, (WRITE,))])
    out = json.loads(run(["qemu-img", "check", "--output=json", str(image)]).stdout)
    assert "corruptions" not in out and out.get("leaks", 0) == 0, out
