"""Throughput, latency and CPU of the agent and the proxy engine next to reference
proxies, in one run.

Rows, measured side by side and interleaved round after round (median of the rounds):

* ``direct``: valkey-server itself;
* ``agent``: ``fleetgate agent run`` (a real agent: NATS registry, fleet CA, roles,
  audit) reached by the load generator over mutual TLS with a fleet certificate and the
  route in the TLS server name; the agent speaks TLS (verify-full) to the MemoryDB
  stand-in's front door, which terminates TLS before the same valkey-server
  (``benchmarks/fleet.py``);
* ``db connect``: the full path, ``fleetgate db connect bench --port P`` (after
  ``fleetgate login`` at a ``fleetgate auth run`` service) in front of that agent;
* ``direct TLS``: the stand-in's TLS front alone (TLS, no agent): what a client has
  without fleetgate, the limit (the MemoryDB stand-in: valkey-server behind haproxy with
  ``bind ... ssl``);
* ``haproxy TLS``: the peer proxy, haproxy in TCP mode (one thread) with TLS on both
  sides: mutual TLS from the client (the fleet CA), TLS to the stand-in's front; the
  same transport work as the agent, in C;
* ``python TLS``: the same transport work in Python and nothing else: a minimal uvloop
  forwarder (two ``asyncio.Protocol`` s copying bytes, as ``bare uvloop``) with mutual
  TLS from the client and verified TLS to the stand-in's front, as haproxy TLS: the
  least any Python agent pays per request on this machine before it reads a command;
* ``agent cluster``: the same agent serving a MemoryDB cluster stand-in (3 shards, each
  valkey-server behind its TLS front) with the cluster engine, routed by the TLS server
  name ``default.bench-cluster.fleetgate``;
* ``direct TLS cluster``: ``redis-benchmark --cluster --tls`` straight to the 3 shards'
  fronts (no open-loop figure: that generator is not cluster-aware);
* ``engine``: one engine process (``LoopbackProxy``, pass-through hooks, plain TCP);
* ``engine inspect=*``: the same with ``inspect=("*",)`` and hooks that read every
  command's arguments (what the agent's audit asks of the engine);
* ``bare uvloop``: a minimal uvloop forwarder (two ``asyncio.Protocol`` s copying bytes,
  no parsing): the ceiling for a Python proxy on this machine;
* ``haproxy``: haproxy in TCP mode, one thread; ``nutcracker``: twemproxy (both when
  installed, e.g. ``apt-get install haproxy nutcracker``).

The load comes from ``redis-benchmark`` (``apt-get install redis-tools``) when it is
installed: C, so the generator takes little of the CPU the proxy needs. Without it a
small uvloop generator plays ``redis-benchmark -c N -P P`` (ratios then understate every
proxy, as the generator competes with it for the cores).

    python benchmarks/proxy.py                  # 50 clients, pipeline 1 and 16, 3 rounds
    python benchmarks/proxy.py --seconds 5 --rounds 5 --rows direct,engine,bare
    python benchmarks/proxy.py --connect-rate 2000   # sessions/s instead (see below)

``--connect-rate N`` measures something else, alone: how fast new sessions open. Each
of N sessions is a fresh TLS connection that sends one PING and closes
(``redis-benchmark -k 0``), against the agent (mutual TLS, route, roles, TLS upstream,
login, audit start and end) and against the stand-in's TLS front (one TLS side in C),
interleaved over ``--rounds``; it prints sessions per second and the CPU per session of
the agent, the front, the generator and nats-server (``--connect-profile FILE`` also
records the agent with ``py-spy record --native`` during the agent runs).

Every proxy runs in its own process, so its CPU time per request (user and system, from
``/proc``) is its own. Around each run the script also reads the CPU time of every other
process of the path (the load generator, the stand-in's TLS front, valkey-server,
nats-server, the tunnel) and the machine's busy time (``/proc/stat``), and from them
prints, for each of issue 5's throughput floors, the CPU per request the rest of the
path leaves the agent on this machine (the budget). The latency without queueing comes
from an open-loop generator: GETs at a fixed rate (``--latency-rate``), each timed from
its scheduled send.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.fleet import CLUSTER_SERVER_NAME, SERVER_NAME, Fleet

VALUE = b"xyz"
KEYS = 10_000
ROWS = (
    "direct",
    "direct TLS",
    "direct TLS cluster",
    "haproxy TLS",
    "python TLS",
    "agent",
    "agent cluster",
    "db connect",
    "engine",
    "engine inspect=*",
    "bare uvloop",
    "haproxy",
    "nutcracker",
)
FLEET_ROWS = ("agent", "db connect", "direct TLS", "agent cluster", "direct TLS cluster",
              "haproxy TLS", "python TLS")  # fmt: skip
CLUSTER_ROWS = ("agent cluster", "direct TLS cluster")
ISSUE18_ROWS = ("direct", "direct TLS", "direct TLS cluster", "haproxy TLS", "python TLS",
                "agent", "agent cluster")  # fmt: skip
"""``--rows issue18`` (and ``--quick``'s default): the rows issue 18's floors are read on."""
PEERS = ("haproxy TLS", "python TLS")
"""The rows doing the agent's transport work (mutual TLS in, verified TLS out) and nothing
else: in C, and in Python."""
ALIASES = {"stand-in TLS": "direct TLS"}


# -- load: redis-benchmark, or a small uvloop generator -------------------------------


def _key(i: int) -> bytes:
    return b"key:%012d" % i  # redis-benchmark's key:__rand_int__ with -r


def _redis_benchmark(
    port: int,
    op: str,
    pipeline: int,
    clients: int,
    requests: int,
    extra: Sequence[str] = (),
) -> dict[str, float]:
    out = subprocess.run(
        ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", str(clients),
         "-n", str(requests), "-P", str(pipeline), "-r", str(KEYS), "-d", str(len(VALUE)),
         "-t", op.lower(), "--csv", *extra],
        capture_output=True, check=True, timeout=600, text=True,
    )  # fmt: skip
    lines = [line for line in out.stdout.splitlines() if line.startswith('"')]
    header = [h.strip('"') for h in lines[0].split(",")]
    row = [v.strip('"') for v in lines[-1].split(",")]
    values = dict(zip(header, row, strict=True))
    return {
        "rps": float(values["rps"]),
        "p50_ms": float(values["p50_latency_ms"]),
        "p99_ms": float(values["p99_latency_ms"]),
    }


def _command(*parts: bytes) -> bytes:
    return b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)


class _Client(asyncio.Protocol):
    def __init__(self, batches: list[bytes], expect: int, stats: dict[str, Any]):
        self.batches = batches
        self.expect = expect
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
        if self.stats["measuring"]:
            self.stats["batches"] += 1
            self.stats["latency"].append(time.perf_counter() - self.sent_at)
        if self.running:
            self._send()


async def _load(port: int, op: str, pipeline: int, clients: int, seconds: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    stats: dict[str, Any] = {"measuring": False, "batches": 0, "latency": []}
    batches = []
    for start in range(0, KEYS, pipeline):
        keys = [_key((start + i) % KEYS) for i in range(pipeline)]
        if op == "SET":
            batches.append(b"".join(_command(b"SET", k, VALUE) for k in keys))
        else:
            batches.append(b"".join(_command(b"GET", k) for k in keys))
    reply = b"+OK\r\n" if op == "SET" else b"$%d\r\n%s\r\n" % (len(VALUE), VALUE)
    protocols = []
    for _ in range(clients):
        _, proto = await loop.create_connection(
            lambda: _Client(batches, len(reply) * pipeline, stats), "127.0.0.1", port
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
    return {
        "rps": stats["batches"] * pipeline / elapsed,
        "p50_ms": latency[len(latency) // 2] * 1000,
        "p99_ms": latency[int(len(latency) * 0.99)] * 1000,
        "requests": stats["batches"] * pipeline,
    }


def _python_load(port: int, op: str, pipeline: int, clients: int, seconds: float) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--_load", str(port), op, str(pipeline), str(clients),
         str(seconds)],
        capture_output=True, check=True, timeout=seconds + 60,
    )  # fmt: skip
    result: dict[str, Any] = json.loads(out.stdout)
    if not result["rps"]:
        raise RuntimeError(f"no replies from port {port}: {out.stderr.decode()[-2000:]}")
    return result


# -- open-loop latency: requests at a fixed rate, timed from their scheduled send ---------


SPIN = 30e-6
"""The open-loop generator polls, rather than sleeps, this long before each send (at
most a quarter of the interval): with 30 us its sends are about 1 us late at the median,
against 20-40 us when it sleeps to the due time."""


def _tight_timer_slack() -> None:
    """Ask Linux to wake this process on time (its default timer slack is 50 us)."""
    import contextlib
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK, 1 ns


def _open_loop(
    port: int, rate: float, connections: int, seconds: float, tls: dict[str, str] | None
) -> dict[str, Any]:
    """GETs at ``rate`` per second in total over ``connections`` connections, on a fixed
    schedule (request ``i`` is due at ``start + i / rate``, on connection ``i % connections``),
    whatever the replies do: a late reply never delays the next request. Each latency runs
    from the request's scheduled send time to its reply, so time the generator itself was
    late counts too (no coordinated omission). One thread, ``select`` with microsecond
    timeouts (``asyncio``'s and uvloop's timers are millisecond-grained)."""
    import socket

    _tight_timer_slack()
    context = None
    if tls is not None:
        context = ssl.create_default_context(cafile=tls["cafile"])
        context.check_hostname = False  # the chain is checked; see docs/access.md
        if "cert" in tls:
            context.load_cert_chain(tls["cert"], tls["key"])
    requests = [_command(b"GET", _key(i)) for i in range(KEYS)]
    reply = len(b"$%d\r\n%s\r\n" % (len(VALUE), VALUE))
    socks: list[socket.socket] = []
    try:
        for _ in range(connections):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if context is not None:
                sock = context.wrap_socket(sock, server_hostname=(tls or {}).get("sni"))
            socks.append(sock)
            sock.sendall(requests[0])  # one round trip first: the session is set up
            answer = b""
            while len(answer) < reply:
                chunk = sock.recv(reply - len(answer))
                if not chunk:
                    raise RuntimeError(f"port {port} closed the connection: {answer!r}")
                answer += chunk
            if not answer.startswith(b"$"):
                raise RuntimeError(f"unexpected reply from port {port}: {answer!r}")
            sock.setblocking(False)
        return _open_loop_run(socks, requests, reply, rate, seconds)
    finally:
        for sock in socks:
            sock.close()


def _open_loop_run(
    socks: Sequence[Any], requests: list[bytes], reply: int, rate: float, seconds: float
) -> dict[str, Any]:
    import select

    warm_up = 0.5
    interval = 1 / rate
    spin = min(SPIN, interval / 4)
    total = int((warm_up + seconds) * rate)
    connections = len(socks)
    due: list[deque[float]] = [deque() for _ in socks]
    got = [0] * len(socks)
    waiting: dict[int, Any] = {}  # connections with requests in flight
    latency: list[float] = []
    lag: list[float] = []
    sent_first = sent_last = 0.0
    start = time.perf_counter() + 0.01
    measure_from = start + warm_up
    sent = 0
    deadline = start + warm_up + seconds + 10
    while sent < total or waiting:
        now = time.perf_counter()
        while sent < total and start + sent * interval <= now:
            scheduled = start + sent * interval
            conn = sent % connections
            socks[conn].sendall(requests[sent % len(requests)])
            due[conn].append(scheduled)
            waiting[conn] = socks[conn]
            if scheduled >= measure_from:
                lag.append(now - scheduled)
                sent_first = sent_first or now
                sent_last = now
            sent += 1
        if now > deadline:
            raise RuntimeError(f"requests on {len(waiting)} connections unanswered after 10 s")
        # Sleep until shortly before the next send, then poll: a wake-up from a timer is
        # tens of microseconds late here, which would count in every latency.
        timeout = start + sent * interval - time.perf_counter() - spin if sent < total else 0.1
        readable, _, _ = select.select(list(waiting.values()), [], [], max(timeout, 0.0))
        for sock in readable:
            i = socks.index(sock)
            while True:
                try:
                    data = sock.recv(65536)
                except (ssl.SSLWantReadError, BlockingIOError):
                    break
                if not data:
                    raise RuntimeError("the server closed a connection")
                now = time.perf_counter()
                got[i] += len(data)
                while got[i] >= reply:
                    got[i] -= reply
                    scheduled = due[i].popleft()
                    if scheduled >= measure_from:
                        latency.append(now - scheduled)
            if not due[i]:
                del waiting[i]
    latency.sort()
    lag.sort()
    count = len(latency)
    return {
        "requests": count,
        "rate": (count - 1) / (sent_last - sent_first) if sent_last > sent_first else 0.0,
        "p50_ms": latency[count // 2] * 1000,
        "p99_ms": latency[int(count * 0.99)] * 1000,
        "lag_p50_ms": lag[len(lag) // 2] * 1000,
        "lag_p99_ms": lag[int(len(lag) * 0.99)] * 1000,
    }


def _run_open_loop(proxy: _Proxy, rate: float, connections: int, seconds: float) -> dict[str, Any]:
    """One open-loop run against ``proxy`` in a child process, with the machine's busy
    share over it."""
    spec = json.dumps([proxy.port, rate, connections, seconds, proxy.tls])
    before = _machine_cpu()
    out = subprocess.run(
        [sys.executable, __file__, "--_openloop", spec],
        capture_output=True, check=False, timeout=seconds + 120,
    )  # fmt: skip
    after = _machine_cpu()
    if out.returncode != 0:
        raise RuntimeError(
            f"open-loop run against {proxy.name} failed: {out.stderr.decode()[-2000:]}"
        )
    result: dict[str, Any] = json.loads(out.stdout)
    result["target_rate"], result["connections"] = rate, connections
    busy, idle = after[0] - before[0], after[1] - before[1]  # of the machine
    result["busy"] = busy / (busy + idle) if busy + idle > 0 else 0.0
    return result


# -- the Python proxies (child processes) ------------------------------------------------


class _ArgsReader:
    """Pass-through hooks that read every inspected command's arguments, as an audit
    trail would."""

    def __init__(self) -> None:
        from dbservice.engine.proxy import PassThroughHooks

        base = PassThroughHooks()
        self.on_auth = base.on_auth
        self.on_hello = base.on_hello
        self.on_reply = base.on_reply
        self.last: tuple[bytes, ...] = ()

    def on_command(self, name: str, argc: int, args: Sequence[bytes] | None) -> bytes | None:
        if args is not None:
            self.last = tuple(args)
        return None


async def _serve_engine(upstream_port: int, inspect: bool) -> None:
    from dbservice.engine.proxy import PassThroughHooks, SessionHooks, TcpConnector
    from dbservice.engine.proxy.testing import LoopbackProxy

    hooks = cast(Callable[[], SessionHooks], _ArgsReader if inspect else PassThroughHooks)
    connector = TcpConnector("127.0.0.1", upstream_port)
    async with LoopbackProxy(connector, hooks=hooks, inspect=("*",) if inspect else ()) as proxy:
        print(proxy.port, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)


class _Pipe(asyncio.Protocol):
    """One side of the bare forwarder: bytes in, the peer's transport out."""

    def __init__(self, peer: _Pipe | None = None) -> None:
        self.peer = peer
        self.transport: asyncio.Transport | None = None
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        if self.peer is None:  # the client side: connect upstream
            _DIALS.add(asyncio.get_running_loop().create_task(self._dial()))
        else:
            self.peer.peer = self
            self.transport.writelines(self.peer.early)

    async def _dial(self) -> None:
        try:
            await asyncio.get_running_loop().create_connection(
                lambda: _Pipe(self), *_UPSTREAM, ssl=_UPSTREAM_TLS
            )
        finally:
            _DIALS.discard(cast("asyncio.Task[None]", asyncio.current_task()))

    def data_received(self, data: bytes) -> None:
        if self.peer is None or self.peer.transport is None:
            self.early.append(data)
        else:
            self.peer.transport.write(data)

    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.close()


_UPSTREAM: tuple[str, int] = ("127.0.0.1", 0)
_UPSTREAM_TLS: ssl.SSLContext | None = None
_DIALS: set[asyncio.Task[None]] = set()


async def _serve_bare(upstream_port: int, tls: Sequence[str] = ()) -> None:
    """The bare forwarder; with ``tls`` (cert, key, client CA, upstream CA) TLS on both
    sides as haproxy TLS has it: client certificates required and checked against the
    client CA, the upstream's chain verified against its CA (no host name, as haproxy's
    ``verify required`` without ``verifyhost``)."""
    global _UPSTREAM, _UPSTREAM_TLS
    _UPSTREAM = ("127.0.0.1", upstream_port)
    server_tls = None
    if tls:
        cert, key, client_ca, upstream_ca = tls
        server_tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_tls.load_cert_chain(cert, key)
        server_tls.load_verify_locations(client_ca)
        server_tls.verify_mode = ssl.CERT_REQUIRED
        _UPSTREAM_TLS = ssl.create_default_context(cafile=upstream_ca)
        _UPSTREAM_TLS.check_hostname = False
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Pipe, "127.0.0.1", 0, ssl=server_tls)
    print(server.sockets[0].getsockname()[1], flush=True)
    await loop.run_in_executor(None, sys.stdin.read)


# -- the connection rate: one session per request -----------------------------------------


def _sessions(port: int, clients: int, sessions: int, extra: Sequence[str]) -> float:
    """``sessions`` sessions of one PING each over ``clients`` concurrent clients, each
    session its own connection (``redis-benchmark -k 0``); sessions per second."""
    out = subprocess.run(
        ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", str(clients),
         "-n", str(sessions), "-k", "0", "--csv", *extra, "PING"],
        capture_output=True, check=True, timeout=600, text=True,
    )  # fmt: skip
    lines = [line for line in out.stdout.splitlines() if line.startswith('"')]
    header = [h.strip('"') for h in lines[0].split(",")]
    row = [v.strip('"') for v in lines[-1].split(",")]
    return float(dict(zip(header, row, strict=True))["rps"])


def _profile(pid: int, output: str) -> subprocess.Popen[bytes] | None:
    """``py-spy record --native`` of ``pid`` until stopped (SIGINT), collapsed stacks."""
    if shutil.which("py-spy") is None:
        print("py-spy is not installed (pip install py-spy): no profile")
        return None
    return subprocess.Popen(
        ["py-spy", "record", "--native", "--rate", "250", "--format", "raw",
         "--pid", str(pid), "--output", output],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


def _stop_profile(process: subprocess.Popen[bytes] | None) -> None:
    if process is None:
        return
    import signal

    process.send_signal(signal.SIGINT)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def _connect_rate(args: argparse.Namespace) -> int:
    """``--connect-rate``: sessions per second and CPU per session, agent and front."""
    if shutil.which("redis-benchmark") is None:
        print("--connect-rate needs redis-benchmark (apt-get install redis-tools)")
        return 2
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        node = asyncio.run(_start_valkey(tmp / "valkey"))
        fleet: Fleet | None = None
        try:
            fleet = Fleet(tmp / "fleet", node.port).start(tunnel=False)
            rows = {
                "agent": (fleet.agent_port, fleet.tls_args(), "agent"),
                "direct TLS": (fleet.front_port, fleet.front_tls_args(), "front"),
            }
            roles = {  # "proxy" is the agent (CPU_ROLES)
                "proxy": (fleet.pid("agent"),), "front": (fleet.pid("front"),),
                "server": (node.proc.pid,), "nats": (fleet.pid("nats"),),
            }  # fmt: skip
            print(f"machine      {platform.machine()}, {os.cpu_count()} cores, Python "
                  f"{platform.python_version()}, {platform.system()}")  # fmt: skip
            print(f"workload     redis-benchmark -k 0 -c {args.connect_clients} -n "
                  f"{args.connect_rate} PING: every PING on a new TLS connection (a new "
                  f"session), {args.rounds} interleaved rounds (median); front: "
                  f"{fleet.front_kind}")  # fmt: skip
            for port, extra, _ in rows.values():  # warm-up: caches, first handshakes
                _sessions(port, args.connect_clients, 200, extra)
            results: dict[str, list[dict[str, float]]] = {name: [] for name in rows}
            names = list(rows)
            for round_ in range(args.rounds):
                for name in names[round_ % 2 :] + names[: round_ % 2]:
                    port, extra, _ = rows[name]
                    profiler = None
                    if args.connect_profile and name == "agent":
                        profiler = _profile(roles["proxy"][0], f"{args.connect_profile}.{round_}")
                    before = _snapshot(roles)
                    rate = _sessions(port, args.connect_clients, args.connect_rate, extra)
                    after = _snapshot(roles)
                    _stop_profile(profiler)
                    parts = _cpu_split(before, after, args.connect_rate)
                    parts["rate"] = rate
                    results[name].append(parts)
            print()
            print(f"{'row':<14}{'sessions/s':>11}" + "".join(
                f"{r:>9}" for r in ("agent", "front", "client", "server", "nats", "other", "total")
            ) + f"{'busy':>7}")  # fmt: skip
            for name, runs in results.items():
                med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
                cells = "".join(
                    f"{med[r]:>9.0f}" for r in ("proxy", "front", "client", "server", "nats",
                                                "other", "total")
                )  # fmt: skip
                print(f"{name:<14}{med['rate']:>11,.0f}{cells}{med['busy'] * 100:>6.0f}%")
            print(
                "CPU per session in microseconds (user+sys, medians): agent: fleetgate agent"
                " run; front: the stand-in's TLS front (the agent row also goes through it,"
                " as the agent's upstream); client: redis-benchmark; server: valkey-server;"
                " nats: nats-server (roles read, audit stored); other: the rest of the"
                " machine's busy time; busy: the machine's share of all cores"
            )
            agent = statistics.median(r["proxy"] for r in results["agent"])
            front = statistics.median(r["front"] for r in results["direct TLS"])
            print(f"one core opens about {1e6 / agent:,.0f} agent sessions/s "
                  f"({agent / 1000:.2f} ms each) and {1e6 / front:,.0f} front ones "
                  f"({front / 1000:.2f} ms each)")  # fmt: skip
            if args.connect_profile:
                print(f"profiles: {args.connect_profile}.<round> (py-spy raw: collapsed stacks)")
        finally:
            if fleet is not None:
                fleet.stop()
            asyncio.run(node.stop())
    return 0


# -- the driver --------------------------------------------------------------------------


def _free_port() -> int:
    from sandbox.ports import free_port

    return free_port()


def _cpu_of(pid: int) -> tuple[float, float]:
    """User and system CPU seconds of one process so far."""
    tick = os.sysconf("SC_CLK_TCK")
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(stat[11]) / tick, int(stat[12]) / tick


def _machine_cpu() -> tuple[float, float, float]:
    """Busy, idle and interrupt CPU seconds of the whole machine so far, all cores
    (``/proc/stat``; iowait counts as idle, steal as busy; interrupt time, hard and soft,
    is part of the busy time and is where the kernel moves loopback packets)."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields + [0] * (8 - len(fields))
    busy = user + nice + system + irq + softirq + steal
    return busy / tick, (idle + iowait) / tick, (irq + softirq) / tick


def _children_cpu() -> float:
    """CPU seconds (user + system) of this process's children that have ended and been
    waited for: around one ``subprocess.run`` of the load generator, its own."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _core_cpu(core: int) -> tuple[float, float]:
    """Busy and idle CPU seconds of one core so far (``/proc/stat``, ``cpuN``)."""
    tick = os.sysconf("SC_CLK_TCK")
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            fields = [int(v) for v in line.split()[1:9]]
            user, nice, system, idle, iowait, irq, softirq, steal = fields
            return (user + nice + system + irq + softirq + steal) / tick, (idle + iowait) / tick
    return 0.0, 0.0


LOAD_SIDE_FULL = 0.95
"""``--pin``: the load side's core busy at least this share of a run: that row's
throughput is bounded by the load side (generator, fronts, servers), not by the proxy."""

PIN: dict[str, int] = {}
"""``--pin``: ``{"proxy": core, "rest": core}``; empty otherwise."""


def _snapshot(roles: dict[str, tuple[int, ...]]) -> dict[str, float]:
    """CPU seconds so far of each role's processes, of the ended children (``client``) and
    of the machine (``busy``, ``idle``; with ``--pin`` also the proxy's core:
    ``core_busy``, ``core_idle``), and the clock (``wall``)."""
    out = {role: sum(sum(_cpu_of(pid)) for pid in pids) for role, pids in roles.items()}
    out["client"] = _children_cpu()
    out["busy"], out["idle"], out["irq"] = _machine_cpu()
    if PIN:
        out["core_busy"], out["core_idle"] = _core_cpu(PIN["proxy"])
        out["rest_busy"], out["rest_idle"] = _core_cpu(PIN["rest"])
    out["wall"] = time.perf_counter()
    return out


CPU_ROLES = ("client", "proxy", "tunnel", "front", "server", "nats")
"""The processes of a row's path whose CPU each run records: the load generator, the
row's proxy (the agent in the agent rows), the db connect tunnel, the stand-in's TLS
front, valkey-server, nats-server (storing the agent's audit)."""


def _cpu_split(
    before: dict[str, float], after: dict[str, float], requests: int
) -> dict[str, float]:
    """Microseconds of CPU per request of each role, ``other`` (the machine's busy time
    that none of them used: this driver, idle fleet parts, other work on the machine),
    ``total`` (the machine's busy time), ``busy`` (its busy share over the run, 0-1) and
    ``noise`` (the share of the machine's time that went to ``other``), and ``irq``: the
    kernel's interrupt time (moving loopback packets), which the processes' system time
    already includes here (the processes and ``other`` add up to ``total`` without it)."""
    spent = {key: after[key] - before[key] for key in after}
    out = {"busy": spent["busy"] / (spent["busy"] + spent["idle"]) if spent["idle"] else 1.0}
    out["wall"] = spent["wall"]
    roles = [role for role in CPU_ROLES if role in spent]
    unknown = spent["busy"] - sum(spent[role] for role in roles)
    out["noise"] = unknown / (spent["busy"] + spent["idle"]) if spent["busy"] else 0.0
    for role in roles:
        out[role] = spent[role] / requests * 1e6
    out["irq"] = spent["irq"] / requests * 1e6
    out["total"] = spent["busy"] / requests * 1e6
    out["other"] = out["total"] - sum(out[role] for role in roles)
    if "core_busy" in spent:
        core = spent["core_busy"] + spent["core_idle"]
        out["core"] = spent["core_busy"] / core if core > 0 else 0.0
    if "rest_busy" in spent:
        rest = spent["rest_busy"] + spent["rest_idle"]
        out["rest"] = spent["rest_busy"] / rest if rest > 0 else 0.0
    return out


@dataclass
class _Proxy:
    name: str
    port: int
    process: subprocess.Popen[bytes] | None = None
    results: dict[tuple[str, int, int], list[dict[str, Any]]] = field(default_factory=dict)
    extra: list[str] = field(default_factory=list)
    """More redis-benchmark options (TLS)."""
    pids: tuple[int, ...] = ()
    """Processes whose CPU counts for this row (default: ``process``)."""
    roles: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """The processes of this row's path by role (see ``CPU_ROLES``; ``client`` is the
    load generator, read from this process's children)."""
    tls: dict[str, str] | None = None
    """TLS for the open-loop generator: ``cafile``, and ``cert``, ``key``, ``sni``."""
    open_results: list[dict[str, Any]] = field(default_factory=list)
    """The open-loop latency runs, one per round."""
    open_loop: bool = True
    """Measured by the open-loop generator (not for a cluster reached directly)."""

    def cpu(self) -> tuple[float, float]:
        """User and system CPU seconds of the row's processes so far."""
        pids = self.pids or ((self.process.pid,) if self.process is not None else ())
        user = system = 0.0
        for pid in pids:
            one = _cpu_of(pid)
            user, system = user + one[0], system + one[1]
        return user, system

    def first_cpu(self) -> float:
        """CPU seconds (user + system) of the first of several processes (the tunnel of
        the ``db connect`` row); 0 for a row of one process."""
        return sum(_cpu_of(self.pids[0])) if len(self.pids) > 1 else 0.0

    @property
    def measured_cpu(self) -> bool:
        return self.process is not None or bool(self.pids)

    def stop(self) -> None:
        if self.process is None:  # direct, and the fleet's rows (the fleet stops them)
            return
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()


def _start_python(kind: str, name: str, upstream: int, paths: Sequence[str] = ()) -> _Proxy:
    process = subprocess.Popen(
        [sys.executable, __file__, "--_serve", kind, str(upstream), *paths],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE,
    )  # fmt: skip
    assert process.stdout is not None
    return _Proxy(name, int(process.stdout.readline()), process)


def _wait_port(port: int) -> None:
    import socket

    for _ in range(200):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on port {port}")


def _start_haproxy(upstream: int, tmp: Path) -> _Proxy:
    port = _free_port()
    config = tmp / "haproxy.cfg"
    config.write_text(
        "global\n  nbthread 1\n  maxconn 4096\n"
        "defaults\n  mode tcp\n  timeout connect 5s\n  timeout client 1h\n  timeout server 1h\n"
        f"frontend f\n  bind 127.0.0.1:{port}\n  default_backend b\n"
        f"backend b\n  server s 127.0.0.1:{upstream}\n"
    )
    process = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdin=subprocess.PIPE)
    _wait_port(port)
    return _Proxy("haproxy", port, process)


def _start_nutcracker(upstream: int, tmp: Path) -> _Proxy:
    port = _free_port()
    config = tmp / "nutcracker.yml"
    config.write_text(
        f"pool:\n  listen: 127.0.0.1:{port}\n  hash: fnv1a_64\n  distribution: ketama\n"
        f"  redis: true\n  preconnect: true\n  timeout: 60000\n"
        f"  servers:\n    - 127.0.0.1:{upstream}:1\n"
    )
    process = subprocess.Popen(
        ["nutcracker", "-c", str(config), "-s", str(_free_port()), "-o", str(tmp / "nc.log")],
        stdin=subprocess.PIPE,
    )
    _wait_port(port)
    return _Proxy("nutcracker", port, process)


def _assign_roles(proxies: list[_Proxy], node: Any, fleet: Fleet | None) -> None:
    """Each row's processes by role (``CPU_ROLES``), and TLS for the open-loop generator."""
    shared: dict[str, tuple[int, ...]] = {"server": (node.proc.pid,)}
    if fleet is not None:
        shared |= {"front": (fleet.pid("front"),), "nats": (fleet.pid("nats"),)}
    for proxy in proxies:
        proxy.roles = dict(shared)
        if proxy.name in CLUSTER_ROWS and fleet is not None:
            proxy.roles["front"] = (fleet.pid("cluster front"),)
            proxy.roles["server"] = fleet.cluster_pids()
        if proxy.name in ("agent", "db connect", "agent cluster") and fleet is not None:
            proxy.roles["proxy"] = (fleet.pid("agent"),)
        elif proxy.name == "haproxy TLS" and fleet is not None:
            proxy.roles["proxy"] = (fleet.pid("haproxy TLS"),)
        elif proxy.process is not None:
            proxy.roles["proxy"] = (proxy.process.pid,)
        if proxy.name == "db connect" and fleet is not None:
            proxy.roles["tunnel"] = (fleet.pid("tunnel"),)
        elif proxy.name in ("agent", "agent cluster", *PEERS) and fleet is not None:
            ids = fleet.identity
            proxy.tls = {
                "cafile": str(ids / "ca.pem"), "cert": str(ids / "cert.pem"),
                "key": str(ids / "key.pem"),
                "sni": CLUSTER_SERVER_NAME if proxy.name == "agent cluster" else SERVER_NAME,
            }  # fmt: skip
        elif proxy.name == "direct TLS" and fleet is not None:
            proxy.tls = {"cafile": str(fleet.tmp / "front" / "ca.crt")}


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _idle_sessions(
    pid: int,
    port: int,
    count: int,
    *,
    rounds: int = 2,
    tls: ssl.SSLContext | None = None,
    sni: str | None = None,
    gets: Sequence[bytes] = (),
    quiet: float = 0.0,
) -> tuple[int, list[tuple[int, int, int]]]:
    """The proxy's RSS before, then for each round: while ``count`` idle sessions are
    open (each answered a PING, then a GET of each of ``gets``, keys the GET runs
    filled), a second after they all closed, and (third) after the sessions stayed
    open without a command for ``quiet`` seconds more (the open figure when 0)."""

    async def hold() -> list[asyncio.StreamWriter]:
        writers = []
        for _ in range(count):
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=tls, server_hostname=sni
            )
            writer.write(b"PING\r\n" + b"".join(_command(b"GET", key) for key in gets))
            assert await reader.readline() == b"+PONG\r\n"
            for _ in gets:  # the SET runs wrote redis-benchmark's own 3-byte values
                header = await reader.readline()
                assert header == b"$%d\r\n" % len(VALUE), header
                await reader.readexactly(len(VALUE) + 2)
            writers.append(writer)
        await asyncio.sleep(0.5)
        return writers

    async def release(writers: list[asyncio.StreamWriter]) -> None:
        for writer in writers:
            writer.close()
        await asyncio.sleep(1.0)

    before = _rss_kib(pid)
    figures = []
    for _ in range(rounds):
        writers = await hold()
        open_ = quiet_ = _rss_kib(pid)
        if quiet:
            await asyncio.sleep(quiet)
            quiet_ = _rss_kib(pid)
        await release(writers)
        figures.append((open_, _rss_kib(pid), quiet_))
    return before, figures


def _idle_line(what: str, count: int, before: int, figures: list[tuple[int, int, int]]) -> str:
    rounds = "; ".join(
        f"round {i}: {open_ / 1024:.1f} open, {closed / 1024:.1f} closed"
        for i, (open_, closed, _) in enumerate(figures, 1)
    )
    each = (figures[0][0] - before) / count
    return (
        f"idle         {what} RSS {before / 1024:.1f} MiB before; {count} idle sessions "
        f"({each:.1f} KiB each), MiB: {rounds}"
    )


def _fill(port: int) -> None:
    """Every key the GET runs read exists."""
    import redis

    client = redis.Redis(port=port)
    pipe = client.pipeline(transaction=False)  # the node is a one-node cluster: no MSET
    for i in range(KEYS):
        pipe.set(_key(i), VALUE)
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


def _median(rows: list[dict[str, Any]], key: str) -> float:
    return statistics.median(float(r[key]) for r in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--pipelines", default="1,16")
    parser.add_argument("--seconds", type=float, default=3.0, help="per direct run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--rows",
        default=None,
        help="a subset of: " + ",".join(ROWS) + "; or issue18 (" + ",".join(ISSUE18_ROWS) + ")",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="the proxy under test (the agent, haproxy, the engines, nutcracker) on one core, "
        "everything else (load generator, TLS fronts, valkey, NATS, this script) on another",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 1 round of 1 s, 200 idle sessions once, the issue18 rows unless "
        "--rows says otherwise",
    )
    parser.add_argument("--load", choices=("auto", "redis-benchmark", "python"), default="auto")
    parser.add_argument(
        "--latency-clients",
        type=int,
        default=1,
        help="also GET at pipeline 1 with this few clients, for the latency a proxy adds "
        "when it is not saturated (0: skip)",
    )
    parser.add_argument(
        "--latency-rate",
        type=float,
        default=5000,
        help="open-loop latency: GETs per second in total, well below every row's "
        "saturation, each timed from its scheduled send (0: skip)",
    )
    parser.add_argument(
        "--latency-connections",
        type=int,
        default=50,
        help="open-loop latency: connections the requests are spread over",
    )
    parser.add_argument("--idle", type=int, default=1000, help="idle sessions to hold (0: skip)")
    parser.add_argument(
        "--idle-rounds", type=int, default=2, help="times to open and close the idle sessions"
    )
    parser.add_argument(
        "--connect-rate",
        type=int,
        default=0,
        metavar="N",
        help="measure only how fast sessions open: N sessions of one PING each, every one "
        "a new TLS connection, against the agent and the stand-in's TLS front (0: the usual "
        "run)",
    )
    parser.add_argument(
        "--connect-clients", type=int, default=20, help="--connect-rate: concurrent clients"
    )
    parser.add_argument(
        "--connect-profile",
        metavar="FILE",
        help="--connect-rate: record the agent with py-spy --native into FILE.<round>",
    )
    args = parser.parse_args()
    if args.connect_rate < 0 or args.connect_clients < 1:
        parser.error("--connect-rate: give a number of sessions; --connect-clients: at least 1")
    if args.connect_rate:
        return _connect_rate(args)
    if args.latency_rate < 0:
        parser.error("--latency-rate: give a rate in requests per second, or 0 to skip")
    if args.latency_connections < 1:
        parser.error("--latency-connections: give at least 1 connection")
    if args.idle_rounds < 1:
        parser.error("--idle-rounds: give at least 1 (--idle 0 skips the idle sessions)")
    if args.quick:
        args.seconds, args.rounds, args.idle_rounds = 1.0, 1, 1
        args.idle = min(args.idle, 200)
    if args.rows is None:
        args.rows = ",".join(ISSUE18_ROWS if args.quick else ROWS)
    if args.pin:
        cores = sorted(os.sched_getaffinity(0))
        if len(cores) < 2:
            parser.error("--pin needs at least 2 cores")
        PIN.update(proxy=cores[-1], rest=cores[0])
        os.sched_setaffinity(0, {PIN["rest"]})  # this script, and every child from now on
    pipelines = [int(p) for p in args.pipelines.split(",")]
    tests: list[tuple[str, int, int]] = [
        (op, pipeline, args.clients) for pipeline in pipelines for op in ("SET", "GET")
    ]
    if args.latency_clients:
        tests.append(("GET", 1, args.latency_clients))
    wanted = [ALIASES.get(r.strip(), r.strip()) for r in args.rows.split(",")]
    if wanted == ["issue18"]:
        wanted = list(ISSUE18_ROWS)
    c_load = args.load == "redis-benchmark" or (
        args.load == "auto" and shutil.which("redis-benchmark") is not None
    )

    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        node = asyncio.run(_start_valkey(tmp / "valkey"))
        proxies: list[_Proxy] = []
        skipped: list[str] = []
        fleet: Fleet | None = None
        try:
            for name in (n for n in wanted if n not in ROWS):
                parser.error(f"unknown row {name!r}")
            if any(name in FLEET_ROWS for name in wanted):
                if not c_load:
                    parser.error(f"{', '.join(FLEET_ROWS)} need redis-benchmark (TLS)")
                fleet = Fleet(tmp / "fleet", node.port).start(
                    tunnel="db connect" in wanted,
                    cluster=any(name in CLUSTER_ROWS for name in wanted),
                )
            for name in wanted:
                if name == "direct":
                    proxies.append(_Proxy("direct", node.port))
                elif name == "agent" and fleet is not None:
                    agent = (fleet.pid("agent"),)
                    proxies.append(
                        _Proxy(name, fleet.agent_port, extra=fleet.tls_args(), pids=agent)
                    )
                elif name == "db connect" and fleet is not None:
                    pids = (fleet.pid("tunnel"), fleet.pid("agent"))
                    proxies.append(_Proxy(name, fleet.tunnel_port, pids=pids))
                elif name == "direct TLS" and fleet is not None:
                    front = (fleet.pid("front"),)
                    extra = fleet.front_tls_args()
                    proxies.append(_Proxy(name, fleet.front_port, extra=extra, pids=front))
                elif name == "direct TLS cluster" and fleet is not None:
                    front = (fleet.pid("cluster front"),)
                    extra = ["--cluster", *fleet.front_tls_args()]
                    port = fleet.cluster_front_ports[0]
                    proxies.append(_Proxy(name, port, extra=extra, pids=front, open_loop=False))
                elif name == "agent cluster" and fleet is not None:
                    agent = (fleet.pid("agent"),)
                    extra = fleet.cluster_tls_args()
                    proxies.append(_Proxy(name, fleet.agent_port, extra=extra, pids=agent))
                elif name == "haproxy TLS" and fleet is not None:
                    if shutil.which("haproxy") is None:
                        skipped.append(f"{name} (no haproxy: apt-get install haproxy)")
                        continue
                    port = fleet.start_haproxy_tls()
                    pids = (fleet.pid("haproxy TLS"),)
                    proxies.append(_Proxy(name, port, extra=fleet.tls_args(), pids=pids))
                elif name == "python TLS" and fleet is not None:
                    paths = fleet.python_tls_paths()
                    proxy = _start_python("bare-tls", name, fleet.front_port, paths)
                    proxy.extra = fleet.tls_args()
                    proxies.append(proxy)
                elif name == "engine":
                    proxies.append(_start_python("engine", name, node.port))
                elif name == "engine inspect=*":
                    proxies.append(_start_python("inspect", name, node.port))
                elif name == "bare uvloop":
                    proxies.append(_start_python("bare", name, node.port))
                elif name in ("haproxy", "nutcracker"):
                    if shutil.which(name) is None:
                        skipped.append(f"{name} (not installed)")
                        continue
                    start = _start_haproxy if name == "haproxy" else _start_nutcracker
                    proxies.append(start(node.port, tmp))
            _assign_roles(proxies, node, fleet)
            _fill(node.port)
            if fleet is not None and fleet.cluster_nodes:
                fleet.fill_cluster([_key(i) for i in range(KEYS)], VALUE)
            if PIN:
                for proxy in proxies:
                    for pid in proxy.roles.get("proxy", ()):
                        _pin_process(pid, PIN["proxy"])
            print(f"machine      {platform.machine()}, {os.cpu_count()} cores, Python "
                  f"{platform.python_version()}, uvloop, {platform.system()}")  # fmt: skip
            load_name = "redis-benchmark (C)" if c_load else "uvloop generator (Python)"
            print(f"workload     {load_name}, {args.clients} clients, 3-byte values over "
                  f"{KEYS} keys, ~{args.seconds:.0f}s per direct run, {args.rounds} "
                  f"interleaved rounds (median)")  # fmt: skip
            if fleet is not None:
                print(f"fleet        agent: fleetgate agent run, mutual TLS with the route in "
                      f"SNI ({SERVER_NAME}), TLS verify-full upstream to the stand-in's "
                      f"front ({fleet.front_kind}); db connect: fleetgate db connect "
                      f"before it")  # fmt: skip
            load = os.getloadavg()
            mode = (
                f"--pin: the proxy under test on core {PIN['proxy']}, everything else on core "
                f"{PIN['rest']}" if PIN else "not pinned: every process may run on any core"
            )  # fmt: skip
            print(f"mode         {mode}; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
                  f"at the start")  # fmt: skip
            if skipped:
                print(f"skipped:     {'; '.join(skipped)}")
            # requests per redis-benchmark run: about --seconds at each row's own rate
            requests: dict[tuple[str, str, int, int], int] = {}
            if c_load:
                for test in tests:
                    op, pipeline, clients = test
                    for proxy in proxies:
                        size = (20_000 if proxy.name == "direct" else 4_000) * pipeline
                        probe = _redis_benchmark(
                            proxy.port, op, pipeline, clients, size, proxy.extra
                        )
                        requests[(proxy.name, *test)] = max(
                            int(probe["rps"] * args.seconds), 1000 * pipeline
                        )
            for round_ in range(args.rounds):
                for test in tests:
                    op, pipeline, clients = test
                    order = proxies[round_ % len(proxies) :] + proxies[: round_ % len(proxies)]
                    for proxy in order:
                        cpu0, first0 = proxy.cpu(), proxy.first_cpu()
                        parts0 = _snapshot(proxy.roles)
                        if c_load:
                            n = requests[(proxy.name, *test)]
                            result: dict[str, Any] = dict(
                                _redis_benchmark(proxy.port, op, pipeline, clients, n, proxy.extra)
                            )
                            result["requests"] = n
                        else:
                            result = _python_load(proxy.port, op, pipeline, clients, args.seconds)
                        parts1 = _snapshot(proxy.roles)
                        cpu1, first1 = proxy.cpu(), proxy.first_cpu()
                        result["parts"] = _cpu_split(parts0, parts1, result["requests"])
                        result["first_us"] = (first1 - first0) / result["requests"] * 1e6
                        for key, before, after in zip(
                            ("user_us", "sys_us"), cpu0, cpu1, strict=True
                        ):
                            result[key] = (after - before) / result["requests"] * 1e6
                        result["cpu_us"] = result["user_us"] + result["sys_us"]
                        if c_load:  # the same clients connecting, one batch each
                            setup0 = sum(proxy.cpu())
                            _redis_benchmark(
                                proxy.port, op, pipeline, clients, clients * pipeline, proxy.extra
                            )
                            setup = sum(proxy.cpu()) - setup0
                            steady = result["cpu_us"] - setup / result["requests"] * 1e6
                            result["steady_us"] = max(steady, 0.0)
                        proxy.results.setdefault(test, []).append(result)
                if args.latency_rate:
                    order = proxies[round_ % len(proxies) :] + proxies[: round_ % len(proxies)]
                    for proxy in (p for p in order if p.open_loop):
                        proxy.open_results.append(
                            _run_open_loop(
                                proxy, args.latency_rate, args.latency_connections, args.seconds
                            )
                        )
            _report(proxies, tests)
            _cpu_report(proxies, tests)
            if args.latency_rate:
                _open_report(proxies, tests, args.latency_rate, args.latency_connections)
            _budget(proxies, tests)
            idle_each: dict[str, float] = {}
            if fleet is not None:
                print()
                print(asyncio.run(_audit_summary(fleet, proxies)))
                if args.idle and any(p.name in ("agent", "agent cluster") for p in proxies):
                    idle_each = _idle_agent(fleet, proxies, args.idle, args.idle_rounds)
            engine = next((p for p in proxies if p.name == "engine"), None)
            if args.idle and engine is not None and engine.process is not None:
                idle = _idle_sessions(
                    engine.process.pid, engine.port, args.idle, rounds=args.idle_rounds
                )
                before, figures = asyncio.run(idle)
                print()
                print(_idle_line("engine (plain)", args.idle, before, figures))
            print()
            missed = _floors(proxies, tests, idle_each)
            load = os.getloadavg()
            print(f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} at the end")
        finally:
            for proxy in proxies:
                proxy.stop()
            if fleet is not None:
                fleet.stop()
            asyncio.run(node.stop())
    return 1 if missed else 0


def _pin_process(pid: int, core: int) -> None:
    """Every thread of ``pid`` and of its child processes on ``core`` (threads started
    later inherit it from the thread that starts them)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        os.sched_setaffinity(int(task.name), {core})
        children = (task / "children").read_text().split()
        for child in children:
            _pin_process(int(child), core)


def _key_per_shard() -> list[bytes]:
    """One key of the GET runs on each of the cluster's shards (slot ranges as
    ``benchmarks/fleet.py`` assigns them)."""
    from redis.crc import key_slot

    from benchmarks.fleet import SHARDS
    from sandbox.memorydb import slot_ranges

    keys = []
    for first, last in slot_ranges(SHARDS):
        keys.append(next(k for k in map(_key, range(KEYS)) if first <= key_slot(k) <= last))
    return keys


def _idle_agent(fleet: Fleet, proxies: list[_Proxy], count: int, rounds: int) -> dict[str, float]:
    """The agent's RSS growth for ``count`` idle sessions through each engine (mutual
    TLS; each session sent a PING and a GET to each shard's keys, so it holds its TLS
    upstream: one connection for the single-node engine, one per shard for the cluster
    engine, which opens its shard links on first use), the engines taking turns (node first in
    odd rounds, cluster first in even ones) so neither always meets the heap the other
    left. Measured twice per session: just after those commands (*active*: the cluster
    engine then holds a connection per shard), and once the sessions stayed without a
    command past the agent's ``listener.shard_idle_timeout`` (*idle*: the cluster engine
    has closed the shard connections it did not start with, the agent trimmed its heap).
    KiB per idle session, median of the rounds, by row name (the floor's figure)."""
    context = ssl.create_default_context(cafile=str(fleet.identity / "ca.pem"))
    context.check_hostname = False  # the chain is checked; see docs/access.md
    context.load_cert_chain(fleet.identity / "cert.pem", fleet.identity / "key.pem")
    names = {"agent": SERVER_NAME, "agent cluster": CLUSTER_SERVER_NAME}
    rows = [p.name for p in proxies if p.name in names]
    gets = _key_per_shard()
    each: dict[str, list[float]] = {name: [] for name in rows}
    active: dict[str, list[float]] = {name: [] for name in rows}
    lines: dict[str, list[str]] = {name: [] for name in rows}
    quiet = _shard_idle_timeout() * 1.25 + HEAP_TRIM_EVERY + 2.0
    for round_ in range(-1, rounds):  # round -1: a warm-up, not counted
        for name in rows if round_ % 2 == 0 else rows[::-1]:
            idle = _idle_sessions(
                fleet.pid("agent"), fleet.agent_port, count, rounds=1, tls=context,
                sni=names[name], gets=gets, quiet=quiet if round_ >= 0 else 0.0,
            )  # fmt: skip
            before, ((open_, closed, quiet_),) = asyncio.run(idle)
            time.sleep(5.5)  # the agent trims the heap at most every 5 s (fleetgate/heap.py)
            if round_ < 0:
                continue
            each[name].append((quiet_ - before) / count)
            active[name].append((open_ - before) / count)
            lines[name].append(
                f"{before / 1024:.1f} before, {open_ / 1024:.1f} active, {quiet_ / 1024:.1f} "
                f"idle, {closed / 1024:.1f} closed"
            )
    print()
    out = {}
    for name in rows:
        out[name] = statistics.median(each[name])
        engine = "cluster engine, 3 shards" if name == "agent cluster" else "single-node engine"
        print(f"idle         {name} ({engine}): {count} sessions (PING, {len(gets)} GETs), "
              f"{statistics.median(active[name]):.1f} KiB each active, {out[name]:.1f} KiB "
              f"idle {quiet:.0f} s more (medians of {rounds}); agent RSS MiB: "
              f"{'; '.join(lines[name])}")  # fmt: skip
    if len(rows) == 2 and statistics.median(active["agent"]):
        ratio = statistics.median(active["agent cluster"]) / statistics.median(active["agent"])
        print(f"idle         active sessions cluster/node: {ratio:.2f}x (every shard used "
              f"within listener.shard_idle_timeout; the floor is on idle sessions)")  # fmt: skip
    return out


def _shard_idle_timeout() -> float:
    """The agent's default ``listener.shard_idle_timeout`` (the benchmark's agent keeps
    it), 0 when shard connections are kept."""
    from dbservice.gateway.settings import ListenerConfig

    default = ListenerConfig.model_fields["shard_idle_timeout"].default
    return float(default or 0.0)


FLOORS: tuple[tuple[str, int, float], ...] = (
    ("agent", 16, 0.55),
    ("agent", 1, 0.45),
    ("db connect", 16, 0.4),
    ("db connect", 1, 0.4),
)
"""Issue 5's floors (throughput as a ratio to plain direct), superseded by issue 18's
(``_floors``); kept as the reference of the budget lines (README: "The budget")."""

CLUSTER_FLOOR = 0.9
"""Issue 18: the cluster engine's throughput at least this times the single-node
engine's, at pipeline 1 and 16 (SET and GET)."""
PEER_FLOORS = {1: 0.8, 16: 0.6}
"""Issue 18: the agent (single-node engine) at least this times haproxy with TLS on both
sides, by pipeline, in requests per second with the proxy pinned to its own core."""
CPU_FLOORS = {"agent": 2.5, "agent cluster": 3.0}
"""Issue 18: the agent's CPU per request at pipeline 16, microseconds, by engine."""
ADDED_P50_FLOOR = 0.15
"""Issue 18: the p50 the agent adds (either engine) to TLS direct's, open loop, ms."""
HEAP_TRIM_EVERY = 5.0
"""Seconds between two heap trims of the agent at least (fleetgate/heap.py's EVERY)."""
IDLE_FLOOR = 1.5
"""Issue 18: an idle session through the cluster engine (3 shards) costs at most this
times one through the single-node engine."""


def floor_verdicts(
    rps: dict[tuple[str, str, int], float],
    cpu: dict[tuple[str, str, int], float],
    open_p50: dict[str, float],
    idle_kib: dict[str, float],
) -> list[tuple[str, str, bool]]:
    """Issue 18's floors from one run's medians: ``rps`` and ``cpu`` (us per request) by
    (row, op, pipeline), ``open_p50`` (ms) and ``idle_kib`` (per session) by row. One
    (what, figure against its floor, met) per floor whose rows were measured."""
    out: list[tuple[str, str, bool]] = []
    for pipeline in (1, 16):
        for op in ("SET", "GET"):
            cluster = rps.get(("agent cluster", op, pipeline))
            node = rps.get(("agent", op, pipeline))
            if cluster is not None and node:
                ratio = cluster / node
                figure = f"{ratio:.2f}x (>= {CLUSTER_FLOOR}x)"
                out.append((f"cluster/node {op} P{pipeline}", figure, ratio >= CLUSTER_FLOOR))
    for pipeline, floor in PEER_FLOORS.items():
        for op in ("SET", "GET"):
            agent, peer = rps.get(("agent", op, pipeline)), rps.get(("haproxy TLS", op, pipeline))
            if agent is not None and peer:
                ratio = agent / peer
                out.append((f"agent/haproxy TLS {op} P{pipeline}",
                            f"{ratio:.2f}x (>= {floor}x)", ratio >= floor))  # fmt: skip
    for row, floor in CPU_FLOORS.items():
        for op in ("SET", "GET"):
            us = cpu.get((row, op, 16))
            if us is not None:
                out.append((f"{row} CPU/req {op} P16", f"{us:.2f} us (<= {floor} us)", us <= floor))
    base = open_p50.get("direct TLS")
    for row in ("agent", "agent cluster"):
        if base is not None and row in open_p50:
            added = open_p50[row] - base
            out.append((f"{row} added p50", f"{added:+.3f} ms (<= {ADDED_P50_FLOOR} ms)",
                        added <= ADDED_P50_FLOOR))  # fmt: skip
    if idle_kib.get("agent") and "agent cluster" in idle_kib:
        ratio = idle_kib["agent cluster"] / idle_kib["agent"]
        out.append(("idle session cluster/node",
                    f"{ratio:.2f}x ({idle_kib['agent cluster']:.1f} / {idle_kib['agent']:.1f} "
                    f"KiB; <= {IDLE_FLOOR}x)", ratio <= IDLE_FLOOR))  # fmt: skip
    return out


def _floors(
    proxies: list[_Proxy], tests: list[tuple[str, int, int]], idle_kib: dict[str, float]
) -> list[str]:
    """Print issue 18's floors against this run, each met or missed; the missed ones."""
    clients = tests[0][2]
    rps: dict[tuple[str, str, int], float] = {}
    cpu: dict[tuple[str, str, int], float] = {}
    with_setup: dict[tuple[str, str, int], float] = {}
    for proxy in proxies:
        for (op, pipeline, n), results in proxy.results.items():
            if n == clients:
                rps[(proxy.name, op, pipeline)] = _median(results, "rps")
                if proxy.measured_cpu:
                    key = "steady_us" if "steady_us" in results[0] else "cpu_us"
                    cpu[(proxy.name, op, pipeline)] = _median(results, key)
                    with_setup[(proxy.name, op, pipeline)] = _median(results, "cpu_us")
    open_p50 = {p.name: _median(p.open_results, "p50_ms") for p in proxies if p.open_results}
    verdicts = floor_verdicts(rps, cpu, open_p50, idle_kib)
    if not verdicts:
        return []
    mode = "--pin" if PIN else "not pinned (the floors are stated for --pin)"
    print(f"floors (issue 18), {clients} clients, medians of this run, {mode}")
    for what, figure, met in verdicts:
        print(f"  {what:<32} {figure:<40} {'met' if met else 'MISSED'}")
    if any("steady_us" in r for p in proxies for rs in p.results.values() for r in rs):
        print(
            "  CPU/req: the proxy's CPU per request without connecting its 50 clients (a run"
            " of one batch per client, measured after each run, taken away); with it:"
            + "".join(
                f" {row} {op} {with_setup[(row, op, 16)]:.2f} us;"
                for row in CPU_FLOORS
                for op in ("SET", "GET")
                if (row, op, 16) in with_setup
            )
        )
    for (row, op, pipeline), value in sorted(rps.items()):
        # information: how much of the cluster/node ratio the reference paths set alone
        node = rps.get(("direct TLS", op, pipeline))
        if row == "direct TLS cluster" and node:
            print(f"  {'(direct TLS cluster/direct TLS ' + op + ' P' + str(pipeline) + ')':<32} "
                  f"{value / node:.2f}x: the reference paths alone, information")  # fmt: skip
    saturated = [
        f"{proxy.name} {op} P{pipeline}"
        for proxy in proxies
        if proxy.name in ("agent", "agent cluster", *PEERS)
        for (op, pipeline, n), results in proxy.results.items()
        if n == clients and _median_parts(results).get("rest", 0.0) >= LOAD_SIDE_FULL
    ]
    if saturated:
        print(
            f"  the load side's core was at least {LOAD_SIDE_FULL:.0%} busy in: "
            + ", ".join(saturated)
            + ": there the ratio measures the load side as much as the proxy"
        )
    for pipeline in PEER_FLOORS:  # information: the same ratio in CPU per request
        for op in ("SET", "GET"):
            agent, peer = cpu.get(("agent", op, pipeline)), cpu.get(("haproxy TLS", op, pipeline))
            if agent and peer:
                print(f"  {'(agent/haproxy TLS by CPU ' + op + ' P' + str(pipeline) + ')':<32} "
                      f"{peer / agent:.2f}x: requests per CPU-second, information")  # fmt: skip
    return [what for what, _, met in verdicts if not met]


async def _audit_summary(fleet: Fleet, proxies: list[_Proxy]) -> str:
    """How many query events the agent stored, against the commands it proxied."""
    import nats

    from bus import subjects

    sent = sum(
        int(result["requests"])
        for proxy in proxies
        if proxy.name in ("agent", "db connect", "agent cluster")
        for results in proxy.results.values()
        for result in results
    )
    await asyncio.sleep(1)  # the agent's last batches go out within 0.2 s
    client = await nats.connect(fleet.nats_url)
    stored = dropped = 0  # query events (a batch counts its commands); audit.dropped sums
    try:
        js = client.jetstream()
        messages = (await js.stream_info(subjects.AUDIT_STREAM)).state.messages
        sub = await js.subscribe(
            subjects.audit_filter(), stream=subjects.AUDIT_STREAM, ordered_consumer=True
        )
        for _ in range(messages):
            body = json.loads((await sub.next_msg(timeout=10)).data)
            if body.get("type") == "db.session.queries":
                stored += len(body.get("queries", ()))
            elif body.get("type") == "db.session.query":
                stored += 1
            elif body.get("type") == "audit.dropped":
                dropped += int(body.get("dropped", 0))
        await sub.unsubscribe()
    finally:
        await client.close()
    return (f"audit        {stored:,} db.session.query events ({messages:,} messages) in "
            f"{subjects.AUDIT_STREAM}, {dropped:,} dropped (audit.dropped), for about {sent:,} "
            f"commands through the agent in the measured runs (the probes before them are "
            f"audited too)")  # fmt: skip


def _median_parts(results: list[dict[str, Any]]) -> dict[str, float]:
    """The median over the rounds of each ``parts`` figure (see ``_cpu_split``)."""
    keys = results[0]["parts"].keys()
    return {key: statistics.median(r["parts"][key] for r in results) for key in keys}


def _cpu_report(proxies: list[_Proxy], tests: list[tuple[str, int, int]]) -> None:
    """Per test, the CPU per request of every process of each row's path, and the
    machine's busy share over the run."""
    print()
    print(f"CPU per request of every process in the path, us (user+sys, medians), and the "
          f"machine's busy share ({os.cpu_count()} cores)")  # fmt: skip
    names = (*CPU_ROLES, "other", "total", "irq")
    core = f"core{PIN['proxy']}" if PIN else ""
    rest = f"core{PIN['rest']}" if PIN else ""
    print(f"{'test':<12}{'row':<18}" + "".join(f"{n:>8}" for n in names[:-1]) + f"{'busy':>7}"
          f"{'(irq)':>8}{core:>7}{rest:>7}")  # fmt: skip
    for test in tests:
        op, pipeline, clients = test
        label = f"{op} P{pipeline}" + (f" c{clients}" if clients != tests[0][2] else "")
        for proxy in proxies:
            parts = _median_parts(proxy.results[test])
            cells = "".join(f"{parts[n]:>8.1f}" if n in parts else f"{'-':>8}" for n in names[:-1])
            pinned = f"{parts['core'] * 100:>6.0f}%" if "core" in parts else ""
            pinned += f"{parts['rest'] * 100:>6.0f}%" if "rest" in parts else ""
            print(f"{label:<12}{proxy.name:<18}{cells}{parts['busy'] * 100:>6.0f}%"
                  f"{parts.get('irq', 0.0):>8.1f}{pinned}")  # fmt: skip
        print()
    print(
        "client: the load generator; proxy: the row's proxy (the agent in the agent and db"
        " connect rows); tunnel: fleetgate db connect; front: the stand-in's TLS front;"
        " server: valkey-server; nats: nats-server (the agent's audit); other: the rest of"
        " the machine's busy time (this script, idle fleet parts, other work); total: the"
        " machine's busy time per request; busy: its share of all cores over the run;"
        " (irq): of that time, the kernel's interrupt time (moving loopback packets),"
        " already inside the processes' system time; core N (--pin): the pinned proxy's core's"
        " busy share (its own and any other work on the machine that ran there); the other"
        " core N: the load side's core (generator, fronts, servers, NATS): near 100% there,"
        " the row's throughput is the load side's as much as the proxy's."
        " Each run's figures include"
        " connecting its clients (TLS handshakes) once"
    )
    noise = max(
        (r["parts"]["noise"] for p in proxies for results in p.results.values() for r in results),
        default=0.0,
    )
    if noise > 0.1:
        print(
            f"warning: the machine was not quiet: up to {noise * 100:.0f}% of its time went"
            f" to other work during a run; compare rows within this run only, and rerun on a"
            f" quiet machine for figures to keep"
        )


def _open_report(
    proxies: list[_Proxy], tests: list[tuple[str, int, int]], rate: float, connections: int
) -> None:
    direct = next((p for p in proxies if p.name == "direct" and p.open_results), None)
    base = _median(direct.open_results, "p50_ms") if direct is not None else None
    print()
    print(f"open-loop latency: GET at {rate:,.0f} req/s in total over {connections} "
          f"connections on a fixed schedule, each request timed from its scheduled send "
          f"(medians of the rounds)")  # fmt: skip
    print(f"{'row':<18}{'achieved':>10}{'p50':>9}{'p99':>9}{'+p50':>9}"
          f"{'send lag p50/p99':>20}{'busy':>7}")  # fmt: skip
    for proxy in proxies:
        runs = proxy.open_results
        if not runs:
            continue
        p50 = _median(runs, "p50_ms")
        added = f"{p50 - base:+.3f}" if base is not None else "-"
        lag = f"{_median(runs, 'lag_p50_ms'):.3f}/{_median(runs, 'lag_p99_ms'):.3f}"
        print(f"{proxy.name:<18}{_median(runs, 'rate'):>10,.0f}{p50:>9.3f}"
              f"{_median(runs, 'p99_ms'):>9.3f}{added:>9}{lag:>20}"
              f"{_median(runs, 'busy') * 100:>6.0f}%")  # fmt: skip
    print(
        "ms; achieved: the rate the generator kept; send lag: how late it sent (counted in"
        " the latencies); busy: the machine's share of all cores over the run"
    )
    alone = next((t for t in tests if t[0] == "GET" and t[1] == 1 and t[2] != tests[0][2]), None)
    if direct is not None and base is not None and alone is not None:
        one = _median(direct.results[alone], "p50_ms")
        print(
            f"check: direct's open-loop p50 {base:.3f} ms, redis-benchmark's with"
            f" {alone[2]} client(s) (C, closed loop, nothing queued: the GET P1 c{alone[2]}"
            f" test) {one:.3f} ms: the generator adds about {max(base - one, 0.0):.3f} ms"
            f" to each latency, the same in every row (+p50 takes it away)"
        )


def _budget(proxies: list[_Proxy], tests: list[tuple[str, int, int]]) -> None:
    """For each throughput floor: the CPU per request the rest of the path used in the
    floor's row against the CPU the direct row's path used (and the whole machine), so
    the most CPU per request the agent may use at the floor's rate, and the highest
    ratio any agent could reach (README: "The budget")."""
    rows = {p.name: p for p in proxies}
    direct = rows.get("direct")
    if direct is None:
        return
    cores = os.cpu_count() or 1
    clients = tests[0][2]
    lines: list[str] = []
    for name, pipeline, floor in FLOORS:
        row = rows.get(name)
        for op in ("SET", "GET"):
            test = (op, pipeline, clients)
            if row is None or test not in row.results:
                continue
            lines += _budget_lines(rows, direct, row, test, floor, cores)
    if lines:
        print()
        print("budget: what the rest of the path leaves the agent on this machine (README: budget)")
        print("\n".join(lines))


def _budget_lines(
    rows: dict[str, _Proxy],
    direct: _Proxy,
    row: _Proxy,
    test: tuple[str, int, int],
    floor: float,
    cores: int,
) -> list[str]:
    parts = _median_parts(row.results[test])
    mine = _median_parts(direct.results[test])
    base = _median(direct.results[test], "rps")  # D
    target = floor * base  # T
    # S: the others in this row; the client, front and server also ran, at a higher
    # rate (batching more per wake-up), in the direct TLS row: the lower is taken.
    others = {r: parts[r] for r in ("client", "front", "server", "nats") if r in parts}
    tls = rows.get("direct TLS")
    tls_parts = _median_parts(tls.results[test]) if tls and test in tls.results else {}
    lower = [r for r in ("client", "front", "server") if r in others and r in tls_parts]
    lower = [r for r in lower if tls_parts[r] < others[r]]
    for role in lower:
        others[role] = tls_parts[role]
    others_us = max(sum(others.values()), 1e-9)
    # What direct's path used: its client and server, per request, and in cores.
    direct_us = mine.get("client", 0.0) + mine.get("server", 0.0)
    direct_cores = direct_us * base / 1e6
    busiest = max(rows.values(), key=lambda p: _median_parts(p.results[test])["busy"])
    machine = cores * _median_parts(busiest.results[test])["busy"]
    # One core for each single-threaded process of the path.
    limit = min((1e6 / us for r, us in others.items() if r != "nats" and us > 0), default=1e18)
    one_core = 1e6 / target if row.name == "agent" else float("inf")
    allowed = min(direct_cores * 1e6 / target - others_us, one_core)
    allowed_machine = min(machine * 1e6 / target - others_us, one_core)
    ceiling = min(direct_us / others_us, limit / base)
    ceiling_machine = min(machine * 1e6 / others_us, limit) / base
    bound = "" if limit >= machine * 1e6 / others_us else "; one core for a process bounds it"
    ours = parts.get("proxy", 0.0) + parts.get("tunnel", 0.0)
    subject = "the agent" if row.name == "agent" else "the tunnel and the agent together"

    def room(us: float) -> str:
        return f"{us:.1f} us/req" if us > 0 else "none"

    need = (
        f"{subject} may use {room(allowed)} with the CPU direct's path used,"
        f" {room(allowed_machine)} with the whole machine"
    )
    measured = f"measured {ours:.1f}"
    bare = rows.get("bare uvloop")
    if bare is not None and test in bare.results:
        bare_us = _median_parts(bare.results[test]).get("proxy")
        if bare_us is not None:
            measured += f"; bare uvloop without TLS {bare_us:.1f}"
    if "front" in tls_parts:
        measured += f"; the front, in C, for one TLS side {tls_parts['front']:.1f}"
    detail = ", ".join(f"{r} {v:.1f}" + "*" * (r in lower) for r, v in others.items())
    if lower:
        detail += "; * from the direct TLS row, lower there"
    alone = ""
    if tls is not None and test in tls.results:
        ratio = _median(tls.results[test], "rps") / base
        alone = f"; the stand-in's TLS front alone reached {ratio:.2f}x"
    what = f"{row.name} {test[0]} P{test[1]}"
    pad = " " * 24
    return [
        f"  {what:<22}floor {floor:.2f}x = {target:,.0f} req/s: {need}; {measured}",
        f"{pad}others {others_us:.1f} us/req ({detail}); direct's path {direct_us:.1f} us/req"
        f" = {direct_cores:.2f} cores at {base:,.0f} req/s; the machine {machine:.2f} cores"
        f" (the busiest row: {busiest.name})",
        f"{pad}ceiling with a free agent: {ceiling:.2f}x with the CPU direct's path used,"
        f" {ceiling_machine:.2f}x with the whole machine{bound}{alone}",
    ]


def _report(proxies: list[_Proxy], tests: list[tuple[str, int, int]]) -> None:
    direct = next((p for p in proxies if p.name == "direct"), None)
    print()
    print(f"{'test':<12}{'row':<18}{'rps':>11}{'ratio':>8}{'p50':>9}{'p99':>9}"
          f"{'+p50':>9}  CPU/req (user+sys)")  # fmt: skip
    for test in tests:
        op, pipeline, clients = test
        label = f"{op} P{pipeline}" + (f" c{clients}" if clients != tests[0][2] else "")
        base = direct.results[test] if direct is not None else None
        for proxy in proxies:
            rows = proxy.results[test]
            rps = _median(rows, "rps")
            ratio = f"{rps / _median(base, 'rps'):.2f}x" if base else "-"
            p50, p99 = _median(rows, "p50_ms"), _median(rows, "p99_ms")
            added = f"{p50 - _median(base, 'p50_ms'):+.3f}" if base else "-"
            cpu = (
                f"{_median(rows, 'cpu_us'):.1f} ({_median(rows, 'user_us'):.1f}+"
                f"{_median(rows, 'sys_us'):.1f})"
                if proxy.measured_cpu
                else "-"
            )
            if len(proxy.pids) > 1:
                cpu += f", tunnel {_median(rows, 'first_us'):.1f}"
            print(f"{label:<12}{proxy.name:<18}{rps:>11,.0f}"
                  f"{ratio:>8}{p50:>9.3f}{p99:>9.3f}{added:>9}  {cpu}")  # fmt: skip
        print()
    print(
        "p50, p99, +p50 (added to direct): ms per request (per batch when pipelined);"
        " CPU/req: the proxy process's CPU time per request, in microseconds (db connect:"
        " the tunnel's and the agent's together, then the tunnel's alone)"
    )


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_load":
        import uvloop

        port, op, pipeline, clients, seconds = sys.argv[2:7]
        out = uvloop.run(_load(int(port), op, int(pipeline), int(clients), float(seconds)))
        print(json.dumps(out))
    elif len(sys.argv) > 1 and sys.argv[1] == "--_openloop":
        port, rate, connections, seconds, tls = json.loads(sys.argv[2])
        print(json.dumps(_open_loop(port, rate, connections, seconds, tls)))
    elif len(sys.argv) > 1 and sys.argv[1] == "--_serve":
        import uvloop

        kind, upstream = sys.argv[2], int(sys.argv[3])
        if kind == "bare":
            uvloop.run(_serve_bare(upstream))
        elif kind == "bare-tls":
            uvloop.run(_serve_bare(upstream, tls=sys.argv[4:8]))
        else:
            uvloop.run(_serve_engine(upstream, inspect=kind == "inspect"))
    else:
        sys.exit(main())
