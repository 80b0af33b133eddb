"""A session's commands travel in ``db.session.queries`` batches and read back as one
``db.session.query`` event per command: through a real agent under a pipelined load,
across a NATS restart, and through the readers' filters (real nats-server, real
valkey-server, raw RESP over mutual TLS)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from bus import Bus, subjects
from bus.access import Identity
from bus.audit import (
    AuditEvent,
    QueryBatch,
    SessionEnd,
    SessionQuery,
    encode_query,
    ensure_audit_stream,
    publish_event,
    read_events,
)
from bus.server import NatsServer, wait_port_free
from dbservice.access.audit import AuditEmitter, BatchLimits
from sandbox.valkeynode import ValkeyNode
from tests.kits.agent import running_agent, wait_until
from tests.kits.listener import (
    APP_PASSWORD,
    Fleet,
    RawSession,
    add_acl_users,
    cmd,
    make_fleet,
    static_db,
)
from tests.kits.proxy import serve_single_node

pytestmark = pytest.mark.timeout(90)

ALICE = Identity(user="alice", roles=("dev",))
QUERY_SUBJECT = subjects.audit_filter("db.session.query")


async def collect(bus: Bus, **kwargs: object) -> list[AuditEvent]:
    async def run() -> list[AuditEvent]:
        return [e async for e in read_events(bus, idle=0.5, **kwargs)]  # type: ignore[arg-type]

    return await asyncio.wait_for(run(), 30)


@pytest.fixture
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyNode]:
    yield from serve_single_node(tmp_path_factory.mktemp("valkey"), setup=add_acl_users)


@pytest.fixture
async def agent(
    bus: Bus, tmp_path: Path, nats_server: NatsServer, valkey: ValkeyNode
) -> AsyncIterator[tuple[Fleet, int]]:
    fleet = await make_fleet(bus, tmp_path, nats_server.url)
    config = fleet.agent("agent-1", [static_db("dev-cache", valkey.port, env="dev")])
    async with running_agent(config, fleet.nats_url) as running:
        assert running.listener is not None
        yield fleet, running.listener.port


async def test_ten_thousand_pipelined_commands_are_ten_thousand_events(
    agent: tuple[Fleet, int],
) -> None:
    fleet, port = agent
    total = 10_000
    commands = [
        cmd("AUTH", "app", APP_PASSWORD) if i % 1000 == 0 else cmd("SET", f"key:{i}", str(i))
        for i in range(total)
    ]
    session = await RawSession.open(
        port, fleet.identity("alice", ["dev"]), fleet.ca.pem, "dev-cache", "app"
    )
    assert await session.call("AUTH", "app", APP_PASSWORD) == b"+OK"  # then the rest at once

    async def send() -> None:
        for start in range(1, total, 500):
            session.writer.write(b"".join(commands[start : start + 500]))
            await session.writer.drain()

    async def receive() -> list[bytes]:
        async with asyncio.timeout(60):
            return [await session.reader.readline() for _ in range(total - 1)]

    _, replies = await asyncio.gather(send(), receive())
    assert set(replies) == {b"+OK\r\n"}
    session.close()

    events: list[AuditEvent] = []

    async def stored() -> bool:
        nonlocal events
        events = await collect(fleet.bus, subject=subjects.audit_filter("db.session", exact=False))
        return any(isinstance(e, SessionEnd) for e in events)

    await wait_until(stored, 20, "the session's end event")
    queries = [e for e in events if isinstance(e, SessionQuery)]
    assert len(queries) == total
    assert isinstance(events[-1], SessionEnd) and events[-1].commands == total  # after them
    shown = [(q.command, q.args) for q in queries]
    assert shown == [
        ("AUTH", ("app", "******")) if i % 1000 == 0 else ("SET", (f"key:{i}", str(i)))
        for i in range(total)
    ]
    assert all(APP_PASSWORD not in q.model_dump_json() for q in queries)
    assert len({q.id for q in queries}) == total
    assert [int(q.id.rsplit(":", 1)[1]) for q in queries] == list(range(1, total + 1))
    assert {(q.user, q.database, q.db_user, q.session_id) for q in queries} == {
        ("alice", "dev-cache", "app", events[0].session_id)
    }
    times = [q.time for q in queries]
    assert times == sorted(times)
    # The filter on db.session.query sees the same commands.
    assert len(await collect(fleet.bus, subject=QUERY_SUBJECT)) == total


async def test_a_batch_held_across_a_nats_restart_is_stored_once(
    nats_server: NatsServer,
) -> None:
    bus = await Bus.connect(nats_server.url, name="agent", reconnect_wait=0.1)
    try:
        await ensure_audit_stream(bus)
        emitter = AuditEmitter.for_bus(bus, host_id="agent-1", retry_max=0.5)
        emitter.start()
        session = emitter.session(ALICE, database="orders", db_user="app", client_addr="x:1")
        session.start()
        assert await emitter.flush(5)

        port = nats_server.port
        nats_server.stop()
        wait_port_free("127.0.0.1", port)
        for i in range(300):
            session.query([b"SET", f"k{i}".encode(), b"v"])
        session.query([b"AUTH", b"app", b"hunter22"], success=False, reason="wrong user")
        emitter.flush_sessions()
        await asyncio.sleep(0.3)
        assert emitter.backlog == 301  # two batches, held
        nats_server.port = port
        nats_server.start()
        assert await emitter.flush(15)
        session.end()
        await emitter.aclose()
        assert emitter.dropped_total == 0

        events = await collect(bus)
        queries = [e for e in events if isinstance(e, SessionQuery)]
        assert [q.args[0] for q in queries[:300]] == [f"k{i}" for i in range(300)]
        last = queries[-1]
        assert len(queries) == 301
        assert (last.command, last.args, last.success, last.reason) == (
            "AUTH", ("app", "******"), False, "wrong user",
        )  # fmt: skip
        assert [e.type for e in events][-1] == "db.session.end"
    finally:
        await bus.close()


async def test_a_retried_batch_is_stored_once(bus: Bus) -> None:
    await ensure_audit_stream(bus)
    batch = QueryBatch(
        {"user": "alice", "session_id": "s1", "host_id": "agent-1"},
        first_seq=7,
        queries=[encode_query(1.0e9, "GET", ("a",)), encode_query(1.0e9 + 1, "GET", ("b",))],
    )
    await publish_event(bus, batch)
    await publish_event(bus, batch)  # as after a lost acknowledgement
    info = await bus.js.stream_info(subjects.AUDIT_STREAM)
    assert info.state.messages == 1
    events = await collect(bus, subject=QUERY_SUBJECT)
    assert [(e.id, e.args) for e in events if isinstance(e, SessionQuery)] == [
        (f"{batch.id}:7", ("a",)), (f"{batch.id}:8", ("b",)),
    ]  # fmt: skip
    assert events[0].time == datetime.fromtimestamp(1.0e9, UTC)


async def test_last_and_since_count_commands_not_messages(bus: Bus) -> None:
    await ensure_audit_stream(bus)
    async with AuditEmitter.for_bus(
        bus, host_id="agent-1", limits=BatchLimits(commands=100)
    ) as emitter:
        session = emitter.session(ALICE, database="orders", db_user="app", client_addr="x:1")
        session.start()
        for i in range(150):
            session.query([b"GET", f"k{i}".encode()])
        session.end()
        assert await emitter.flush(5)
    events = await collect(bus)
    assert len(events) == 152
    assert [e.type for e in await collect(bus, last=3)] == [
        "db.session.query", "db.session.query", "db.session.end",
    ]  # fmt: skip
    assert [e.args for e in await collect(bus, subject=QUERY_SUBJECT, last=2)] == [  # type: ignore[attr-defined]
        ("k148",), ("k149",),
    ]  # fmt: skip
    middle = events[120].time
    since = [e for e in await collect(bus, since=middle) if isinstance(e, SessionQuery)]
    assert all(e.time >= middle for e in since)  # not the batch's older commands
    assert [e.args for e in since][-30:] == [(f"k{i}",) for i in range(120, 150)]


async def test_an_end_in_a_batch_reads_back_under_every_filter(bus: Bus) -> None:
    """A session that ends with commands still buffered sends its end in their batch;
    every filter sees exactly the events of its type, in order, as if the end had been
    a message of its own."""
    await ensure_audit_stream(bus)
    async with AuditEmitter.for_bus(bus, host_id="agent-1") as emitter:
        for n in range(3):
            session = emitter.session(
                ALICE, database="orders", db_user="app", client_addr="x:1", session_id=f"s{n}"
            )
            session.start(reason="allowed by role dev")
            for i in range(4):
                session.query([b"GET", f"k{i}".encode()])
                if n == 1 and i == 1:
                    emitter.flush_sessions()  # s1: two batches, the end in the second
            if n == 2:
                emitter.flush_sessions()  # s2: nothing buffered at the end
            session.end(reason="client closed")
        assert await emitter.flush(5)
    info = await bus.js.stream_info(subjects.AUDIT_STREAM)
    assert info.state.messages == 2 + 3 + 3  # s0: start, batch; s1, s2: one more each

    events = await collect(bus)
    assert [e.type for e in events] == [
        "db.session.start", *["db.session.query"] * 4, "db.session.end"
    ] * 3  # fmt: skip
    assert len({e.id for e in events}) == len(events)
    ends = [e for e in events if isinstance(e, SessionEnd)]
    assert [(e.session_id, e.reason, e.commands, e.host_id) for e in ends] == [
        (f"s{n}", "client closed", 4, "agent-1") for n in range(3)
    ]

    end_filter = subjects.audit_filter("db.session.end")
    assert [e.id for e in await collect(bus, subject=end_filter)] == [e.id for e in ends]
    assert [e.id for e in await collect(bus, subject=end_filter, last=2)] == [
        e.id for e in ends[-2:]
    ]
    assert [e.id for e in await collect(bus, subject=end_filter, since=ends[1].time)] == [
        e.id for e in ends[1:]
    ]
    queries = await collect(bus, subject=QUERY_SUBJECT)
    assert {e.type for e in queries} == {"db.session.query"} and len(queries) == 12
    starts = await collect(bus, subject=subjects.audit_filter("db.session.start"))
    assert [e.type for e in starts] == ["db.session.start"] * 3
    prefix = await collect(bus, subject=subjects.audit_filter("db.session", exact=False))
    assert [e.id for e in prefix] == [e.id for e in events]


async def test_commands_go_out_on_time_without_end(bus: Bus) -> None:
    await ensure_audit_stream(bus)
    async with AuditEmitter.for_bus(
        bus, host_id="agent-1", limits=BatchLimits(interval=0.1)
    ) as emitter:
        session = emitter.session(ALICE, database="orders", db_user="app", client_addr="x:1")
        session.query([b"PING"])
        await wait_until(lambda: emitter.published_total == 1, 5, "the timer's batch")
        session.query([b"PING"])
        await wait_until(lambda: emitter.published_total == 2, 5, "the next one")
    assert [e.id.rsplit(":", 1)[1] for e in await collect(bus)] == ["1", "2"]


def test_the_batch_type_is_not_a_filter() -> None:
    from fleetgate.cli.audit import subject_for
    from fleetgate.cli.errors import UsageError

    assert subject_for("db.session.query") == QUERY_SUBJECT
    with pytest.raises(UsageError, match=r"use --type db\.session\.query"):
        subject_for("db.session.queries")
