"""Who the session is logged in as, end to end (real agent, real valkey-server): words
the server reads differently from their bytes (a NUL ends an option name, case does not
matter), RESET, and replication commands. Where the server defines what a byte string
means, the same bytes are also sent to valkey-server directly."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import pytest

from bus.audit import SessionQuery
from dbservice.engine.proxy.commands import parse_hello
from sandbox.valkeynode import ValkeyNode
from tests.kits.agent import running_agent
from tests.kits.listener import (
    ADMIN_PASSWORD,
    APP_PASSWORD,
    Fleet,
    RawSession,
    add_acl_users,
    cmd,
    static_db,
    wait_events,
)
from tests.kits.proxy import serve_single_node

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyNode]:
    """``app`` and ``admin`` with passwords; ``default`` without one (self-hosted)."""
    yield from serve_single_node(tmp_path_factory.mktemp("valkey"), setup=add_acl_users)


@pytest.fixture
async def agent(fleet: Fleet, valkey: ValkeyNode) -> AsyncIterator[int]:
    config = fleet.agent(
        "agent-1",
        [
            static_db("dev-cache", valkey.port, env="dev"),
            static_db("std-cache", valkey.port, env="standin"),
        ],
    )
    async with running_agent(config, fleet.nats_url) as running:
        assert running.listener is not None
        yield running.listener.port


class Direct:
    """The same bytes straight to the server."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.session = RawSession(reader, writer)

    @classmethod
    async def open(cls, port: int) -> Direct:
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def call(self, *args: str | bytes) -> bytes:
        return await self.session.call(*args)


async def test_hello_auth_spelled_with_nul_or_case_is_auth(
    fleet: Fleet,
    agent: int,
    valkey: ValkeyNode,
) -> None:
    """``HELLO 2 "AUTH\\x00" admin <pw>``: the server reads ``AUTH`` (side by side),
    so the agent must too and refuse another user; the session stays ``app`` and the
    password is not in the audit trail."""
    direct = await Direct.open(valkey.port)
    try:
        hello = cmd("HELLO", "2", b"aUtH\x00x", "admin", ADMIN_PASSWORD)
        direct.session.writer.write(hello + cmd("ACL", "WHOAMI"))
        async with asyncio.timeout(5):  # the HELLO map, then WHOAMI: the server's reading
            got = await direct.session.reader.readuntil(b"$5\r\nadmin\r\n")
        assert got.startswith(b"*14\r\n$6\r\nserver\r\n")
        # and a command name with a NUL is not that command on this server
        assert (await direct.call(b"PING\x00")).startswith(b"-ERR unknown command")
    finally:
        direct.session.close()

    alice = fleet.identity("alice", ["dev"])
    s = await RawSession.open(agent, alice, fleet.ca.pem, "dev-cache", "app")
    try:
        assert await s.call("AUTH", "app", APP_PASSWORD) == b"+OK"
        for option in (b"AUTH\x00", b"aUtH\x00x", b"auth"):
            for user, password in (("admin", ADMIN_PASSWORD), ("default", "anything")):
                reply = await s.call("HELLO", "2", option, user, password)
                assert reply.startswith(
                    f"-ERR this session is db user 'app'; authenticating as '{user}'".encode()
                ), (option, reply)
        # a later AUTH clause wins on the server: so it does for the agent
        reply = await s.call("HELLO", "2", "AUTH", "app", "x", b"AUTH\x00", "admin", "y")
        assert reply.startswith(b"-ERR this session is db user 'app'; authenticating as 'admin'")
        # a malformed HELLO goes to the server, which refuses it without logging in
        reply = await s.call("HELLO", "2", b"AUTH\x00", "admin", ADMIN_PASSWORD, "BOGUS")
        assert reply.startswith(b"-ERR Syntax error in HELLO option")
        # words the server reads as numbers exactly as it does
        assert (await s.call("HELLO", "+2", "AUTH", "admin", "x")).startswith(
            b"-ERR Protocol version is not an integer or out of range"
        )
        assert await s.call("ACL", "WHOAMI") == b"app"
    finally:
        s.close()
    events = await wait_events(
        fleet.bus, 7, "refused HELLOs", type="db.session.query", command="HELLO", success=False
    )
    queries = [e for e in events if isinstance(e, SessionQuery)]
    assert all(ADMIN_PASSWORD not in str(e.args) for e in queries)
    assert ("2", "AUTH\x00", "admin", "******") in [e.args for e in queries]
    malformed = await wait_events(
        fleet.bus, 1, "malformed HELLO", type="db.session.query", command="HELLO", success=True
    )
    assert all(ADMIN_PASSWORD not in str(e.args) for e in malformed if isinstance(e, SessionQuery))


async def test_a_nul_in_a_command_or_subcommand_name_is_refused(
    fleet: Fleet,
    agent: int,
) -> None:
    """Redis 7 runs ``AUTH\\x00<n>``/``FLUSHALL\\x00<n>`` as AUTH/FLUSHALL for some
    ``<n>`` (its command table compares names as C strings); Valkey 9 reads
    ``CONFIG SET\\x00`` as ``CONFIG SET``. The agent refuses both, naming the NUL, and
    records no argument of them (they may hold a password)."""
    alice = fleet.identity("alice", ["dev"])
    s = await RawSession.open(agent, alice, fleet.ca.pem, "dev-cache", "app")
    try:
        assert await s.call("AUTH", "app", APP_PASSWORD) == b"+OK"
        assert await s.call("SET", "k", "v") == b"+OK"
        for name in (b"AUTH\x00", b"AUTH\x0013", b"FLUSHALL\x00", b"RESET\x00x"):
            reply = await s.call(name, "admin", ADMIN_PASSWORD)
            assert reply.startswith(b"-ERR the command name '"), reply
            assert b"contains a NUL byte" in reply
        for args in (
            ("CONFIG", b"SET\x00", "requirepass", ADMIN_PASSWORD),
            ("CLIENT", b"REPLY\x00", "OFF"),
            ("ACL", b"setuser\x00", "app", f">{ADMIN_PASSWORD}"),
        ):
            reply = await s.call(*args)
            assert reply.startswith(b"-ERR the subcommand '"), reply
        assert await s.call("GET", "k") == b"v"  # replies still in step
        assert await s.call("ACL", "WHOAMI") == b"app"
    finally:
        s.close()
    events = await wait_events(
        fleet.bus, 7, "refused NUL names", type="db.session.query", success=False
    )
    assert all(ADMIN_PASSWORD not in str(e.args) for e in events if isinstance(e, SessionQuery))


async def test_reset_logs_the_session_in_again_with_the_clients_credentials(
    fleet: Fleet,
    agent: int,
) -> None:
    """RESET makes the server connection ``default``; the agent logs it in again as the
    db user (here with the client's last accepted AUTH) before anything pipelined
    behind the RESET runs, and the client gets the server's ``+RESET``."""
    alice = fleet.identity("alice", ["dev", "cache"])
    s = await RawSession.open(agent, alice, fleet.ca.pem, "dev-cache", "app")
    try:
        assert await s.call("AUTH", "app", APP_PASSWORD) == b"+OK"
        for _ in range(2):
            s.writer.write(cmd("RESET") + cmd("ACL", "WHOAMI") + b"ACL WHOAMI\r\n")
            assert await s.reply() == b"+RESET"
            assert await s.reply() == b"app"
            assert await s.reply() == b"app"
        # the server's RESET semantics otherwise: no name
        assert await s.call("CLIENT", "SETNAME", "n") == b"+OK"
        s.writer.write(cmd("RESET") + cmd("CLIENT", "GETNAME"))
        assert await s.reply() == b"+RESET"
        assert await s.reply() == b"$-1"
        # RESET with an argument is the server's arity error and resets nothing
        assert (await s.call("RESET", "x")).startswith(b"-ERR wrong number of arguments")
        assert await s.call("ACL", "WHOAMI") == b"app"
    finally:
        s.close()
    # a session for `default` stays `default`: nothing to log in with, nothing needed
    s = await RawSession.open(agent, alice, fleet.ca.pem, "std-cache", "default")
    try:
        s.writer.write(cmd("RESET") + cmd("ACL", "WHOAMI"))
        assert await s.reply() == b"+RESET"
        assert await s.reply() == b"default"
    finally:
        s.close()


async def test_replication_commands_are_refused_up_front(
    fleet: Fleet,
    agent: int,
) -> None:
    """SYNC/PSYNC turn the connection into an RDB payload and a replication stream,
    REPLCONF ACK has no reply: refused with a reason, and the session goes on."""
    alice = fleet.identity("alice", ["dev"])
    s = await RawSession.open(agent, alice, fleet.ca.pem, "dev-cache", "app")
    try:
        assert await s.call("AUTH", "app", APP_PASSWORD) == b"+OK"
        for args in (("SYNC",), ("psync", "?", "-1"), ("REPLCONF", "ACK", "0")):
            reply = await s.call(*args)
            assert reply.startswith(
                f"-ERR {args[0].upper()} is refused through fleetgate: replication".encode()
            ), reply
        assert await s.call("PING") == b"+PONG"
    finally:
        s.close()


async def test_hello_is_read_as_the_server_reads_it(valkey: ValkeyNode) -> None:
    """Side by side: every HELLO below goes to valkey-server directly; the server takes
    it exactly when ``parse_hello`` reads it (with a version of 2 or 3), and then the
    user and the name are the ones ``parse_hello`` found."""
    versions = [b"2", b"3", b"+2", b"02", b" 2", b"2 ", b"-2", b"4", b"2\x00", b"0", b"1_0", b""]
    clauses: list[list[bytes]] = [
        [],
        [b"AUTH", b"app", APP_PASSWORD.encode()],
        [b"aUtH\x00x", b"app", APP_PASSWORD.encode()],
        [b"AUTH\x00", b"app"],
        [b"SETNAME", b"n1"],
        [b"setname\x00zz", b"n2"],
        [b"AUTH", b"admin", b"wrong", b"AUTH", b"app", APP_PASSWORD.encode()],
        [b"SETNAME", b"n3", b"AUTH", b"app", APP_PASSWORD.encode()],
        [b"BOGUS"],
        [b"AUTH\x01", b"app", APP_PASSWORD.encode()],
        [b"SETNAME"],
    ]
    cases = [[b"HELLO"]] + [[b"HELLO", v, *c] for v in versions for c in clauses]
    for args in cases:
        hello = parse_hello(args)
        reader, writer = await asyncio.open_connection("127.0.0.1", valkey.port)
        try:
            writer.write(cmd(*args) + cmd("ACL", "WHOAMI") + cmd("CLIENT", "GETNAME"))
            async with asyncio.timeout(5):
                first = await reader.readexactly(1)
                rest = await reader.readuntil(b"\r\n")
                taken = first != b"-"
                if taken:  # skip to the ACL WHOAMI reply (after the HELLO map)
                    await asyncio.sleep(0.05)
                    data = rest + await _drain(reader)
                    # the last two replies: WHOAMI and GETNAME as bulk strings
                    user, name = _last_two_bulks(data)
        finally:
            writer.close()
        expected = hello is not None and (hello.protover in (2, 3, None))
        assert taken == expected, (args, first + rest)
        if taken:
            assert hello is not None
            assert user == (hello.username or b"default"), args
            assert name == hello.setname, args


async def _drain(reader: asyncio.StreamReader) -> bytes:
    data = b""
    while True:
        try:
            async with asyncio.timeout(0.2):
                chunk = await reader.read(65536)
        except TimeoutError:
            return data
        if not chunk:
            return data
        data += chunk


def _last_two_bulks(data: bytes) -> tuple[bytes | None, bytes | None]:
    """WHOAMI's and GETNAME's replies at the end of ``data`` (RESP2 or RESP3)."""
    lines = data.split(b"\r\n")[:-1]
    values: list[bytes | None] = []
    i = len(lines) - 1
    while i >= 0 and len(values) < 2:
        if i > 0 and lines[i - 1][:1] == b"$":
            values.append(lines[i])
            i -= 2
        else:  # $-1 or _ (null)
            values.append(None)
            i -= 1
    name, user = values
    return user, name
