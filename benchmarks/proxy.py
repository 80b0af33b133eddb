"""Throughput and latency of the proxy engine: valkey-server directly vs through one
engine process (plain TCP, pass-through hooks: the upper bound for the agent, which adds
mutual TLS, RBAC and audit).

Neither valkey-benchmark nor redis-benchmark ships with this project's wheels, so the
load comes from a small uvloop generator in its own process: N clients, each sending a
batch of ``pipeline`` commands and waiting for all replies (recognised by their exact
size, so the generator does almost no parsing), like ``redis-benchmark -P``. Direct and
proxied runs are interleaved, round after round, and the median of the rounds is shown.

    python benchmarks/proxy.py                  # 50 clients, pipeline 1 and 16, 3 rounds
    python benchmarks/proxy.py --seconds 5 --rounds 5 --clients 50

The engine runs in its own process (uvloop), so its CPU time per request is measured
from /proc; the valkey-server, the engine and the generator share this machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VALUE = b"xyz"
KEYS = 10_000


# -- the load generator (child process) ------------------------------------------------


def _command(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


class _Client(asyncio.Protocol):
    def __init__(self, batches: list[bytes], expect: int, record: bool, stats: dict[str, Any]):
        self.batches = batches
        self.expect = expect
        self.record = record
        self.stats = stats
        self.got = 0
        self.index = random.randrange(len(batches))
        self.sent_at = 0.0
        self.transport: asyncio.Transport | None = None
        self.running = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self._send()

    def _send(self) -> None:
        assert self.transport is not None
        self.index = (self.index + 1) % len(self.batches)
        self.sent_at = time.perf_counter()
        self.transport.write(self.batches[self.index])

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got < self.expect:
            return
        if self.got > self.expect:
            raise RuntimeError("unexpected reply size")
        self.got = 0
        now = time.perf_counter()
        if self.stats["measuring"]:
            self.stats["batches"] += 1
            if self.record:
                self.stats["latency"].append(now - self.sent_at)
        if self.running:
            self._send()


async def _load(port: int, op: str, pipeline: int, clients: int, seconds: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    stats: dict[str, Any] = {"measuring": False, "batches": 0, "latency": []}
    batches = []
    for start in range(0, KEYS, pipeline):
        keys = [b"key:%d" % ((start + i) % KEYS) for i in range(pipeline)]
        if op == "SET":
            batches.append(b"".join(_command(b"SET", k, VALUE) for k in keys))
        else:
            batches.append(b"".join(_command(b"GET", k) for k in keys))
    reply = b"+OK\r\n" if op == "SET" else b"$%d\r\n%s\r\n" % (len(VALUE), VALUE)
    protocols = []
    for _ in range(clients):
        _, proto = await loop.create_connection(
            lambda: _Client(batches, len(reply) * pipeline, pipeline == 1, stats),
            "127.0.0.1",
            port,
        )
        protocols.append(proto)
    await asyncio.sleep(min(0.5, seconds / 4))  # warm-up
    stats["measuring"] = True
    began = time.perf_counter()
    await asyncio.sleep(seconds)
    stats["measuring"] = False
    elapsed = time.perf_counter() - began
    for proto in protocols:
        proto.running = False
        if proto.transport is not None:
            proto.transport.close()
    latency = sorted(stats["latency"])
    result: dict[str, Any] = {"rps": stats["batches"] * pipeline / elapsed}
    if latency:
        result["p50_ms"] = latency[len(latency) // 2] * 1000
        result["p99_ms"] = latency[int(len(latency) * 0.99)] * 1000
    return result


# -- the engine (child process) ----------------------------------------------------------


async def _serve(upstream_port: int) -> None:
    from dbservice.proxy import TcpConnector
    from dbservice.proxy.testing import LoopbackProxy

    async with LoopbackProxy(TcpConnector("127.0.0.1", upstream_port)) as proxy:
        print(proxy.port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


# -- the driver --------------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _run_load(port: int, op: str, pipeline: int, clients: int, seconds: float) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--_load", str(port), op, str(pipeline), str(clients),
         str(seconds)],
        capture_output=True, check=True, timeout=seconds + 60,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout)
    if not result["rps"]:
        raise RuntimeError(f"no replies from port {port}: {out.stderr.decode()[-2000:]}")
    return result


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _idle_sessions(pid: int, port: int, count: int) -> tuple[int, int, int]:
    """The engine's RSS before, while ``count`` idle sessions are open (each answered a
    PING), and while a second set is open after the first closed."""

    async def hold() -> list[asyncio.StreamWriter]:
        writers = []
        for _ in range(count):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"PING\r\n")
            assert await reader.readline() == b"+PONG\r\n"
            writers.append(writer)
        await asyncio.sleep(0.5)
        return writers

    async def release(writers: list[asyncio.StreamWriter]) -> None:
        for writer in writers:
            writer.close()
        await asyncio.sleep(1.0)

    before = _rss_kib(pid)
    writers = await hold()
    during = _rss_kib(pid)
    await release(writers)
    writers = await hold()
    again = _rss_kib(pid)
    await release(writers)
    return before, during, again


def _fill(port: int) -> None:
    """Every key the GET runs read exists (their replies are recognised by size)."""
    import redis

    client = redis.Redis(port=port)
    pipe = client.pipeline(transaction=False)  # the node is a one-node cluster: no MSET
    for i in range(KEYS):
        pipe.set(b"key:%d" % i, VALUE)
    pipe.execute()
    client.close()


async def _start_valkey(directory: Path) -> Any:
    from sandbox.valkeynode import ValkeyNode

    node = ValkeyNode(index=0, directory=directory, client_port=0)
    await node.start()
    await node.command("CLUSTER", "ADDSLOTSRANGE", "0", "16383")
    for _ in range(200):
        info = await node.command("CLUSTER", "INFO")
        if isinstance(info, bytes) and b"cluster_state:ok" in info:
            return node
        await asyncio.sleep(0.02)
    raise RuntimeError("valkey node did not become ready")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--pipelines", default="1,16")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--idle", type=int, default=1000, help="idle sessions to hold (0: skip)")
    args = parser.parse_args()
    pipelines = [int(p) for p in args.pipelines.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        node = asyncio.run(_start_valkey(Path(tmp) / "valkey"))
        engine = subprocess.Popen(
            [sys.executable, __file__, "--_serve", str(node.port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        )  # fmt: skip
        try:
            assert engine.stdout is not None
            proxy_port = int(engine.stdout.readline())
            print(f"machine      {platform.machine()}, {os.cpu_count()} cores, Python "
                  f"{platform.python_version()}, uvloop, {platform.system()}")  # fmt: skip
            print(
                f"workload     {args.clients} clients, 3-byte values over {KEYS} keys, "
                f"{args.seconds:.0f}s per run, {args.rounds} interleaved rounds (median)"
            )
            _fill(node.port)
            results: dict[tuple[str, str, int], list[dict[str, Any]]] = {}
            for _ in range(args.rounds):
                for pipeline in pipelines:
                    for op in ("SET", "GET"):
                        for target, port in (("direct", node.port), ("engine", proxy_port)):
                            cpu0 = _cpu_seconds(engine.pid)
                            result = _run_load(port, op, pipeline, args.clients, args.seconds)
                            result["cpu"] = _cpu_seconds(engine.pid) - cpu0
                            results.setdefault((target, op, pipeline), []).append(result)
            print()
            print(f"{'test':<12}{'direct rps':>12}{'engine rps':>12}{'ratio':>8}"
                  f"{'p50 direct':>12}{'p50 engine':>12}{'p99 direct':>12}{'p99 engine':>12}"
                  f"{'engine CPU/req':>16}")  # fmt: skip
            for pipeline in pipelines:
                for op in ("SET", "GET"):
                    d = results[("direct", op, pipeline)]
                    e = results[("engine", op, pipeline)]
                    d_rps = statistics.median(r["rps"] for r in d)
                    e_rps = statistics.median(r["rps"] for r in e)
                    cpu_us = statistics.median(
                        r["cpu"] / (r["rps"] * args.seconds) * 1e6 for r in e
                    )
                    lat = ""
                    if pipeline == 1:
                        lat = "".join(
                            f"{statistics.median(r[k] for r in rows):>10.3f}ms"
                            for k in ("p50_ms",)
                            for rows in (d, e)
                        ) + "".join(
                            f"{statistics.median(r[k] for r in rows):>10.3f}ms"
                            for k in ("p99_ms",)
                            for rows in (d, e)
                        )
                    else:
                        lat = f"{'':>48}"
                    print(f"{op + ' P' + str(pipeline):<12}{d_rps:>12,.0f}{e_rps:>12,.0f}"
                          f"{e_rps / d_rps:>7.2f}x{lat}{cpu_us:>13.1f} us")  # fmt: skip
            if args.idle:
                idle = _idle_sessions(engine.pid, proxy_port, args.idle)
                before, after, again = asyncio.run(idle)
                print()
                print(f"idle         engine RSS {before / 1024:.1f} MiB; with {args.idle} idle "
                      f"sessions {after / 1024:.1f} MiB ({(after - before) / args.idle:.1f} KiB "
                      f"each); a second {args.idle} after the first closed: "
                      f"{again / 1024:.1f} MiB")  # fmt: skip
        finally:
            if engine.stdin is not None:
                engine.stdin.close()
            try:
                engine.wait(5)
            except subprocess.TimeoutExpired:
                engine.kill()
            asyncio.run(node.stop())
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_load":
        import uvloop

        port, op, pipeline, clients, seconds = sys.argv[2:7]
        out = uvloop.run(_load(int(port), op, int(pipeline), int(clients), float(seconds)))
        print(json.dumps(out))
    elif len(sys.argv) > 1 and sys.argv[1] == "--_serve":
        import uvloop

        uvloop.run(_serve(int(sys.argv[2])))
    else:
        sys.exit(main())
