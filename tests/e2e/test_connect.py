"""``db ls`` through the auth service and ``db connect`` end to end: real nats-server, the
login service on loopback HTTPS, a test agent over mutual TLS and a real valkey-server."""

from __future__ import annotations

import asyncio
import json
import shlex
import socket
import ssl
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aredis
import redis.exceptions

from bus import Bus
from bus.access import Role, put_role
from bus.server import NatsServer
from client import connect, people
from client.people import AccessError, fetch_databases, fetch_servers, require_identity
from sandbox.ports import free_port
from sandbox.valkeynode import ValkeyNode
from tests.kits.connect import (
    OLD_AGENT_REFUSAL,
    StandInAgent,
    Tunnel,
    World,
    resource,
    world,
)
from tests.kits.proxy import serve_single_node, valkey_cli

DATABASES = {
    "dev-cache": resource("dev-cache", env="dev"),
    "dev-idle": resource("dev-idle", env="dev"),
    "prod-cache": resource("prod-cache", env="prod"),
}


@pytest.fixture(scope="module")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyNode]:
    """One server for the module (a cluster node takes two seconds to become ready); it is
    a plain process, so each test's loop can use it."""
    yield from serve_single_node(tmp_path_factory.mktemp("valkey"))


@pytest.fixture
async def w(bus: Bus, tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[World]:
    for db in DATABASES.values():
        await bus.put_resource(db)
    async with world(bus, tmp_path, nats_server.url) as env:
        await env.login()
        yield env


@pytest.fixture
async def agent(w: World, valkey: ValkeyNode) -> AsyncIterator[StandInAgent]:
    a = await StandInAgent(w.bus, w.ca, w.tmp / "agent-1", DATABASES, valkey.port).start()
    await a.announce("dev-cache")
    await a.announce("prod-cache")
    try:
        yield a
    finally:
        await a.stop()


async def client(port: int) -> aredis.Redis:
    return aredis.Redis(host="127.0.0.1", port=port, socket_timeout=5)


async def test_db_ls_shows_what_the_identity_reaches(w: World, agent: StandInAgent) -> None:
    mine = await w.fleetgate("db", "ls", "--format", "json")
    assert mine.returncode == 0, mine.stderr
    listed = json.loads(mine.stdout)
    assert [d["name"] for d in listed] == ["dev-cache", "dev-idle"]
    first = listed[0]
    assert first["health"] == {"healthy": 1, "agents": 1}
    assert first["uri"] == "dev-cache.example:6379" and first["protocol"] == "redis"
    assert first["labels"] == {"env": "dev"} and first["description"] == "dev-cache database"
    assert listed[1]["health"] == {"healthy": 0, "agents": 0}
    table = await w.fleetgate("db", "ls")
    assert "dev-cache" in table.stdout and "1/1" in table.stdout
    assert "prod-cache" not in table.stdout

    everything = await w.fleetgate("db", "ls", "--nats", w.nats_url, "--format", "json")
    assert everything.returncode == 0, everything.stderr
    assert [d["name"] for d in json.loads(everything.stdout)] == [
        "dev-cache", "dev-idle", "prod-cache",
    ]  # fmt: skip


async def test_catalog_needs_a_certificate_and_hides_other_databases(
    w: World, agent: StandInAgent
) -> None:
    ident = require_identity(w.home)
    servers = await asyncio.wait_for(fetch_servers(ident, "dev-cache"), 10)
    assert [(s.host_id, s.addr, s.health.status) for s in servers] == [
        ("agent-1", f"127.0.0.1:{agent.port}", "healthy")
    ]
    answers = []
    for name in ("prod-cache", "no-such-db"):
        with pytest.raises(AccessError) as info:
            await asyncio.wait_for(fetch_servers(ident, name), 10)
        answers.append(str(info.value).replace(name, "NAME"))
    assert answers[0] == answers[1] == "no database 'NAME' that you may reach (see fleetgate db ls)"

    # Roles are read per request: an edit shows at once, without a new login.
    await put_role(w.bus, Role.model_validate(
        {"name": "dev", "allow": {"db_labels": {"env": ["dev", "prod"]}, "db_users": ["app"]}}
    ))  # fmt: skip
    widened, _ = await asyncio.wait_for(fetch_databases(ident), 10)
    assert [d.name for d in widened] == ["dev-cache", "dev-idle", "prod-cache"]

    anonymous = ssl.create_default_context(cadata=ident.auth_ca)
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"{ident.auth_url}/v1/databases", ssl=anonymous) as resp,
    ):
        assert resp.status == 401
        assert "fleetgate login" in (await resp.json())["error"]


async def test_connect_set_get_and_valkey_cli(w: World, agent: StandInAgent) -> None:
    tunnel = await Tunnel.start(w, "dev-cache", "app")
    try:
        r = await client(tunnel.port)
        async with r:
            assert await asyncio.wait_for(r.set("greeting", "hello"), 10)
            assert await asyncio.wait_for(r.get("greeting"), 10) == b"hello"
            big = b"x" * 300_000  # several relay chunks each way
            assert await asyncio.wait_for(r.set("big", big), 10)
            assert await asyncio.wait_for(r.get("big"), 10) == big
        cli = await asyncio.create_subprocess_exec(
            str(valkey_cli()), "-p", str(tunnel.port), "GET", "greeting",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(cli.communicate(), 10)
        assert (cli.returncode, out) == (0, b"hello\n"), err
        # A client that half-closes right after its command still gets the reply.
        reader, writer = await asyncio.open_connection("127.0.0.1", tunnel.port)
        writer.write(b"PING\r\n")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b"+PONG\r\n"
        writer.close()
    finally:
        assert await tunnel.stop() == 0
    assert ("alice", "dev-cache", "app") in agent.routes


async def test_no_exec_ready_line_as_json_names_a_working_port_and_command(
    w: World, agent: StandInAgent
) -> None:
    tunnel = await Tunnel.start(w, "dev-cache", "app", "--format", "json")
    try:
        ready = tunnel.ready
        assert set(ready) == {"host", "port", "database", "db_user", "node", "command"}
        assert (ready["host"], ready["database"], ready["db_user"], ready["node"]) == (
            "127.0.0.1",
            "dev-cache",
            "app",
            None,
        )
        assert ready["command"].endswith(f" -p {tunnel.port}")
        cli = await asyncio.create_subprocess_exec(
            *shlex.split(ready["command"]), "PING",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(cli.communicate(), 10)
        assert (cli.returncode, out) == (0, b"PONG\n"), err
    finally:
        assert await tunnel.stop() == 0


async def test_json_ready_line_needs_no_exec(w: World) -> None:
    done = await w.fleetgate("db", "connect", "dev-cache", "--db-user", "app", "--format", "json")
    assert done.returncode == 2 and done.stdout == ""
    assert "--format json formats the ready line of --no-exec" in done.stderr


async def test_connect_runs_valkey_cli_and_returns_its_exit_code(
    w: World, agent: StandInAgent
) -> None:
    done = await w.fleetgate(
        "db", "connect", "dev-cache", "--db-user", "app", stdin="SET k v\nGET k\n"
    )
    assert (done.returncode, done.stdout) == (0, "OK\nv\n"), done.stderr


async def test_refused_route_is_the_clients_error(w: World, agent: StandInAgent) -> None:
    tunnel = await Tunnel.start(w, "dev-cache", "app")
    try:
        # The role changes after the tunnel started: the agent refuses the next route.
        await put_role(w.bus, Role.model_validate(
            {"name": "dev", "allow": {"db_labels": {"env": "dev"}, "db_users": ["ro"]}}
        ))  # fmt: skip
        r = await client(tunnel.port)
        async with r:
            with pytest.raises(redis.exceptions.ResponseError) as info:
                await asyncio.wait_for(r.get("greeting"), 10)
        # from the agent, or from the auth service once the tunnel's agent list is old
        assert str(info.value).endswith("none of your roles allows dev-cache as db user 'app'")
    finally:
        await tunnel.stop()
    assert agent.routes == []


async def test_failover_when_the_first_agent_is_down(
    w: World, agent: StandInAgent, valkey: ValkeyNode
) -> None:
    dead = StandInAgent(w.bus, w.ca, w.tmp / "agent-0", DATABASES, valkey.port, host_id="agent-0")
    await dead.announce("dev-cache", addr=f"127.0.0.1:{free_port()}")  # nothing listens
    await agent.announce("dev-cache", status="unknown")  # so the dead one is tried first
    tunnel = await Tunnel.start(w, "dev-cache", "app")
    try:
        r = await client(tunnel.port)
        async with r:
            for i in range(3):
                assert await asyncio.wait_for(r.set(f"k{i}", i), 10)
            assert await asyncio.wait_for(r.get("k2"), 10) == b"2"
    finally:
        await tunnel.stop()
    assert "agent-0" in tunnel.stderr and "connection refused" in tunnel.stderr
    assert agent.routes == [("alice", "dev-cache", "app")]


async def test_clear_errors(w: World, agent: StandInAgent) -> None:
    nobody = w.tmp / "nobody"
    out = await w.fleetgate("db", "connect", "dev-cache", "--db-user", "app", home=nobody)
    assert out.returncode == 1
    assert out.stderr == (
        "fleetgate: error: not logged in: fleetgate login --auth HOST:PORT --user NAME\n"
    )
    hidden = await w.fleetgate("db", "connect", "prod-cache", "--db-user", "app", "--no-exec")
    assert hidden.returncode == 1
    assert hidden.stderr == (
        "fleetgate: error: no database 'prod-cache' that you may reach (see fleetgate db ls)\n"
    )
    idle = await w.fleetgate("db", "connect", "dev-idle", "--db-user", "app", "--no-exec")
    assert idle.returncode == 1
    assert idle.stderr.startswith("fleetgate: error: no agent serves dev-idle right now")

    short = w.tmp / "short"
    await w.login(home=short, ttl=1)
    await asyncio.sleep(1.2)
    expired = await w.fleetgate("db", "connect", "dev-cache", "--db-user", "app", home=short)
    assert expired.returncode == 1
    assert expired.stderr.startswith("fleetgate: error: your fleetgate certificate expired at ")
    assert "log in again: fleetgate login --auth https://127.0.0.1:" in expired.stderr
    assert len(expired.stderr.splitlines()) == 1
    ls = await w.fleetgate("db", "ls", home=short)
    assert ls.returncode == 2 and "expired" in ls.stderr and "--nats" in ls.stderr


MiB = 1024 * 1024


def cmd(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


@pytest.mark.timeout(60)
async def test_slow_local_reader_is_pushed_back_not_buffered(
    w: World, agent: StandInAgent, valkey: ValkeyNode
) -> None:
    """A local client that does not read its 32 MiB reply: the tunnel stops reading the
    agent while the client's socket is full, so it holds about its write buffers, not
    the value; once the client reads, every byte arrives, in order."""
    size = 32 * MiB
    direct = aredis.Redis(host="127.0.0.1", port=valkey.port, socket_timeout=10)
    async with direct:
        assert await direct.set("slow", b"s" * size)
    tunnel = connect.Tunnel("dev-cache", "app", home=w.home)
    server = await tunnel.serve()
    port = int(server.sockets[0].getsockname()[1])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock, limit=64 * 1024)
    try:
        tracemalloc.start()
        try:
            base, _ = tracemalloc.get_traced_memory()
            tracemalloc.reset_peak()
            writer.write(cmd(b"GET", b"slow") + cmd(b"PING"))
            await asyncio.sleep(1.0)  # not reading: the whole value is ready upstream
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        # This process is the tunnel, the test agent and the client together.
        assert peak - base < 6 * MiB, f"held {(peak - base) / MiB:.1f} MiB"
        header = b"$%d\r\n" % size
        async with asyncio.timeout(30):
            assert await reader.readexactly(len(header)) == header
            received = 0
            while received < size:
                chunk = await reader.read(min(1 << 20, size - received))
                assert chunk and chunk.count(b"s") == len(chunk)
                received += len(chunk)
            assert await reader.readexactly(9) == b"\r\n+PONG\r\n"
    finally:
        writer.close()
        server.close()
        await tunnel.stop_sessions()
        await server.wait_closed()


async def test_a_tunnel_keeps_its_agents_when_the_list_comes_back_empty(
    w: World, agent: StandInAgent, caplog: pytest.LogCaptureFixture
) -> None:
    """A region cut off from the hub: its agents' heartbeats expire there, so the auth
    service lists none, while the agents still serve within offline_grace. A running
    tunnel keeps trying the agents it was given last."""
    calls: list[int] = []

    async def listed_then_gone(
        ident: people.ClientIdentity, name: str, db_user: str
    ) -> list[people.AgentAddress]:
        calls.append(1)
        return await people.fetch_servers(ident, name, db_user) if len(calls) == 1 else []

    tunnel = connect.Tunnel("dev-cache", "app", home=w.home, fetch=listed_then_gone)
    server = await tunnel.serve()
    port = int(server.sockets[0].getsockname()[1])
    try:
        for _ in range(2):
            local = aredis.Redis(host="127.0.0.1", port=port, socket_timeout=10)
            async with local:
                assert await local.ping()
            await tunnel.agents(fresh=True)  # the second list is empty
        assert len(calls) >= 3
        assert "trying the 1 it listed last" in caplog.text
    finally:
        server.close()
        await tunnel.stop_sessions()
        await server.wait_closed()


async def test_db_servers_shows_only_what_the_identity_reaches(
    w: World, agent: StandInAgent
) -> None:
    """Logged in, ``db servers`` asks the auth service as ``db ls`` does: the agents of
    a database alice's roles do not reach are not shown, although FLEETGATE_NATS_URL
    points at a NATS that has them; operators still read NATS with --nats."""
    prod = await w.fleetgate("db", "servers", "prod-cache")
    assert prod.returncode != 0
    assert "no database 'prod-cache' that you may reach" in prod.stderr
    assert "agent-1" not in prod.stdout and "Traceback" not in prod.stderr

    mine = await w.fleetgate("db", "servers", "dev-cache", "--format", "json")
    assert mine.returncode == 0, mine.stderr
    (shown,) = json.loads(mine.stdout)
    assert shown["host_id"] == "agent-1" and shown["addr"] == f"127.0.0.1:{agent.port}"
    assert shown["database"] == "dev-cache" and shown["target_health"]["status"] == "healthy"
    table = await w.fleetgate("db", "servers", "dev-cache")
    assert table.returncode == 0, table.stderr
    assert table.stdout.split()[:6] == ["HOSTNAME", "HOST", "ID", "ADDRESS", "HEALTH", "VERSION"]
    assert f"127.0.0.1:{agent.port}" in table.stdout and "healthy" in table.stdout

    operator = await w.fleetgate("db", "servers", "prod-cache", "--nats", w.nats_url)
    assert operator.returncode == 0, operator.stderr
    assert f"127.0.0.1:{agent.port}" in operator.stdout


async def _raw(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port)


async def test_a_client_that_left_consumes_nothing(
    w: World, agent: StandInAgent, valkey: ValkeyNode
) -> None:
    """Client A sends BLPOP and closes; an element pushed after must stay in the list
    (directly, the server drops A's BLPOP with its connection): the tunnel tells the
    agent at once, which closes the server connection instead of waiting on BLPOP."""
    direct = aredis.Redis(host="127.0.0.1", port=valkey.port)
    tunnel = await Tunnel.start(w, "dev-cache", "app")
    try:
        await direct.delete("left:q")
        for how in ("close", "half-close"):
            reader, writer = await _raw(tunnel.port)
            writer.write(cmd(b"BLPOP", b"left:q", b"0"))
            await writer.drain()
            await asyncio.sleep(0.3)  # BLPOP is blocked on the server
            if how == "close":
                writer.close()
            else:  # still reading: a blocked command is not waited for either
                writer.write_eof()
                assert await asyncio.wait_for(reader.read(), 5) == b""
                writer.close()
            await asyncio.sleep(0.2)
            r = await client(tunnel.port)
            async with r:
                assert await asyncio.wait_for(r.lpush("left:q", "job"), 10) == 1
            await asyncio.sleep(1.5)
            assert await direct.llen("left:q") == 1, how
            await direct.delete("left:q")
    finally:
        await direct.aclose()
        assert await tunnel.stop() == 0


async def test_a_half_closed_client_gets_every_reply(w: World, agent: StandInAgent) -> None:
    """shutdown(SHUT_WR) after a pipeline: every reply, then the close."""
    tunnel = await Tunnel.start(w, "dev-cache", "app")
    try:
        reader, writer = await _raw(tunnel.port)
        pipeline = [cmd(b"SET", b"hc", b"1"), cmd(b"INCR", b"hc"), cmd(b"GET", b"hc")]
        writer.write(b"".join(pipeline * 200) + b"PING\r\n")
        writer.write_eof()
        data = await asyncio.wait_for(reader.read(), 10)
        assert data == b"+OK\r\n:2\r\n$1\r\n2\r\n" * 200 + b"+PONG\r\n"
        writer.close()
    finally:
        assert await tunnel.stop() == 0


async def test_an_agent_without_halfclose_is_routed_again_without_it(
    w: World, valkey: ValkeyNode
) -> None:
    """An agent from before the route option HALFCLOSE refuses it: the tunnel routes
    again without it, and the connection works."""
    old = StandInAgent(
        w.bus, w.ca, w.tmp / "agent-old", DATABASES, valkey.port, host_id="agent-old",
        half_close=False,
    )  # fmt: skip
    await old.start()
    await old.announce("dev-cache")
    tunnel = await Tunnel.start(w, "dev-cache", "app")
    try:
        r = await client(tunnel.port)
        async with r:
            assert await asyncio.wait_for(r.set("old:k", "v"), 10)
            assert await asyncio.wait_for(r.get("old:k"), 10) == b"v"
        # a client that leaves still ends its agent connection (at once, without the word)
        reader, writer = await _raw(tunnel.port)
        writer.write(cmd(b"PING"))
        assert await asyncio.wait_for(reader.readline(), 10) == b"+PONG\r\n"
        writer.close()
    finally:
        assert await tunnel.stop() == 0
        await old.stop()
    assert old.routes == [("alice", "dev-cache", "app")] * 2
    assert old.half_closes == [False, False]
    assert old.refused == [OLD_AGENT_REFUSAL] * 2
