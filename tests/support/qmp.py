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


# --- Through the qemu.qmp library (tests/test_qmp_bitmaps.py) ------------------------------------

from qemu.qmp import ExecuteError, QMPClient  # noqa: E402  (appended section: its own imports)


async def answer(client: QMPClient, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run one command: ``{"return": VALUE}``, or ``{"error": {"class": C, "desc": D}}`` as
    the wire has it (a refusal is an answer to compare here, not an exception)."""
    try:
        return {"return": await client.execute(command, arguments)}
    except ExecuteError as error:
        return {"error": {"class": error.error_class, "desc": str(error)}}


def qsd_blockdev(node: str, image: str | Path, fmt: str = "qcow2") -> list[str]:
    """qemu-storage-daemon arguments for ``image`` as format node ``node`` over file node
    ``node-file`` (as pynbd names an export's nodes); the path made absolute (qsd runs in
    its work directory)."""
    path = Path(image).resolve()
    return ["--blockdev", f"driver=file,node-name={node}-file,filename={path}",
            "--blockdev", f"driver={fmt},node-name={node},file={node}-file"]


async def dirty_bitmaps(client: QMPClient) -> dict[str, list[dict[str, Any]]]:
    """Every node's BlockDirtyInfo list from ``query-named-block-nodes`` (newest bitmap
    first, as QEMU lists them), by node name; [] for a node without bitmaps."""
    nodes = await client.execute("query-named-block-nodes", {"flat": True})
    return {node["node-name"]: node.get("dirty-bitmaps", []) for node in nodes}


# --- Nodes and exports from QMP only (tests/test_qmp_exports.py) ----------------------------------


class NodelessQsd(QsdServer):
    """qemu-storage-daemon with its monitor and an NBD server on ``socket`` but no block
    node (nor export): they come from QMP, as for ``pynbd serve --qmp`` without an
    image. It runs in ``workdir``, where its monitor's socket is ``qmp_path``."""

    def __init__(self, *extra: str, workdir: str | Path, **kw: Any) -> None:
        super().__init__(Path(workdir) / "(no image)", *extra, workdir=workdir, **kw)

    def argv(self) -> list[str]:
        argv = super().argv()
        # QsdServer's command line less its image's two --blockdev options (before ``extra``).
        first = argv.index("--blockdev")
        assert argv[first + 2] == "--blockdev", argv
        return argv[:first] + argv[first + 4:]


async def connected(path: str | Path, name: str = "test") -> QMPClient:
    """A ``qemu.qmp`` client connected (and negotiated) to the monitor at ``path``."""
    client = QMPClient(name)
    await client.connect(str(path))
    return client


def quit_and_wait(server: _ServerProcess) -> list[bytes]:
    """``quit`` on ``server``'s monitor (``server.qmp_path``; no other client may be
    connected to a qsd's), then the process exits 0 and its monitor socket is gone. The
    messages after negotiation up to the end (the events the stop emits, then ``quit``'s
    ``{}``), timestamps masked."""
    with RawQmp(server.qmp_path) as client:  # type: ignore[attr-defined]
        client.send(NEGOTIATE + b'{"execute": "quit"}')
        answers = client.read_until_eof()
    assert answers[0] == answers[-1] == b'{"return": {}}', answers
    assert server.wait_exit() == 0, server.log()
    wait_gone(server.qmp_path)  # type: ignore[attr-defined]
    return [masked(line) for line in answers[1:]]


# --- Comparing two servers' nodes and exports (tests/test_qmp_exports.py) -------------------------

from collections.abc import AsyncIterator  # noqa: E402  (appended section: its own imports)
from contextlib import asynccontextmanager  # noqa: E402
from dataclasses import dataclass  # noqa: E402

#: A command and its arguments.
Step = tuple[str, dict[str, Any]]
#: QEMU's automatic node names (pynbd's have the same shape, other digits).
AUTOMATIC_NAME = re.compile(r"#block\d+\Z")


def without_actual_size(value: Any) -> Any:
    """``value`` without any ``actual-size`` member, at any depth."""
    if isinstance(value, dict):
        return {k: without_actual_size(v) for k, v in value.items() if k != "actual-size"}
    if isinstance(value, list):
        return [without_actual_size(v) for v in value]
    return value


@dataclass(eq=False)
class Side:
    """One server of a comparison: its process, a QMP client, its directory of copies."""

    server: NodelessQsd | PynbdServer
    client: QMPClient

    @property
    def directory(self) -> Path:
        return self.server.workdir

    def located(self, value: Any) -> Any:
        """``value`` with every ``filename`` member a path in this side's directory."""
        if isinstance(value, dict):
            return {k: str(self.directory / v) if k == "filename" else self.located(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.located(v) for v in value]
        return value

    def masked(self, value: Any) -> Any:
        """``value`` with this side's directory written ``<DIR>`` and no ``actual-size``."""
        return without_actual_size(json.loads(json.dumps(value).replace(str(self.directory), "<DIR>")))

    async def run(self, step: Step) -> dict[str, Any]:
        command, arguments = step
        return self.masked(await answer(self.client, command, self.located(arguments)))

    async def query(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return self.masked(await self.client.execute(command, arguments))

    async def nodes(self) -> list[dict[str, Any]]:
        """``query-named-block-nodes`` (flat), newest node first."""
        return await self.query("query-named-block-nodes", {"flat": True})

    def uri(self, export_name: str) -> str:
        return f"nbd+unix:///{export_name}?socket={self.server.socket}"


@asynccontextmanager
async def sides(qsd: NodelessQsd, pynbd: PynbdServer) -> AsyncIterator[tuple[Side, Side]]:
    """Both servers with a QMP client each (qsd serves one client at a time: disconnected
    at the end)."""
    theirs = Side(qsd, await connected(qsd.qmp_path))
    try:
        ours = Side(pynbd, await connected(pynbd.qmp_path))  # type: ignore[attr-defined]
        try:
            yield theirs, ours
        finally:
            await ours.client.disconnect()
    finally:
        await theirs.client.disconnect()


def comparable(nodes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Nodes as the comparison sees them: named ones by name, automatic ones with their
    name masked (sorted); bitmaps without ``busy`` (checked apart: a departure)."""
    named: dict[str, Any] = {}
    automatic = []
    for node in nodes:
        if "dirty-bitmaps" in node:
            node = {**node, "dirty-bitmaps": [{k: v for k, v in bitmap.items() if k != "busy"}
                                              for bitmap in node["dirty-bitmaps"]]}
        if AUTOMATIC_NAME.match(node["node-name"]):
            automatic.append(json.dumps({**node, "node-name": "#block"}, sort_keys=True))
        else:
            named[node["node-name"]] = node
    return {"named": named, "automatic": sorted(automatic)}
