"""The agent's diagnostics listener (``db_service.diag_addr``): a real agent, real NATS,
real valkey-server and TLS clients; ``/metrics`` scraped over HTTP after a known
workload shows exactly what happened; ``/readyz`` and ``/healthz`` answer for a person."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bus.server import NatsServer
from dbservice.agent.app import Agent
from dbservice.agent.config import AgentConfig
from dbservice.route import RouteRefused
from fleetgate.config import ConfigError
from sandbox.ports import free_port
from sandbox.valkeynode import ValkeyNode
from tests.kits.agent import running_agent, wait_until
from tests.kits.connect import resource
from tests.kits.listener import (
    APP_PASSWORD,
    Fleet,
    RawSession,
    static_db,
)

pytestmark = pytest.mark.timeout(90)


async def get(port: int, path: str) -> tuple[int, str]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(10)) as resp,
    ):
        return resp.status, await resp.text()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape: (name, sorted labels) -> value."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_count_sessions_commands_and_refusals(
    fleet: Fleet, valkey: ValkeyNode
) -> None:
    diag = free_port()
    config = fleet.agent(
        "agent-1",
        [
            static_db("dev-cache", valkey.port, env="dev"),
            static_db("dev-down", free_port(), env="dev"),
        ],
        diag_addr=f"127.0.0.1:{diag}",
        health_check={"interval": "1s", "timeout": "1s", "healthy_threshold": 1},
    )
    alice = fleet.identity("alice", ["dev"])
    await fleet.bus.put_resource(resource("elsewhere", env="prod"))  # watched, not served
    async with running_agent(config, fleet.nats_url) as agent:
        listener = agent.listener
        assert listener is not None
        status, body = await get(diag, "/readyz")
        assert status == 200, body
        assert "ready" in body and "registry" in body
        status, body = await get(diag, "/healthz")
        assert status == 200 and "alive" in body

        sessions, per_session = 3, 4  # AUTH + 3 SETs each
        for n in range(sessions):
            session = await RawSession.open(listener.port, alice, fleet.ca.pem, "dev-cache", "app")
            try:
                assert await session.call("AUTH", "app", APP_PASSWORD) == b"+OK"
                for i in range(per_session - 1):
                    assert await session.call("SET", f"k{n}{i}", "v") == b"+OK"
                # refused by the role (FLUSHALL is denied): counted as refused, not forwarded
                assert (await session.call("FLUSHALL")).startswith(b"-NOPERM")
            finally:
                session.close()
        await wait_until(lambda: listener.established == 0, 10, "sessions ended")
        with pytest.raises(RouteRefused):
            await RawSession.open(listener.port, alice, fleet.ca.pem, "no-such-db", "app")
        with pytest.raises(RouteRefused, match="cannot reach dev-down"):
            await RawSession.open(listener.port, alice, fleet.ca.pem, "dev-down", "app")

        status, text = await get(diag, "/metrics")
        assert status == 200
        got = samples(text)
        db = (("database", "dev-cache"),)
        assert got[("fleetgate_agent_sessions_opened_total", db)] == sessions
        assert got[("fleetgate_agent_commands_forwarded_total", db)] == sessions * per_session
        assert got[("fleetgate_agent_commands_refused_total", db)] == sessions
        refused = (("reason", "unknown_database"),)
        assert got[("fleetgate_agent_sessions_refused_total", refused)] == 1
        assert got[("fleetgate_agent_sessions_refused_total", (("reason", "upstream"),))] == 1
        assert got[("fleetgate_agent_upstream_failures_total", (("kind", "connect"),))] == 1
        assert got[("fleetgate_agent_sessions_refused_total", (("reason", "access_denied"),))] == 0
        assert got[("fleetgate_agent_session_duration_seconds_count", ())] == sessions
        assert got[("fleetgate_agent_upstream_connect_seconds_count", ())] == sessions
        assert got[("fleetgate_agent_sessions_active", ())] == 0
        assert got[("fleetgate_agent_databases_served", ())] == 2
        assert got[("fleetgate_agent_registry_entries_watched", ())] == 1
        assert got[("fleetgate_agent_bytes_total", (("direction", "to_db"),))] > 0
        assert ("fleetgate_event_loop_lag_seconds", ()) in got
        assert got[("fleetgate_agent_heartbeats_written_total", ())] >= 1
        assert 0 <= got[("fleetgate_agent_heartbeat_age_seconds", ())] < 60
        assert got[("fleetgate_agent_iam_tokens_signed_total", ())] == 0  # password logins
        assert got[("fleetgate_agent_upstream_failures_total", (("kind", "tls"),))] == 0
        # the refused session's start and every session's start/end/queries get published
        await wait_until(lambda: listener.audit.published_total > 0, 10, "audit events published")

        async def health() -> dict[str, float]:
            scraped = samples((await get(diag, "/metrics"))[1])
            name = "fleetgate_agent_database_healthy"
            return {dict(k)["database"]: v for (n, k), v in scraped.items() if n == name}

        async def both_known() -> bool:
            return await health() == {"dev-cache": 1.0, "dev-down": 0.0}

        await wait_until(both_known, 15, "health per database")
        # no key, argument or user name is a label value anywhere
        assert "k00" not in text and "alice" not in text


async def test_readyz_is_503_until_nats_is_up_and_the_registry_synced(
    tmp_path: Path, nats_server: NatsServer, fleet: Fleet, valkey: ValkeyNode
) -> None:
    diag = free_port()
    config = fleet.agent(
        "agent-2",
        [static_db("dev-cache", valkey.port, env="dev")],
        diag_addr=f"127.0.0.1:{diag}",
    )
    nats_server.stop()
    agent = Agent(AgentConfig.model_validate(config), nats_url=fleet.nats_url)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await wait_until(lambda: agent.diag is not None, 10, "diagnostics listening")
        status, body = await get(diag, "/readyz")
        assert status == 503, body
        assert "FAIL nats: not connected to NATS" in body
        assert "FAIL registry: the registry has not been read yet" in body
        assert (await get(diag, "/healthz"))[0] == 200
        nats_server.start()
        await wait_until(lambda: agent.synced.is_set() or task.done(), 30, "agent sync")
        status, body = await get(diag, "/readyz")
        assert status == 200, body
        nats_server.stop()
        await wait_until(lambda: agent.bus is not None and not agent.bus.connected, 10, "cut")
        status, body = await get(diag, "/readyz")
        assert status == 503
        assert "FAIL nats: not connected to NATS" in body
        status, body = await get(diag, "/healthz")
        assert status == 200
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def test_a_diag_port_in_use_is_a_config_error(fleet: Fleet, valkey: ValkeyNode) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = fleet.agent(
            "agent-3",
            [static_db("dev-cache", valkey.port, env="dev")],
            diag_addr=f"127.0.0.1:{port}",
        )
        agent = Agent(AgentConfig.model_validate(config), nats_url=fleet.nats_url)
        with pytest.raises(ConfigError, match=rf"db_service.diag_addr 127.0.0.1:{port}: cannot"):
            await agent.run(asyncio.Event())
