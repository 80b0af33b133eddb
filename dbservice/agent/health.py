"""Health checks: one probe (TCP connect, TLS handshake, RESP ``PING``) of a database
dialled as :mod:`dbservice.upstream.dial` says, and the status machine over probe
results.

Status machine (as the best-known system does it): the first result sets ``healthy``
or ``unhealthy``; afterwards the status flips only once ``healthy_threshold``
consecutive passes (or ``unhealthy_threshold`` consecutive failures) are seen.
"""

from __future__ import annotations

import asyncio
import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from bus.servers import HealthStatus, TargetHealth
from dbservice.upstream.dial import Target as Target
from dbservice.upstream.dial import TLSContexts as TLSContexts
from dbservice.upstream.dial import build_target as build_target
from dbservice.upstream.dial import resolve_alias as resolve_alias
from fleetgate.resp import encode_command

PING = encode_command([b"PING"])
ALIVE_ERRORS = (b"-NOAUTH", b"-WRONGPASS", b"-NOPERM")
"""Error replies that still prove a working server: it wants credentials (or rights) the
probe does not have."""


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
