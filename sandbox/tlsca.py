"""A throwaway certificate authority for the sandbox and the tests: a CA, server and
client certificates it signs, PEM files and ready ``ssl`` contexts. Never for production."""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_LOOPBACK_NAMES = ("localhost",)
_LOOPBACK_IPS = ("127.0.0.1", "::1")


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class IssuedCert:
    """A certificate and its private key, both PEM."""

    cert_pem: bytes
    key_pem: bytes

    def write(self, directory: str | Path, stem: str) -> tuple[Path, Path]:
        """Write ``<stem>.crt`` and ``<stem>.key`` (mode 0600) into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cert_file, key_file = directory / f"{stem}.crt", directory / f"{stem}.key"
        cert_file.write_bytes(self.cert_pem)
        key_file.touch(mode=0o600)
        key_file.write_bytes(self.key_pem)
        return cert_file, key_file


class TestCA:
    """A self-signed EC P-256 CA that issues short-lived leaf certificates."""

    __test__ = False  # not a pytest test class

    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.key = key
        self.cert = cert

    @classmethod
    def create(cls, common_name: str = "fleetgate test CA", days: int = 30) -> TestCA:
        """A new CA with a fresh key."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        now = datetime.now(UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def write(self, directory: str | Path, stem: str = "ca") -> Path:
        """Write the CA certificate (not its key) as ``<stem>.crt``; return its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{stem}.crt"
        path.write_bytes(self.cert_pem)
        return path

    def issue_server_cert(
        self,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = _LOOPBACK_IPS,
        *,
        common_name: str | None = None,
        days: int = 7,
    ) -> IssuedCert:
        """A TLS server certificate; the SAN always covers localhost, plus the given names."""
        names = list(dict.fromkeys([*dns_names, *_LOOPBACK_NAMES]))
        san: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        san += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        return self._issue(common_name or names[0], san, ExtendedKeyUsageOID.SERVER_AUTH, days=days)

    def issue_client_cert(
        self, common_name: str, *, dns_names: Sequence[str] = (), days: int = 7
    ) -> IssuedCert:
        """A TLS client certificate whose subject CN is ``common_name``."""
        san: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
        return self._issue(common_name, san, ExtendedKeyUsageOID.CLIENT_AUTH, days=days)

    def _issue(
        self,
        common_name: str,
        san: list[x509.GeneralName],
        usage: x509.ObjectIdentifier,
        *,
        days: int,
    ) -> IssuedCert:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return IssuedCert(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))

    def server_context(
        self,
        cert: IssuedCert,
        directory: str | Path,
        *,
        stem: str = "server",
        require_client_cert: bool = False,
    ) -> ssl.SSLContext:
        """A server-side context presenting ``cert`` (written into ``directory`` as
        ``<stem>.crt/.key``: ``ssl`` loads keys from files only); optionally demanding a
        client certificate signed by this CA."""
        cert_file, key_file = cert.write(directory, stem)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert_file, key_file)
        if require_client_cert:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cadata=self.cert_pem.decode())
        return context

    def client_context(
        self,
        cert: IssuedCert | None = None,
        directory: str | Path | None = None,
        *,
        stem: str = "client",
    ) -> ssl.SSLContext:
        """A client-side context trusting this CA, optionally presenting ``cert`` (written
        into ``directory`` as ``<stem>.crt/.key``)."""
        context = ssl.create_default_context(cadata=self.cert_pem.decode())
        if cert is not None:
            if directory is None:
                raise ValueError("a client certificate needs a directory to write its files")
            cert_file, key_file = cert.write(directory, stem)
            context.load_cert_chain(cert_file, key_file)
        return context
