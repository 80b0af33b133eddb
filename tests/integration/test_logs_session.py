"""JSON log lines about a session carry its id (and the client's address, user and
database), so logs join audit events: a real agent, real NATS, valkey-server and TLS
clients; the lines are parsed back and compared with the events on the audit stream."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from dbservice.auth.admin import sign_host
from dbservice.gateway.listener import RefusalLog
from dbservice.route import RouteRefused
from fleetgate.logs import ContextFilter, JsonFormatter, bind_context
from sandbox.ports import free_port
from sandbox.valkeynode import ValkeyNode
from tests.kits.agent import running_agent, wait_until
from tests.kits.listener import (
    APP_PASSWORD,
    Fleet,
    RawSession,
    static_db,
    wait_events,
)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """The root logger's records as JSON lines, wired as ``--log-format json`` wires them."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.addFilter(ContextFilter())
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield out
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def parsed(out: io.StringIO, logger: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    return [line for line in lines if line["logger"] == logger]


async def test_session_lines_carry_the_audit_session_id(
    fleet: Fleet, valkey: ValkeyNode, json_lines: io.StringIO
) -> None:
    config = fleet.agent(
        "agent-1",
        [
            static_db("dev-cache", valkey.port, env="dev"),
            static_db("dev-down", free_port(), env="dev"),
        ],
    )
    alice = fleet.identity("alice", ["dev"])
    async with running_agent(config, fleet.nats_url) as agent:
        listener = agent.listener
        assert listener is not None
        # refused before the session begins (no such database)
        with pytest.raises(RouteRefused):
            await RawSession.open(listener.port, alice, fleet.ca.pem, "no-such-db", "app")
        # refused as the session begins: its upstream is down
        with pytest.raises(RouteRefused, match="cannot reach dev-down"):
            await RawSession.open(listener.port, alice, fleet.ca.pem, "dev-down", "app")
        # a session that runs (its opening line is a debug line)
        session = await RawSession.open(listener.port, alice, fleet.ca.pem, "dev-cache", "app")
        try:
            assert await session.call("AUTH", "app", APP_PASSWORD) == b"+OK"
        finally:
            session.close()
        await wait_until(lambda: listener.established == 0, 10, "the session ended")
        down = (await wait_events(fleet.bus, 1, "refused start", database="dev-down"))[0]
        no_db = (await wait_events(fleet.bus, 1, "refused start", database="no-such-db"))[0]
        ran = (await wait_events(fleet.bus, 1, "session end", type="db.session.end"))[0]

    lines = parsed(json_lines, "dbservice.gateway.listener")
    refused = [line for line in lines if "refused" in line["message"]]
    by_db = {line.get("database"): line for line in refused}

    # the upstream refusal: the same session id as its audit event
    line = by_db["dev-down"]
    assert down.session_id and line["session_id"] == down.session_id, line
    assert (line["user"], line["client_addr"]) == ("alice", down.client_addr)
    assert line["client_addr"].startswith("127.0.0.1:")

    # the route refusal, before the session began: the refusal's event has the same id
    line = by_db["no-such-db"]
    assert no_db.session_id and line["session_id"] == no_db.session_id, line
    assert (line["user"], line["client_addr"]) == ("alice", no_db.client_addr)
    assert no_db.session_id != down.session_id

    # the session that ran: its lines carry its id, the audit events' one
    opened = [line for line in lines if line.get("session_id") == ran.session_id]
    assert opened, lines
    assert all(line["database"] == "dev-cache" for line in opened)

    # lines about no session (the agent's own) carry none of it
    own = parsed(json_lines, "dbservice.agent.app")
    assert own and not any("session_id" in line or "client_addr" in line for line in own)


async def test_a_failed_session_is_reported_with_its_context(
    fleet: Fleet, valkey: ValkeyNode, json_lines: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The line that reports a session task's unexpected failure (logged when the task
    is done, outside it) carries the client's address, user and database all the same."""
    config = fleet.agent("agent-1", [static_db("dev-cache", valkey.port, env="dev")])
    alice = fleet.identity("alice", ["dev"])
    async with running_agent(config, fleet.nats_url) as agent:
        listener = agent.listener
        assert listener is not None

        async def broken(*_args: object) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(listener, "_session", broken)
        with pytest.raises((RouteRefused, OSError, asyncio.IncompleteReadError)):
            session = await RawSession.open(listener.port, alice, fleet.ca.pem, "dev-cache", "app")
            try:
                await session.call("PING")
            finally:
                session.close()

        def failed() -> list[dict[str, Any]]:
            lines = parsed(json_lines, "dbservice.gateway.listener")
            return [line for line in lines if line["message"] == "a client session failed"]

        await wait_until(lambda: bool(failed()), 10, "the failure logged")
    line = failed()[0]
    assert "RuntimeError: a bug" in line["exception"]
    assert (line["user"], line["database"]) == ("alice", "dev-cache")
    assert line["client_addr"].startswith("127.0.0.1:")


async def test_the_refusal_summary_is_about_no_one_client(json_lines: io.StringIO) -> None:
    """Limits are logged as one line per interval over many clients: that line carries
    no client's context, not even the first noted one's."""
    refusals = RefusalLog(interval=0.01)

    async def serve() -> None:
        bind_context(client_addr="127.0.0.1:5000", user="alice", database="dev-cache")
        refusals.note("over listener.max_connections")

    await asyncio.create_task(serve())
    await wait_until(lambda: refusals.lines == 1, 10, "the summary line")
    (line,) = parsed(json_lines, "dbservice.gateway.listener")
    assert "1 over listener.max_connections" in line["message"]
    assert not {"client_addr", "user", "database"} & set(line), line


async def test_engine_warnings_carry_the_session_id(fleet: Fleet, json_lines: io.StringIO) -> None:
    """A warning the proxy engine logs while serving a session (the server's reply does
    not parse) carries that session's id, the one of its audit events."""

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while await reader.read(65536):
                writer.write(b"@not RESP\r\n")
                await writer.drain()
        writer.close()

    server = await asyncio.start_server(garbage, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = fleet.agent("agent-1", [static_db("dev-odd", port, env="dev")])
    alice = fleet.identity("alice", ["dev"])
    try:
        async with running_agent(config, fleet.nats_url) as agent:
            listener = agent.listener
            assert listener is not None
            session = await RawSession.open(listener.port, alice, fleet.ca.pem, "dev-odd", "app")
            try:
                with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                    await session.call("AUTH", "app", APP_PASSWORD)
                    await session.call("GET", "k")
            finally:
                session.close()
            await wait_until(lambda: listener.established == 0, 10, "the session ended")
            ended = await wait_events(fleet.bus, 1, "session end", type="db.session.end")
    finally:
        server.close()
    lines = parsed(json_lines, "dbservice.engine.proxy.session")
    warned = [line for line in lines if "did not parse" in line["message"]]
    assert warned, lines
    assert warned[0]["session_id"] == ended[0].session_id
    assert warned[0]["database"] == "dev-odd"


async def test_reloading_the_listener_certificate_is_about_no_session(
    fleet: Fleet, valkey: ValkeyNode, json_lines: io.StringIO
) -> None:
    """The listener notices its renewed certificate when a client connects; the line
    that says so is about the agent, not about that client."""
    config = fleet.agent("agent-1", [static_db("dev-cache", valkey.port, env="dev")])
    alice = fleet.identity("alice", ["dev"])
    async with running_agent(config, fleet.nats_url) as agent:
        listener = agent.listener
        assert listener is not None
        sign_host(fleet.ca, ["127.0.0.1"], 7200, fleet.tmp / "agent-1-tls")  # renewed
        session = await RawSession.open(listener.port, alice, fleet.ca.pem, "dev-cache", "app")
        session.close()
    lines = parsed(json_lines, "dbservice.gateway.listener")
    (line,) = [line for line in lines if "changed: loading it" in line["message"]]
    assert not {"client_addr", "session_id", "user", "database"} & set(line), line
