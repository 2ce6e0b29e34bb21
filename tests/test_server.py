"""Server behaviour around the protocol: read paths, event loops, activation, limits, shutdown."""

from __future__ import annotations

import json
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.deadline import received_unread, unread_by_peer, wait_for_log, wait_until
from tests.support.nbdclient import Reply
from tests.support.servers import (
    PynbdServer,
    make_fragmented_raw,
    make_raw_image,
    nbdcopy,
    nbdinfo,
    check_polled,
    qemu_img_map_argv,
    run,
    settled_log,
    voluntary_switches,
)
from tests.support.hostfile import seek_runs
from tests.support.strace import StracedPynbd

pytestmark = [pytest.mark.pynbd, pytest.mark.needs("nbdinfo", "nbdcopy", "qemu-io")]

MiB = 1 << 20
WRITES = ("write -P 0xaa 0 1M", "write -P 0xbb 2M 512k", "write -P 0xcc 7M 1M")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def image(tmp_path) -> Path:
    return make_raw_image(tmp_path / "disk.img", 8 * MiB, WRITES)


def read_path_counts(log: str) -> tuple[int, int]:
    """Sum the per-connection 'N bytes by sendfile, M bytes copied' lines of a server log."""
    sent = copied = 0
    for m in re.finditer(r"read data sent: (\d+) bytes by sendfile, (\d+) bytes copied", log):
        sent += int(m[1])
        copied += int(m[2])
    return sent, copied


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
@pytest.mark.parametrize("zero_copy,tcp", [("on", False), ("off", False), ("on", True), ("auto", True),
                                           ("auto", False)])
def test_read_paths_really_run(image, tmp_path, loop, zero_copy, tcp):
    """The sendfile path is proven by the server's own byte counters, not guessed."""
    out = tmp_path / "out.img"
    with PynbdServer(image, "-v", "--loop", loop, "--zero-copy", zero_copy, "--read-only", tcp=tcp) as server:
        nbdcopy("--connections=2", server.uri, out)
        log = settled_log(server, 2)
    assert out.read_bytes() == image.read_bytes()
    assert f"on {loop}" in log
    sent, copied = read_path_counts(log)
    data_bytes = 1 * MiB + 512 * 1024 + 1 * MiB  # nbdcopy reads only the data extents
    use_sendfile = zero_copy in ("on", "auto")  # auto: sendfile for nbdcopy's large reads
    if use_sendfile:
        assert sent >= data_bytes and copied == 0
    else:
        assert copied >= data_bytes and sent == 0


def test_auto_zero_copy_by_read_size(image):
    """--zero-copy auto copies small READs (faster for them, bench/README.md) and sends
    large ones with sendfile: qemu-io's 4 KiB reads are copied, its 512 KiB read is not."""
    with PynbdServer(image, "-v", "--read-only") as server:
        p = run(["qemu-io", "-r", "-f", "raw", "-c", "read -P 0xbb 2M 4k", "-c", "read -P 0xbb 2M 512k",
                 server.uri])
        assert p.stdout.count("read ") == 2 and "verification failed" not in p.stdout
        sent, copied = read_path_counts(settled_log(server, 1))
    assert copied >= 4096 and sent >= 512 * 1024
    assert copied < 512 * 1024 and sent < 512 * 1024 + 65536


def test_simple_replies_through_sendfile(image, tmp_path):
    """qemu-io in simple-reply mode (x-... no structured) still gets correct data via sendfile."""
    with PynbdServer(image, "-v", "--zero-copy", "on") as server:
        p = run(["qemu-io", "-f", "raw", "-c", "read -P 0xbb 2M 512k", "-c", "read -P 0 1M 1M",
                 server.uri])
        assert p.stdout.count("read ") == 2 and "verification failed" not in p.stdout
        sent, _ = read_path_counts(settled_log(server, 1))
    assert sent >= 512 * 1024


def test_systemd_socket_activation(image, tmp_path):
    path = str(tmp_path / "activated.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    fd = listener.fileno()

    def as_fd3():
        os.dup2(fd, 3)
        os.set_inheritable(3, True)

    env = dict(os.environ, LISTEN_FDS="1", PYTHONPATH=str(REPO))
    # LISTEN_PID must be the server's own pid: the shell sets it to $$ and execs.
    proc = subprocess.Popen(
        ["sh", "-c", f'LISTEN_PID=$$ exec "{sys.executable}" -m pynbd serve "{image}" -r'],
        env=env, preexec_fn=as_fd3, pass_fds=(fd, 3), stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        listener.close()
        # The socket listens already: nbdinfo connects at once and gets its answers
        # when the server has started; a failure to start shows as nbdinfo failing.
        p = run(["nbdinfo", "--size", f"nbd+unix:///?socket={path}"], check=False)
        assert p.stdout.strip() == str(8 * MiB), (p.stderr, proc.poll())
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err.decode()
    assert f"socket={path}" in err.decode()


def test_connection_limit_queues_extra_clients(image):
    """--shared 1: a second client waits until the first leaves, then is served (qemu-nbd -e).

    "Waits" is shown without a guess at how long accepting takes: the second client
    connects (into the listen backlog), then the first makes two option round trips. A
    server that would accept the second does it in the loop iteration that reads the
    first's next request (the listener is ready by then), and greets it at once; the
    second round trip starts after that iteration ended. So no greeting by then means
    the server did not accept it."""
    from tests.support.nbdclient import FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, NbdClient
    with PynbdServer(image, "--shared", "1", "-r") as server:
        with NbdClient.for_server(server) as first, NbdClient.for_server(server) as second:
            first.read_greeting()  # the first client holds the one slot
            first.send_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
            for _ in range(2):
                exports, final = first.list_exports()
                assert [name for name, _ in exports] == [""], final
            greeted, _, _ = select.select([second.sock], [], [], 0)
            assert not greeted, "the second client was accepted while the first held the only slot"
            first.close()
            result = second.handshake()  # greeted once the first has left
            assert result.size == 8 * MiB
            second.disconnect()


ACCEPTS = ("accept(", "accept4(")


@pytest.mark.needs("strace")
def test_out_of_file_descriptors_pauses_accepting(image, tmp_path):
    """EMFILE on accept: logged once, accepting pauses instead of spinning, and resumes
    once descriptors are free; a client connected before keeps working meanwhile.

    Spinning is counted, not timed: the server runs under strace, which records its
    accept calls. A server that kept polling its listener (ready while clients wait in
    the backlog) would call accept in every event-loop iteration, so at least once for
    each of the connected client's requests; a paused one retries on a 0.1 s timer."""
    import resource

    from tests.support.nbdclient import NbdClient
    with StracedPynbd(image, "-r", "--poll-us", "0", syscalls=["accept", "accept4"],
                      workdir=tmp_path) as server:
        pid = server.pid
        wait_for_log(server, "serving")
        worker = NbdClient.connect(server)
        data = image.read_bytes()[:4096]
        used = len(os.listdir(f"/proc/{pid}/fd"))
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (used + 3, hard))
        clients = []
        for _ in range(8):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(server.socket)  # the backlog takes it even when accept fails
            clients.append(s)
        wait_for_log(server, "accept failed")

        def accepts() -> int:
            return sum(server.calls(name) for name in ACCEPTS)

        # A few timed retries, each failing, and still the one log line.
        before = accepts()
        wait_until(lambda: accepts() >= before + 3, what="accept retried 3 times")
        requests = 200
        before = accepts()
        for _ in range(requests):
            reply = worker.read(0, 4096)
            assert reply.error == 0 and reply.data(0, 4096) == data
        during = accepts() - before
        assert during < requests // 2, f"{during} accept calls while serving {requests} requests: spinning"
        assert server.log().count("accept failed") == 1, "one line, not one per retry"
        for s in clients:
            s.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        assert nbdinfo("--size", server.uri).strip() == str(8 * MiB)
        worker.disconnect()


def _replies_until_closed(client, timeout: float = 30) -> dict[int, Reply]:
    """Every reply the server sends until it closes the connection, by cookie. The close
    must come between two replies: a reply cut short, a chunk after its reply's last,
    or a second reply to a cookie fails the test."""
    from tests.support.nbdclient import SimpleReply
    done: dict[int, Reply] = {}
    partial: dict[int, Reply] = {}
    client.sock.settimeout(timeout)
    while True:
        try:
            more = client.sock.recv(1, socket.MSG_PEEK)
        except ConnectionResetError:  # closed with requests it never read: unix sockets say so
            more = b""
        if not more:
            assert not partial, f"connection closed inside the replies to {sorted(partial)}"
            return done
        message = client.read_reply_message(timeout)  # Disconnected here: a message cut short
        assert message.cookie not in done, f"a second reply, or a chunk after the last, for {message.cookie}"
        if isinstance(message, SimpleReply):
            assert message.cookie not in partial
            done[message.cookie] = Reply(message.cookie, simple=message)
            continue
        reply = partial.setdefault(message.cookie, Reply(message.cookie))
        reply.chunks.append(message)
        if message.done:
            done[message.cookie] = partial.pop(message.cookie)


def _read_data(reply, offset: int, length: int) -> bytes:
    """The data of a structured READ reply: its data and hole chunks must cover the
    request exactly once."""
    from tests.support.nbdclient import REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE
    pieces = []
    for chunk in reply.chunks:
        if chunk.type == REPLY_TYPE_OFFSET_DATA:
            pieces.append((chunk.offset, chunk.data))
        elif chunk.type == REPLY_TYPE_OFFSET_HOLE:
            pieces.append((chunk.offset, bytes(chunk.hole_size)))
    pieces.sort(key=lambda piece: piece[0])
    pos = offset
    for start, data in pieces:
        assert start == pos and data, f"READ {offset}+{length}: chunk at {start}, expected {pos}"
        pos += len(data)
    assert pos == offset + length, f"READ {offset}+{length}: chunks end at {pos}"
    return b"".join(data for _, data in pieces)


def test_sigterm_answers_every_request_received(tmp_path):
    """SIGTERM while requests are in flight: every request the server had received is
    answered - those it had started (WRITEs, and a 32 MiB READ half sent) completed, with
    the right data, later ones completed or refused with ESHUTDOWN - and the connection
    closes between two replies; then the server exits 0 with every acknowledged WRITE in
    the image.

    No timing: the signal goes when the READ's reply has begun to arrive (it is larger
    than the socket holds, and the client reads nothing, so it is in flight), and the
    client reads once the server has logged that it is stopping. Which requests the
    server had received is measured (the unread part of what the client sent, SIOCOUTQ),
    not assumed."""
    from tests.support.nbdclient import CMD_READ, CMD_WRITE, ESHUTDOWN, NbdClient
    size = 48 * MiB
    original = random.Random(5).randbytes(size)
    image = tmp_path / "disk.img"
    image.write_bytes(original)
    rng = random.Random(6)
    # (command, offset, length, payload): 8 WRITEs, a READ of 32 MiB (the most a request
    # may ask), then small WRITEs and READs; no two overlap, no READ overlaps a WRITE.
    plan = [(CMD_WRITE, i * 256 * 1024, 256 * 1024, rng.randbytes(256 * 1024)) for i in range(8)]
    plan.append((CMD_READ, 8 * MiB, 32 * MiB, b""))
    for i in range(8):
        plan.append((CMD_WRITE, 44 * MiB + i * 8192, 4096, rng.randbytes(4096)))
        plan.append((CMD_READ, 46 * MiB + i * 8192, 4096, b""))
    in_flight = 9  # the first WRITEs and the large READ

    with PynbdServer(image) as server:
        client = NbdClient.connect(server)
        stream = bytearray()
        requests = {}  # cookie -> (command, offset, length, payload, end of the request in the stream)
        for command, offset, length, payload in plan:
            cookie = client.next_cookie()
            stream += client.encode_request(command, offset, length, 0, cookie) + payload
            requests[cookie] = (command, offset, length, payload, len(stream))
        client.send(bytes(stream))
        wait_until(lambda: received_unread(client.sock) >= 256 * 1024,
                   what="the 32 MiB READ's reply arriving")
        unread = unread_by_peer(client.sock)  # >= the bytes not read: errs low
        received = {cookie for cookie, r in requests.items() if r[4] <= len(stream) - unread}
        assert len(received) >= in_flight, (unread, len(stream))
        server.proc.send_signal(signal.SIGTERM)
        wait_for_log(server, "stopping")
        replies = _replies_until_closed(client)
        client.close()
        assert server.wait_exit(30) == 0, server.log()

    assert set(replies) <= set(requests)
    assert received <= set(replies), f"received, not answered: {sorted(received - set(replies))}"
    written = bytearray(image.read_bytes())
    for n, (cookie, (command, offset, length, payload, _)) in enumerate(requests.items()):
        reply = replies.get(cookie)
        if n < in_flight:
            assert reply is not None and reply.error == 0, (n, reply)
        if reply is not None and reply.error:
            assert reply.error == ESHUTDOWN, (n, reply)
        ok = reply is not None and reply.error == 0
        if command == CMD_READ and ok:
            assert _read_data(reply, offset, length) == original[offset:offset + length], n
        elif command == CMD_WRITE:
            stored = bytes(written[offset:offset + length])
            if ok:
                assert stored == payload, f"WRITE {n} acknowledged, not in the image"
            else:
                assert stored in (payload, original[offset:offset + length]), f"WRITE {n}: torn"
            written[offset:offset + length] = original[offset:offset + length]
    assert written == original, "the image changed outside the WRITEs"
    assert "Traceback" not in server.log()


def test_start_logs_uris(image):
    with PynbdServer(image, tcp=True) as server:
        wait_for_log(server, f"serving nbd://127.0.0.1:{server.port}/")
    with PynbdServer(image, name="disk") as server:
        wait_for_log(server, f"serving nbd+unix:///disk?socket={server.socket}")


def test_bad_image_and_busy_port_are_one_line_errors(tmp_path, image):
    def serve(*args):
        return run([sys.executable, "-m", "pynbd", "serve", *args], check=False, timeout=30)

    p = serve(tmp_path / "missing.img", "--socket", tmp_path / "s")
    assert p.returncode == 2 and "missing.img" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        p = serve(image, "--port", str(port))
        assert p.returncode == 2 and f"127.0.0.1:{port}" in p.stderr
        assert len(p.stderr.strip().splitlines()) == 1
    p = serve(image, "--no-such-option")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    p = serve(image, "--loop", "tokio")
    assert p.returncode == 2 and "--loop" in p.stderr


def test_several_exports_and_default_export(tmp_path, image):
    other = make_raw_image(tmp_path / "other.img", 1 * MiB, ("write -P 0x11 0 4k",))
    with PynbdServer(None, "--export", f"a={image}", "--export", f"b={other}") as server:
        listing = nbdinfo("--list", f"nbd+unix:///?socket={server.socket}")
        assert 'export="a"' in listing and 'export="b"' in listing
        assert nbdinfo("--size", f"nbd+unix:///b?socket={server.socket}").strip() == str(1 * MiB)
    with PynbdServer(image, name="only") as server:
        # One export: the default name "" reaches it (as nbdkit does).
        assert nbdinfo("--size", f"nbd+unix:///?socket={server.socket}").strip() == str(8 * MiB)


@pytest.mark.needs("nbd-client")
def test_kernel_nbd_client_lists_exports(tmp_path, image):
    """The userspace half of the Linux kernel client (nbd-client) negotiates with pynbd.

    Attaching /dev/nbdX needs the nbd kernel module, which this machine does not
    have; the transmission the kernel uses (simple replies, GO without info
    requests, FLUSH/FUA/TRIM) is covered by tests/test_conformance.py.
    """
    other = make_raw_image(tmp_path / "other.img", 1 * MiB)
    with PynbdServer(None, "--export", f"disk={image}", "--export", f"spare={other}", tcp=True) as server:
        p = run(["nbd-client", "-l", "127.0.0.1", str(server.port)], timeout=30)
    assert p.stdout.split()[-2:] == ["disk", "spare"]


# --- block status computed ahead for scanning clients -----------------------------------------

GiB = 1 << 30


def test_scan_of_a_large_image_matches_qemu_nbd(tmp_path):
    """nbdinfo maps a 10 GiB image in 4 GiB requests, each continuing the last: pynbd answers
    them from block status computed ahead, and the map is qemu-nbd's, extent for extent."""
    from tests.support.servers import QemuNbdServer

    writes = [f"write -P 0x5a {n * GiB + n * 65536} {4096 * (n + 1)}" for n in range(10)]
    image = make_raw_image(tmp_path / "big.img", 10 * GiB, writes)
    with PynbdServer(image, "--read-only") as p, QemuNbdServer(image, "-r") as q:
        ours = nbdinfo("--map", p.uri)
        theirs = nbdinfo("--map", q.uri)
    assert ours == theirs
    assert ours.count("data") == 10


def test_answers_computed_ahead_never_hide_a_write(tmp_path):
    """A scan's next answer is computed while the client reads the current one; a write from
    another connection in between must show in the next answer."""
    from tests.support.nbdclient import NbdClient

    MiB = 1 << 20
    image = make_raw_image(tmp_path / "disk.img", 8 * MiB, ["write -P 1 0 64k"])
    with PynbdServer(image) as server:
        scanner = NbdClient.connect(server, meta=["base:allocation"])
        writer = NbdClient.connect(server)
        (first,) = scanner.block_status(0, MiB).extents().values()
        assert first == [(65536, 0), (MiB - 65536, 3)]
        # The scan continues at 1 MiB; that answer (all hole) is already computed.
        assert writer.write(MiB + 4096, b"\x07" * 4096).error == 0
        (second,) = scanner.block_status(MiB, MiB).extents().values()
        assert second == [(4096, 3), (4096, 0), (MiB - 8192, 3)]
        # Without a write in between the scan goes on with answers computed ahead.
        (third,) = scanner.block_status(2 * MiB, MiB).extents().values()
        assert third == [(MiB, 3)]
        scanner.disconnect()
        writer.disconnect()


def minor_faults(pid: int) -> int:
    """The process's minor page faults so far (/proc/PID/stat field 10)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[7])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_write_buffers_are_reused(tmp_path):
    """nbdcopy keeps 64 WRITEs of 256 KiB in flight, each payload a fresh buffer: glibc
    would give them back to the kernel as they are freed and fault zeroed pages in for
    the next ones (~26 page faults a write). The server keeps freed buffers
    (process.tune_malloc): later copies fault few pages.

    Measured per 32 MiB copy after the first: 2100-5200 faults without the tuning,
    0-1030 with it (the heap can still grow in the second copy, when more requests
    happen to be in flight at once). Three copies are summed so that one such copy
    cannot fail the test: 6000+ without, ~1100 at most with."""
    source = tmp_path / "source.raw"
    source.write_bytes(os.urandom(32 << 20))
    image = make_raw_image(tmp_path / "disk.img", 32 << 20)
    with PynbdServer(image) as server:
        nbdcopy("--connections=1", "--requests=64", str(source), server.uri)  # the heap grows
        before = minor_faults(server.pid)
        for _ in range(3):
            nbdcopy("--connections=1", "--requests=64", str(source), server.uri)
        faults = minor_faults(server.pid) - before
    assert image.read_bytes() == source.read_bytes()
    writes = 3 * 128
    assert faults < writes * 8, f"{faults} page faults for {writes} writes of 256 KiB"


FRAG_STRIDE = 64 * 1024  # _fragmented_image: 4 KiB of data at the start of every 64 KiB
FRAG_DATA = 4096


def _fragmented_image(tmp_path) -> Path:
    """8 MiB, 4 KiB of data at the start of every 64 KiB: 128 data runs and 128 holes
    (checked against the file's SEEK_DATA/SEEK_HOLE map, so the model below is the file)."""
    image = make_raw_image(tmp_path / "frag.img", 8 * MiB,
                           tuple(f"write -P 0x{i % 250 + 1:02x} {i * 64}k 4k" for i in range(128)))
    assert _runs_of(seek_runs(image)) == _expected_extents(0, 8 * MiB)
    return image


def _runs_of(runs: list[tuple[int, int, bool]]) -> list[tuple[int, int]]:
    """(length, base:allocation flags) of (offset, length, is_data) runs."""
    return [(length, 0 if is_data else 3) for _, length, is_data in runs]


def _expected_extents(offset: int, length: int) -> list[tuple[int, int]]:
    """base:allocation of [offset, offset+length) of _fragmented_image: (length, flags)
    descriptors from the layout the test wrote (flags 0: data, 3: hole and zero)."""
    extents = []
    pos, end = offset, offset + length
    while pos < end:
        base = pos - pos % FRAG_STRIDE
        is_data = pos - base < FRAG_DATA
        stop = min(end, base + (FRAG_DATA if is_data else FRAG_STRIDE))
        extents.append((stop - pos, 0 if is_data else 3))
        pos = stop
    return extents


def test_pipelined_mix_with_block_status_from_the_reader(tmp_path):
    """Block status is served from the socket's reader callback while the connection's
    task waits; pipelined with READs and WRITEs on the same connection, every reply is
    complete, for its own cookie, and equal to the answer of a plain request."""
    from tests.support.nbdclient import CMD_BLOCK_STATUS, CMD_READ, CMD_WRITE, NbdClient
    image = _fragmented_image(tmp_path)
    expected = {off: _expected_extents(off, 2 * MiB) for off in range(0, 8 * MiB, 2 * MiB)}
    data = bytes(image.read_bytes())
    with PynbdServer(image) as server, NbdClient.connect(server, meta=["base:allocation"]) as c:
        for round_ in range(20):
            # One at a time: the first after other requests goes through the task, the
            # next ones arrive while it waits and are served from the reader callback.
            for off in range(0, 8 * MiB, 2 * MiB):
                r = c.request(CMD_BLOCK_STATUS, off, 2 * MiB)
                assert r.error == 0 and list(r.extents().values()) == [expected[off]], off
            sent = {}
            for off in range(0, 8 * MiB, 2 * MiB):
                sent[c.send_request(CMD_BLOCK_STATUS, off, 2 * MiB)] = ("bs", off)
                sent[c.send_request(CMD_READ, off + 4096 * round_, 4096)] = ("read", off + 4096 * round_)
            # A WRITE of what is there already keeps the expected map and data.
            sent[c.send_request(CMD_WRITE, 64 * 1024 * round_, payload=data[64 * 1024 * round_:
                                                                            64 * 1024 * round_ + 4096])] = ("write", 0)
            replies = c.read_replies(len(sent))
            for cookie, (kind, off) in sent.items():
                r = replies[cookie]
                assert r.error == 0, (kind, off, r)
                if kind == "bs":
                    assert list(r.extents().values()) == [expected[off]], off
                elif kind == "read":
                    assert r.data(off, 4096) == data[off:off + 4096]
        c.disconnect()
    assert "Traceback" not in server.log()


def test_block_status_replies_complete_when_the_client_reads_late(tmp_path):
    """A client that sends many block-status requests before reading any reply fills
    the socket: a reply sent partly from the reader callback is finished before any
    other, and all replies arrive whole and in order of completion."""
    from tests.support.nbdclient import CMD_BLOCK_STATUS, NbdClient
    image = _fragmented_image(tmp_path)
    expected = _expected_extents(0, 8 * MiB)
    with PynbdServer(image, "-r") as server, NbdClient.connect(server, meta=["base:allocation"]) as c:
        cookies = []
        for n in range(3):
            # 256 descriptors (2 KiB) per reply, 600 requests: ~1.2 MiB of replies, more
            # than the socket holds (~1 MB here), sent in bursts the server reads as one.
            burst = b"".join(c.encode_request(CMD_BLOCK_STATUS, 0, 8 * MiB, 0, c.next_cookie())
                             for _ in range(200))
            cookies += [int.from_bytes(burst[i + 8:i + 16], "big") for i in range(0, len(burst), 28)]
            c.send(burst)
            if n < 2:  # (the replies to two bursts still fit: the server reads the next at once)
                wait_until(lambda: unread_by_peer(c.sock) == 0, what=f"the server reading burst {n}")
        replies = c.read_replies(len(cookies), timeout=30)
        assert sorted(replies) == sorted(cookies)
        assert all(r.error == 0 and list(r.extents().values()) == [expected] for r in replies.values())
        c.disconnect()
    assert "Traceback" not in server.log()


@pytest.mark.parametrize("requests,writes", [(1, 0), (40, 0), (400, 0), (4, 16)])
def test_disc_closes_only_after_every_reply(tmp_path, requests, writes):
    """DISC right behind other requests, in one send: the server closes as soon as it
    sees the DISC only when nothing is unsent or in flight (§3.3): with 400 block-status
    replies (~1.6 MiB, more than the socket holds) the close waits for the rest, and
    with WRITEs (served by tasks) for them. Every reply arrives whole, then the end of
    the stream; nothing answers the DISC."""
    from tests.support.nbdclient import CMD_BLOCK_STATUS, CMD_DISC, CMD_WRITE, NbdClient
    image = _fragmented_image(tmp_path)
    expected = _expected_extents(0, 8 * MiB)
    data = image.read_bytes()
    with PynbdServer(image) as server:
        with NbdClient.connect(server, meta=["base:allocation"]) as c:
            # One at a time first: the reader callback serves this client from now on.
            assert list(c.request(CMD_BLOCK_STATUS, 0, 8 * MiB).extents().values()) == [expected]
            sent = {c.next_cookie(): ("bs", 0) for _ in range(requests)}
            burst = [c.encode_request(CMD_BLOCK_STATUS, 0, 8 * MiB, 0, ck) for ck in sent]
            for i in range(writes):  # what is there already: the map stays as expected
                ck = c.next_cookie()
                sent[ck] = ("write", i)
                burst.append(c.encode_request(CMD_WRITE, i * 64 * 1024, 4096, 0, ck)
                             + data[i * 64 * 1024:i * 64 * 1024 + 4096])
            c.send(b"".join(burst) + c.encode_request(CMD_DISC, 0, 0, 0, c.next_cookie()))
            # The server reads all of it, DISC included, before the client reads a reply.
            wait_until(lambda: unread_by_peer(c.sock) == 0, what="the server reading the DISC")
            replies = c.read_replies(len(sent), timeout=30)
            assert sorted(replies) == sorted(sent)
            for cookie, (kind, _) in sent.items():
                assert replies[cookie].error == 0
                if kind == "bs":
                    assert list(replies[cookie].extents().values()) == [expected]
            assert c.wait_for_disconnect(5) == b""
        # The server is still there for the next client.
        assert "data" in run(["nbdinfo", "--map", server.uri]).stdout
        log = server.log()
    assert "Traceback" not in log


@pytest.mark.parametrize("order", [("bs", "read", "bs"), ("read", "bs", "bs"), ("bs", "bs", "bs")])
def test_whole_session_in_one_send(tmp_path, order):
    """The whole session in one send, nothing awaited: client flags, STRUCTURED_REPLY,
    SET_META_CONTEXT, GO, three requests and DISC. A plain connection starts without a
    task (its reader callbacks answer the options and the block status behind them);
    a READ makes a task take over mid-stream. Every reply comes whole and in order of
    the options, the requests are all answered, then the stream ends, and the server
    logs each closing line with the export."""
    from tests.support.nbdclient import (
        CMD_BLOCK_STATUS, CMD_DISC, CMD_READ, FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, OPT_GO,
        OPT_SET_META_CONTEXT, OPT_STRUCTURED_REPLY, REP_ACK, REP_META_CONTEXT, NbdClient)
    image = _fragmented_image(tmp_path)
    expected = _expected_extents(0, 8 * MiB)
    data = image.read_bytes()
    with PynbdServer(image, "-v") as server:
        with NbdClient.for_server(server) as c:
            c.read_greeting()
            burst = [struct.pack(">I", FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES),
                     c.encode_option(OPT_STRUCTURED_REPLY),
                     c.encode_option(OPT_SET_META_CONTEXT, c.meta_payload("", ["base:allocation"])),
                     c.encode_option(OPT_GO, c.info_payload("", ()))]
            sent = {}
            for kind in order:
                cookie = c.next_cookie()
                sent[cookie] = kind
                if kind == "bs":
                    burst.append(c.encode_request(CMD_BLOCK_STATUS, 0, 8 * MiB, 0, cookie))
                else:
                    burst.append(c.encode_request(CMD_READ, MiB, 64 * 1024, 0, cookie))
            burst.append(c.encode_request(CMD_DISC, 0, 0, 0, c.next_cookie()))
            c.send(b"".join(burst))
            assert [r.type for r in c.read_option_replies()] == [REP_ACK]
            c.structured = True
            meta = c.read_option_replies()
            assert [r.type for r in meta] == [REP_META_CONTEXT, REP_ACK]
            c.contexts = dict([meta[0].meta_context()])
            assert c.read_option_replies()[-1].type == REP_ACK
            replies = c.read_replies(len(sent), timeout=10)
            assert sorted(replies) == sorted(sent)
            for cookie, kind in sent.items():
                assert replies[cookie].error == 0
                if kind == "bs":
                    assert list(replies[cookie].extents().values()) == [expected]
                else:
                    assert replies[cookie].data(MiB, 64 * 1024) == data[MiB:MiB + 64 * 1024]
            assert c.wait_for_disconnect(5) == b""
        log = settled_log(server, 1)
    assert "Traceback" not in log
    assert "client sent DISC" in log and "closed: client unix socket, export ''" in log, log


def test_bug_while_serving_from_the_reader_disconnects_only_that_client(tmp_path, monkeypatch):
    """Fault injection: an exception (a bug, not a client error) while a BLOCK_STATUS is
    served from the reader callback ends that connection - no hang, no half reply - and
    the server goes on serving others."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "from pynbd.server import blockstatus as b\n"
        "_orig = b.BlockStatusService.reply\n"
        "def _buggy(self, request):\n"
        "    if request.offset == 3 * 1024 * 1024:\n"
        "        raise RuntimeError('injected bug')\n"
        "    return _orig(self, request)\n"
        "b.BlockStatusService.reply = _buggy\n")
    monkeypatch.setenv("PYTHONPATH", str(hooks))
    image = _fragmented_image(tmp_path)
    from tests.support.nbdclient import CMD_BLOCK_STATUS, Disconnected, NbdClient
    with PynbdServer(image, "-r") as server:
        with NbdClient.connect(server, meta=["base:allocation"]) as c:
            assert c.request(CMD_BLOCK_STATUS, 0, MiB).error == 0
            c.send_request(CMD_BLOCK_STATUS, 3 * MiB, MiB)
            with pytest.raises(Disconnected):
                c.read_reply(timeout=10)
        out = run(["nbdinfo", "--map", server.uri])
        assert "data" in out.stdout
        log = server.log()
    assert "injected bug" in log and "serving from the reader failed unexpectedly; disconnecting" in log


# --- polling for a lone client's next request (lookahead.py) ---------------------------

SCAN_EXTENTS = 16384  # data extents; a REQ_ONE map asks once for each and once per hole


@pytest.fixture(scope="module")
def fragmented_raw(tmp_path_factory) -> Path:
    return make_fragmented_raw(tmp_path_factory.mktemp("scan") / "frag.raw", SCAN_EXTENTS)


def check_scan_map(stdout: str) -> None:
    rows = json.loads(stdout)
    assert len(rows) == 2 * SCAN_EXTENTS
    assert [r["data"] for r in rows[:4]] == [True, False, True, False]
    assert rows[-1]["start"] + rows[-1]["length"] == SCAN_EXTENTS * 8192


@pytest.mark.needs("qemu-img")
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
@pytest.mark.parametrize("poll_us, alone", [("50", True), ("0", True), ("50", False)],
                         ids=["polled", "poll-off", "not-alone"])
def test_lone_req_one_scan_is_polled(fragmented_raw, poll_us, alone):
    """The server polls for the next request of a client that sends it right after
    each reply, instead of sleeping in epoll_wait between requests - not with
    --poll-us 0, and not while another client is connected (a poll holds the event
    loop)."""
    with PynbdServer(fragmented_raw, "-v", "--read-only", "--poll-us", poll_us) as server:
        other = socket.socket(socket.AF_UNIX)
        try:
            if not alone:
                other.connect(server.socket)  # (in its handshake for the whole scan)
            before = voluntary_switches(server.pid)
            check_scan_map(run(qemu_img_map_argv(server)).stdout)
            sleeps = voluntary_switches(server.pid) - before
        finally:
            other.close()
        check_polled(server, sleeps, 2 * SCAN_EXTENTS, polled_expected=poll_us != "0" and alone)


@pytest.mark.needs("qemu-img")
@pytest.mark.parametrize("client", ["req-one-scan", "reads-one-at-a-time"])
def test_polling_leaves_the_event_loop_to_others(fragmented_raw, client):
    """While one client is polled for - a REQ_ONE scan served from reader callbacks,
    or READs one at a time served by the task - another is accepted and served (the
    poll gives the event loop its turn every millisecond, and stops while the
    client is not alone). The other comes once the busy client has its export (-v
    logs it), and polling is shown to have served the busy client (its counters)."""
    with PynbdServer(fragmented_raw, "-v", "--read-only") as server:
        if client == "req-one-scan":
            argv = qemu_img_map_argv(server)
        else:
            argv = ["qemu-img", "bench", "-c", "60000", "-d", "1", "-s", "4k", "--image-opts",
                    f"driver=nbd,server.type=unix,server.path={server.socket}"]
        busy = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        try:
            wait_for_log(server, "export '': structured=")
            assert busy.poll() is None, "the polled client ended before the other came"
            assert nbdinfo("--size", server.uri).strip() == str(SCAN_EXTENTS * 8192)
            assert busy.poll() is None, "the other client was served only after the polled one"
            stdout, _ = busy.communicate(timeout=60)
        finally:
            busy.kill()
            busy.wait()
        log = settled_log(server, 2)
    assert busy.returncode == 0
    polled = [int(n) for n in re.findall(r"polled for (\d+) requests", log)]
    assert len(polled) == 2 and max(polled) > 0, log
    if client == "req-one-scan":
        check_scan_map(stdout)


@pytest.mark.needs("qemu-img")
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
@pytest.mark.parametrize("poll_us", ["50", "0"])
def test_one_at_a_time_reads_are_polled(tmp_path, poll_us):
    """A client that reads one block at a time (qemu-img bench at depth 1: a guest or
    a tool with one request in flight) is polled for after each READ reply too, not
    only REQ_ONE scans; not with --poll-us 0."""
    image = make_raw_image(tmp_path / "disk.img", 8 * MiB, WRITES)
    requests = 4000
    with PynbdServer(image, "-v", "--read-only", "--poll-us", poll_us) as server:
        before = voluntary_switches(server.pid)
        run(["qemu-img", "bench", "-c", str(requests), "-d", "1", "-s", "4k", "--image-opts",
             f"driver=nbd,server.type=unix,server.path={server.socket}"])
        sleeps = voluntary_switches(server.pid) - before
        check_polled(server, sleeps, requests, polled_expected=poll_us != "0")