"""Discovery benchmark: one full poll of a large MemoryDB fleet, then an unchanged one.

moto's server (with fleetgate's MemoryDB extensions: pages of 100 records) runs in
a child process, which also seeds it, so that this process holds only discovery and its
memory figures are discovery's own. A real ``nats-server -js`` holds the registry.

    python benchmarks/discovery.py [--clusters N]

Targets (issue 2): AWS calls per cluster <= 1.05 on a full poll, and zero registry
writes on a poll of an unchanged fleet.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

# Run as a script, this file's directory comes first on sys.path, and the file is named
# like the package it measures: keep the directory off the path so `discovery` is the
# package.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or os.curdir).resolve() != _HERE]

from bus import Bus  # noqa: E402
from bus.server import NatsServer  # noqa: E402
from discovery.aws.session import AwsSession  # noqa: E402
from discovery.poller import Poller, PollReport  # noqa: E402
from discovery.settings import DiscoveryService  # noqa: E402
from fleetgate.aio import run  # noqa: E402

REGIONS = ("us-east-1", "us-west-2", "eu-west-1", "ap-southeast-2")
ACCOUNT = "123456789012"  # moto's account for the sandbox credentials
OTHER_ACCOUNT = "222222222222"
ROLE = f"arn:aws:iam::{OTHER_ACCOUNT}:role/fleetgate-discovery"
EXTERNAL_ID = "benchmark"
SUBNET_GROUPS = 2  # per region and account
SEED_THREADS = 8
CALLS_TARGET = 1.05
SELECTOR = {"env": ["prod", "stag*"]}


# -- moto and seeding (child process) ------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """One region of one account; ``role`` None means the sandbox's own credentials."""

    account: str
    region: str
    role: str | None


CELLS = [Cell(ACCOUNT, r, None) for r in REGIONS] + [Cell(OTHER_ACCOUNT, r, ROLE) for r in REGIONS]


def _clients(cell: Cell) -> tuple[Any, Any]:
    """ec2 and memorydb clients for ``cell`` (botocore clients are thread-safe)."""
    import boto3

    kwargs: dict[str, Any] = {"region_name": cell.region}
    if cell.role:
        creds = boto3.client("sts", region_name=cell.region).assume_role(
            RoleArn=cell.role, RoleSessionName="seed", ExternalId=EXTERNAL_ID
        )["Credentials"]
        kwargs.update(
            aws_access_key_id=creds["AccessKeyId"],
            aws_secret_access_key=creds["SecretAccessKey"],
            aws_session_token=creds["SessionToken"],
        )
    return boto3.client("ec2", **kwargs), boto3.client("memorydb", **kwargs)


def _seed(clusters: int) -> tuple[float, float]:
    """Subnet groups (each in its own VPC), then ``clusters`` clusters spread evenly over
    the cells, with tags; through moto's HTTP API, as an operator would. Returns the
    seconds spent on networks and on clusters."""
    started = time.perf_counter()
    clients = {cell: _clients(cell) for cell in CELLS}

    def network(job: tuple[int, Cell]) -> None:
        index, cell = job
        ec2, memorydb = clients[cell]
        cidr = f"10.{index}.0.0/16"
        vpc = ec2.create_vpc(CidrBlock=cidr)["Vpc"]["VpcId"]
        subnet = ec2.create_subnet(VpcId=vpc, CidrBlock=cidr.replace("/16", "/24"))
        memorydb.create_subnet_group(
            SubnetGroupName=f"sg-{index % SUBNET_GROUPS}",
            SubnetIds=[subnet["Subnet"]["SubnetId"]],
        )

    def cluster(i: int) -> None:
        cell = CELLS[i % len(CELLS)]
        _, memorydb = clients[cell]
        memorydb.create_cluster(
            ClusterName=f"cache-{i:05d}",
            NodeType="db.t4g.small",
            ACLName="open-access",
            TLSEnabled=True,
            SubnetGroupName=f"sg-{(i // len(CELLS)) % SUBNET_GROUPS}",
            Tags=[
                {"Key": "env", "Value": "prod" if i % 3 else "staging"},
                {"Key": "team", "Value": f"team-{i % 17}"},
                {"Key": "cost-center", "Value": f"cc-{i % 5}"},
            ],
        )

    with ThreadPoolExecutor(SEED_THREADS) as pool:
        jobs = [(n, cell) for cell in CELLS for n in range(SUBNET_GROUPS)]
        list(pool.map(network, jobs))
        networks = time.perf_counter() - started
        list(pool.map(cluster, range(clusters)))
    return networks, time.perf_counter() - started - networks


def _moto_child(conn: Connection, clusters: int) -> None:
    """Start moto, seed it, send (environ, timings), serve until told to stop."""
    from sandbox.aws import MotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = MotoServer().start()
    try:
        os.environ.pop("AWS_PROFILE", None)
        os.environ.update(server.environ())
        conn.send((server.environ(), _seed(clusters)))
        conn.recv()  # any message, or EOF when the parent goes away
    except EOFError:
        pass
    finally:
        server.stop()


@contextmanager
def moto(clusters: int) -> Iterator[tuple[dict[str, str], tuple[float, float]]]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=_moto_child, args=(child, clusters), daemon=True)
    proc.start()
    child.close()
    try:
        environ, timings = parent.recv()
        yield environ, timings
    finally:
        with suppress(OSError):
            parent.send("stop")
        proc.join(10)
        if proc.is_alive():
            proc.terminate()


# -- discovery (this process) --------------------------------------------------------


def settings() -> DiscoveryService:
    matcher: dict[str, Any] = {"types": ["memorydb"], "regions": list(REGIONS), "tags": SELECTOR}
    return DiscoveryService.model_validate(
        {
            "discovery_group": "benchmark",
            "aws": [matcher, {**matcher, "assume_role_arn": ROLE, "external_id": EXTERNAL_ID}],
        }
    )


@dataclass
class Measured:
    report: PollReport
    calls: Counter[str]
    cpu_seconds: float
    tracemalloc_peak: int | None = None


async def _poll(poller: Poller, *, trace: bool = False) -> Measured:
    before = Counter(poller.session.calls)
    cpu = time.process_time()
    if trace:
        tracemalloc.start()
    try:
        report = await poller.poll_once()
        peak = tracemalloc.get_traced_memory()[1] if trace else None
    finally:
        if trace:
            tracemalloc.stop()
    cpu = time.process_time() - cpu
    return Measured(report, Counter(poller.session.calls) - before, cpu, peak)


async def benchmark(nats_url: str) -> tuple[Measured, Measured, Measured, int]:
    async with await Bus.connect(nats_url, name="fleetgate-benchmark") as bus:
        await bus.provision()
        poller = Poller(settings=settings(), bus=bus, session=AwsSession())
        rss_before = _maxrss()
        first = await _poll(poller)
        second = await _poll(poller)
        traced = await _poll(poller, trace=True)
    return first, second, traced, rss_before


def _maxrss() -> int:
    """Peak resident set size of this process in bytes (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def _calls(calls: Counter[str], clusters: int) -> list[str]:
    return [
        f"    {op:<34} {n:>6}  ({n / clusters:.4f}/cluster)"
        for op, n in sorted(calls.items(), key=lambda kv: (-kv[1], kv[0]))
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clusters", type=int, default=2000, help="clusters to seed")
    args = parser.parse_args(argv)
    if args.clusters < 1:
        parser.error("--clusters must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    with tempfile.TemporaryDirectory(prefix="fleetgate-bench-") as tmp:
        started = time.perf_counter()
        with moto(args.clusters) as (environ, (net_s, seed_s)):
            boot_s = time.perf_counter() - started - net_s - seed_s
            os.environ.pop("AWS_PROFILE", None)
            os.environ["AWS_CONFIG_FILE"] = str(Path(tmp) / "no-aws-config")
            os.environ["AWS_SHARED_CREDENTIALS_FILE"] = str(Path(tmp) / "no-aws-credentials")
            os.environ.update(environ)
            nats = NatsServer(Path(tmp) / "nats").start()
            try:
                first, second, traced, rss_before = run(benchmark(nats.url))
            finally:
                nats.stop()

    n = args.clusters
    r1, r2 = first.report, second.report
    seen = sum(r.clusters_seen for r in r1.results)
    per_cluster = r1.aws_calls / n
    calls_ok = per_cluster <= CALLS_TARGET
    writes_ok = r2.registry_writes == 0 and r2.status_writes == 0
    lines = [
        f"machine      {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}, {platform.system()}",
        f"fleet        {n} clusters over {len(REGIONS)} regions x 2 accounts "
        f"({len(CELLS)} fetchers, {SUBNET_GROUPS} subnet groups per region and account)",
        f"seeding      moto start {boot_s:.1f}s, clients and subnet groups {net_s:.1f}s, "
        f"{n} CreateCluster in {seed_s:.1f}s ({n / seed_s:.0f}/s, {SEED_THREADS} threads)",
        f"poll 1       {r1.seconds:.2f}s wall ({first.cpu_seconds:.2f}s CPU in this process), "
        f"ok={r1.ok}, {seen} clusters seen, "
        f"{len(r1.plan.puts)} enrolled",
        f"  AWS calls  {r1.aws_calls} = {per_cluster:.4f}/cluster "
        f"(target <= {CALLS_TARGET}: {_verdict(calls_ok)})",
        *_calls(first.calls, n),
        f"  writes     {r1.registry_writes} registry, {r1.status_writes} status",
        f"poll 2       {r2.seconds:.2f}s wall ({second.cpu_seconds:.2f}s CPU in this process), "
        f"ok={r2.ok}, unchanged fleet",
        f"  AWS calls  {r2.aws_calls} = {r2.aws_calls / n:.4f}/cluster",
        f"  writes     {r2.registry_writes} registry, {r2.status_writes} status "
        f"(target 0: {_verdict(writes_ok)})",
        f"memory       peak RSS {_mib(_maxrss())} (before polling {_mib(rss_before)}); "
        f"tracemalloc peak {_mib(traced.tracemalloc_peak or 0)} during an unchanged poll "
        f"(traced poll {traced.report.seconds:.2f}s)",
    ]
    print("\n".join(lines))
    failed = [m.report.failures for m in (first, second, traced) if m.report.failures]
    for failures in failed:
        print("failures:", *failures, sep="\n  ")
    return 0 if calls_ok and writes_ok and r1.ok and seen == n and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
