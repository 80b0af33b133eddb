"""Agents join with a one-time token and renew their own certificates: a real auth
service over HTTPS, real NATS, a real valkey-server behind the agent, redis-py clients
over mutual TLS verifying the agent against the fleet CA."""

from __future__ import annotations

import asyncio
import json
import ssl
import stat
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from prometheus_client.parser import text_string_to_metric_families

from bus import Bus, joins, subjects
from bus.audit import Login, read_events
from bus.schemas import utcnow
from dbservice.access.audit import AuditEmitter
from dbservice.access.ca import agent_host_id, make_csr, new_key
from dbservice.agent.app import Agent
from dbservice.agent.config import AgentConfig
from dbservice.agent.join import JoinRefused
from dbservice.auth.service import AuthConfig, RunningService, start_service
from fleetgate.config import ConfigError
from sandbox.ports import free_port
from sandbox.valkeynode import ValkeyNode
from tests.kits.agent import agent_config, running_agent, wait_until
from tests.kits.listener import APP_PASSWORD, Fleet, client, static_db

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def cert_ttl() -> str:
    return "1h"


@pytest.fixture
async def auth(fleet: Fleet, cert_ttl: str) -> AsyncIterator[RunningService]:
    config = AuthConfig.model_validate({
        "listen": "127.0.0.1:0", "ca_dir": str(fleet.tmp / "ca"), "host_id": "auth-1",
        "join": {"cert_ttl": cert_ttl}, "rate_limit": {"per_address": 12, "window": "1m"},
    })  # fmt: skip
    await fleet.bus.provision(joins.TOKENS, joins.AGENTS)
    emitter = AuditEmitter.for_bus(fleet.bus, host_id="auth-1")
    emitter.start()
    service = await start_service(config, bus=fleet.bus, ca=fleet.ca, audit=emitter)
    try:
        yield service
    finally:
        await service.close()
        await emitter.aclose()


async def add_token(bus: Bus, *, ttl: float = 3600, **labels: str) -> str:
    text, record = joins.new_token(ttl=ttl, labels=labels, creator="tests")
    await joins.add_token(bus, record)
    return text


def joining_agent(
    fleet: Fleet, auth: RunningService, token: str, valkey: ValkeyNode, name: str = "agent-1"
) -> dict[str, Any]:
    token_file = fleet.tmp / f"{name}-token"
    token_file.write_text(token + "\n")
    return agent_config(
        fleet.tmp,
        name,
        listen_addr=f"127.0.0.1:{free_port()}",
        listener={},
        join={
            "auth": f"127.0.0.1:{auth.port}",
            "token_file": str(token_file),
            "ca_file": str(fleet.tmp / "ca" / "ca.crt"),
        },
        databases=[static_db("dev-cache", valkey.port, env="dev")],
    )


async def post_join(auth: RunningService, fleet: Fleet, **body: Any) -> tuple[int, dict[str, Any]]:
    request = {
        "method": "token",
        "csr": make_csr(new_key(), "x"),
        "host_id": str(uuid.uuid4()),
        "hostname": "agent-x",
        "addr": "127.0.0.1:6390",
        **body,
    }
    tls = ssl.create_default_context(cadata=fleet.ca.pem)
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"https://127.0.0.1:{auth.port}/v1/join", json=request, ssl=tls) as resp,
    ):
        return resp.status, await resp.json()


async def served_certificate(port: int, fleet: Fleet, identity: Path) -> x509.Certificate:
    """The certificate the agent presents to a new connection, verified against the
    fleet CA with the host name checked."""
    context = ssl.create_default_context(cadata=fleet.ca.pem)
    context.load_cert_chain(identity / "cert.pem", identity / "key.pem")
    _, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname="127.0.0.1"), 10
    )
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(binary_form=True)
    finally:
        writer.close()
    assert der is not None
    return x509.load_der_x509_certificate(der)


async def test_an_agent_joins_with_a_token_and_clients_reach_it(
    fleet: Fleet, auth: RunningService, valkey: ValkeyNode
) -> None:
    token = await add_token(fleet.bus, team="payments")
    config = joining_agent(fleet, auth, token, valkey)
    alice = fleet.identity("alice", ["dev"])
    async with running_agent(config, fleet.nats_url) as agent:
        assert agent.listener is not None and agent.identity is not None
        port = agent.listener.port
        r = client(port, alice, "dev-cache", "app", username="app", password=APP_PASSWORD,
                   ssl_check_hostname=True)  # fmt: skip
        async with r:
            assert await r.set("joined", "yes")
            assert await r.get("joined") == b"yes"
        served = await served_certificate(port, fleet, alice)
        host_id = agent.identity.host_id
        assert agent_host_id(served) == host_id
        life = served.not_valid_after_utc - served.not_valid_before_utc
        assert life <= timedelta(hours=1, minutes=2)
        # the key stays with the agent: one file, owner only
        data_dir = fleet.tmp / "agent-1"
        pem = data_dir / "agent.pem"
        assert stat.S_IMODE(pem.stat().st_mode) == 0o600
        assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
        # the token is spent by this agent, and the agent recorded with its labels
        found = await joins.get_token(fleet.bus, token.split(".")[0])
        assert found is not None and found.record.spent_by == host_id
        record = await joins.get_agent(fleet.bus, host_id)
        assert record is not None
        assert record.record.labels == {"team": "payments"}
        assert record.record.serial == format(served.serial_number, "x")
        # the heartbeat says when the certificate expires
        servers = await fleet.bus.list_db_servers()
        assert servers and servers[0].cert_expires == served.not_valid_after_utc
    # a restart keeps its certificate: no token needed (it is spent)
    async with running_agent(config, fleet.nats_url) as agent:
        assert agent.listener is not None
        again = await served_certificate(agent.listener.port, fleet, alice)
        assert again.serial_number == served.serial_number


async def test_a_spent_expired_unknown_or_malformed_token_is_refused_saying_why(
    fleet: Fleet, auth: RunningService, valkey: ValkeyNode
) -> None:
    token = await add_token(fleet.bus)
    status, _ = await post_join(auth, fleet, token=token)
    assert status == 200
    status, answer = await post_join(auth, fleet, token=token)
    assert status == 401 and "already used" in answer["error"]
    expired = await add_token(fleet.bus, ttl=0.001)
    await asyncio.sleep(0.01)
    status, answer = await post_join(auth, fleet, token=expired)
    assert status == 401 and "expired at" in answer["error"]
    unknown = "0123456789abcdef." + "x" * 32
    status, answer = await post_join(auth, fleet, token=unknown)
    assert status == 401 and "unknown join token 0123456789abcdef" in answer["error"]
    # the right id with a wrong secret reads as unknown, and spends nothing
    fresh = await add_token(fleet.bus)
    status, answer = await post_join(auth, fleet, token=fresh.split(".")[0] + "." + "y" * 32)
    assert status == 401 and "unknown join token" in answer["error"]
    status, _ = await post_join(auth, fleet, token=fresh)
    assert status == 200
    status, answer = await post_join(auth, fleet, token="nonsense")
    assert status == 400 and answer["error"].startswith("token: not a join token")
    status, answer = await post_join(auth, fleet, method="kerberos", token=fresh)
    assert status == 400 and "join method 'kerberos' is not known here" in answer["error"]
    status, answer = await post_join(auth, fleet, token=fresh, addr="0.0.0.0:6390")
    assert status == 400 and answer["error"].startswith("addr:")
    # no agent gets a certificate for the auth service's own names
    status, answer = await post_join(auth, fleet, token=fresh, hostname="LocalHost")
    assert status == 403 and "LocalHost is a name of the auth service" in answer["error"]
    # the agent's own start says the same, as a config error naming the field
    config = joining_agent(fleet, auth, token, valkey, name="agent-2")
    agent = Agent(AgentConfig.model_validate(config), nats_url=fleet.nats_url)
    with pytest.raises(
        ConfigError, match=r"db_service.join: .* refused: join token .* already used"
    ):
        await agent.run(asyncio.Event())


async def test_two_joins_racing_with_one_token_one_wins(fleet: Fleet, auth: RunningService) -> None:
    for _ in range(2):  # (6 failures: under the per-address limit)
        token = await add_token(fleet.bus)
        results = await asyncio.gather(*(post_join(auth, fleet, token=token) for _ in range(4)))
        statuses = sorted(status for status, _ in results)
        assert statuses == [200, 401, 401, 401], results


@pytest.mark.parametrize("cert_ttl", ["6s"])
async def test_renewal_happens_without_a_client_noticing(
    fleet: Fleet, auth: RunningService, valkey: ValkeyNode, cert_ttl: str
) -> None:
    token = await add_token(fleet.bus)
    config = joining_agent(fleet, auth, token, valkey)
    alice = fleet.identity("alice", ["dev"])
    async with running_agent(config, fleet.nats_url) as agent:
        assert agent.listener is not None and agent.renewer is not None
        port = agent.listener.port
        first = await served_certificate(port, fleet, alice)
        r = client(port, alice, "dev-cache", "app", username="app", password=APP_PASSWORD)
        async with r:
            assert await r.set("k", "1")
            renewer = agent.renewer
            await wait_until(lambda: renewer.renewals >= 2, 20, "two renewals")
            # the session opened before the renewals still works (same connection)
            assert await r.incr("k") == 2
            assert len(r.connection_pool._available_connections) == 1
        second = await served_certificate(port, fleet, alice)
        assert second.serial_number != first.serial_number
        assert second.not_valid_after_utc > first.not_valid_after_utc
        assert agent_host_id(second) == agent_host_id(first)
        # past the first certificate's expiry, new sessions still verify
        await wait_until(lambda: utcnow() > first.not_valid_after_utc, 10, "first expiry")
        r = client(port, alice, "dev-cache", "app", username="app", password=APP_PASSWORD)
        async with r:
            assert await r.get("k") == b"2"
        assert renewer.status.error == ""


@pytest.mark.parametrize("cert_ttl", ["6s"])
async def test_a_removed_agent_or_token_cannot_renew(
    fleet: Fleet, auth: RunningService, valkey: ValkeyNode, cert_ttl: str
) -> None:
    token = await add_token(fleet.bus)
    config = joining_agent(fleet, auth, token, valkey)
    diag = free_port()
    config["db_service"]["diag_addr"] = f"127.0.0.1:{diag}"
    async with running_agent(config, fleet.nats_url) as agent:
        renewer = agent.renewer
        assert renewer is not None and agent.identity is not None
        await renewer.renew()  # renewing works while the agent is recorded
        host_id = agent.identity.host_id
        assert await joins.delete_agent(fleet.bus, host_id)
        with pytest.raises(JoinRefused, match=r"was removed \(fleetgate agents rm\)") as refused:
            await renewer.renew()
        assert refused.value.status == 403
        # its own renewals fail loudly, and the heartbeats say so (fleetgate db servers)
        await wait_until(lambda: "was removed" in renewer.status.error, 15, "a failed renewal")

        async def heartbeat_says() -> bool:
            servers = await fleet.bus.list_db_servers()
            return bool(servers) and "was removed" in servers[0].cert_error

        await wait_until(heartbeat_says, 10, "the renewal error in the heartbeat")
        # ... and its metrics (fleetgate_agent_certificate_*)
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{diag}/metrics") as resp,
        ):
            scraped = {
                s.name: s.value
                for family in text_string_to_metric_families(await resp.text())
                for s in family.samples
            }
        assert scraped["fleetgate_agent_certificate_renewal_failures_total"] >= 1
        assert renewer.status.expires is not None
        expires = renewer.status.expires.timestamp()
        assert scraped["fleetgate_agent_certificate_expiry_timestamp_seconds"] == expires
    # the same for the token it joined with
    token = await add_token(fleet.bus)
    config = joining_agent(fleet, auth, token, valkey, name="agent-2")
    async with running_agent(config, fleet.nats_url) as agent:
        renewer = agent.renewer
        assert renewer is not None
        assert await joins.delete_token(fleet.bus, token.split(".")[0])
        with pytest.raises(JoinRefused, match=r"join token .* was removed"):
            await renewer.renew()


async def test_renewal_needs_the_agents_certificate(fleet: Fleet, auth: RunningService) -> None:
    tls = ssl.create_default_context(cadata=fleet.ca.pem)
    alice = fleet.identity("alice", ["dev"])
    tls.load_cert_chain(alice / "cert.pem", alice / "key.pem")
    body = json.dumps({"csr": make_csr(new_key(), "x")})
    async with aiohttp.ClientSession() as http:
        for context in (ssl.create_default_context(cadata=fleet.ca.pem), tls):
            async with http.post(
                f"https://127.0.0.1:{auth.port}/v1/renew", data=body, ssl=context
            ) as resp:
                assert resp.status == 401
                assert "agent" in (await resp.json())["error"]


async def test_failed_joins_are_rate_limited_per_address_and_audited(
    fleet: Fleet, auth: RunningService
) -> None:
    token = await add_token(fleet.bus)
    for _ in range(12):
        status, _ = await post_join(auth, fleet, token="0123456789abcdef." + "x" * 32)
        assert status == 401
    # past the limit even a good token waits (and is not spent)
    status, answer = await post_join(auth, fleet, token=token)
    assert status == 429 and "too many failed joins" in answer["error"]
    found = await joins.get_token(fleet.bus, token.split(".")[0])
    assert found is not None and found.record.spent is None
    await auth.service.audit.flush(5)
    subject = subjects.audit_filter("auth.login")
    events = [e async for e in read_events(fleet.bus, subject=subject)]
    assert len(events) == 13
    assert all(isinstance(e, Login) and not e.success and e.method == "join" for e in events)
