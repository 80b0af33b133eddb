"""Audit: masking, the emitter against a real NATS (held while it is away, drop counts),
and reading the stream back with filters."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from bus import Bus, subjects
from bus.access import Identity
from bus.audit import (
    AuditEvent,
    EventsDropped,
    Login,
    SessionEnd,
    SessionQuery,
    ensure_audit_stream,
    read_events,
)
from bus.server import NatsServer, wait_port_free
from dbservice.access.audit import AuditEmitter, QueryRedaction, describe_command

ALICE = Identity(user="alice", roles=("dev",), db_users=("alice-rw",))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([b"GET", b"k"], ("GET", ("k",))),
        ([b"auth", b"s3cret"], ("AUTH", ("******",))),
        ([b"AUTH", b"app", b"s3cret"], ("AUTH", ("app", "******"))),
        (
            [b"HELLO", b"3", b"AUTH", b"app", b"pw", b"SETNAME", b"x"],
            ("HELLO", ("3", "AUTH", "app", "******", "SETNAME", "x")),
        ),
        ([b"HELLO", b"3", b"auth", b"app"], ("HELLO", ("3", "auth", "******"))),
        (
            [b"MIGRATE", b"h", b"1", b"", b"0", b"5", b"AUTH2", b"u", b"pw", b"KEYS", b"a"],
            ("MIGRATE", ("h", "1", "", "0", "5", "AUTH2", "u", "******", "KEYS", "a")),
        ),
        (
            [b"ACL", b"SETUSER", b"bob", b"on", b">pw", b"~*"],
            ("ACL", ("SETUSER", "bob", "on", ">******", "~*")),
        ),
        ([b"CONFIG", b"SET", b"requirepass", b"pw"], ("CONFIG", ("SET", "requirepass", "******"))),
        ([b"SET", b"k", b"\xff\x00"], ("SET", ("k", "\\xff\x00"))),
        # every AUTH of a HELLO (the server takes the last), any case, up to a NUL
        (
            [b"HELLO", b"2", b"AUTH", b"app", b"decoy", b"auth\x00x", b"app", b"pw"],
            ("HELLO", ("2", "AUTH", "app", "******", "auth\x00x", "app", "******")),
        ),
        ([b"hello\x00", b"3", b"AUTH", b"u", b"pw"], ("HELLO\x00", ("3", "AUTH", "u", "******"))),
        ([b"AUTH\x00", b"u", b"pw"], ("AUTH\x00", ("u", "******"))),
        (
            [b"MIGRATE", b"h", b"1", b"k", b"0", b"5", b"AUTH\x00", b"pw"],
            ("MIGRATE", ("h", "1", "k", "0", "5", "AUTH\x00", "******")),
        ),
        (
            [b"MIGRATE", b"h", b"1", b"k", b"0", b"5", b"auth2", b"u", b"pw", b"AUTH", b"pw2"],
            ("MIGRATE", ("h", "1", "k", "0", "5", "auth2", "u", "******", "AUTH", "******")),
        ),
        (
            [b"CONFIG", b"set", b"maxmemory", b"1", b"MasterAuth", b"a", b"primaryauth", b"b"],
            ("CONFIG", ("set", "maxmemory", "1", "MasterAuth", "******", "primaryauth", "******")),
        ),
        (
            [b"CONFIG", b"SET", b"tls-key-file-pass", b"a", b"requirepass\x00", b"b"],
            ("CONFIG", ("SET", "tls-key-file-pass", "******", "requirepass\x00", "******")),
        ),
        (
            [b"acl", b"setuser", b"bob", b"<old", b"#" + b"a" * 64, b"!" + b"b" * 64, b"on"],
            ("ACL", ("setuser", "bob", "<******", "#******", "!******", "on")),
        ),
        (  # rules in one argument (the server refuses them; the password stays out)
            [b"ACL", b"SETUSER", b"bob", b"on >pw ~*", b"(~k* >pw)", b">pass word"],
            ("ACL", ("SETUSER", "bob", "on >******", "(~k* >******", ">******")),
        ),
        (
            [b"SENTINEL", b"SET", b"m", b"auth-pass", b"pw"],
            ("SENTINEL", ("SET", "m", "auth-pass", "******")),
        ),
    ],
)
def test_describe_command_masks_secrets(
    args: list[bytes], expected: tuple[str, tuple[str, ...]]
) -> None:
    assert describe_command(args) == expected


@pytest.mark.parametrize(
    "args",
    [
        [b"AUTH", b"app", b"a-long-password"],
        [b"HELLO", b"3", b"AUTH", b"app", b"a-long-password"],
        [b"CONFIG", b"SET", b"requirepass", b"a-long-password"],
        [b"ACL", b"SETUSER", b"bob", b">a-long-password"],
        [b"MIGRATE", b"h", b"1", b"k", b"0", b"5", b"AUTH2", b"user", b"a-long-password"],
    ],
)
@pytest.mark.parametrize(
    "redaction",
    [QueryRedaction(max_arg_len=4), QueryRedaction(redact_values=True)],
    ids=["short", "redacted"],
)
def test_secrets_stay_masked_whatever_the_redaction(
    args: list[bytes], redaction: QueryRedaction
) -> None:
    """Option names are read whole even when arguments are cut shorter than them, and a
    masked argument shows neither a piece of the secret nor its length."""
    shown = " ".join(describe_command(args, redaction)[1])
    assert "a-lo" not in shown and "15" not in shown
    assert "******" in shown


def test_describe_command_redacts_and_truncates() -> None:
    redaction = QueryRedaction(max_arg_len=4, max_args=3, redact_values=True)
    name, args = describe_command([b"MSET", b"key1", b"value", b"k2", b"v2", b"k3"], redaction)
    assert name == "MSET"
    assert args == ("key1", "<5 bytes>", "<2 bytes>", "…(+2 args)")
    _, args = describe_command([b"SET", b"k", b"x" * 10], QueryRedaction(max_arg_len=4))
    assert args == ("k", "xxxx…(+6 bytes)")


async def collect(bus: Bus, **kwargs: object) -> list[AuditEvent]:
    async def run() -> list[AuditEvent]:
        return [e async for e in read_events(bus, **kwargs)]  # type: ignore[arg-type]

    return await asyncio.wait_for(run(), 10)


async def test_session_events_reach_the_stream_and_filter(bus: Bus) -> None:
    await ensure_audit_stream(bus, max_age=3600)
    async with AuditEmitter.for_bus(bus, host_id="agent-1") as emitter:
        session = emitter.session(
            ALICE, database="orders", db_user="app", client_addr="10.0.0.5:4000"
        )
        session.start()
        session.query([b"AUTH", b"app", b"pw"])
        session.query([b"SET", b"k", b"v"])
        session.add_bytes(30, 5)
        session.end()
        session.end()  # idempotent
        emitter.emit(Login(user="bob", success=False, reason="bad password"))
        assert await emitter.flush(5)
    events = await collect(bus)
    assert [e.type for e in events] == [
        "db.session.start",
        "db.session.query",
        "db.session.query",
        "db.session.end",
        "auth.login",
    ]
    query = events[1]
    assert isinstance(query, SessionQuery) and query.args == ("app", "******")
    end = events[3]
    assert isinstance(end, SessionEnd)
    assert (end.commands, end.bytes_in, end.bytes_out) == (2, 30, 5)
    assert {e.session_id for e in events[:4]} == {events[0].session_id}
    assert all(e.host_id == "agent-1" for e in events)

    assert [e.user for e in await collect(bus, subject=subjects.audit_filter("auth.login"))] == [
        "bob"
    ]
    session_types = await collect(bus, subject=subjects.audit_filter("db.session", exact=False))
    assert len(session_types) == 4
    assert await collect(bus, since=datetime.now(UTC) + timedelta(minutes=1)) == []
    assert len(await collect(bus, last=2)) == 2


async def test_emitter_holds_events_while_nats_is_away(nats_server: NatsServer) -> None:
    bus = await Bus.connect(nats_server.url, name="agent", reconnect_wait=0.1)
    try:
        await ensure_audit_stream(bus)
        emitter = AuditEmitter.for_bus(bus, host_id="agent-1", retry_max=0.5)
        emitter.start()
        emitter.emit(Login(user="before"))
        assert await emitter.flush(5)

        port = nats_server.port
        nats_server.stop()
        wait_port_free("127.0.0.1", port)
        for i in range(5):
            assert emitter.emit(Login(user=f"away-{i}"))
        await asyncio.sleep(0.3)
        assert emitter.backlog == 5
        nats_server.port = port
        nats_server.start()
        assert await emitter.flush(15)
        await emitter.aclose()
        users = [e.user for e in await collect(bus)]
        assert users == ["before"] + [f"away-{i}" for i in range(5)]  # all, once, in order
        assert emitter.dropped_total == 0
    finally:
        await bus.close()


async def test_full_queue_drops_are_counted_and_reported(nats_server: NatsServer) -> None:
    bus = await Bus.connect(nats_server.url, name="agent", reconnect_wait=0.1)
    try:
        await ensure_audit_stream(bus)
        port = nats_server.port
        nats_server.stop()
        wait_port_free("127.0.0.1", port)
        emitter = AuditEmitter.for_bus(bus, host_id="agent-1", maxsize=3, retry_max=0.3)
        emitter.start()
        accepted = sum(emitter.emit(Login(user=f"u{i}")) for i in range(10))
        await asyncio.sleep(0)  # the publisher takes one batch out of the queue
        accepted += sum(emitter.emit(Login(user=f"v{i}")) for i in range(10))
        assert emitter.dropped_total == 20 - accepted > 0
        nats_server.port = port
        nats_server.start()
        assert await emitter.flush(15)
        await emitter.aclose()
        events = await collect(bus)
        drops = [e for e in events if isinstance(e, EventsDropped)]
        assert sum(e.dropped for e in drops) == emitter.dropped_total
        assert drops[0].host_id == "agent-1"
        assert len(events) - len(drops) == accepted
    finally:
        await bus.close()


async def test_reading_without_a_stream_says_how_it_appears(bus: Bus) -> None:
    from bus.errors import RegistryError

    with pytest.raises(RegistryError, match="no audit stream yet"):
        await collect(bus)
