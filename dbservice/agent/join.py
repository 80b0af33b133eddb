"""The agent's own certificate: joined once with a token (or its AWS identity), renewed
by itself (docs/agents-join.md).

At start (:func:`ensure_identity`), an agent with ``db_service.join`` and no valid
certificate in its data_dir makes a key there, sends a CSR with the token to the auth
service (``POST /v1/join``) and keeps key and certificate in ``data_dir/agent.pem``
(0600, replaced atomically). :class:`Renewer` then renews at two thirds of the
certificate's life (minus up to a tenth of it, random, so a fleet joined at once does not
renew at once), with a new key each time, over mutual TLS with the current certificate
(``POST /v1/renew``). With ``method: aws`` there is no token: the agent asks the auth
service for its server id (``GET /v1/login/aws``, as ``fleetgate login --aws`` does) and
sends a ``sts:GetCallerIdentity`` signed with its own AWS credentials (botocore's
standard chain), a new signature for each attempt. The listener takes the new file up for
the next connection; open sessions keep the TLS they have. A failed renewal is logged as
a warning naming what to do, retried with backoff, and shown in the heartbeats
(``fleetgate db servers``); once the certificate expired the agent must join again (a new
token, or its AWS identity at restart).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import random
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509

from bus.settings import AGENT_USER_PREFIX, NatsConnection, inbox_prefix
from dbservice.access.awsid import IdentityRefused, sign_identity_request
from dbservice.access.ca import (
    CLOCK_SKEW,
    CertificateRejected,
    agent_host_id,
    fingerprint,
    key_pem,
    load_certs,
    make_csr,
    new_key,
    write_private,
)
from dbservice.agent.config import JOINED_IDENTITY_FILE, DbService, JoinConfig
from fleetgate.backoff import backoff_delay
from fleetgate.config import ConfigError
from fleetgate.durations import format_duration

logger = logging.getLogger(__name__)

PINNED_CA_FILE = "auth-ca.pem"
NATS_LOGIN_FILE = "nats-login.json"
"""The agent's own NATS login from join/renew (``{"user", "password"}``, 0600)."""
JOIN_WAIT = 30.0
"""How long the agent keeps trying to reach the auth service at start."""
RETRY = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
"""Waits between failed renewals (the last repeats), never past the certificate's expiry."""
RENEW_AT = 2 / 3
JITTER = 0.1
HTTP_TIMEOUT = 30.0


class JoinRefused(Exception):
    """The auth service answered with a refusal (``status``); the message is its reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class CertStatus:
    """What the heartbeats say about the agent's certificate."""

    expires: datetime | None = None
    error: str = ""
    """The last renewal's failure, until a renewal succeeds."""


def identity_file(settings: DbService) -> Path:
    return settings.data_dir / JOINED_IDENTITY_FILE


def read_identity(path: Path, host_id: str) -> x509.Certificate | None:
    """The certificate in ``path`` when it is this agent's and still valid, else None."""
    try:
        cert = load_certs(path.read_bytes())[0]
    except (OSError, CertificateRejected):
        return None
    now = datetime.now(UTC)
    if agent_host_id(cert) != host_id or cert.not_valid_after_utc <= now:
        return None
    return cert


async def auth_trust(join: JoinConfig, data_dir: Path) -> ssl.SSLContext:
    """The TLS context that trusts the auth service (``ca_file``, the pinned CA of
    ``ca_fingerprint``, or the system's roots)."""
    if join.ca_file is not None:
        return ssl.create_default_context(cafile=str(join.ca_file))
    if join.ca_fingerprint is None:
        return ssl.create_default_context()
    pinned = data_dir / PINNED_CA_FILE
    pem = pinned.read_text() if pinned.exists() else None
    if pem is None or fingerprint(load_certs(pem)[0]).lower() != join.ca_fingerprint.lower():
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT)) as http,
            http.get(f"https://{join.auth}/v1/ca", ssl=False) as resp,
        ):
            data = await resp.json()
        pem = str(data["pem"])
        seen = fingerprint(load_certs(pem)[0])
        if seen.lower() != join.ca_fingerprint.lower():
            raise ConfigError(
                f"db_service.join: the auth service at {join.auth} presents CA {seen}, not "
                f"{join.ca_fingerprint}: not joining; check ca_fingerprint with your admin"
            )
        pinned.write_text(pem)
    return ssl.create_default_context(cadata=pem)


async def _post(url: str, body: dict[str, Any], context: ssl.SSLContext) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT)) as http,
        http.post(url, json=body, ssl=context) as resp,
    ):
        try:
            data = await resp.json()
        except (aiohttp.ContentTypeError, ValueError):
            data = {"error": f"unexpected answer (HTTP {resp.status})"}
        if resp.status != 200:
            raise JoinRefused(resp.status, str(data.get("error") or f"HTTP {resp.status}"))
    if not isinstance(data, dict) or "certificate" not in data:
        raise JoinRefused(502, "the auth service's answer holds no certificate")
    return data


def _keep(
    path: Path, key_bytes: bytes, answer: dict[str, Any], public_key: Any
) -> x509.Certificate:
    cert = load_certs(answer["certificate"])[0]
    if cert.public_key() != public_key:
        raise JoinRefused(502, "the auth service returned a certificate for another key")
    write_private(path, key_bytes + str(answer["certificate"]).encode())
    return cert


def keep_nats_login(data_dir: Path, host_id: str, answer: dict[str, Any]) -> bool:
    """Keep the NATS login of a join or renew answer in data_dir (0600); an answer
    without one (the auth service does not answer NATS's auth callout) removes a kept
    one. Whether what is kept changed."""
    path = data_dir / NATS_LOGIN_FILE
    login = answer.get("nats") or {}
    if not isinstance(login, dict):
        raise JoinRefused(502, "the auth service's answer holds a malformed NATS login")
    before = path.read_bytes() if path.exists() else None
    if not login:
        if before is None:
            return False
        path.unlink()
        return True
    user, password = login.get("user"), login.get("password")
    if user != AGENT_USER_PREFIX + host_id or not isinstance(password, str) or not password:
        raise JoinRefused(502, f"the auth service's NATS login is not agent {host_id}'s")
    data = json.dumps({"user": user, "password": password}).encode()
    if data == before:
        return False
    write_private(path, data)
    return True


def read_nats_login(data_dir: Path) -> tuple[str, str] | None:
    """The NATS ``(user, password)`` kept by :func:`keep_nats_login`, or None."""
    path = data_dir / NATS_LOGIN_FILE
    try:
        login = json.loads(path.read_bytes())
        return str(login["user"]), str(login["password"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"{path}: cannot read the agent's NATS login ({exc}); delete the file and "
            f"{JOINED_IDENTITY_FILE} next to it, and join again with a new token"
        ) from None


def with_nats_login(nats: NatsConnection, data_dir: Path) -> NatsConnection:
    """``nats`` logged in as the agent's own NATS user when join gave it one. Credentials
    in the agent's ``nats:`` settings as well are an error: the agent would otherwise
    keep a shared user's wider rights without anyone noticing."""
    login = read_nats_login(data_dir)
    if login is None:
        return nats
    configured = nats.settings.credential_kinds()
    if configured or nats.user or nats.token or nats.creds_file or nats.nkey_seed_file:
        what = " and ".join(configured) or "NATS credentials"
        raise ConfigError(
            f"nats: {what} set, but this agent joined and logs in to NATS as its own user "
            f"{login[0]} ({data_dir / NATS_LOGIN_FILE}): remove the credentials from the "
            "agent's nats settings (and FLEETGATE_NATS_* in its environment)"
        )
    user, password = login
    prefix = nats.settings.inbox_prefix or inbox_prefix(user)
    return dataclasses.replace(nats, user=user, password=password, inbox_prefix=prefix)


async def _aws_server_id(join_config: JoinConfig, context: ssl.SSLContext) -> str:
    url = f"https://{join_config.auth}/v1/login/aws"
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT)) as http,
        http.get(url, ssl=context) as resp,
    ):
        try:
            data = await resp.json()
        except (aiohttp.ContentTypeError, ValueError):
            data = {}
        if resp.status == 404:
            raise JoinRefused(403, str(data.get("error") or "AWS identities not accepted"))
        if resp.status != 200 or not isinstance(data.get("server_id"), str):
            raise JoinRefused(resp.status, str(data.get("error") or f"HTTP {resp.status}"))
    return str(data["server_id"])


def _sign(server_id: str) -> dict[str, Any]:
    import botocore.session

    return sign_identity_request(botocore.session.Session(), server_id)


async def aws_proof(join_config: JoinConfig, context: ssl.SSLContext) -> dict[str, Any]:
    """A fresh signed GetCallerIdentity for the auth service; :class:`ConfigError` when
    this machine has no usable AWS credentials."""
    server_id = await _aws_server_id(join_config, context)
    try:
        return await asyncio.to_thread(_sign, server_id)
    except IdentityRefused as exc:
        raise ConfigError(f"db_service.join (method aws): cannot sign: {exc}") from None


async def join(settings: DbService, host_id: str) -> x509.Certificate:
    """Join once with the token or the AWS identity (see the module docstring); the
    certificate kept."""
    config = settings.join
    assert config is not None
    where = "db_service.join"
    if config.method == "aws":
        token = None
    elif config.token_file is None:
        raise ConfigError(
            f"{where}: this agent has no valid certificate in {settings.data_dir} and no "
            "token_file to join with: give it a token from fleetgate tokens add --type agent"
        )
    else:
        try:
            token = config.token_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"{where}.token_file {config.token_file}: cannot read it ({exc.strerror or exc})"
            ) from None
    key = new_key()
    body: dict[str, Any] = {
        "method": config.method,
        "token": token,
        "csr": make_csr(key, host_id),
        "host_id": host_id,
        "hostname": settings.hostname,
        "addr": settings.advertise(),
    }
    url = f"https://{config.auth}/v1/join"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + JOIN_WAIT
    attempt = 0
    while True:
        try:
            context = await auth_trust(config, settings.data_dir)
            if config.method == "aws":
                body["proof"] = await aws_proof(config, context)
            answer = await _post(url, body, context)
            break
        except JoinRefused as exc:
            if exc.status < 500 or loop.time() > deadline:
                raise ConfigError(
                    f"{where}: the auth service at {config.auth} refused: {exc}"
                ) from None
            why = str(exc)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            if isinstance(exc, aiohttp.ClientConnectorCertificateError):
                raise ConfigError(
                    f"{where}: the auth service at {config.auth} is not trusted "
                    f"({exc.certificate_error}): check ca_file or ca_fingerprint"
                ) from None
            why = str(exc) or type(exc).__name__
            if loop.time() > deadline:
                raise ConfigError(
                    f"{where}: cannot reach the auth service at {config.auth} ({why}) within "
                    f"{format_duration(JOIN_WAIT)}"
                ) from None
        logger.warning("joining at %s failed (%s); trying again", config.auth, why)
        await asyncio.sleep(backoff_delay(RETRY, attempt))
        attempt += 1
    cert = _keep(identity_file(settings), key_pem(key), answer, key.public_key())
    keep_nats_login(settings.data_dir, host_id, answer)
    logger.info(
        "joined the fleet at %s as %s: certificate %x until %s",
        config.auth,
        host_id,
        cert.serial_number,
        cert.not_valid_after_utc.isoformat(timespec="seconds"),
    )
    return cert


async def ensure_identity(settings: DbService, host_id: str) -> x509.Certificate:
    """The agent's valid certificate in data_dir, joining first when there is none."""
    path = identity_file(settings)
    cert = read_identity(path, host_id)
    if cert is None and path.exists():
        join_config = settings.join
        logger.warning(
            "the certificate in %s has expired or is not this agent's: joining again with %s",
            path,
            "its AWS identity"
            if join_config is not None and join_config.method == "aws"
            else f"the token in {join_config.token_file if join_config else None}",
        )
    if cert is not None:
        logger.info(
            "using the certificate in %s (until %s)",
            identity_file(settings),
            cert.not_valid_after_utc.isoformat(timespec="seconds"),
        )
        return cert
    return await join(settings, host_id)


def renew_delay(cert: x509.Certificate, now: datetime | None = None) -> float:
    """Seconds until the renewal of ``cert``: at two thirds of its life, minus up to a
    tenth of it (random)."""
    # notBefore is set back by the CA's allowance for clock skew: the life counts from
    # the issue
    start, end = cert.not_valid_before_utc + CLOCK_SKEW, cert.not_valid_after_utc
    life = (end - start).total_seconds()
    at = RENEW_AT * life - random.uniform(0, JITTER * life)
    return max(0.0, (start - (now or datetime.now(UTC))).total_seconds() + at)


class Renewer:
    """Renews the agent's certificate forever (a root task of the agent)."""

    def __init__(self, settings: DbService, host_id: str, cert: x509.Certificate) -> None:
        assert settings.join is not None
        self.settings = settings
        self.config: JoinConfig = settings.join
        self.host_id = host_id
        self.cert = cert
        self.status = CertStatus(expires=cert.not_valid_after_utc)
        self.renewals = 0
        self.failures = 0
        """Renewal attempts that failed (a metric: renewal failing is loud)."""

    async def renew(self) -> x509.Certificate:
        """One renewal; the new certificate is in place when it returns."""
        path = identity_file(self.settings)
        context = await auth_trust(self.config, self.settings.data_dir)
        context.load_cert_chain(str(path), str(path))
        key = new_key()
        answer = await _post(
            f"https://{self.config.auth}/v1/renew", {"csr": make_csr(key, self.host_id)}, context
        )
        cert = _keep(path, key_pem(key), answer, key.public_key())
        if keep_nats_login(self.settings.data_dir, self.host_id, answer):
            logger.warning(
                "the agent's NATS login changed at renewal (kept in %s): the agent uses it "
                "from its next start",
                self.settings.data_dir / NATS_LOGIN_FILE,
            )
        return cert

    async def run(self) -> None:
        # 0.1 s when the clock already passed the renewal (a restart late in a life)
        delay = max(renew_delay(self.cert), 0.1)
        logger.info("renewing the agent's certificate in %s", format_duration(delay))
        await asyncio.sleep(delay)
        attempt = 0
        while True:
            try:
                cert = await self.renew()
            except (JoinRefused, aiohttp.ClientError, TimeoutError, OSError, ssl.SSLError) as exc:
                wait = self._failed(exc, attempt)
                attempt += 1
                await asyncio.sleep(wait)
                continue
            attempt = 0
            self.cert, self.renewals = cert, self.renewals + 1
            self.status = CertStatus(expires=cert.not_valid_after_utc)
            delay = renew_delay(cert)
            logger.info(
                "renewed the agent's certificate: %x until %s; next renewal in %s",
                cert.serial_number,
                cert.not_valid_after_utc.isoformat(timespec="seconds"),
                format_duration(delay),
            )
            await asyncio.sleep(delay)

    def _failed(self, exc: BaseException, attempt: int) -> float:
        self.failures += 1
        why = str(exc) or type(exc).__name__
        expires = self.cert.not_valid_after_utc
        left = (expires - datetime.now(UTC)).total_seconds()
        self.status = CertStatus(expires=expires, error=why)
        aws = self.config.method == "aws"
        if left <= 0:
            again = (
                "restart the agent (it joins again with its AWS identity, if an AWS join rule "
                "admits it)"
                if aws
                else f"put a new token from fleetgate tokens add --type agent in "
                f"{self.config.token_file}, delete {identity_file(self.settings)} and restart "
                "the agent"
            )
            logger.error(
                "the agent's certificate expired at %s and was not renewed (%s): clients can "
                "no longer verify this agent; join it again: %s",
                expires.isoformat(timespec="seconds"),
                why,
                again,
            )
        else:
            what = (
                ("it was revoked; join it again" + ("" if aws else " with a new token"))
                if isinstance(exc, JoinRefused) and exc.status == 403
                else f"check the auth service at {self.config.auth} and this agent's access to it"
            )
            logger.warning(
                "renewing the agent's certificate failed (%s); it expires in %s, at %s: %s; "
                "retrying",
                why,
                format_duration(left),
                expires.isoformat(timespec="seconds"),
                what,
            )
        wait = backoff_delay(RETRY, attempt)
        return max(0.5, min(wait, left / 2)) if left > 0 else wait
