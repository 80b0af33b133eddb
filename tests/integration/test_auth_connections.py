"""The auth service under slow and abusive connections, with raw sockets over real TLS:
connections per source address are bounded before TLS, a handshake, a request head and
a body each get a bounded time, and refusals and resets are logged as one summary line,
never as a traceback per connection."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from bus import Bus
from bus.audit import ensure_audit_stream
from dbservice.access.audit import AuditEmitter
from dbservice.auth.admin import init_ca
from dbservice.auth.service import AuthConfig, RunningService, start_service

pytestmark = pytest.mark.timeout(90)

ATTACKER = "127.0.0.2"  # loopback, but another source address than the healthy client
LIMITS = {
    "per_address": 5,
    "handshake_timeout": "1s",
    "header_timeout": "1s",
    "body_timeout": "1s",
    "log_interval": "1h",
}
SLOW_HEAD = b"POST /v1/login HTTP/1.1\r\nHost: auth\r\nContent-Length: 60000\r\n\r\n"


@dataclass
class Service:
    running: RunningService
    ca_file: Path

    @property
    def port(self) -> int:
        return self.running.port

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    async def healthz(self) -> int:
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as http:
            url = f"https://127.0.0.1:{self.port}/healthz"
            async with http.get(url, ssl=self.tls()) as response:
                return response.status

    async def connect(
        self, *, tls: bool = True, source: str = ATTACKER
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.wait_for(
            asyncio.open_connection(
                "127.0.0.1",
                self.port,
                ssl=self.tls() if tls else None,
                server_hostname="127.0.0.1" if tls else None,
                local_addr=(source, 0),
            ),
            10,
        )


@pytest.fixture
async def service(bus: Bus, tmp_path: Path) -> AsyncIterator[Service]:
    result = await init_ca(bus, tmp_path / "ca")
    await ensure_audit_stream(bus)
    config = AuthConfig.model_validate({
        "listen": "127.0.0.1:0", "ca_dir": str(tmp_path / "ca"), "host_id": "auth-1",
        "connections": LIMITS,
    })  # fmt: skip
    emitter = AuditEmitter.for_bus(bus, host_id="auth-1")
    emitter.start()
    running = await start_service(config, bus=bus, ca=result.ca, audit=emitter)
    try:
        yield Service(running, result.cert_path)
    finally:
        await running.close()
        await emitter.aclose()


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bytes:
    """Everything the server sends until it closes the connection (within ``seconds``)."""
    chunks = []
    async with asyncio.timeout(seconds):
        while True:
            try:
                chunk = await reader.read(65536)
            except (ConnectionError, ssl.SSLError):
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


def _no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    noisy = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not noisy, [(r.name, r.getMessage()) for r in noisy]


async def test_slow_connections_from_one_address_keep_nobody_else_out(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tries = await asyncio.gather(*(service.connect() for _ in range(20)), return_exceptions=True)
    held = [t for t in tries if not isinstance(t, BaseException)]
    assert len(held) == 5, tries  # the rest closed before TLS
    for _, writer in held:
        writer.write(SLOW_HEAD)  # and no body
        await writer.drain()
    listener = service.running.listener
    assert listener.open[ATTACKER] <= 5
    assert await service.healthz() == 200  # another address gets in at once
    # the bodies never come: each is answered 408 after body_timeout and closed
    started = time.monotonic()
    answers = await asyncio.gather(*(_closed_within(r, 15) for r, _ in held))
    assert all(a.startswith(b"HTTP/1.1 408") for a in answers), answers
    assert b"the body did not arrive within 1s" in answers[0]
    assert time.monotonic() - started < 15
    for _, writer in held:
        writer.close()
    await _until(lambda: ATTACKER not in listener.open)
    refused = [r for r in caplog.records if r.name == "dbservice.auth.listener"]
    refused = [r for r in refused if r.levelno >= logging.WARNING]
    assert len(refused) == 1, [r.getMessage() for r in refused]  # one line, not 15
    assert f"from {ATTACKER}: more than 5 connections open" in refused[0].getMessage()
    _no_tracebacks(caplog)
    # the address's places are free again
    reader, writer = await service.connect()
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: auth\r\nConnection: close\r\n\r\n")
    assert (await _closed_within(reader, 10)).startswith(b"HTTP/1.1 200")
    writer.close()


async def test_silent_and_slow_connections_are_closed_in_bounded_time(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    # no TLS handshake at all: closed after handshake_timeout
    silent, silent_writer = await service.connect(tls=False)
    # a handshake, then half a request head: closed after header_timeout
    partial, partial_writer = await service.connect()
    partial_writer.write(b"POST /v1/login HTTP/1.1\r\nHost: auth\r\n")
    # a handshake, then nothing
    idle, idle_writer = await service.connect()
    for reader in (silent, partial, idle):
        await _closed_within(reader, 10)
    for writer in (silent_writer, partial_writer, idle_writer):
        writer.close()
    await _until(lambda: not service.running.listener.open)
    assert await service.healthz() == 200
    _no_tracebacks(caplog)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a flood's client that gives up does."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


async def test_connections_reset_at_every_stage_leave_no_tracebacks(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for round_ in range(4):
        # reset before or during the TLS handshake (a partial ClientHello)
        raw = socket.create_connection(("127.0.0.1", service.port), 10, ("127.0.0.3", 0))
        if round_ % 2:
            raw.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(20))
        await asyncio.sleep(0.05)
        _reset(raw)
        # reset after the handshake, with a request head and part of its body
        for data in (b"", SLOW_HEAD, SLOW_HEAD + b'{"user": "al'):
            _, writer = await service.connect(source="127.0.0.3")
            writer.write(data)
            await writer.drain()
            writer.transport.abort()
    await _until(lambda: not service.running.listener.open)
    assert await service.healthz() == 200
    _no_tracebacks(caplog)


async def _until(check: object, seconds: float = 15) -> None:
    deadline = time.monotonic() + seconds
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "not within time"
        await asyncio.sleep(0.05)


class _Broken(Counter[str]):
    """A count of open connections that fails when read: an accept loop's bug, at our
    own seam."""

    def __getitem__(self, key: str) -> int:
        raise RuntimeError("the count is broken")


async def test_a_failed_accept_loop_is_not_silent(service: Service) -> None:
    """``serve()`` (the auth service's root task) ends with the accept loop's error, so
    the process stops with the reason instead of serving no one."""
    listener = service.running.listener
    serving = asyncio.ensure_future(listener.serve())
    await asyncio.sleep(0.05)
    assert not serving.done()
    listener.open = _Broken()
    _, writer = await service.connect(tls=False, source="127.0.0.1")
    with pytest.raises(RuntimeError, match="the count is broken"):
        await asyncio.wait_for(serving, 10)
    writer.close()
