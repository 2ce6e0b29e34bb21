"""The server: listeners, the connection limit, signals and graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pynbd.protocol.handshake import GREETING, ExportCatalog, TlsMode
from pynbd.server.channel import SocketChannel
from pynbd.server.connection import Connection
from pynbd.server.settings import ConnectionSettings
from pynbd.server.exports import Export

log = logging.getLogger(__name__)

SD_LISTEN_FDS_START = 3  # sd_listen_fds(3)
UNIX_SNDBUF = 1 << 20
#: The signals that stop the server cleanly.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def hold_stop_signals() -> None:
    """Keep SIGTERM and SIGINT pending until :meth:`NbdServer.serve` handles them.

    Call it on the main thread before the first listener exists: a client may connect
    (and a supervisor may stop the server) from then on, and a stop asked for before
    ``serve`` began must be the same clean stop, not the default action's death.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


class ListenError(Exception):
    """A listening socket could not be set up (busy port, bad path, ...)."""


@dataclass(frozen=True, slots=True)
class ListenAddress:
    """Where to listen: a unix socket path, or a TCP host and port."""

    unix_path: str | None = None
    host: str = "127.0.0.1"
    port: int = 10809


def _uri_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def export_uris(sock: socket.socket, names: Sequence[str], tls: bool = False) -> list[str]:
    """The URIs clients use for each export on this listener (logged at start)."""
    scheme = "nbds" if tls else "nbd"
    uris = []
    for name in names:
        quoted = urllib.parse.quote(name)
        if sock.family == socket.AF_UNIX:
            uris.append(f"{scheme}+unix:///{quoted}?socket={sock.getsockname()}")
        else:
            host, port = sock.getsockname()[:2]
            uris.append(f"{scheme}://{_uri_host(host)}:{port}/{quoted}")
    return uris


def listen(address: ListenAddress, backlog: int = socket.SOMAXCONN) -> socket.socket:
    """Open a listening socket; raises ListenError with a one-line reason.

    The backlog is as long as the system allows (as qemu-nbd's): clients of a burst
    wait there until accepted, where a full backlog refuses unix clients and drops
    TCP clients whose connection the kernel already completed.
    """
    try:
        if address.unix_path is not None:
            path = address.unix_path
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(os.lstat(path).st_mode):
                    os.unlink(path)  # a stale socket from an earlier run
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.bind(path)
        else:
            infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            family, type_, proto, _, sockaddr = infos[0]
            sock = socket.socket(family, type_, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as exc:
        where = address.unix_path or f"{address.host}:{address.port}"
        raise ListenError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def systemd_sockets() -> list[socket.socket]:
    """Sockets passed by systemd socket activation (LISTEN_PID/LISTEN_FDS), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return []
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    socks = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        socks.append(sock)
    return socks


class Service(Protocol):
    """Something that runs beside the NBD listeners for the server's lifetime (the QMP
    monitor): started once the server accepts, closed first when it stops."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class NbdServer:
    def __init__(self, exports: Sequence[Export], listeners: Sequence[socket.socket],
                 settings: ConnectionSettings, max_connections: int = 0,
                 shutdown_grace: float = 10.0) -> None:
        self.exports = {e.name: e for e in exports}
        self.catalog = ExportCatalog([e.describe() for e in exports])
        self.listeners = list(listeners)
        self.settings = settings
        self.max_connections = max_connections
        self.shutdown_grace = shutdown_grace
        self.connections: set[Connection] = set()
        self._stop = asyncio.Event()
        self._accepting: list[_Acceptor] = []
        self.services: list[Service] = []
        #: The block nodes of the served images, named for the QMP monitor
        #: (pynbd.qmp.nodes.NodeTable); None without a monitor.
        self.nodes: Any = None

    def refresh_export(self, export: Export) -> None:
        """Offer ``export`` as it is now to new clients (its image's bitmaps changed)."""
        export.refresh_bitmaps()
        self.catalog.replace(export.describe())

    def add_export(self, export: Export) -> None:
        """Serve ``export`` to new clients from now on (its name must be free)."""
        assert export.name not in self.exports
        self.exports[export.name] = export
        self.catalog.replace(export.describe())

    def remove_export(self, export: Export) -> None:
        """Offer ``export`` to no new client (those connected keep it)."""
        del self.exports[export.name]
        self.catalog.remove(export.name)

    def clients_of(self, export: Export) -> list[Connection]:
        """The connections in transmission with ``export``."""
        return [conn for conn in self.connections if getattr(conn, "export", None) is export]

    def stop(self) -> None:
        """Begin the clean stop (as SIGTERM): :meth:`serve` then winds everything down."""
        self._stop.set()

    def add_service(self, service: Service) -> None:
        """Run ``service`` with the server (call before :meth:`serve`)."""
        self.services.append(service)

    async def serve(self) -> None:
        """Accept until stop(); then finish in-flight requests and close everything."""
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, self._on_signal, sig)
        # A signal held since hold_stop_signals() reaches its handler now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
        names = list(self.exports)
        tls = self.settings.tls_mode is TlsMode.REQUIRED
        for sock in self.listeners:
            for uri in export_uris(sock, names, tls):
                log.info("serving %s", uri)
        self._accepting = [_Acceptor(loop, sock, self._connected, self._resume_accepting)
                           for sock in self.listeners]
        self._resume_accepting()
        for service in self.services:
            await service.start()
        await self._stop.wait()
        log.info("stopping: no new connections; finishing requests in flight")
        for acceptor in self._accepting:
            acceptor.pause()
        for sock in self.listeners:
            self._close_listener(sock)
        for service in self.services:
            await service.close()
        await self._shutdown_connections()
        for sig in STOP_SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: int) -> None:
        log.info("received %s", signal.Signals(sig).name)
        self.stop()

    @staticmethod
    def _close_listener(sock: socket.socket) -> None:
        path = sock.getsockname() if sock.family == socket.AF_UNIX else None
        sock.close()
        if path:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _at_limit(self) -> bool:
        return 0 < self.max_connections <= len(self.connections)

    def _resume_accepting(self) -> None:
        if not self._stop.is_set() and not self._at_limit():
            for acceptor in self._accepting:
                acceptor.resume()

    def _connected(self, sock: socket.socket, peer: str, greeted: int) -> None:
        """A client was accepted (and ``greeted`` bytes of the greeting sent): start its connection."""
        loop = asyncio.get_running_loop()
        conn = Connection(SocketChannel(sock, loop), peer, self.exports, self.catalog, self.settings, greeted,
                          on_end=self._connection_done, peers=self.connections)
        self.connections.add(conn)
        conn.start()
        if self._at_limit():
            # At the connection limit, stop accepting: clients wait in the backlog (qemu -e).
            for acceptor in self._accepting:
                acceptor.pause()

    def _connection_done(self, conn: Connection) -> None:
        self.connections.discard(conn)
        self._resume_accepting()

    async def _shutdown_connections(self) -> None:
        """Answer what was received, then close.

        Connections busy with requests finish them (for up to ``shutdown_grace``
        seconds) while the others answer new requests with ESHUTDOWN and options with
        ERR_SHUTDOWN (NBD spec: NBD_ESHUTDOWN, NBD_REP_ERR_SHUTDOWN); then every
        connection stops waiting for its client and ends once its replies are sent;
        those still running after another grace period are cut.
        """
        conns = list(self.connections)
        for conn in conns:
            conn.begin_shutdown()
        busy = [c.task for c in conns if c.busy]
        if busy:
            await asyncio.wait(busy, timeout=self.shutdown_grace)
        for conn in list(self.connections):
            conn.stop_waiting()
        tasks = [c.task for c in self.connections if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=self.shutdown_grace)
        late = list(self.connections)
        if late:
            log.warning("%d connection(s) still busy %.0f s after the stop began; closing them",
                        len(late), self.shutdown_grace)
        for conn in late:
            conn.abort()
        tasks = [c.task for c in late if c.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=self.shutdown_grace)

    def close_exports(self) -> None:
        for export in self.exports.values():
            export.close()


def send_greeting(sock: socket.socket) -> int:
    """Send the greeting the moment a client is accepted; bytes sent (the rest goes
    out from the connection's task).

    It depends on nothing the client says (NBD spec "Newstyle negotiation"), so the
    client reads it and answers while this server sets the connection up.
    """
    try:
        return sock.send(GREETING, socket.MSG_DONTWAIT)
    except OSError:
        return 0  # full or failing: the task sends it, or reports the failure


class _Acceptor:
    """Accepts clients on one listening socket from a reader callback.

    The callback accepts a waiting client and starts its connection at once:
    awaiting ``loop.sock_accept`` per client cost a task wake-up and a poll
    registration each (tens of microseconds before the greeting).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, listener: socket.socket,
                 connected: Callable[[socket.socket, str, int], None], retry: Callable[[], None]) -> None:
        self.loop = loop
        self.listener = listener
        self.connected = connected
        #: Resumes accepting unless the server stopped or is at its limit.
        self.retry = retry
        #: socket() arguments for accepted sockets, as plain ints (see _ready).
        self._socket_args = (int(listener.family), int(listener.type), listener.proto)
        self.family = listener.family
        self._registered = False
        self._failing = False

    def resume(self) -> None:
        if not self._registered:
            self.loop.add_reader(self.listener.fileno(), self._ready)
            self._registered = True

    def pause(self) -> None:
        if self._registered:
            self.loop.remove_reader(self.listener.fileno())
            self._registered = False

    def _ready(self) -> None:
        # One client per call: the listener stays readable while more wait (level-
        # triggered polling), and a second accept() would mostly fail with EAGAIN.
        if not self._registered:
            return
        try:
            # socket.accept() without its Python wrapper: that converts the listener's
            # family and type to enums for each client, a cost each connection pays.
            fd, addr = self.listener._accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            # e.g. EMFILE: pause instead of spinning on a listener that stays
            # readable, and say so once until an accept succeeds again.
            (log.debug if self._failing else log.error)("accept failed: %s (retrying every 0.1 s)", exc)
            self._failing = True
            self.pause()
            self.loop.call_later(0.1, self.retry)
            return
        self._failing = False
        sock = socket.socket(*self._socket_args, fileno=fd)
        greeted = send_greeting(sock)
        if self.family == socket.AF_UNIX:
            # The default unix socket buffer (about 200 KiB) is smaller than one
            # 256 KiB nbdcopy read: every reply waited for the client to drain.
            # 1 MiB doubled single-connection reads (bench/README.md). TCP
            # autotunes its buffers, and setting them there made no difference.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SNDBUF)
            peer = "unix socket"
        elif self.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # NBD spec "Transmission": SHOULD
            peer = f"{_uri_host(addr[0])}:{addr[1]}"
        else:  # e.g. vsock from systemd socket activation
            peer = str(addr)
        self.connected(sock, peer, greeted)
