"""TLS against real clients: nbdinfo, nbdcopy, qemu-img and qemu-io, with qemu-nbd as reference."""

from __future__ import annotations

import datetime
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pynbd import certs
from tests.support.deadline import DEADLINE, wait_connections_closed, wait_for_log, wait_steady
from tests.support.servers import (
    PynbdServer,
    QemuNbdServer,
    check_polled,
    make_fragmented_raw,
    make_raw_image,
    nbdcopy,
    nbdinfo,
    qemu_img,
    qemu_img_map_argv,
    run,
    voluntary_switches,
)

pytestmark = [pytest.mark.pynbd, pytest.mark.needs("nbdinfo", "nbdcopy", "qemu-img", "qemu-io", "qemu-nbd")]

MiB = 1 << 20
WRITES = ("write -P 0xaa 0 64k", "write -P 0xbb 1M 4k", "write -P 0xcc 3M 128k")
IHAVEOPT = 0x49484156454F5054


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """One CA with server and two clients; a second CA with a client; an expired server cert."""
    base = tmp_path_factory.mktemp("pki")
    ca = certs.CertificateAuthority.create()
    ca.save(base / "ca")
    certs.write_server_creds(base / "server", ca, ["localhost"], ["127.0.0.1"])
    certs.write_client_creds(base / "client", ca, "client")
    certs.write_client_creds(base / "allowed", ca, "allowed", organization="Example Org")
    other = certs.CertificateAuthority.create("other CA")
    certs.write_client_creds(base / "stranger", other, "stranger")
    long_ago = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(days=30)
    certs.write_server_creds(base / "expired", ca, ["localhost"], ["127.0.0.1"], days=1, not_before=long_ago)
    return {p.name: p for p in base.iterdir()}


@pytest.fixture
def image(tmp_path) -> Path:
    return make_raw_image(tmp_path / "disk.img", 4 * MiB, WRITES)


def tls_uri(server, client_dir: Path) -> str:
    if server.socket:
        return f"nbds+unix:///{server.name}?socket={server.socket}&tls-certificates={client_dir}"
    return f"nbds://127.0.0.1:{server.port}/{server.name}?tls-certificates={client_dir}"


def qemu_tls_opts(server, client_dir: Path, endpoint_dir_id: str = "tls0") -> list[str]:
    """--object and --image-opts arguments for qemu-img/qemu-io over TLS (TCP, host 127.0.0.1)."""
    assert server.port is not None
    return ["--object", f"tls-creds-x509,id={endpoint_dir_id},endpoint=client,dir={client_dir}",
            "--image-opts",
            f"driver=nbd,server.type=inet,server.host=127.0.0.1,server.port={server.port},"
            f"export={server.name},tls-creds={endpoint_dir_id}"]


def json_info(uri: str) -> dict:
    return json.loads(nbdinfo("--json", "--no-content", uri))


def test_nbdinfo_over_tls_matches_qemu_nbd(pki, image, tmp_path):
    # (A copy for qemu-nbd: both serve writable, and a writable image is locked.)
    reference = tmp_path / "reference.img"
    shutil.copyfile(image, reference)
    with PynbdServer(image, "-v", "--tls-creds", pki["server"]) as ours, \
            QemuNbdServer(reference, "--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={pki['server']},"
                                             "verify-peer=off", "--tls-creds", "tls0", "-e", "2") as ref:
        mine = json_info(tls_uri(ours, pki["client"]))
        theirs = json_info(tls_uri(ref, pki["client"]))
        # nbdinfo ends with ABORT and closes without reading the ACK: tolerated quietly (H9),
        # which the log shows once the server is done with the connection.
        assert "Traceback" not in wait_connections_closed(ours)
    assert mine["TLS"] is True and theirs["TLS"] is True
    a, b = mine["exports"][0], theirs["exports"][0]
    for key in ("export-size", "is_read_only", "can_flush", "can_fua", "can_trim", "can_zero",
                "can_df", "can_multi_conn", "block_size_minimum", "block_size_maximum"):
        assert a[key] == b[key], key
    assert set(b["contexts"]) <= set(a["contexts"])


def test_nbdcopy_read_and_write_over_tls(pki, image, tmp_path):
    out = tmp_path / "out.img"
    with PynbdServer(image, "-v", "--tls-creds", pki["server"]) as server:
        uri = tls_uri(server, pki["client"])
        nbdcopy("--connections=4", uri, out)
        assert out.read_bytes() == image.read_bytes()
        # Write through TLS: copy a different image onto the export.
        src = make_raw_image(tmp_path / "src.img", 4 * MiB, ("write -P 0x5a 512k 1M",))
        nbdcopy(src, uri)
        assert "Traceback" not in wait_connections_closed(server, 2)
    assert image.read_bytes() == src.read_bytes()


def test_qemu_img_and_qemu_io_over_tls_tcp(pki, image, tmp_path):
    with PynbdServer(image, "--tls-creds", pki["server"], tcp=True) as server:
        opts = qemu_tls_opts(server, pki["client"])
        qemu_img("compare", *opts, f"driver=raw,file.filename={image}")
        p = run(["qemu-io", *opts, "-c", "write -P 0x77 2M 64k", "-c", "read -P 0x77 2M 64k", "-c", "flush"])
        assert "read 65536/65536" in p.stdout and "Pattern verification failed" not in p.stdout
    with open(image, "rb") as f:
        f.seek(2 * MiB)
        assert f.read(65536) == b"\x77" * 65536


def test_plain_client_refused_with_tls_required(pki, image):
    with PynbdServer(image, "--tls-creds", pki["server"]) as server:
        p = run(["qemu-img", "info", "--image-opts",
                 f"driver=nbd,server.type=unix,server.path={server.socket}"], check=False)
        assert p.returncode != 0
        assert "TLS negotiation required" in p.stderr
        p = run(["nbdinfo", f"nbd+unix:///?socket={server.socket}"], check=False)
        assert p.returncode != 0
        # And a TLS client still works afterwards.
        assert json_info(tls_uri(server, pki["client"]))["TLS"] is True


def test_client_from_another_ca_refused(pki, image):
    with PynbdServer(image, "--tls-creds", pki["server"], "--tls-verify-peer") as server:
        p = run(["nbdinfo", tls_uri(server, pki["stranger"])], check=False)
        assert p.returncode != 0
        assert json_info(tls_uri(server, pki["client"]))["TLS"] is True
        wait_for_log(server, "TLS handshake failed")


def test_verify_peer_requires_a_certificate(pki, image, tmp_path):
    ca_only = tmp_path / "ca-only"
    ca_only.mkdir()
    shutil.copy(pki["client"] / "ca-cert.pem", ca_only / "ca-cert.pem")
    with PynbdServer(image, "--tls-creds", pki["server"], "--tls-verify-peer") as server:
        p = run(["nbdinfo", tls_uri(server, ca_only)], check=False)
        assert p.returncode != 0
    # Without --tls-verify-peer the same client is fine.
    with PynbdServer(image, "--tls-creds", pki["server"]) as server:
        assert json_info(tls_uri(server, ca_only))["TLS"] is True


def test_authz_by_distinguished_name(pki, image, tmp_path):
    allowed_dn = "O=Example Org,CN=allowed"
    authz_file = tmp_path / "authz"
    authz_file.write_text("# allowed clients\nCN=allowed,O=Example Org\n")  # RFC 4514 order works too
    for authz in (allowed_dn, f"@{authz_file}"):
        with PynbdServer(image, "--tls-creds", pki["server"], "--tls-verify-peer",
                         "--tls-authz", authz) as server:
            assert json_info(tls_uri(server, pki["allowed"]))["TLS"] is True
            p = run(["nbdinfo", tls_uri(server, pki["client"])], check=False)
            assert p.returncode != 0
            wait_for_log(server, "authz denied for O=pynbd,CN=client")


def test_expired_server_certificate_refused_by_client(pki, image):
    with PynbdServer(image, "--tls-creds", pki["expired"], tcp=True) as server:
        p = run(["nbdinfo", tls_uri(server, pki["client"])], check=False)
        assert p.returncode != 0
        p = run(["qemu-img", "info", *qemu_tls_opts(server, pki["client"])], check=False)
        assert p.returncode != 0 and "certificate is not trusted" in p.stderr
        # The server said so when it started, naming the file.
        assert f"{pki['expired'] / 'server-cert.pem'} expired on" in server.log()


def test_tls_optional_accepts_both(pki, image):
    with PynbdServer(image, "--tls-creds", pki["server"], "--tls-optional") as server:
        assert json_info(f"nbd+unix:///?socket={server.socket}")["TLS"] is False
        assert json_info(tls_uri(server, pki["client"]))["TLS"] is True


def test_generated_credentials_first_use_then_reused(image, tmp_path):
    state = tmp_path / "state"
    with PynbdServer(image, "--tls", "--tls-state-dir", state) as server:
        client = state / "client"
        assert json_info(tls_uri(server, client))["TLS"] is True
        log = server.log()
        assert "TLS credentials created" in log
        # The log gives a command a newcomer can paste.
        assert f"tls-certificates={client}" in log
    cert = (state / "server" / "server-cert.pem").read_bytes()
    with PynbdServer(image, "--tls", "--tls-state-dir", state) as server:
        assert json_info(tls_uri(server, state / "client"))["TLS"] is True
        assert "TLS credentials reused" in server.log()
    assert (state / "server" / "server-cert.pem").read_bytes() == cert
    assert oct((state / "server" / "server-key.pem").stat().st_mode & 0o777) == "0o600"


def test_pynbd_certs_command_gives_working_pki(image, tmp_path):
    run([sys.executable, "-m", "pynbd", "certs", tmp_path / "pki", "--client", "backup",
         "--hostname", "localhost", "--hostname", "127.0.0.1"])
    with PynbdServer(image, "--tls-creds", tmp_path / "pki" / "server", "--tls-verify-peer",
                     "--tls-authz", "O=pynbd,CN=backup") as server:
        assert json_info(tls_uri(server, tmp_path / "pki" / "client-backup"))["TLS"] is True


def _stalled_tls_clients(server, count: int) -> list[socket.socket]:
    """``count`` raw clients that send STARTTLS, read the ACK and stall: every other one
    before its ClientHello, the others in the middle of it."""
    stalled = []
    for i in range(count):
        s = _starttls_socket(server)
        if i % 2:
            s.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, then nothing
        stalled.append(s)
    return stalled


def _still_waiting(s: socket.socket) -> bool:
    """The server has neither closed this connection nor sent anything on it."""
    readable, _, _ = select.select([s], [], [], 0)
    return not readable


def test_stalled_tls_handshakes_do_not_block_others(pki, image):
    """While 20 clients stall in their TLS handshakes, a TLS client is served: before any
    of them was dropped (the handshake timeout is far away), so the server did not
    wait for them to go. (A server that blocked on one would not answer nbdinfo at all:
    run()'s timeout fails the test.)"""
    with PynbdServer(image, "--tls-creds", pki["server"], "--handshake-timeout", "3600") as server:
        stalled = _stalled_tls_clients(server, 20)
        assert json_info(tls_uri(server, pki["client"]))["TLS"] is True
        assert all(_still_waiting(s) for s in stalled)
        for s in stalled:
            s.close()
        assert json_info(tls_uri(server, pki["client"]))["TLS"] is True


def test_stalled_tls_handshakes_dropped_at_handshake_timeout(pki, image):
    """Clients stalled in their TLS handshakes are dropped by the handshake timeout: not
    before it passed, and the server serves TLS clients afterwards."""
    with PynbdServer(image, "--tls-creds", pki["server"], "--handshake-timeout", "1") as server:
        start = time.monotonic()
        stalled = _stalled_tls_clients(server, 6)
        for s in stalled:
            s.settimeout(DEADLINE)
            assert s.recv(100) == b"", "a stalled handshake was not dropped"
            # (their timers started after ``start``; 0.1 s for timer rounding)
            assert time.monotonic() - start > 0.9, "dropped before the handshake timeout"
            s.close()
        log = wait_for_log(server, "handshake not finished within", 6)
        assert log.count("handshake not finished within") == 6
        assert json_info(tls_uri(server, pki["client"]))["TLS"] is True


def _recv_exactly(s: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


# --- TLS-PSK (Python >= 3.13) ---------------------------------------------------------------


def _python313() -> str | None:
    if sys.version_info >= (3, 13):
        return sys.executable
    for candidate in sorted(Path(os.path.expanduser("~/.pyenv/versions")).glob("3.1[3-9]*/bin/python3")):
        return str(candidate)
    return shutil.which("python3.13")


@pytest.fixture(scope="module")
def psk_python(tmp_path_factory) -> str:
    """A Python >= 3.13 with pynbd's dependencies, or skip with the reason."""
    if sys.version_info >= (3, 13):
        return sys.executable
    py = _python313()
    if py is None:
        pytest.skip("TLS-PSK needs Python >= 3.13 and none is installed (pyenv 3.13 not found)")
    venv = tmp_path_factory.mktemp("py313") / "venv"
    subprocess.run([py, "-m", "venv", venv], check=True, capture_output=True, timeout=120)
    p = subprocess.run([venv / "bin" / "pip", "install", "-q", "bitarray", "cryptography", "zstandard"],
                       capture_output=True, timeout=300, text=True)
    if p.returncode != 0:
        pytest.skip(f"could not install pynbd's dependencies for {py}: {p.stderr[-300:]}")
    return str(venv / "bin" / "python")


class PskServer(PynbdServer):
    python = sys.executable

    def argv(self) -> list[str]:
        return [self.python, *super().argv()[1:]]


def test_psk_with_qemu_img_and_nbdinfo(psk_python, image, tmp_path):
    keys = tmp_path / "psk"
    keys.mkdir()
    (keys / "keys.psk").write_text("alice:" + os.urandom(32).hex() + "\n")
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "keys.psk").write_text("alice:" + os.urandom(32).hex() + "\n")
    PskServer.python = psk_python
    with PskServer(image, "--tls-psk", keys / "keys.psk") as server:
        out = qemu_img("info", "--object", f"tls-creds-psk,id=tls0,endpoint=client,dir={keys},username=alice",
                       "--image-opts", f"driver=nbd,server.type=unix,server.path={server.socket},tls-creds=tls0")
        assert "virtual size: 4 MiB" in out
        info = json_info(f"nbds+unix://alice@/?socket={server.socket}&tls-psk-file={keys / 'keys.psk'}")
        assert info["TLS"] is True
        p = run(["qemu-img", "info", "--object",
                 f"tls-creds-psk,id=tls0,endpoint=client,dir={wrong},username=alice", "--image-opts",
                 f"driver=nbd,server.type=unix,server.path={server.socket},tls-creds=tls0"], check=False)
        assert p.returncode != 0


def test_psk_on_old_python_is_a_clear_error(image, tmp_path):
    if sys.version_info >= (3, 13):
        pytest.skip("this Python supports TLS-PSK")
    keys = tmp_path / "keys.psk"
    keys.write_text("alice:00112233\n")
    p = run([sys.executable, "-m", "pynbd", "serve", image, "--socket", tmp_path / "s", "--tls-psk", keys],
            check=False, timeout=30)
    assert p.returncode == 2
    assert "needs Python 3.13" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def _starttls_socket(server) -> socket.socket:
    """A raw client: greeting, flags, STARTTLS, ACK read; returns the plain socket."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(server.socket)
    assert len(_recv_exactly(s, 18)) == 18
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 5, 0))
    reply = _recv_exactly(s, 20)
    assert struct.unpack(">QIII", reply)[2] == 1  # ACK
    return s


def test_garbage_instead_of_client_hello_is_dropped(pki, image):
    """§9.2 T5: after the STARTTLS ACK, bytes that are not a TLS ClientHello end the connection."""
    with PynbdServer(image, "-v", "--tls-creds", pki["server"]) as server:
        s = _starttls_socket(server)
        s.sendall(b"GET / HTTP/1.0\r\n\r\n" * 10)
        data = b""
        try:
            while chunk := s.recv(4096):
                data += chunk
        except ConnectionResetError:
            pass
        s.close()
        assert b"HTTP" not in data  # nothing echoed; the server closed
        assert json_info(tls_uri(server, pki["client"]))["TLS"] is True
        log = wait_connections_closed(server, 2)
        assert "TLS handshake failed" in log
        assert "Traceback" not in log


def test_tls_client_that_never_reads_replies_is_bounded(pki, image, tmp_path):
    """A TLS client pipelines many 1 MiB READs and never reads: memory stays bounded and
    other clients are served; when it goes away the server carries on."""
    import ssl

    big = make_raw_image(tmp_path / "big.img", 64 * MiB, ("write -P 0x42 0 64M",))
    with PynbdServer(big, "-v", "--tls-creds", pki["server"], "-r") as server:
        raw = _starttls_socket(server)
        ctx = ssl.create_default_context(cafile=str(pki["client"] / "ca-cert.pem"))
        ctx.check_hostname = False
        tls = ctx.wrap_socket(raw, server_hostname="localhost")
        # Fixed newstyle was negotiated before TLS; now GO for the default export, no infos.
        tls.sendall(struct.pack(">QII", IHAVEOPT, 7, 6) + struct.pack(">IH", 0, 0))
        replies = b""
        while not replies.endswith(struct.pack(">QIII", 0x0003E889045565A9, 7, 1, 0)):
            replies += tls.recv(4096)
        tls.settimeout(0.2)
        sent = 0
        try:
            for cookie in range(2000):
                tls.sendall(struct.pack(">IHHQQI", 0x25609513, 0, 0, cookie, (cookie % 64) * MiB, MiB))
                sent += 1
        except (TimeoutError, socket.timeout, ssl.SSLWantWriteError):
            pass  # the server stopped reading: back-pressure reached the client
        assert sent < 2000, "the server should stop reading requests it cannot answer"
        # Until the server has come to rest with what it took (memory no longer changing):
        # the peak on the way counts.
        rss_kib = max(wait_steady(server.rss_kib, quiet=0.5))
        assert rss_kib < 200 * 1024, f"server RSS {rss_kib} KiB with a client that never reads"
        assert json_info(tls_uri(server, pki["client"]))["TLS"] is True
        raw.close()
        tls.close()
        wait_connections_closed(server, 2)  # the stuck client's connection too
        assert json_info(tls_uri(server, pki["client"]))["TLS"] is True
        assert "Traceback" not in wait_connections_closed(server, 3)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
@pytest.mark.parametrize("poll_us", ["50", "0"])
def test_req_one_scan_over_tls(pki, tmp_path, poll_us):
    """QEMU's one-extent map over TLS (an incremental backup's bitmap scan with
    ``pynbd serve --tls``) gets qemu-nbd's map, and the server's task polls for each
    next request rather than sleeping (not with --poll-us 0).

    Over unix sockets: over TCP, qemu-nbd 7.2 with TLS answers such a map at ~25
    requests a second (the scan of this image would take minutes)."""
    extents = 4096
    image = make_fragmented_raw(tmp_path / "frag.raw", extents)
    with PynbdServer(image, "-v", "--read-only", "--poll-us", poll_us, "--tls-creds", pki["server"]) as ours, \
            QemuNbdServer(image, "-r", "--object", f"tls-creds-x509,id=tls0,endpoint=server,"
                          f"dir={pki['server']},verify-peer=off", "--tls-creds", "tls0", "-e", "2") as ref:
        before = voluntary_switches(ours.pid)
        mine = run(qemu_img_map_argv(ours, pki["client"])).stdout
        sleeps = voluntary_switches(ours.pid) - before
        theirs = run(qemu_img_map_argv(ref, pki["client"])).stdout
        check_polled(ours, sleeps, 2 * extents, polled_expected=poll_us != "0")
    assert mine == theirs
    assert len(json.loads(mine)) == 2 * extents
