#!/usr/bin/env python3
"""End-to-end benchmark: pynbd against qemu-nbd and nbdkit, same image, same run.

Each round serves every image with every server in turn (A/B/C alternation,
the order rotated each round so no server is always first after the page
cache warm-up), runs real clients against it (nbdcopy, fio's nbd engine,
nbdinfo --map) and records the medians over rounds plus each server's peak
RSS (VmHWM). Only unix sockets and 127.0.0.1 are used; every server is
killed in a ``finally`` (and on Ctrl-C / SIGTERM, and by PR_SET_PDEATHSIG if
this process dies without cleaning up).

TLS rows (``--no-tls`` skips them, ``--tls-only`` runs only them): sequential
reads and writes with nbdcopy over nbds:// against pynbd and qemu-nbd, both
with one x509 PKI made for the run by ``python -m pynbd certs``.

Write rows (groups ``raw-write-*``, ``qcow2-write-*``): every measurement on a
server started for it, exporting a target image made fresh for it (an empty
image, or a copy of a fully allocated one), checked after the client's FLUSH.

Dirty-bitmap rows (groups ``bitmap-write-*``: writes into images with 0, 1 and 4
enabled bitmaps; ``bitmap-map*``: block status of a bitmap just dirtied through the
server) are built by bench/bitmap_groups.py.

Run ``scripts/bench --help``; bench/README.md has the results and the reasons
for the choices below.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

if __name__ == "__main__":
    # bench/bitmap_groups.py imports this module as ``e2e``; run as a script it is
    # ``__main__``, and a second copy would have its own METRICS and LIVE servers.
    sys.modules.setdefault("e2e", sys.modules[__name__])

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

REPO = Path(__file__).resolve().parent.parent
BITMAP_NAME = "bm0"
#: ``Group.image`` of a group whose target is all it serves (no source image to copy or warm).
NO_IMAGE = ""
#: The block status walk's client (run by an interpreter with libnbd's bindings).
WALK_CLIENT = REPO / "bench" / "clients" / "walk.py"


def libnbd_python() -> str | None:
    """An interpreter that can import libnbd's bindings (Debian's python3-libnbd is for
    /usr/bin/python3, not for venvs), or None: then the walk groups are left out."""
    for candidate in ("/usr/bin/python3", sys.executable):
        try:
            if subprocess.run([candidate, "-c", "import nbd"], capture_output=True, timeout=30).returncode == 0:
                return candidate
        except (OSError, subprocess.TimeoutExpired):
            continue
    return None


SYSTEM_PYTHON = libnbd_python()


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------


class BenchError(Exception):
    """One measurement (or one server start) failed; the reason is the message."""


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)(i?b)?\s*", text, re.I)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 64M, 1G)")
    mult = {"": 1, "k": KiB, "m": MiB, "g": GiB, "t": GiB * KiB}[m.group(2).lower()]
    return int(m.group(1)) * mult


def human_size(n: int) -> str:
    for unit, mult in (("T", GiB * KiB), ("G", GiB), ("M", MiB), ("K", KiB)):
        if n >= mult and n % mult == 0:
            return f"{n // mult}{unit}"
    return str(n)


def tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


def last_line(text: str) -> str:
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def run_cmd(argv: list[str], timeout: float, what: str) -> subprocess.CompletedProcess:
    """Run a client; BenchError with its last stderr line when it fails."""
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what}: timed out after {timeout:.0f}s") from None
    except FileNotFoundError:
        raise BenchError(f"{what}: {argv[0]} not found") from None
    if proc.returncode != 0:
        reason = last_line(proc.stderr) or last_line(proc.stdout) or f"exit {proc.returncode}"
        raise BenchError(f"{what}: {reason}")
    return proc


def _pdeathsig() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_vmhwm(pid: int) -> float | None:
    """Peak resident set size of ``pid`` in MiB (VmHWM), None if gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * KiB / MiB
    except OSError:
        return None
    return None


def warm_page_cache(paths: list[Path]) -> None:
    buf = bytearray(8 * MiB)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# ---------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------


@dataclass
class Images:
    dir: Path
    size: int
    paths: dict[str, Path] = field(default_factory=dict)

    def _ok(self, name: str) -> Path:
        return self.dir / f"{name}.ok"

    def _fresh(self, name: str, deps: list[str]) -> bool:
        ok = self._ok(name)
        if not ok.exists() or not (self.dir / name).exists():
            return False
        return all(self._ok(d).stat().st_mtime <= ok.stat().st_mtime for d in deps)

    def _done(self, name: str) -> None:
        self._ok(name).write_text("ok\n")

    def _build(self, key: str, name: str, deps: list[str], builder: Callable[[Path], None]) -> None:
        path = self.dir / name
        self.paths[key] = path
        if self._fresh(name, deps):
            return
        self._ok(name).unlink(missing_ok=True)
        t0 = time.monotonic()
        print(f"  building {name} ...", end="", flush=True)
        builder(path)
        self._done(name)
        print(f" {time.monotonic() - t0:.1f}s", flush=True)

    def build(self, want_qcow2: bool) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        s = self.size
        tag = human_size(s)
        self._build("raw-full", f"full-{tag}.raw", [], lambda p: make_full_raw(p, s))
        self._build("raw-frag", f"frag-{tag}.raw", [], lambda p: make_frag_raw(p, s))
        # 128 data extents: a one-extent map over TLS and TCP is 256 round trips (see tls_map_groups).
        self._build("raw-frag-8M", "frag-8M.raw", [], lambda p: make_frag_raw(p, 8 * MiB))
        if not want_qcow2:
            return
        full_raw = self.paths["raw-full"]
        self._build(
            "qcow2-full",
            f"full-{tag}.qcow2",
            [full_raw.name],
            lambda p: check_call(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(full_raw), str(p)]),
        )
        base = self.paths["qcow2-full"]
        self._build("qcow2-mid", f"chain-mid-{tag}.qcow2", [base.name], lambda p: make_overlay(p, base, s, 1))
        mid = self.paths["qcow2-mid"]
        self._build("qcow2-chain", f"chain-top-{tag}.qcow2", [mid.name], lambda p: make_overlay(p, mid, s, 2))
        self._build("qcow2-frag", f"frag-{tag}.qcow2", [], lambda p: make_frag_qcow2(p, s))
        self._build("qcow2-bitmap", f"bitmap-{human_size(100 * s)}.qcow2", [], lambda p: make_bitmap_qcow2(p, 100 * s))

    def files_of(self, key: str) -> list[Path]:
        """The image and, for the chain, its backing files (for page-cache warm-up);
        none for ``NO_IMAGE``."""
        if key == NO_IMAGE:
            return []
        if key == "qcow2-chain":
            return [self.paths["qcow2-chain"], self.paths["qcow2-mid"], self.paths["qcow2-full"]]
        return [self.paths[key]]


def check_call(argv: list[str], stdin_text: str | None = None) -> None:
    proc = subprocess.run(argv, input=stdin_text, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: {shlex.join(argv)}: {last_line(proc.stderr) or proc.returncode}")


def make_full_raw(path: Path, size: int) -> None:
    """Fully allocated, incompressible, no two 16 MiB chunks alike."""
    chunk = bytearray(os.urandom(16 * MiB))
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        off = 0
        while off < size:
            n = min(len(chunk), size - off)
            chunk[:8] = off.to_bytes(8, "little")
            f.write(memoryview(chunk)[:n])
            off += n
    tmp.rename(path)


def make_frag_raw(path: Path, size: int) -> None:
    """Sparse: 4 KiB of data every 64 KiB -> size/64K data extents, as many holes."""
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        data = os.urandom(4 * KiB)
        for off in range(0, size, 64 * KiB):
            os.pwrite(fd, data, off)
    finally:
        os.close(fd)
    tmp.rename(path)


def qemu_io_script(path: Path, commands: list[str], fmt: str = "qcow2") -> None:
    check_call(["qemu-io", "-f", fmt, str(path)], stdin_text="\n".join(commands) + "\nquit\n")


def make_overlay(path: Path, backing: Path, size: int, layer: int) -> None:
    """Overlay writing 1 MiB every 3 MiB at offset layer MiB (so the three layers interleave)."""
    path.unlink(missing_ok=True)
    check_call(["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing.name, "-F", "qcow2", str(path)])
    cmds = [f"write -P 0x{0x10 * layer:02x} {off} 1M" for off in range(layer * MiB, size - MiB + 1, 3 * MiB)]
    qemu_io_script(path, cmds)


def make_frag_qcow2(path: Path, size: int) -> None:
    """64 KiB clusters, every other one allocated -> size/128K data extents, as many holes."""
    path.unlink(missing_ok=True)
    check_call(["qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k", str(path), str(size)])
    qemu_io_script(path, [f"write -P 0x5a {off} 64k" for off in range(0, size, 128 * KiB)])


def make_bitmap_qcow2(path: Path, vsize: int) -> None:
    """Large virtual size, persistent bitmap bm0 (64 KiB granularity) dirty 64 KiB every 4 MiB."""
    path.unlink(missing_ok=True)
    check_call(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(vsize)])
    check_call(["qemu-img", "bitmap", "--add", "--granularity", "64K", str(path), BITMAP_NAME])
    # write -z makes zero clusters: the bitmap gets dirty, the file stays small.
    qemu_io_script(path, [f"write -z {off} 64k" for off in range(0, vsize, 4 * MiB)])


# ---------------------------------------------------------------------------
# servers
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerSpec:
    id: str  # row label and --only token: qemu-nbd, nbdkit, pynbd/uvloop/zc-on, pynbd
    kind: str  # qemu-nbd | nbdkit | pynbd
    pynbd_args: tuple[str, ...] = ()


ALL_SERVERS = [
    ServerSpec("qemu-nbd", "qemu-nbd"),
    ServerSpec("nbdkit", "nbdkit"),
    ServerSpec("pynbd/uvloop/zc-on", "pynbd", ("--loop", "uvloop", "--zero-copy", "on")),
    ServerSpec("pynbd/uvloop/zc-off", "pynbd", ("--loop", "uvloop", "--zero-copy", "off")),
    ServerSpec("pynbd/asyncio/zc-on", "pynbd", ("--loop", "asyncio", "--zero-copy", "on")),
    ServerSpec("pynbd/asyncio/zc-off", "pynbd", ("--loop", "asyncio", "--zero-copy", "off")),
    # The defaults, whatever they are; used for the qcow2 rows.
    ServerSpec("pynbd", "pynbd"),
]

#: pynbd's defaults without polling for the next request (--poll-us 0), beside them in the
#: groups where a client sends one request at a time (QEMU's REQ_ONE maps).
POLL_OFF = ServerSpec("pynbd/poll-off", "pynbd", ("--poll-us", "0"))


@dataclass
class PynbdInfo:
    available: bool
    reason: str = ""
    help: str = ""


def probe_pynbd(python: str) -> PynbdInfo:
    try:
        proc = subprocess.run(
            [python, "-m", "pynbd", "serve", "--help"],
            capture_output=True, text=True, timeout=30, cwd=REPO, env=pynbd_env(),
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return PynbdInfo(False, f"pynbd serve --help: {exc}")
    if proc.returncode != 0:
        return PynbdInfo(False, "pynbd serve --help: " + (last_line(proc.stderr) or f"exit {proc.returncode}"))
    return PynbdInfo(True, help=proc.stdout)


def pynbd_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


@dataclass
class Endpoint:
    transport: str  # unix | tcp
    socket_path: str = ""
    port: int = 0
    tls_dir: str = ""  # client credentials (DIR/client-bench): nbds:// URIs

    @property
    def uri(self) -> str:
        if self.tls_dir:
            if self.transport == "unix":
                return f"nbds+unix:///?socket={self.socket_path}&tls-certificates={self.tls_dir}"
            return f"nbds://127.0.0.1:{self.port}/?tls-certificates={self.tls_dir}"
        if self.transport == "unix":
            return f"nbd+unix:///?socket={self.socket_path}"
        return f"nbd://127.0.0.1:{self.port}/"


LIVE: dict[int, subprocess.Popen] = {}


class Running:
    """One server process; ``stop()`` always leaves it dead."""

    def __init__(self, spec: ServerSpec, argv: list[str], endpoint: Endpoint, log: Path, env=None, cwd=None):
        self.spec = spec
        self.argv = argv
        self.endpoint = endpoint
        self.log = log
        self.exit_code: int | None = None
        with open(log, "wb") as logf:
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_pdeathsig, env=env, cwd=cwd,
            )
        LIVE[self.proc.pid] = self.proc

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise BenchError(f"exited with {self.proc.returncode} at start: {tail(self.log) or 'no output'}")
            try:
                if self.endpoint.transport == "unix":
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                        s.connect(self.endpoint.socket_path)
                else:
                    with socket.create_connection(("127.0.0.1", self.endpoint.port), timeout=1):
                        pass
                return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise BenchError(f"not listening after {timeout:.0f}s: {tail(self.log) or 'no output'}")
            time.sleep(0.02)

    def peak_rss(self) -> float | None:
        return read_vmhwm(self.proc.pid)

    def stop(self) -> int | None:
        proc = self.proc
        terminate(proc, timeout=10)
        LIVE.pop(proc.pid, None)
        self.exit_code = proc.returncode
        if self.endpoint.transport == "unix":
            try:
                os.unlink(self.endpoint.socket_path)
            except OSError:
                pass
        return self.exit_code


def terminate(proc: subprocess.Popen, timeout: float) -> None:
    """SIGTERM a server we started, SIGKILL it if it has not exited within ``timeout``."""
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    except OSError:
        pass


def kill_all_live() -> None:
    for pid, proc in list(LIVE.items()):
        terminate(proc, timeout=5)
        LIVE.pop(pid, None)


def server_argv(spec: ServerSpec, image: Path, fmt: str, ep: Endpoint, python: str, extra: list[str],
                tls_server_dir: Path | None = None, writable: bool = False) -> list[str]:
    """Read-only unless ``writable``; with ``tls_server_dir`` (DIR/server of the run's PKI) TLS is required."""
    if spec.kind == "qemu-nbd":
        # -e 8: qemu-nbd advertises CAN_MULTI_CONN only when -e != 1 (nbdcopy then opens 4 connections).
        argv = ["qemu-nbd", "-t", "-f", fmt] + ([] if writable else ["-r"])
        if tls_server_dir is not None:
            argv += ["--object", f"tls-creds-x509,id=tls0,endpoint=server,dir={tls_server_dir},verify-peer=off",
                     "--tls-creds", "tls0", "-e", "4"]
        else:
            argv += ["-e", "8"]
        argv += ["-k", ep.socket_path] if ep.transport == "unix" else ["-b", "127.0.0.1", "-p", str(ep.port)]
        return argv + extra + [str(image)]
    if spec.kind == "nbdkit":
        argv = ["nbdkit", "-f"] + ([] if writable else ["-r"])
        argv += ["-U", ep.socket_path] if ep.transport == "unix" else ["-i", "127.0.0.1", "-p", str(ep.port)]
        return argv + extra + ["file", str(image)]
    argv = [python, "-m", "pynbd", "serve", str(image)] + ([] if writable else ["--read-only"]) + ["--format", fmt]
    argv += ["--socket", ep.socket_path] if ep.transport == "unix" else ["--bind", "127.0.0.1", "--port", str(ep.port)]
    if tls_server_dir is not None:
        argv += ["--tls-creds", str(tls_server_dir)]
    return argv + list(spec.pynbd_args) + extra


# ---------------------------------------------------------------------------
# workloads
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Metric:
    key: str
    title: str
    unit: str
    higher_better: bool = True
    agg: str = "median"  # median | max


@dataclass
class Settings:
    size: int
    rounds: int
    seq_reps: int
    fio_runtime: float
    fio_ramp: float
    map_reps: int
    requests: int
    workdir: Path
    pki: Path | None = None  # the run's `pynbd certs` directory (TLS groups)


class Workloads:
    """Clients run against a live server; each returns {metric_key: value}.

    For write groups ``target`` is the image file the server exports (in ``fmt``)
    and ``source`` the raw file nbdcopy copies from.
    """

    def __init__(self, st: Settings, target: Path | None = None, source: Path | None = None, fmt: str = "raw"):
        self.st = st
        self.target = target
        self.source = source
        self.fmt = fmt

    def seq_read(self, uri: str, size: int, conns: int) -> float:
        argv = ["nbdcopy", f"--connections={conns}", f"--requests={self.st.requests}", uri, "null:"]
        best = []
        for _ in range(self.st.seq_reps):
            t0 = time.perf_counter()
            run_cmd(argv, timeout=300, what="nbdcopy")
            best.append(time.perf_counter() - t0)
        return size / min(best) / MiB

    def seq_write(self, uri: str, size: int, conns: int) -> float:
        """nbdcopy from the (page-cached) source file to the export, onto a sparse target each time."""
        if self.target is None or self.source is None:
            raise BenchError("seq_write: no source/target file")
        argv = ["nbdcopy", f"--connections={conns}", f"--requests={self.st.requests}", str(self.source), uri]
        best = []
        for _ in range(self.st.seq_reps):
            # Deallocate what the previous copy wrote (and drop its dirty pages): every copy
            # writes into holes. The server keeps its fd; the file size does not change for it.
            os.truncate(self.target, 0)
            os.truncate(self.target, size)
            t0 = time.perf_counter()
            run_cmd(argv, timeout=300, what="nbdcopy")
            best.append(time.perf_counter() - t0)
        check_copied(self.source, self.target, size)
        return size / min(best) / MiB

    def seq_write_flushed(self, uri: str, size: int, conns: int) -> float:
        """MiB/s of one ``nbdcopy --flush`` of the source into the export (a fresh target).

        The wall time of the whole process, so it includes the server's FLUSH replies
        (nbdcopy sends one per connection at the end, and none without ``--flush``).
        Afterwards, with the server still up, the target file must hold the source:
        after FLUSH everything written is in the file (see ``check_target``). Raises
        BenchError when nbdcopy fails or the target is wrong.
        """
        if self.target is None or self.source is None:
            raise BenchError("seq_write_flushed: no source/target file")
        argv = ["nbdcopy", "--flush", f"--connections={conns}", f"--requests={self.st.requests}",
                str(self.source), uri]
        t0 = time.perf_counter()
        run_cmd(argv, timeout=300, what="nbdcopy")
        elapsed = time.perf_counter() - t0
        self.check_target(size, holds_source=True)
        return size / elapsed / MiB

    def rand_write(self, uri: str, size: int) -> float:
        """4 KiB random-write IOPS at depth 16 into the export (a fresh target).

        The figure has no flush in it, like the read rows. A qcow2 target is then
        flushed (``qemu-io -c flush``, untimed) and checked, so a write path that
        leaves the image inconsistent gives BenchError instead of a figure.
        """
        iops = self.rand_io(uri, size, "randwrite")
        if self.fmt == "qcow2":
            run_cmd(["qemu-io", "-f", "raw", "-c", "flush", uri], timeout=120, what="qemu-io flush")
            self.check_target(size, holds_source=False)
        return iops

    def check_target(self, size: int, holds_source: bool) -> None:
        """Check the target file beside the live server, after a FLUSH: a qcow2 target must
        pass ``qemu-img check`` (no corruption, no leaked cluster) and, if ``holds_source``,
        read back equal to the source through QEMU's qcow2 driver (``qemu-img compare``); a
        raw one is compared with the source in 17 blocks of 64 KiB. ``-U``: the server holds
        the image's locks. Raises BenchError naming what is wrong."""
        assert self.target is not None and self.source is not None
        if self.fmt != "qcow2":
            if holds_source:
                check_copied(self.source, self.target, size)
            return
        check_qcow2(self.target)
        if holds_source:
            run_cmd(["qemu-img", "compare", "-U", "-f", "raw", "-F", "qcow2", str(self.source), str(self.target)],
                    timeout=300, what="qemu-img compare")

    def rand_io(self, uri: str, size: int, rw: str = "randread", depth: int = 16) -> float:
        """4 KiB random IOPS from fio's nbd engine (``rw``: randread or randwrite) with
        ``depth`` requests in flight, over ``fio_runtime`` after ``fio_ramp`` seconds."""
        out = self.st.workdir / "fio.json"
        argv = [
            "fio", f"--name={rw}4k", "--ioengine=nbd", f"--uri={uri}", f"--rw={rw}", "--bs=4k",
            f"--iodepth={depth}", "--numjobs=1", f"--size={size}", "--time_based", f"--runtime={self.st.fio_runtime}",
            f"--ramp_time={self.st.fio_ramp}", "--randrepeat=0", "--output-format=json", f"--output={out}",
        ]
        run_cmd(argv, timeout=self.st.fio_runtime + self.st.fio_ramp + 60, what="fio")
        try:
            data = json.loads(out.read_text())
            job = data["jobs"][0]
            if job.get("error"):
                raise BenchError(f"fio: job error {job['error']}")
            return float(job["write" if rw == "randwrite" else "read"]["iops"])
        except (OSError, ValueError, KeyError, IndexError) as exc:
            raise BenchError(f"fio: cannot parse output: {exc}") from None

    def block_status(self, uri: str, context: str | None,
                     client_cpu: int | None = None) -> tuple[float, float, float, int]:
        """(extents per second, ms per full map, ms of the first map, extents) for ``nbdinfo --map``.

        Rates and times are medians over the reps; the first rep is also reported on
        its own: it is the first map after the server started (metadata not cached yet).
        """
        argv = ["nbdinfo", "--map" if context is None else f"--map={context}", uri]
        if client_cpu is not None:
            argv = ["taskset", "-c", str(client_cpu), *argv]
        times, counts = [], set()
        for _ in range(self.st.map_reps):
            t0 = time.perf_counter()
            proc = run_cmd(argv, timeout=120, what="nbdinfo --map")
            times.append(time.perf_counter() - t0)
            counts.add(sum(1 for line in proc.stdout.splitlines() if line.strip()))
        if len(counts) != 1:
            raise BenchError(f"nbdinfo --map: extent count varies between runs: {sorted(counts)}")
        n = counts.pop()
        t = statistics.median(times)
        return n / t, t * 1000, times[0] * 1000, n


    def block_status_walk(self, uri: str, context: str | None,
                          client_cpu: int | None = None) -> tuple[float, float, int]:
        """(extents per second, ms of the first walk, extents) for ``bench/clients/walk.py``:
        3 × ``map_reps`` + 1 walks over one libnbd connection. The rate is the median over
        the walks after the first (many: this VM has episodes of tens of ms where round
        trips take 1-2 ms instead of 40-100 us, for every server); the first, on a server
        started for this group, is also reported on its own (nothing cached yet)."""
        walks = 3 * self.st.map_reps + 1
        argv = [SYSTEM_PYTHON, str(WALK_CLIENT), uri, context or "base:allocation", str(walks)]
        if client_cpu is not None:
            argv = ["taskset", "-c", str(client_cpu), *argv]
        proc = run_cmd(argv, timeout=300, what="block status walk")
        try:
            out = json.loads(proc.stdout)
            times, n = [float(t) for t in out["times"]], int(out["extents"])
        except (ValueError, KeyError, TypeError) as exc:
            raise BenchError(f"walk.py: cannot parse output: {exc}") from None
        return n / statistics.median(times[1:]), times[0] * 1000, n


    def qemu_map(self, uri: str, context: str | None) -> tuple[float, int]:
        """(extents per second, extents) for ``qemu-img map --output=json`` over NBD, with
        ``x-dirty-bitmap=CONTEXT`` when given: QEMU's nbd driver asks for one extent at a time
        (REQ_ONE), as incremental backups do reading a dirty bitmap. One map per round (the
        100 GiB bitmap's is 51200 requests, seconds)."""
        parts = urllib.parse.urlsplit(uri)
        query = urllib.parse.parse_qs(parts.query)
        if parts.scheme.endswith("+unix"):
            opts = f"driver=nbd,server.type=unix,server.path={query['socket'][0]}"
        else:
            opts = f"driver=nbd,server.type=inet,server.host={parts.hostname},server.port={parts.port}"
        argv = ["qemu-img", "map", "--output=json"]
        if "tls-certificates" in query:  # (the run's certificates name localhost and 127.0.0.1)
            argv += ["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={query['tls-certificates'][0]}"]
            opts += ",tls-creds=tls0,tls-hostname=localhost"
        if context is not None:
            opts += f",x-dirty-bitmap={context}"
        t0 = time.perf_counter()
        proc = run_cmd(argv + ["--image-opts", opts], timeout=300, what="qemu-img map")
        elapsed = time.perf_counter() - t0
        try:
            n = len(json.loads(proc.stdout))
        except ValueError as exc:
            raise BenchError(f"qemu-img map: cannot parse output: {exc}") from None
        return n / elapsed, n


def check_qcow2(path: Path) -> None:
    """``qemu-img check`` of a qcow2 file in use (``-U``); BenchError unless it finds nothing
    (no corruption, no leaked cluster, the check itself complete)."""
    try:
        proc = subprocess.run(["qemu-img", "check", "-U", "-f", "qcow2", "--output=json", str(path)],
                              capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        raise BenchError("qemu-img check: timed out after 300s") from None
    if proc.returncode == 0:
        return
    try:
        report = json.loads(proc.stdout)
        found = ", ".join(f"{report.get(k, 0)} {k}" for k in ("corruptions", "leaks", "check-errors"))
    except ValueError:
        found = last_line(proc.stderr) or f"exit {proc.returncode}"
    raise BenchError(f"qemu-img check after the write: {found}")


def check_copied(source: Path, target: Path, size: int, samples: int = 16) -> None:
    """Spot check that the write landed: first, last and evenly spaced 64 KiB blocks equal the source."""
    block = 64 * KiB
    offsets = sorted({min(size - block, i * (size // samples)) for i in range(samples)} | {size - block})
    with open(source, "rb") as src, open(target, "rb") as dst:
        for off in offsets:
            if os.pread(src.fileno(), block, off) != os.pread(dst.fileno(), block, off):
                raise BenchError(f"nbdcopy: target differs from the source at offset {off}")


@dataclass
class Group:
    """One image served over one transport, with the workloads run against it."""

    key: str
    title: str
    image: str  # key in Images.paths
    fmt: str
    transport: str
    servers: list[ServerSpec]
    #: Steps run in order against one server instance; a failing step marks only its own metrics n/a.
    steps: list[tuple[list[Metric], Callable[[Workloads, str, int], dict[str, float]]]]
    extra: dict[str, list[str]] = field(default_factory=dict)  # server kind -> extra args
    context: str | None = None  # meta context the steps need (checked before running them)
    tls: bool = False  # serve with the run's x509 credentials, connect with nbds://
    #: Makes the target (in ``fmt``) that a server instance exports writable instead of
    #: ``image``, fresh for each instance; ``image`` is then the source the steps copy from
    #: (warmed into the page cache like any image). None: ``image`` is served read-only.
    target: TargetMaker | None = None
    #: Each step on a server instance of its own (with its own target): a write step changes
    #: the target, and every write measurement starts from the same image.
    instance_per_step: bool = False
    #: (server CPU, client CPU) to pin both to with taskset, None to let the scheduler place them.
    pin: tuple[int, int] | None = None
    #: The export's size in units of ``--size`` (a target of ``NO_IMAGE`` groups).
    size_scale: int = 1
    #: Targets in a tmpfs directory (``/dev/shm`` when there is one) instead of the run directory:
    #: for targets whose removal from the run's file system would take longer than their steps.
    target_in_memory: bool = False

    @property
    def metrics(self) -> list[Metric]:
        return [m for ms, _ in self.steps for m in ms]

    @property
    def write(self) -> bool:
        return self.target is not None


#: Makes a server's writable target at the path: (path, export size, the bench's images).
#: Raises BenchError. Runs in this process, before the server starts.
TargetMaker = Callable[[Path, int, Images], None]


def sparse_raw_target(path: Path, size: int, images: Images) -> None:
    """A raw file of ``size`` bytes, all hole."""
    with open(path, "wb") as f:
        f.truncate(size)


def empty_qcow2_target(path: Path, size: int, images: Images) -> None:
    """A qcow2 image with nothing allocated (qemu-img's defaults: 64 KiB clusters)."""
    run_cmd(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)], timeout=60, what="qemu-img create")


def copy_target(image_key: str) -> TargetMaker:
    """A copy of the bench's image ``image_key`` (fully allocated: every write overwrites).

    The copy is not synced: write steps that time no flush measure the server's way into
    the page cache, and a target's dirty pages go with it when it is removed."""
    def make(path: Path, size: int, images: Images) -> None:
        run_cmd(["cp", "--reflink=auto", str(images.paths[image_key]), str(path)], timeout=300, what="cp")
    return make


METRICS: dict[str, Metric] = {}


def metric(key: str, title: str, unit: str, higher_better: bool = True, agg: str = "median") -> Metric:
    m = Metric(key, title, unit, higher_better, agg)
    METRICS[key] = m
    return m


RSS = metric("rss", "peak RSS of the server (VmHWM, max over all runs)", "MiB", higher_better=False, agg="max")


def seq_group(key: str, title: str, image: str, fmt: str, transport: str, servers, conns=(1, 4)) -> Group:
    steps = []
    for c in conns:
        m = metric(f"{key}/seq{c}", f"{title}: sequential read, nbdcopy {c} conn", "MiB/s")
        steps.append(([m], lambda w, uri, size, c=c, m=m: {m.key: w.seq_read(uri, size, c)}))
    if image == "raw-full":
        rr = metric(f"{key}/rand4k", f"{title}: 4 KiB random read, fio nbd QD16", "IOPS")
        steps.append(([rr], lambda w, uri, size: {rr.key: w.rand_io(uri, size)}))
        # One request in flight: every read is a round trip (a guest or tool that waits).
        r1 = metric(f"{key}/rand4k-qd1", f"{title}: 4 KiB random read, fio nbd QD1", "IOPS")
        steps.append(([r1], lambda w, uri, size: {r1.key: w.rand_io(uri, size, depth=1)}))
    return Group(key, title, image, fmt, transport, servers, steps)


def tls_groups(transport: str, servers) -> list[Group]:
    """Sequential read (read-only server) and write (writable server, sparse target) over TLS."""
    read_steps, write_steps = [], []
    for c in (1, 4):
        m = metric(f"tls-read-{transport}/seq{c}", f"TLS raw {transport}: sequential read, nbdcopy {c} conn",
                   "MiB/s")
        read_steps.append(([m], lambda w, uri, size, c=c, m=m: {m.key: w.seq_read(uri, size, c)}))
    for c in (1, 4):
        m = metric(f"tls-write-{transport}/seq{c}", f"TLS raw {transport}: sequential write, nbdcopy {c} conn",
                   "MiB/s")
        write_steps.append(([m], lambda w, uri, size, c=c, m=m: {m.key: w.seq_write(uri, size, c)}))
    return [
        Group(f"tls-read-{transport}", f"TLS raw {transport} read", "raw-full", "raw", transport, servers,
              read_steps, tls=True),
        Group(f"tls-write-{transport}", f"TLS raw {transport} write", "raw-full", "raw", transport, servers,
              write_steps, tls=True, target=sparse_raw_target),
    ]


#: Called after a write step, with the server still up: (workloads, uri, export size, whether the
#: step wrote the whole export). Raises BenchError when the image is not as the writes left it.
WriteCheck = Callable[["Workloads", str, int, bool], None]


def write_groups(fmt: str, transport: str, servers, *, keys: tuple[str, str] | None = None,
                 title: str | None = None, targets: tuple[TargetMaker, TargetMaker] | None = None,
                 extra: dict[str, list[str]] | None = None, after_write: WriteCheck | None = None) -> list[Group]:
    """Writes in ``fmt``, each measurement on a server started for it with a fresh target:
    ``FMT-write-T`` into an empty image (nbdcopy 1 and 4 connections with ``--flush``, fio
    4 KiB random writes, which allocate), ``FMT-write-allocated-T`` fio 4 KiB random writes
    into a copy of the fully allocated image (``raw-full`` / ``qcow2-full``).

    ``keys`` (empty, allocated), ``title``, ``targets`` (empty, allocated) and ``extra``
    (server kind -> arguments) replace those defaults; ``after_write`` runs after each
    step's own checks (untimed)."""
    title = title or f"{fmt} {transport}"
    empty_key, allocated_key = keys or (f"{fmt}-write-{transport}", f"{fmt}-write-allocated-{transport}")
    full = f"{fmt}-full"
    empty_target, allocated_target = targets or (
        empty_qcow2_target if fmt == "qcow2" else sparse_raw_target, copy_target(full))

    def checked(write: Callable[[Workloads, str, int], float], whole: bool) -> Callable[[Workloads, str, int], float]:
        if after_write is None:
            return write

        def run(w: Workloads, uri: str, size: int) -> float:
            value = write(w, uri, size)
            after_write(w, uri, size, whole)
            return value
        return run

    empty_steps = []
    for c in (1, 4):
        m = metric(f"{empty_key}/seq{c}", f"{title}: sequential write into an empty image, nbdcopy {c} conn "
                   "+ flush", "MiB/s")
        seq = checked(lambda w, uri, size, c=c: w.seq_write_flushed(uri, size, c), whole=True)
        empty_steps.append(([m], lambda w, uri, size, m=m, seq=seq: {m.key: seq(w, uri, size)}))
    rand = checked(lambda w, uri, size: w.rand_write(uri, size), whole=False)
    allocating = metric(f"{empty_key}/rand4k", f"{title}: 4 KiB random write into an empty image, fio nbd QD16",
                        "IOPS")
    empty_steps.append(([allocating], lambda w, uri, size: {allocating.key: rand(w, uri, size)}))
    overwriting = metric(f"{allocated_key}/rand4k",
                         f"{title}: 4 KiB random write into an allocated image, fio nbd QD16", "IOPS")
    allocated_steps = [([overwriting], lambda w, uri, size: {overwriting.key: rand(w, uri, size)})]
    return [
        Group(empty_key, title, "raw-full", fmt, transport, servers, empty_steps, dict(extra or {}),
              target=empty_target, instance_per_step=True),
        Group(allocated_key, title, full, fmt, transport, servers, allocated_steps, dict(extra or {}),
              target=allocated_target, instance_per_step=True),
    ]


def map_group(key: str, title: str, image: str, fmt: str, servers, context: str | None = None,
              extra: dict[str, list[str]] | None = None, pin: tuple[int, int] | None = None) -> Group:
    m_rate = metric(f"{key}/extents-per-s", f"{title}: block status, nbdinfo --map", "extents/s")
    m_time = metric(f"{key}/map-ms", f"{title}: time per full map", "ms", higher_better=False)
    m_first = metric(f"{key}/first-map-ms", f"{title}: first map after the server starts", "ms",
                     higher_better=False)

    def run(w: Workloads, uri: str, size: int) -> dict[str, float]:
        rate, ms, first_ms, n = w.block_status(uri, context, None if pin is None else pin[1])
        return {m_rate.key: rate, m_time.key: ms, m_first.key: first_ms, f"{key}/extents": n}

    return Group(key, title, image, fmt, "unix", servers, [([m_rate, m_time, m_first], run)], extra or {},
                 context, pin=pin)


def qemu_map_group(key: str, title: str, image: str, fmt: str, servers, context: str | None = None,
                   extra: dict[str, list[str]] | None = None, transport: str = "unix",
                   tls: bool = False) -> Group:
    """Block status as QEMU's nbd driver asks for it: one extent per request (REQ_ONE)."""
    how = "qemu-img map, x-dirty-bitmap" if context else "qemu-img map"
    m_rate = metric(f"{key}/qemu-map-extents-per-s", f"{title}: block status, {how} (REQ_ONE)", "extents/s")

    def run(w: Workloads, uri: str, size: int) -> dict[str, float]:
        rate, n = w.qemu_map(uri, context)
        return {m_rate.key: rate, f"{key}/extents": n}

    return Group(key, title, image, fmt, transport, servers, [([m_rate], run)], extra or {}, context,
                 tls=tls)


def tls_map_groups(servers, bitmap_extra: dict[str, list[str]] | None) -> list[Group]:
    """QEMU's one-extent maps over TLS, as an incremental backup from a ``--tls`` server
    reads a dirty bitmap: the 100 GiB bitmap over a unix socket (None: no qcow2 rows),
    and a small fragmented raw image over TCP, where qemu-nbd 7.2 takes ~44 ms a request."""
    groups = [qemu_map_group("tls-frag-qemu-tcp", "TLS raw fragmented 8 MiB tcp", "raw-frag-8M", "raw",
                             servers, transport="tcp", tls=True)]
    if bitmap_extra is not None:
        groups.append(qemu_map_group(
            "tls-bitmap-qemu-unix", "TLS dirty bitmap (qcow2, 100× virtual size) unix", "qcow2-bitmap",
            "qcow2", servers, context=f"qemu:dirty-bitmap:{BITMAP_NAME}", extra=bitmap_extra, tls=True))
    return groups


def walk_group(key: str, title: str, image: str, fmt: str, servers, context: str | None = None,
               extra: dict[str, list[str]] | None = None) -> Group:
    """Block status over one connection (bench/clients/walk.py): the server's share of a
    map without a client process's start and printing, which are most of nbdinfo's time."""
    m_rate = metric(f"{key}/walk-extents-per-s", f"{title}: block status walk, one libnbd connection",
                    "extents/s")
    m_first = metric(f"{key}/first-walk-ms", f"{title}: first walk after the server starts", "ms",
                     higher_better=False)

    def run(w: Workloads, uri: str, size: int) -> dict[str, float]:
        rate, first_ms, n = w.block_status_walk(uri, context)
        return {m_rate.key: rate, m_first.key: first_ms, f"{key}/extents": n}

    return Group(key, title, image, fmt, "unix", servers, [([m_rate, m_first], run)], extra or {}, context)


# ---------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------


class Results:
    def __init__(self):
        self.samples: dict[str, dict[str, list[float]]] = {}
        self.failures: dict[str, dict[str, list[str]]] = {}
        self.extents: dict[str, dict[str, int]] = {}
        self.multi_conn: dict[str, dict[str, bool]] = {}
        self.warnings: list[str] = []

    def add(self, key: str, server: str, value: float) -> None:
        self.samples.setdefault(key, {}).setdefault(server, []).append(value)

    def fail(self, key: str, server: str, reason: str) -> None:
        self.failures.setdefault(key, {}).setdefault(server, []).append(reason)

    def value(self, key: str, server: str) -> float | None:
        vals = self.samples.get(key, {}).get(server)
        if not vals:
            return None
        return max(vals) if METRICS[key].agg == "max" else statistics.median(vals)


def nbd_info(uri: str) -> tuple[dict, bool]:
    """(the first export's nbdinfo --json entry, whether the connection used TLS)."""
    proc = run_cmd(["nbdinfo", "--json", "--no-content", uri], timeout=30, what="nbdinfo")
    try:
        data = json.loads(proc.stdout)
        return data["exports"][0], bool(data.get("TLS"))
    except (ValueError, KeyError, IndexError) as exc:
        raise BenchError(f"nbdinfo --json: unexpected output: {exc}") from None


def run_bench(args, st: Settings, groups: list[Group], images: Images, python: str, res: Results) -> None:
    rundir = Path(tempfile.mkdtemp(prefix="run-", dir=st.workdir))
    memdir = None
    if any(g.target_in_memory for g in groups):
        shm = Path("/dev/shm")
        memdir = Path(tempfile.mkdtemp(prefix="pynbd-bench-", dir=shm if shm.is_dir() else rundir))
    try:
        run_rounds(st, groups, images, python, res, rundir, memdir or rundir)
    finally:
        if memdir is not None:
            shutil.rmtree(memdir, ignore_errors=True)
    if not args.keep_logs:
        shutil.rmtree(rundir, ignore_errors=True)
    else:
        print(f"server logs kept in {rundir}")


def run_rounds(st: Settings, groups: list[Group], images: Images, python: str, res: Results, rundir: Path,
               memdir: Path) -> None:
    """Every round: every group, every server (in rotated order). Server logs and targets go to
    ``rundir``, the targets of ``target_in_memory`` groups to ``memdir``."""
    if any(g.tls for g in groups):
        st.pki = make_pki(rundir / "pki", python)
    broken: dict[tuple[str, str], str] = {}
    counter = 0
    t_start = time.monotonic()
    width = max((len(g.key) for g in groups), default=14) + 7  # a write group's step: KEY/seqN
    for rnd in range(st.rounds):
        for g in groups:
            warm_page_cache(images.files_of(g.image))
            order = g.servers[rnd % len(g.servers):] + g.servers[: rnd % len(g.servers)] if g.servers else []
            batches = [[step] for step in g.steps] if g.instance_per_step else [list(g.steps)]
            for spec, batch in ((spec, batch) for spec in order for batch in batches):
                if (g.key, spec.id) in broken:
                    continue
                pending = batch
                for attempt in range(1 + MAX_RESTARTS):
                    counter += 1
                    t0 = time.monotonic()
                    last = attempt == MAX_RESTARTS
                    pending, status = run_instance(spec, g, pending, images, python, rundir, counter, st, res,
                                                   broken, record_deaths=last,
                                                   target_dir=memdir if g.target_in_memory else rundir)
                    label = batch[0][0][0].key if g.instance_per_step else g.key
                    print(f"  [r{rnd + 1} {time.monotonic() - t_start:6.1f}s] {label:<{width}} {spec.id:<22} "
                          f"{time.monotonic() - t0:5.1f}s {status}", flush=True)
                    if not pending:
                        break


def make_pki(pki: Path, python: str) -> Path:
    """One CA, server and client certificate per run (DIR/server, DIR/client-bench)."""
    argv = [python, "-m", "pynbd", "certs", str(pki), "--hostname", "localhost", "--hostname", "127.0.0.1",
            "--client", "bench"]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, env=pynbd_env())
    if proc.returncode != 0:
        raise SystemExit(f"error: {shlex.join(argv)}: {last_line(proc.stderr) or proc.returncode}")
    return pki


#: A server that dies in the middle of a step (crash, or a SIGTERM from outside: other people's
#: test runs on a shared machine) is restarted this many times for the steps it did not finish.
MAX_RESTARTS = 2


def run_instance(spec: ServerSpec, g: Group, steps, images: Images, python: str, rundir: Path, counter: int,
                 st: Settings, res: Results, broken: dict, record_deaths: bool, target_dir: Path):
    """Start ``spec`` on ``g``'s image (a target made in ``target_dir`` for write groups), run
    ``steps``, stop it.

    Returns (steps that failed because the server died, status line). Those
    steps are recorded as failures only when ``record_deaths`` (last attempt).
    """
    image = images.paths[g.image] if g.image != NO_IMAGE else None
    size = nbd_size_of(g, images)
    # a fresh target per server instance (made in the try below); the image is the copy's source
    target = target_dir / f"target{counter}.{g.fmt}" if g.write else None
    ep = Endpoint(g.transport)
    if ep.transport == "unix":
        ep.socket_path = str(rundir / f"s{counter}.sock")
    else:
        ep.port = free_tcp_port()
    tls_server_dir = None
    if g.tls:
        tls_server_dir = st.pki / "server"
        ep.tls_dir = str(st.pki / "client-bench")
    served = target or image
    assert served is not None, f"{g.key}: no image and no target"
    argv = server_argv(spec, served, g.fmt, ep, python, g.extra.get(spec.kind, []),
                       tls_server_dir=tls_server_dir, writable=g.write)
    if g.pin is not None:
        argv = ["taskset", "-c", str(g.pin[0]), *argv]
    log = rundir / f"{counter:03d}-{spec.id.replace('/', '_')}-{g.key}.log"
    srv = None
    died: list = []
    failed: list[str] = []
    try:
        try:
            if g.target is not None and target is not None:
                g.target(target, size, images)
            srv = Running(spec, argv, ep, log,
                          env=pynbd_env() if spec.kind == "pynbd" else None,
                          cwd=REPO if spec.kind == "pynbd" else None)
            srv.wait_ready()
            info, tls_on = nbd_info(ep.uri)
            res.multi_conn.setdefault(g.key, {})[spec.id] = bool(info.get("can_multi_conn"))
            if g.tls and not tls_on:
                raise BenchError("nbdinfo --json does not report TLS: true")
            if g.write and info.get("is_read_only"):
                raise BenchError("export is read-only")
            if info.get("export-size") != size:
                raise BenchError(f"export size {info.get('export-size')} != {size}")
            if g.context and g.context not in info.get("contexts", []):
                raise BenchError(f"server does not offer {g.context} (offers {info.get('contexts')})")
        except BenchError as exc:
            if srv is not None and srv.proc.poll() is not None and "received SIGTERM" in tail(log, 20):
                return steps, f"killed from outside at start: {exc}"
            reason = str(exc)
            for m in g.metrics:
                res.fail(m.key, spec.id, reason)
            broken[(g.key, spec.id)] = reason  # cannot start: don't retry each round
            return [], f"n/a: {reason}"
        for metrics, step in steps:
            if srv.proc.poll() is not None:
                died.append((metrics, step))
                continue
            try:
                got = step(Workloads(st, target=target, source=image if g.write else None, fmt=g.fmt), ep.uri,
                           size)
            except BenchError as exc:
                reason = str(exc)
                if srv.proc.poll() is None and "received SIGTERM" in tail(log, 30):
                    try:  # signalled from outside (we have not sent one yet): let it finish exiting
                        srv.proc.wait(timeout=5)
                    except subprocess.TimeoutExpired:
                        pass
                if srv.proc.poll() is not None:
                    died.append((metrics, step))
                    failed.append(f"{reason} (server exited {srv.proc.returncode}: {tail(log, 1)})")
                    continue
                for m in metrics:
                    res.fail(m.key, spec.id, reason)
                failed.append(reason)
                continue
            for k, v in got.items():
                if k.endswith("/extents"):
                    res.extents.setdefault(g.key, {})[spec.id] = int(v)
                else:
                    res.add(k, spec.id, v)
    finally:
        if srv is not None:
            rss = srv.peak_rss()
            code = srv.stop()
            if rss is not None:
                res.add(RSS.key, spec.id, rss)
            if spec.kind == "pynbd" and code not in (0, None) and not died:
                w = f"{spec.id} on {g.key}: exit code {code} after SIGTERM (expected 0)"
                if w not in res.warnings:
                    res.warnings.append(w)
        if target is not None:
            target.unlink(missing_ok=True)
    if died:
        outside = "received SIGTERM" in tail(log, 30)
        why = "SIGTERM from outside this script" if outside else f"exit code {srv.exit_code}: {tail(log, 1)}"
        res.warnings.append(f"{spec.id} on {g.key}: server died during a run ({why})"
                            + ("" if record_deaths else "; restarted"))
        if record_deaths:
            for metrics, _ in died:
                for m in metrics:
                    res.fail(m.key, spec.id, f"server died: {why}")
            return [], "failed: " + "; ".join(failed)
        return died, f"server died ({why}); restarting for {len(died)} step(s)"
    return [], "ok" if not failed else "failed: " + "; ".join(failed)


def nbd_size_of(g: Group, images: Images) -> int:
    if g.size_scale != 1:
        return g.size_scale * images.size
    if g.image == "qcow2-bitmap":
        return 100 * images.size
    if g.image == "raw-frag-8M":
        return 8 * MiB
    return images.size


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def fmt_value(v: float, unit: str) -> str:
    if unit == "ms":
        return f"{v:.1f}" if v < 100 else f"{v:.0f}"
    if unit == "MiB":
        return f"{v:.1f}"
    return f"{v:,.0f}"


def build_table(res: Results, groups: list[Group], servers: list[ServerSpec]) -> list[str]:
    lines = [
        "| workload | server | value | unit | × qemu-nbd | min–max |",
        "|---|---|---:|---|---:|---|",
    ]
    metrics = [m for g in groups for m in g.metrics] + [RSS]
    seen = set()
    for m in metrics:
        if m.key in seen:
            continue
        seen.add(m.key)
        ref = res.value(m.key, "qemu-nbd")
        for spec in servers:
            v = res.value(m.key, spec.id)
            fails = res.failures.get(m.key, {}).get(spec.id, [])
            if v is None:
                if not fails:
                    continue
                lines.append(f"| {m.title} | {spec.id} | n/a | | | {fails[0].replace('|', '/')} |")
                continue
            vals = res.samples[m.key][spec.id]
            ratio = f"{v / ref:.2f}×" if ref else "—"
            spread = f"{fmt_value(min(vals), m.unit)}–{fmt_value(max(vals), m.unit)}" if len(vals) > 1 else ""
            if fails:
                spread += f" ({len(fails)} of {len(fails) + len(vals)} runs failed: {fails[0].replace('|', '/')})"
            unit = m.unit + (" ↑" if m.higher_better else " ↓")
            lines.append(f"| {m.title} | {spec.id} | {fmt_value(v, m.unit)} | {unit} | {ratio} | {spread} |")
    return lines


def notes(res: Results, servers: list[ServerSpec]) -> list[str]:
    out = []
    for gkey, per in res.extents.items():
        if len(set(per.values())) > 1:
            out.append(f"- {gkey}: servers report different extent counts: "
                       + ", ".join(f"{k}={v}" for k, v in per.items()))
        elif per:
            out.append(f"- {gkey}: {next(iter(per.values()))} extents per map (all servers agree)")
    for gkey, per in res.multi_conn.items():
        no = [k for k, v in per.items() if not v]
        if no:
            out.append(f"- {gkey}: no CAN_MULTI_CONN from {', '.join(no)} (nbdcopy then uses 1 connection)")
    out += [f"- warning: {w}" for w in res.warnings]
    return out


def suggest_defaults(res: Results, groups: list[Group]) -> list[str]:
    """Per transport, rank the pynbd loop/zero-copy variants by the geometric mean of their
    throughput/IOPS relative to the best variant (raw image, seq 1 and 4 conns, random reads)."""
    variants = [s.id for s in ALL_SERVERS if s.kind == "pynbd" and s.pynbd_args]
    out = []
    for transport in ("unix", "tcp"):
        keys = [m.key for g in groups if g.transport == transport and g.image == "raw-full" and not g.tls
                and not g.write for m in g.metrics]
        scores = {}
        for v in variants:
            rel = []
            for k in keys:
                vals = {x: res.value(k, x) for x in variants}
                best = max((x for x in vals.values() if x), default=None)
                if not best or not vals[v]:
                    rel = None
                    break
                rel.append(vals[v] / best)
            if rel:
                scores[v] = math.exp(sum(map(math.log, rel)) / len(rel))
        if scores:
            ranked = sorted(scores.items(), key=lambda kv: -kv[1])
            out.append(f"- {transport}: " + ", ".join(f"{k} {s:.3f}" for k, s in ranked)
                       + f"  → best: {ranked[0][0]}")
    return out


def machine_info(python: str) -> dict[str, str]:
    def first_line(argv):
        try:
            return subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
        except Exception:
            return "?"

    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import uvloop  # noqa: PLC0415

        uv = uvloop.__version__
    except Exception:
        uv = "not installed"
    return {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "nproc": str(len(os.sched_getaffinity(0))),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": uv,
        "qemu-nbd": first_line(["qemu-nbd", "--version"]),
        "nbdkit": first_line(["nbdkit", "--version"]),
        "libnbd": first_line(["nbdinfo", "--version"]).replace("nbdinfo", "libnbd"),
        "fio": first_line(["fio", "--version"]),
        "openssl (python ssl)": ssl_version(python),
        "gnutls": gnutls_version(),
    }


def ssl_version(python: str) -> str:
    try:
        return subprocess.run([python, "-c", "import ssl; print(ssl.OPENSSL_VERSION)"], capture_output=True,
                              text=True, timeout=10).stdout.strip() or "?"
    except Exception:
        return "?"


def gnutls_version() -> str:
    """GnuTLS as qemu-nbd links it (Debian package version)."""
    try:
        proc = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", "libgnutls30"], capture_output=True,
                              text=True, timeout=10)
        return proc.stdout.strip() or "?"
    except Exception:
        return "?"


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------


def build_groups(args, servers: list[ServerSpec], pynbd: PynbdInfo) -> list[Group]:
    # raw: every server, the pynbd variants and pynbd with its defaults (zero-copy
    # auto chooses per READ size, which no single variant shows).
    raw_servers = list(servers)
    # qcow2: nbdkit 1.32 has no qcow2 reader. pynbd with its defaults everywhere, and for
    # sequential reads also uvloop with zero-copy on and off (the qcow2 read path differs).
    q_servers = [s for s in servers if s.kind == "qemu-nbd" or (s.kind == "pynbd" and not s.pynbd_args)]
    q_seq_servers = q_servers + [s for s in servers if s.id in ("pynbd/uvloop/zc-on", "pynbd/uvloop/zc-off")]
    # TLS: qemu-nbd (GnuTLS) and pynbd with its defaults (TLS always takes the copy path).
    tls_servers = [s for s in servers if s.kind == "qemu-nbd" or (s.kind == "pynbd" and not s.pynbd_args)]
    poll_off = ([POLL_OFF] if re.search(r"--poll-us\b", pynbd.help)
                and any(s.kind == "pynbd" and not s.pynbd_args for s in servers) else [])
    # pynbd: pass --bitmap if the CLI grows one; otherwise it is expected to expose persistent bitmaps.
    pyextra = ["--bitmap", BITMAP_NAME] if re.search(r"--bitmap\b", pynbd.help) else []
    bitmap_extra = {"qemu-nbd": ["-B", BITMAP_NAME], "pynbd": pyextra}
    tls = []
    if args.tls:
        tls = [g for t in args.transports for g in tls_groups(t, tls_servers)]
        tls += tls_map_groups(tls_servers + poll_off, bitmap_extra if args.qcow2 else None)
    if args.tls_only:
        return [g for g in tls if g.servers]
    # writes: each server with its defaults (the loop and zero-copy variants differ in READs),
    # nbdkit's file plugin for raw only. Unix socket only, to keep the run short.
    w_raw_servers = [s for s in servers if not (s.kind == "pynbd" and s.pynbd_args)]
    groups = []
    for t in args.transports:
        groups.append(seq_group(f"raw-{t}", f"raw {t}", "raw-full", "raw", t, raw_servers))
    groups += write_groups("raw", "unix", w_raw_servers)
    groups.append(map_group("raw-frag", "raw fragmented", "raw-frag", "raw", raw_servers))
    groups.append(qemu_map_group("raw-frag-qemu", "raw fragmented", "raw-frag", "raw", raw_servers + poll_off))
    if SYSTEM_PYTHON:
        groups.append(walk_group("raw-frag-walk", "raw fragmented", "raw-frag", "raw", raw_servers))
    if args.qcow2 and q_seq_servers:
        groups.append(seq_group("qcow2-unix", "qcow2 unix", "qcow2-full", "qcow2", "unix", q_seq_servers))
        groups.append(seq_group("chain-unix", "qcow2 3-layer chain unix", "qcow2-chain", "qcow2", "unix",
                                q_seq_servers))
        groups += write_groups("qcow2", "unix", q_servers)
        groups.append(map_group("qcow2-frag", "qcow2 fragmented", "qcow2-frag", "qcow2", q_servers))
        # qemu-nbd offers qemu:allocation-depth only with -A; nbdkit has no qcow2 reader.
        groups.append(map_group("qcow2-frag-depth", "qcow2 fragmented, qemu:allocation-depth", "qcow2-frag",
                                "qcow2", q_servers, context="qemu:allocation-depth", extra={"qemu-nbd": ["-A"]}))
        groups.append(qemu_map_group("qcow2-frag-qemu", "qcow2 fragmented", "qcow2-frag", "qcow2",
                                     q_servers + poll_off))
        if SYSTEM_PYTHON:
            groups.append(walk_group("qcow2-frag-walk", "qcow2 fragmented", "qcow2-frag", "qcow2", q_servers))
        groups.append(map_group(
            "qcow2-bitmap", "dirty bitmap (qcow2, 100× virtual size)", "qcow2-bitmap", "qcow2", q_servers,
            context=f"qemu:dirty-bitmap:{BITMAP_NAME}", extra=bitmap_extra,
        ))
        groups.append(qemu_map_group(
            "qcow2-bitmap-qemu", "dirty bitmap (qcow2, 100× virtual size)", "qcow2-bitmap", "qcow2",
            q_servers + poll_off, context=f"qemu:dirty-bitmap:{BITMAP_NAME}", extra=bitmap_extra,
        ))
        if SYSTEM_PYTHON:
            groups.append(walk_group(
                "qcow2-bitmap-walk", "dirty bitmap (qcow2, 100× virtual size)", "qcow2-bitmap", "qcow2",
                q_servers, context=f"qemu:dirty-bitmap:{BITMAP_NAME}", extra=bitmap_extra,
            ))
        import bitmap_groups  # noqa: PLC0415 (it imports this module: not at the top)

        groups += bitmap_groups.bitmap_write_groups(q_servers)
        groups += bitmap_groups.bitmap_map_groups(q_servers)
        if len(os.sched_getaffinity(0)) >= 2:
            # The same map with the scheduler's placement taken out: where it puts a
            # short-lived client relative to the server decides much of the time above
            # (bench/README.md, "Block status: where it stands and why").
            cpus = sorted(os.sched_getaffinity(0))
            for key, title, pin in (("same-cpu", "server and client on one CPU", (cpus[1], cpus[1])),
                                    ("cross-cpu", "server and client on two CPUs", (cpus[1], cpus[0]))):
                groups.append(map_group(
                    f"qcow2-bitmap-{key}", f"dirty bitmap, {title}", "qcow2-bitmap", "qcow2", q_servers,
                    context=f"qemu:dirty-bitmap:{BITMAP_NAME}", extra=bitmap_extra, pin=pin,
                ))
    groups += tls
    return [g for g in groups if g.servers]


def select_servers(only: list[str] | None, pynbd: PynbdInfo) -> list[ServerSpec]:
    out = []
    for s in ALL_SERVERS:
        if only and not any(tok == s.id or tok == s.kind or s.id.startswith(tok + "/") for tok in only):
            continue
        out.append(s)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="scripts/bench",
        description="End-to-end NBD server benchmark: pynbd vs qemu-nbd vs nbdkit (loopback/unix only).",
    )
    ap.add_argument("--quick", action="store_true", help="64 MiB images, 1 round, short runs (smoke test)")
    ap.add_argument("--rounds", type=int, help="rounds (median over rounds; default 3, quick 1)")
    ap.add_argument("--size", type=parse_size, help="image size (default 1G, quick 64M)")
    ap.add_argument("--only", help="comma-separated servers: qemu-nbd, nbdkit, pynbd, or a row id "
                                   "such as pynbd/uvloop (prefix) or pynbd/asyncio/zc-off")
    ap.add_argument("--transports", default="unix,tcp", help="sequential/random-read transports (default unix,tcp)")
    ap.add_argument("--no-qcow2", dest="qcow2", action="store_false", help="skip the qcow2 rows")
    ap.add_argument("--no-tls", dest="tls", action="store_false", help="skip the TLS rows")
    ap.add_argument("--tls-only", action="store_true", help="run only the TLS rows (pynbd and qemu-nbd)")
    ap.add_argument("--groups", help="comma-separated group key prefixes to run (e.g. qcow2-bitmap,raw-frag)")
    ap.add_argument("--requests", type=int, default=64, help="nbdcopy --requests (default 64)")
    ap.add_argument("--fio-runtime", type=float, help="seconds per fio run (default 3, quick 1)")
    ap.add_argument("--json", type=Path, help="write all samples and medians to this file")
    ap.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "pynbd-bench",
                    help="where images are built and cached (default $TMPDIR/pynbd-bench)")
    ap.add_argument("--keep-logs", action="store_true", help="keep server logs")
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs pynbd (default: this one)")
    args = ap.parse_args(argv)
    if args.tls_only and not args.tls:
        ap.error("--tls-only and --no-tls exclude each other")

    size = args.size or (64 * MiB if args.quick else GiB)
    if size % (128 * KiB):
        ap.error("--size must be a multiple of 128K")
    st = Settings(
        size=size,
        rounds=args.rounds or (1 if args.quick else 3),
        seq_reps=1 if args.quick else 2,
        fio_runtime=args.fio_runtime or (1.0 if args.quick else 3.0),
        fio_ramp=0.0 if args.quick else 0.5,
        map_reps=2 if args.quick else 5,
        requests=args.requests,
        workdir=args.workdir,
    )
    args.transports = [t.strip() for t in args.transports.split(",") if t.strip()]
    if any(t not in ("unix", "tcp") for t in args.transports):
        ap.error("--transports: unix and/or tcp")
    only = [t.strip() for t in args.only.split(",")] if args.only else None

    for tool in ("nbdcopy", "nbdinfo", "fio", "qemu-img", "qemu-io"):
        if not shutil.which(tool):
            print(f"error: {tool} not found", file=sys.stderr)
            return 2
    pynbd = probe_pynbd(args.python)
    servers = select_servers(only, pynbd)
    servers = [s for s in servers if s.kind == "pynbd" or shutil.which(s.kind)]
    if not servers:
        ap.error("no servers selected")
    groups = build_groups(args, servers, pynbd)
    if args.groups:
        prefixes = [p.strip() for p in args.groups.split(",") if p.strip()]
        groups = [g for g in groups if any(g.key.startswith(p) for p in prefixes)]
        if not groups:
            raise SystemExit(f"error: --groups {args.groups}: no group key starts with that")

    # SIGTERM/SIGHUP behave like Ctrl-C: unwind through the finally that kills servers.
    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, _interrupt)  # also when started with SIGINT ignored (background jobs)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)

    res = Results()
    info = machine_info(args.python)
    t0 = time.monotonic()
    try:
        st.workdir.mkdir(parents=True, exist_ok=True)
        print(f"images in {st.workdir} (size {human_size(size)}):", flush=True)
        images = Images(st.workdir, size)
        images.build(args.qcow2 and any(g.fmt == "qcow2" for g in groups))
        if not pynbd.available:
            print(f"pynbd: n/a ({pynbd.reason})")
            res.warnings.append(f"pynbd rows n/a: {pynbd.reason}")
            for g in groups:
                g.servers = [s for s in g.servers if s.kind != "pynbd"]
        print(f"{st.rounds} round(s), servers: {', '.join(s.id for s in servers)}", flush=True)
        run_bench(args, st, groups, images, args.python, res)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping servers", file=sys.stderr)
        kill_all_live()
        return 130
    finally:
        kill_all_live()
    elapsed = time.monotonic() - t0

    # (with the variants only some groups run, such as pynbd/poll-off)
    table = build_table(res, groups, list(dict.fromkeys(servers + [s for g in groups for s in g.servers])))
    extra = notes(res, servers)
    sugg = suggest_defaults(res, groups)
    import bitmap_groups  # noqa: PLC0415 (it imports this module: not at the top)

    recording = bitmap_groups.recording_cost(res, groups)
    print()
    print(f"## pynbd end-to-end benchmark, {human_size(size)} images, {st.rounds} round(s), {elapsed:.0f}s")
    print()
    print("machine: " + "; ".join(f"{k} {v}" for k, v in info.items()))
    print()
    print("\n".join(table))
    if recording:
        print()
        print("Cost of recording writes into enabled bitmaps (value with N bitmaps / value with 0; "
              "target for pynbd: >= 0.90):")
        print()
        print("\n".join(recording))
    if extra:
        print()
        print("\n".join(extra))
    if sugg:
        print()
        print("pynbd variants, geometric mean of throughput/IOPS relative to the best variant (raw image)"
              + (" [--quick: too short and small to choose defaults from]:" if args.quick else ":"))
        print("\n".join(sugg))
    if args.json:
        payload = {
            "machine": info,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(st).items()},
            "elapsed_s": elapsed,
            "metrics": {k: vars(m) for k, m in METRICS.items()},
            "samples": res.samples,
            "values": {k: {s: res.value(k, s) for s in per} for k, per in res.samples.items()},
            "failures": res.failures,
            "extents": res.extents,
            "multi_conn": res.multi_conn,
            "warnings": res.warnings,
            "table": table,
            "recording_cost": recording,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
