"""I/O counters of an export (pynbd/server/stats.py), with QEMU's block/accounting.c
rules as the model: a completed request adds bytes, an operation and its time; a
failed one a failed operation and its time; a refused one an invalid operation; each
is an access (``idle_time_ns``); ``wr_highest_offset`` is the end of the highest
WRITE or WRITE_ZEROES, failed or not.

Then the command handlers count what a real client (libnbd) sends to a real server
(pynbd's NbdServer, in process, so the counters can be read): READ, WRITE,
WRITE_ZEROES (as writes), TRIM (as unmap) and FLUSH; a FAST_ZERO write-zeroes the
qcow2 driver cannot do fast fails for real and counts as a failed write; BLOCK_STATUS
and CACHE count nothing.
"""

from __future__ import annotations

import asyncio
import os
import resource
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pynbd.protocol.constants import Command
from pynbd.server.exports import Export, ExportConfig
from pynbd.server.server import ListenAddress, NbdServer, listen
from pynbd.server.settings import ConnectionSettings
from pynbd.server.stats import (
    IO_FLUSH,
    IO_READ,
    IO_UNMAP,
    IO_WRITE,
    IoStats,
    query_blockstats,
    uncounted_device_stats,
)
from tests.support.nbdclient import CMD_WRITE, ENOSPC, NbdClient
from tests.support.qmp import NEGOTIATE, RawQmp, pynbd_with_qmp
from tests.support.servers import DEBIAN_PYTHON, run

MiB = 1 << 20
T = TypeVar("T")

#: BlockDeviceStats field prefix of each kind, and the NBD commands counted as it.
PREFIX = {IO_READ: "rd", IO_WRITE: "wr", IO_UNMAP: "unmap", IO_FLUSH: "flush"}
COMMANDS_OF = {IO_READ: [Command.READ], IO_WRITE: [Command.WRITE, Command.WRITE_ZEROES],
               IO_UNMAP: [Command.TRIM], IO_FLUSH: [Command.FLUSH]}

#: The keys of BlockDeviceStats in QEMU 7.2 (qapi/block-core.json), idle_time_ns aside.
BLOCK_DEVICE_STATS_KEYS = {
    "rd_bytes", "wr_bytes", "unmap_bytes", "rd_operations", "wr_operations", "flush_operations",
    "unmap_operations", "rd_total_time_ns", "wr_total_time_ns", "flush_total_time_ns", "unmap_total_time_ns",
    "wr_highest_offset", "rd_merged", "wr_merged", "unmap_merged", "failed_rd_operations",
    "failed_wr_operations", "failed_flush_operations", "failed_unmap_operations", "invalid_rd_operations",
    "invalid_wr_operations", "invalid_flush_operations", "invalid_unmap_operations", "account_invalid",
    "account_failed", "timed_stats",
}


class ManualClock:
    """A nanosecond clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1_000_000

    def __call__(self) -> int:
        return self.now


# --- the counters against a model ---------------------------------------------------------------

kinds = st.sampled_from([IO_READ, IO_WRITE, IO_UNMAP, IO_FLUSH])
operations = st.one_of(
    st.tuples(st.sampled_from(["done", "fail"]), kinds, st.integers(0, 1 << 40), st.integers(0, 1 << 25),
              st.integers(0, 10**9)),
    st.tuples(st.just("invalid"), st.sampled_from(list(Command)), st.just(0), st.just(0), st.integers(0, 10**6)),
)


def model_stats(ops: list[tuple[Any, ...]], clock: ManualClock) -> IoStats:
    """Apply ``ops`` to a fresh IoStats on ``clock`` (each op takes its duration)."""
    stats = IoStats(clock)
    for what, kind, offset, length, duration in ops:
        start = clock.now
        clock.now += duration
        if what == "done":
            stats.done(kind, offset, length, start)
        elif what == "fail":
            stats.fail(kind, offset, length, start)
        else:
            stats.invalid_command(kind)
    return stats


def expected_stats(ops: list[tuple[Any, ...]], idle_after: int) -> dict[str, Any]:
    """The BlockDeviceStats QEMU's rules give for ``ops`` (each ends ``duration`` after it
    starts, the next starts then), read ``idle_after`` after the last one."""
    want: dict[str, Any] = {key: 0 for key in BLOCK_DEVICE_STATS_KEYS}
    want.update(account_invalid=True, account_failed=True, timed_stats=[])
    now = 0
    last_access = None
    for what, kind, offset, length, duration in ops:
        now += duration
        if what == "invalid":
            counted_as = [k for k, commands in COMMANDS_OF.items() if kind in commands]
            if counted_as:
                want[f"invalid_{PREFIX[counted_as[0]]}_operations"] += 1
                last_access = now
            continue
        prefix = PREFIX[kind]
        if what == "done":
            if kind == IO_FLUSH:
                want["flush_operations"] += 1
            else:
                want[f"{prefix}_bytes"] += length
                want[f"{prefix}_operations"] += 1
        else:
            want[f"failed_{prefix}_operations"] += 1
        want[f"{prefix}_total_time_ns"] += duration
        if kind == IO_WRITE and length:
            want["wr_highest_offset"] = max(want["wr_highest_offset"], offset + length)
        last_access = now
    if last_access is not None:
        want["idle_time_ns"] = now + idle_after - last_access
    return want


@settings(max_examples=300)
@given(st.lists(operations, max_size=40), st.integers(0, 10**9))
def test_counters_follow_qemus_accounting_rules(ops, idle_after):
    clock = ManualClock()
    stats = model_stats(ops, clock)
    clock.now += idle_after
    assert stats.block_device_stats() == expected_stats(ops, idle_after)


def test_fresh_counters_have_no_idle_time_and_the_qemu_keys():
    answer = IoStats().block_device_stats()
    assert set(answer) == BLOCK_DEVICE_STATS_KEYS
    assert answer["account_invalid"] is answer["account_failed"] is True


def test_uncounted_nodes_answer_zeros_without_accounting():
    answer = uncounted_device_stats()
    assert set(answer) == BLOCK_DEVICE_STATS_KEYS
    assert not answer["account_invalid"] and not answer["account_failed"]
    assert all(v == 0 for k, v in answer.items() if k not in ("account_invalid", "account_failed", "timed_stats"))


def test_a_refused_shutdown_command_is_not_counted():
    stats = IoStats()
    stats.invalid_command(Command.BLOCK_STATUS)
    stats.invalid_command(Command.DISC)
    assert "idle_time_ns" not in stats.block_device_stats()
    stats.invalid_command(Command.WRITE_ZEROES)
    assert stats.block_device_stats()["invalid_wr_operations"] == 1


def test_query_blockstats_without_query_nodes_lists_no_anonymous_backend():
    assert query_blockstats([object()], query_nodes=False) == []  # type: ignore[list-item]


# --- the handlers count what a real client sends --------------------------------------------------


async def serving(export: Export, sock: Path, client: Callable[[], Awaitable[T]]) -> T:
    """Serve ``export`` on the unix socket ``sock`` (pynbd's NbdServer in this process)
    while ``client()`` runs; stops the server (not the export) before returning."""
    server = NbdServer([export], [listen(ListenAddress(unix_path=str(sock)))], ConnectionSettings())
    task = asyncio.get_running_loop().create_task(server.serve())
    try:
        return await client()
    finally:
        server.stop()
        await task


async def run_tool(*argv: str) -> str:
    """Run a client process without blocking the server's event loop; its stdout.
    Debian's python3 (libnbd) gets an environment without PYTHON* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, env=env)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, f"{argv[0]} failed: {err.decode()}"
    return out.decode()


LIBNBD_REQUESTS = """
import nbd, sys
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(sys.argv[1])
h.pread(65536, 0)
h.pread(4096, 1048576)
h.pwrite(b"x" * 8192, 2097152)
h.pwrite(b"y" * 512, 512, nbd.CMD_FLAG_FUA)
h.zero(131072, 3145728)
h.trim(65536, 65536)
h.flush()
h.block_status(1048576, 0, lambda *args: 0)
if "cache" in sys.argv[2]:
    h.cache(4096, 0)
if "fast-zero" in sys.argv[2]:
    try:
        h.zero(4096, 4194304 + 512, nbd.CMD_FLAG_FAST_ZERO)
    except nbd.Error as exc:
        print("fast zero refused:", exc.errno)
h.shutdown()
"""


def serve_requests(image: Path, fmt: str, extra: str) -> Export:
    export = Export.open(ExportConfig(name="", path=str(image), fmt=fmt))

    async def main() -> str:
        uri = f"nbd+unix:///?socket={image.parent / 'nbd.sock'}"
        return await serving(export, image.parent / "nbd.sock",
                             lambda: run_tool(DEBIAN_PYTHON, "-c", LIBNBD_REQUESTS, uri, extra))

    try:
        out = asyncio.run(main())
    finally:
        export.close()
    if "fast-zero" in extra:
        assert "fast zero refused: ENOTSUP" in out  # ENOTSUP: the driver refused, nothing changed
    return export


def assert_counted(answer: dict[str, Any], failed_writes: int, write_end: int) -> None:
    assert (answer["rd_operations"], answer["rd_bytes"]) == (2, 65536 + 4096)
    # WRITE x2 and WRITE_ZEROES; the FUA write's flush is part of it, not a FLUSH.
    assert (answer["wr_operations"], answer["wr_bytes"]) == (3, 8192 + 512 + 131072)
    assert (answer["unmap_operations"], answer["unmap_bytes"]) == (1, 65536)
    assert answer["flush_operations"] == 1
    assert answer["failed_wr_operations"] == failed_writes
    assert answer["failed_rd_operations"] == answer["failed_unmap_operations"] == 0
    assert answer["wr_highest_offset"] == write_end
    for prefix in ("rd", "wr", "unmap", "flush"):
        assert answer[f"{prefix}_total_time_ns"] > 0
        assert answer[f"invalid_{prefix}_operations"] == 0
    assert 0 <= answer["idle_time_ns"] < 60 * 10**9


@pytest.mark.needs("libnbd-python", "qemu-img")
def test_handlers_count_a_raw_exports_requests(tmp_path):
    image = tmp_path / "disk.raw"
    with open(image, "wb") as f:
        f.truncate(8 * MiB)
    export = serve_requests(image, "raw", "cache")
    assert_counted(export.stats.block_device_stats(), failed_writes=0, write_end=3145728 + 131072)


@pytest.mark.needs("libnbd-python", "qemu-img")
def test_handlers_count_a_failed_fast_zero_as_a_failed_write(tmp_path):
    image = tmp_path / "disk.qcow2"
    qemu_img = shutil.which("qemu-img")
    assert qemu_img
    asyncio.run(run_tool(qemu_img, "create", "-q", "-f", "qcow2", str(image), "8M"))
    # (No CACHE here: NBD_CMD_CACHE on a qcow2 export fails, Qcow2Image.cache is its table cache.)
    export = serve_requests(image, "qcow2", "fast-zero")
    # The failed write-zeroes (a partial cluster cannot be zeroed fast) raises
    # wr_highest_offset all the same, as QEMU's block layer does.
    assert_counted(export.stats.block_device_stats(), failed_writes=1, write_end=4194304 + 512 + 4096)


@pytest.mark.pynbd
@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_a_burst_of_writes_that_partly_fail_is_answered_and_counted(tmp_path, fmt):
    """Pipelined WRITEs (served on the spot, replies sent together) past the server's
    file size limit (EFBIG, as a full disk) each get ENOSPC and count as failed; the
    others succeed, count as done and read back."""
    image = tmp_path / f"disk.{fmt}"
    if fmt == "raw":
        with open(image, "wb") as f:
            f.truncate(64 * MiB)
    else:
        # Fully allocated: every write below goes in place, none needs metadata.
        run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "preallocation=full", str(image), "64M"])
    writes = [(i * 257 * 4096, bytes([i + 1]) * 4096) for i in range(48)]  # 0 .. 48 MiB
    with pynbd_with_qmp(image, workdir=tmp_path) as server:
        # Host offsets of a fully preallocated qcow2 are guest offsets plus its metadata.
        limit = 24 * MiB
        resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        with NbdClient.connect(server) as client:
            burst = b"".join(NbdClient.encode_request(CMD_WRITE, offset, len(data), 0, i) + data
                             for i, (offset, data) in enumerate(writes))
            client.send(burst)
            replies = client.read_replies(len(writes))
            resource.prlimit(server.proc.pid, resource.RLIMIT_FSIZE,
                             (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
            errors = {i: replies[i].error for i in range(len(writes))}
            failed = [i for i, error in errors.items() if error]
            assert set(errors.values()) == {0, ENOSPC}, errors
            for i, (offset, data) in enumerate(writes):
                if i not in failed:
                    assert client.read(offset, len(data)).data(offset, len(data)) == data
        with RawQmp(server.qmp_path) as qmp:
            qmp.send(NEGOTIATE)
            qmp.read_line()
            nodes = qmp.execute("query-blockstats", {"query-nodes": True})["return"]
        stats = next(node["stats"] for node in nodes if node["node-name"] == "disk0")  # the export's node
        assert "Traceback" not in server.log()
    assert stats["wr_operations"] == len(writes) - len(failed)
    assert stats["wr_bytes"] == 4096 * (len(writes) - len(failed))
    assert stats["failed_wr_operations"] == len(failed)
    assert stats["wr_highest_offset"] == writes[-1][0] + 4096
