"""``fleetgate agent run`` cut off from NATS and killed: what it spooled survives the
SIGKILL and reaches the stream once, in order, after a restart."""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from bus import Bus
from bus.audit import SessionQuery
from bus.server import NatsServer, wait_port_free
from dbservice.gateway.audit_spool import spool_dir
from dbservice.route import RouteRefused
from tests.e2e.test_agent_process import exited, start_agent
from tests.kits.agent import wait_until
from tests.kits.common import spooled
from tests.kits.listener import RawSession, audit_events, make_fleet, static_db
from tests.kits.proxy import serve_single_node

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def valkey_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    for node in serve_single_node(tmp_path_factory.mktemp("valkey")):
        yield node.port


async def test_a_killed_cut_off_agent_keeps_what_it_spooled(
    nats_server: NatsServer, tmp_path: Path, valkey_port: int
) -> None:
    async with await Bus.connect(nats_server.url, name="setup") as setup:
        await setup.provision()
        fleet = await make_fleet(setup, tmp_path, nats_server.url)
    config = fleet.agent("proc", [static_db("cache", valkey_port, env="standin")])
    config_file = tmp_path / "agent.yaml"
    config_file.write_text(yaml.safe_dump(config))
    port = int(config["db_service"]["listen_addr"].rsplit(":", 1)[1])
    spool = spool_dir(Path(config["db_service"]["data_dir"]), 0)
    bob = fleet.identity("bob", ["cache"])
    log = tmp_path / "agent.log"

    async def session() -> RawSession:
        return await RawSession.open(port, bob, fleet.ca.pem, "cache", "default")

    async def serving() -> bool:
        try:
            (await session()).close()
        except (OSError, RouteRefused):
            return False
        return True

    agent = start_agent(config_file, nats_server.url, log)
    sent: list[str] = []
    try:
        await wait_until(serving, 30, "the agent to serve")
        client = await session()
        for i in range(5):
            assert await client.call("SET", "k", f"linked-{i}") == b"+OK"
            sent.append(f"linked-{i}")
        nats_port = nats_server.port
        nats_server.stop()
        wait_port_free("127.0.0.1", nats_port)
        for i in range(200):
            assert await client.call("SET", "k", f"cut-{i}") == b"+OK"
            sent.append(f"cut-{i}")
        # On disk within the batch interval (0.2 s) once the agent knows NATS is gone.
        await wait_until(lambda: b'"cut-199"' in spooled(spool), 15, "the commands spooled")
        agent.send_signal(signal.SIGKILL)
        assert await exited(agent, 10) == -signal.SIGKILL
        client.close()

        agent = start_agent(config_file, nats_server.url, log)  # waits for NATS
        nats_server.port = nats_port
        nats_server.start()
        await wait_until(lambda: spooled(spool) == b"", 30, "the spool delivered")
        async with await Bus.connect(nats_server.url, name="reader") as reader:
            events = await audit_events(reader)
    finally:
        agent.send_signal(signal.SIGTERM)
        try:
            await exited(agent, 20)
        except AssertionError:
            agent.kill()  # not left for the next tests to trip over
            agent.wait()
            raise AssertionError(
                "the restarted agent did not stop on SIGTERM within 20s; its log:\n"
                + "\n".join(log.read_text().splitlines()[-15:])
            ) from None
    queries = [e for e in events if isinstance(e, SessionQuery) and e.command == "SET"]
    assert [n for n in Counter(e.id for e in queries).values() if n > 1] == []
    assert [e.args[1] for e in queries] == sent  # every command once, in order
