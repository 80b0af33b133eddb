"""Agents against real parts: nats-server, valkey-server, and the TLS MemoryDB stand-in."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bus import Bus
from bus.schemas import TLSSettings
from bus.server import NatsServer, wait_port_free
from dbservice.agent.health import ProbeResult, Target, probe
from sandbox.memorydb import StandinConfig, ThreadedStandin
from sandbox.valkeynode import ValkeyNode
from tests.kits.agent import agent_config, db, health, placement, running_agent, wait_until
from tests.kits.common import SAMPLE_NATS_CONF, sample_nats_passwords

pytestmark = pytest.mark.timeout(60)

NATS_CONF = SAMPLE_NATS_CONF
CFG_NAME = "clustercfg.standin.abc123.memorydb.us-east-1.amazonaws.com"
ROLE = "arn:aws:iam::222222222222:role/payments"


@pytest.fixture
async def valkey(tmp_path: Path) -> AsyncIterator[ValkeyNode]:
    """A plain (non-TLS) valkey-server."""
    node = ValkeyNode(index=0, directory=tmp_path / "valkey", client_port=0)
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


@pytest.fixture
def standin(tmp_path: Path) -> Iterator[ThreadedStandin]:
    config = StandinConfig(dir=tmp_path / "standin", extra_dns_names=[CFG_NAME])
    with ThreadedStandin(config) as running:
        yield running


async def test_placement_by_vpc_and_tags_across_three_agents(
    bus: Bus, nats_server: NatsServer, valkey: ValkeyNode, tmp_path: Path
) -> None:
    uri = f"127.0.0.1:{valkey.port}"
    fleet = [
        db("a1", uri, memorydb=True, vpc_id="vpc-a", env="prod", team="payments"),
        db("a2", uri, memorydb=True, vpc_id="vpc-a", env="dev"),
        db("b1", uri, memorydb=True, vpc_id="vpc-b", env="prod"),
        db("b2", uri, memorydb=True, vpc_id="vpc-b", env="staging", team="search"),
        db("c1", uri, memorydb=True, vpc_id="vpc-c", env="prod", team="payments"),
        db("c2", uri, memorydb=True, vpc_id="vpc-c", env="dev"),
    ]
    for resource in fleet:
        await bus.put_resource(resource)
    east = agent_config(tmp_path, "east", resources=[{"labels": {"vpc-id": "vpc-a"}}])
    prod = agent_config(
        tmp_path,
        "prod",
        resources=[
            {"labels": {"env": "prod"}},
            {"labels": {"team": "pay*"}, "aws": {"assume_role_arn": ROLE, "external_id": "ext-1"}},
        ],
    )
    west = agent_config(
        tmp_path,
        "west",
        resources=[{"labels": {"vpc-id": ["vpc-b", "vpc-c"], "env": ["prod", "staging"]}}],
    )
    url = nats_server.url
    async with (
        running_agent(east, url) as a_east,
        running_agent(prod, url),
        running_agent(west, url),
    ):
        expected = {
            "east": {"a1", "a2"},
            "prod": {"a1", "b1", "c1"},
            "west": {"b1", "b2", "c1"},
        }

        async def placed() -> bool:
            return await placement(bus) == expected

        await wait_until(placed, 10, "placement")
        beats = await health(bus)
        # served as in the registry: the matcher's ROLE is assumed at login, before the
        # database's own (tests/integration/test_iam_agent.py), not written into the record
        assert beats[("prod", "a1")].database.spec.aws.assume_role_arn is None  # type: ignore[union-attr]
        assert beats[("prod", "b1")].database.spec.aws.assume_role_arn is None  # type: ignore[union-attr]
        assert beats[("east", "a1")].database.spec.aws.assume_role_arn is None  # type: ignore[union-attr]
        assert beats[("east", "a1")].database.metadata.labels["vpc-id"] == "vpc-a"

        async def all_healthy() -> bool:
            return all(b.target_health.status == "healthy" for b in (await health(bus)).values())

        await wait_until(all_healthy, 15, "every agent healthy")
        assert a_east.supervisor is not None
        a1_worker = a_east.supervisor.handles["a1"].worker

        # A new matching database is served within 2 s of the registry write.
        await bus.put_resource(db("a3", uri, memorydb=True, vpc_id="vpc-a", env="dev"))

        async def a3_served() -> bool:
            return ("east", "a3") in await health(bus)

        took = await wait_until(a3_served, 10, "a3 served")
        assert took < 2.0, f"a3 was served {took:.2f}s after the write"

        # Newly matching (a label changed): served within 2 s too.
        await bus.put_resource(db("c2", uri, memorydb=True, vpc_id="vpc-c", env="staging"))

        async def c2_served() -> bool:
            return ("west", "c2") in await health(bus)

        took = await wait_until(c2_served, 10, "c2 served")
        assert took < 2.0, f"c2 was served {took:.2f}s after it matched"

        # No longer matching, and deleted: served nowhere, at once.
        await bus.put_resource(db("a2", uri, memorydb=True, vpc_id="vpc-b", env="dev"))
        await bus.delete_resource("b1")
        expected = {
            "east": {"a1", "a3"},
            "prod": {"a1", "c1"},
            "west": {"b2", "c1", "c2"},
        }
        took = await wait_until(placed, 10, "placement after changes")
        assert took < 2.0
        assert a_east.supervisor.handles["a1"].worker is a1_worker  # untouched
    assert await placement(bus) == {}  # clean stops deleted every heartbeat


async def test_health_transitions_tls_modes_and_static_databases(
    bus: Bus,
    nats_server: NatsServer,
    valkey: ValkeyNode,
    standin: ThreadedStandin,
    tmp_path: Path,
) -> None:
    host, port = standin.endpoint
    ca = standin.ca_pem.decode()
    uri = f"{CFG_NAME}:6379"  # resolves nowhere: reached through host_aliases
    tls_dbs = {
        "md-full": TLSSettings(ca_cert=ca),
        "md-untrusted": TLSSettings(),
        "md-insecure": TLSSettings(mode="insecure"),
        "md-wrong-name": TLSSettings(ca_cert=ca, server_name="elsewhere.example.com"),
        "md-ca-only": TLSSettings(mode="verify-ca", ca_cert=ca, server_name="elsewhere.example"),
    }
    for name, tls in tls_dbs.items():
        await bus.put_resource(db(name, uri, tls=tls, memorydb=True, env="prod"))
    config = agent_config(
        tmp_path,
        "agent",
        resources=[{"labels": {"env": "prod"}}],
        databases=[
            {
                "name": "cache-local",
                "uri": f"127.0.0.1:{valkey.port}",
                "description": "local cache",
                "static_labels": {"env": "dev"},
                "tls": {"mode": "disabled"},
            }
        ],
        host_aliases={uri: f"{host}:{port}"},
    )
    async with running_agent(config, nats_server.url):

        async def statuses() -> dict[str, str]:
            return {name: b.target_health.status for (_, name), b in (await health(bus)).items()}

        want = {
            "md-full": "healthy",
            "md-untrusted": "unhealthy",
            "md-insecure": "healthy",
            "md-wrong-name": "unhealthy",
            "md-ca-only": "healthy",
            "cache-local": "healthy",
        }

        async def settled() -> bool:
            return await statuses() == want

        await wait_until(settled, 15, "first health results")
        beats = await health(bus)
        full = beats[("agent", "md-full")].target_health
        assert full.address == f"{host}:{port}" and full.protocol == "TCP+TLS+RESP"
        assert "certificate not trusted" in beats[("agent", "md-untrusted")].target_health.error
        assert "elsewhere.example.com" in beats[("agent", "md-wrong-name")].target_health.error
        static = beats[("agent", "cache-local")]
        assert static.database.metadata.labels == {"env": "dev", "fleetgate.dev/origin": "config"}
        assert static.database.metadata.description == "local cache"

        async def status_of(name: str, status: str) -> bool:
            return (await statuses()).get(name) == status

        # The static valkey goes away and comes back (healthy again after 2 passes).
        await valkey.stop()
        await wait_until(lambda: status_of("cache-local", "unhealthy"), 10, "static down")
        error = (await health(bus))[("agent", "cache-local")].target_health.error
        assert error.endswith("Connection refused"), error
        await valkey.start()
        await wait_until(lambda: status_of("cache-local", "healthy"), 10, "static up")
        # A server that wants a password is still there.
        await valkey.command("CONFIG", "SET", "requirepass", "secret")
        target = Target("127.0.0.1", valkey.port, None, None)
        result = await probe(target, 2)
        assert result.ok and "authentication" in result.detail

        # The MemoryDB stand-in goes down behind its TLS front, and comes back.
        await asyncio.to_thread(standin.stop_all_nodes)
        await wait_until(lambda: status_of("md-full", "unhealthy"), 10, "stand-in down")
        await wait_until(lambda: status_of("md-insecure", "unhealthy"), 10, "insecure down")
        await asyncio.to_thread(standin.start_all_nodes, wait=False)
        await wait_until(lambda: status_of("md-full", "healthy"), 15, "stand-in up")
        assert (await health(bus))[("agent", "cache-local")].target_health.status == "healthy"


async def test_failing_worker_is_restarted_without_touching_others(
    bus: Bus, nats_server: NatsServer, valkey: ValkeyNode, tmp_path: Path
) -> None:
    calls = {"flaky": 0}

    async def prober(target: Target, limit: float) -> ProbeResult:
        if target.port == valkey.port + 0 and target.server_name == "localhost":
            calls["flaky"] += 1
            if calls["flaky"] <= 2:
                raise RuntimeError("a bug in one worker")
        return await probe(target, limit)

    config = agent_config(
        tmp_path,
        "agent",
        databases=[
            {"name": "steady", "uri": f"127.0.0.1:{valkey.port}", "tls": {"mode": "disabled"}},
            {"name": "flaky", "uri": f"localhost:{valkey.port}", "tls": {"mode": "disabled"}},
        ],
    )
    async with running_agent(config, nats_server.url, prober=prober) as agent:
        supervisor = agent.supervisor
        assert supervisor is not None
        steady = supervisor.handles["steady"].worker

        async def flaky_recovered() -> bool:
            beat = (await health(bus)).get(("agent", "flaky"))
            return beat is not None and beat.target_health.status == "healthy"

        await wait_until(flaky_recovered, 15, "flaky worker recovered")
        assert supervisor.handles["flaky"].failures == 2 and supervisor.failures == 2
        assert supervisor.handles["steady"].worker is steady
        assert supervisor.handles["steady"].failures == 0
        assert (await health(bus))[("agent", "steady")].target_health.status == "healthy"


async def test_nats_restart_under_running_agents(
    nats_server: NatsServer, valkey: ValkeyNode, tmp_path: Path
) -> None:
    url, uri = nats_server.url, f"127.0.0.1:{valkey.port}"
    admin = await Bus.connect(url, name="admin")
    await admin.provision()
    for name in ("d1", "d2", "d3"):
        await admin.put_resource(db(name, uri, env="prod"))
    await admin.close()
    one = agent_config(tmp_path, "one", resources=[{"labels": {"env": "prod"}}])
    two = agent_config(tmp_path, "two", resources=[{"labels": {"*": "*"}}])
    async with running_agent(one, url) as a1, running_agent(two, url) as a2:
        assert a1.supervisor is not None and a2.supervisor is not None
        reader = await Bus.connect(url, name="reader", reconnect_wait=0.1)

        async def placed(expected: set[str]) -> bool:
            try:
                found = await placement(reader)
            except Exception:  # the reader itself is reconnecting
                return False
            return found == {"one": expected, "two": expected}

        await wait_until(lambda: placed({"d1", "d2", "d3"}), 10, "initial placement")
        workers = {
            name: (a1.supervisor.handles[name].worker, a2.supervisor.handles[name].worker)
            for name in ("d1", "d3")
        }

        port = nats_server.port
        nats_server.stop()
        wait_port_free("127.0.0.1", port)
        nats_server.port = port
        nats_server.start()
        writer = await Bus.connect(url, name="writer", wait=10)
        await writer.put_resource(db("d4", uri, env="prod"))
        await writer.delete_resource("d2")
        await writer.close()

        await wait_until(lambda: placed({"d1", "d3", "d4"}), 20, "placement after restart")
        for agent in (a1, a2):
            assert sorted(agent.supervisor.handles) == ["d1", "d3", "d4"]  # type: ignore[union-attr]
            assert agent.bus is not None and agent.bus.reconnects >= 1
        for name, (w1, w2) in workers.items():  # kept, not restarted or doubled
            assert a1.supervisor.handles[name].worker is w1
            assert a2.supervisor.handles[name].worker is w2
        beats = await reader.list_db_servers()
        assert len(beats) == 6 == len({(b.host_id, b.name) for b in beats})
        await reader.close()


async def test_agent_needs_only_the_agent_permissions_of_the_sample_nats_config(
    tmp_path: Path, valkey: ValkeyNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    sample_nats_passwords(monkeypatch)
    server = NatsServer(tmp_path / "secured", config_file=NATS_CONF).start()
    try:
        url = f"nats://{{}}:pw-{{}}@127.0.0.1:{server.port}".format
        admin = await Bus.connect(url("admin", "admin"), name="admin")
        await admin.provision()
        await admin.close()
        writer = await Bus.connect(url("discovery", "discovery"), name="discovery")
        await writer.put_resource(db("orders", f"127.0.0.1:{valkey.port}", env="prod"))
        await writer.close()
        config = agent_config(tmp_path, "agent", resources=[{"labels": {"env": "prod"}}])
        reader = await Bus.connect(url("reader", "reader"), name="reader")
        async with running_agent(config, url("agent", "agent")):

            async def healthy() -> bool:
                beats = await reader.list_db_servers("orders", create=False)
                return [b.target_health.status for b in beats] == ["healthy"]

            await wait_until(healthy, 10, "heartbeat readable by the reader")
        assert await reader.list_db_servers(create=False) == []
        await reader.close()
    finally:
        server.stop()


async def test_status_change_is_announced_before_the_next_heartbeat(
    bus: Bus, nats_server: NatsServer, valkey: ValkeyNode, tmp_path: Path
) -> None:
    config = agent_config(
        tmp_path,
        "agent",
        databases=[
            {"name": "cache", "uri": f"127.0.0.1:{valkey.port}", "tls": {"mode": "disabled"}}
        ],
        heartbeat={"interval": "30s", "ttl": "90s"},  # only a status change writes early
    )
    async with running_agent(config, nats_server.url):

        async def status(want: str) -> bool:
            beat = (await health(bus)).get(("agent", "cache"))
            return beat is not None and beat.target_health.status == want

        await wait_until(lambda: status("healthy"), 10, "healthy")
        await valkey.stop()
        await wait_until(lambda: status("unhealthy"), 10, "unhealthy announced at once")


async def test_heartbeat_bucket_is_recreated_when_nats_loses_its_store(
    nats_server: NatsServer, valkey: ValkeyNode, tmp_path: Path
) -> None:
    config = agent_config(
        tmp_path,
        "agent",
        databases=[
            {"name": "cache", "uri": f"127.0.0.1:{valkey.port}", "tls": {"mode": "disabled"}}
        ],
    )
    async with running_agent(config, nats_server.url):
        port = nats_server.port
        reader = await Bus.connect(nats_server.url, name="reader")

        async def announced() -> bool:
            try:  # create=False: only the agent may bring the bucket back
                beats = await reader.list_db_servers(create=False)
                return [(b.hostname, b.name) for b in beats] == [("agent", "cache")]
            except Exception:  # reconnecting, or the bucket is not there yet
                return False

        await wait_until(announced, 10, "heartbeat")
        await reader.close()
        nats_server.stop()
        wait_port_free("127.0.0.1", port)
        nats_server.store_dir = tmp_path / "fresh-store"  # everything is gone
        nats_server.port = port
        nats_server.start()
        reader = await Bus.connect(nats_server.url, name="reader", wait=10)
        await wait_until(announced, 15, "heartbeat in a recreated bucket")
        await reader.close()
