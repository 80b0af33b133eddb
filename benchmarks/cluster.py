"""Cluster mode: the cluster engine against a cluster-aware client sent straight to the
shards, on a 3-shard valkey cluster (plain TCP on loopback, so the numbers are about
routing, not TLS).

Rows, SET and GET at pipeline 1 and 16, interleaved round after round (median):

* ``direct``: the load generator in cluster mode, straight to the three primaries:
  ``redis-benchmark --cluster`` (C), valkey-glide's ``GlideClusterClient`` (Rust core,
  ``--clients`` tasks on one client, ``ClusterBatch`` for pipelines) and redis-py's
  ``RedisCluster`` (Python threads);
* ``engine``: the same generator in plain mode (``GlideClient``, ``Redis``) against one
  cluster engine process
  (``LoopbackCluster``: pass-through hooks, one connection per shard per session).

The ratio engine/direct per generator is the number to watch. The engine runs in its
own process; its CPU per request (user + system, from ``/proc``) is reported too.

    python benchmarks/cluster.py                       # 50 clients, 3 s, 3 rounds
    python benchmarks/cluster.py --seconds 5 --rounds 5 --clients 20
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sandbox.memorydb import slot_ranges
from sandbox.valkeynode import ValkeyNode

KEYS = 10_000
VALUE = b"xyz"


# -- the cluster -------------------------------------------------------------------------


async def start_cluster(directory: Path, shards: int = 3) -> list[ValkeyNode]:
    nodes = [
        ValkeyNode(index=i, directory=directory / f"n{i}", client_port=0) for i in range(shards)
    ]
    await asyncio.gather(*(node.start() for node in nodes))
    for epoch, (node, (first, last)) in enumerate(zip(nodes, slot_ranges(shards), strict=True), 1):
        await node.command("CLUSTER", "SET-CONFIG-EPOCH", epoch)
        await node.command("CLUSTER", "ADDSLOTSRANGE", first, last)
    for node in nodes[1:]:
        await nodes[0].command("CLUSTER", "MEET", node.host, node.port, node.bus_port)
    async with asyncio.timeout(30):
        while True:
            infos = [await n.command("CLUSTER", "INFO") for n in nodes]
            if all(isinstance(i, bytes) and b"cluster_state:ok" in i for i in infos):
                known = [await n.command("CLUSTER", "NODES") for n in nodes]
                if all(isinstance(k, bytes) and k.count(b"master") == shards for k in known):
                    return nodes
            await asyncio.sleep(0.05)


# -- the engine in its own process ---------------------------------------------------------


ENGINE = """
import asyncio, sys, uvloop
from dbservice.engine.cluster.testing import LoopbackCluster
async def main():
    async with LoopbackCluster(("127.0.0.1", int(sys.argv[1]))) as proxy:
        print(proxy.port, flush=True)
        await asyncio.Event().wait()
uvloop.run(main())
"""


def start_engine(seed_port: int) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", ENGINE, str(seed_port)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- load -----------------------------------------------------------------------------------


def redis_benchmark(port: int, op: str, pipeline: int, clients: int, requests: int,
                    cluster: bool) -> float:  # fmt: skip
    args = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", str(clients),
            "-n", str(requests), "-P", str(pipeline), "-r", str(KEYS), "-d", str(len(VALUE)),
            "-t", op, "-q", "--csv"]  # fmt: skip
    if cluster:
        args.append("--cluster")
    out = subprocess.run(args, capture_output=True, text=True, timeout=300, check=True).stdout
    for line in out.splitlines():
        parts = [p.strip('"') for p in line.split(",")]
        if parts and parts[0].upper() == op.upper():
            return float(parts[1])
    raise RuntimeError(f"no {op} row in redis-benchmark output: {out!r}")


def redis_py(port: int, op: str, pipeline: int, clients: int, seconds: float,
             cluster: bool) -> float:  # fmt: skip
    """``clients`` threads, each its own connection, for ``seconds``: requests/s."""
    import redis
    from redis.cluster import RedisCluster

    counts = [0] * clients
    stop = time.monotonic() + seconds

    def run(index: int) -> None:
        client: Any = (
            RedisCluster(host="127.0.0.1", port=port) if cluster else redis.Redis(port=port)
        )
        i = index
        with client:
            while time.monotonic() < stop:
                pipe = client.pipeline(transaction=False)
                for _ in range(pipeline):
                    key = b"key:%012d" % (i % KEYS)
                    if op == "set":
                        pipe.set(key, VALUE)
                    else:
                        pipe.get(key)
                    i += 7919
                pipe.execute()
                counts[index] += pipeline

    threads = [threading.Thread(target=run, args=(n,)) for n in range(clients)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(counts) / (time.monotonic() - began)


def glide(port: int, op: str, pipeline: int, clients: int, seconds: float,
          cluster: bool) -> float:  # fmt: skip
    """valkey-glide (Rust core): ``clients`` tasks over one client for ``seconds``."""
    from glide import (
        Batch,
        ClusterBatch,
        GlideClient,
        GlideClientConfiguration,
        GlideClusterClient,
        GlideClusterClientConfiguration,
        NodeAddress,
    )

    async def main() -> float:
        address = [NodeAddress("127.0.0.1", port)]
        client: Any = await (
            GlideClusterClient.create(GlideClusterClientConfiguration(address))
            if cluster
            else GlideClient.create(GlideClientConfiguration(address))
        )
        counts = [0] * clients
        stop = time.monotonic() + seconds

        async def run(index: int) -> None:
            i = index
            while time.monotonic() < stop:
                keys = [b"key:%012d" % ((i + 7919 * j) % KEYS) for j in range(pipeline)]
                i += 7919 * pipeline
                if pipeline == 1:
                    await (client.set(keys[0], VALUE) if op == "set" else client.get(keys[0]))
                else:
                    batch: Any = (
                        ClusterBatch(is_atomic=False) if cluster else Batch(is_atomic=False)
                    )
                    for key in keys:
                        batch.set(key, VALUE) if op == "set" else batch.get(key)
                    await client.exec(batch, raise_on_error=True)
                counts[index] += pipeline

        began = time.monotonic()
        await asyncio.gather(*(run(n) for n in range(clients)))
        elapsed = time.monotonic() - began
        await client.close()
        return sum(counts) / elapsed

    return asyncio.run(main())


# -- main -------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--py-clients", type=int, default=4, help="redis-py threads")
    args = parser.parse_args()
    have_c = shutil.which("redis-benchmark") is not None
    have_glide = importlib.util.find_spec("glide") is not None
    tmp = Path(tempfile.mkdtemp(prefix="fleetgate-cluster-bench-"))
    nodes = asyncio.run(start_cluster(tmp))
    engine, engine_port = start_engine(nodes[0].port)
    seed_port = nodes[0].port
    results: dict[tuple[str, str, str, int], list[float]] = {}
    cpu: dict[tuple[str, int], list[float]] = {}
    try:
        tests = [(op, p) for p in (1, 16) for op in ("set", "get")]
        for _ in range(args.rounds):
            for op, pipeline in tests:
                if have_c:
                    rate = redis_benchmark(seed_port, op, pipeline, args.clients, 20_000, True)
                    n = max(int(rate * args.seconds), 20_000)
                    direct = redis_benchmark(seed_port, op, pipeline, args.clients, n, True)
                    before = cpu_seconds(engine.pid)
                    through = redis_benchmark(engine_port, op, pipeline, args.clients, n, False)
                    used = cpu_seconds(engine.pid) - before
                    results.setdefault(("C", "direct", op, pipeline), []).append(direct)
                    results.setdefault(("C", "engine", op, pipeline), []).append(through)
                    cpu.setdefault((op, pipeline), []).append(used / n * 1e6)
                for mode, port, cluster in (
                    ("direct", seed_port, True),
                    ("engine", engine_port, False),
                ):
                    rate = redis_py(port, op, pipeline, args.py_clients, args.seconds, cluster)
                    results.setdefault(("redis-py", mode, op, pipeline), []).append(rate)
                    if have_glide:
                        rate = glide(port, op, pipeline, args.clients, args.seconds, cluster)
                        results.setdefault(("glide", mode, op, pipeline), []).append(rate)
    finally:
        engine.terminate()
        engine.wait(10)
        asyncio.run(_stop(nodes))
    print(f"3 shards, {args.rounds} rounds of {args.seconds:g} s, median requests/s "
          f"(redis-benchmark -c {args.clients}; redis-py {args.py_clients} threads)")  # fmt: skip
    header = ("generator", "test", "direct", "engine", "ratio", "µs CPU/req")
    print("{:<10} {:<8} {:>10} {:>10} {:>7} {:>11}".format(*header))
    for generator in ("C", "glide", "redis-py"):
        for op, pipeline in tests:
            d = results.get((generator, "direct", op, pipeline))
            e = results.get((generator, "engine", op, pipeline))
            if not d or not e:
                continue
            dm, em = statistics.median(d), statistics.median(e)
            used = f"{statistics.median(cpu[(op, pipeline)]):.1f}" if generator == "C" else ""
            print(f"{generator:<10} {op.upper() + ' P' + str(pipeline):<8} {dm:>10,.0f} "
                  f"{em:>10,.0f} {em / dm:>7.2f} {used:>11}")  # fmt: skip
    return 0


async def _stop(nodes: list[ValkeyNode]) -> None:
    await asyncio.gather(*(node.stop() for node in nodes))


if __name__ == "__main__":
    sys.exit(main())
