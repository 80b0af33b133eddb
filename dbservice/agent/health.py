"""Health checks: how to dial a database (host aliases, TLS as configured), one probe
(TCP connect, TLS handshake, RESP ``PING``), and the status machine over probe results.

Status machine (as the best-known system does it): the first result sets ``healthy``
or ``unhealthy``; afterwards the status flips only once ``healthy_threshold``
consecutive passes (or ``unhealthy_threshold`` consecutive failures) are seen.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from bus.schemas import DatabaseResource
from bus.servers import HealthStatus, TargetHealth
from dbservice.agent.config import join_host_port, split_host_port
from dbservice.upstream.tls import upstream_context
from fleetgate.resp import encode_command

PING = encode_command([b"PING"])
ALIVE_ERRORS = (b"-NOAUTH", b"-WRONGPASS", b"-NOPERM")
"""Error replies that still prove a working server: it wants credentials (or rights) the
probe does not have."""


@dataclass(frozen=True)
class Target:
    """Where and how to dial one database."""

    host: str
    port: int
    tls: ssl.SSLContext | None
    server_name: str | None
    """SNI and the name verified (verify-full); the database's own host, not an alias."""

    @property
    def address(self) -> str:
        return join_host_port(self.host, self.port)

    @property
    def protocol(self) -> str:
        return "TCP+TLS+RESP" if self.tls else "TCP+RESP"


def resolve_alias(host: str, port: int, aliases: Mapping[str, str]) -> tuple[str, int]:
    """``host:port`` first, then ``host``; an alias without a port keeps ``port``."""
    target = aliases.get(join_host_port(host, port).lower()) or aliases.get(host.lower())
    if target is None:
        return host, port
    new_host, new_port = split_host_port(target, default_port=0)
    return new_host, new_port or port


@dataclass
class TLSContexts:
    """SSL contexts built once per distinct (mode, CA) and shared: each one holds the
    whole system trust store, so a thousand databases must not mean a thousand copies.
    Built by :func:`dbservice.upstream.tls.upstream_context` (system roots, Amazon's
    root CAs, ``extra_ca_file``, the database's CA)."""

    extra_ca_file: Path | None = None
    _cache: dict[tuple[str, str | None], ssl.SSLContext] = field(default_factory=dict)

    def get(self, mode: str, ca_pem: str | None) -> ssl.SSLContext | None:
        if mode == "disabled":
            return None
        key = (mode, ca_pem)
        context = self._cache.get(key)
        if context is None:
            context = self._build(mode, ca_pem)
            self._cache[key] = context
        return context

    def _build(self, mode: str, ca_pem: str | None) -> ssl.SSLContext:
        context = upstream_context(mode, ca_pem=ca_pem, ca_file=self.extra_ca_file)
        assert context is not None  # "disabled" never gets here
        return context


def build_target(
    resource: DatabaseResource, *, aliases: Mapping[str, str], contexts: TLSContexts
) -> Target:
    """How to dial ``resource`` (raises ValueError for a URI that is not host:port)."""
    host, port = split_host_port(resource.spec.uri, default_port=6379)
    dial_host, dial_port = resolve_alias(host, port, aliases)
    tls = resource.spec.tls
    memorydb = resource.spec.aws.memorydb if resource.spec.aws else None
    mode = "disabled" if memorydb is not None and not memorydb.tls_enabled else tls.mode
    return Target(
        host=dial_host,
        port=dial_port,
        tls=contexts.get(mode, tls.ca_cert),
        server_name=tls.server_name or host,
    )


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    error: str = ""
    detail: str = ""


Prober = Callable[[Target, float], Awaitable[ProbeResult]]
"""One probe of a target within a timeout; :func:`probe` is the real one."""


async def probe(target: Target, limit: float) -> ProbeResult:
    """TCP connect, TLS handshake when TLS is on, then ``PING``; never raises."""
    phase = f"connect to {target.address}"
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(limit):
            reader, writer = await asyncio.open_connection(target.host, target.port)
            if target.tls is not None:
                phase = "TLS handshake"
                await writer.start_tls(target.tls, server_hostname=target.server_name)
            phase = "PING"
            writer.write(PING)
            await writer.drain()
            line = await reader.readline()
    except TimeoutError:
        return ProbeResult(False, f"no answer within {limit:g}s ({phase})")
    except ssl.SSLCertVerificationError as exc:
        return ProbeResult(False, f"{phase}: certificate not trusted: {exc.verify_message}")
    except ssl.SSLError as exc:
        return ProbeResult(False, f"{phase}: {exc.reason or exc}")
    except (OSError, EOFError) as exc:
        return ProbeResult(False, f"{phase}: {_reason(exc)}")
    finally:
        if writer is not None:
            writer.transport.abort()
    return _judge(line)


def _reason(exc: BaseException) -> str:
    """``Connection refused`` rather than asyncio's ``Connect call failed (...)``."""
    errno = getattr(exc, "errno", None)
    if isinstance(errno, int) and errno > 0:
        return os.strerror(errno)
    return str(exc) or type(exc).__name__


def _judge(line: bytes) -> ProbeResult:
    reply = line.rstrip(b"\r\n")
    if reply == b"+PONG":
        return ProbeResult(True)
    if reply.startswith(ALIVE_ERRORS):
        return ProbeResult(True, detail="the server asks for authentication")
    if not line:
        return ProbeResult(False, "PING: the server closed the connection")
    return ProbeResult(False, f"PING: unexpected reply {reply[:120].decode(errors='replace')!r}")


@dataclass
class HealthState:
    """The status machine of one database on one agent."""

    healthy_threshold: int
    unhealthy_threshold: int
    address: str = ""
    protocol: str = ""
    status: HealthStatus = "unknown"
    message: str = "initialized"
    error: str = ""
    transition_time: datetime | None = None
    checked_at: datetime | None = None
    _last_ok: bool | None = None
    _streak: int = 0

    def observe(self, result: ProbeResult, now: datetime) -> bool:
        """Record one probe result; True when the status changed."""
        self._streak = self._streak + 1 if result.ok is self._last_ok else 1
        self._last_ok = result.ok
        self.checked_at = now
        if not result.ok:
            self.error = result.error
        plural = "s" if self._streak != 1 else ""
        self.message = f"{self._streak} health check{plural} {'passed' if result.ok else 'failed'}"
        if result.detail:
            self.message += f" ({result.detail})"
        new = self.status
        if self.status == "unknown":
            new = "healthy" if result.ok else "unhealthy"
        elif result.ok and self._streak >= self.healthy_threshold:
            new = "healthy"
        elif not result.ok and self._streak >= self.unhealthy_threshold:
            new = "unhealthy"
        if new == self.status:
            return False
        self.status = new
        self.transition_time = now
        return True

    def snapshot(self) -> TargetHealth:
        return TargetHealth(
            status=self.status,
            message=self.message,
            error=self.error,
            address=self.address,
            protocol=self.protocol,
            transition_time=self.transition_time,
            checked_at=self.checked_at,
        )
