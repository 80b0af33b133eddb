"""Real parts for every test: nats-server with JetStream and moto's server as AWS."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from bus import Bus
from bus.server import NatsServer
from sandbox.aws import MotoServer

logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log


@pytest.fixture(autouse=True)
def fleetgate_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Every test gets its own empty FLEETGATE_HOME (and NATS URL unset), so a login or
    setting of the person running the tests never changes what a test sees."""
    home = tmp_path_factory.mktemp("fleetgate-home")
    monkeypatch.setenv("FLEETGATE_HOME", str(home))
    monkeypatch.delenv("FLEETGATE_NATS_URL", raising=False)
    return home


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh ``nats-server -js`` on an ephemeral loopback port with its own store."""
    server = NatsServer(tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
async def bus(nats_server: NatsServer) -> AsyncIterator[Bus]:
    """A connected bus client with the registry buckets provisioned."""
    client = await Bus.connect(nats_server.url, name="test")
    await client.provision()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    server = MotoServer().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def aws(moto_server: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> MotoServer:
    """moto with no resources, and this process's AWS environment pointed at it."""
    moto_server.reset()
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    for key, value in moto_server.environ().items():
        monkeypatch.setenv(key, value)
    return moto_server
