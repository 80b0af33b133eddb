"""How many NATS messages a session start costs the agent, counted on the wire: a
monitoring connection subscribed to ``>`` on the real nats-server sees every message the
agent sends and every reply it gets (real agent, real valkey-server, mutual TLS).

Left out of the count: the server's JetStream advisories (``$JS.EVENT.>``, the server
talking to itself) and the idle heartbeats of the agent's watches (status 100, every
5 s whatever the clients do); the agent's own heartbeats are set to an hour apart."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from nats.aio.msg import Msg

from bus import Bus, subjects
from bus.access import Role, put_role
from bus.audit import SessionEnd, SessionQuery, SessionStart
from bus.server import NatsServer
from sandbox.valkeynode import ValkeyNode
from tests.kits.agent import health, running_agent, wait_until
from tests.kits.listener import (
    APP_PASSWORD,
    Fleet,
    RawSession,
    add_acl_users,
    make_fleet,
    put_roles,
    static_db,
    wait_events,
)
from tests.kits.proxy import serve_single_node

pytestmark = pytest.mark.timeout(90)

QUIET = 0.6
"""Seconds without a counted message after which a step is taken as complete (three
times the audit's batch interval)."""


@dataclass(frozen=True)
class Seen:
    subject: str
    reply: str


class Wire:
    """Every message on the server, as seen by a ``>`` subscription."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.counting = False

    async def on_message(self, msg: Msg) -> None:
        if not self.counting or msg.subject.startswith("$JS.EVENT."):
            return
        if (msg.headers or {}).get("Status") == "100":  # idle heartbeat, flow control
            return
        self.seen.append(Seen(msg.subject, msg.reply))

    async def count(self, step: object) -> list[Seen]:
        """The messages while ``step`` runs and until the wire is quiet again."""
        self.seen, self.counting = [], True
        await step  # type: ignore[misc]
        last = -1
        while last != len(self.seen):
            last = len(self.seen)
            await asyncio.sleep(QUIET)
        self.counting = False
        return self.seen


@pytest.fixture
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyNode]:
    yield from serve_single_node(tmp_path_factory.mktemp("valkey"), setup=add_acl_users)


@pytest.fixture
async def wire(nats_server: NatsServer) -> AsyncIterator[Wire]:
    watcher = Wire()
    nc = await nats.connect(nats_server.url, name="monitor")
    try:
        await nc.subscribe(">", cb=watcher.on_message)
        await nc.flush()
        yield watcher
    finally:
        await nc.close()


@pytest.fixture
async def agent(
    bus: Bus, tmp_path: Path, nats_server: NatsServer, valkey: ValkeyNode
) -> AsyncIterator[tuple[Fleet, int]]:
    fleet = await make_fleet(bus, tmp_path, nats_server.url)
    config = fleet.agent(
        "agent-1",
        [static_db("dev-cache", valkey.port, env="dev")],
        heartbeat={"interval": "1h", "ttl": "2h"},
    )
    async with running_agent(config, fleet.nats_url) as running:
        assert running.listener is not None

        async def healthy() -> bool:
            found = (await health(bus)).get(("agent-1", "dev-cache"))
            return found is not None and found.target_health.status == "healthy"

        await wait_until(healthy, 20, "dev-cache healthy")
        # A first session, so that what the agent does once per process (open a bucket)
        # is not counted.
        alice = fleet.identity("alice", ["dev"])
        port = running.listener.port
        (await RawSession.open(port, alice, fleet.ca.pem, "dev-cache", "app")).close()
        await wait_events(bus, 2, "the warm-up session", user="alice")
        yield fleet, port


async def test_a_session_start_is_one_publish(agent: tuple[Fleet, int], wire: Wire) -> None:
    """Route, roles, upstream, ``+OK``: the roles come from the agent's watch, so the
    start event and its acknowledgement are all (it was four messages: the role read
    and its answer, the event and its acknowledgement)."""
    fleet, port = agent
    alice = fleet.identity("alice", ["dev"])
    sessions: list[RawSession] = []

    async def start() -> None:
        sessions.append(await RawSession.open(port, alice, fleet.ca.pem, "dev-cache", "app"))

    seen = await wire.count(start())
    try:
        assert [without_host(s.subject) for s in seen] == [
            subjects.audit_subject("db.session.start"),
            seen[0].reply,
        ], [(s.subject, s.reply) for s in seen]
        events = await wait_events(fleet.bus, 3, "the start", user="alice")
        assert isinstance(events[-1], SessionStart) and events[-1].success
        assert events[-1].reason == "allowed by role dev"
    finally:
        sessions[0].close()


def without_host(subject: str) -> str:
    """An audit subject without its publisher's host token (``fleetgate.audit.<type>.<host>``
    -> ``fleetgate.audit.<type>``); any other subject as it is."""
    if subject.startswith(subjects.AUDIT_SUBJECT_PREFIX + "."):
        return subject.rsplit(".", 1)[0]
    return subject


async def test_a_one_command_session_is_two_publishes(agent: tuple[Fleet, int], wire: Wire) -> None:
    """Connect, two commands, close (what a one-shot client or a connection per request
    does): the start, then the commands with the end in one message; four messages
    with the acknowledgements (it was eight: the role read, the start, the batch and
    the end, each with its answer)."""
    fleet, port = agent
    alice = fleet.identity("alice", ["dev"])

    async def session() -> None:
        s = await RawSession.open(port, alice, fleet.ca.pem, "dev-cache", "app")
        assert await s.call("AUTH", "app", APP_PASSWORD) == b"+OK"
        assert await s.call("SET", "k", "v") == b"+OK"
        s.close()

    seen = await wire.count(session())
    published = [without_host(s.subject) for s in seen if not s.subject.startswith("_INBOX")]
    # The start; the commands and the end (the commands alone, then the end alone, when
    # the batch timer fires between the SET and the close: 0.2 s apart, it rarely does).
    start, query, end = (
        subjects.audit_subject(t)
        for t in ("db.session.start", "db.session.query", "db.session.end")
    )
    assert published in ([start, query], [start, query, end]), [(s.subject, s.reply) for s in seen]
    assert len(seen) == 2 * len(published), [(s.subject, s.reply) for s in seen]  # acks
    # Nothing was lost: every event reads back, in order.
    found = await wait_events(fleet.bus, 6, "the session's events", user="alice")
    events = [e for e in found if e.session_id == found[-1].session_id]  # not the warm-up's
    assert [e.type for e in events] == [
        "db.session.start", "db.session.query", "db.session.query", "db.session.end"
    ]  # fmt: skip
    assert isinstance(events[1], SessionQuery) and events[1].args == ("app", "******")
    assert isinstance(events[-1], SessionEnd) and events[-1].commands == 2


async def test_a_role_edit_reaches_the_agent_through_its_watch(
    agent: tuple[Fleet, int],
) -> None:
    """Roles come from the agent's watch of the registry: a revoked role refuses the
    next connection without a read per session, and so does a deleted one."""
    fleet, port = agent
    alice = fleet.identity("alice", ["dev"])
    session = await RawSession.open(port, alice, fleet.ca.pem, "dev-cache", "app")
    session.close()
    await put_role(fleet.bus, Role.model_validate({"name": "dev", "allow": {"db_users": ["x"]}}))
    with pytest.raises(Exception, match="none of your roles allows access to dev-cache"):
        await RawSession.open(port, alice, fleet.ca.pem, "dev-cache", "app")
    await put_roles(fleet.bus)
    (await RawSession.open(port, alice, fleet.ca.pem, "dev-cache", "app")).close()
    await fleet.bus.delete(subjects.ROLES_BUCKET, subjects.role_key("dev"))
    with pytest.raises(Exception, match="you have no roles, so no database access"):
        await RawSession.open(port, alice, fleet.ca.pem, "dev-cache", "app")
