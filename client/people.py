"""The client side of the auth service's catalog: the identity kept under
``$FLEETGATE_HOME`` and the calls ``db ls`` and ``db connect`` make with it (HTTPS, the
login certificate as client certificate). No NATS on people's machines.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import aiohttp
from pydantic import ValidationError

from bus import DatabaseResource, DatabaseSpec, Metadata, TargetHealth
from bus.access import Identity
from client.login import fleetgate_home, http_reason
from dbservice.access.ca import CertificateRejected, decode_identity, load_certs

HTTP_TIMEOUT: Final = 15.0
LOGIN_HINT: Final = "fleetgate login --auth HOST:PORT --user NAME"


class AccessError(Exception):
    """Something a person can act on: not logged in, expired, not reachable..."""


class RegistryDown(AccessError):
    """The auth service answered 503: it cannot reach the registry (NATS)."""


@dataclass(frozen=True)
class ClientIdentity:
    """The files ``fleetgate login`` left, and what they say."""

    identity: Identity
    cert_file: Path
    key_file: Path
    fleet_ca: str
    """PEM of the fleet CA: agents' certificates must chain to it."""
    auth_url: str
    auth_ca: str
    """PEM trusted for the auth service's HTTPS (the pinned ``auth-ca.pem``)."""
    expires: datetime

    @property
    def expired(self) -> bool:
        return self.expires <= datetime.now(UTC)

    def check_valid(self) -> None:
        if self.expired:
            raise AccessError(
                f"your fleetgate certificate expired at {self.expires:%Y-%m-%d %H:%M:%SZ}; "
                f"log in again: fleetgate login --auth {self.auth_url} --user {self.identity.user}"
            )

    def auth_context(self) -> ssl.SSLContext:
        """HTTPS to the auth service, presenting the identity."""
        ctx = ssl.create_default_context(cadata=self.auth_ca)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_file, self.key_file)
        return ctx


def load_identity(home: Path | None = None) -> ClientIdentity | None:
    """The stored identity, or None when nobody is logged in here. AccessError when the
    files are there but unusable."""
    home = home or fleetgate_home()
    directory = home / "identity"
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    if not cert_file.exists():
        return None
    try:
        cert = load_certs(cert_file.read_text())[0]
        identity = decode_identity(cert)
        fleet_ca = (directory / "ca.pem").read_text()
        profile = json.loads((home / "profile.json").read_text())
        auth_url = str(profile["auth"])
        pinned = home / "auth-ca.pem"
        auth_ca = pinned.read_text() if pinned.exists() else fleet_ca
        if not key_file.exists():
            raise FileNotFoundError(str(key_file))
    except (OSError, ValueError, KeyError, TypeError, CertificateRejected) as exc:
        raise AccessError(
            f"the credentials under {home} are unreadable ({exc}); log in again: {LOGIN_HINT}"
        ) from None
    return ClientIdentity(
        identity=identity,
        cert_file=cert_file,
        key_file=key_file,
        fleet_ca=fleet_ca,
        auth_url=auth_url,
        auth_ca=auth_ca,
        expires=cert.not_valid_after_utc,
    )


def require_identity(home: Path | None = None) -> ClientIdentity:
    """The stored identity, valid now; AccessError saying to log in otherwise."""
    found = load_identity(home)
    if found is None:
        raise AccessError(f"not logged in: {LOGIN_HINT}")
    found.check_valid()
    return found


@dataclass(frozen=True)
class AgentAddress:
    """One agent serving a database, as the auth service lists it."""

    host_id: str
    hostname: str
    addr: str
    health: TargetHealth
    version: str = ""
    expires: str | None = None


async def _get(ident: ClientIdentity, path: str) -> dict[str, Any]:
    ident.check_valid()
    url = ident.auth_url + path
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT)) as http,
            http.get(url, ssl=ident.auth_context()) as resp,
        ):
            try:
                data = await resp.json()
            except (aiohttp.ContentTypeError, ValueError):
                data = {}
            status = resp.status
    except aiohttp.ClientConnectorCertificateError as exc:
        raise AccessError(
            f"the auth service at {ident.auth_url} is not trusted by the pinned CA "
            f"({exc.certificate_error}); log in again: {LOGIN_HINT}"
        ) from None
    except (aiohttp.ClientError, TimeoutError, ssl.SSLError) as exc:
        raise AccessError(
            f"the auth service is unreachable at {ident.auth_url} ({http_reason(exc)}), the "
            f"address of your login: if it moved, log in again at its new address: "
            f"fleetgate login --auth HOST:PORT --user {ident.identity.user}"
        ) from None
    message = str(data.get("error") or f"HTTP {status}") if isinstance(data, dict) else ""
    if status == 503:
        raise RegistryDown(
            "the registry is unreachable: the auth service cannot reach NATS, so it cannot "
            "list databases or start new sessions now (sessions already established "
            "continue); try again in a moment"
        )
    if status == 401:
        raise AccessError(f"the auth service refused your certificate ({message}); {LOGIN_HINT}")
    if status != 200 or not isinstance(data, dict):
        raise AccessError(message or f"unexpected answer from the auth service (HTTP {status})")
    return data


async def fetch_databases(
    ident: ClientIdentity,
) -> tuple[list[DatabaseResource], dict[str, tuple[int, int]]]:
    """The databases the caller's roles reach, and (healthy agents, agents) for each."""
    data = await _get(ident, "/v1/databases")
    resources: list[DatabaseResource] = []
    health: dict[str, tuple[int, int]] = {}
    try:
        for item in data.get("databases", []):
            resource = DatabaseResource(
                metadata=Metadata(
                    name=item["name"],
                    description=item.get("description", ""),
                    labels=item.get("labels", {}),
                ),
                spec=DatabaseSpec.model_validate(item["spec"]),
            )
            resources.append(resource)
            counts = item.get("health", {})
            health[resource.name] = (int(counts.get("healthy", 0)), int(counts.get("agents", 0)))
    except (KeyError, TypeError, ValueError, ValidationError) as exc:
        raise AccessError(f"unexpected database list from the auth service: {exc}") from None
    return resources, health


async def fetch_servers(ident: ClientIdentity, name: str, db_user: str = "") -> list[AgentAddress]:
    """The agents serving ``name``, healthy first; AccessError when the caller may not
    reach it (or it does not exist: the service gives one answer for both), or, with
    ``db_user``, when no role allows that db user there."""
    path = f"/v1/databases/{quote(name, safe='')}/servers"
    if db_user:
        path += f"?db_user={quote(db_user, safe='')}"
    data = await _get(ident, path)
    try:
        return [
            AgentAddress(
                host_id=str(s["host_id"]),
                hostname=str(s.get("hostname", "")),
                addr=str(s["addr"]),
                health=TargetHealth.model_validate(s.get("target_health", {})),
                version=str(s.get("version") or ""),
                expires=str(s["expires"]) if s.get("expires") else None,
            )
            for s in data.get("servers", [])
        ]
    except (KeyError, TypeError, ValidationError) as exc:
        raise AccessError(f"unexpected agent list from the auth service: {exc}") from None
