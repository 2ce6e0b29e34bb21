"""X.509 credentials for NBD over TLS, made with the ``cryptography`` package.

Directory layout is the one qemu's ``tls-creds-x509`` and libnbd's
``tls-certificates=DIR`` read: ``ca-cert.pem``, ``server-cert.pem``,
``server-key.pem`` for a server; ``ca-cert.pem``, ``client-cert.pem``,
``client-key.pem`` for a client. The CA's private key stays in its own file
(``ca-key.pem``) next to the server credentials and is never needed by a client.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

CA_CERT = "ca-cert.pem"
CA_KEY = "ca-key.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CLIENT_CERT = "client-cert.pem"
CLIENT_KEY = "client-key.pem"

DEFAULT_DAYS = 3650


def default_state_dir() -> Path:
    """Where ``--tls`` keeps generated credentials ($XDG_STATE_HOME/pynbd/tls)."""
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return Path(base) / "pynbd" / "tls"


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str, organization: str = "pynbd") -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _write_pem(path: Path, data: bytes, private: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass(frozen=True)
class CertificateAuthority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls, common_name: str = "pynbd CA", days: int = DEFAULT_DAYS) -> "CertificateAuthority":
        key = _new_key()
        now = datetime.datetime.now(datetime.timezone.utc)
        name = _name(common_name)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, directory: Path) -> "CertificateAuthority":
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
        key = serialization.load_pem_private_key((directory / CA_KEY).read_bytes(), password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cls(cert, key)

    def save(self, directory: Path) -> None:
        _write_pem(directory / CA_CERT, _cert_pem(self.cert), private=False)
        _write_pem(directory / CA_KEY, _key_pem(self.key), private=True)

    def issue(self, subject: x509.Name, *, server: bool, dns_names: list[str] = (),
              ip_addresses: list[str] = (), days: int = DEFAULT_DAYS,
              not_before: datetime.datetime | None = None) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = _new_key()
        now = datetime.datetime.now(datetime.timezone.utc)
        start = not_before or now - datetime.timedelta(minutes=5)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject).issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                         content_commitment=False, data_encipherment=False,
                                         key_agreement=True, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                           critical=False)
        )
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ip_addresses]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(self.key, hashes.SHA256()), key


def default_server_names() -> tuple[list[str], list[str]]:
    dns = ["localhost"]
    host = socket.gethostname()
    if host and host not in dns:
        dns.append(host)
    return dns, ["127.0.0.1", "::1"]


def write_server_creds(directory: Path, ca: CertificateAuthority, dns_names: list[str],
                       ip_addresses: list[str], days: int = DEFAULT_DAYS,
                       not_before: datetime.datetime | None = None) -> None:
    name = dns_names[0] if dns_names else (ip_addresses[0] if ip_addresses else "pynbd server")
    cert, key = ca.issue(_name(name), server=True, dns_names=dns_names, ip_addresses=ip_addresses,
                         days=days, not_before=not_before)
    _write_pem(directory / CA_CERT, _cert_pem(ca.cert), private=False)
    _write_pem(directory / SERVER_CERT, _cert_pem(cert), private=False)
    _write_pem(directory / SERVER_KEY, _key_pem(key), private=True)


def write_client_creds(directory: Path, ca: CertificateAuthority, common_name: str,
                       organization: str = "pynbd", days: int = DEFAULT_DAYS) -> x509.Name:
    subject = _name(common_name, organization)
    cert, key = ca.issue(subject, server=False, days=days)
    _write_pem(directory / CA_CERT, _cert_pem(ca.cert), private=False)
    _write_pem(directory / CLIENT_CERT, _cert_pem(cert), private=False)
    _write_pem(directory / CLIENT_KEY, _key_pem(key), private=True)
    return subject


@dataclass(frozen=True)
class GeneratedCreds:
    server_dir: Path
    client_dir: Path
    created: bool


def ensure_default_creds(state_dir: Path | None = None) -> GeneratedCreds:
    """Create (first use) or reuse the CA, server and client credentials of ``--tls``."""
    base = state_dir or default_state_dir()
    server_dir, client_dir = base / "server", base / "client"
    needed = [server_dir / CA_CERT, server_dir / CA_KEY, server_dir / SERVER_CERT, server_dir / SERVER_KEY,
              client_dir / CA_CERT, client_dir / CLIENT_CERT, client_dir / CLIENT_KEY]
    if all(p.exists() for p in needed):
        return GeneratedCreds(server_dir, client_dir, created=False)
    ca = CertificateAuthority.create()
    ca.save(server_dir)
    dns, ips = default_server_names()
    write_server_creds(server_dir, ca, dns, ips)
    write_client_creds(client_dir, ca, "pynbd client")
    return GeneratedCreds(server_dir, client_dir, created=True)


def distinguished_names(cert_der: bytes) -> tuple[str, str]:
    """A certificate subject as (natural order ``C=..,O=..,CN=..`` like gnutls/qemu, RFC 4514)."""
    cert = x509.load_der_x509_certificate(cert_der)
    rfc4514 = cert.subject.rfc4514_string()
    natural = ",".join(
        attr.rfc4514_string() for rdn in cert.subject.rdns for attr in rdn
    )
    return natural, rfc4514
