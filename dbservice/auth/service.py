"""The login service (``fleetgate auth run -c FILE``): HTTPS, aiohttp.

API (JSON over HTTPS):

* ``POST /v1/login`` ``{"user", "password", "totp"?, "csr", "ttl"?}`` -> 200
  ``{"certificate", "ca", "user", "roles", "db_users", "expires", "ttl"}``. The CSR is made
  on the client (its key never leaves the client) and must be for an EC P-256 key. The
  certificate lives ``min(ttl, shortest max_session_ttl of the user's roles)``.
  401 ``{"error"}`` for a wrong user or password (one message for both), 401 with
  ``"need": "totp"`` when a second factor is required, 429 with ``Retry-After`` when
  rate-limited, 400 for a malformed request, 503 when NATS (users, roles, the record of
  used one-time codes, the failed logins) cannot be reached.
* Any request that needs NATS answers 503 ``{"error"}`` (with ``Retry-After``) when NATS
  cannot be reached: the catalog at once while the connection is down.
* ``GET /v1/ca`` -> ``{"pem", "fingerprint"}``: the fleet CA (clients pin it).
* ``GET /v1/databases`` and ``GET /v1/databases/{name}/servers``: what the caller may
  reach and the agents serving it (:mod:`dbservice.auth.catalog`); these need the fleet
  certificate from login as the TLS client certificate. The TLS layer asks every client
  for an optional certificate verified against the fleet CA; login works without one.
* ``GET /healthz`` -> ``ok``.

Failed logins are counted per user and per source address in a sliding window; past the
limit the service answers 429 without checking the password. Every attempt is audited
(``auth.login``). The per-user count is shared by every instance through NATS
(:mod:`bus.login_failures`): without NATS no password is checked (503). The per-address
count stays in each instance's memory (addresses behind a load balancer or NAT are
shared, and a shared count would be a NATS write per request from any source).

A one-time code works once across every instance of the service (RFC 6238, 5.2): the last
accepted step per user is claimed with compare-and-set in NATS (:mod:`bus.totp`); when
NATS does not answer, the login is refused (503), never let through unchecked.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import nats.errors
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bus import Bus, login_failures
from bus.access import Identity, get_roles, get_user, provision_access
from bus.audit import Login, ensure_audit_stream
from bus.errors import BusError
from bus.leases import Versioned
from bus.totp import claim_step, provision_totp
from dbservice.audit import AuditEmitter
from dbservice.auth.admin import AdminError
from dbservice.auth.ca import (
    CertificateAuthority,
    CertificateRejected,
    cert_pem,
    csr_public_key,
    key_pem,
    new_key,
    write_private,
)
from dbservice.auth.catalog import Catalog
from dbservice.auth.passwords import totp_step, verify_password
from dbservice.rbac import session_ttl_cap
from fleetgate.aio import stop_on_signals
from fleetgate.durations import Duration, format_duration, parse_duration

logger = logging.getLogger(__name__)

BAD_CREDENTIALS = "invalid user name or password"
UNAVAILABLE = (
    "the login service cannot reach NATS to check the {what} right now, so it accepts "
    "nothing: try again in a moment (operators: check the auth service's NATS connection)"
)

T = TypeVar("T")


class RegistryUnavailable(Exception):
    """NATS did not answer a check the login needs; ``what`` names what was checked
    (``user``, ``one-time code``, ``roles``, ``failed-login limit``)."""

    def __init__(self, what: str, cause: Exception) -> None:
        super().__init__(f"{what}: {cause}")
        self.what = what


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NatsSettings(Strict):
    url: str | None = None


class RateLimitSettings(Strict):
    per_user: int = Field(5, ge=1, le=1000)
    """Failed logins for one user name within ``window`` before it is refused, counted
    across every instance of the service."""
    per_address: int = Field(20, ge=1)
    """Failed logins from one source address within ``window`` before it is refused
    (counted by each instance)."""
    window: Duration = 300.0
    """At most a day: the shared per-user records are kept that long."""

    @field_validator("window")
    @classmethod
    def _window_fits_the_records(cls, window: float) -> float:
        if window > login_failures.KEEP:
            raise ValueError(
                f"{format_duration(window)} is longer than the "
                f"{format_duration(login_failures.KEEP)} failed logins are kept: "
                f"use a window of {format_duration(login_failures.KEEP)} or less"
            )
        return window


class TLSSettings(Strict):
    cert_file: str | None = None
    """A server certificate (e.g. from your corporate CA); with ``key_file``."""
    key_file: str | None = None
    hosts: list[str] = Field(default_factory=lambda: ["localhost", "127.0.0.1"])
    """Names and addresses clients use, when the service issues its own certificate
    from the fleet CA (no ``cert_file``)."""
    server_ttl: Duration = 30 * 86400.0


class AuditSettings(Strict):
    max_age: Duration = 90 * 86400.0
    """How long the audit stream keeps events."""
    queue_size: int = Field(10_000, ge=1)


class AuthConfig(Strict):
    """``fleetgate auth run -c FILE``."""

    listen: str = "127.0.0.1:3025"
    ca_dir: str
    """The directory ``fleetgate auth init --dir`` wrote (ca.key, ca.crt)."""
    host_id: str = Field(default_factory=socket.gethostname)
    nats: NatsSettings = NatsSettings()
    tls: TLSSettings = TLSSettings()
    rate_limit: RateLimitSettings = RateLimitSettings()
    audit: AuditSettings = AuditSettings()


class LoginRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    user: str = Field(min_length=1, max_length=128)
    password: str = Field(max_length=1024)
    totp: str | None = Field(None, max_length=16)
    csr: str = Field(max_length=16384)
    ttl: float | str | None = None


class RateLimiter:
    """Failures per key in a sliding window; bounded in the number of keys it keeps."""

    def __init__(self, limit: int, window: float, *, max_keys: int = 100_000) -> None:
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def _recent(self, key: str, now: float) -> deque[float]:
        times = self._failures.get(key)
        if times is None:
            return deque()
        while times and times[0] <= now - self.window:
            times.popleft()
        if not times:
            del self._failures[key]
        return times

    def retry_after(self, key: str, now: float | None = None) -> float | None:
        """Seconds until ``key`` may try again, or None when it may now."""
        now = time.monotonic() if now is None else now
        times = self._recent(key, now)
        if len(times) < self.limit:
            return None
        return max(0.0, times[-self.limit] + self.window - now)

    def failure(self, key: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        times = self._failures.setdefault(key, deque(maxlen=self.limit))
        times.append(now)
        self._failures.move_to_end(key)
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)


class LoginService:
    """The HTTP handlers; collaborators passed in so tests run the real thing."""

    def __init__(
        self, *, config: AuthConfig, bus: Bus, ca: CertificateAuthority, audit: AuditEmitter
    ) -> None:
        self.config = config
        self.bus = bus
        self.ca = ca
        self.audit = audit
        limits = config.rate_limit
        self.by_address = RateLimiter(limits.per_address, limits.window)
        # Each argon2 verification takes 64 MiB and a CPU for ~50 ms: bound them.
        self.verifications = asyncio.Semaphore(4)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=64 * 1024)
        app.router.add_post("/v1/login", self.login)
        app.router.add_get("/v1/ca", self.get_ca)
        app.router.add_get("/healthz", self.health)
        Catalog(bus=self.bus, trusted=[self.ca.cert]).add_routes(app)
        app.middlewares.append(registry_unavailable(self.bus))
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def get_ca(self, request: web.Request) -> web.Response:
        return web.json_response({"pem": self.ca.pem, "fingerprint": self.ca.fingerprint})

    def _refuse(
        self, request: web.Request, user: str, reason: str, status: int, message: str, **extra: Any
    ) -> web.Response:
        self.audit.emit(
            Login(user=user, client_addr=request.remote or "", success=False, reason=reason)
        )
        logger.info("login refused for %r from %s: %s", user, request.remote, reason)
        headers = {}
        if "retry_after" in extra:
            headers["Retry-After"] = str(int(extra["retry_after"]) + 1)
        return web.json_response({"error": message, **extra}, status=status, headers=headers)

    @staticmethod
    async def _ask(what: str, call: Awaitable[T]) -> T:
        """One NATS call of the login; its failure becomes :class:`RegistryUnavailable`."""
        try:
            return await call
        except (BusError, nats.errors.Error) as exc:
            raise RegistryUnavailable(what, exc) from exc

    async def login(self, request: web.Request) -> web.Response:
        try:
            body = LoginRequest.model_validate(await request.json())
        except (ValueError, ValidationError):
            return web.json_response(
                {"error": "expected JSON with user, password and csr"}, status=400
            )
        try:
            return await self._login(request, body)
        except RegistryUnavailable as exc:
            logger.warning("login for %r not checked: %s", body.user, exc)
            return self._refuse(
                request, body.user, f"{exc.what} not checked: NATS unavailable", 503,
                UNAVAILABLE.format(what=exc.what), retry_after=1,
            )  # fmt: skip

    async def _failed(
        self, request: web.Request, user: str, reason: str, message: str
    ) -> web.Response:
        """A failed login: counted for the source address here and for the user name at
        every instance (NATS), then refused with 401; 503 when it cannot be counted."""
        self.by_address.failure(request.remote or "unknown")
        limits = self.config.rate_limit
        try:
            added = await login_failures.add(
                self.bus, user, limit=limits.per_user, window=limits.window, now=time.time()
            )
        except (BusError, nats.errors.Error) as exc:
            logger.warning("failed login for %r not counted: %s", user, exc)
            return self._refuse(
                request, user, f"{reason}; not counted: NATS unavailable", 503,
                UNAVAILABLE.format(what="failed-login limit"), retry_after=1,
            )  # fmt: skip
        if not added:
            logger.warning("failed login for %r not counted: other instances kept writing", user)
        return self._refuse(request, user, reason, 401, message)

    async def _forget(self, user: str, seen: Versioned[login_failures.Failures]) -> None:
        """After a successful login, clear the user's failures as read before the check
        (a failure added since stands). Best effort: left in place, they expire."""
        try:
            await login_failures.forget(self.bus, user, seen)
        except (BusError, nats.errors.Error) as exc:
            logger.warning("failed logins of %r not cleared after a login: %s", user, exc)

    async def _login(self, request: web.Request, body: LoginRequest) -> web.Response:
        address = request.remote or "unknown"
        limits = self.config.rate_limit
        # The address first (in memory): a refused flood costs NATS nothing.
        wait = self.by_address.retry_after(address)
        seen = None
        if wait is None:
            now = time.time()
            seen = await self._ask(
                "failed-login limit",
                login_failures.recent(self.bus, body.user, window=limits.window, now=now),
            )
            if seen is not None and len(seen.record.times) >= limits.per_user:
                oldest = seen.record.times[-limits.per_user]
                wait = min(limits.window, max(0.0, oldest + limits.window - now))
        if wait is not None:
            return self._refuse(
                request,
                body.user,
                "rate limited",
                429,
                f"too many failed logins; try again in {int(wait) + 1}s",
                retry_after=wait,
            )
        user = await self._ask("user", get_user(self.bus, body.user))
        async with self.verifications:
            ok = await asyncio.to_thread(
                verify_password, user.password_hash if user else None, body.password
            )
        if not ok or user is None:
            reason = "unknown user" if user is None else "wrong password"
            return await self._failed(request, body.user, reason, BAD_CREDENTIALS)
        method = "password"
        if user.totp_secret:
            if not body.totp:
                return self._refuse(
                    request, user.name, "one-time code missing", 401,
                    "a one-time code is required", need="totp",
                )  # fmt: skip
            step = totp_step(user.totp_secret, body.totp)
            if step is None:
                return await self._failed(
                    request, user.name, "wrong one-time code", "invalid one-time code"
                )
            if not await self._ask("one-time code", claim_step(self.bus, user.name, step)):
                return await self._failed(
                    request, user.name, "one-time code used again",
                    "this one-time code was already used: wait for the next one",
                )  # fmt: skip
            method = "password+totp"
        try:
            public_key, _ = csr_public_key(body.csr)
            requested = parse_duration(body.ttl) if body.ttl is not None else None
        except (CertificateRejected, ValueError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        roles = await self._ask("roles", get_roles(self.bus, user.roles))
        missing = sorted(set(user.roles) - {r.name for r in roles})
        if missing:
            logger.warning("user %s names unknown roles: %s", user.name, ", ".join(missing))
        cap = session_ttl_cap(roles)
        ttl = min(requested, cap) if requested else cap
        identity = Identity(user=user.name, roles=user.roles, db_users=user.db_users)
        cert = self.ca.issue_client(public_key, identity, ttl)
        if seen is not None:
            await self._forget(body.user, seen)
        expires = cert.not_valid_after_utc
        self.audit.emit(
            Login(
                user=user.name,
                roles=user.roles,
                client_addr=address,
                method=method,
                expires=expires,
            )
        )
        logger.info("login: %s from %s, certificate until %s", user.name, address, expires)
        return web.json_response(
            {
                "certificate": cert_pem(cert),
                "ca": self.ca.pem,
                "user": user.name,
                "roles": list(user.roles),
                "db_users": list(user.db_users),
                "expires": expires.isoformat(),
                "ttl": ttl,
            }
        )


REGISTRY_DOWN = (
    "the auth service cannot reach the registry (NATS) right now ({why}); "
    "operators: check the auth service's NATS connection"
)
NEEDS_REGISTRY = ("/v1/databases",)
"""Paths answered from NATS alone (login has its own 503s, with its audit)."""


def registry_unavailable(bus: Bus) -> Any:
    """Requests that need NATS get 503 with the reason: at once while the connection is
    down (a request would wait for its timeout), and when a NATS call fails."""

    @web.middleware
    async def middleware(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.path.startswith(NEEDS_REGISTRY) and not bus.nc.is_connected:
            return _unavailable(request, "not connected")
        try:
            response: web.StreamResponse = await handler(request)
        except (BusError, nats.errors.Error) as exc:
            return _unavailable(request, str(exc) or type(exc).__name__)
        return response

    return middleware


def _unavailable(request: web.Request, why: str) -> web.Response:
    logger.warning("%s %s: 503, NATS unavailable: %s", request.method, request.path, why)
    return web.json_response(
        {"error": REGISTRY_DOWN.format(why=why), "retry": "registry"},
        status=503,
        headers={"Retry-After": "5"},
    )


def server_tls(config: AuthConfig, ca: CertificateAuthority) -> ssl.SSLContext:
    """The service's TLS context: the configured certificate, or one issued now by the
    fleet CA for ``tls.hosts`` (written next to the CA, key 0600). Either way it asks for
    an optional client certificate from the fleet CA (people's identities)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.load_verify_locations(cadata=ca.pem)
    if config.tls.cert_file:
        ctx.load_cert_chain(config.tls.cert_file, config.tls.key_file)
        return ctx
    directory = Path(config.ca_dir) / "service"
    directory.mkdir(mode=0o700, exist_ok=True)
    key = new_key()
    cert = ca.issue_server(key.public_key(), config.tls.hosts, config.tls.server_ttl)
    write_private(directory / "key.pem", key_pem(key))
    (directory / "cert.pem").write_text(cert_pem(cert) + ca.pem)
    ctx.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return ctx


def split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"listen {listen!r}: expected HOST:PORT, e.g. 127.0.0.1:3025")
    return host.strip("[]") or "0.0.0.0", int(port)


@dataclass
class RunningService:
    runner: web.AppRunner
    service: LoginService
    port: int

    async def close(self) -> None:
        await self.runner.cleanup()


async def start_service(
    config: AuthConfig, *, bus: Bus, ca: CertificateAuthority, audit: AuditEmitter
) -> RunningService:
    """Serve the login API on ``config.listen`` (port 0: an ephemeral port)."""
    host, port = split_listen(config.listen)
    service = LoginService(config=config, bus=bus, ca=ca, audit=audit)
    runner = web.AppRunner(service.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=server_tls(config, ca))
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise AdminError(
            f"listen {config.listen}: cannot listen there ({exc.strerror or exc}): "
            "stop what uses the port, or choose another listen address"
        ) from None
    bound = runner.addresses[0][1] if runner.addresses else port
    return RunningService(runner, service, int(bound))


async def run_auth(config: AuthConfig, *, nats_url: str) -> int:
    ca = CertificateAuthority.load(Path(config.ca_dir))
    async with await Bus.connect(nats_url, name="fleetgate-auth") as bus:
        await provision_access(bus)
        await provision_totp(bus)
        await login_failures.provision_login_failures(bus)
        await ensure_audit_stream(bus, max_age=config.audit.max_age)
        emitter = AuditEmitter.for_bus(bus, host_id=config.host_id, maxsize=config.audit.queue_size)
        async with emitter:
            running = await start_service(config, bus=bus, ca=ca, audit=emitter)
            logger.info(
                "auth service on https://%s:%d (CA %s) since %s",
                split_listen(config.listen)[0],
                running.port,
                ca.fingerprint,
                datetime.now(UTC).isoformat(timespec="seconds"),
            )
            stop = asyncio.Event()
            stop_on_signals(stop)
            try:
                await stop.wait()
            finally:
                await running.close()
    return 0
