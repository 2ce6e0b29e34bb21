"""The QMP monitor: a unix socket speaking QMP to any number of clients, beside the NBD server.

Runs on the server's event loop (``start``, ``close``, ``emit_event`` on its thread only);
parsing client input runs on one worker thread of its own, so a flood of input delays NBD
clients by a GIL switch at most, never by the parse.

Each client gets a :class:`~pynbd.qmp.session.QmpSession`. Its input is parsed as it
arrives; requests queue (at most 8, QEMU's QMP_REQ_QUEUE_LEN_MAX; reading waits while the
queue is full) and are answered one after the other, in the order sent. Commands of all
clients run one at a time, as QEMU's single dispatcher runs them, so a handler never sees
another command's half-done change even when it awaits. (QEMU answers ``exec-oob``
requests ahead of queued ones; no pynbd command runs out of band, so they are answered in
turn, with their error, as qemu-storage-daemon's slow monitor input does in practice.)

A client that does not read its answers and events is dropped once
``output_limit`` bytes wait for it (logged); nothing it does blocks the loop or the other
clients. Every log line names the client (``qmp#N``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import inspect
import logging
import os
import socket
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pynbd.qmp.registry import CommandRegistry, QmpError
from pynbd.qmp.session import Call, CommandContext, QmpSession, QmpVersion, Reply, encode_event
from pynbd.qmp.stream import StreamItem
from pynbd.server.server import ListenError

log = logging.getLogger(__name__)

#: Requests a client may have waiting (QEMU's QMP_REQ_QUEUE_LEN_MAX).
REQUEST_QUEUE_MAX = 8
#: Unsent output past which a client that does not read is dropped.
DEFAULT_OUTPUT_LIMIT = 1 << 20
#: Bytes read (and parsed in one go) at a time.
READ_SIZE = 64 << 10
#: Seconds a closing monitor waits for running commands to finish.
CLOSE_GRACE = 10.0
#: Seconds a closing connection waits for its client to read the last answers.
FLUSH_GRACE = 5.0

_END = object()


@dataclass(frozen=True)
class MonitorSocket:
    """The monitor's listening socket and the file it made at ``path``."""

    sock: socket.socket
    path: str
    #: (st_dev, st_ino) of the socket file: only that file is removed at the end.
    file_id: tuple[int, int]

    def release(self) -> None:
        """Close the socket and remove its file (if it is still this socket's). Idempotent."""
        self.sock.close()
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self.file_id:
                os.unlink(self.path)


def bind_monitor_socket(path: str) -> MonitorSocket:
    """A listening unix socket at ``path`` with mode 0600.

    A socket file nobody accepts on (left by a process that died) is replaced. Raises
    ListenError with a one-line reason when ``path`` is something else, or when a
    process listens there.
    """
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ListenError(f"cannot listen on {path}: it exists and is not a socket")
        if _accepting(path):
            raise ListenError(f"cannot listen on {path}: another process is listening there")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # The umask decides the mode bind() creates the file with: never readable by others,
    # not even for a moment (umask is per process; this runs before any thread starts).
    old_umask = os.umask(0o177)
    try:
        sock.bind(path)
        sock.listen()
    except OSError as exc:
        sock.close()
        raise ListenError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)
    sock.setblocking(False)
    st = os.lstat(path)
    return MonitorSocket(sock, path, (st.st_dev, st.st_ino))


def _accepting(path: str) -> bool:
    """Whether a process accepts connections on the unix socket ``path``."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(2.0)
        try:
            probe.connect(path)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError as exc:
            if exc.errno == errno.EAGAIN:  # a full backlog: someone listens
                return True
            raise ListenError(f"cannot listen on {path}: {exc.strerror or exc}") from None
    return True


class _Client:
    """One connected monitor client: its session, its connection, its two tasks."""

    def __init__(self, number: int, session: QmpSession, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter) -> None:
        self.name = f"qmp#{number}"
        self.session = session
        self.reader = reader
        self.writer = writer
        self.requests: asyncio.Queue[Any] = asyncio.Queue(REQUEST_QUEUE_MAX)
        #: A handler of this client's is running (it is let finish, whatever happens).
        self.running_command = False
        #: Run no more requests: the client went, was dropped, or the monitor closes.
        self.stopping = False
        self.read_task: asyncio.Task[None] | None = None
        self.run_task: asyncio.Task[None] | None = None
        self.done = asyncio.Event()


class QmpMonitor:
    """Serves QMP on ``listener`` (from :func:`bind_monitor_socket`) with the commands of
    ``registry``; ``server`` is what handlers act on (``context.server``), ``request_stop``
    what ``quit`` calls. A :class:`~pynbd.server.server.Service` of the NBD server."""

    def __init__(self, listener: MonitorSocket, registry: CommandRegistry, version: QmpVersion, *,
                 server: Any = None, request_stop: Callable[[], None] = lambda: None,
                 output_limit: int = DEFAULT_OUTPUT_LIMIT) -> None:
        self.listener = listener
        self.path = listener.path
        self.registry = registry
        self.version = version
        self.server = server
        self.request_stop = request_stop
        self.output_limit = output_limit
        self.clients: set[_Client] = set()
        self._numbers = 0
        self._command_lock = asyncio.Lock()
        self._asyncio_server: asyncio.AbstractServer | None = None
        self._parser_thread: concurrent.futures.ThreadPoolExecutor | None = None

    async def start(self) -> None:
        """Accept clients from now on."""
        self._parser_thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="qmp-parser")
        self._asyncio_server = await asyncio.start_unix_server(self._serve_client, sock=self.listener.sock,
                                                               limit=READ_SIZE)
        log.info("QMP monitor on %s", self.path)

    async def close(self) -> None:
        """Stop accepting; let running commands finish and their answers go out; close
        every client and remove the socket file."""
        if self._asyncio_server is not None:
            self._asyncio_server.close()
        for client in list(self.clients):
            self._stop_client(client)
        waiting = [asyncio.create_task(c.done.wait()) for c in self.clients]
        if waiting:
            await asyncio.wait(waiting, timeout=CLOSE_GRACE + FLUSH_GRACE)
            for task in waiting:
                task.cancel()
        if self._parser_thread is not None:
            self._parser_thread.shutdown(wait=False, cancel_futures=True)
        self.listener.release()
        log.info("QMP monitor on %s closed", self.path)

    def emit_event(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Send event ``name`` (with ``data``, QAPI members in schema order) to every
        client that completed negotiation, stamped with the current time."""
        now_us = time.time_ns() // 1000
        message = encode_event(name, data, now_us // 1_000_000, now_us % 1_000_000)
        receivers = [client for client in self.clients if client.session.negotiated]
        for client in receivers:
            self._send(client, message)
        log.debug("event %s sent to %d client(s)", name, len(receivers))

    # --- one client ------------------------------------------------------------------------

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._numbers += 1
        session = QmpSession(self.registry, self.version)
        client = _Client(self._numbers, session, reader, writer)
        self.clients.add(client)
        log.info("%s: connected", client.name)
        try:
            self._send(client, session.greeting())
            client.run_task = asyncio.create_task(self._run_requests(client), name=f"{client.name} requests")
            client.read_task = asyncio.create_task(self._read_requests(client), name=f"{client.name} input")
            # (asyncio.wait, unlike await, never passes a cancellation on to the command.)
            await asyncio.wait([client.run_task])
            client.read_task.cancel()
            await asyncio.wait([client.read_task])
        finally:
            await self._close_connection(client)
            self.clients.discard(client)
            client.done.set()

    async def _read_requests(self, client: _Client) -> None:
        """Parse input (on the parser thread) and queue what comes out, until end of input."""
        loop = asyncio.get_running_loop()
        try:
            while not client.stopping:
                data = await client.reader.read(READ_SIZE)
                if not data:
                    log.debug("%s: end of input", client.name)
                    await client.requests.put(_END)
                    return
                items: list[StreamItem] = await loop.run_in_executor(self._parser_thread, client.session.feed, data)
                for item in items:
                    await client.requests.put(item)
        except (ConnectionError, OSError) as exc:
            log.info("%s: connection failed: %s", client.name, exc)
            self._stop_client(client)
        except Exception:  # a bug: this client goes, the monitor stays
            log.exception("%s: reading requests failed", client.name)
            self._stop_client(client)

    async def _run_requests(self, client: _Client) -> None:
        """Answer the queued requests in order, one command at a time across all clients."""
        try:
            await self._answer_requests(client)
        except Exception:  # a bug: this client goes, the monitor stays
            log.exception("%s: answering requests failed", client.name)
            self._stop_client(client)

    async def _answer_requests(self, client: _Client) -> None:
        while not client.stopping:
            item = await client.requests.get()
            if item is _END:
                return
            step = client.session.dispatch(item)
            if isinstance(step, Call):
                async with self._command_lock:
                    if client.stopping:
                        return
                    client.running_command = True
                    try:
                        answer = await self._call(client, step)
                    finally:
                        client.running_command = False
                self._send(client, answer)
            else:
                self._answer(client, step)
            # One request per turn of the loop: a flood of requests never holds NBD
            # connections up for longer than one of them takes.
            await asyncio.sleep(0)

    def _stop_client(self, client: _Client) -> None:
        """Run no more of the client's requests; a running command finishes first."""
        client.stopping = True
        current = asyncio.current_task()
        if client.read_task is not None and client.read_task is not current:
            client.read_task.cancel()
        if client.run_task is not None and client.run_task is not current and not client.running_command:
            client.run_task.cancel()

    def _answer(self, client: _Client, step: Reply) -> None:
        log.debug("%s: error %s", client.name, step.data.rstrip().decode("ascii"))
        self._send(client, step.data)

    async def _call(self, client: _Client, call: Call) -> bytes:
        """Run ``call``'s handler; its answer."""
        name = call.command.name
        log.debug("%s: %s", client.name, name)
        context = CommandContext(client.session, client.name, self.server, self.emit_event, self.request_stop)
        try:
            result = call.command.handler(context, **call.arguments)
            if inspect.isawaitable(result):
                result = await result
            return client.session.returned(call, result)
        except QmpError as error:
            log.debug("%s: %s failed: %s", client.name, name, error.desc)
            return client.session.failed(call, error)
        except Exception as exc:  # a bug in a handler: answer, keep serving
            log.exception("%s: %s raised", client.name, name)
            return client.session.failed(call, QmpError(f"internal error in {name}: {exc}"))

    def _send(self, client: _Client, data: bytes) -> None:
        """Queue ``data`` for the client; drop the client past the output limit."""
        if client.writer.is_closing():
            return
        client.writer.write(data)
        waiting = client.writer.transport.get_write_buffer_size()
        if waiting > self.output_limit:
            log.warning("%s: dropped: %d bytes of answers and events unread (limit %d)",
                        client.name, waiting, self.output_limit)
            self._drop(client)

    def _drop(self, client: _Client) -> None:
        client.writer.transport.abort()
        self._stop_client(client)

    async def _close_connection(self, client: _Client) -> None:
        writer = client.writer
        if not writer.is_closing():
            writer.close()
        try:
            # Answers still buffered (quit's, say) go out first; a client that does not
            # read them gets the grace period, then is cut.
            await asyncio.wait_for(writer.wait_closed(), FLUSH_GRACE)
        except (asyncio.TimeoutError, ConnectionError, OSError):
            writer.transport.abort()
        log.info("%s: closed", client.name)
