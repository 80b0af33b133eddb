"""A region cut off from the fleet: the agent loses NATS (a nats-server stopped and
started again on the same port and store, which is what a cut leaf link looks like to
it) and keeps serving, within ``offline_grace``, with its audit kept on disk and
delivered once, in order, when NATS is back, also across a restart of the agent."""

from __future__ import annotations

import asyncio
import os
import stat
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from bus import Bus, leases
from bus.access import Role, put_role
from bus.audit import EventsDropped, SessionEnd, SessionQuery, SessionStart
from bus.server import NatsServer, wait_port_free
from dbservice.agent.app import Agent
from dbservice.agent.config import AgentConfig
from dbservice.gateway.audit_spool import spool_dir
from dbservice.managed.aws import ManagedAws, SecretVersion
from dbservice.managed.passwords import ManagedPasswords
from dbservice.managed.rotation import UserRef
from dbservice.route import RouteRefused
from tests.kits.agent import running_agent, wait_until
from tests.kits.common import spooled
from tests.kits.listener import (
    APP_PASSWORD,
    ROLES,
    RawSession,
    add_acl_users,
    audit_events,
    make_fleet,
    static_db,
)
from tests.kits.proxy import serve_single_node

pytestmark = pytest.mark.timeout(120)

GRACE = 4.0


@pytest.fixture(scope="module")
def valkey_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    for node in serve_single_node(tmp_path_factory.mktemp("valkey"), setup=add_acl_users):
        yield node.port


def stop_nats(server: NatsServer) -> int:
    port = server.port
    server.stop()
    wait_port_free("127.0.0.1", port)
    return port


def start_nats(server: NatsServer, port: int) -> None:
    server.port = port
    server.start()


async def open_session(port: int, identity: Path, ca_pem: str) -> RawSession:
    session = await RawSession.open(port, identity, ca_pem, "dev-cache", "app")
    assert await session.call("AUTH", "app", APP_PASSWORD) == b"+OK"
    return session


def spooled_lines(directory: Path) -> int:
    return spooled(directory).count(b"\n")


@pytest.mark.leaks(
    "nats-py's Client.close raises ConnectionResetError when it still holds unsent data "
    "while reconnecting, before it cancels its subscriptions: the agent stopped during the "
    "outage leaves its request inbox's task (the process exits there)"
)
async def test_cut_off_agent_serves_within_grace_and_delivers_its_audit_once(
    nats_server: NatsServer, tmp_path: Path, valkey_port: int
) -> None:
    async with await Bus.connect(nats_server.url, name="setup") as setup:
        await setup.provision()
        fleet = await make_fleet(setup, tmp_path, nats_server.url)
    config = fleet.agent(
        "agent-1",
        [static_db("dev-cache", valkey_port, env="dev")],
        offline_grace=f"{GRACE:g}s",
    )
    alice = fleet.identity("alice", ["dev"])
    data_dir = Path(config["db_service"]["data_dir"])
    spool = spool_dir(data_dir, 0)
    sent: dict[str, list[str]] = {}
    """Session label -> the values it SET, in order."""
    sessions: list[RawSession] = []
    try:
        async with running_agent(config, nats_server.url) as agent:
            listener = agent.listener
            assert listener is not None
            await wait_until(listener.roles.synced.is_set, 10, "the roles watch")
            first = await open_session(listener.port, alice, fleet.ca.pem)
            sessions.append(first)
            sent["first"] = []

            async def write(session: RawSession, label: str, n: int) -> None:
                for _ in range(n):
                    value = f"{label}-{len(sent[label])}"
                    assert await session.call("SET", f"k-{label}", value) == b"+OK"
                    sent[label].append(value)

            await write(first, "first", 3)

            port = stop_nats(nats_server)
            # The session already open keeps working while NATS is away.
            await write(first, "first", 5)
            await wait_until(lambda: not listener.link.linked, 10, "the agent to see the cut")
            # A role edited in the registry before the cut still applies: the agent
            # checks new sessions against the roles it watched.
            second = await open_session(listener.port, alice, fleet.ca.pem)
            sessions.append(second)
            sent["second"] = []
            await write(second, "second", 4)
            assert await second.call("FLUSHALL") == (
                b"-NOPERM role dev denies the command FLUSHALL"
            )
            # Beyond offline_grace: new sessions are refused, saying why.
            await wait_until(lambda: listener.link.cut_for() > GRACE + 0.2, 15, "the grace")
            with pytest.raises(RouteRefused) as refused:
                await RawSession.open(listener.port, alice, fleet.ca.pem, "dev-cache", "app")
            reason = refused.value.reason
            assert "this agent has been cut off from the fleet for " in reason
            assert f"(offline_grace {GRACE:g}s): new sessions are refused until it reconnects" in (
                reason
            )
            # ... while the open ones are not cut.
            await write(first, "first", 2)
            await write(second, "second", 2)
            # Their audit is on the agent's disk, not lost.
            await wait_until(lambda: listener.audit.spooling, 10, "spooling")
            await wait_until(lambda: spooled_lines(spool) > 0, 10, "spooled events")
            for session in sessions:
                session.close()
            await wait_until(lambda: listener.established == 0, 10, "the sessions to end")
        # The agent stopped while NATS is still away: its events wait in the spool.
        assert stat.S_IMODE(os.stat(spool).st_mode) == 0o700
        files = [p for p in spool.iterdir()]
        assert files and all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in files)
        waiting = spooled_lines(spool)
        assert waiting >= 3  # at least the refused start and two session ends

        # Restart the agent while NATS is down; NATS comes back while it waits.
        agent2 = Agent(AgentConfig.model_validate(config), nats_url=nats_server.url)
        stop = asyncio.Event()
        task = asyncio.create_task(agent2.run(stop))
        try:
            await asyncio.sleep(1.0)
            assert not task.done()
            start_nats(nats_server, port)
            await wait_until(lambda: agent2.synced.is_set() or task.done(), 30, "agent sync")
            listener2 = agent2.listener
            assert listener2 is not None
            await wait_until(lambda: listener2.audit.backlog == 0, 30, "the spool delivered")
            assert spooled_lines(spool) == 0
            # New sessions open again.
            third = await open_session(listener2.port, alice, fleet.ca.pem)
            sent["third"] = []
            await write(third, "third", 2)
            third.close()
            await wait_until(lambda: listener2.established == 0, 10, "the third session")
        finally:
            stop.set()
            assert await asyncio.wait_for(task, 30) == 0

        async with await Bus.connect(nats_server.url, name="reader") as reader:
            events = await audit_events(reader)
        ids = Counter(e.id for e in events)
        assert [i for i, n in ids.items() if n > 1] == []  # none duplicated
        starts = [e for e in events if isinstance(e, SessionStart)]
        ok_starts = [e for e in starts if e.success]
        assert len(ok_starts) == 3
        refusals = [e for e in starts if not e.success]
        assert any("cut off from the fleet" in e.reason for e in refusals)
        by_session: dict[str, list[str]] = {}
        order = [e.session_id for e in ok_starts]
        for event in events:
            if isinstance(event, SessionQuery) and event.command == "SET":
                by_session.setdefault(event.session_id, []).append(event.args[1])
        # Every command once, in the order it was sent, session by session.
        assert [by_session.get(s, []) for s in order] == [
            sent["first"],
            sent["second"],
            sent["third"],
        ]
        for session_id in order:
            mine = [e for e in events if e.session_id == session_id]
            assert isinstance(mine[0], SessionStart) and isinstance(mine[-1], SessionEnd)
        ends = {e.session_id: e for e in events if isinstance(e, SessionEnd)}
        assert ends[order[0]].commands == len(sent["first"]) + 1  # + its AUTH
    finally:
        for session in sessions:
            session.close()


async def test_roles_edited_while_linked_apply_to_the_next_session(
    bus: Bus, nats_server: NatsServer, tmp_path: Path, valkey_port: int
) -> None:
    """While the agent reaches the fleet, a new session still reads its roles fresh."""
    fleet = await make_fleet(bus, tmp_path, nats_server.url)
    config = fleet.agent("agent-1", [static_db("dev-cache", valkey_port, env="dev")])
    alice = fleet.identity("alice", ["dev"])
    async with running_agent(config, nats_server.url) as agent:
        listener = agent.listener
        assert listener is not None
        session = await open_session(listener.port, alice, fleet.ca.pem)
        session.close()
        await put_role(
            bus, Role.model_validate({"name": "dev", "deny": {"db_labels": {"env": "dev"}}})
        )
        with pytest.raises(RouteRefused, match="role dev denies access to dev-cache"):
            await RawSession.open(listener.port, alice, fleet.ca.pem, "dev-cache", "app")
        await put_role(bus, Role.model_validate({"name": "dev", **ROLES["dev"]}))
        session = await open_session(listener.port, alice, fleet.ca.pem)
        session.close()


class OneSecret:
    """The Secrets Manager side of :class:`ManagedPasswords` (our seam): one password."""

    def __init__(self) -> None:
        self.reads = 0

    async def get_version(self, name: str, stage: str) -> SecretVersion | None:
        self.reads += 1
        return SecretVersion("v1", "s3cret") if stage == "AWSPREVIOUS" else None


@pytest.mark.leaks(
    "nats-py's Client.close raises ConnectionResetError when it still holds unsent data "
    "while reconnecting, before it cancels its subscriptions"
)
async def test_managed_logins_use_the_cached_password_while_nats_is_away(
    nats_server: NatsServer,
) -> None:
    """Each managed login reads the user's record from NATS; cut off, that read waited
    out the request timeout (10 s) on every new session before using the cache."""
    bus = await Bus.connect(nats_server.url, name="agent", reconnect_wait=0.1)
    try:
        await bus.provision(leases.LEASES)
        secret = OneSecret()
        passwords = ManagedPasswords(bus, lambda ref: cast(ManagedAws, secret))
        ref = UserRef("svc", "eu-west-1", "123456789012", "arn:user/svc", (), "fleetgate/svc")
        assert (await passwords.password(ref)).password == "s3cret"
        stop_nats(nats_server)
        await wait_until(lambda: not bus.nc.is_connected, 10, "the client to see the cut")
        async with asyncio.timeout(1.5):
            assert (await passwords.password(ref)).password == "s3cret"
        assert secret.reads == 1
    finally:
        await bus.close()


@pytest.mark.leaks(
    "nats-py's Client.close raises ConnectionResetError when it still holds unsent data "
    "while reconnecting, before it cancels its subscriptions"
)
async def test_a_full_spool_refuses_commands_and_sessions_until_nats_takes_it(
    nats_server: NatsServer, tmp_path: Path, valkey_port: int
) -> None:
    async with await Bus.connect(nats_server.url, name="setup") as setup:
        await setup.provision()
        fleet = await make_fleet(setup, tmp_path, nats_server.url)
    config = fleet.agent("agent-1", [static_db("dev-cache", valkey_port, env="dev")])
    config["db_service"]["listener"]["audit"] = {"spool_max_bytes": "1MiB"}
    alice = fleet.identity("alice", ["dev"])
    session: RawSession | None = None
    async with running_agent(config, nats_server.url) as agent:
        listener = agent.listener
        assert listener is not None
        session = await open_session(listener.port, alice, fleet.ca.pem)
        port = stop_nats(nats_server)
        value = "v" * 250
        full = b"-ERR the agent's audit spool is full (1 MiB, listener.audit.spool_max_bytes)"
        for sent in range(20_000):
            reply = await session.call("SET", f"k{sent}", value)
            if reply != b"+OK":
                break
        assert reply.startswith(full), reply
        assert sent > 2000  # about 1 MiB of commands were recorded and run first
        assert await session.call("GET", "k0") == b"-" + full[1:] + reply[len(full) :]
        with pytest.raises(RouteRefused, match="the agent's audit spool is full"):
            await RawSession.open(listener.port, alice, fleet.ca.pem, "dev-cache", "app")
        start_nats(nats_server, port)
        await wait_until(lambda: not listener.audit.full(), 30, "the spool to drain")
        again = await open_session(listener.port, alice, fleet.ca.pem)
        assert await again.call("GET", "k0") == value.encode()
        again.close()
        session.close()
    async with await Bus.connect(nats_server.url, name="reader") as reader:
        events = await audit_events(reader)
    sets = [e for e in events if isinstance(e, SessionQuery) and e.command == "SET"]
    assert [e.args[0] for e in sets if e.success] == [f"k{i}" for i in range(sent)]
    drops = [e for e in events if isinstance(e, EventsDropped)]
    assert sum(e.dropped for e in drops) == 3  # the refused SET, GET and session
