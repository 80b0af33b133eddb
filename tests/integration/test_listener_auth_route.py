"""The route in the login user name: a client that cannot choose its TLS server name
(redis-py sends the host it dials) logs in first with ``AUTH <db_user>@<database> <pw>``
or ``HELLO <2|3> AUTH <db_user>@<database> <pw>``; same role checks, audit and refusals
as the route in the server name. Real parts: nats-server, valkey-server with ACL users, a
real agent, redis-py and raw TLS sockets."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aredis
import redis.exceptions

from bus import Bus
from bus.audit import SessionQuery
from bus.server import NatsServer
from dbservice.gateway.listener import with_first_command
from dbservice.route import USE_CONNECT
from sandbox.aws import MotoServer
from sandbox.valkeynode import ValkeyNode
from tests.integration.test_cluster_agent import ACL, CFG_NAME, CLUSTER, record
from tests.kits.agent import running_agent
from tests.kits.listener import (
    ADMIN_PASSWORD,
    APP_PASSWORD,
    Fleet,
    assert_dev_sessions_audited,
    audit_events,
    client_context,
    cmd,
    make_fleet,
    put_roles,
    static_db,
    use_as_dev_app,
    wait_events,
)
from tests.kits.memorydb import iam_cluster

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
async def agent(fleet: Fleet, valkey: ValkeyNode) -> AsyncIterator[int]:
    """An agent whose certificate names 127.0.0.1 (no route in any server name)."""
    config = fleet.agent(
        "agent-1",
        [
            static_db("dev-cache", valkey.port, env="dev"),
            static_db("prod-cache", valkey.port, env="prod"),
            static_db("standin-cache", valkey.port, env="standin"),
        ],
    )
    async with running_agent(config, fleet.nats_url) as running:
        assert running.listener is not None
        yield running.listener.port


def redis_py(port: int, identity: Path, username: str, password: str, **kw: Any) -> aredis.Redis:
    """Plain redis-py: host name checked against the agent's certificate, no SNI."""
    return aredis.Redis(
        host="127.0.0.1", port=port, ssl=True, ssl_certfile=str(identity / "cert.pem"),
        ssl_keyfile=str(identity / "key.pem"), ssl_ca_certs=str(identity / "ca.pem"),
        username=username, password=password, socket_timeout=5, **kw,
    )  # fmt: skip


async def exchange(
    port: int,
    identity: Path | None,
    ca_pem: str,
    data: bytes,
    *,
    until: bytes | None = None,
    server_name: str | None = None,
) -> bytes:
    """Send ``data`` on a fresh TLS connection (server name: the address, so none, unless
    given); everything the agent sends until it closes (or, with ``until``, until the
    answer ends with it)."""
    context = client_context(identity, ca_pem)
    if server_name is not None:
        context.check_hostname = False  # this agent's certificate names its address only
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=server_name
    )
    try:
        writer.write(data)
        out = b""
        async with asyncio.timeout(10):
            while chunk := await reader.read(65536):
                out += chunk
                if until is not None and out.endswith(until):
                    break
        return out
    finally:
        writer.transport.abort()


async def test_redis_py_routed_by_its_user_name_is_checked_and_audited(
    fleet: Fleet, agent: int
) -> None:
    alice = fleet.identity("alice", ["dev"])
    for protocol in (2, 3):
        r = redis_py(agent, alice, "app@dev-cache", APP_PASSWORD, protocol=protocol)
        async with r:
            assert await r.ping()
            await use_as_dev_app(r, f"byuser{protocol}")
    await assert_dev_sessions_audited(fleet.bus, ["byuser2", "byuser3"])
    # the routing login is the session's first command, with the db user alone
    logins = [
        e for e in await audit_events(fleet.bus)
        if isinstance(e, SessionQuery) and e.command in ("AUTH", "HELLO")
    ]  # fmt: skip
    assert logins and all("app@dev-cache" not in e.args for e in logins)
    assert all(APP_PASSWORD not in e.args for e in logins)


async def test_a_denied_route_is_refused_as_by_server_name(fleet: Fleet, agent: int) -> None:
    alice = fleet.identity("alice", ["dev"])
    cases = {
        "app@prod-cache": b"-ERR none of your roles allows access to prod-cache\r\n",
        "admin@dev-cache": b"-ERR none of your roles allows dev-cache as db user 'admin'\r\n",
        "app@elsewhere": b"-ERR agent agent-1 does not serve database 'elsewhere'\r\n",
    }
    for user, expected in cases.items():
        assert await exchange(agent, alice, fleet.ca.pem, cmd("AUTH", user, "x")) == expected
        hello = cmd("HELLO", "3", "AUTH", user, "x", "SETNAME", "n")
        assert await exchange(agent, alice, fleet.ca.pem, hello) == expected
    r = redis_py(agent, alice, "admin@dev-cache", ADMIN_PASSWORD)
    async with r:
        with pytest.raises(redis.exceptions.ResponseError, match="as db user 'admin'"):
            await r.ping()
    failed = await wait_events(fleet.bus, 7, "refusals", type="db.session.start", success=False)
    by_route = {(e.user, e.database, e.db_user): e.reason for e in failed}
    assert by_route[("alice", "prod-cache", "app")] == (
        "none of your roles allows access to prod-cache"
    )
    assert by_route[("alice", "dev-cache", "admin")].endswith("as db user 'admin'")
    assert not [e for e in await audit_events(fleet.bus) if isinstance(e, SessionQuery)]
    # without a fleet certificate the user name changes nothing
    assert await exchange(agent, None, fleet.ca.pem, cmd("AUTH", "app@dev-cache", "x")) == (
        b"-ERR no client certificate was presented\r\n"
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (cmd("PING"), USE_CONNECT.encode()),
        (cmd("SET", "k", "v") + cmd("AUTH", "app@dev-cache", APP_PASSWORD), USE_CONNECT.encode()),
        (b"AUTH app@dev-cache apppass\r\n", USE_CONNECT.encode()),  # inline
        (cmd("AUTH", APP_PASSWORD), b"AUTH <password> alone names no db user or database"),
        (cmd("AUTH", "app", APP_PASSWORD), b"the first AUTH names no route"),
        (cmd("HELLO", "3"), b"the first HELLO must name the route"),
        (cmd("HELLO", "3", "AUTH\x00", "app@dev-cache", "p"), b"unknown, repeated or incomplete"),
        (cmd("AUTH\x00", "app@dev-cache", "p"), USE_CONNECT.encode()),
        (b"*3\r\n$4\r\nAUTH\r\n$999999999\r\n", b"user name is longer than 1025 bytes"),
        (b"*2000000000\r\n$4\r\nAUTH\r\n", b"bad array length"),
        (b"*1\r\n$999999999\r\n", USE_CONNECT.encode()),
        (b"\x00" * 5000, USE_CONNECT.encode()),
    ],
)
async def test_commands_before_the_route_are_refused_and_never_forwarded(
    fleet: Fleet,
    agent: int,
    valkey: ValkeyNode,
    data: bytes,
    message: bytes,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    alice = fleet.identity("alice", ["dev"])
    await valkey.command("DEL", "k")
    answer = await exchange(agent, alice, fleet.ca.pem, data)
    assert answer.startswith(b"-ERR ") and answer.endswith(b"\r\n") and answer.count(b"\r\n") == 1
    assert message in answer
    assert await valkey.command("EXISTS", "k") == 0
    failed = await wait_events(fleet.bus, 1, "refusal", type="db.session.start", success=False)
    assert [(e.user, e.database) for e in failed] == [("alice", "")]
    assert not [e for e in await audit_events(fleet.bus) if isinstance(e, SessionQuery)]
    # a refusal like any other: one line, no traceback
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_a_second_login_never_reroutes(fleet: Fleet, agent: int) -> None:
    alice = fleet.identity("alice", ["dev", "admins"])
    r = redis_py(agent, alice, "app@dev-cache", APP_PASSWORD)
    async with r:
        assert await r.acl_whoami() in ("app", b"app")
        for user, password in (
            ("admin@dev-cache", ADMIN_PASSWORD),
            ("admin", ADMIN_PASSWORD),
            ("app@prod-cache", APP_PASSWORD),
            ("app@dev-cache", APP_PASSWORD),
        ):
            with pytest.raises(redis.exceptions.ResponseError) as refused:
                await r.execute_command("AUTH", user, password)
            assert f"authenticating as '{user}' is not allowed" in str(refused.value)
            with pytest.raises(redis.exceptions.ResponseError) as refused:
                await r.execute_command("HELLO", "2", "AUTH", user, password)
            assert f"authenticating as '{user}' is not allowed" in str(refused.value)
        assert await r.execute_command("AUTH", "app", APP_PASSWORD)
        assert await r.acl_whoami() in ("app", b"app")
        # RESET logs the connection in again as the session's db user
        assert await r.execute_command("RESET") in ("RESET", b"RESET")
        assert await r.acl_whoami() in ("app", b"app")
    starts = await wait_events(fleet.bus, 1, "session start", type="db.session.start")
    assert [(e.database, e.db_user) for e in starts] == [("dev-cache", "app")]


def pipeline(login: bytes) -> bytes:
    """``login`` then commands sent behind it at once, one of them over 1 MiB (more than
    the agent reads ahead before the session starts)."""
    return (
        login
        + cmd("INCR", "{p}piped")
        + cmd("SET", "{p}big", b"v" * BIG)
        + cmd("STRLEN", "{p}big")
        + cmd("INCR", "{p}piped")
        + cmd("QUIT")
    )


BIG = 1536 * 1024
NOAUTH = b"-NOAUTH this session is db user 'app': authenticate first with AUTH app <password>"


async def test_pipelined_commands_after_the_login_are_run_once(
    fleet: Fleet, agent: int, valkey: ValkeyNode
) -> None:
    """Bytes sent behind the routing AUTH are neither lost nor parsed twice: one reply
    per command, in order. For a db user the server logs in (the agent forwards the
    AUTH), a command that arrives before the AUTH's answer is refused as on a connection
    routed by its server name (which commands do depends on timing); for ``default``
    they all run."""
    alice = fleet.identity("alice", ["dev", "cache"])
    for login, server_name in (
        (cmd("AUTH", "app@dev-cache", APP_PASSWORD), None),
        (cmd("AUTH", "app", APP_PASSWORD), "app.dev-cache.fleetgate"),
    ):
        await valkey.command("DEL", "{p}piped", "{p}big")
        answer = await exchange(
            agent, alice, fleet.ca.pem, pipeline(login), server_name=server_name
        )
        replies = answer.split(b"\r\n")
        assert replies[0] == b"+OK" and replies[-2:] == [b"+OK", b""], answer[:300]
        incr, set_big, strlen, incr_again = replies[1:-2]
        length = b":%d" % (BIG if set_big == b"+OK" else 0)
        for reply, ran in ((incr, b":1"), (set_big, b"+OK"), (strlen, length)):
            assert reply in (ran, NOAUTH), (reply, server_name)
        ran = [r for r in (incr, incr_again) if r != NOAUTH]
        assert [int(r[1:]) for r in ran] == list(range(1, len(ran) + 1))
        stored = await valkey.command("GET", "{p}piped")
        assert int(stored or 0) == len(ran)
    await valkey.command("DEL", "{p}piped", "{p}big")
    answer = await exchange(
        agent, alice, fleet.ca.pem, pipeline(cmd("AUTH", "default@standin-cache", "any"))
    )
    assert answer == b"+OK\r\n:1\r\n+OK\r\n:%d\r\n:2\r\n+OK\r\n" % BIG
    assert await valkey.command("GET", "{p}piped") in (b"2", "2")
    hello = cmd("HELLO", "3", "AUTH", "app@dev-cache", APP_PASSWORD, "SETNAME", "piper")
    answer = await exchange(agent, alice, fleet.ca.pem, hello, until=b"\r\n")
    assert answer.startswith(b"%")  # the HELLO map in RESP3


async def test_the_first_command_goes_ahead_of_everything_read_after_it() -> None:
    """:func:`with_first_command` on a real connection whose reader stopped reading with
    its buffer full: the command, then every byte the client sent, once, then EOF."""
    sent = b"".join(cmd("SET", "k", b"x" * 1000) for _ in range(1000))  # ~1 MiB
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(sent) // 1000)  # "the routing command"
        await asyncio.sleep(0.5)  # the rest arrives; the reader pauses the transport
        fresh, _ = with_first_command((reader, writer), b"FIRST")
        data = b""
        while chunk := await fresh.read(65536):
            data += chunk
        got.set_result(data)
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, limit=4096)
    async with server:
        port = server.sockets[0].getsockname()[1]
        _, client_writer = await asyncio.open_connection("127.0.0.1", port)
        client_writer.write(sent)
        await client_writer.drain()
        client_writer.write_eof()
        async with asyncio.timeout(20):
            data = await got
        client_writer.close()
    assert data == b"FIRST" + sent[len(sent) // 1000 :]


async def test_a_cluster_database_routed_by_user_name(
    bus: Bus, nats_server: NatsServer, tmp_path: Path, aws: MotoServer
) -> None:
    """MemoryDB in cluster mode behind the cluster engine, with the agent's IAM login:
    the client's password is answered by the agent (any will do), every shard is
    reached, and commands pipelined behind the login run (the session is logged in)."""
    fleet = await make_fleet(bus, tmp_path, nats_server.url)
    await put_roles(bus, carts={"allow": {"db_labels": {"env": "cluster"}, "db_users": ["alice"]}})
    erin = fleet.identity("erin", ["carts"])
    keys = [f"cart:{i}" for i in range(30)]
    async with iam_cluster(tmp_path / "db", cluster=CLUSTER, acl=ACL, shards=3) as (db, _):
        await bus.put_resource(record(db.ca_pem.decode()))
        host, port = db.endpoint
        config = fleet.agent(
            "agent-1", [], resources=[{"labels": {"env": "cluster"}}],
            host_aliases={f"{CFG_NAME}:6379": f"{host}:{port}"},
        )  # fmt: skip
        async with running_agent(config, nats_server.url) as agent:
            assert agent.listener is not None
            listen = agent.listener.port
            for protocol in (2, 3):
                r = redis_py(listen, erin, "alice@carts", "-", protocol=protocol)
                async with r:
                    assert await r.mset({k: k for k in keys})
                    assert await r.mget(keys) == [k.encode() for k in keys]
                    assert await r.dbsize() == 30
                    assert await r.acl_whoami() in ("alice", b"alice")
            counters = [f"n:{i}" for i in range(30)]
            piped = (
                cmd("AUTH", "alice@carts", "-")
                + b"".join(cmd("INCR", k) for k in counters)
                + cmd("GET", counters[-1])
                + cmd("QUIT")
            )
            answer = await exchange(listen, erin, fleet.ca.pem, piped)  # until it closes
            assert answer == b"+OK\r\n" + b":1\r\n" * 30 + b"$1\r\n1\r\n+OK\r\n"
