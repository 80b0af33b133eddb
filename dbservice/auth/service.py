"""The login service (``fleetgate auth run -c FILE``): HTTPS, aiohttp.

API (JSON over HTTPS):

* ``POST /v1/login`` ``{"user", "password", "totp"?, "csr", "ttl"?}`` -> 200
  ``{"certificate", "ca", "user", "roles", "db_users", "expires", "ttl"}``. The CSR is made
  on the client (its key never leaves the client) and must be for an EC P-256 key. The
  certificate lives ``min(ttl, shortest max_session_ttl of the user's roles)``.
  401 ``{"error"}`` for a wrong user or password (one message for both), 401 with
  ``"need": "totp"`` when a second factor is required, 429 with ``Retry-After`` when
  rate-limited, 400 ``{"error"}`` naming what is wrong for a malformed request (413 for
  a body over :data:`MAX_BODY`), 503 when NATS (users, roles, the record of used
  one-time codes, the failed logins) cannot be reached.
* ``GET /v1/login/aws`` -> ``{"server_id", "max_age"}`` and ``POST /v1/login/aws``
  ``{"proof", "csr", "ttl"?, "role"?}`` -> the same answer as a login (plus
  ``"principal"``): programs log in with a signed ``sts:GetCallerIdentity`` request
  (:mod:`dbservice.access.awsid`) mapped by the AWS rules to an identity; 404 when
  ``aws`` is not configured, 401 with the reason when refused, 503 when STS or NATS
  cannot be asked.
* Any request that needs NATS answers 503 ``{"error"}`` (with ``Retry-After``) when NATS
  cannot be reached: the catalog at once while the connection is down.
* ``GET /v1/ca`` -> ``{"pem", "fingerprint"}``: the fleet CA (clients pin it).
* ``GET /v1/databases`` and ``GET /v1/databases/{name}/servers``: what the caller may
  reach and the agents serving it (:mod:`dbservice.auth.catalog`); these need the fleet
  certificate from login as the TLS client certificate. The TLS layer asks every client
  for an optional certificate verified against the fleet CA; login works without one.
* ``POST /v1/join`` and ``POST /v1/renew``: agents join with a one-time token and renew
  their certificates (:mod:`dbservice.auth.join`).
* ``GET /healthz`` -> ``ok``.

Failed logins are counted per user and per source address in a sliding window; past the
limit the service answers 429 without checking the password. An attempt is counted
*before* its password is checked (reserved), so attempts sent all at once cannot get
more checks than the limit; a successful login clears the user's count and gives back
its own place in the address's. Every attempt, whatever its answer (400 included), is
audited (``auth.login``). The per-user count is shared by every instance through NATS
(:mod:`bus.login_failures`): without NATS no password is checked (503). The per-address
count stays in each instance's memory (addresses behind a load balancer or NAT are
shared, and a shared count would be a NATS write per request from any source).

A request body is JSON of at most :data:`MAX_BODY` bytes, parsed and checked by pydantic
(nesting depth bounded, NaN and infinities refused, the CSR checked) before anything
else: a malformed one gets 400 with what was wrong, never 500.

A one-time code works once across every instance of the service (RFC 6238, 5.2): the last
accepted step per user is claimed with compare-and-set in NATS (:mod:`bus.totp`); when
NATS does not answer, the login is refused (503), never let through unchecked.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
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

from aiohttp import web
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey as EcPublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bus import Bus, joins, login_failures
from bus.access import Identity, get_roles, get_user, list_aws_rules, provision_access
from bus.audit import Login, ensure_audit_stream
from bus.aws_logins import claim_signature, provision_aws_logins
from bus.callout import serve_callout
from bus.client import FAILURES, when_jetstream_answers
from bus.joins import JoinedAgent
from bus.settings import START_WAIT, NatsConnection, NatsSettings
from bus.totp import claim_step, provision_totp
from dbservice.access.audit import AuditEmitter
from dbservice.access.awsid import (
    DEFAULT_MAX_AGE,
    LONGEST_MAX_AGE,
    AwsIdentity,
    IdentityRefused,
    StsUnavailable,
    verify_identity_request,
)
from dbservice.access.ca import (
    CertificateAuthority,
    CertificateRejected,
    cert_pem,
    csr_public_key,
    key_pem,
    new_key,
    write_private,
)
from dbservice.access.rbac import session_ttl_cap
from dbservice.auth.admin import AdminError, choose_aws_rule
from dbservice.auth.agentrights import AgentRights
from dbservice.auth.catalog import Catalog
from dbservice.auth.join import AwsJoin, Joins, NatsCredentials, no_nats_credentials
from dbservice.auth.listener import ConnectionLimits, GuardedListener, RefusalLog
from dbservice.auth.metrics import AuthMetrics
from dbservice.auth.natsrights import DEFAULT_TTL, AgentAuthorizer, CalloutError, decode_request
from dbservice.auth.passwords import totp_step, verify_password
from dbservice.auth.requestid import request_ids
from fleetgate.addresses import HostPort
from fleetgate.aio import stop_on_signals
from fleetgate.config import JetStreamSettings
from fleetgate.durations import Duration, format_duration
from fleetgate.metrics import Check, DiagServer
from fleetgate.supervise import RootTasks

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


class ConnectionSettings(Strict):
    """Bounds on connections, before and while a request is read
    (:mod:`dbservice.auth.listener`)."""

    per_address: int = Field(100, ge=1)
    """Connections open at once from one source address (TLS handshakes included);
    more are closed at once."""
    max_connections: int = Field(4096, ge=1)
    """Connections open at once in all; keep it under the process's file limit."""
    handshake_timeout: Duration = Field(10.0, gt=0)
    header_timeout: Duration = Field(15.0, gt=0)
    """Time for a request's head after the handshake or the previous answer (and how
    long an idle connection stays open)."""
    body_timeout: Duration = Field(15.0, gt=0)
    """Time for a request's body, once its head arrived; then 408."""
    log_interval: Duration = Field(60.0, gt=0)
    """Refusals are logged at most once per interval, as one summary line."""

    def limits(self) -> ConnectionLimits:
        return ConnectionLimits(**self.model_dump())


class AwsLoginSettings(Strict):
    """``fleetgate login --aws``: programs prove their AWS identity with a signed
    ``sts:GetCallerIdentity`` request (:mod:`dbservice.access.awsid`)."""

    server_id: str = Field(min_length=1, max_length=256, pattern=r"^[!-~]+$")
    """This service's name in the signed requests (header ``X-Fleetgate-Server-Id``): a
    request signed for another service is refused. Give every instance behind one name
    the same id, e.g. its host name."""
    sts_endpoints: list[str] = Field(default_factory=list)
    """Endpoints accepted besides AWS's own ``https://sts[.REGION].amazonaws.com``
    (e.g. a VPC endpoint's URL, or a test server): scheme, host and port must match."""
    max_age: Duration = Field(DEFAULT_MAX_AGE, gt=0, le=LONGEST_MAX_AGE)
    """How far a signed request's date may be from this service's clock (at most 15m,
    STS's own limit)."""


class AuditSettings(Strict):
    max_age: Duration = 90 * 86400.0
    """How long the audit stream keeps events."""
    queue_size: int = Field(10_000, ge=1)


class JoinSettings(Strict):
    """Agents that join (``POST /v1/join``) and renew (``POST /v1/renew``)."""

    cert_ttl: Duration = Field(86400.0, ge=1, le=30 * 86400.0)
    """How long an agent's certificate lives; agents renew at two thirds of it."""


class NatsCalloutSettings(Strict):
    """``nats_callout``: answer nats-server's auth callout for agents' connections, each
    with its own rights on the bus (docs/ARCHITECTURE.md, "Each agent's rights")."""

    issuer_seed_file: str
    """The account NKey seed (``SA...``) whose public key nats-server's
    ``auth_callout { issuer }`` names; agents' passwords derive from it too."""
    ttl: Duration = DEFAULT_TTL
    """How long an agent's connection is admitted before it is asked again."""

    def authorizer(self, rights: AgentRights | None = None) -> AgentAuthorizer:
        """The callout's authorizer; with ``rights``, agents removed (or whose join token
        was) are refused and labelled agents write only their databases' leases."""
        path = Path(self.issuer_seed_file)
        try:
            seed = path.read_bytes().strip()
        except OSError as exc:
            raise AdminError(
                f"nats_callout.issuer_seed_file {path}: cannot read it ({exc.strerror or exc})"
            ) from None
        try:
            if rights is None:
                return AgentAuthorizer(seed, ttl=self.ttl)
            return AgentAuthorizer(seed, ttl=self.ttl, revoked=rights.revoked, leases=rights.leases)
        except CalloutError as exc:
            raise AdminError(f"nats_callout.issuer_seed_file {path}: {exc}") from None


def joined_nats_login(authorizer: AgentAuthorizer) -> NatsCredentials:
    """The join/renew answer's ``nats``: the agent's own NATS login (user agent-<host_id>)."""

    async def credentials(agent: JoinedAgent) -> dict[str, Any]:
        login = authorizer.credentials(agent.host_id)
        return {"user": login.user, "password": login.password}

    return credentials


class AuthConfig(Strict):
    """``fleetgate auth run -c FILE``."""

    listen: str = "127.0.0.1:3025"
    ca_dir: str
    """The directory ``fleetgate auth init --dir`` wrote (ca.key, ca.crt)."""
    host_id: str = Field(default_factory=socket.gethostname)
    nats: NatsSettings = NatsSettings()
    jetstream: JetStreamSettings | None = None
    """Replicas and placement of the buckets and audit stream the service creates."""
    tls: TLSSettings = TLSSettings()
    rate_limit: RateLimitSettings = RateLimitSettings()
    connections: ConnectionSettings = ConnectionSettings()
    audit: AuditSettings = AuditSettings()
    aws: AwsLoginSettings | None = None
    """Logins with an AWS identity; absent: ``POST /v1/login/aws`` answers 404."""
    join: JoinSettings = JoinSettings()
    nats_callout: NatsCalloutSettings | None = None
    diag_addr: HostPort | None = None
    """``host:port`` of the diagnostics listener (plain HTTP: ``/metrics``, ``/healthz``,
    ``/readyz``; docs/operations.md); off when unset."""


MAX_BODY = 64 * 1024
"""The largest request body the service reads."""


class LoginRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    user: str = Field(min_length=1, max_length=128)
    password: str = Field(max_length=1024)
    totp: str | None = Field(None, pattern=r"^\s*[0-9]{6}\s*$")
    """Six ASCII digits (spaces around them are dropped)."""
    csr: str = Field(max_length=16384)
    ttl: Duration | None = Field(None, ge=0)
    """Seconds or a duration (``"2h"``); finite; 0 or absent: the roles' cap."""


class AwsLoginRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    proof: dict[str, Any]
    """The signed request: ``{method, url, headers, body}`` (body in base64)."""
    csr: str = Field(max_length=16384)
    ttl: Duration | None = Field(None, ge=0)
    role: str | None = Field(None, min_length=1, max_length=128)
    """Ask for this one role of the matching rule only."""


R = TypeVar("R", bound=BaseModel)


class _Who(BaseModel):
    """The user name of a request that is otherwise malformed (for its audit event)."""

    model_config = ConfigDict(extra="ignore")

    user: str = Field("", max_length=128)


class BadRequest(Exception):
    """A malformed login request (400, or ``status``); ``str()`` says what is wrong."""

    def __init__(self, message: str, user: str = "", status: int = 400) -> None:
        super().__init__(message)
        self.user = user
        self.status = status


class ClientGone(Exception):
    """The client closed or reset the connection before its request body arrived."""


def describe_invalid(exc: ValidationError) -> str:
    """The first problem of a request body in one line, e.g. ``ttl: Input should be a
    finite number``."""
    error = exc.errors(include_url=False, include_input=False)[0]
    if error["type"] == "json_invalid":
        return f"the body is not valid JSON ({error['msg'].removeprefix('Invalid JSON: ')})"
    where = ".".join(str(part) for part in error["loc"]) or "the body"
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "string_pattern_mismatch" and where == "totp":
        message = "a one-time code is six digits"
    return f"{where}: {message}"


def user_of(raw: bytes) -> str:
    """The ``user`` of a JSON body when it has a readable one, else ``""``."""
    try:
        return _Who.model_validate_json(raw).user
    except ValidationError:
        return ""


RELEASE_TIMEOUT = 5.0
"""How long a login waits to give back a reserved attempt before leaving it to expire."""


@dataclass
class Attempt:
    """One login attempt's reservations: in the address's count (at ``now``, monotonic)
    and in the user's shared record."""

    address: str
    now: float
    address_counted: bool = False
    user_counted: login_failures.Reserved | None = None


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

    def reserve(self, key: str, now: float) -> float | None:
        """Count an attempt at ``now`` unless ``key`` is at its limit: None when counted
        (it may go ahead; :meth:`release` gives the place back), else the seconds until
        it may. Check and count happen at once: concurrent attempts each see the others."""
        wait = self.retry_after(key, now)
        if wait is None:
            self.failure(key, now)
        return wait

    def release(self, key: str, at: float) -> None:
        """Remove the attempt counted at ``at`` (one that turned out not to fail)."""
        times = self._failures.get(key)
        if times is None:
            return
        with contextlib.suppress(ValueError):
            times.remove(at)
        if not times:
            del self._failures[key]


class LoginService:
    """The HTTP handlers; collaborators passed in so tests run the real thing."""

    def __init__(
        self,
        *,
        config: AuthConfig,
        bus: Bus,
        ca: CertificateAuthority,
        audit: AuditEmitter,
        refusals: RefusalLog | None = None,
        nats_credentials_for: NatsCredentials = no_nats_credentials,
        metrics: AuthMetrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else AuthMetrics()
        self.bus = bus
        self.ca = ca
        self.audit = audit
        self.refusals = refusals or RefusalLog(config.connections.log_interval)
        limits = config.rate_limit
        self.by_address = RateLimiter(limits.per_address, limits.window)
        # Each argon2 verification takes 64 MiB and a CPU for ~50 ms: bound them.
        self.verifications = asyncio.Semaphore(4)
        self.joins = Joins(
            bus=bus,
            ca=ca,
            audit=audit,
            limiter=RateLimiter(limits.per_address, limits.window),
            cert_ttl=config.join.cert_ttl,
            body_timeout=config.connections.body_timeout,
            nats_credentials_for=nats_credentials_for,
            reserved_names=[h for h in config.tls.hosts if not _is_ip(h)],
            aws=(
                AwsJoin(
                    server_id=config.aws.server_id,
                    endpoints=tuple(config.aws.sts_endpoints),
                    max_age=config.aws.max_age,
                )
                if config.aws is not None
                else None
            ),
        )

    def app(self) -> web.Application:
        app = web.Application(
            client_max_size=MAX_BODY, middlewares=[request_ids, self.metrics.middleware()]
        )
        app.router.add_post("/v1/login", self.login)
        app.router.add_get("/v1/login/aws", self.aws_parameters)
        app.router.add_post("/v1/login/aws", self.login_aws)
        app.router.add_get("/v1/ca", self.get_ca)
        app.router.add_get("/healthz", self.health)
        Catalog(bus=self.bus, trusted=[self.ca.cert]).add_routes(app)
        self.joins.add_routes(app)
        app.middlewares.append(registry_unavailable(self.bus))
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def get_ca(self, request: web.Request) -> web.Response:
        return web.json_response({"pem": self.ca.pem, "fingerprint": self.ca.fingerprint})

    def _refuse(
        self,
        request: web.Request,
        user: str,
        reason: str,
        status: int,
        message: str,
        log: bool = True,
        **extra: Any,
    ) -> web.Response:
        self.audit.emit(
            Login(user=user, client_addr=request.remote or "", success=False, reason=reason)
        )
        if log:
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
        except FAILURES as exc:
            raise RegistryUnavailable(what, exc) from exc

    async def _read_body(self, request: web.Request) -> tuple[LoginRequest, EcPublicKey]:
        """The login request and its CSR's public key; :class:`BadRequest` saying what is
        wrong otherwise (nothing is counted or checked for a malformed request)."""
        return await self._read(request, LoginRequest)

    async def _read(self, request: web.Request, model: type[R]) -> tuple[R, EcPublicKey]:
        timeout = self.config.connections.body_timeout
        try:
            async with asyncio.timeout(timeout):
                raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BadRequest(f"the body is larger than {MAX_BODY} bytes", status=413) from None
        except TimeoutError:
            raise BadRequest(
                f"the body did not arrive within {format_duration(timeout)}", status=408
            ) from None
        except ConnectionError:
            raise ClientGone from None
        try:
            body = model.model_validate_json(raw)
        except ValidationError as exc:
            raise BadRequest(describe_invalid(exc), user_of(raw)) from None
        try:
            public_key, _ = csr_public_key(getattr(body, "csr", ""))
        except CertificateRejected as exc:
            raise BadRequest(f"csr: {exc}", getattr(body, "user", "")) from None
        return body, public_key

    async def login(self, request: web.Request) -> web.Response:
        try:
            body, public_key = await self._read_body(request)
        except ClientGone:  # no request to answer: one of many resets, maybe
            self.refusals.note("connection lost before the body arrived", request.remote or "?")
            return web.Response(status=400)
        except BadRequest as exc:
            if exc.status == 408:  # a slow client, maybe one of many: logged as a summary
                self.refusals.note("request body too slow", request.remote or "unknown")
            return self._refuse(
                request, exc.user, f"malformed request: {exc}", exc.status, str(exc),
                log=exc.status != 408,
            )  # fmt: skip
        attempt = Attempt(address=request.remote or "unknown", now=time.monotonic())
        try:
            return await self._login(request, body, public_key, attempt)
        except RegistryUnavailable as exc:
            logger.warning("login for %r not checked: %s", body.user, exc)
            await self._release(body.user, attempt)
            return self._refuse(
                request, body.user, f"{exc.what} not checked: NATS unavailable", 503,
                UNAVAILABLE.format(what=exc.what), retry_after=1,
            )  # fmt: skip

    async def _release(self, user: str, attempt: Attempt, *, clear: bool = False) -> None:
        """Give back what ``attempt`` reserved (it did not fail), or with ``clear`` also
        the user's failures it saw (a successful login). Best effort: what stays expires
        with the window."""
        if attempt.address_counted:
            self.by_address.release(attempt.address, attempt.now)
            attempt.address_counted = False
        reserved, attempt.user_counted = attempt.user_counted, None
        if reserved is None:
            return
        times = (*reserved.earlier, reserved.at) if clear else (reserved.at,)
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT):
                if not await login_failures.release(self.bus, user, times):
                    logger.warning("failed logins of %r not cleared: others kept writing", user)
        except FAILURES as exc:
            logger.warning("failed logins of %r not cleared: %s", user, exc)

    async def _login(
        self,
        request: web.Request,
        body: LoginRequest,
        public_key: EcPublicKey,
        attempt: Attempt,
    ) -> web.Response:
        address = attempt.address
        limits = self.config.rate_limit
        # Reserve the attempt before its password is checked, so any number sent at once
        # get at most the limit of checks. The address first (in memory): a refused flood
        # costs NATS nothing.
        wait = self.by_address.reserve(address, attempt.now)
        if wait is None:
            attempt.address_counted = True
            reserved = await self._ask(
                "failed-login limit",
                login_failures.reserve(
                    self.bus, body.user, limit=limits.per_user, window=limits.window,
                    now=time.time(),
                ),
            )  # fmt: skip
            if isinstance(reserved, login_failures.Full):
                await self._release(body.user, attempt)
                wait = reserved.retry_after
            else:
                attempt.user_counted = reserved
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
        # From here a refusal keeps the reserved attempt as the failure it is.
        if not ok or user is None:
            reason = "unknown user" if user is None else "wrong password"
            return self._refuse(request, body.user, reason, 401, BAD_CREDENTIALS)
        method = "password"
        if user.totp_secret:
            if not body.totp:
                await self._release(body.user, attempt)  # the right password: no failure
                return self._refuse(
                    request, user.name, "one-time code missing", 401,
                    "a one-time code is required", need="totp",
                )  # fmt: skip
            step = totp_step(user.totp_secret, body.totp)
            if step is None:
                return self._refuse(
                    request, user.name, "wrong one-time code", 401, "invalid one-time code"
                )
            if not await self._ask("one-time code", claim_step(self.bus, user.name, step)):
                return self._refuse(
                    request, user.name, "one-time code used again", 401,
                    "this one-time code was already used: wait for the next one",
                )  # fmt: skip
            method = "password+totp"
        roles = await self._ask("roles", get_roles(self.bus, user.roles))
        missing = sorted(set(user.roles) - {r.name for r in roles})
        if missing:
            logger.warning("user %s names unknown roles: %s", user.name, ", ".join(missing))
        cap = session_ttl_cap(roles)
        ttl = min(body.ttl, cap) if body.ttl else cap
        identity = Identity(user=user.name, roles=user.roles, db_users=user.db_users)
        cert = self.ca.issue_client(public_key, identity, ttl)
        await self._release(body.user, attempt, clear=True)
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

    # -- programs: an AWS identity ---------------------------------------------------------

    async def aws_parameters(self, request: web.Request) -> web.Response:
        """What a client signs for: this service's id (``X-Fleetgate-Server-Id``)."""
        settings = self.config.aws
        if settings is None:
            return web.json_response({"error": AWS_DISABLED}, status=404)
        return web.json_response({"server_id": settings.server_id, "max_age": settings.max_age})

    def _refuse_aws(
        self,
        request: web.Request,
        reason: str,
        status: int,
        message: str,
        *,
        user: str = "",
        principal: str = "",
        retry_after: float | None = None,
    ) -> web.Response:
        self.audit.emit(
            Login(
                user=user,
                client_addr=request.remote or "",
                success=False,
                reason=reason,
                method="aws",
                principal=principal,
            )
        )
        logger.info(
            "AWS login refused for %s from %s: %s", principal or "?", request.remote, reason
        )
        headers = {}
        if retry_after is not None:
            headers["Retry-After"] = str(int(retry_after) + 1)
        return web.json_response({"error": message}, status=status, headers=headers)

    async def login_aws(self, request: web.Request) -> web.Response:
        """``POST /v1/login/aws`` ``{"proof", "csr", "ttl"?, "role"?}``: a certificate for
        the fleetgate identity of the AWS rule the signer's identity matches."""
        settings = self.config.aws
        if settings is None:
            return self._refuse_aws(request, "AWS logins not enabled", 404, AWS_DISABLED)
        try:
            body, public_key = await self._read(request, AwsLoginRequest)
        except ClientGone:
            self.refusals.note("connection lost before the body arrived", request.remote or "?")
            return web.Response(status=400)
        except BadRequest as exc:
            if exc.status == 408:
                self.refusals.note("request body too slow", request.remote or "unknown")
            return self._refuse_aws(request, f"malformed request: {exc}", exc.status, str(exc))
        address = request.remote or "unknown"
        now = time.monotonic()
        wait = self.by_address.reserve(address, now)
        if wait is not None:
            return self._refuse_aws(
                request, "rate limited", 429,
                f"too many failed logins; try again in {int(wait) + 1}s", retry_after=wait,
            )  # fmt: skip

        async def claim(signature: str, signed_at: datetime) -> bool:
            used = claim_signature(self.bus, signature, signed_at)
            return await self._ask("used AWS signatures", used)

        who: AwsIdentity | None = None
        try:
            who = await verify_identity_request(
                body.proof,
                settings.server_id,
                claim=claim,
                endpoints=settings.sts_endpoints,
                max_age=settings.max_age,
            )
            rules = await self._ask("AWS rules", list_aws_rules(self.bus))
            choice = choose_aws_rule(rules, who, body.role)
            if isinstance(choice, str):
                raise IdentityRefused(choice)
            roles = await self._ask("roles", get_roles(self.bus, choice.roles))
        except IdentityRefused as exc:  # a failure: the address's attempt stays counted
            arn = who.arn if who is not None else ""
            return self._refuse_aws(
                request, str(exc), 401, f"AWS identity refused: {exc}", principal=arn
            )
        except StsUnavailable as exc:
            self.by_address.release(address, now)
            logger.warning("AWS login not checked: %s", exc)
            return self._refuse_aws(
                request, f"not checked: {exc}", 503,
                f"the login service cannot ask AWS STS right now ({exc}): try again in a moment",
                retry_after=5,
            )  # fmt: skip
        except RegistryUnavailable as exc:
            self.by_address.release(address, now)
            logger.warning("AWS login not checked: %s", exc)
            return self._refuse_aws(
                request, f"{exc.what} not checked: NATS unavailable", 503,
                UNAVAILABLE.format(what=exc.what), retry_after=1,
            )  # fmt: skip
        rule = choice.rule
        missing = sorted(set(choice.roles) - {r.name for r in roles})
        if missing:
            logger.warning("AWS rule %s names unknown roles: %s", rule.name, ", ".join(missing))
        cap = session_ttl_cap(roles)
        if rule.ttl:
            cap = min(cap, rule.ttl)
        ttl = min(body.ttl, cap) if body.ttl else cap
        identity = Identity(
            user=rule.name, roles=choice.roles, db_users=rule.db_users, kind="bot",
            aws_arn=who.arn,
        )  # fmt: skip
        cert = self.ca.issue_client(public_key, identity, ttl)
        self.by_address.release(address, now)
        expires = cert.not_valid_after_utc
        self.audit.emit(
            Login(
                user=rule.name, roles=choice.roles, client_addr=address, method="aws",
                expires=expires, principal=who.arn,
            )
        )  # fmt: skip
        logger.info(
            "AWS login: %s as %s from %s, certificate until %s", who.arn, rule.name, address,
            expires,
        )  # fmt: skip
        return web.json_response(
            {
                "certificate": cert_pem(cert),
                "ca": self.ca.pem,
                "user": rule.name,
                "roles": list(choice.roles),
                "db_users": list(rule.db_users),
                "principal": who.arn,
                "expires": expires.isoformat(),
                "ttl": ttl,
            }
        )


AWS_DISABLED = (
    "this auth service does not accept AWS identities (operators: set aws.server_id in its config)"
)

REGISTRY_DOWN = (
    "the auth service cannot reach the registry (NATS) right now ({why}); "
    "operators: check the auth service's NATS connection"
)
NEEDS_REGISTRY = ("/v1/databases", "/v1/join", "/v1/renew")
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
        except FAILURES as exc:
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


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def callout_answer(authorizer: AgentAuthorizer, rights: AgentRights | None = None) -> Any:
    """The responder of :func:`bus.callout.serve_callout`: a refusal is logged once per
    connection attempt (nats-server logs it too), a malformed request answered never.
    With ``rights`` (those ``authorizer`` was made with), the agent's record is read
    first (:meth:`AgentRights.prepare`)."""

    def answer(request: bytes) -> bytes | None:
        try:
            response, host_id, reason = authorizer.answer(request)
        except CalloutError as exc:
            logger.warning("NATS auth callout: ignored a request: %s", exc)
            return None
        if reason:
            logger.warning("NATS auth callout: refused a connection: %s", reason)
        else:
            logger.debug("NATS auth callout: admitted agent %s", host_id)
        return response

    if rights is None:
        return answer

    async def checked(request: bytes) -> bytes | None:
        try:
            user = str((decode_request(request)["nats"].get("connect_opts") or {}).get("user", ""))
        except CalloutError as exc:
            logger.warning("NATS auth callout: ignored a request: %s", exc)
            return None
        await rights.prepare(user)
        try:  # no await from prepare to here: the decision is this request's
            return answer(request)
        finally:
            rights.forget(user)

    return checked


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
    listener: GuardedListener

    async def close(self) -> None:
        await self.listener.close()
        await self.runner.cleanup()


async def start_service(
    config: AuthConfig,
    *,
    bus: Bus,
    ca: CertificateAuthority,
    audit: AuditEmitter,
    nats_credentials_for: NatsCredentials = no_nats_credentials,
    metrics: AuthMetrics | None = None,
) -> RunningService:
    """Serve the login API on ``config.listen`` (port 0: an ephemeral port)."""
    host, port = split_listen(config.listen)
    limits = config.connections
    refusals = RefusalLog(limits.log_interval)
    service = LoginService(
        config=config,
        bus=bus,
        ca=ca,
        audit=audit,
        refusals=refusals,
        nats_credentials_for=nats_credentials_for,
        metrics=metrics,
    )
    # keepalive_timeout bounds the wait for a request head (from the handshake or the
    # previous answer); an unread body is not drained (lingering_time 0): closed.
    runner = web.AppRunner(
        service.app(), access_log=None, keepalive_timeout=limits.header_timeout,
        lingering_time=0,
    )  # fmt: skip
    await runner.setup()
    assert runner.server is not None
    listener = GuardedListener(runner.server, server_tls(config, ca), limits.limits(), refusals)
    try:
        bound = await listener.start(host, port)
    except OSError as exc:
        await listener.close()
        await runner.cleanup()
        raise AdminError(
            f"listen {config.listen}: cannot listen there ({exc.strerror or exc}): "
            "stop what uses the port, or choose another listen address"
        ) from None
    return RunningService(runner, service, bound, listener)


async def run_auth(config: AuthConfig, *, nats_url: str | NatsConnection) -> int:
    ca = CertificateAuthority.load(Path(config.ca_dir))
    metrics = AuthMetrics()
    state: dict[str, Any] = {}

    def readiness() -> list[Check]:
        bus, running = state.get("bus"), state.get("running")
        connected = bus is not None and bus.connected
        return [
            Check("nats", connected, "" if connected else "not connected to NATS"),
            Check(
                "listener",
                running is not None,
                f"https on {config.listen}" if running is not None else "not listening yet",
            ),
        ]

    diag = None
    if config.diag_addr is not None:
        diag = DiagServer(config.diag_addr, metrics.registry, readiness, process="auth service")
        try:
            await diag.start()
        except OSError as exc:
            raise AdminError(
                f"diag_addr {config.diag_addr}: cannot listen there ({exc.strerror or exc})"
            ) from None
        logger.info("diagnostics on http://%s/ (metrics, healthz, readyz)", config.diag_addr)
    try:
        return await _run_auth(config, ca, nats_url=nats_url, metrics=metrics, state=state)
    finally:
        if diag is not None:
            await diag.aclose()


async def _run_auth(
    config: AuthConfig,
    ca: CertificateAuthority,
    *,
    nats_url: str | NatsConnection,
    metrics: AuthMetrics,
    state: dict[str, Any],
) -> int:
    async with await Bus.connect(nats_url, name="fleetgate-auth") as bus:
        state["bus"] = bus
        if config.jetstream is not None:
            bus.replication = config.jetstream.replication()

        async def provision() -> None:
            await provision_access(bus)
            await provision_totp(bus)
            await login_failures.provision_login_failures(bus)
            if config.aws is not None:
                await provision_aws_logins(bus)
            await bus.provision(joins.TOKENS, joins.AGENTS)
            await ensure_audit_stream(bus, max_age=config.audit.max_age)

        await when_jetstream_answers(
            provision, wait=START_WAIT, what="setting up the auth service's buckets"
        )
        emitter = AuditEmitter.for_bus(bus, host_id=config.host_id, maxsize=config.audit.queue_size)
        credentials: NatsCredentials = no_nats_credentials
        if config.nats_callout is not None:
            rights = AgentRights(bus)
            authorizer = config.nats_callout.authorizer(rights)
            await serve_callout(bus, callout_answer(authorizer, rights))
            credentials = joined_nats_login(authorizer)
        async with emitter:
            running = await start_service(
                config, bus=bus, ca=ca, audit=emitter, nats_credentials_for=credentials,
                metrics=metrics,
            )  # fmt: skip
            state["running"] = running
            logger.info(
                "auth service on https://%s:%d (CA %s) since %s",
                split_listen(config.listen)[0],
                running.port,
                ca.fingerprint,
                datetime.now(UTC).isoformat(timespec="seconds"),
            )
            stop = asyncio.Event()
            stop_on_signals(stop)
            roots = RootTasks(stop, expected=(OSError,))
            try:
                async with roots:
                    roots.start("client-listener", running.listener.serve())
            finally:
                await running.close()
    if roots.failed:
        logger.error("auth service stopped: %s failed", ", ".join(roots.failed))
        return 1
    return 0
