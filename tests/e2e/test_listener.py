"""The agent's client listener end to end, real parts only: nats-server, valkey-server
with ACL users, a real agent, certificates from the fleet CA, redis-py and raw RESP."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.exceptions

from bus import Bus
from bus.audit import SessionEnd, SessionQuery, SessionStart
from bus.server import NatsServer
from dbservice.access.ca import CertificateAuthority
from dbservice.route import RouteRefused
from sandbox.ports import free_port
from sandbox.valkeynode import ValkeyNode
from tests.kits.agent import agent_config, running_agent, wait_until
from tests.kits.connect import Tunnel, world
from tests.kits.listener import (
    ADMIN_PASSWORD,
    APP_PASSWORD,
    Fleet,
    RawSession,
    add_acl_users,
    client,
    cmd,
    put_roles,
    static_db,
    wait_events,
)
from tests.kits.proxy import serve_single_node, valkey_cli

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyNode]:
    """One server for the module, with the ACL users ``app`` and ``admin``."""

    yield from serve_single_node(tmp_path_factory.mktemp("valkey"), setup=add_acl_users)


@pytest.fixture
async def agent(fleet: Fleet, valkey: ValkeyNode) -> AsyncIterator[int]:
    """An agent serving dev-cache, prod-cache and pci-cache; yields its listener port."""
    config = fleet.agent(
        "agent-1",
        [
            static_db("dev-cache", valkey.port, env="dev"),
            static_db("prod-cache", valkey.port, env="prod"),
            static_db("pci-cache", valkey.port, env="dev", pci="true"),
        ],
    )
    async with running_agent(config, fleet.nats_url) as running:
        assert running.listener is not None
        yield running.listener.port


async def refusal(fleet: Fleet, port: int, identity: Path | None, db: str, user: str) -> str:
    with pytest.raises(RouteRefused) as info:
        session = await RawSession.open(port, identity, fleet.ca.pem, db, user)
        session.close()
    return info.value.reason


async def test_dev_user_sets_and_gets_as_app_and_is_audited(fleet: Fleet, agent: int) -> None:
    alice = fleet.identity("alice", ["dev"])
    for protocol in (2, 3):
        r = client(
            agent, alice, "dev-cache", "app",
            username="app", password=APP_PASSWORD, protocol=protocol,
        )  # fmt: skip
        async with r:
            assert await r.set(f"greeting{protocol}", "hello")
            assert await r.get(f"greeting{protocol}") == b"hello"
            assert await r.acl_whoami() in ("app", b"app")

    starts = await wait_events(fleet.bus, 2, "session starts", type="db.session.start")
    assert all(isinstance(e, SessionStart) and e.success for e in starts)
    first = starts[0]
    assert (first.user, first.roles, first.database, first.db_user) == (
        "alice", ("dev",), "dev-cache", "app",
    )  # fmt: skip
    assert first.client_addr.startswith("127.0.0.1:") and first.host_id
    assert first.reason == "allowed by role dev"
    ends = await wait_events(fleet.bus, 2, "session ends", type="db.session.end")
    for end in ends:
        assert isinstance(end, SessionEnd)
        assert end.commands >= 4 and end.bytes_in > 0 and end.bytes_out > 0
        assert end.duration > 0
    queries = await wait_events(fleet.bus, 8, "queries", type="db.session.query")
    seen = [(q.command, q.args) for q in queries if isinstance(q, SessionQuery)]
    assert ("AUTH", ("app", "******")) in seen
    assert ("HELLO", ("3", "AUTH", "app", "******")) in seen
    assert ("SET", ("greeting2", "hello")) in seen and ("GET", ("greeting3",)) in seen
    assert all(APP_PASSWORD not in q.model_dump_json() for q in queries)
    assert {q.session_id for q in queries} == {s.session_id for s in starts}


async def test_refused_prod_admin_other_database_and_deny_beats_allow(
    fleet: Fleet, agent: int
) -> None:
    alice = fleet.identity("alice", ["dev"])
    bob = fleet.identity("bob", ["dev", "no-pci"])
    assert await refusal(fleet, agent, alice, "prod-cache", "app") == (
        "none of your roles allows access to prod-cache"
    )
    assert await refusal(fleet, agent, alice, "dev-cache", "admin") == (
        "none of your roles allows dev-cache as db user 'admin'"
    )
    assert await refusal(fleet, agent, alice, "elsewhere", "app") == (
        "agent agent-1 does not serve database 'elsewhere'"
    )
    # Both allow dev-cache; bob's no-pci role denies pci-cache although dev allows it.
    session = await RawSession.open(agent, alice, fleet.ca.pem, "pci-cache", "app")
    session.close()
    assert await refusal(fleet, agent, bob, "pci-cache", "app") == (
        "role no-pci denies access to pci-cache"
    )
    failed = await wait_events(fleet.bus, 4, "refusals", type="db.session.start", success=False)
    by_db = {(e.user, e.database, e.db_user): e.reason for e in failed}
    assert by_db[("alice", "prod-cache", "app")] == "none of your roles allows access to prod-cache"
    assert by_db[("alice", "dev-cache", "admin")].endswith("as db user 'admin'")
    assert by_db[("bob", "pci-cache", "app")] == "role no-pci denies access to pci-cache"
    assert ("alice", "elsewhere", "app") in by_db


async def test_expired_other_ca_and_missing_certificates_are_refused(
    fleet: Fleet, agent: int
) -> None:
    expired = fleet.identity("alice", ["dev"], ttl=-30)
    reason = await refusal(fleet, agent, expired, "dev-cache", "app")
    assert reason.startswith("the client certificate expired at ")
    assert reason.endswith("log in again (fleetgate login)")

    assert await refusal(fleet, agent, None, "dev-cache", "app") == (
        "no client certificate was presented"
    )

    stranger = fleet.identity("mallory", ["dev"], ca=CertificateAuthority.create())
    with pytest.raises((ssl.SSLError, OSError, RouteRefused)) as info:
        session = await RawSession.open(agent, stranger, fleet.ca.pem, "dev-cache", "app")
        session.close()
    if isinstance(info.value, RouteRefused):  # TLS 1.3: the alert arrives after the route
        assert "without answering" in info.value.reason

    failed = await wait_events(fleet.bus, 3, "refusals", type="db.session.start", success=False)
    reasons = {e.reason.split(" at ")[0].split(":")[0]: e for e in failed}
    assert reasons["the client certificate expired"].user == "alice"
    assert reasons["no client certificate was presented"].user == ""
    handshake = reasons["TLS handshake failed"]
    assert "certificate not trusted" in handshake.reason and handshake.user == ""
    assert all(e.client_addr.startswith("127.0.0.1:") for e in failed)


async def test_a_certificate_accepted_before_is_refused_once_expired(
    fleet: Fleet, agent: int
) -> None:
    # The agent remembers certificates it accepted; their dates still count every time.
    alice = fleet.identity("alice", ["dev"], ttl=3)
    for _ in range(2):  # accepted (the route's +OK comes after the certificate check)
        session = await RawSession.open(agent, alice, fleet.ca.pem, "dev-cache", "app")
        session.close()
    await asyncio.sleep(3.5)
    reason = await refusal(fleet, agent, alice, "dev-cache", "app")
    assert reason.startswith("the client certificate expired at ")
    assert reason.endswith("log in again (fleetgate login)")


async def test_no_session_tickets_are_sent(fleet: Fleet, agent: int) -> None:
    # Nobody resumes sessions with the agent: tickets would only cost it CPU.
    alice = fleet.identity("alice", ["dev"])
    session = await RawSession.open(agent, alice, fleet.ca.pem, "dev-cache", "app")
    try:
        assert await session.call("PING")  # the tickets would have come before this reply
        ssl_object = session.writer.get_extra_info("ssl_object")
        assert ssl_object.version() == "TLSv1.3"
        assert ssl_object.session is not None and not ssl_object.session.has_ticket
    finally:
        session.close()


async def test_role_edit_applies_to_the_next_connection(fleet: Fleet, agent: int) -> None:
    alice = fleet.identity("alice", ["dev"])
    first = client(agent, alice, "dev-cache", "app", username="app", password=APP_PASSWORD)
    async with first:
        assert await first.set("edited", "before")
        await put_roles(
            fleet.bus,
            dev={
                "allow": {"db_labels": {"env": "dev"}, "db_users": ["app"]},
                "deny": {"redis_commands": ["GET"]},
            },
        )
        # The open session keeps the roles it started with ...
        assert await first.get("edited") == b"before"
        # ... the next connection gets the edited role, without a new certificate.
        second = client(agent, alice, "dev-cache", "app", username="app", password=APP_PASSWORD)
        async with second:
            with pytest.raises(redis.exceptions.NoPermissionError) as info:
                await second.get("edited")
            assert str(info.value) == "role dev denies the command GET"
            assert await second.set("edited", "after")
        assert await first.get("edited") == b"after"
    await put_roles(fleet.bus, dev={"allow": {"db_labels": {"env": "staging"}}})
    assert await refusal(fleet, agent, alice, "dev-cache", "app") == (
        "none of your roles allows access to dev-cache"
    )


async def test_auth_only_as_the_session_db_user(fleet: Fleet, agent: int) -> None:
    alice = fleet.identity("alice", ["dev"])
    s = await RawSession.open(agent, alice, fleet.ca.pem, "dev-cache", "app")
    try:
        assert (await s.call("GET", "k")).startswith(
            b"-NOAUTH this session is db user 'app': authenticate first with AUTH app"
        )
        assert await s.call("AUTH", "admin", ADMIN_PASSWORD) == (
            b"-ERR this session is db user 'app'; authenticating as 'admin' is not allowed "
            b"(connect again with --db-user admin)"
        )
        assert (await s.call("AUTH", APP_PASSWORD)).startswith(
            b"-ERR AUTH <password> logs in as 'default', but this session is db user 'app'"
        )
        hello = await s.call("HELLO", "3", "AUTH", "admin", ADMIN_PASSWORD)
        assert hello.startswith(b"-ERR this session is db user 'app'; authenticating as 'admin'")
        assert (await s.call("AUTH", "app", "wrong")).startswith(b"-WRONGPASS")
        assert (await s.call("PING")).startswith(b"-NOAUTH")
        assert await s.call("AUTH", "app", APP_PASSWORD) == b"+OK"
        assert await s.call("ACL", "WHOAMI") == b"app"
        # Once logged in, another user is still refused and the session stays `app`.
        assert (await s.call("AUTH", "admin", ADMIN_PASSWORD)).startswith(b"-ERR this session")
        assert await s.call("ACL", "WHOAMI") == b"app"
    finally:
        s.close()
    # Pipelined: the command behind an AUTH is refused until the server said yes.
    s = await RawSession.open(agent, alice, fleet.ca.pem, "dev-cache", "app")
    try:
        s.writer.write(cmd("AUTH", "app", APP_PASSWORD) + cmd("ACL", "WHOAMI"))
        assert await s.reply() == b"+OK"
        assert (await s.reply()).startswith(b"-NOAUTH")
        assert await s.call("ACL", "WHOAMI") == b"app"
    finally:
        s.close()
    refused = await wait_events(
        fleet.bus, 3, "refused AUTH", type="db.session.query", command="AUTH", success=False
    )
    assert ("admin", "******") in [e.args for e in refused if isinstance(e, SessionQuery)]
    assert all(ADMIN_PASSWORD not in str(e.args) for e in refused if isinstance(e, SessionQuery))
    hellos = await wait_events(
        fleet.bus, 1, "refused HELLO", type="db.session.query", command="HELLO", success=False
    )
    assert isinstance(hellos[0], SessionQuery)
    assert hellos[0].args == ("3", "AUTH", "admin", "******")


async def test_denied_command_is_refused_while_others_work(fleet: Fleet, agent: int) -> None:
    alice = fleet.identity("alice", ["dev"])
    r = client(agent, alice, "dev-cache", "app", username="app", password=APP_PASSWORD)
    async with r:
        assert await r.set("survivor", "1")
        with pytest.raises(redis.exceptions.NoPermissionError) as info:
            await r.flushall()
        assert str(info.value) == "role dev denies the command FLUSHALL"
        assert await r.get("survivor") == b"1"
    denied = await wait_events(
        fleet.bus, 1, "denied", type="db.session.query", command="FLUSHALL", success=False
    )
    assert denied[0].reason == "role dev denies the command FLUSHALL"


async def test_pipelining_and_pubsub_through_the_listener(fleet: Fleet, agent: int) -> None:
    alice = fleet.identity("alice", ["dev"])
    r = client(agent, alice, "dev-cache", "app", username="app", password=APP_PASSWORD)
    publisher = client(agent, alice, "dev-cache", "app", username="app", password=APP_PASSWORD)
    async with r, publisher:
        pipe = r.pipeline(transaction=False)
        for i in range(500):
            pipe.execute_command("SET", f"p{i}", i)
            pipe.execute_command("GET", f"p{i}")
        results = await asyncio.wait_for(pipe.execute(), 10)
        assert results[1::2] == [str(i).encode() for i in range(500)]
        assert all(ok is True for ok in results[0::2])

        big = b"v" * 3_000_000  # streamed through in pieces
        assert await r.set("big", big)
        assert await r.get("big") == big

        pubsub = r.pubsub()
        async with pubsub:
            await pubsub.subscribe("news")
            confirm = await pubsub.get_message(timeout=5)
            assert confirm is not None and confirm["type"] == "subscribe"

            async def received() -> bool:
                await publisher.publish("news", "hello")
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                return message is not None and message["data"] == b"hello"

            await wait_until(received, 10, "a published message")


async def test_valkey_cli_through_db_connect(
    bus: Bus, tmp_path: Path, nats_server: NatsServer, valkey: ValkeyNode
) -> None:
    """The whole path: login, `auth sign --host` for the agent, `db connect`, valkey-cli."""
    async with world(bus, tmp_path, nats_server.url) as w:
        await w.login()
        signed = await w.fleetgate(
            "auth", "sign", "--host", "127.0.0.1", "--ttl", "1h",
            "--out", str(tmp_path / "agent-tls"), "--ca-dir", str(tmp_path / "ca"),
        )  # fmt: skip
        assert signed.returncode == 0, signed.stderr
        config = agent_config(
            tmp_path,
            "agent-1",
            listen_addr=f"127.0.0.1:{free_port()}",
            listener={
                "cert_file": str(tmp_path / "agent-tls" / "cert.pem"),
                "key_file": str(tmp_path / "agent-tls" / "key.pem"),
            },
            databases=[static_db("dev-cache", valkey.port, env="dev")],
        )
        async with running_agent(config, nats_server.url):
            tunnel = await Tunnel.start(w, "dev-cache", "app")
            try:
                for args, expected in (
                    (("SET", "cli-key", "from valkey-cli"), b"OK\n"),
                    (("GET", "cli-key"), b"from valkey-cli\n"),
                ):
                    cli = await asyncio.create_subprocess_exec(
                        str(valkey_cli()), "-p", str(tunnel.port), "--no-auth-warning",
                        "--user", "app", "--pass", APP_PASSWORD, *args,
                        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                    )  # fmt: skip
                    out, err = await asyncio.wait_for(cli.communicate(), 10)
                    assert (cli.returncode, out) == (0, expected), err
            finally:
                assert await tunnel.stop() == 0
            # db connect starting valkey-cli itself, commands on standard input
            done = await w.fleetgate(
                "db", "connect", "dev-cache", "--db-user", "app",
                stdin=f"AUTH app {APP_PASSWORD}\nGET cli-key\n",
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            assert done.stdout.splitlines()[:2] == ["OK", "from valkey-cli"]
            refused = await w.fleetgate(
                "db", "connect", "dev-cache", "--db-user", "admin", stdin="PING\n"
            )
            # refused before anything listens or starts: one line, a non-zero exit
            assert refused.returncode == 1 and refused.stdout == ""
            assert refused.stderr == (
                "fleetgate: error: none of your roles allows dev-cache as db user 'admin'\n"
            )


async def test_scripts_and_other_names_do_not_run_what_a_role_denies(
    fleet: Fleet, agent: int
) -> None:
    """FLUSHALL and DEL denied: not through EVAL, UNLINK, GETDEL, a NUL-suffixed name or
    a transaction either; a script runs only when a role allows it by name."""
    await put_roles(
        fleet.bus,
        dev={
            "allow": {"db_labels": {"env": "dev"}, "db_users": ["app"]},
            "deny": {"redis_commands": ["FLUSHALL", "DEL"]},
        },
    )
    alice = fleet.identity("alice", ["dev"])
    s = await RawSession.open(agent, alice, fleet.ca.pem, "dev-cache", "app")
    try:
        assert await s.call("AUTH", "app", APP_PASSWORD) == b"+OK"
        assert await s.call("SET", "keep", "1") == b"+OK"
        for command in (
            ("EVAL", "return redis.call('FLUSHALL')", "0"),
            ("EVAL", "return redis.call('DEL', KEYS[1])", "1", "keep"),
            ("EVAL_RO", "return 1", "0"),
            ("FCALL", "f", "0"),
            ("SCRIPT", "FLUSH"),
            ("FUNCTION", "FLUSH"),
            ("UNLINK", "keep"),
            ("GETDEL", "keep"),
            ("FLUSHDB",),
        ):
            assert (await s.call(*command)).startswith(b"-NOPERM "), command
        # a NUL in a command name is refused whatever the roles say
        assert b"contains a NUL byte" in await s.call("FLUSHALL\0x")
        # inside a transaction the denied command is refused when queued
        assert await s.call("MULTI") == b"+OK"
        assert (await s.call("UNLINK", "keep")).startswith(b"-NOPERM ")
        await s.call("EXEC")
        assert await s.call("GET", "keep") == b"1"
    finally:
        s.close()
    await put_roles(
        fleet.bus,
        dev={
            "allow": {
                "db_labels": {"env": "dev"},
                "db_users": ["app"],
                "redis_commands": ["*", "EVAL"],
            },
            "deny": {"redis_commands": ["FLUSHALL", "DEL"]},
        },
    )
    s = await RawSession.open(agent, alice, fleet.ca.pem, "dev-cache", "app")
    try:
        assert await s.call("AUTH", "app", APP_PASSWORD) == b"+OK"
        assert await s.call("EVAL", "return redis.call('GET', KEYS[1])", "1", "keep") == b"1"
        assert (await s.call("EVALSHA", "0" * 40, "0")).startswith(b"-NOPERM ")
    finally:
        s.close()
        await put_roles(fleet.bus)


async def test_a_command_refused_inside_multi_aborts_the_transaction(
    fleet: Fleet, agent: int
) -> None:
    """DEL denied: refused when queued, and as on the server EXEC then answers EXECABORT
    and nothing of the transaction runs; DISCARD still works; redis-py sees the abort."""
    await put_roles(
        fleet.bus,
        dev={
            "allow": {"db_labels": {"env": "dev"}, "db_users": ["app"]},
            "deny": {"redis_commands": ["FLUSHALL", "DEL"]},
        },
    )
    alice = fleet.identity("alice", ["dev"])
    s = await RawSession.open(agent, alice, fleet.ca.pem, "dev-cache", "app")
    try:
        assert await s.call("AUTH", "app", APP_PASSWORD) == b"+OK"
        for end, answer in (
            ("EXEC", b"-EXECABORT Transaction discarded because of previous errors."),
            ("DISCARD", b"+OK"),
        ):
            assert await s.call("MULTI") == b"+OK"
            assert await s.call("SET", "tx:a", "1") == b"+QUEUED"
            assert (await s.call("DEL", "tx:a")).startswith(b"-NOPERM ")
            assert await s.call(end) == answer
            assert await s.call("GET", "tx:a") == b"$-1"
        # the session goes on, and so does the next transaction
        assert await s.call("MULTI") == b"+OK"
        assert await s.call("SET", "tx:a", "2") == b"+QUEUED"
        assert await s.call("EXEC") == b"*1"
        assert await s.reply() == b"+OK"
        assert await s.call("GET", "tx:a") == b"2"
    finally:
        s.close()
    r = client(agent, alice, "dev-cache", "app", username="app", password=APP_PASSWORD)
    async with r:
        pipe = r.pipeline(transaction=True)
        pipe.set("tx:b", 1)
        pipe.delete("tx:b")
        with pytest.raises(redis.exceptions.NoPermissionError) as info:
            await pipe.execute()
        # redis-py raises the queued command's error once EXEC answered EXECABORT
        assert isinstance(info.value.__context__, redis.exceptions.ExecAbortError)
        assert await r.get("tx:b") is None
    await put_roles(fleet.bus)


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_a_client_that_left_over_tls_consumes_nothing(
    fleet: Fleet, agent: int, valkey: ValkeyNode, how: str
) -> None:
    """Straight to the listener over mutual TLS (no tunnel): a client that closes while
    its BLPOP waits takes nothing; the element pushed after it left stays in the list."""
    alice = fleet.identity("alice", ["dev"])
    queue = f"q:tls:{how}"
    a = await RawSession.open(agent, alice, fleet.ca.pem, "dev-cache", "app")
    assert await a.call("AUTH", "app", APP_PASSWORD) == b"+OK"
    a.writer.write(cmd("BLPOP", queue, "0"))

    async def blocked() -> bool:
        info = await valkey.command("INFO", "clients")
        assert isinstance(info, bytes)
        return b"blocked_clients:0\r\n" not in info

    await wait_until(blocked, 10, "the BLPOP waits on the server")
    if how == "close":  # close_notify, then FIN
        a.writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await a.writer.wait_closed()
    else:
        a.close()
    await asyncio.sleep(0.2)
    b = await RawSession.open(agent, alice, fleet.ca.pem, "dev-cache", "app")
    try:
        assert await b.call("AUTH", "app", APP_PASSWORD) == b"+OK"
        assert await b.call("LPUSH", queue, "job") == b":1"
    finally:
        b.close()
    await asyncio.sleep(2)
    assert await valkey.command("LLEN", queue) == 1
    await valkey.command("DEL", queue)
