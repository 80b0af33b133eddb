"""deploy/nats/nats-server.conf against a real nats-server: each process may write only
what it owns, and every reader can still watch the registry."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest

from bus import Bus, DatabaseResource, DatabaseSpec, Metadata, RegistryError, subjects
from bus.schemas import FetcherStatus, utcnow
from bus.server import NatsServer

CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "nats" / "nats-server.conf"
USERS = ("discovery", "agent", "reader", "admin")


def db(name: str) -> DatabaseResource:
    return DatabaseResource(metadata=Metadata(name=name), spec=DatabaseSpec(uri=f"{name}:6379"))


@pytest.fixture
def secured(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[NatsServer]:
    for user in USERS:
        monkeypatch.setenv(f"FLEETGATE_NATS_{user.upper()}_PASSWORD", f"pw-{user}")
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


async def test_each_process_writes_only_what_it_owns(
    connect: Callable[[str], Awaitable[Bus]],
) -> None:
    connect_as = connect
    admin: Bus = await connect_as("admin")
    await admin.provision()
    await admin.bucket(subjects.DB_SERVERS_BUCKET)

    discovery: Bus = await connect_as("discovery")
    await discovery.provision()  # buckets exist: opening them is allowed
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
    with pytest.raises(RegistryError, match="may this NATS user do that"):
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
