"""Agents join and renew at the auth service (docs/agents-join.md).

* ``POST /v1/join`` ``{"method": "token", "token", "csr", "host_id", "hostname", "addr"}``
  -> 200 ``{"certificate", "ca", "host_id", "expires", "ttl", "nats"}``. The CSR is made
  on the agent (its key never leaves it). The proof of who may join is chosen by
  ``method``; each method is one :data:`Admit` callable in :attr:`Joins.methods`
  (``token`` here: a one-time token of :mod:`bus.joins`, spent by compare-and-set, so of
  two joins racing with one token exactly one gets a certificate). An unknown method is
  refused (400) naming the known ones. The certificate is for the advertise address's
  host and the hostname, lives ``join.cert_ttl`` (24 h by default) and also lets the
  agent renew (:meth:`~dbservice.access.ca.CertificateAuthority.issue_agent`).
* ``POST /v1/renew`` ``{"csr"}`` over mutual TLS with the agent's current certificate
  (the TLS layer checks it against the fleet CA and its dates): a new certificate for
  the same names, if the agent's record still exists (``agents rm`` revokes), names that
  certificate (or the one before it: an answer may have been lost) and its join token
  still exists (``tokens rm`` revokes every agent that joined with it).

Refusals: 400 naming what is wrong in the request, 401 for a token that is unknown,
spent or expired (saying which, except that a wrong secret reads as unknown), 403 for a
revoked agent, 429 (``Retry-After``) past the per-address limit of failed joins (the
login limiter's ``per_address`` and ``window``), 503 when NATS does not answer. Every
answer is audited (``auth.login`` with method ``join-token`` or ``renew``).

``method: aws`` (:class:`AwsJoin`): ``"proof"`` is a signed ``sts:GetCallerIdentity``
for this service's ``aws.server_id`` (:mod:`dbservice.access.awsid`, as ``login --aws``
signs it; the id from ``GET /v1/login/aws``). It is checked and sent to STS, its
signature claimed once (:func:`bus.aws_logins.claim_signature`), and the identity STS
returns matched against the AWS allow rules (``tokens add --method aws``; the oldest
matching rule admits): 401 for a proof refused (STS's reason, a replay), 403 for an
identity no rule admits or when AWS proofs are not enabled here, 503 when STS does not
answer. The agent's record names the rule, so ``tokens rm`` of it revokes the agent.

What the agent needs to reach NATS comes from :attr:`Joins.nats_credentials_for` (by
default nothing: the agent uses its own ``nats:`` settings).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bus import Bus, joins
from bus.audit import Login
from bus.aws_logins import claim_signature
from bus.joins import JoinedAgent
from dbservice.access.audit import AuditEmitter
from dbservice.access.awsid import (
    IdentityRefused,
    StsUnavailable,
    account_matches,
    arn_matches,
    verify_identity_request,
)
from dbservice.access.ca import (
    CertificateAuthority,
    CertificateRejected,
    agent_host_id,
    cert_pem,
    check_signed_by,
    csr_public_key,
)
from fleetgate.addresses import split_host_port
from fleetgate.durations import format_duration

logger = logging.getLogger(__name__)

MAX_BODY = 64 * 1024
NEW_TOKEN = "make a new one with fleetgate tokens add --type agent"

NatsCredentials = Callable[[JoinedAgent], Awaitable[dict[str, Any]]]
"""What an agent needs to reach NATS, given its record (a JSON object; empty: nothing)."""


async def no_nats_credentials(agent: JoinedAgent) -> dict[str, Any]:
    return {}


class Limiter(Protocol):
    def reserve(self, key: str, now: float) -> float | None: ...
    def release(self, key: str, at: float) -> None: ...


class JoinRequest(BaseModel):
    """A join request. Fields a join method needs besides these (e.g. a signed request)
    are kept in ``model_extra`` for it to check."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    method: str = Field(min_length=1, max_length=32)
    token: str | None = Field(None, max_length=256)
    csr: str = Field(max_length=16384)
    host_id: str = Field(max_length=64)
    hostname: str = Field(min_length=1, max_length=253)
    addr: str = Field(min_length=1, max_length=300)
    """The agent's advertise address, ``host:port``."""

    @field_validator("host_id")
    @classmethod
    def _host_id(cls, value: str) -> str:
        try:
            return str(uuid.UUID(value))
        except ValueError:
            raise ValueError("must be the agent's host id (a UUID)") from None

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, value: str) -> str:
        if not all(c.isascii() and (c.isalnum() or c in "-._") for c in value):
            raise ValueError("a host name holds letters, digits, '-', '_' and '.' only")
        return value

    @field_validator("addr")
    @classmethod
    def _addr(cls, value: str) -> str:
        host, _ = split_host_port(value)
        if host in ("0.0.0.0", "::", ""):
            raise ValueError(f"{value!r}: the address clients reach the agent at, not {host}")
        return value


class RenewRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    csr: str = Field(max_length=16384)


class Refused(Exception):
    """A join or renewal refused: ``status`` and a message for the agent's operator."""

    def __init__(
        self, status: int, message: str, *, counted: bool = True, principal: str = ""
    ) -> None:
        super().__init__(message)
        self.status = status
        self.counted = counted
        self.principal = principal
        """Who the request proved to be, when known (an AWS ARN), for the audit."""
        """Whether it counts as a failed attempt for the rate limit."""


@dataclass(frozen=True)
class Admission:
    """Who admitted an agent: the method, and what the agent gets from it."""

    method: str
    token_id: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    principal: str = ""
    """Who the proof showed (an AWS ARN), for the audit."""


Admit = Callable[[Bus, JoinRequest, web.Request], Awaitable[Admission]]
"""A join method: an :class:`Admission`, or :class:`Refused` saying why not (the HTTP
request is there for what a method checks of it, e.g. the address or headers)."""


async def admit_token(bus: Bus, body: JoinRequest, request: web.Request) -> Admission:
    """The ``token`` method: a one-time token, spent here (compare-and-set)."""
    if not body.token:
        raise Refused(400, "token: the join token is missing (method token)")
    try:
        token_id, secret = joins.parse_token(body.token)
    except ValueError as exc:
        raise Refused(400, f"token: {exc}") from None
    found = await joins.get_token(bus, token_id)
    unknown = f"unknown join token {token_id} (never issued, or removed): {NEW_TOKEN}"
    if found is None or not joins.matches(found.record, secret):
        raise Refused(401, unknown)
    token = found.record
    state = token.state()
    if state == "spent":
        raise Refused(
            401,
            f"join token {token_id} was already used (by agent {token.spent_by} at "
            f"{token.spent:%Y-%m-%d %H:%M:%SZ}); a token works once: {NEW_TOKEN}",
        )
    if state == "expired":
        raise Refused(
            401, f"join token {token_id} expired at {token.expires:%Y-%m-%d %H:%M:%SZ}: {NEW_TOKEN}"
        )
    if token.type != "agent" or token.method != "token":
        raise Refused(401, f"join token {token_id} is not an agent join token: {NEW_TOKEN}")
    if not await joins.spend_token(bus, found, body.host_id):
        raise Refused(401, f"join token {token_id} was used by another agent just now: {NEW_TOKEN}")
    return Admission(method="token", token_id=token_id, labels=dict(token.labels))


AWS_NOT_ENABLED = (
    "this auth service does not accept AWS identities (method aws): operators set "
    "aws.server_id in its config"
)


@dataclass(frozen=True)
class AwsJoin:
    """The ``aws`` method: the auth service's ``aws:`` settings."""

    server_id: str
    endpoints: Sequence[str] = ()
    max_age: float = 300.0

    async def __call__(self, bus: Bus, body: JoinRequest, request: web.Request) -> Admission:
        proof = (body.model_extra or {}).get("proof")
        if proof is None:
            raise Refused(400, "proof: the signed AWS request is missing (method aws)")

        async def claim(signature: str, signed_at: datetime) -> bool:
            return await claim_signature(bus, signature, signed_at)

        try:
            who = await verify_identity_request(
                proof, self.server_id, claim=claim, endpoints=self.endpoints,
                max_age=self.max_age,
            )  # fmt: skip
        except IdentityRefused as exc:
            raise Refused(401, f"AWS identity refused: {exc}") from None
        except StsUnavailable as exc:
            raise Refused(
                503, f"the auth service cannot ask AWS STS right now ({exc}): try again later",
                counted=False,
            ) from None  # fmt: skip
        now = datetime.now(UTC)
        rules = [
            t for t in await joins.list_tokens(bus)
            if t.method == "aws" and t.allow is not None and t.state(now) == "valid"
        ]  # fmt: skip
        for rule in rules:
            assert rule.allow is not None
            if account_matches(rule.allow.account, who) and arn_matches(rule.allow.arn, who):
                logger.info("AWS join: %s admitted by rule %s", who.arn, rule.id)
                return Admission(
                    method="aws", token_id=rule.id, labels=dict(rule.labels), principal=who.arn
                )
        raise Refused(
            403,
            f"AWS identity {who.arn} (account {who.account}) matches no agent join rule: an "
            "admin adds one with fleetgate tokens add --type agent --method aws --allow "
            "'account=...,arn=...'",
            principal=who.arn,
        )


async def aws_not_enabled(bus: Bus, body: JoinRequest, request: web.Request) -> Admission:
    raise Refused(403, AWS_NOT_ENABLED)


class Joins:
    """The join and renew handlers (added to the auth service's app)."""

    def __init__(
        self,
        *,
        bus: Bus,
        ca: CertificateAuthority,
        audit: AuditEmitter,
        limiter: Limiter,
        cert_ttl: float,
        body_timeout: float,
        nats_credentials_for: NatsCredentials = no_nats_credentials,
        reserved_names: Sequence[str] = (),
        aws: AwsJoin | None = None,
    ) -> None:
        self.bus = bus
        self.reserved_names = {name.lower().rstrip(".") for name in reserved_names}
        """Host names no agent gets a certificate for (the auth service's own)."""
        self.ca = ca
        self.audit = audit
        self.limiter = limiter
        self.cert_ttl = cert_ttl
        self.body_timeout = body_timeout
        self.nats_credentials_for = nats_credentials_for
        self.methods: dict[str, Admit] = {
            "token": admit_token,
            "aws": aws if aws is not None else aws_not_enabled,
        }

    def add_routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/join", self.join)
        app.router.add_post("/v1/renew", self.renew)

    async def _read(self, request: web.Request, model: type[BaseModel]) -> Any:
        try:
            async with asyncio.timeout(self.body_timeout):
                raw = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise Refused(413, f"the body is larger than {MAX_BODY} bytes") from None
        except TimeoutError:
            raise Refused(
                408, f"the body did not arrive within {format_duration(self.body_timeout)}"
            ) from None
        except ConnectionError:
            raise Refused(400, "the connection closed before the body arrived") from None
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            error = exc.errors(include_url=False, include_input=False)[0]
            where = ".".join(str(p) for p in error["loc"]) or "the body"
            raise Refused(400, f"{where}: {error['msg'].removeprefix('Value error, ')}") from None

    def _answer(self, refused: Refused, request: web.Request, what: str, who: str) -> web.Response:
        self.audit.emit(
            Login(
                user=who,
                client_addr=request.remote or "",
                success=False,
                method=what,
                reason=str(refused),
                principal=refused.principal,
            )
        )
        logger.info("%s refused for %s from %s: %s", what, who or "?", request.remote, refused)
        headers = {}
        if refused.status == 429:
            headers["Retry-After"] = str(getattr(refused, "retry_after", 1))
        return web.json_response({"error": str(refused)}, status=refused.status, headers=headers)

    async def join(self, request: web.Request) -> web.Response:
        address = request.remote or "unknown"
        now = time.monotonic()
        wait = self.limiter.reserve(address, now)
        if wait is not None:
            refused = Refused(429, f"too many failed joins; try again in {int(wait) + 1}s")
            refused.retry_after = int(wait) + 1  # type: ignore[attr-defined]
            return self._answer(refused, request, "join", "")
        who = ""
        try:
            body: JoinRequest = await self._read(request, JoinRequest)
            who = f"agent:{body.hostname}/{body.host_id}"
            try:
                public_key, _ = csr_public_key(body.csr)
            except CertificateRejected as exc:
                raise Refused(400, f"csr: {exc}") from None
            for name in (split_host_port(body.addr)[0], body.hostname):
                if name.lower().rstrip(".") in self.reserved_names:
                    raise Refused(
                        403,
                        f"{name} is a name of the auth service: an agent gets no certificate "
                        "for it; give the agent its own hostname and advertise_addr",
                    )
            admit = self.methods.get(body.method)
            if admit is None:
                known = ", ".join(sorted(self.methods))
                raise Refused(
                    400, f"method: join method {body.method!r} is not known here (known: {known})"
                )
            admission = await admit(self.bus, body, request)
        except Refused as exc:
            if not exc.counted:
                self.limiter.release(address, now)
            return self._answer(exc, request, "join", who)
        self.limiter.release(address, now)  # admitted: not a failure
        host, _ = split_host_port(body.addr)
        hosts = list(dict.fromkeys([host, body.hostname]))
        cert = self.ca.issue_agent(public_key, hosts, self.cert_ttl, host_id=body.host_id)
        joined = datetime.now(UTC)
        agent = JoinedAgent(
            host_id=body.host_id,
            hostname=body.hostname,
            addr=body.addr,
            labels=admission.labels,
            token_id=admission.token_id,
            method=admission.method,
            serial=format(cert.serial_number, "x"),
            expires=cert.not_valid_after_utc,
            joined_at=joined,
        )
        await joins.put_agent(self.bus, agent)
        return await self._issued(
            request, agent, cert, f"join-{admission.method}", who, admission.principal
        )

    async def _issued(
        self,
        request: web.Request,
        agent: JoinedAgent,
        cert: x509.Certificate,
        what: str,
        who: str,
        principal: str = "",
    ) -> web.Response:
        expires = cert.not_valid_after_utc
        self.audit.emit(
            Login(
                user=who,
                client_addr=request.remote or "",
                method=what,
                expires=expires,
                principal=principal,
            )
        )
        logger.info("%s: %s from %s, certificate until %s", what, who, request.remote, expires)
        nats = await self.nats_credentials_for(agent)
        return web.json_response(
            {
                "certificate": cert_pem(cert),
                "ca": self.ca.pem,
                "host_id": agent.host_id,
                "expires": expires.isoformat(),
                "ttl": self.cert_ttl,
                "labels": agent.labels,
                "nats": nats,
            }
        )

    def _presented(self, request: web.Request) -> x509.Certificate:
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = (
            ssl_object.getpeercert(binary_form=True)
            if isinstance(ssl_object, ssl.SSLObject)
            else None
        )
        if not der:
            raise Refused(
                401,
                "renewal needs the agent's current certificate (from join) as the TLS "
                "client certificate",
            )
        cert = x509.load_der_x509_certificate(der)
        now = datetime.now(UTC)
        if not check_signed_by(cert, self.ca.cert) or not (
            cert.not_valid_before_utc <= now < cert.not_valid_after_utc
        ):
            raise Refused(401, "the certificate presented is not a valid one of this fleet's CA")
        return cert

    async def renew(self, request: web.Request) -> web.Response:
        who = ""
        try:
            current = self._presented(request)
            host_id = agent_host_id(current)
            if host_id is None:
                raise Refused(401, "the certificate presented is not an agent's (from join)")
            who = f"agent:{host_id}"
            body: RenewRequest = await self._read(request, RenewRequest)
            try:
                public_key: EllipticCurvePublicKey = csr_public_key(body.csr)[0]
            except CertificateRejected as exc:
                raise Refused(400, f"csr: {exc}") from None
            found = await joins.get_agent(self.bus, host_id)
            rejoin = (
                "join it again with a new token (fleetgate tokens add --type agent)"
                if found is None or found.record.method == "token"
                else "an admin adds a matching AWS join rule, then the agent joins again"
            )
            if found is None:
                raise Refused(
                    403,
                    f"agent {host_id} was removed (fleetgate agents rm): it cannot renew; {rejoin}",
                )
            record = found.record
            who = f"agent:{record.hostname}/{host_id}"
            serial = format(current.serial_number, "x")
            if serial not in (record.serial, record.previous_serial):
                raise Refused(
                    403,
                    f"certificate {serial} of agent {host_id} was replaced since: only the "
                    f"agent's latest certificate renews; {rejoin}",
                )
            if record.token_id and await joins.get_token(self.bus, record.token_id) is None:
                what = "AWS join rule" if record.method == "aws" else "join token"
                raise Refused(
                    403,
                    f"the {what} {record.token_id} of agent {host_id} was removed "
                    f"(fleetgate tokens rm): it cannot renew; {rejoin}",
                )
        except Refused as exc:
            return self._answer(exc, request, "renew", who)
        san = current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        hosts = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
        hosts += san.get_values_for_type(x509.DNSName)
        cert = self.ca.issue_agent(public_key, hosts, self.cert_ttl, host_id=host_id)
        new_serial = format(cert.serial_number, "x")
        previous = record.serial if serial == record.serial else record.previous_serial
        updated = record.model_copy(
            update={
                "serial": new_serial,
                "previous_serial": previous,
                "expires": cert.not_valid_after_utc,
                "renewed_at": datetime.now(UTC),
            }
        )
        if not await joins.update_agent(self.bus, updated, last=found.revision):
            return self._answer(
                Refused(409, f"agent {host_id} changed meanwhile (removed or renewed): try again"),
                request,
                "renew",
                who,
            )
        return await self._issued(request, updated, cert, "renew", who)
