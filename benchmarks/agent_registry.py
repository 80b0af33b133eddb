"""Agent benchmark: a registry of 10,000 databases, an agent whose matchers select 1,000.

A real ``nats-server -js`` holds the registry and one plain valkey-server answers every
health probe. The agent runs as its own process (``python -m fleetgate agent run``), so
its memory is its own. Printed: time to the agent's first synced state, its RSS, and
the latency from a registry write to the matching heartbeat (median and 99th percentile).

    python benchmarks/agent_registry.py [--databases 10000] [--selected 1000] [--samples 200]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _HERE]

from bus import Bus, DatabaseResource, DatabaseSpec, Metadata, subjects  # noqa: E402
from bus.schemas import TLSSettings  # noqa: E402
from bus.server import NatsServer  # noqa: E402
from bus.servers import DbServerHeartbeat  # noqa: E402
from sandbox.valkeynode import ValkeyNode  # noqa: E402

VPCS = 10
SYNCED = re.compile(r"agent synced in ([0-9.]+)s: serving (\d+) databases")


def resource(i: int, vpc: int, port: int) -> DatabaseResource:
    return DatabaseResource(
        metadata=Metadata(
            name=f"db-{i:05d}",
            labels={"vpc-id": f"vpc-{vpc}", "env": ("prod", "staging", "dev")[i % 3]},
        ),
        spec=DatabaseSpec(uri=f"127.0.0.1:{port}", tls=TLSSettings(mode="disabled")),
    )


def rss(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of ``pid`` in MiB."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return (int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024)


async def seed(bus: Bus, total: int, selected: int, port: int) -> float:
    """``total`` databases; the first ``selected`` in vpc-0, the rest spread over the others."""
    began = time.monotonic()
    batch: list[asyncio.Future[int]] = []
    for i in range(total):
        vpc = 0 if i < selected else 1 + i % (VPCS - 1)
        batch.append(asyncio.ensure_future(bus.put_resource(resource(i, vpc, port))))
        if len(batch) >= 500:
            await asyncio.gather(*batch)
            batch = []
    await asyncio.gather(*batch)
    return time.monotonic() - began


async def main(args: argparse.Namespace) -> int:
    work = Path(tempfile.mkdtemp(prefix="fleetgate-bench-agent-"))
    nats = NatsServer(work / "nats").start()
    valkey = ValkeyNode(index=0, directory=work / "valkey", client_port=0)
    await valkey.start()
    agent: subprocess.Popen[bytes] | None = None
    try:
        bus = await Bus.connect(nats.url, name="bench")
        await bus.provision()
        took = await seed(bus, args.databases, args.selected, valkey.port)
        print(
            f"machine      {platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, {platform.system()}"
        )
        print(
            f"registry     {args.databases} databases written in {took:.1f}s; "
            f"the matcher {{vpc-id: vpc-0}} selects {args.selected}"
        )

        seen: dict[str, float] = {}
        arrived = asyncio.Event()

        async def watch() -> None:
            async for event in bus.watch(subjects.DB_SERVERS_BUCKET, DbServerHeartbeat):
                if event.kind == "upsert" and event.value is not None:
                    seen.setdefault(event.value.name, time.monotonic())
                    arrived.set()

        watcher = asyncio.create_task(watch())
        config = {
            "db_service": {
                "hostname": "bench-agent",
                "data_dir": str(work / "agent"),
                "resources": [{"labels": {"vpc-id": "vpc-0"}}],
                "health_check": {"interval": "30s", "timeout": "5s"},
                "heartbeat": {"interval": "10s", "ttl": "30s"},
            }
        }
        config_file = work / "agent.yaml"
        config_file.write_text(yaml.safe_dump(config))
        log_file = work / "agent.log"
        started = time.monotonic()
        with log_file.open("wb") as log:
            agent = subprocess.Popen(  # noqa: ASYNC220 - started once, not awaited
                [
                    sys.executable,
                    "-m",
                    "fleetgate",
                    "agent",
                    "run",
                    "-c",
                    str(config_file),
                    "--nats",
                    nats.url,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        synced_in, served = None, 0
        while synced_in is None:
            match = SYNCED.search(log_file.read_text(errors="replace"))
            if match:
                synced_in, served = float(match.group(1)), int(match.group(2))
                break
            if agent.poll() is not None:
                raise RuntimeError("the agent exited:\n" + log_file.read_text()[-2000:])
            await asyncio.sleep(0.01)
        synced_wall = time.monotonic() - started
        rss_synced = rss(agent.pid)
        while len(seen) < args.selected:
            await arrived.wait()
            arrived.clear()
        all_wall = time.monotonic() - started
        await asyncio.sleep(3)  # first probes done, heartbeats flowing
        rss_steady = rss(agent.pid)
        print(
            f"first sync   {synced_in:.3f}s inside the agent (connect, watch {args.databases}, "
            f"start {served} workers); {synced_wall:.2f}s from process start, imports included"
        )
        print(f"heartbeats   all {args.selected} visible {all_wall:.2f}s after process start")

        latencies = []
        for n in range(args.samples):
            name = f"db-{args.databases + n:05d}"
            arrived.clear()
            t0 = time.monotonic()
            await bus.put_resource(resource(args.databases + n, 0, valkey.port))
            while name not in seen:
                await arrived.wait()
                arrived.clear()
            latencies.append((seen[name] - t0) * 1000)
        latencies.sort()
        p99 = latencies[min(len(latencies) - 1, round(0.99 * len(latencies)) - 1)]
        print(
            f"write->beat  {args.samples} new matching databases, one at a time: "
            f"median {statistics.median(latencies):.1f} ms, p99 {p99:.1f} ms, "
            f"max {latencies[-1]:.1f} ms"
        )
        rss_end = rss(agent.pid)
        print(
            f"agent memory RSS {rss_synced[0]:.1f} MiB at first sync, {rss_steady[0]:.1f} MiB "
            f"serving {args.selected}, {rss_end[0]:.1f} MiB serving "
            f"{args.selected + args.samples}; peak {rss_end[1]:.1f} MiB"
        )
        stop_began = time.monotonic()
        agent.terminate()
        code = agent.wait(30)
        print(
            f"stop         SIGTERM -> exit {code} in {time.monotonic() - stop_began:.2f}s "
            f"({args.selected + args.samples} heartbeats deleted)"
        )
        watcher.cancel()
        await bus.close()
        return 0 if code == 0 else 1
    finally:
        if agent is not None and agent.poll() is None:
            agent.kill()
            agent.wait()
        await valkey.stop()
        nats.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--databases", type=int, default=10_000)
    parser.add_argument("--selected", type=int, default=1_000)
    parser.add_argument("--samples", type=int, default=200)
    sys.exit(asyncio.run(main(parser.parse_args())))
