"""Interop on raw images: pynbd and qemu-nbd 7.2 serve the same images; real clients
(nbdinfo, qemu-img, qemu-io, nbdcopy, libnbd via /usr/bin/python3) must see the same thing.

Allowed differences (the pynbd contract): pynbd may offer more (contexts, CAN_MULTI_CONN),
never less; it exports the exact size (qemu-nbd rounds raw sizes up to 512); EPERM/ENOSPC
where qemu-nbd says EINVAL.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from tests.conftest import KiB, MiB, SPARSE_SIZE, copy_sparse
from tests.support.servers import (
    REPO_ROOT,
    free_tcp_port,
    libnbd_script,
    make_raw_image,
    merge_map,
    merge_qemu_map,
    nbdcopy,
    nbdinfo,
    nbdinfo_map,
    qemu_img,
    qemu_io,
    run,
)

pytestmark = [pytest.mark.pynbd, pytest.mark.interop,
              pytest.mark.needs("qemu-nbd", "qemu-img", "qemu-io", "nbdinfo", "nbdcopy"),
              pytest.mark.timeout(180)]

BOOL_FLAGS = ["can_cache", "can_df", "can_fast_zero", "can_flush", "can_fua",
              "can_multi_conn", "can_trim", "can_zero"]


def round512(n: int) -> int:
    return (n + 511) // 512 * 512


@pytest.fixture(params=["sparse", "odd"])
def image(request, sparse_image, odd_image):
    return sparse_image if request.param == "sparse" else odd_image


def both(launch, image, *, read_only=False, pynbd_args=(), qemu_args=("-A",)):
    """pynbd and qemu-nbd on two sparse copies of ``image``."""
    a = copy_sparse(image, image.with_name(image.stem + ".pynbd.img"))
    b = copy_sparse(image, image.with_name(image.stem + ".qemu.img"))
    p = launch.pynbd(a, *pynbd_args, *(["--read-only"] if read_only else []))
    q = launch.qemu(b, *qemu_args, *(["-r"] if read_only else []))
    return p, q


def compare_export_info(p: dict, q: dict, real_size: int):
    """nbdinfo export entries: pynbd may offer more, never less."""
    assert p["export-size"] == real_size
    assert q["export-size"] == round512(real_size)
    assert set(q["contexts"]) <= set(p["contexts"])
    assert {"base:allocation", "qemu:allocation-depth"} <= set(p["contexts"])
    assert p["is_read_only"] == q["is_read_only"]
    assert p["is_rotational"] == q["is_rotational"] is False
    for flag in BOOL_FLAGS:
        if q[flag]:
            assert p[flag], f"pynbd lacks {flag}"
    assert p["can_multi_conn"] is True
    if not p["is_read_only"]:
        for flag in ("can_trim", "can_zero", "can_fast_zero"):
            assert p[flag] == q[flag]
    for key in ("block_size_minimum", "block_size_preferred", "block_size_maximum"):
        assert p[key] == q[key], key
    assert p["export-name"] == q["export-name"]
    assert p.get("description") == q.get("description")
    # nothing qemu reports is missing from pynbd's answer
    assert set(q) - {"uri"} <= set(p), set(q) - set(p)


@pytest.mark.parametrize("read_only", [False, True])
def test_nbdinfo_json(launch, image, read_only):
    p, q = both(launch, image, read_only=read_only, qemu_args=())
    pj = json.loads(nbdinfo("--json", "--no-content", p.uri))
    qj = json.loads(nbdinfo("--json", "--no-content", q.uri))
    for key in ("protocol", "TLS", "structured"):
        assert pj[key] == qj[key], key
    assert pj["protocol"] == "newstyle-fixed" and pj["structured"] is True
    assert len(pj["exports"]) == len(qj["exports"]) == 1
    compare_export_info(pj["exports"][0], qj["exports"][0], image.stat().st_size)
    assert pj["exports"][0]["is_read_only"] is read_only


def test_nbdinfo_list_json(launch, image):
    p, q = both(launch, image, qemu_args=("-D", "a disk"), pynbd_args=("-D", "a disk"))
    pj = json.loads(nbdinfo("--list", "--json", p.uri))
    qj = json.loads(nbdinfo("--list", "--json", q.uri))
    assert [e["export-name"] for e in pj["exports"]] == [""]
    compare_export_info(pj["exports"][0], qj["exports"][0], image.stat().st_size)
    assert pj["exports"][0]["description"] == "a disk"


@pytest.mark.parametrize("context", ["base:allocation", "qemu:allocation-depth"])
def test_nbdinfo_map(launch, image, context):
    p, q = both(launch, image)
    size = image.stat().st_size
    pm = nbdinfo_map(p.uri, context)
    qm = nbdinfo_map(q.uri, context)
    assert sum(n for _, n, _ in pm) == size  # covers the exact export
    assert merge_map(pm, size) == merge_map(qm, size)
    if context == "qemu:allocation-depth":
        assert merge_map(pm, size) == [(0, size, 1)]
    else:
        m = merge_map(pm, size)
        assert m[0][2] == 0 and m[-1][2] == 0 and len(m) >= 3  # both images start/end with data
        assert {t for _, _, t in m} == {0, 3}


def test_qemu_img_map(launch, image):
    p, q = both(launch, image)
    size = image.stat().st_size
    pm = json.loads(qemu_img("map", "--output=json", "-f", "raw", p.uri))
    qm = json.loads(qemu_img("map", "--output=json", "-f", "raw", q.uri))
    # the qemu block layer itself rounds lengths up to 512, whatever the server says
    assert sum(e["length"] for e in pm) == round512(size)
    assert merge_qemu_map(pm, size) == merge_qemu_map(qm, size)
    assert any(e["data"] for e in pm) and any(e["zero"] and not e["data"] for e in pm)
    # and it matches the file itself
    fm = json.loads(qemu_img("map", "--output=json", "-f", "raw", str(image)))
    assert merge_qemu_map(pm, size) == merge_qemu_map(fm, size)


def test_content(launch, image, tmp_path):
    p, q = both(launch, image)
    size = image.stat().st_size
    for s in (p, q):
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), s.uri])
    out = tmp_path / "copy-p.img"
    nbdcopy(p.uri, str(out))
    assert out.stat().st_size == size
    run(["cmp", str(image), str(out)])
    # qemu-img convert through the export to qcow2 and back gives the same content
    qcow = tmp_path / "copy.qcow2"
    run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", p.uri, str(qcow)])
    run(["qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(qcow), str(image)])
    outq = tmp_path / "copy-q.img"
    nbdcopy(q.uri, str(outq))
    assert outq.stat().st_size == round512(size)
    with open(outq, "rb") as f, open(image, "rb") as g:
        assert f.read(size) == g.read()
        assert f.read() == bytes(round512(size) - size)


def test_nbdcopy_to_export(launch, image, tmp_path):
    """nbdcopy (multi-conn, 4 connections when offered) *into* a pynbd export."""
    src = make_raw_image(tmp_path / "src.img", image.stat().st_size,
                         ["write -P 0x71 0 100k", "write -P 0x72 2M 1000"])
    dst = copy_sparse(image, tmp_path / "dst.img")
    p = launch.pynbd(dst)
    nbdcopy(str(src), p.uri)
    p.stop()
    run(["cmp", str(src), str(dst)])


IO_SEQUENCE = [
    "write -P 0x51 100k 64k",
    "write -z 0 32k",
    "write -z -u 2M 64k",
    "discard 1M 128k",
    "write -P 0x52 3140000 5000",
    "write -P 0x56 3146700 28",  # up to the exact end of the odd image
    "write -f -P 0x53 512k 4k",
    "aio_write -P 0x54 600k 8k",
    "aio_flush",
    "flush",
    "write -P 0x55 0 1",
]


def test_qemu_io_sequence(launch, image, tmp_path):
    p, q = both(launch, image, qemu_args=("-A", "--discard=unmap"))
    size = image.stat().st_size
    for s in (p, q):
        # -d unmap: without it qemu-io drops "discard" and "write -z -u" (no TRIM, and
        # zeroes always with NO_HOLE) before they reach the server.
        out = qemu_io(s.uri, *IO_SEQUENCE, extra=("-d", "unmap")).stdout
        assert "error" not in out.lower() and "failed" not in out.lower(), out
    # the same sequence applied locally
    local = copy_sparse(image, tmp_path / "local.img")
    qemu_io(local, *IO_SEQUENCE, extra=("-d", "unmap"))
    p.stop()
    q.stop()
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(p.image), str(q.image)])
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(p.image), str(local)])
    assert os.path.getsize(p.image) == size
    with open(p.image, "rb") as f:
        f.seek(100 * KiB)
        assert f.read(64 * KiB) == b"\x51" * (64 * KiB)


def test_qemu_io_read_pattern(launch, sparse_image):
    p = launch.pynbd(sparse_image)
    out = qemu_io(p.uri, "read -P 0xaa 0 64k", "read -P 0 64k 960k", "read -P 0xbb 1M 4k",
                  "read -P 0xcc 1052672 8k", "read -P 0xdd 2M 192k",
                  "read -P 0xee 4128768 64k", "read -P 0 4000000 1000").stdout
    assert "Pattern verification failed" not in out, out
    assert out.count("read ") == 7


MULTI_CONN = r"""
import sys, nbd
uri = sys.argv[1]
hs = []
for _ in range(3):
    h = nbd.NBD()
    h.connect_uri(uri)
    hs.append(h)
a, b, c = hs
print("multi", a.can_multi_conn())
for i in range(16):
    data = bytes([i + 1]) * 65536
    off = 3 * 1024 * 1024 + (i % 8) * 65536
    a.pwrite(data, off)
    b.flush()
    got = c.pread(65536, off)
    assert got == data, (i, got[:8])
for h in hs:
    h.shutdown()
print("ok")
"""


@pytest.mark.needs("libnbd-python")
def test_multi_conn_libnbd(launch, sparse_image):
    p = launch.pynbd(sparse_image)
    out = libnbd_script(MULTI_CONN, p.uri).stdout.split("\n")
    assert out[:2] == ["multi True", "ok"]


OPT_PROBE = r"""
import json, sys, nbd
uri = sys.argv[1]
out = {}
h = nbd.NBD()
h.set_opt_mode(True)
h.set_full_info(True)
h.connect_uri(uri)
out["protocol"] = h.get_protocol()
out["structured"] = h.get_structured_replies_negotiated()
out["handshake_flags"] = h.get_handshake_flags()
exports = []
h.opt_list(lambda name, desc: exports.append([name, desc]) or 0)
out["list"] = sorted(exports)
infos = {}
for name, _ in exports:
    h.set_export_name(name)
    h.opt_info()
    infos[name] = dict(
        size=h.get_size(), read_only=h.is_read_only(), flush=h.can_flush(), fua=h.can_fua(),
        trim=h.can_trim(), zero=h.can_zero(), fast_zero=h.can_fast_zero(), df=h.can_df(),
        multi_conn=h.can_multi_conn(), cache=h.can_cache(), rotational=h.is_rotational(),
        canonical=h.get_canonical_export_name(), description=h.get_export_description()
        if name == "described" else None,
        block_size=[h.get_block_size(k) for k in
                    (nbd.SIZE_MINIMUM, nbd.SIZE_PREFERRED, nbd.SIZE_MAXIMUM)])
out["info"] = infos
try:
    h.set_export_name("no-such-export")
    h.opt_info()
    out["unknown_info"] = "succeeded"
except nbd.Error as e:
    out["unknown_info"] = "error"
h.set_export_name(exports[0][0])
ctxs = []
h.opt_list_meta_context(lambda name: ctxs.append(name) or 0)
out["contexts"] = ctxs
for q in ("base:", "qemu:", "qemu:allocation-depth", "nope:x"):
    h.clear_meta_contexts()
    h.add_meta_context(q)
    got = []
    h.opt_list_meta_context(lambda name: got.append(name) or 0)
    out["query " + q] = got
h.clear_meta_contexts()
h.add_meta_context("base:allocation")
h.add_meta_context("qemu:allocation-depth")
h.opt_go()
out["meta"] = [h.can_meta_context("base:allocation"),
               h.can_meta_context("qemu:allocation-depth")]
out["first"] = h.pread(8, 0).hex()
ext = {}
def cb(metacontext, offset, entries, err):
    ext[metacontext] = list(entries)
    return 0
h.block_status(61440, 65536 + 4096, cb)  # (count, offset)
out["extents"] = ext
h.shutdown()
h2 = nbd.NBD()
h2.set_opt_mode(True)
h2.connect_uri(uri)
h2.opt_abort()
out["abort_closed"] = h2.aio_is_closed()
# STARTTLS offered by the client, refused by a server without TLS: carry on in clear
h3 = nbd.NBD()
h3.set_tls(nbd.TLS_ALLOW)
h3.connect_uri(uri)
out["tls_allow"] = [h3.get_tls_negotiated(), h3.pread(4, 65536 - 2).hex()]
h3.shutdown()
# plain newstyle (no FIXED_NEWSTYLE): EXPORT_NAME, simple replies only
h4 = nbd.NBD()
h4.set_handshake_flags(0)
h4.connect_uri(uri)
out["plain"] = [h4.get_protocol(), h4.get_structured_replies_negotiated(), h4.can_df(),
                h4.pread(4, 65536 - 2).hex()]
h4.shutdown()
# fixed newstyle without structured replies
h5 = nbd.NBD()
h5.set_request_structured_replies(False)
h5.connect_uri(uri)
out["no_structured"] = [h5.get_structured_replies_negotiated(), h5.can_df(),
                        h5.can_meta_context("base:allocation"), h5.pread(4, 65536 - 2).hex()]
h5.shutdown()
print(json.dumps(out, sort_keys=True))
"""


@pytest.mark.needs("libnbd-python")
def test_libnbd_opt_mode(launch, sparse_image):
    p, q = both(launch, sparse_image, qemu_args=("-A",))
    pj = json.loads(libnbd_script(OPT_PROBE, p.uri).stdout)
    qj = json.loads(libnbd_script(OPT_PROBE, q.uri).stdout)
    assert pj["list"] == qj["list"] == [["", ""]]
    assert pj["contexts"] == ["base:allocation", "qemu:allocation-depth"]
    pi, qi = pj["info"][""], qj["info"][""]
    assert pi.pop("multi_conn") is True and qi.pop("multi_conn") is False
    assert pi == qi
    assert pi["size"] == SPARSE_SIZE and pi["block_size"] == [1, 4096, 32 * MiB]
    for key in ("protocol", "structured", "handshake_flags", "unknown_info", "contexts",
                "query base:", "query qemu:", "query qemu:allocation-depth", "query nope:x",
                "meta", "first", "extents", "abort_closed", "tls_allow", "plain",
                "no_structured"):
        assert pj[key] == qj[key], key
    assert pj["unknown_info"] == "error"
    assert pj["query base:"] == ["base:allocation"]
    assert pj["query nope:x"] == []
    assert pj["first"] == "aa" * 8
    assert pj["extents"] == {"base:allocation": [61440, 3],
                             "qemu:allocation-depth": [61440, 1]}
    assert pj["abort_closed"] is True
    assert pj["tls_allow"] == [False, "aaaa0000"]
    assert pj["plain"] == ["newstyle", False, False, "aaaa0000"]
    assert pj["no_structured"] == [False, False, False, "aaaa0000"]


def test_several_exports(launch, tmp_path):
    a = make_raw_image(tmp_path / "a.img", 1 * MiB, ["write -P 0x0a 0 4k"])
    b = make_raw_image(tmp_path / "b.img", 3 * MiB + 7, ["write -P 0x0b 1M 4k"])
    c = make_raw_image(tmp_path / "c.img", 2 * MiB)
    p = launch.pynbd(None, "--export", f"a={a}", "--export", f"b={b}", "--export", f"c={c}")
    lj = json.loads(nbdinfo("--list", "--json", p.uri_for("")))
    sizes = {e["export-name"]: e["export-size"] for e in lj["exports"]}
    assert sizes == {"a": MiB, "b": 3 * MiB + 7, "c": 2 * MiB}
    for name, path in (("a", a), ("b", b), ("c", c)):
        run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(path), p.uri_for(name)])
    m = nbdinfo_map(p.uri_for("b"), "base:allocation")
    assert merge_map(m, 3 * MiB + 7) == [(0, MiB, 3), (MiB, 4096, 0),
                                        (MiB + 4096, 2 * MiB - 4096 + 7, 3)]
    # writes to one export do not leak into another
    qemu_io(p.uri_for("c"), "write -P 0x0c 0 64k")
    out = qemu_io(p.uri_for("a"), "read -P 0x0a 0 4k", "read -P 0 4k 60k").stdout
    assert "verification failed" not in out
    r = run(["nbdinfo", "--size", p.uri_for("nope")], check=False)
    assert r.returncode != 0


READ_ONLY_WRITE = r"""
import sys, nbd
h = nbd.NBD()
h.set_strict_mode(0)  # let libnbd send the write although READ_ONLY is set
h.connect_uri(sys.argv[1])
print("ro", h.is_read_only())
try:
    h.pwrite(b"x" * 4096, 0)
    print("write succeeded")
except nbd.Error as e:
    print("error", e.errno, e.string)
print("read", h.pread(4, 0).hex())
h.shutdown()
"""


@pytest.mark.needs("libnbd-python")
def test_read_only_refuses_writes(launch, sparse_image):
    p, q = both(launch, sparse_image, read_only=True)
    for s in (p, q):
        r = qemu_io(s.uri, "write -P 1 0 4k", check=False)
        assert "Permission denied" in r.stderr + r.stdout or \
            "Operation not permitted" in r.stderr + r.stdout, r
        out = qemu_io(s.uri, "read -P 0xaa 0 4k", extra=("-r",)).stdout
        assert "verification failed" not in out
    out = libnbd_script(READ_ONLY_WRITE, p.uri).stdout.splitlines()
    assert out[0] == "ro True"
    assert out[1].startswith("error EPERM") or out[1].startswith("error 1 "), out
    assert "Operation not permitted" in out[1]
    assert out[2] == "read aaaaaaaa"
    outq = libnbd_script(READ_ONLY_WRITE, q.uri).stdout.splitlines()
    assert outq[1].startswith("error EINVAL") or outq[1].startswith("error 22"), outq
    with open(p.image, "rb") as f:
        assert f.read(4096) == b"\xaa" * 4096


def test_tcp(launch, sparse_image):
    port = free_tcp_port()
    p = launch.pynbd(sparse_image, port=port)
    assert p.uri == f"nbd://127.0.0.1:{port}/"
    j = json.loads(nbdinfo("--json", "--no-content", p.uri))
    assert j["exports"][0]["export-size"] == SPARSE_SIZE
    human = nbdinfo(p.uri)  # with the content probe (reads the first sectors)
    assert "export-size: 4194304" in human and "can_multi_conn: true" in human
    run(["qemu-img", "compare", "-f", "raw", "-F", "raw", str(sparse_image), p.uri])


# --------------------------------------------------------------------------
# Start and stop
# --------------------------------------------------------------------------


def pynbd_cmd(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "pynbd", "serve", *map(str, args)],
                          capture_output=True, text=True, timeout=30, env=env,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_exits_zero(launch, sparse_image, sig):
    p = launch.pynbd(sparse_image)
    busy = subprocess.Popen(["nbdinfo", "--json", p.uri], stdout=subprocess.DEVNULL)
    busy.wait(30)
    p.proc.send_signal(sig)
    assert p.wait_exit(10) == 0, p.log()
    assert not os.path.exists(p.socket) or not _connectable(p.socket)


def _connectable(path):
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
        return True
    except OSError:
        return False


def test_sigterm_with_connected_clients(launch, sparse_image):
    p = launch.pynbd(sparse_image)
    from tests.support.nbdclient import NbdClient
    idle = NbdClient.connect(p)
    negotiating = NbdClient.for_server(p)
    negotiating.read_greeting()
    p.proc.send_signal(signal.SIGTERM)
    assert p.wait_exit(30) == 0, p.log()
    # Idle and negotiating clients owe nothing: they must not hold the stop for the
    # grace period (the server then says it closed connections still busy).
    assert "still busy" not in p.log(), p.log()
    assert idle.wait_for_disconnect(5) is not None


def one_line_error(r):
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert r.stdout == ""
    return lines[0]


def test_missing_image(tmp_path):
    line = one_line_error(pynbd_cmd(tmp_path / "nope.img", "--socket", tmp_path / "s"))
    assert "nope.img" in line


def test_bad_option(sparse_image, tmp_path):
    one_line_error(pynbd_cmd(sparse_image, "--no-such-option", "--socket", tmp_path / "s"))
    one_line_error(pynbd_cmd(sparse_image, "--format", "vmdk", "--socket", tmp_path / "s"))


def test_busy_port(sparse_image):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        line = one_line_error(pynbd_cmd(sparse_image, "--bind", "127.0.0.1", "--port", port))
        assert str(port) in line


@pytest.mark.needs("fio")
@pytest.mark.parametrize("jobs,iodepth", [(1, 32), (4, 8)])
def test_fio_verify(launch, tmp_path, jobs, iodepth):
    """fio's libnbd engine: random writes of 4-64 KiB with up to 32 requests in flight
    (and 4 connections at once), then every block read back and checksummed."""
    size = 32 * MiB
    img = make_raw_image(tmp_path / "fio.img", size)
    p = launch.pynbd(img)
    per_job = size // jobs
    r = run(["fio", "--name=verify", "--ioengine=nbd", f"--uri={p.uri}", "--rw=randwrite",
             "--bsrange=4k-64k", f"--iodepth={iodepth}", f"--numjobs={jobs}",
             f"--size={per_job}", f"--offset_increment={per_job}", "--verify=crc32c",
             "--verify_fatal=1", "--do_verify=1", "--randrepeat=0", "--verify_state_save=0",
             "--output-format=json"], timeout=120, check=False)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(r.stdout[r.stdout.index("{"):])
    for job in result["jobs"]:
        assert job["error"] == 0
        assert job["write"]["io_bytes"] >= per_job
        assert job["read"]["io_bytes"] >= per_job  # the verify pass
    assert "Traceback" not in p.log()


def test_qemu_img_map_x_dirty_bitmap_allocation_depth(launch, image):
    """qemu's client negotiating only qemu:allocation-depth (x-dirty-bitmap trick, §5.8)."""
    p, q = both(launch, image)
    size = image.stat().st_size
    maps = []
    for s in (p, q):
        opts = (f"driver=nbd,server.type=unix,server.path={s.socket},export=,"
                "x-dirty-bitmap=qemu:allocation-depth")
        maps.append(json.loads(qemu_img("map", "--output=json", "--image-opts", opts)))
    pm, qm = maps
    assert merge_qemu_map(pm, size) == merge_qemu_map(qm, size)
    # depth 1 everywhere reads as "HOLE" through base:allocation glasses: no data
    # (entries past the exact size are the 512-byte padding of qemu's block layer)
    inside = [(e["present"], e["zero"], e["data"]) for e in pm if e["start"] < size]
    assert inside == [(False, False, False)] * len(inside) and inside
