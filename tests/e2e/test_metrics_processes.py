"""An agent with listener processes (``listener.processes`` 2) and ``diag_addr`` P:
the agent process serves its diagnostics on P, listener process 1 on P + 1; together
their ``/metrics`` count every session once."""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from sandbox.ports import free_port
from sandbox.valkeynode import ValkeyNode
from tests.e2e.test_agent_processes import AgentProcess, session
from tests.kits.agent import wait_until
from tests.kits.listener import Fleet, static_db
from tests.kits.proxy import serve_single_node

pytestmark = [
    pytest.mark.timeout(90),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_REUSEPORT spreading"),
]


@pytest.fixture(scope="module")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyNode]:
    yield from serve_single_node(tmp_path_factory.mktemp("vk"))


def scrape(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


def opened(text: str) -> float:
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "fleetgate_agent_sessions_opened_total"
    )


async def test_each_listener_process_serves_its_own_metrics(
    fleet: Fleet, valkey: ValkeyNode, tmp_path: Path
) -> None:
    diag = free_port(offset=1)  # and diag + 1 for the second process
    config = fleet.agent(
        "multi", [static_db("cache", valkey.port, env="standin")], diag_addr=f"127.0.0.1:{diag}"
    )
    config["db_service"]["listener"]["processes"] = 2
    port = int(config["db_service"]["listen_addr"].rsplit(":", 1)[1])
    carol = fleet.identity("carol", ["cache"])
    agent = AgentProcess(config, tmp_path, fleet.nats_url)
    try:
        await agent.listening(1)
        for p in (diag, diag + 1):
            await wait_until(lambda p=p: scrape(p, "/readyz")[0] == 200, 20, f"ready on {p}")
        assert "agent listener process 1: ready" in scrape(diag + 1, "/readyz")[1]
        assert "agent: ready" in scrape(diag, "/readyz")[1]
        for i in range(20):
            assert await session(fleet, port, carol, f"k{i}", agent.pids()) is not None
        counts = [opened(scrape(p, "/metrics")[1]) for p in (diag, diag + 1)]
        assert sum(counts) == 20, counts
        assert all(c > 0 for c in counts), counts  # the kernel spread them
        # only the agent process checks health and writes heartbeats
        assert "fleetgate_agent_heartbeats_written" in scrape(diag, "/metrics")[1]
        assert "fleetgate_agent_heartbeats_written" not in scrape(diag + 1, "/metrics")[1]
        assert await agent.stop() == 0
    finally:
        agent.kill()
