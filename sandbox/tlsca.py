"""A throwaway certificate authority for the sandbox and the tests: a CA, server and
client certificates it signs, PEM files and ready ``ssl`` contexts. Never for production.

The certificates are made by the fleet CA's code (:mod:`dbservice.access.ca`); what is
the sandbox's own is a CA that lives in memory, server names that always include
localhost and the loopback addresses, certificates as PEM pairs written beside each other,
and contexts for servers that do not ask for a client certificate."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from bus.access import Identity
from dbservice.access.ca import (
    CertificateAuthority,
    PrivateKey,
    cert_pem,
    key_pem,
    mtls_client_context,
    mtls_server_context,
    new_key,
    write_private,
)

_LOOPBACK_NAMES = ("localhost",)
_LOOPBACK_IPS = ("127.0.0.1", "::1")
_DAY = 86400.0


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
        write_private(key_file, self.key_pem)
        return cert_file, key_file


def _issued(cert: x509.Certificate, key: PrivateKey) -> IssuedCert:
    return IssuedCert(cert_pem(cert).encode(), key_pem(key))


class TestCA:
    """A self-signed EC P-256 CA (the fleet CA's kind) that issues short-lived leaves."""

    __test__ = False  # not a pytest test class

    def __init__(self, authority: CertificateAuthority) -> None:
        self.authority = authority

    @classmethod
    def create(cls, common_name: str = "fleetgate test CA") -> TestCA:
        """A new CA with a fresh key."""
        return cls(CertificateAuthority.create(name=common_name))

    @property
    def key(self) -> PrivateKey:
        return self.authority.key

    @property
    def cert(self) -> x509.Certificate:
        return self.authority.cert

    @property
    def cert_pem(self) -> bytes:
        return self.authority.pem.encode()

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
        key = new_key()
        cert = self.authority.issue_server(
            key.public_key(),
            [*names, *ip_addresses],
            days * _DAY,
            common_name=common_name or names[0],
        )
        return _issued(cert, key)

    def issue_client_cert(self, common_name: str, *, days: int = 7) -> IssuedCert:
        """A TLS client certificate whose subject CN (and fleetgate user) is
        ``common_name``."""
        key = new_key()
        identity = Identity(user=common_name)
        return _issued(self.authority.issue_client(key.public_key(), identity, days * _DAY), key)

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
        if require_client_cert:
            return mtls_server_context(self.authority.pem, cert_file, key_file)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert_file, key_file)
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
        if cert is None:
            return ssl.create_default_context(cadata=self.authority.pem)
        if directory is None:
            raise ValueError("a client certificate needs a directory to write its files")
        return mtls_client_context(self.authority.pem, *cert.write(directory, stem))
