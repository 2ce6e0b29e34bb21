"""QMP test support: qemu-storage-daemon as the reference monitor, a raw QMP client, and
the comparison of answers.

qemu-storage-daemon (qsd) 7.2 is the oracle: the same bytes go to it and to ``pynbd serve
--qmp``, and the answers must be the same lines once the version (and event timestamps)
are masked. The raw client does what ``qemu.qmp`` will not: send any bytes, in any pieces.

qsd serves one monitor client at a time (a second one waits until the first leaves), so a
test talks to it through one connection at a time and closes it before the next.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tests.support.deadline import DEADLINE, wait_until
from tests.support.servers import PynbdServer, _ServerProcess

#: What makes any stream resynchronise, then a request whose answer marks the end of the
#: answers to what came before: byte FF is an error in every lexer state (or ends QEMU's
#: error recovery, then is one), so the marker is always parsed on its own.
SYNC_ID = "__sync__"
SYNC = b'\xff{"execute": "query-version", "id": "' + SYNC_ID.encode() + b'"}'
NEGOTIATE = b'{"execute": "qmp_capabilities"}'
_SYNC_ANSWER = b'"id": "' + SYNC_ID.encode() + b'"'
_FF_STRAY_END = b"\\uFFFD'\"}}"

_VERSION = re.compile(rb'\{"qemu": \{"micro": \d+, "minor": \d+, "major": \d+\}, "package": "[^"]*"\}')
_TIMESTAMP = re.compile(rb'"timestamp": \{"seconds": \d+, "microseconds": \d+\}')


def masked(line: bytes) -> bytes:
    """An answer line with the version and the event timestamp replaced by placeholders."""
    return _TIMESTAMP.sub(b'"timestamp": <T>', _VERSION.sub(b"<VERSION>", line))


class RawQmp:
    """A QMP client on a raw socket: sends bytes as given, reads CR LF-ended lines."""

    def __init__(self, path: str | Path, *, timeout: float = DEADLINE) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._buffer = b""
        self.greeting = self.read_line()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawQmp:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_line(self) -> bytes:
        """The next message (without CR LF); AssertionError at end of input."""
        while b"\r\n" not in self._buffer:
            data = self.sock.recv(1 << 20)
            assert data, f"connection closed; unfinished input: {self._buffer[:200]!r}"
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    def read_until_eof(self) -> list[bytes]:
        """Every message up to the end of the connection."""
        while True:
            data = self.sock.recv(1 << 20)
            if not data:
                break
            self._buffer += data
        lines = self._buffer.split(b"\r\n")
        assert lines[-1] == b"", f"unfinished message at end of input: {lines[-1][:200]!r}"
        self._buffer = b""
        return lines[:-1]

    def sync(self) -> list[bytes]:
        """Send the marker; every message up to its answer, without that answer and
        without the stray-token error the byte FF always causes just before it."""
        self.send(SYNC)
        lines = []
        while True:
            # (Matched as bytes: QEMU may write what Python's json rejects, e.g. "id": inf.)
            line = self.read_line()
            if _SYNC_ANSWER in line:
                assert lines and lines[-1].endswith(_FF_STRAY_END), lines[-1:]
                return lines[:-1]
            lines.append(line)

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        """Send one request and read one message (for tests without events)."""
        request: dict[str, Any] = {"execute": command}
        if arguments is not None:
            request["arguments"] = arguments
        self.send(json.dumps(request).encode())
        return json.loads(self.read_line())


def exchange(path: str | Path, pieces: Iterable[bytes], *, negotiate: bool = True) -> list[bytes]:
    """Connect, (negotiate,) send ``pieces`` one ``sendall`` each, then the marker; the
    greeting and the answers up to the marker's, version and timestamps masked."""
    with RawQmp(path) as client:
        lines = [client.greeting]
        if negotiate:
            client.send(NEGOTIATE)
            lines.append(client.read_line())
        for piece in pieces:
            client.send(piece)
        lines += client.sync()
    return [masked(line) for line in lines]


def first_difference(pynbd: Sequence[bytes], qemu: Sequence[bytes]) -> str:
    """A readable description of where two answer sequences differ (for assert messages)."""
    for i, (ours, theirs) in enumerate(zip(pynbd, qemu)):
        if ours != theirs:
            return f"answer {i}:\n  pynbd: {ours[:300]!r}\n  qsd:   {theirs[:300]!r}"
    return f"pynbd gave {len(pynbd)} answers, qsd {len(qemu)}"


class QsdServer(_ServerProcess):
    """qemu-storage-daemon serving ``image`` (qcow2) as node ``disk0``: its monitor on
    ``qmp_path``, an NBD server (no exports unless ``extra`` adds them) on ``socket``.

    The monitor comes first on the command line, so the NBD socket being ready (what
    start() waits for) means the monitor is too.
    """

    kind = "qsd"

    def __init__(self, image: str | Path, *extra: str, **kw: Any) -> None:
        self.image = str(image)
        self.extra = [str(a) for a in extra]
        workdir = Path(kw.get("workdir") or Path(self.image).parent)
        kw["workdir"] = workdir
        self.qmp_path = str(self._unique_in(workdir, "qsd-qmp.sock"))
        super().__init__(**kw)

    @staticmethod
    def _unique_in(directory: Path, base: str) -> Path:
        path = directory / base
        i = 0
        while path.exists():
            i += 1
            path = directory / f"{i}-{base}"
        return path

    def argv(self) -> list[str]:
        return ["qemu-storage-daemon",
                "--chardev", f"socket,id=m,path={self.qmp_path},server=on,wait=off",
                "--monitor", "chardev=m",
                "--blockdev", f"driver=file,node-name=disk0-file,filename={self.image}",
                "--blockdev", "driver=qcow2,node-name=disk0,file=disk0-file",
                "--nbd-server", f"addr.type=unix,addr.path={self.socket}",
                *self.extra]


def pynbd_with_qmp(image: str | Path | None, *extra: str, workdir: str | Path, qmp_path: str | Path | None = None,
                   **kw: Any) -> PynbdServer:
    """``pynbd serve [IMAGE] --qmp PATH [extra]`` on a unix socket in ``workdir``; the
    monitor's path (a new one in ``workdir`` unless given) is ``server.qmp_path``."""
    if qmp_path is None:
        qmp_path = QsdServer._unique_in(Path(workdir), "pynbd-qmp.sock")
    server = PynbdServer(image, "--qmp", qmp_path, *extra, workdir=workdir, **kw)
    server.qmp_path = str(qmp_path)  # type: ignore[attr-defined]
    return server


def wait_gone(path: str | Path) -> None:
    """Until ``path`` no longer exists (a server removing its socket at exit)."""
    wait_until(lambda: not Path(path).exists(), what=f"{path} removed")
