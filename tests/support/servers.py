"""Start and stop real NBD servers (pynbd and qemu-nbd), and run real NBD clients.

Servers run in the foreground as child processes; stderr (and stdout) go to a
log file next to the socket so a failing test can show what the server said.
Readiness = a connect() to the socket/port succeeds.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from tests.support.deadline import wait_for_log

REPO_ROOT = Path(__file__).resolve().parents[2]
DEBIAN_PYTHON = "/usr/bin/python3"  # has the libnbd binding ("import nbd")

DEFAULT_TIMEOUT = 60


class ServerError(RuntimeError):
    pass


def free_tcp_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _can_connect(sock_path: str | None, port: int | None) -> bool:
    try:
        if sock_path:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(1)
                s.connect(sock_path)
        else:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                pass
        return True
    except OSError:
        return False


class _ServerProcess:
    """Common part: a process serving on a unix socket or a TCP port."""

    kind = "?"
    expected_exit_codes: tuple[int, ...] = (0,)

    def __init__(self, *, name: str = "", socket: str | None = None, tcp: bool = False,
                 port: int | None = None, workdir: str | os.PathLike | None = None,
                 start: bool = True, ready_timeout: float = 20.0):
        self.name = name
        self._own_dir = None
        if workdir is None:
            self._own_dir = tempfile.mkdtemp(prefix=f"{self.kind}-")
            workdir = self._own_dir
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        if tcp or port is not None:
            self.socket = None
            self.port = port if port is not None else free_tcp_port()
        else:
            self.socket = socket or str(self._unique(f"{self.kind}.sock"))
            self.port = None
        self.log_path = self._unique(f"{self.kind}.log")
        self.ready_timeout = ready_timeout
        self.proc: subprocess.Popen | None = None
        self.returncode: int | None = None
        if start:
            self.start()

    def _unique(self, base: str) -> Path:
        p = self.workdir / base
        i = 0
        while p.exists():
            i += 1
            p = self.workdir / f"{i}-{base}"
        return p

    # subclasses build the command line
    def argv(self) -> list[str]:
        raise NotImplementedError

    def env(self) -> dict[str, str]:
        return dict(os.environ)

    @property
    def uri(self) -> str:
        return self.uri_for(self.name)

    def uri_for(self, name: str) -> str:
        if self.socket:
            return f"nbd+unix:///{name}?socket={self.socket}"
        return f"nbd://127.0.0.1:{self.port}/{name}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self):
        if self.socket and os.path.exists(self.socket):
            os.unlink(self.socket)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.argv(), stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=self.env(),
                                     cwd=str(self.workdir))
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.close()
                raise ServerError(f"{self.kind} exited with {self.proc.returncode} before "
                                  f"becoming ready: {' '.join(self.argv())}\n{self.log()}")
            if _can_connect(self.socket, self.port):
                return self
            time.sleep(0.02)
        self.kill()
        raise ServerError(f"{self.kind} not ready after {self.ready_timeout}s\n{self.log()}")

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def rss_kib(self) -> int:
        """Resident set size of the server process (VmRSS from /proc)."""
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise ServerError("no VmRSS")

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close_log()

    def _close_log(self):
        log = getattr(self, "_log", None)
        if log and not log.closed:
            log.close()

    def wait_exit(self, timeout: float = 15.0) -> int:
        """Wait for the process to exit by itself (e.g. after a signal the test sent).

        The exit code is recorded, so the fixture's later stop() does not check it again:
        the test asserts on the return value itself.
        """
        assert self.proc is not None
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            self.returncode = self.proc.returncode
            raise AssertionError(f"{self.kind} still running {timeout}s later\n{self.log()}")
        self._close_log()
        return self.returncode

    def stop(self, *, check: bool = True, timeout: float = 20.0) -> int:
        """SIGTERM, wait; kill if it hangs. With check, assert a clean exit."""
        if self.proc is None:
            return 0
        if self.returncode is not None:
            return self.returncode
        hung = False
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                hung = True
                self.proc.kill()
                self.proc.wait(10)
        self.returncode = self.proc.returncode
        self._close_log()
        if self._own_dir and not check:
            shutil.rmtree(self._own_dir, ignore_errors=True)
        if check:
            assert not hung, f"{self.kind} did not exit within {timeout}s of SIGTERM\n{self.log()}"
            assert self.returncode in self.expected_exit_codes, (
                f"{self.kind} exited with {self.returncode} after SIGTERM\n{self.log()}")
            if self._own_dir:
                shutil.rmtree(self._own_dir, ignore_errors=True)
        return self.returncode

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        # Do not hide the test's own failure behind a stop() assertion.
        self.stop(check=exc_type is None)


class PynbdServer(_ServerProcess):
    """``python -m pynbd serve IMAGE [args]`` in the foreground.

    ``image`` may be None when the exports come from ``--export NAME=PATH`` args.
    """

    kind = "pynbd"

    def __init__(self, image=None, *extra_args, name: str = "", **kw):
        self.image = None if image is None else str(image)
        self.extra_args = [str(a) for a in extra_args]
        super().__init__(name=name, **kw)

    def argv(self) -> list[str]:
        cmd = [sys.executable, "-m", "pynbd", "serve"]
        if self.image is not None:
            cmd.append(self.image)
        if self.name:
            cmd += ["--name", self.name]
        if self.socket:
            cmd += ["--socket", self.socket]
        else:
            cmd += ["--bind", "127.0.0.1", "--port", str(self.port)]
        return cmd + self.extra_args

    def env(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env


class QemuNbdServer(_ServerProcess):
    """``qemu-nbd -t -f FMT -x NAME -k SOCK [args] IMAGE`` in the foreground (no --fork)."""

    kind = "qemu-nbd"

    def __init__(self, image, *extra_args, fmt: str = "raw", name: str = "", **kw):
        self.image = str(image)
        self.fmt = fmt
        self.extra_args = [str(a) for a in extra_args]
        super().__init__(name=name, **kw)

    def argv(self) -> list[str]:
        cmd = ["qemu-nbd", "-t", "-f", self.fmt, "-x", self.name]
        if self.socket:
            cmd += ["-k", self.socket]
        else:
            cmd += ["-b", "127.0.0.1", "-p", str(self.port)]
        return cmd + self.extra_args + [self.image]


# --------------------------------------------------------------------------
# Running clients
# --------------------------------------------------------------------------


def run(cmd, *, timeout: float = DEFAULT_TIMEOUT, check: bool = True, input: bytes | None = None,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """Run a command, capture text output; on check failure show everything."""
    cmd = [str(c) for c in cmd]
    p = subprocess.run(cmd, capture_output=True, timeout=timeout, input=input,
                       stdin=None if input is not None else subprocess.DEVNULL, env=env)
    p.stdout = p.stdout.decode(errors="replace")
    p.stderr = p.stderr.decode(errors="replace")
    if check and p.returncode != 0:
        raise AssertionError(f"command failed ({p.returncode}): {' '.join(cmd)}\n"
                             f"stdout:\n{p.stdout}\nstderr:\n{p.stderr}")
    return p


def nbdinfo(*args, **kw) -> str:
    return run(["nbdinfo", *args], **kw).stdout


def qemu_img(*args, **kw) -> str:
    return run(["qemu-img", *args], **kw).stdout


def qemu_io(target, *commands, fmt: str = "raw", extra=(), **kw) -> subprocess.CompletedProcess:
    """qemu-io -f FMT TARGET -c CMD...; returns the CompletedProcess.

    qemu-io exits 0 even when a command fails, so callers look at stdout.
    """
    cmd = ["qemu-io", "-f", fmt, *extra]
    for c in commands:
        cmd += ["-c", c]
    cmd.append(str(target))
    return run(cmd, **kw)


def nbdinfo_map(uri: str, context: str) -> list[tuple[int, int, int]]:
    """``nbdinfo --map=CONTEXT``: ``(offset, length, value)`` lines."""
    out = nbdinfo(f"--map={context}", uri)
    rows = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[0].isdigit():
            rows.append((int(parts[0]), int(parts[1]), int(parts[2])))
    return rows


def merge_map(entries: Iterable[tuple[int, int, int]], limit: int) -> list[tuple[int, int, int]]:
    """Merge equal neighbours; clip at ``limit`` (qemu-nbd's padded tail)."""
    out = []
    for off, length, typ in entries:
        if off >= limit:
            break
        length = min(length, limit - off)
        if out and out[-1][2] == typ and out[-1][0] + out[-1][1] == off:
            out[-1] = (out[-1][0], out[-1][1] + length, typ)
        else:
            out.append((off, length, typ))
    return out


def merge_qemu_map(entries: Iterable[dict], limit: int) -> list[tuple[int, tuple[bool, bool, bool]]]:
    """``qemu-img map --output=json`` records as (length, (present, zero, data)), equal
    neighbours merged, clipped at ``limit``."""
    out = []
    for e in entries:
        if e["start"] >= limit:
            break
        key = (e["present"], e["zero"], e["data"])
        length = min(e["length"], limit - e["start"])
        if out and out[-1][1] == key:
            out[-1] = (out[-1][0] + length, key)
        else:
            out.append((length, key))
    return out


def nbdcopy(*args, **kw) -> str:
    return run(["nbdcopy", *args], **kw).stdout


def libnbd_script(code: str, *args, timeout: float = DEFAULT_TIMEOUT, check: bool = True
                  ) -> subprocess.CompletedProcess:
    """Run Python code under Debian's /usr/bin/python3 (which has ``import nbd``).

    ``sys.argv[1:]`` in the script are ``args``.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    return run([DEBIAN_PYTHON, "-c", code, *args], timeout=timeout, check=check, env=env)


def have_libnbd_python() -> bool:
    """True when Debian's /usr/bin/python3 can ``import nbd`` (package python3-libnbd)."""
    if not os.path.exists(DEBIAN_PYTHON):
        return False
    return subprocess.run([DEBIAN_PYTHON, "-c", "import nbd"], capture_output=True,
                          env={k: v for k, v in os.environ.items()
                               if not k.startswith("PYTHON")}).returncode == 0


@functools.cache
def pynbd_unavailable_reason() -> str | None:
    """None when ``python -m pynbd serve --help`` works, else what went wrong (the exit
    code and the end of its output); checked once per test session."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT)
    try:
        p = subprocess.run([sys.executable, "-m", "pynbd", "serve", "--help"],
                           capture_output=True, timeout=60, env=env, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return "'python -m pynbd serve --help' did not answer within 60 s"
    if p.returncode == 0:
        return None
    output = (p.stdout + p.stderr).decode(errors="replace").strip()[-600:]
    return f"'python -m pynbd serve --help' fails (exit code {p.returncode}): {output!r}"


def pynbd_available() -> bool:
    """True once ``python -m pynbd serve --help`` works."""
    return pynbd_unavailable_reason() is None


def make_raw_image(path, size: int, writes=()) -> Path:
    """A sparse raw image: truncate to ``size``, then qemu-io writes.

    ``writes`` are qemu-io commands such as ``"write -P 0xaa 0 64k"``.
    """
    path = Path(path)
    with open(path, "wb") as f:
        f.truncate(size)
    if writes:
        qemu_io(path, *writes)
    return path


def make_fragmented_raw(path, extents: int) -> Path:
    """A sparse raw image of ``extents`` x 8 KiB: 4 KiB of data, then a 4 KiB hole, each
    time (a REQ_ONE map asks ``2 * extents`` times)."""
    path = Path(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, extents * 8192)
        for i in range(extents):
            os.pwrite(fd, b"\x01" * 4096, i * 8192)
    finally:
        os.close(fd)
    return path


def voluntary_switches(pid: int) -> int:
    """How often the process's main thread (the event loop's) went to sleep so far."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^voluntary_ctxt_switches:\s*(\d+)", status, re.M)
    assert match, f"/proc/{pid}/status has no voluntary_ctxt_switches"
    return int(match.group(1))


def qemu_img_map_argv(server, tls_dir=None) -> list[str]:
    """``qemu-img map --output=json`` of ``server``'s export on its unix socket, through
    QEMU's nbd driver (one extent per request, REQ_ONE); over TLS with the client
    credentials in ``tls_dir``."""
    opts = f"driver=nbd,server.type=unix,server.path={server.socket}"
    argv = ["qemu-img", "map", "--output=json"]
    if tls_dir is not None:
        argv += ["--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={tls_dir}"]
        opts += ",tls-creds=tls0,tls-hostname=localhost"
    return argv + ["--image-opts", opts]


def settled_log(server, connections: int) -> str:
    """The server log (of a server run with -v) once ``connections`` connections have
    logged their read counters (their closing lines)."""
    return wait_for_log(server, "read data sent:", connections)


def polled_counts(server) -> tuple[int, int]:
    """(requests polled for, windows that ended empty) from the closing line of the one
    connection of a server run with -v."""
    log = settled_log(server, 1)
    match = re.search(r"polled for (\d+) requests, (\d+) windows empty", log)
    assert match, log
    return int(match.group(1)), int(match.group(2))


def check_polled(server, sleeps: int, requests: int, polled_expected: bool) -> None:
    """Polling received many of the requests and the server slept before few, or (not
    expected) polling received none. Counted, not timed: how often an unpolled server
    sleeps depends on where the scheduler puts the client (on a busy CPU, or on the
    server's, a reply lets it send the next request before the server is back in
    epoll_wait), and so does how many requests are there before a poll begins (on
    one CPU a third of qemu-img bench's, against nearly all on two)."""
    polled, _ = polled_counts(server)
    if polled_expected:
        assert polled > requests / 10, f"{polled} of {requests} requests polled for"
        assert sleeps < requests / 4, f"{sleeps} sleeps for {requests} requests"
    else:
        assert polled == 0
