"""deploy/nats/nats-server.conf against a real nats-server: each process may write only
what it owns, and every reader can still watch the registry."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import nats
import nats.aio.client
import nats.aio.msg
import nats.errors
import pytest

from bus import (
    BUCKETS,
    Bus,
    DatabaseResource,
    DatabaseSpec,
    Metadata,
    RegistryError,
    leases,
    login_failures,
    subjects,
)
from bus.access import AwsRule, Role, User, list_aws_rules, put_aws_rule
from bus.audit import (
    QueryBatch,
    SessionEnd,
    SessionStart,
    encode_event,
    encode_query,
    ensure_audit_stream,
    publish_event,
    read_events,
)
from bus.aws_logins import claim_signature, provision_aws_logins
from bus.callout import serve_callout
from bus.client import inbox_prefix, url_user
from bus.link import jetstream_answers
from bus.schemas import FetcherStatus, utcnow
from bus.server import NatsServer, config_string
from bus.servers import DbServerHeartbeat
from bus.totp import claim_step, provision_totp
from dbservice.auth.natsrights import AgentAuthorizer, nats_credentials_for
from dbservice.auth.service import callout_answer
from sandbox.aws import MotoServer
from sandbox.valkeynode import ValkeyNode
from tests.kits import seed as seed
from tests.kits.agent import agent_config, running_agent, wait_until
from tests.kits.agent import db as agent_db
from tests.kits.common import CALLOUT_SEED, SAMPLE_NATS_CONF, sample_nats_passwords
from tests.kits.join import secured_nats
from tests.kits.listener import APP_PASSWORD, RawSession, add_acl_users, make_fleet, static_db
from tests.kits.proxy import serve_single_node

CONFIG = SAMPLE_NATS_CONF
USERS = ("discovery", "agent", "auth", "reader", "auditor", "operator", "admin")


def db(name: str) -> DatabaseResource:
    return DatabaseResource(metadata=Metadata(name=name), spec=DatabaseSpec(uri=f"{name}:6379"))


@pytest.fixture
def secured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NatsServer]:
    yield from secured_nats(tmp_path, monkeypatch)


@pytest.fixture
async def connect(secured: NatsServer) -> AsyncIterator[Callable[[str], Awaitable[Bus]]]:
    opened: list[Bus] = []

    async def as_user(user: str) -> Bus:
        url = f"nats://{user}:pw-{user}@127.0.0.1:{secured.port}"
        bus = await Bus.connect(url, name=user, request_timeout=1.0)
        opened.append(bus)
        return bus

    yield as_user
    for bus in opened:
        await bus.close()


@pytest.mark.parametrize("password", ["-w7Qx", "12345", "true", "1w", "a#b c"])
async def test_a_password_nats_would_misread_starts_the_server_quoted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, password: str
) -> None:
    """nats-server reads a ``$VARIABLE`` as config text: a generated password starting
    with ``-`` once kept the sandbox from starting. Quoted, it is the string itself."""
    sample_nats_passwords(monkeypatch)
    monkeypatch.setenv("FLEETGATE_NATS_READER_PASSWORD", config_string(password))
    with NatsServer(tmp_path / "nats", config_file=CONFIG) as server:
        client = await nats.connect(
            f"nats://127.0.0.1:{server.port}", user="reader", password=password,
            inbox_prefix=inbox_prefix("reader"), allow_reconnect=False,
        )  # fmt: skip
        assert client.is_connected
        await client.close()


def test_a_password_that_cannot_be_quoted_is_refused() -> None:
    for bad in ('a"b', "a\\b", "a\nb"):
        with pytest.raises(ValueError, match="cannot hold"):
            config_string(bad)


async def test_each_process_writes_only_what_it_owns(
    connect: Callable[[str], Awaitable[Bus]],
) -> None:
    connect_as = connect
    admin: Bus = await connect_as("admin")
    await admin.provision()
    await admin.bucket(subjects.DB_SERVERS_BUCKET)

    discovery: Bus = await connect_as("discovery")
    await discovery.provision(  # what discovery's start does: they exist, it may open them
        BUCKETS[subjects.DATABASES_BUCKET], BUCKETS[subjects.DISCOVERY_STATUS_BUCKET]
    )
    await discovery.put_resource(db("orders"))
    status = FetcherStatus(
        fetcher="memorydb.us-east-1.x",
        matcher=0,
        type="memorydb",
        region="us-east-1",
        account_id="123456789012",
        state="ok",
        last_attempt=utcnow(),
    )
    await discovery.put_fetcher_status(status)
    with pytest.raises(RegistryError, match="allowed to use it"):  # cannot even open it
        await discovery.put(subjects.DB_SERVERS_BUCKET, "orders.h1", db("x"))

    agent: Bus = await connect_as("agent")
    assert [r.name for r in await agent.list_resources()] == ["orders"]
    await agent.put(subjects.DB_SERVERS_BUCKET, "orders.h1", db("heartbeat-stand-in"))
    with pytest.raises(RegistryError, match="may this NATS user do that"):
        await agent.put_resource(db("forged"))

    reader: Bus = await connect_as("reader")
    assert [r.name for r in await reader.list_resources()] == ["orders"]
    assert await reader.get_resource("orders") is not None
    with pytest.raises(RegistryError, match="may this NATS user do that"):
        await reader.delete_resource("orders")

    # Nothing refused was written.
    assert [r.name for r in await admin.list_resources()] == ["orders"]
    assert list(await admin.snapshot(subjects.DB_SERVERS_BUCKET, DatabaseResource)) == ["orders.h1"]


async def test_agents_read_roles_but_never_password_hashes_and_only_append_audit(
    connect: Callable[[str], Awaitable[Bus]],
) -> None:
    admin = await connect("admin")
    for bucket in subjects.ALL_BUCKETS:
        await admin.bucket(bucket)
    await ensure_audit_stream(admin)
    await admin.put(subjects.ROLES_BUCKET, "dev", Role(name="dev"))
    await admin.put(subjects.USERS_BUCKET, "alice", User(name="alice", roles=("dev",)))

    agent = await connect("agent")
    # The agent's link probe (a denied one would look like a cut from the fleet).
    assert await jetstream_answers(agent, wait=2.0) is None
    assert list(await agent.snapshot(subjects.ROLES_BUCKET, Role)) == ["dev"]
    with pytest.raises(RegistryError):
        await agent.snapshot(subjects.USERS_BUCKET, User)
    with pytest.raises(RegistryError, match="may this NATS user do that"):
        await agent.put(subjects.ROLES_BUCKET, "dev", Role(name="dev", description="forged"))
    await publish_event(agent, SessionStart(user="alice", database="orders"))

    auth = await connect("auth")
    assert list(await auth.snapshot(subjects.USERS_BUCKET, User)) == ["alice"]
    await publish_event(auth, SessionStart(user="bob", success=False))

    reader = await connect("reader")
    with pytest.raises(Exception):  # noqa: B017 - refused publish: no ack ever comes
        await publish_event(reader, SessionStart(user="mallory"), ack_wait=1.0)
    with pytest.raises(RegistryError):
        await reader.snapshot(subjects.ROLES_BUCKET, Role)

    auditor = await connect("auditor")
    seen = [e.user async for e in read_events(auditor)]
    assert seen == ["alice", "bob"]


async def test_discovery_runs_with_only_its_own_permissions(
    aws: MotoServer, secured: NatsServer, tmp_path: Path
) -> None:
    net = seed.network("us-east-1")
    seed.cluster("us-east-1", "orders", net=net, tags={"env": "prod"})
    config = tmp_path / "discovery.yaml"
    config.write_text(
        "discovery_service:\n  aws:\n"
        '    - {types: [memorydb], regions: [us-east-1], tags: {"*": "*"}}\n'
    )
    url = f"nats://discovery:pw-discovery@127.0.0.1:{secured.port}"
    done = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "fleetgate",
            "discovery",
            "run",
            "-c",
            str(config),
            "--once",
            "--nats",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "violation" not in done.stderr
    reader = await Bus.connect(
        f"nats://reader:pw-reader@127.0.0.1:{secured.port}", name="reader", request_timeout=1
    )
    try:
        assert [r.name for r in await reader.list_resources(create=False)] == [
            "orders-memorydb-us-east-1-123456789012"
        ]
    finally:
        await reader.close()


async def test_only_the_auth_service_keeps_used_one_time_codes(
    connect: Callable[[str], Awaitable[Bus]],
) -> None:
    auth = await connect("auth")
    await provision_totp(auth)  # what the auth service's start does
    assert await claim_step(auth, "alice", 100)
    assert not await claim_step(auth, "alice", 100)
    assert await claim_step(auth, "alice", 101)
    for user in ("agent", "reader"):
        other = await connect(user)
        with pytest.raises(RegistryError):
            await claim_step(other, "alice", 102)  # neither reads nor forges a step
    assert not await claim_step(auth, "alice", 101)
    assert await claim_step(auth, "alice", 102)


async def test_only_the_auth_service_counts_failed_logins(
    connect: Callable[[str], Awaitable[Bus]],
) -> None:
    auth = await connect("auth")
    await login_failures.provision_login_failures(auth)  # what the auth service's start does
    for now in (1000.0, 1001.0, 1002.0, 1003.0):
        assert await login_failures.add(auth, "alice", limit=3, window=60.0, now=now)
    seen = await login_failures.recent(auth, "alice", window=60.0, now=1010.0)
    assert seen is not None and seen.record.times == (1001.0, 1002.0, 1003.0)
    for user in ("agent", "reader"):
        other = await connect(user)
        with pytest.raises(RegistryError):
            await login_failures.recent(other, "alice", window=60.0, now=1010.0)
        with pytest.raises(RegistryError):  # nor clears them
            await login_failures.forget(other, "alice", seen)
    assert await login_failures.forget(auth, "alice", seen)
    assert await login_failures.recent(auth, "alice", window=60.0, now=1010.0) is None


async def test_only_the_auth_service_reads_aws_rules_and_spends_signatures(
    connect: Callable[[str], Awaitable[Bus]],
) -> None:
    admin = await connect("admin")
    rule = AwsRule(name="ci-bot", arns=("arn:aws:iam::123456789012:role/ci-*",), roles=("dev",))
    await provision_aws_logins(admin)
    await put_aws_rule(admin, rule)
    auth = await connect("auth")
    await provision_aws_logins(auth)  # what the auth service's start does
    assert [r.name for r in await list_aws_rules(auth)] == ["ci-bot"]
    with pytest.raises(RegistryError):
        await put_aws_rule(auth, rule.model_copy(update={"roles": ("admin",)}))
    at = utcnow()
    assert await claim_signature(auth, "ab" * 32, at)
    assert not await claim_signature(auth, "ab" * 32, at)
    for user in ("agent", "reader"):
        other = await connect(user)
        with pytest.raises(RegistryError):
            await list_aws_rules(other)
        with pytest.raises(RegistryError):  # nor spends (or pre-spends) a signature
            await claim_signature(other, "cd" * 32, at)
    assert await claim_signature(auth, "cd" * 32, at)


async def test_no_user_reads_the_replies_of_another(
    secured: NatsServer, connect: Callable[[str], Awaitable[Bus]]
) -> None:
    """Each user gets its replies under its own inbox prefix and may subscribe to that
    one only: an agent listening on every inbox it can name receives none of the user
    records the auth service reads, nor the audit events the auditor reads."""
    admin = await connect("admin")
    for bucket in subjects.ALL_BUCKETS:
        await admin.bucket(bucket)
    await ensure_audit_stream(admin)
    await admin.put(subjects.USERS_BUCKET, "alice", User(name="alice", roles=("dev",)))
    agent = await connect("agent")
    await publish_event(agent, SessionStart(user="alice", database="orders"))

    refused: list[str] = []
    seen: list[str] = []

    async def on_error(exc: Exception) -> None:
        refused.append(str(exc))

    probe = nats.aio.client.Client()  # the attacker's own client, any inbox prefix it likes
    await probe.connect(
        f"nats://agent:pw-agent@127.0.0.1:{secured.port}",
        error_cb=on_error,
        allow_reconnect=False,
    )
    try:

        async def record(msg: nats.aio.msg.Msg) -> None:
            seen.append(msg.subject)

        for subject in ("_INBOX.>", "_INBOX_auth.>", "_INBOX_auditor.>", ">"):
            await probe.subscribe(subject, cb=record)
        await probe.flush()

        auth = await connect("auth")
        assert list(await auth.snapshot(subjects.USERS_BUCKET, User)) == ["alice"]
        auditor = await connect("auditor")
        assert [e.user async for e in read_events(auditor)] == ["alice"]
        await probe.flush()  # anything routed to the probe has arrived by now
        await asyncio.sleep(0.2)
    finally:
        await probe.close()
    assert seen == []
    for subject in ("_INBOX.>", "_INBOX_auth.>", "_INBOX_auditor.>", ">"):
        assert any(f'subscription to "{subject.lower()}"' in e.lower() for e in refused), refused
    # and the agent's own replies still reach it (its watch, its acks)
    assert [r.name for r in await agent.list_resources()] == []


def test_each_user_has_its_own_inbox_prefix() -> None:
    assert url_user("nats://agent:pw@127.0.0.1:4222") == "agent"
    assert url_user("nats://a%2Eb:pw@h:1,nats://x:y@h:2") == "a.b"
    assert url_user("nats://token@h:1") is None
    assert url_user("nats://127.0.0.1:4222") is None
    assert inbox_prefix("agent") == "_INBOX_agent"
    assert inbox_prefix("a.b*>") == "_INBOX_a_b__"
    assert inbox_prefix(None) == "_INBOX"


async def test_the_operator_reads_what_people_on_call_need_and_writes_nothing(
    connect: Callable[[str], Awaitable[Bus]],
) -> None:
    admin = await connect("admin")
    for bucket in subjects.ALL_BUCKETS:
        await admin.bucket(bucket)
    await ensure_audit_stream(admin)
    await admin.put_resource(db("orders"))
    await admin.put(subjects.LEASES_BUCKET, "us-east-1.1.svc", db("lease-stand-in"))
    await admin.put(subjects.USERS_BUCKET, "alice", User(name="alice", roles=("dev",)))
    await publish_event(admin, SessionStart(user="alice", database="orders"))

    operator = await connect("operator")
    assert [r.name for r in await operator.list_resources(create=False)] == ["orders"]
    assert await operator.list_db_servers(create=False) == []
    assert list(await operator.snapshot(subjects.LEASES_BUCKET, DatabaseResource)) == [
        "us-east-1.1.svc"
    ]
    assert [e.user async for e in read_events(operator)] == ["alice"]
    with pytest.raises(RegistryError):
        await operator.snapshot(subjects.USERS_BUCKET, User, create=False)
    with pytest.raises(RegistryError, match="may this NATS user do that"):
        await operator.put_resource(db("forged"))
    with pytest.raises(RegistryError, match="may this NATS user do that"):
        await operator.put(subjects.LEASES_BUCKET, "us-east-1.1.svc", db("forged"))
    with pytest.raises(Exception):  # noqa: B017 - refused publish: no ack ever comes
        await publish_event(operator, SessionStart(user="mallory"), ack_wait=1.0)


# -- each agent's own rights (auth callout answered by the auth service) --------------


@pytest.fixture
async def callout(
    connect: Callable[[str], Awaitable[Bus]],
) -> AsyncIterator[AgentAuthorizer]:
    """The auth service's callout responder, as ``fleetgate auth run`` starts it with
    ``nats_callout`` (over the auth user, its only rights)."""
    authorizer = AgentAuthorizer(CALLOUT_SEED)
    auth = await connect("auth")
    sub = await serve_callout(auth, callout_answer(authorizer))
    yield authorizer
    await sub.unsubscribe()


def agent_url(server: NatsServer, host_id: str, password: str | None = None) -> str:
    creds = nats_credentials_for(host_id, CALLOUT_SEED)
    return f"nats://{creds.user}:{password or creds.password}@127.0.0.1:{server.port}"


def beat(host_id: str, database: str = "orders") -> DbServerHeartbeat:
    return DbServerHeartbeat(
        host_id=host_id, hostname=host_id, version="t", addr="a:1", database=db(database)
    )


async def refused(url: str) -> None:
    client = nats.aio.client.Client()
    try:
        with pytest.raises(Exception, match=r"(?i)authorization"):
            await client.connect(url, allow_reconnect=False, max_reconnect_attempts=0)
    finally:
        await client.close()


HOST_A = "0b6c2b7e-0000-4000-8000-00000000000a"
HOST_B = "0b6c2b7e-0000-4000-8000-00000000000b"


async def test_an_agent_writes_only_its_own_heartbeats_and_audit_events(
    secured: NatsServer, connect: Callable[[str], Awaitable[Bus]], callout: AgentAuthorizer
) -> None:
    admin = await connect("admin")
    await admin.provision()
    await admin.bucket(subjects.DB_SERVERS_BUCKET)
    await admin.bucket(subjects.LEASES_BUCKET)
    await ensure_audit_stream(admin)
    await admin.put(subjects.USERS_BUCKET, "alice", User(name="alice", roles=("dev",)))
    await admin.put(subjects.ROLES_BUCKET, "dev", Role(name="dev"))
    await admin.put_db_server(beat(HOST_B), ttl=60)

    a = await Bus.connect(agent_url(secured, HOST_A), name="agent-a", request_timeout=1.0)
    try:
        # what an agent needs: its heartbeats, the registry, roles, leases, its audit
        assert await jetstream_answers(a, wait=2.0) is None
        await a.put_db_server(beat(HOST_A), ttl=60)
        assert list(await a.snapshot(subjects.ROLES_BUCKET, Role)) == ["dev"]
        assert sorted(s.host_id for s in await a.list_db_servers("orders")) == [HOST_A, HOST_B]
        await a.put(subjects.LEASES_BUCKET, "us-east-1.1.svc", db("lease-stand-in"))
        await publish_event(a, SessionStart(user="alice", host_id=HOST_A))
        await a.delete_db_server("orders", HOST_A)

        # what it may not: another agent's heartbeat (write or delete), users' records
        # (a TTL write is a plain publish: refused, its acknowledgement never comes)
        with pytest.raises((RegistryError, nats.errors.TimeoutError)):
            await a.put_db_server(beat(HOST_B), ttl=60)
        with pytest.raises((RegistryError, nats.errors.TimeoutError)):
            await a.delete_db_server("orders", HOST_B)
        with pytest.raises(RegistryError):
            await a.snapshot(subjects.USERS_BUCKET, User, create=False)
        with pytest.raises(RegistryError, match="may this NATS user do that"):
            await a.put_resource(db("forged"))
        # an audit event on B's subject: refused by NATS (no ack ever comes)
        forged = SessionStart(user="mallory", host_id=HOST_B)
        with pytest.raises(Exception):  # noqa: B017
            await a.js.publish(
                subjects.audit_subject("db.session.start", HOST_B),
                encode_event(forged),
                timeout=1.0,
                stream=subjects.AUDIT_STREAM,
            )
        # ... or on an older writer's subject (no host): refused too
        with pytest.raises(Exception):  # noqa: B017
            await a.js.publish(
                subjects.audit_subject("db.session.start"),
                encode_event(forged),
                timeout=1.0,
                stream=subjects.AUDIT_STREAM,
            )
        # on its own subject, B's name in the event is flagged by every reader
        await a.js.publish(
            subjects.audit_subject("db.session.start", HOST_A),
            encode_event(forged),
            timeout=1.0,
            stream=subjects.AUDIT_STREAM,
        )
    finally:
        await a.close()

    beats = await admin.list_db_servers("orders")
    assert [b.host_id for b in beats] == [HOST_B]  # B's intact, A's deleted
    auditor = await connect("auditor")
    seen = [(e.user, e.host_id, e.publisher, e.identity) async for e in read_events(auditor)]
    assert seen == [
        ("alice", HOST_A, HOST_A, "checked"),
        ("mallory", HOST_B, HOST_A, "mismatch"),
    ]


async def test_only_agents_with_their_own_password_are_admitted(
    secured: NatsServer, callout: AgentAuthorizer
) -> None:
    for url in (
        agent_url(secured, HOST_A, password="guessed"),  # wrong password
        # B's password for A's name
        agent_url(secured, HOST_A, password=nats_credentials_for(HOST_B, CALLOUT_SEED).password),
        f"nats://mallory:pw-mallory@127.0.0.1:{secured.port}",  # not an agent
        f"nats://agent-a.b:x@127.0.0.1:{secured.port}",  # not a host_id
    ):
        await refused(url)
    client = await nats.connect(agent_url(secured, HOST_A), allow_reconnect=False)
    await client.close()


async def test_a_revoked_agent_is_refused(secured: NatsServer, callout: AgentAuthorizer) -> None:
    callout.revoked = lambda host_id: host_id == HOST_A
    await refused(agent_url(secured, HOST_A))
    client = await nats.connect(agent_url(secured, HOST_B), allow_reconnect=False)
    await client.close()


@pytest.fixture
async def valkey(tmp_path: Path) -> AsyncIterator[ValkeyNode]:
    node = ValkeyNode(index=0, directory=tmp_path / "valkey", client_port=0)
    await node.start()
    try:
        yield node
    finally:
        await node.stop()


async def test_a_real_agent_runs_with_its_own_rights(
    tmp_path: Path,
    secured: NatsServer,
    connect: Callable[[str], Awaitable[Bus]],
    callout: AgentAuthorizer,
    valkey: ValkeyNode,
) -> None:
    admin = await connect("admin")
    await admin.provision()
    discovery = await connect("discovery")
    await discovery.put_resource(agent_db("orders", f"127.0.0.1:{valkey.port}", env="prod"))
    config = agent_config(tmp_path, "agent-a", resources=[{"labels": {"env": "prod"}}])
    (tmp_path / "agent-a").mkdir()
    (tmp_path / "agent-a" / "host_uuid").write_text(HOST_A + "\n")
    reader = await connect("reader")
    async with running_agent(config, agent_url(secured, HOST_A)):

        async def healthy() -> bool:
            beats = await reader.list_db_servers("orders", create=False)
            return [(b.host_id, b.target_health.status) for b in beats] == [(HOST_A, "healthy")]

        await wait_until(healthy, 15, "the agent's own heartbeat")
    assert await reader.list_db_servers(create=False) == []  # deleted on stop
    assert "Violation" not in "\n".join(secured._log)


async def test_readers_find_events_of_older_writers_and_new_ones_by_type(bus: Bus) -> None:
    """The stream holds both subject forms after an upgrade: ``audit tail/search --type``
    (exact, a prefix, or every event, with --last) finds both; an end carried in a
    batch still comes out for a db.session.end filter."""
    await ensure_audit_stream(bus)
    old = SessionStart(user="old", host_id="h-old")
    await bus.js.publish(
        subjects.audit_subject("db.session.start"), encode_event(old), stream=subjects.AUDIT_STREAM
    )
    new = SessionStart(user="new", host_id="h-new")
    await publish_event(bus, new)
    await publish_event(
        bus,
        QueryBatch(
            common={"user": "new", "host_id": "h-new", "session_id": "s"},
            first_seq=1,
            queries=[encode_query(time.time(), "GET", ["k"])],
            end=SessionEnd(user="new", host_id="h-new", commands=1),
        ),
    )

    async def users(logical: str | None, **kw: Any) -> list[tuple[str, str, str]]:
        return [(e.type, e.user, e.identity) async for e in read_events(bus, subject=logical, **kw)]

    starts = [("db.session.start", "old", "unchecked"), ("db.session.start", "new", "checked")]
    assert await users(subjects.audit_filter("db.session.start")) == starts
    assert (await users(subjects.audit_filter("db.session", exact=False)))[:2] == starts
    assert await users(subjects.audit_filter("db.session.end")) == [
        ("db.session.end", "new", "checked")
    ]
    everything = await users(None)
    assert [e[0] for e in everything] == [
        "db.session.start", "db.session.start", "db.session.query", "db.session.end"
    ]  # fmt: skip
    assert await users(None, last=2) == everything[-2:]


@pytest.fixture
def single_valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyNode]:
    yield from serve_single_node(tmp_path_factory.mktemp("valkey"), setup=add_acl_users)


async def test_a_real_agent_serves_clients_and_audits_with_its_own_rights(
    tmp_path: Path,
    secured: NatsServer,
    connect: Callable[[str], Awaitable[Bus]],
    callout: AgentAuthorizer,
    single_valkey: ValkeyNode,
) -> None:
    """The agent's listener, sessions and audit (batches, session ends) all work with the
    per-agent rights, and every event reads back as checked."""
    valkey = single_valkey
    admin = await connect("admin")
    await admin.provision()
    fleet = await make_fleet(admin, tmp_path, "unused")
    config = fleet.agent("agent-a", [static_db("dev-cache", valkey.port, env="dev")])
    (tmp_path / "agent-a").mkdir(exist_ok=True)
    (tmp_path / "agent-a" / "host_uuid").write_text(HOST_A + "\n")
    async with running_agent(config, agent_url(secured, HOST_A)) as running:
        assert running.listener is not None
        identity = fleet.identity("alice", ["dev"])
        session = await RawSession.open(
            running.listener.port, identity, fleet.ca.pem, "dev-cache", "app"
        )
        try:
            assert await session.call("AUTH", "app", APP_PASSWORD) == b"+OK"
            assert await session.call("SET", "k", "v") == b"+OK"
            assert await session.call("GET", "k") == b"v"
        finally:
            session.close()
        auditor = await connect("auditor")

        async def audited() -> bool:
            events = [e async for e in read_events(auditor, idle=0.2)]
            return {e.type for e in events} >= {
                "db.session.start",
                "db.session.query",
                "db.session.end",
            } and all(e.host_id == HOST_A and e.identity == "checked" for e in events)

        await wait_until(audited, 15, "the agent's audit, checked")
    assert "iolation" not in "\n".join(secured._log)


async def test_an_agent_limited_to_accounts_writes_only_their_managed_user_records(
    secured: NatsServer, connect: Callable[[str], Awaitable[Bus]], callout: AgentAuthorizer
) -> None:
    admin = await connect("admin")
    await admin.bucket(subjects.LEASES_BUCKET)
    callout.leases = lambda host_id: ["us-east-1.111111111111.*"]
    a = await Bus.connect(agent_url(secured, HOST_A), name="agent-a", request_timeout=1.0)
    try:
        key = subjects.managed_user_key("us-east-1", "111111111111", "svc")
        assert await leases.create(a, subjects.LEASES_BUCKET, key, db("lease")) is not None
        other = subjects.managed_user_key("eu-west-1", "111111111111", "svc")
        with pytest.raises(RegistryError, match="may this NATS user do that"):
            await leases.create(a, subjects.LEASES_BUCKET, other, db("lease"))
        # it still reads every record (what the others hold)
        await admin.put(subjects.LEASES_BUCKET, other, db("held-elsewhere"))
        assert sorted(await leases.records(a, subjects.LEASES_BUCKET, DatabaseResource)) == [
            other,
            key,
        ]
    finally:
        await a.close()
