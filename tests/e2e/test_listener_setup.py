"""The listener's setup: its config errors, no listener at all, the fleet CA arriving or
changing while the agent runs, a TLS upstream reached through a host alias, and a stop
that ends open sessions with their audit events."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from bus import Bus
from bus.audit import SessionEnd, SessionQuery, ensure_audit_stream
from bus.server import NatsServer
from dbservice.access.ca import CertificateAuthority
from dbservice.agent.app import Agent
from dbservice.agent.config import AgentConfig
from dbservice.auth.admin import init_ca, sign_host
from dbservice.route import RouteRefused
from fleetgate.config import ConfigError
from sandbox.memorydb import StandinConfig, ThreadedStandin
from tests.kits.agent import agent_config, running_agent, wait_until
from tests.kits.common import SAMPLE_NATS_CONF, sample_nats_passwords, subprocess_env
from tests.kits.listener import (
    APP_PASSWORD,
    Fleet,
    RawSession,
    add_acl_users,
    client,
    make_fleet,
    put_roles,
    static_db,
    wait_events,
)
from tests.kits.proxy import serve_single_node

pytestmark = pytest.mark.timeout(60)

NATS_CONF = SAMPLE_NATS_CONF
NATS_TEXT = NATS_CONF.read_text()
CFG_NAME = "clustercfg.standin.abc123.memorydb.us-east-1.amazonaws.com"


def listener_files(tmp: Path) -> dict[str, str]:
    ca = CertificateAuthority.create()
    sign_host(ca, ["127.0.0.1"], 3600, tmp / "tls")
    return {"cert_file": str(tmp / "tls" / "cert.pem"), "key_file": str(tmp / "tls" / "key.pem")}


def config_error(tmp: Path, listener: dict[str, Any]) -> str:
    body = agent_config(tmp, "a", listener=listener, databases=[static_db("x", 6379)])
    with pytest.raises(ValueError) as info:
        AgentConfig.model_validate(body)
    return str(info.value)


def test_listener_config_errors_name_the_field(tmp_path: Path) -> None:
    files = listener_files(tmp_path)
    missing = config_error(tmp_path, {**files, "cert_file": str(tmp_path / "nope.pem")})
    assert "db_service.listener.cert_file" in missing and "No such file" in missing
    swapped = config_error(
        tmp_path, {"cert_file": files["key_file"], "key_file": files["cert_file"]}
    )
    assert "holds no PEM certificate" in swapped
    other = listener_files(tmp_path / "other")
    mismatch = config_error(tmp_path, {**files, "key_file": other["key_file"]})
    assert "is not the key of" in mismatch and "fleetgate auth sign --host" in mismatch
    assert "key_file" in config_error(tmp_path, {"cert_file": files["cert_file"]})

    ca = CertificateAuthority.create()
    sign_host(ca, ["127.0.0.1"], -30, tmp_path / "old")
    expired = config_error(
        tmp_path,
        {
            "cert_file": str(tmp_path / "old" / "cert.pem"),
            "key_file": str(tmp_path / "old" / "key.pem"),
        },
    )
    assert "expired at" in expired and "fleetgate auth sign --host" in expired

    huge = config_error(tmp_path, {**files, "audit": {"max_arg_len": 65536, "max_args": 64}})
    assert "db_service.listener.audit" in huge
    assert "max_args x max_arg_len is 4194304 bytes" in huge and "lower one of them" in huge


def test_agent_run_reports_a_bad_listener_without_a_traceback(tmp_path: Path) -> None:
    body = agent_config(
        tmp_path,
        "a",
        listener={"cert_file": str(tmp_path / "missing.pem"), "key_file": "k.pem"},
        databases=[static_db("x", 6379)],
    )
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(body))
    done = subprocess.run(
        [sys.executable, "-m", "fleetgate", "agent", "run", "-c", str(path)],
        capture_output=True, text=True, env=subprocess_env(), timeout=30, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "db_service.listener.cert_file: cannot read" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def valkey_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    for node in serve_single_node(tmp_path_factory.mktemp("valkey"), setup=add_acl_users):
        yield node.port


async def test_without_listener_the_agent_only_announces(
    bus: Bus, nats_server: NatsServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    config = agent_config(tmp_path, "quiet", databases=[static_db("x", 6379)])
    async with running_agent(config, nats_server.url) as agent:
        assert agent.listener is None
    assert "this agent accepts no clients" in caplog.text


async def test_fleet_ca_published_or_changed_while_running(
    bus: Bus, nats_server: NatsServer, tmp_path: Path, valkey_port: int
) -> None:
    # The agent starts before `auth init`: clients are told why they are refused.
    early = CertificateAuthority.create()
    fleet = Fleet(bus, early, tmp_path, nats_server.url)
    await ensure_audit_stream(bus)
    config = fleet.agent("agent-1", [static_db("dev-cache", valkey_port, env="dev")])
    alice_early = fleet.identity("alice", ["dev"])
    async with running_agent(config, nats_server.url) as agent:
        assert agent.listener is not None
        port = agent.listener.port
        with pytest.raises(RouteRefused) as info:
            await RawSession.open(port, alice_early, early.pem, "dev-cache", "app")
        assert info.value.reason == "this agent knows no fleet CA yet: run fleetgate auth init"

        # auth init publishes a CA (another key than the agent's server certificate's
        # issuer here, so clients trust the agent through the first CA).
        published = (await init_ca(bus, tmp_path / "ca")).ca
        await put_roles(bus)
        alice = fleet.identity("alice", ["dev"], ca=published)

        async def accepted() -> bool:
            try:
                session = await RawSession.open(port, alice, early.pem, "dev-cache", "app")
            except RouteRefused:
                return False
            session.close()
            return True

        await wait_until(accepted, 15, "the published CA to be trusted")
        # Certificates of a CA that is no longer the fleet's are refused at once.
        with pytest.raises((RouteRefused, OSError)):
            session = await RawSession.open(port, alice_early, early.pem, "dev-cache", "app")
            session.close()

        # A rotation: the registry holds the new CA; the next connection uses it.
        rotated = (await init_ca(bus, tmp_path / "ca2", force=True)).ca
        bob = fleet.identity("bob", ["dev"], ca=rotated)

        async def rotated_in() -> bool:
            try:
                session = await RawSession.open(port, bob, early.pem, "dev-cache", "app")
            except (RouteRefused, OSError):
                return False
            session.close()
            return True

        await wait_until(rotated_in, 10, "the rotated CA to be trusted")


async def test_tls_upstream_through_a_host_alias_as_default(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    fleet = await make_fleet(bus, tmp_path, nats_server.url)
    standin_config = StandinConfig(dir=tmp_path / "standin", extra_dns_names=[CFG_NAME])
    with ThreadedStandin(standin_config) as standin:
        host, port = standin.endpoint
        ca_file = tmp_path / "standin-ca.pem"
        ca_file.write_bytes(standin.ca_pem)
        database = {
            "name": "standin",
            "uri": f"{CFG_NAME}:6379",
            "static_labels": {"env": "standin"},
            "tls": {"mode": "verify-full", "ca_file": str(ca_file)},
        }
        untrusted = {**database, "name": "standin-untrusted", "tls": {"mode": "verify-full"}}
        config = fleet.agent(
            "agent-1", [database, untrusted], host_aliases={f"{CFG_NAME}:6379": f"{host}:{port}"}
        )
        carol = fleet.identity("carol", ["cache"])
        async with running_agent(config, nats_server.url) as agent:
            assert agent.listener is not None
            r = client(agent.listener.port, carol, "standin", "default")
            async with r:
                assert await r.set("over-tls", "yes")
                assert await r.get("over-tls") == b"yes"
                assert await r.acl_whoami() in ("default", b"default")
            with pytest.raises(RouteRefused) as info:
                await RawSession.open(
                    agent.listener.port, carol, fleet.ca.pem, "standin-untrusted", "default"
                )
            assert info.value.reason.startswith(
                "cannot reach standin-untrusted: TLS: certificate not trusted: "
            )


async def test_stop_ends_open_sessions_with_their_audit(
    bus: Bus, nats_server: NatsServer, tmp_path: Path, valkey_port: int
) -> None:
    fleet = await make_fleet(bus, tmp_path, nats_server.url)
    config = fleet.agent("agent-1", [static_db("dev-cache", valkey_port, env="dev")])
    alice = fleet.identity("alice", ["dev"])
    async with running_agent(config, nats_server.url) as agent:
        assert agent.listener is not None
        r = client(
            agent.listener.port, alice, "dev-cache", "app", username="app", password=APP_PASSWORD
        )
        await r.set("k", "v")
    ended = await wait_events(bus, 1, "session end", type="db.session.end")
    assert isinstance(ended[0], SessionEnd)
    assert ended[0].commands >= 2 and ended[0].reason in (
        "stopped",
        "client closed",
        "server closed",
    )
    await r.aclose()


async def test_listener_works_with_only_the_agent_users_nats_rights(
    tmp_path: Path, valkey_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """deploy/nats/nats-server.conf: the agent reads the CA and roles, creates the audit
    stream and publishes to it; an auditor reads the events back."""
    conf = NATS_CONF
    sample_nats_passwords(monkeypatch)
    server = NatsServer(tmp_path / "secured", config_file=conf).start()
    try:
        url = f"nats://{{}}:pw-{{}}@127.0.0.1:{server.port}".format
        admin = await Bus.connect(url("admin", "admin"), name="admin")
        await admin.provision()
        fleet = Fleet(admin, (await init_ca(admin, tmp_path / "ca")).ca, tmp_path, "")
        await put_roles(admin)
        await admin.close()
        config = fleet.agent("agent-1", [static_db("dev-cache", valkey_port, env="dev")])
        alice = fleet.identity("alice", ["dev"])
        async with running_agent(config, url("agent", "agent")) as agent:
            assert agent.listener is not None
            r = client(
                agent.listener.port, alice, "dev-cache", "app",
                username="app", password=APP_PASSWORD,
            )  # fmt: skip
            async with r:
                assert await r.set("permitted", "yes")
                assert await r.get("permitted") == b"yes"
        auditor = await Bus.connect(url("auditor", "auditor"), name="auditor")
        try:
            ends = await wait_events(auditor, 1, "session end", type="db.session.end")
            assert ends[0].user == "alice"
        finally:
            await auditor.close()
    finally:
        server.stop()


async def test_renewed_server_certificate_applies_to_the_next_connection(
    bus: Bus, nats_server: NatsServer, tmp_path: Path, valkey_port: int
) -> None:
    fleet = await make_fleet(bus, tmp_path, nats_server.url)
    config = fleet.agent("agent-1", [static_db("dev-cache", valkey_port, env="dev")])
    alice = fleet.identity("alice", ["dev"])

    async def served_certificate(port: int) -> bytes:
        session = await RawSession.open(port, alice, fleet.ca.pem, "dev-cache", "app")
        try:
            der = session.writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        finally:
            session.close()
        assert isinstance(der, bytes)
        return der

    async with running_agent(config, nats_server.url) as agent:
        assert agent.listener is not None
        port = agent.listener.port
        before = await served_certificate(port)
        await asyncio.sleep(0.01)  # a new mtime even on coarse clocks
        sign_host(fleet.ca, ["127.0.0.1"], 7200, tmp_path / "agent-1-tls")
        renewed = x509.load_pem_x509_certificate(
            (tmp_path / "agent-1-tls" / "cert.pem").read_bytes()
        )
        after = await served_certificate(port)
        assert after != before
        assert after == renewed.public_bytes(serialization.Encoding.DER)


async def test_listen_address_in_use_is_a_config_error(
    bus: Bus, nats_server: NatsServer, tmp_path: Path
) -> None:
    fleet = await make_fleet(bus, tmp_path, nats_server.url)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = fleet.agent("agent-1", [static_db("dev-cache", 6379, env="dev")])
        config["db_service"]["listen_addr"] = f"127.0.0.1:{taken.getsockname()[1]}"
        agent = Agent(AgentConfig.model_validate(config), nats_url=nats_server.url)
        with pytest.raises(ConfigError) as info:
            await asyncio.wait_for(agent.run(asyncio.Event()), 15)
    assert "db_service.listen_addr 127.0.0.1:" in str(info.value)
    assert "cannot listen (Address already in use)" in str(info.value)


async def test_idle_sessions_close_and_audit_redaction(
    bus: Bus, nats_server: NatsServer, tmp_path: Path, valkey_port: int
) -> None:
    fleet = await make_fleet(bus, tmp_path, nats_server.url)
    config = fleet.agent("agent-1", [static_db("dev-cache", valkey_port, env="dev")])
    config["db_service"]["listener"] |= {
        "idle_timeout": "300ms",
        "audit": {"redact_values": True, "max_arg_len": 8},
    }
    alice = fleet.identity("alice", ["dev"])
    async with running_agent(config, nats_server.url) as agent:
        assert agent.listener is not None
        s = await RawSession.open(agent.listener.port, alice, fleet.ca.pem, "dev-cache", "app")
        try:
            assert await s.call("AUTH", "app", APP_PASSWORD) == b"+OK"
            assert await s.call("SET", "a-rather-long-key", "secret value") == b"+OK"
            assert await asyncio.wait_for(s.reader.read(), 5) == b""  # closed when idle
        finally:
            s.close()
    ends = await wait_events(bus, 1, "session end", type="db.session.end")
    assert ends[0].reason == "idle"
    sets = await wait_events(bus, 1, "SET", type="db.session.query", command="SET")
    assert isinstance(sets[0], SessionQuery)
    assert sets[0].args == ("a-rather…(+9 bytes)", "<12 bytes>")
