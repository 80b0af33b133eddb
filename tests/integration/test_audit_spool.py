"""The audit emitter with a spool: what NATS cannot take waits on disk, survives a
restart, and is stored once and in order when NATS is back; a full spool refuses."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from bus import Bus
from bus.access import Identity
from bus.audit import EventsDropped, Login, Outgoing, SessionQuery, ensure_audit_stream
from bus.server import NatsServer, wait_port_free
from dbservice.access.audit import AuditEmitter
from dbservice.access.spool import AuditSpool
from tests.integration.test_access_audit import collect
from tests.kits.agent import wait_until

pytestmark = pytest.mark.timeout(60)


@pytest.mark.leaks(
    "nats-py's Client.close raises ConnectionResetError when it still holds unsent data "
    "while reconnecting, before it cancels its subscriptions"
)
async def test_spooled_events_survive_a_restart_and_arrive_once_in_order(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    directory = tmp_path / "spool"
    bus = await Bus.connect(nats_server.url, name="agent", reconnect_wait=0.1)
    try:
        await ensure_audit_stream(bus)
        emitter = AuditEmitter.for_bus(
            bus,
            host_id="agent-1",
            retry_max=0.3,
            spool=AuditSpool.open(directory, max_bytes=1 << 30),
        )
        emitter.start()
        emitter.emit(Login(user="before"))
        assert await emitter.flush(5)

        port = nats_server.port
        nats_server.stop()
        wait_port_free("127.0.0.1", port)
        session = emitter.session(
            Identity(user="alice", roles=("dev",)), database="db", db_user="app", client_addr="c"
        )
        expected = ["before"]
        for i in range(30):
            emitter.emit(Login(user=f"away-{i}"))
            expected.append(f"away-{i}")
            session.allowed([b"SET", b"k", str(i).encode()])
            if i % 10 == 9:
                session.flush()
        session.end()
        await wait_until(lambda: emitter.spooling, 10, "spooling")
        await emitter.aclose()  # the agent stops while NATS is away
        assert emitter.backlog == 30 + 30 + 1  # logins, the commands (three batches), the end
        assert emitter.published_total == 1

        again = AuditEmitter.for_bus(
            bus,
            host_id="agent-1",
            retry_max=0.3,
            spool=AuditSpool.open(directory, max_bytes=1 << 30),
        )
        assert again.backlog == 30 + 30 + 1
        again.start()
        for i in range(3):
            again.emit(Login(user=f"after-{i}"))
            expected.append(f"after-{i}")
        nats_server.port = port
        nats_server.start()
        assert await again.flush(20)
        await again.aclose()
        assert not again.spooling and again.backlog == 0
        events = await collect(bus)
        assert [n for n in Counter(e.id for e in events).values() if n > 1] == []
        assert [e.user for e in events if isinstance(e, Login)] == expected
        assert [e.args[1] for e in events if isinstance(e, SessionQuery)] == [
            str(i) for i in range(30)
        ]
        assert not [e for e in events if isinstance(e, EventsDropped)]
        assert [p.name for p in directory.iterdir() if p.name.startswith("seg-")] == []
    finally:
        await bus.close()


async def test_a_full_spool_refuses_rather_than_drops(tmp_path: Path) -> None:
    async def unreachable(_: Outgoing) -> None:
        raise TimeoutError("nats: timeout")

    spool = AuditSpool.open(tmp_path / "spool", max_bytes=4096)
    emitter = AuditEmitter(unreachable, host_id="agent-1", retry_max=0.1, spool=spool)
    emitter.start()
    try:
        session = emitter.session(
            Identity(user="alice", roles=("dev",)), database="db", db_user="app", client_addr="c"
        )
        recorded = 0
        while session.allowed([b"SET", b"key", b"x" * 200]):
            recorded += 1
            session.flush()
            await asyncio.sleep(0)
        assert emitter.full() and recorded > 0
        assert "the agent's audit spool is full (0.00390625 MiB" in emitter.full_reason()
        assert "refuses new sessions and commands rather than lose their audit" in (
            emitter.full_reason()
        )
        session.end()  # still kept: it closes a session that is open
        lines = spool.pending_events
        assert lines >= recorded + 1
        assert emitter.dropped_total == 1  # the refused command, counted
    finally:
        await emitter.aclose()
