"""Robustness of pynbd against misbehaving clients, over raw sockets.

Every abuse runs while a *bystander* connection (opened and used before the abuse)
sits in the transmission phase.  Afterwards the bystander must still get correct
answers and a fresh client (nbdinfo) must still be served.
"""

from __future__ import annotations

import random
import socket
import struct
import time

import pytest

from tests.conftest import KiB, MiB, SPARSE_SIZE
from tests.support.nbdclient import (
    CMD_READ,
    CMD_WRITE,
    CMD_WRITE_ZEROES,
    CMD_TRIM,
    EINVAL,
    ENOSPC,
    EPERM,
    FLAG_C_FIXED_NEWSTYLE,
    FLAG_C_NO_ZEROES,
    IHAVEOPT,
    INFO_BLOCK_SIZE,
    NBDMAGIC,
    OPT_GO,
    OPT_LIST,
    REP_ACK,
    REP_ERR_UNSUP,
    Disconnected,
    NbdClient,
)
from tests.support.deadline import (
    CLOSED,
    DEADLINE,
    closed_so_far,
    wait_connections_closed,
    wait_for_log,
    wait_readable,
    wait_steady,
)
from tests.support.servers import nbdinfo

pytestmark = [pytest.mark.pynbd, pytest.mark.needs("qemu-io", "nbdinfo"),
              pytest.mark.timeout(120)]


class Bystander:
    """A well-behaved client connected before the abuse."""

    def __init__(self, server):
        self.server = server
        self.c = NbdClient.connect(server)
        assert self.c.read(0, 4096).data(0, 4096) == b"\xaa" * 4096

    def check(self):
        r = self.c.read(0, 64 * KiB)
        assert r.error == 0
        assert r.data(0, 64 * KiB) == b"\xaa" * (64 * KiB)
        r = self.c.read(2 * MiB, 4096)
        assert r.data(2 * MiB, 4096) == b"\xdd" * 4096


def assert_healthy(server, bystander: Bystander | None = None, size: int = SPARSE_SIZE):
    assert server.alive(), f"server died:\n{server.log()}"
    if bystander:
        bystander.check()
    out = nbdinfo("--size", server.uri, timeout=30)
    assert int(out.strip()) == size


def opt_client(server, flags=FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) -> NbdClient:
    c = NbdClient.for_server(server)
    c.read_greeting()
    c.send_client_flags(flags)
    return c


@pytest.fixture
def server(launch, sparse_image):
    """pynbd with -v (connections logged, see tests/support/deadline.py) and a handshake
    timeout that never comes in a test: a handshake it ends, it ended for what the
    client did."""
    return launch.pynbd(sparse_image, "-v", "--handshake-timeout", "3600")


@pytest.fixture
def bystander(server):
    b = Bystander(server)
    # Every connection before it (the launcher's readiness probe) has ended: from now on
    # closed_so_far() counts the test's own.
    wait_connections_closed(server, open_left=1)
    yield b
    b.c.close()


# --------------------------------------------------------------------------
# Handshake abuse
# --------------------------------------------------------------------------


def test_wrong_option_magic(server, bystander):
    c = opt_client(server)
    c.send(struct.pack(">QII", 0x1122334455667788, OPT_LIST, 0))
    assert c.wait_for_disconnect(DEADLINE) == b""
    assert_healthy(server, bystander)


@pytest.mark.parametrize("length", [32 * MiB + 1, 64 * MiB, 0xFFFFFFFF])
def test_huge_option_length_not_read(server, bystander, length):
    c = opt_client(server)
    c.send_option(OPT_GO, b"\x00" * 100, length=length)
    # (the data never comes, nor the handshake timeout: only a refusal ends this)
    assert c.wait_for_disconnect(DEADLINE) == b"", "server waited for a > 32 MiB option"
    assert_healthy(server, bystander)


@pytest.mark.parametrize("stage", ["before-greeting-read", "half-flags", "after-flags",
                                   "half-option-header", "half-option-data",
                                   "after-structured", "mid-go"])
def test_truncated_handshake(server, bystander, stage):
    closed = closed_so_far(server)
    c = NbdClient.for_server(server)
    if stage != "before-greeting-read":
        c.read_greeting()
    if stage == "half-flags":
        c.send(b"\x00\x00")
    elif stage != "before-greeting-read":
        c.send_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
    if stage == "half-option-header":
        c.send(struct.pack(">Q", IHAVEOPT) + b"\x00\x00")
    elif stage == "half-option-data":
        c.send(NbdClient.encode_option(OPT_GO, b"\x00\x00\x00\x00", length=100))
    elif stage == "after-structured":
        assert c.structured_reply().type == REP_ACK
    elif stage == "mid-go":
        c.send_option(OPT_GO, NbdClient.info_payload("", [INFO_BLOCK_SIZE]))
    c.close()
    wait_connections_closed(server, closed + 1, open_left=1)  # the server saw this client go
    assert_healthy(server, bystander)


def test_unknown_option_keeps_connection(server, bystander):
    c = opt_client(server)
    for opt in (99, 1000, 0x7FFFFFFF):
        replies = c.option(opt, b"x" * 1000)
        assert [r.type for r in replies] == [REP_ERR_UNSUP]
    assert c.go("").ok
    assert c.read(0, 512).data(0, 512) == b"\xaa" * 512
    assert_healthy(server, bystander)


@pytest.mark.parametrize("flags", [0x4, 0x8000_0000, 0xFFFF_FFFF])
def test_unknown_client_flags(server, bystander, flags):
    c = NbdClient.for_server(server)
    c.read_greeting()
    c.send_client_flags(flags)
    assert c.wait_for_disconnect(DEADLINE) == b""
    assert_healthy(server, bystander)


def test_many_options_then_go(server, bystander):
    """A chatty client (1000 option round trips) is served normally."""
    c = opt_client(server)
    for _ in range(500):
        exports, final = c.list_exports()
        assert final.type == REP_ACK
        assert c.option(99)[0].type == REP_ERR_UNSUP
    assert c.go("").ok
    assert_healthy(server, bystander)


def test_handshake_timeout(launch, sparse_image):
    """Clients that do not finish the handshake are dropped once the timeout passed (not
    before); one that finished it (the bystander) is not."""
    s = launch.pynbd(sparse_image, "--handshake-timeout", "1")
    b = Bystander(s)
    t0 = time.monotonic()
    silent = NbdClient.for_server(s)  # connects, never reads or sends
    flags_only = NbdClient.for_server(s)
    flags_only.read_greeting()
    flags_only.send_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
    slow = opt_client(s)
    slow.list_exports()  # an option exchange does not make the deadline go away
    got = silent.wait_for_disconnect(DEADLINE)
    elapsed = time.monotonic() - t0
    assert got is not None, "silent client not dropped"
    assert got in (b"", struct.pack(">QQH", NBDMAGIC, IHAVEOPT, 3))
    # Its timer started after t0 (0.1 s for timer rounding); no upper bound: when a busy
    # machine lets the server drop it is not what this test is about.
    assert elapsed > 0.9, elapsed
    assert flags_only.wait_for_disconnect(DEADLINE) == b""
    assert slow.wait_for_disconnect(DEADLINE) == b"", "a handshake that never ends is dropped too"
    # The bystander's handshake timer, had it not been cancelled when its handshake was
    # done, was due before the silent client's (it connected first), and timers fire
    # in order: it has idled past its timeout, no need to sleep for it.
    b.check()
    assert_healthy(s, b)
    assert wait_for_log(s, "handshake not finished within", 3).count("handshake not finished within") == 3


# --------------------------------------------------------------------------
# Transmission abuse
# --------------------------------------------------------------------------


def test_read_past_end(server, bystander):
    c = NbdClient.connect(server)
    for off, n in [(SPARSE_SIZE, 1), (SPARSE_SIZE - 1, 2), (2**64 - 1, 1), (2**63, 2**31)]:
        assert c.read(off, n).error == EINVAL
    assert c.read(0, 512).error == 0
    assert_healthy(server, bystander)


def test_write_read_only(launch, sparse_image):
    s = launch.pynbd(sparse_image, "--read-only")
    b = Bystander(s)
    c = NbdClient.connect(s)
    assert c.write(0, b"\x01" * 65536).error == EPERM
    assert c.request(CMD_TRIM, 0, 65536).error == EPERM
    assert c.request(CMD_WRITE_ZEROES, 0, 65536).error == EPERM
    assert c.write(SPARSE_SIZE, b"\x01" * 512).error in (EPERM, ENOSPC)
    assert c.read(0, 65536).data(0, 65536) == b"\xaa" * 65536
    assert_healthy(s, b)
    with open(sparse_image, "rb") as f:
        assert f.read(65536) == b"\xaa" * 65536


def test_unknown_command(server, bystander):
    c = NbdClient.connect(server)
    for cmd in (9, 42, 0x7FFF, 0xFFFF):
        assert c.request(cmd, 0, 512).error == EINVAL
    assert c.read(0, 512).error == 0
    assert_healthy(server, bystander)


@pytest.mark.parametrize("length", [32 * MiB + 1, 64 * MiB, 0xFFFFFFFF])
def test_read_over_32mib(server, bystander, length):
    c = NbdClient.connect(server)
    assert c.read(0, length).error == EINVAL
    assert c.read(0, 512).error == 0
    assert_healthy(server, bystander)


@pytest.mark.parametrize("send_payload", [True, False])
def test_write_over_32mib(server, bystander, send_payload):
    c = NbdClient.connect(server)
    n = 32 * MiB + 4096
    c.send_request(CMD_WRITE, 0, n)
    if send_payload:
        try:
            c.send(b"\x66" * n)
        except OSError:
            pass
    try:
        r = c.read_reply(timeout=10 if send_payload else 3)
        assert r.error == EINVAL
    except (Disconnected, socket.timeout):
        pass
    c.close()
    assert_healthy(server, bystander)
    with open(server.image, "rb") as f:
        assert f.read(4096) == b"\xaa" * 4096, "an oversize WRITE was (partly) applied"


@pytest.mark.parametrize("magic", [0, 0x25609514, 0xFFFFFFFF])
def test_bad_request_magic(server, bystander, magic):
    c = NbdClient.connect(server)
    c.send_request(CMD_READ, 0, 512, magic=magic)
    assert c.wait_for_disconnect(DEADLINE) == b""
    assert_healthy(server, bystander)


@pytest.mark.parametrize("how", ["close", "reset"])
def test_vanish_mid_write(server, bystander, how):
    closed = closed_so_far(server)
    c = NbdClient.connect(server)
    c.send_request(CMD_WRITE, MiB, 1 * MiB)
    c.send(b"\x42" * (512 * KiB))
    if how == "reset":
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    log = wait_connections_closed(server, closed + 1, open_left=1)  # the server is done with it
    assert_healthy(server, bystander)
    # the half-received write was not applied
    r = bystander.c.read(MiB, 4096)
    assert r.data(MiB, 4096) == b"\xbb" * 4096
    assert "Traceback" not in log


def test_vanish_mid_header(server, bystander):
    closed = closed_so_far(server)
    c = NbdClient.connect(server)
    c.send(NbdClient.encode_request(CMD_READ, 0, 512, 0, 1)[:13])
    c.close()
    wait_connections_closed(server, closed + 1, open_left=1)  # the server saw this client go
    assert_healthy(server, bystander)


def test_vanish_with_reads_in_flight(server, bystander):
    closed = closed_so_far(server)
    for _ in range(5):
        c = NbdClient.connect(server)
        for i in range(64):
            c.send_request(CMD_READ, 0, MiB)
        c.close()
    log = wait_connections_closed(server, closed + 5, open_left=1)  # the server is done with all five
    assert "Traceback" not in log
    assert_healthy(server, bystander)


@pytest.mark.parametrize("zero_copy", ["off", "auto"])
def test_client_never_reads_replies(launch, sparse_image, zero_copy):
    """2000 pipelined 1 MiB READs whose replies are never read: memory stays bounded (at
    its peak, over the whole time the server takes until it rests), and others are
    served meanwhile and after the client went. With ``--zero-copy off`` every READ
    in flight holds its data in memory: there the bound on requests in flight shows."""
    server = launch.pynbd(sparse_image, "-v", "--zero-copy", zero_copy)
    bystander = Bystander(server)
    wait_connections_closed(server, open_left=1)  # (the launcher's readiness probe)
    base_rss = server.rss_kib()
    c = NbdClient.connect(server)
    c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)
    c.sock.setblocking(False)
    payload = b"".join(NbdClient.encode_request(CMD_READ, (i % 4) * MiB, MiB, 0, i + 1)
                       for i in range(2000))
    view = memoryview(payload)
    sent = 0

    def send_more() -> tuple[int, int]:
        """Send what the socket takes; (bytes sent so far, server RSS in KiB)."""
        nonlocal sent
        try:
            while sent < len(payload):
                sent += c.sock.send(view[sent:sent + 28 * 50])
        except BlockingIOError:
            pass  # the server does not take more now
        return sent, server.rss_kib()

    # Until the server takes no more requests and its memory no longer changes.
    max_rss = max(rss for _, rss in wait_steady(send_more))
    print(f"RSS base {base_rss} KiB, max {max_rss} KiB, sent {sent // 28} requests")
    assert max_rss < 200 * 1024, f"RSS grew to {max_rss} KiB (base {base_rss} KiB)"
    # while one client is stuck, others are served
    assert_healthy(server, bystander)
    closed = wait_connections_closed(server, open_left=2).count(CLOSED)  # all but c and the bystander's
    c.close()
    wait_connections_closed(server, closed + 1, open_left=1)  # the server is done with it
    assert_healthy(server, bystander)


def test_many_idle_connections(server, bystander):
    clients = [NbdClient.connect(server) for _ in range(64)]
    half = [opt_client(server) for _ in range(32)]
    assert_healthy(server, bystander)
    for c in clients + half:
        c.close()
    assert_healthy(server, bystander)


def test_write_zeroes_and_trim_past_end(server, bystander):
    c = NbdClient.connect(server)
    assert c.write(SPARSE_SIZE - 512, b"\x01" * 1024).error == ENOSPC
    assert c.request(CMD_WRITE_ZEROES, SPARSE_SIZE, 512).error == ENOSPC
    assert c.request(CMD_TRIM, SPARSE_SIZE, 512).error == EINVAL
    assert_healthy(server, bystander)


def test_sigterm_while_clients_vanish(launch, sparse_image):
    """SIGTERM while clients have READs in flight, and the clients go away right after
    (during the shutdown grace period). The server must still exit 0."""
    s = launch.pynbd(sparse_image)
    clients = [NbdClient.connect(s) for _ in range(3)]
    for c in clients:
        for i in range(8):
            c.send_request(CMD_READ, 0, MiB)
    for c in clients:
        wait_readable(c.sock)  # the server is answering: READs in flight
    s.proc.send_signal(15)
    for c in clients:
        c.close()
    assert s.wait_exit(15) == 0, s.log()
    assert "Traceback" not in s.log()


# --------------------------------------------------------------------------
# Random sessions
# --------------------------------------------------------------------------

_VALID_ERRORS = {0, EPERM, 5, EINVAL, ENOSPC, 75, 95}


def _random_session(server, rng, size):
    c = NbdClient.for_server(server, timeout=5)
    c.read_greeting()
    if rng.random() < 0.05:
        c.send_client_flags(rng.getrandbits(32))
        c.wait_for_disconnect(5)
        return
    c.send_client_flags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
    # a few options with random (often malformed) data
    for _ in range(rng.randrange(0, 6)):
        opt = rng.choice([2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 99])
        if opt in (2, 7):  # ABORT / GO would end the handshake: keep them for later
            opt = 6
        data = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 4, 6, 20, 300])))
        if opt in (9, 10) and rng.random() < 0.5:
            data = NbdClient.meta_payload("", [rng.choice(["base:", "base:allocation",
                                                           "qemu:", "x", ""])])
        try:
            replies = c.option(opt, data)
        except Disconnected:
            return
        assert replies[-1].is_final
    if rng.random() < 0.3:
        assert c.structured_reply().type in (REP_ACK, 0x80000003)
        c.set_meta_context("", ["base:allocation", "qemu:allocation-depth"])
    res = c.go("", [INFO_BLOCK_SIZE])
    assert res.ok, res.final
    offsets = [0, 4096, size - 1, size, size + 1, 2**63, 2**64 - 1, rng.randrange(size)]
    lengths = [0, 1, 512, 4096, 65536, 32 * MiB + 1, 2**32 - 1, rng.randrange(1, 1 << 20)]
    for _ in range(rng.randrange(1, 20)):
        cmd = rng.choice([0, 0, 1, 3, 4, 5, 6, 7, 8, 9, 42])
        flags = rng.choice([0, 0, 1, 2, 4, 8, 16, 32, rng.getrandbits(16)])
        offset, length = rng.choice(offsets), rng.choice(lengths)
        if cmd == 1:
            if length > MiB:
                c.send_request(cmd, offset, length, flags)  # then vanish mid-payload
                c.close()
                return
            cookie = c.send_request(cmd, offset, length, flags, payload=b"\x5a" * length)
        else:
            cookie = c.send_request(cmd, offset, length, flags)
        # one request at a time: a client that pipelines big READs without reading the
        # replies while it pushes a WRITE payload deadlocks against any server that
        # applies back-pressure (that case has its own test)
        r = c.read_reply(timeout=10)
        assert r.cookie == cookie
        assert r.error in _VALID_ERRORS, r
    if rng.random() < 0.5:
        c.disconnect()
    else:
        c.close()


@pytest.mark.parametrize("loop", ["uvloop", "asyncio"])
def test_random_sessions(launch, image_factory, loop):
    size = 4 * MiB
    img = image_factory("fuzz.img", size, ["write -P 0xaa 0 64k", "write -P 0xdd 2M 64k"])
    s = launch.pynbd(img, "-v", "--loop", loop)
    b = Bystander(s)
    rng = random.Random(f"sessions-{loop}")
    for i in range(400):
        _random_session(s, rng, size)
        assert s.alive(), s.log()
    b.c.close()
    assert nbdinfo("--size", s.uri).strip() == str(size)
    log = wait_connections_closed(s, 402)  # every session's, the bystander's and nbdinfo's
    assert "Traceback" not in log, log[-3000:]


def test_sigterm_with_client_that_never_reads(launch, sparse_image):
    """A client with replies pending that it never reads cannot keep the server alive
    forever after SIGTERM (qemu-nbd 7.2 does hang here); pynbd exits 0 after its grace."""
    s = launch.pynbd(sparse_image)
    c = NbdClient.connect(s)
    c.flood_reads(100, MiB)
    wait_readable(c.sock)  # the server is answering: replies pending
    s.proc.send_signal(15)
    assert s.wait_exit(30) == 0, s.log()  # (a hang guard well past the 10 s grace)
    c.close()
