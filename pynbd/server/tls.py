"""TLS for NBD (STARTTLS, nbd-protocol.md §2) over the connection's own socket.

The connection owns a plain socket (for sendfile), so TLS runs through an
``ssl.SSLObject`` with memory BIOs: the same thing asyncio's TLS transport
does inside, but behind our :class:`~pynbd.server.channel.Channel` interface,
so the request pipeline (requests in flight, out-of-order replies) is the same
with and without TLS. TLS cannot use sendfile (design-notes.md §3): the TLS
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
from pynbd.server.channel import ChannelClosed, SocketChannel

log = logging.getLogger(__name__)

_RECORD = 64 * 1024


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
        ctx.options |= ssl.OP_NO_COMPRESSION
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
            except (ssl.SSLError, ChannelClosed, ConnectionError) as exc:
                conn_log.warning("TLS handshake failed: %s", exc)
                raise TlsRejected(f"TLS handshake failed: {exc}") from None
            if authz:
                der = tls.sslobj.getpeercert(binary_form=True)
                if der is None:
                    conn_log.warning("TLS authz denied: client sent no certificate")
                    raise TlsRejected("no client certificate for --tls-authz")
                names = distinguished_names(der)
                if not any(_normalise_dn(n) in authz for n in names):
                    conn_log.warning("TLS authz denied for %s", names[0])
                    raise TlsRejected(f"client {names[0]} not in --tls-authz")
                conn_log.info("TLS authz allowed %s", names[0])
            conn_log.info("TLS %s, cipher %s", tls.sslobj.version(), tls.sslobj.cipher()[0])
            return tls

        return upgrade


class TlsChannel:
    """A :class:`Channel` that encrypts through an SSLObject over a plain socket channel."""

    supports_sendfile = False
    auto_zero_copy = False

    def __init__(self, raw: SocketChannel, ctx: ssl.SSLContext) -> None:
        self.raw = raw
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.sslobj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self._send_lock = asyncio.Lock()
        self._recv_buf = bytearray(_RECORD)

    async def _flush(self) -> None:
        # Raw writes keep BIO order: whoever holds the lock sends everything pending.
        async with self._send_lock:
            data = self.outgoing.read()
            if data:
                await self.raw.sendall(data)

    async def _pull(self) -> None:
        n = await self.raw.recv_into(memoryview(self._recv_buf))
        if n == 0:
            self.incoming.write_eof()
        else:
            self.incoming.write(memoryview(self._recv_buf)[:n])

    async def handshake(self) -> None:
        while True:
            try:
                self.sslobj.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                if self.incoming.eof:
                    raise ChannelClosed("client closed during the TLS handshake") from None
                await self._pull()
                continue
            await self._flush()
            return

    async def recv_into(self, buf: memoryview) -> int:
        while True:
            try:
                n = self.sslobj.read(len(buf), buf)
            except ssl.SSLWantReadError:
                if self.outgoing.pending:
                    await self._flush()
                if self.incoming.eof:
                    return 0
                await self._pull()
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return 0
            if self.outgoing.pending:
                await self._flush()  # e.g. TLS 1.3 key update answers
            return n

    async def sendall(self, data: bytes | memoryview) -> None:
        await self.sendall_more(data)
        await self._flush()

    async def sendall_more(self, data: bytes | memoryview) -> None:
        # Encrypted records wait in the BIO until sendall (every reply ends with
        # one) or until enough is pending to be worth a send.
        view = memoryview(data)
        while view:
            n = self.sslobj.write(view[:_RECORD * 4])
            view = view[n:]
            if self.outgoing.pending > _RECORD * 4:
                await self._flush()

    async def sendfile(self, fd: int, offset: int, count: int) -> int:
        data = os.pread(fd, count, offset)
        await self.sendall(data)
        return len(data)

    def close(self) -> None:
        try:
            self.sslobj.unwrap()
        except (ssl.SSLError, ValueError):
            pass
        pending = self.outgoing.read()
        if pending:
            try:
                self.raw.sock.send(pending)  # best effort close_notify
            except OSError:
                pass
        self.raw.close()
