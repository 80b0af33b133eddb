"""deploy/nats/nats-server.conf against a real nats-server: each process may write only
what it owns, and every reader can still watch the registry."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import nats
import nats.aio.client
import nats.aio.msg
import pytest

from bus import (
    BUCKETS,
    Bus,
    DatabaseResource,
    DatabaseSpec,
    Metadata,
    RegistryError,
    login_failures,
    subjects,
)
from bus.access import AwsRule, Role, User, list_aws_rules, put_aws_rule
from bus.audit import SessionStart, ensure_audit_stream, publish_event, read_events
from bus.aws_logins import claim_signature, provision_aws_logins
from bus.client import inbox_prefix, url_user
from bus.link import jetstream_answers
from bus.schemas import FetcherStatus, utcnow
from bus.server import NatsServer, config_string
from bus.totp import claim_step, provision_totp
from sandbox.aws import MotoServer
from tests.kits import seed as seed
from tests.kits.common import SAMPLE_NATS_CONF, sample_nats_passwords

CONFIG = SAMPLE_NATS_CONF
USERS = ("discovery", "agent", "auth", "reader", "auditor", "operator", "admin")


def db(name: str) -> DatabaseResource:
    return DatabaseResource(metadata=Metadata(name=name), spec=DatabaseSpec(uri=f"{name}:6379"))


@pytest.fixture
def secured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NatsServer]:
    sample_nats_passwords(monkeypatch)
    server = NatsServer(tmp_path / "nats", config_file=CONFIG).start()
    try:
        yield server
    finally:
        server.stop()


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
