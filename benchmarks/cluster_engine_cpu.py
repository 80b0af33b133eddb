"""The cluster engine's own CPU per command, pipelined: a focused measure for work on
its hot path.

The engine (``LoopbackCluster``: pass-through hooks, plain TCP, one connection per shard
per session) runs in this process in front of a 3-shard valkey cluster; a load generator
in a child process sends pipelines of small SETs or GETs (pre-encoded, keys over all
shards) on a few connections and counts the replies' bytes. The figure is this
process's CPU time (user + system) over the commands answered, median of the rounds: no
TLS, no agent, no generator in it.

    python benchmarks/cluster_engine_cpu.py                  # pipeline 16, 3 rounds of 2 s
    python benchmarks/cluster_engine_cpu.py --pipeline 1 --connections 8 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import uvloop  # noqa: E402
from cluster import start_cluster  # noqa: E402

from dbservice.engine.cluster.testing import LoopbackCluster  # noqa: E402

KEYS = 1000
VALUE = b"xyz"

GENERATOR = """
import asyncio, sys, time
port, op, pipeline, connections, seconds, keys = sys.argv[1:7]
pipeline, connections, seconds, keys = int(pipeline), int(connections), float(seconds), int(keys)
def enc(*args):
    return b"*%d\\r\\n" % len(args) + b"".join(b"$%d\\r\\n%s\\r\\n" % (len(a), a) for a in args)
reply = b"+OK\\r\\n" if op == "set" else b"$3\\r\\nxyz\\r\\n"
async def client(n, stop, counts):
    reader, writer = await asyncio.open_connection("127.0.0.1", int(port))
    batches = []
    for b in range(64):
        ks = [b"key:%d" % ((n * 7919 + b * pipeline + i) % keys) for i in range(pipeline)]
        args = [(b"SET", k, b"xyz") if op == "set" else (b"GET", k) for k in ks]
        batches.append(b"".join(enc(*a) for a in args))
    want = len(reply) * pipeline
    done = 0
    while time.monotonic() < stop:
        writer.write(batches[done % 64])
        got = 0
        while got < want:
            data = await reader.read(65536)
            if not data:
                raise SystemExit("connection closed")
            got += len(data)
        done += 1
    counts.append(done * pipeline)
    writer.close()
async def main():
    stop = time.monotonic() + seconds
    counts = []
    await asyncio.gather(*(client(n, stop, counts) for n in range(connections)))
    print(sum(counts))
asyncio.run(main())
"""


async def generate(port: int, op: str, pipeline: int, connections: int, seconds: float) -> int:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", GENERATOR, str(port), op, str(pipeline), str(connections),
        str(seconds), str(KEYS), stdout=subprocess.PIPE,
    )  # fmt: skip
    out, _ = await proc.communicate()
    if proc.returncode:
        raise RuntimeError(f"the load generator failed ({proc.returncode})")
    return int(out)


async def fill(port: int) -> None:
    """SET each of the KEYS keys once through the engine (GET's generator counts on each
    reply being ``$3 xyz``: a missing key's ``$-1`` is shorter, and it would wait)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    ok = b"+OK\r\n"
    writer.write(
        b"".join(
            b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$3\r\nxyz\r\n" % (len(k), k)
            for k in (b"key:%d" % i for i in range(KEYS))
        )
    )
    await reader.readexactly(len(ok) * KEYS)
    writer.close()


async def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="fleetgate-cpu-") as tmp:
        nodes = await start_cluster(Path(tmp))
        try:
            async with LoopbackCluster(("127.0.0.1", nodes[0].port)) as proxy:
                ops = ("set", "get") if args.op == "both" else (args.op,)
                await fill(proxy.port)  # every key GET will ask for: its reply's size is known
                await generate(proxy.port, "set", args.pipeline, args.connections, 0.5)
                cpu: dict[str, list[float]] = {op: [] for op in ops}
                rate: dict[str, list[float]] = {op: [] for op in ops}
                for _ in range(args.rounds):
                    for op in ops:
                        before, wall = time.process_time(), time.monotonic()
                        n = await generate(
                            proxy.port, op, args.pipeline, args.connections, args.seconds
                        )
                        used, wall = time.process_time() - before, time.monotonic() - wall
                        cpu[op].append(used / n * 1e6)
                        rate[op].append(n / wall)
        finally:
            await asyncio.gather(*(node.stop() for node in nodes))
    print(
        f"cluster engine, 3 shards, pipeline {args.pipeline}, {args.connections} connections, "
        f"{args.rounds} rounds of {args.seconds:g} s (median); pid {os.getpid()}"
    )
    for op in cpu:
        print(
            f"{op.upper():<4} {statistics.median(cpu[op]):6.2f} µs CPU/command "
            f"({', '.join(f'{c:.2f}' for c in cpu[op])}); "
            f"{statistics.median(rate[op]):,.0f} commands/s"
        )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--op", choices=("set", "get", "both"), default="both")
    parser.add_argument("--pipeline", type=int, default=16)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    return uvloop.run(run(parser.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
