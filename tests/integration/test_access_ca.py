"""The fleet CA: creation and publication, issuing, verifying, and real mTLS handshakes."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from bus import Bus
from bus.access import Identity, get_ca
from dbservice.access.ca import (
    CertificateAuthority,
    CertificateRejected,
    ClientVerifier,
    cert_pem,
    decode_identity,
    identity_from_ssl,
    key_pem,
    load_certs,
    mtls_client_context,
    mtls_server_context,
    new_key,
    verify_client_certificate,
)
from dbservice.auth.admin import AdminError, init_ca, sign_host, write_identity

ALICE = Identity(user="alice", roles=("dev", "ops"), db_users=("alice-rw",))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_init_creates_private_key_and_publishes_only_the_certificate(
    bus: Bus, tmp_path: Path
) -> None:
    ca_dir = tmp_path / "ca"
    result = await init_ca(bus, ca_dir)
    assert result.created
    assert mode(ca_dir) == 0o700
    assert mode(ca_dir / "ca.key") == 0o600
    assert mode(ca_dir / "ca.crt") == 0o644
    published = await get_ca(bus)
    assert published is not None
    assert "PRIVATE" not in published.pem
    assert published.pem == (ca_dir / "ca.crt").read_text()
    assert published.fingerprint == result.ca.fingerprint

    again = await init_ca(bus, ca_dir)  # idempotent: keeps the CA
    assert not again.created and again.ca.fingerprint == result.ca.fingerprint

    with pytest.raises(AdminError, match="already holds another CA"):
        await init_ca(bus, tmp_path / "other")
    assert not (tmp_path / "other" / "ca.key").exists()
    replaced = await init_ca(bus, tmp_path / "other", force=True)
    assert (await get_ca(bus)).fingerprint == replaced.ca.fingerprint  # type: ignore[union-attr]


def test_load_refuses_a_key_readable_by_others(tmp_path: Path) -> None:
    CertificateAuthority.create().save(tmp_path)
    (tmp_path / "ca.key").chmod(0o644)
    with pytest.raises(Exception, match="readable by others"):
        CertificateAuthority.load(tmp_path)


def test_issued_identity_round_trips_and_verifies() -> None:
    ca = CertificateAuthority.create()
    cert = ca.issue_client(new_key().public_key(), ALICE, 3600)
    ident = verify_client_certificate(cert, [ca.cert])
    assert (ident.user, ident.roles, ident.db_users, ident.kind) == (
        "alice",
        ("dev", "ops"),
        ("alice-rw",),
        "user",
    )
    assert ident.expires == cert.not_valid_after_utc
    assert decode_identity(cert) == ident
    # DER bytes as the TLS layer hands them over work the same
    from cryptography.hazmat.primitives.serialization import Encoding

    assert verify_client_certificate(cert.public_bytes(Encoding.DER), [ca.cert]).user == "alice"


def test_expired_and_other_ca_certificates_are_rejected() -> None:
    ca, other = CertificateAuthority.create(), CertificateAuthority.create()
    cert = ca.issue_client(new_key().public_key(), ALICE, 60)
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    with pytest.raises(CertificateRejected, match="expired"):
        verify_client_certificate(cert, [ca.cert], now=later)
    foreign = other.issue_client(new_key().public_key(), ALICE, 3600)
    with pytest.raises(CertificateRejected, match="not issued by this fleet's CA"):
        verify_client_certificate(foreign, [ca.cert])
    server = ca.issue_server(new_key().public_key(), ["agent-1"], 3600)
    with pytest.raises(CertificateRejected):
        verify_client_certificate(server, [ca.cert])
    # A CA bundle (rotation) trusts both.
    assert verify_client_certificate(foreign, [ca.cert, other.cert]).user == "alice"
    assert len(load_certs(ca.pem + other.pem)) == 2


def test_a_server_certificate_names_its_hosts_and_may_take_a_shorter_common_name() -> None:
    ca = CertificateAuthority.create()
    long_name = "clustercfg." + "a" * 40 + ".memorydb.us-east-1.amazonaws.com"  # > 64 chars
    cert = ca.issue_server(
        new_key().public_key(), [long_name, "127.0.0.1"], 3600, common_name="orders"
    )
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [long_name]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "orders"
    default = ca.issue_server(new_key().public_key(), ["agent-1"], 3600)
    assert default.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "agent-1"


def test_client_verifier_remembers_accepted_certificates_but_checks_dates() -> None:
    from cryptography.hazmat.primitives.serialization import Encoding

    ca, other = CertificateAuthority.create(), CertificateAuthority.create()
    der = ca.issue_client(new_key().public_key(), ALICE, 60).public_bytes(Encoding.DER)
    verifier = ClientVerifier([ca.cert], size=2)
    first = verifier.verify(der)
    assert first.user == "alice" and len(verifier) == 1
    assert verifier.verify(der) == first
    # Remembered, but expired now: refused with the usual reason, and forgotten.
    later = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
    with pytest.raises(CertificateRejected, match=r"expired at .*; log in again"):
        verifier.verify(der, now=later)
    assert len(verifier) == 0
    earlier = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    verifier.verify(der)
    with pytest.raises(CertificateRejected, match="not valid yet"):
        verifier.verify(der, now=earlier)
    # A verifier of another CA (a rotation) refuses what the first accepted.
    with pytest.raises(CertificateRejected, match="not issued by this fleet's CA"):
        ClientVerifier([other.cert]).verify(der)
    with pytest.raises(CertificateRejected, match="no fleet CA is known"):
        ClientVerifier([]).verify(der)
    # Refusals are not remembered; the accepted ones are bounded.
    foreign = other.issue_client(new_key().public_key(), ALICE, 60).public_bytes(Encoding.DER)
    for _ in range(2):
        with pytest.raises(CertificateRejected, match="not issued by this fleet's CA"):
            verifier.verify(foreign)
    for _ in range(3):
        verifier.verify(
            ca.issue_client(new_key().public_key(), ALICE, 60).public_bytes(Encoding.DER)
        )
    assert len(verifier) == 2


def test_client_verifier_refuses_a_remembered_certificate_once_its_ca_expires() -> None:
    # The CA's own dates count too (the chain is valid only while both are).
    ca = CertificateAuthority.create()
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.serialization import Encoding

    now = dt.datetime.now(dt.UTC)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca.cert.subject)
        .issuer_name(ca.cert.subject)
        .public_key(ca.key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(minutes=2))
    )
    for ext in ca.cert.extensions:
        ca_cert = ca_cert.add_extension(ext.value, critical=ext.critical)
    short_ca = CertificateAuthority(ca_cert.sign(ca.key, hashes.SHA256()), ca.key)
    der = short_ca.issue_client(new_key().public_key(), ALICE, 3600).public_bytes(Encoding.DER)
    verifier = ClientVerifier([short_ca.cert])
    assert verifier.verify(der).user == "alice"
    with pytest.raises(CertificateRejected, match="not issued by this fleet's CA"):
        verifier.verify(der, now=now + dt.timedelta(minutes=10))


async def _handshake(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    on_peer: Callable[[ssl.SSLObject], Awaitable[None]],
) -> bytes:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        await on_peer(ssl_object)
        writer.write(b"+OK\r\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=server_ctx)
    port = server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=client_ctx, server_hostname="127.0.0.1"),
            5,
        )
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return data
    finally:
        server.close()
        await server.wait_closed()


async def test_real_mutual_tls_learns_the_identity_and_refuses_strangers(tmp_path: Path) -> None:
    ca, other = CertificateAuthority.create(), CertificateAuthority.create()
    sign_host(ca, ["127.0.0.1", "localhost"], 3600, tmp_path / "agent")
    server_ctx = mtls_server_context(
        ca.pem, tmp_path / "agent/cert.pem", tmp_path / "agent/key.pem"
    )

    def client(issuer: CertificateAuthority, name: str, ttl: float = 3600) -> ssl.SSLContext:
        key = new_key()
        cert = issuer.issue_client(key.public_key(), ALICE, ttl)
        write_identity(tmp_path / name, key_pem(key), cert_pem(cert), ca.pem)
        return mtls_client_context(
            ca.pem, tmp_path / name / "cert.pem", tmp_path / name / "key.pem"
        )

    seen: list[Identity] = []

    async def learn(ssl_object: ssl.SSLObject) -> None:
        seen.append(identity_from_ssl(ssl_object, [ca.cert]))

    assert await _handshake(server_ctx, client(ca, "alice"), learn) == b"+OK\r\n"
    assert seen[0].user == "alice" and seen[0].roles == ("dev", "ops")

    async def refused(ctx: ssl.SSLContext) -> bool:
        try:
            data = await _handshake(server_ctx, ctx, learn)
        except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
            return True
        return data == b""  # TLS 1.3: the server's refusal can arrive as a closed stream

    assert await refused(client(other, "stranger"))
    assert await refused(client(ca, "expired", ttl=-30))
    assert await refused(ssl.create_default_context(cadata=ca.pem))  # no certificate
    assert len(seen) == 1
