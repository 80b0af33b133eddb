"""Upstream TLS: Amazon's roots shipped in the package, contexts per mode, and the
one-line message when a database's certificate does not verify (against the stand-in)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from dbservice.upstream.tls import amazon_roots_pem, upstream_context, verify_failure
from sandbox.memorydb import StandinConfig, ThreadedStandin
from sandbox.tlsca import TestCA

pytestmark = pytest.mark.timeout(60)

NAME = "clustercfg.orders.abc123.memorydb.us-east-1.amazonaws.com"


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedStandin]:
    config = StandinConfig(dir=tmp_path_factory.mktemp("tls"), extra_dns_names=[NAME])
    with ThreadedStandin(config) as db:
        yield db


def test_amazon_roots_are_real_certificates() -> None:
    context = ssl.create_default_context(cadata=amazon_roots_pem())
    certs = context.get_ca_certs()
    names = sorted(dict(x[0] for x in c["subject"])["commonName"] for c in certs)
    assert names == [
        "Amazon Root CA 1",
        "Amazon Root CA 2",
        "Amazon Root CA 3",
        "Amazon Root CA 4",
        "Starfield Services Root Certificate Authority - G2",
    ]
    assert all(c["issuer"] == c["subject"] for c in certs)


def test_contexts_per_mode(tmp_path: Path) -> None:
    ca = TestCA.create("database CA")
    full = upstream_context("verify-full", ca_pem=ca.cert_pem.decode())
    assert full is not None and full.check_hostname and full.verify_mode == ssl.CERT_REQUIRED
    trusted = {dict(x[0] for x in c["subject"]).get("commonName") for c in full.get_ca_certs()}
    assert {"Amazon Root CA 1", "Amazon Root CA 4", "database CA"} <= trusted
    chain_only = upstream_context("verify-ca")
    assert chain_only is not None and not chain_only.check_hostname
    assert chain_only.verify_mode == ssl.CERT_REQUIRED
    insecure = upstream_context("insecure")
    assert insecure is not None and insecure.verify_mode == ssl.CERT_NONE
    assert upstream_context("disabled") is None
    with pytest.raises(ValueError, match="unknown TLS mode 'verify'"):
        upstream_context("verify")


async def handshake(db: ThreadedStandin, context: ssl.SSLContext, name: str) -> None:
    host, port = db.endpoint
    _, writer = await asyncio.wait_for(
        asyncio.open_connection(host, port, ssl=context, server_hostname=name), 10
    )
    writer.transport.abort()


async def test_unknown_ca_says_what_was_trusted(standin: ThreadedStandin) -> None:
    context = upstream_context("verify-full")
    assert context is not None
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        await handshake(standin, context, NAME)
    message = verify_failure(info.value, database="orders", mode="verify-full")
    assert message.startswith("cannot verify the TLS certificate of orders (")
    assert "trusting the system roots and Amazon's root CAs" in message
    assert "tls.ca_cert" in message and "verify-ca" in message and "\n" not in message


async def test_wrong_name_suggests_server_name_or_verify_ca(standin: ThreadedStandin) -> None:
    pem = standin.ca_pem.decode()
    context = upstream_context("verify-full", ca_pem=pem)
    assert context is not None
    await handshake(standin, context, NAME)
    with pytest.raises(ssl.SSLCertVerificationError) as info:
        await handshake(standin, context, "other.example.com")
    message = verify_failure(
        info.value, database="orders", mode="verify-full", ca_pem=pem, ca_file=Path("/etc/x.pem")
    )
    assert "upstream_ca_file /etc/x.pem and the database's tls.ca_cert" in message
    assert "tls.server_name" in message
    chain_only = upstream_context("verify-ca", ca_pem=pem)
    assert chain_only is not None
    await handshake(standin, chain_only, "other.example.com")
