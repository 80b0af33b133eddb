"""Helpers for the agent tests: configs, an in-process agent, polling with deadlines."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from bus import AWSSpec, Bus, DatabaseResource, DatabaseSpec, MemoryDBSpec, Metadata
from bus.schemas import TLSSettings
from bus.servers import DbServerHeartbeat
from dbservice.agent.app import Agent
from dbservice.agent.config import AgentConfig
from dbservice.agent.health import Prober, probe

FAST: dict[str, Any] = {
    "health_check": {"interval": "1s", "timeout": "1s", "healthy_threshold": 2},
    "heartbeat": {"interval": "1s", "ttl": "3s"},
}


def agent_config(tmp: Path, name: str, **service: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"hostname": name, "data_dir": str(tmp / name), **FAST}
    body.update(service)
    return {"db_service": body}


def db(
    name: str,
    uri: str,
    *,
    tls: TLSSettings | None = None,
    memorydb: bool = False,
    **labels: str,
) -> DatabaseResource:
    aws = None
    if memorydb:
        aws = AWSSpec(
            region="us-east-1",
            account_id="123456789012",
            memorydb=MemoryDBSpec(
                cluster_name=name, tls_enabled=tls is None or tls.mode != "disabled"
            ),
        )
    return DatabaseResource(
        metadata=Metadata(name=name, labels={k.replace("_", "-"): v for k, v in labels.items()}),
        spec=DatabaseSpec(uri=uri, tls=tls or TLSSettings(mode="disabled"), aws=aws),
    )


async def wait_until(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool],
    limit: float = 10.0,
    what: str = "condition",
) -> float:
    """Poll ``check`` until true; return the seconds it took; AssertionError at the deadline."""
    began = time.monotonic()
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return time.monotonic() - began
        if time.monotonic() - began > limit:
            raise AssertionError(f"timed out after {limit}s waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running_agent(
    config: dict[str, Any], url: str, *, prober: Prober = probe
) -> AsyncIterator[Agent]:
    """An agent in this process, synced with the registry; stopped (and checked to stop
    cleanly) on exit."""
    agent = Agent(AgentConfig.model_validate(config), nats_url=url, prober=prober)
    stop = asyncio.Event()
    task = asyncio.create_task(agent.run(stop))
    try:
        await wait_until(lambda: agent.synced.is_set() or task.done(), 15, "agent sync")
        if task.done():
            task.result()
        yield agent
    finally:
        stop.set()
        assert await asyncio.wait_for(task, 15) == 0


async def servers(bus: Bus) -> list[DbServerHeartbeat]:
    return await bus.list_db_servers()


async def placement(bus: Bus) -> dict[str, set[str]]:
    """hostname -> names of the databases it announces."""
    out: dict[str, set[str]] = {}
    for hb in await servers(bus):
        out.setdefault(hb.hostname, set()).add(hb.name)
    return out


async def health(bus: Bus) -> dict[tuple[str, str], DbServerHeartbeat]:
    """(hostname, database) -> heartbeat."""
    return {(hb.hostname, hb.name): hb for hb in await servers(bus)}
