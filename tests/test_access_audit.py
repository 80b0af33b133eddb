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
from dbservice.audit import AuditEmitter, QueryRedaction, describe_command

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
    ],
)
def test_describe_command_masks_secrets(
    args: list[bytes], expected: tuple[str, tuple[str, ...]]
) -> None:
    assert describe_command(args) == expected


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
