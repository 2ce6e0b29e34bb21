"""TLS for NBD (STARTTLS, NBD spec "TLS support") over the connection's own socket.

The connection owns a plain socket (for sendfile), so TLS runs through an
``ssl.SSLObject`` with memory BIOs: the same thing asyncio's TLS transport
does inside, but behind our :class:`~pynbd.server.channel.Channel` interface,
so the request pipeline (requests in flight, out-of-order replies) is the same
with and without TLS. TLS cannot use sendfile (bench/README.md): the TLS
channel's ``sendfile`` copies.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import ssl
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pynbd.certs import CA_CERT, SERVER_CERT, SERVER_KEY, distinguished_names
from pynbd.runlength import Buffer
from pynbd.server.channel import ChannelClosed, SocketChannel, wait_writable

log = logging.getLogger(__name__)



class TlsSetupError(Exception):
    """Credentials or options that cannot give a working TLS server (one-line message)."""


class TlsRejected(ConnectionError):
    """A client failed TLS: handshake error, bad certificate, authz denied."""


def read_psk_file(path: str) -> dict[str, bytes]:
    """Parse a qemu/nbdkit PSK file: ``username:hexkey`` per line."""
    keys: dict[str, bytes] = {}
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise TlsSetupError(f"{path}: cannot read PSK file: {exc.strerror}") from None
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hexkey = line.partition(":")
        try:
            if not sep or not user:
                raise ValueError
            keys[user] = bytes.fromhex(hexkey)
        except ValueError:
            raise TlsSetupError(f"{path}:{number}: expected username:hexkey") from None
    if not keys:
        raise TlsSetupError(f"{path}: no username:hexkey entries")
    return keys


def read_authz(entries: Sequence[str]) -> frozenset[str]:
    """``--tls-authz`` values: distinguished names, or @FILE with one DN per line."""
    names: set[str] = set()
    for entry in entries:
        if entry.startswith("@"):
            try:
                text = Path(entry[1:]).read_text()
            except OSError as exc:
                raise TlsSetupError(f"{entry[1:]}: cannot read authz file: {exc.strerror}") from None
            names.update(line.strip() for line in text.splitlines()
                         if line.strip() and not line.startswith("#"))
        else:
            names.add(entry.strip())
    return frozenset(_normalise_dn(n) for n in names)


def _normalise_dn(dn: str) -> str:
    return ",".join(part.strip() for part in dn.split(","))


def warn_if_expired(cert_path: Path) -> None:
    """Clients refuse an expired or not yet valid certificate: say so at start, naming the file."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    now = datetime.datetime.now(datetime.timezone.utc)
    if cert.not_valid_after_utc < now:
        log.warning("%s expired on %s: TLS clients will refuse this server (renew it, e.g. pynbd certs)",
                    cert_path, cert.not_valid_after_utc.isoformat())
    elif cert.not_valid_before_utc > now:
        log.warning("%s is not valid before %s", cert_path, cert.not_valid_before_utc.isoformat())


@dataclass
class TlsConfig:
    creds_dir: Path | None = None
    verify_peer: bool = False
    authz: frozenset[str] = frozenset()
    psk: dict[str, bytes] = field(default_factory=dict)

    def build_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        # TLS 1.2 minimum, 1.3 preferred (OpenSSL picks the highest both support).
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
        if self.creds_dir is not None:
            cert, key, ca = (self.creds_dir / n for n in (SERVER_CERT, SERVER_KEY, CA_CERT))
            try:
                ctx.load_cert_chain(cert, key)
            except (OSError, ssl.SSLError) as exc:
                raise TlsSetupError(f"{self.creds_dir}: cannot load {cert.name}/{key.name}: {exc}") from None
            warn_if_expired(cert)
            if self.verify_peer or self.authz:
                try:
                    ctx.load_verify_locations(cafile=str(ca))
                except (OSError, ssl.SSLError) as exc:
                    raise TlsSetupError(f"{ca}: cannot load CA certificate: {exc}") from None
                ctx.verify_mode = ssl.CERT_REQUIRED
        if self.psk:
            if not hasattr(ctx, "set_psk_server_callback"):
                raise TlsSetupError(
                    f"--tls-psk needs Python 3.13 or newer (this is {sys.version.split()[0]})")
            keys = self.psk
            ctx.set_psk_server_callback(lambda identity: keys.get(identity or "", b""))
            if self.creds_dir is None:
                ctx.set_ciphers("PSK")
        elif self.creds_dir is None:
            raise TlsSetupError("TLS needs credentials (--tls-creds DIR) or --tls-psk FILE")
        return ctx

    def upgrader(self) -> Callable[[SocketChannel, Any], Any]:
        ctx = self.build_context()
        authz = self.authz

        async def upgrade(channel: SocketChannel, conn_log: Any) -> "TlsChannel":
            tls = TlsChannel(channel, ctx)
            try:
                await tls.handshake()
                check_authz(tls, conn_log)
            except (ssl.SSLError, ChannelClosed, ConnectionError, asyncio.CancelledError) as exc:
                tls.close()  # the TLS socket owns the fd now
                if isinstance(exc, (TlsRejected, asyncio.CancelledError)):
                    raise
                conn_log.warning("TLS handshake failed: %s", exc)
                raise TlsRejected(f"TLS handshake failed: {exc}") from None
            conn_log.debug("TLS %s, cipher %s", tls.sock.version(), tls.sock.cipher()[0])
            return tls

        def check_authz(tls: "TlsChannel", conn_log: Any) -> None:
            if not authz:
                return
            der = tls.sock.getpeercert(binary_form=True)
            if der is None:
                conn_log.warning("TLS authz denied: client sent no certificate")
                raise TlsRejected("no client certificate for --tls-authz")
            names = distinguished_names(der)
            if not any(_normalise_dn(n) in authz for n in names):
                conn_log.warning("TLS authz denied for %s", names[0])
                raise TlsRejected(f"client {names[0]} not in --tls-authz")
            conn_log.info("TLS authz allowed %s", names[0])

        return upgrade


class TlsChannel:
    """A :class:`Channel` over a non-blocking ``ssl.SSLSocket`` wrapped around the connection's socket.

    OpenSSL reads and writes the socket itself, so no encrypted byte is
    copied through Python (a MemoryBIO design spent a quarter of its time
    moving ciphertext: bench/README.md, TLS profile). Waiting uses the
    loop's reader/writer callbacks on the fd, which we own.
    """

    supports_sendfile = False

    def __init__(self, raw: SocketChannel, ctx: ssl.SSLContext) -> None:
        self.loop = raw.loop
        self.fd = raw.fd
        # The fd changes hands: its read registration goes with it.
        self.reads = raw.reads
        # wrap_socket takes over the fd: the plain socket object is detached.
        self.sock = ctx.wrap_socket(raw.sock, server_side=True, do_handshake_on_connect=False)
        self.sock.setblocking(False)
        #: The last receive could not go on before the socket took a write (SSLWantWriteError).
        self._read_wants_write = False

    async def _wait(self, for_write: bool) -> None:
        if for_write:
            await wait_writable(self.loop, self.fd)
        else:
            await self.reads.wait()

    async def handshake(self) -> None:
        while True:
            try:
                self.sock.do_handshake()
                return
            except ssl.SSLWantReadError:
                await self._wait(for_write=False)
            except ssl.SSLWantWriteError:
                await self._wait(for_write=True)
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                raise ChannelClosed("client closed during the TLS handshake") from None

    def recv_nowait(self, buf: memoryview) -> int | None:
        try:
            n = self.sock.recv_into(buf)
        except ssl.SSLWantReadError:
            self._read_wants_write = False
            return None
        except ssl.SSLWantWriteError:  # e.g. answering a TLS 1.3 key update
            self._read_wants_write = True
            return None
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            return 0
        except ssl.SSLError as exc:
            raise ConnectionResetError(f"TLS error while receiving: {exc}") from None
        # One call returns one record at most: take what is already buffered
        # too, so a large payload costs fewer trips through the loop.
        try:
            while n < len(buf) and self.sock.pending():
                n += self.sock.recv_into(buf[n:])
        except ssl.SSLError:
            pass  # the next call reports it; n bytes are good
        return n

    async def wait_readable(self) -> None:
        await self._wait(for_write=self._read_wants_write)

    async def sendall(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            try:
                n = self.sock.send(view)
            except ssl.SSLWantWriteError:
                await self._wait(for_write=True)
                continue
            except ssl.SSLWantReadError:
                # Only renegotiation makes a write wait for input, and it is
                # disabled; the reader task owns read readiness, so just retry soon.
                await asyncio.sleep(0.001)
                continue
            except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
                raise ChannelClosed("client closed the TLS connection") from None
            except ssl.SSLError as exc:
                raise ConnectionResetError(f"TLS error while sending: {exc}") from None
            view = view[n:]

    async def sendall_more(self, data: bytes | memoryview) -> None:
        await self.sendall(data)

    async def sendall_parts(self, parts: Sequence[Buffer]) -> None:
        # SSL writes take one buffer; a reply in one piece (READ data) is not copied.
        await self.sendall(parts[0] if len(parts) == 1 else b"".join(parts))

    def send_nowait(self, parts: Sequence[Buffer]) -> int:
        return 0  # TLS writes go through sendall (records, renegotiation waits)

    async def sendfile(self, fd: int, offset: int, count: int) -> int:
        data = os.pread(fd, count, offset)
        await self.sendall(data)
        return len(data)

    def close(self) -> None:
        self.reads.close()
        try:
            self.sock.unwrap()  # close_notify, best effort on a non-blocking socket
        except (ssl.SSLError, OSError, ValueError):
            pass
        try:
            self.sock.close()
        except OSError:
            pass
