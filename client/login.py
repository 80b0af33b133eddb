"""The client side of logging in: keys made here, credentials kept under the home.

Layout of ``$FLEETGATE_HOME`` (default ``~/.fleetgate``, mode 0700)::

    profile.json        auth service address, user, expiry, CA fingerprints
    auth-ca.pem         the CA trusted for the auth service's HTTPS (pinned)
    identity/key.pem    the private key, made on this machine (0600)
    identity/cert.pem   the short-lived certificate from the login
    identity/ca.pem     the fleet CA, to verify agents
    db/<name>/          per-database state (``fleetgate db logout NAME`` removes it)

Trusting the auth service, first time: ``--ca-file ca.crt`` (the file ``auth init``
wrote, handed out by the admin) or ``--ca-fingerprint SHA256:...`` (printed by
``auth init``; the client fetches the CA, checks the fingerprint, then connects verified).
Without either, an interactive login shows the fingerprint the service presents and asks
(trust on first use); a non-interactive one refuses. Either way the CA is pinned in
``auth-ca.pem`` for later logins.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from bus.access import Identity
from dbservice.access.awsid import IdentityRefused, sign_identity_request
from dbservice.access.ca import (
    CertificateRejected,
    PrivateKey,
    decode_identity,
    fingerprint,
    key_pem,
    load_certs,
    make_csr,
    new_key,
    write_private,
)


class LoginError(Exception):
    """Login failed; the message says why and what to do."""


_REPR = re.compile(r"<[^<>]* object at 0x[0-9a-fA-F]+>")


def http_reason(exc: BaseException) -> str:
    """Why an HTTPS call failed, as a short phrase for people: the operating system's
    reason for a refused or failed connection, never an object's repr (aiohttp's own
    messages name the SSL context they used)."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = exc.os_error
        if isinstance(os_error, ConnectionRefusedError):
            return "connection refused"
        if isinstance(os_error, ssl.SSLError):
            return f"TLS failed ({os_error.reason or type(os_error).__name__})"
        return os_error.strerror or type(os_error).__name__
    if isinstance(exc, TimeoutError | aiohttp.ServerTimeoutError):
        return "no answer in time"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the connection closed before an answer"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or type(exc).__name__})"
    text = _REPR.sub("", str(exc)).strip(" :,")
    return text or type(exc).__name__


def fleetgate_home() -> Path:
    return Path(os.environ.get("FLEETGATE_HOME") or Path.home() / ".fleetgate")


def _ensure_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)
    return path


def normalize_auth(address: str) -> str:
    """``host:port`` -> ``https://host:port`` (an explicit https:// URL is kept)."""
    if address.startswith("https://"):
        return address.rstrip("/")
    if "://" in address:
        raise LoginError(f"--auth {address}: the auth service speaks HTTPS only")
    if ":" not in address.rsplit("]", 1)[-1]:
        address += ":3025"
    return f"https://{address}"


def trusting(pem: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cadata=pem)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


async def fetch_presented_ca(url: str) -> x509.Certificate:
    """The fleet CA the service at ``url`` hands out, fetched WITHOUT verification: only
    to compare with a fingerprint the user got out of band."""
    insecure = ssl.create_default_context()
    insecure.check_hostname = False
    insecure.verify_mode = ssl.CERT_NONE
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
            http.get(f"{url}/v1/ca", ssl=insecure) as resp,
        ):
            data = await resp.json()
        return load_certs(data["pem"])[0]
    except (aiohttp.ClientError, TimeoutError, ssl.SSLError) as exc:
        raise LoginError(
            f"cannot fetch the CA from the auth service at {url}: {http_reason(exc)}; "
            "check the address (--auth HOST:PORT) with your admin"
        ) from None
    except (ValueError, KeyError, CertificateRejected) as exc:
        raise LoginError(f"cannot fetch the CA from {url}: {exc}") from None


async def resolve_trust(
    url: str,
    home: Path,
    *,
    ca_file: str | None,
    ca_fingerprint: str | None,
    confirm: Callable[[str], bool] | None,
) -> str:
    """The PEM to trust for the auth service (see the module docstring), pinned."""
    pinned = home / "auth-ca.pem"
    if ca_file:
        pem = read_ca_file(ca_file)
    elif pinned.exists() and not ca_fingerprint:
        return read_ca_file(str(pinned))
    else:
        presented = await fetch_presented_ca(url)
        seen = fingerprint(presented)
        if ca_fingerprint:
            if seen.lower() != ca_fingerprint.strip().lower():
                raise LoginError(
                    f"the service at {url} presents CA {seen}, not {ca_fingerprint}: "
                    "do not log in; ask your admin"
                )
        elif confirm is None or not confirm(seen):
            raise LoginError(
                f"the auth service's CA is not trusted yet. It presents {seen}; compare with "
                "what your admin got from fleetgate auth init, then pass --ca-fingerprint "
                "(or --ca-file ca.crt)"
            )
        pem = presented.public_bytes(Encoding.PEM).decode()
    _ensure_dir(home)
    _write(pinned, pem)
    return pem


def read_ca_file(path: str) -> str:
    try:
        pem = Path(path).read_text()
        load_certs(pem)
    except OSError as exc:
        raise LoginError(f"{path}: {exc.strerror}") from None
    except CertificateRejected as exc:
        raise LoginError(f"{path}: {exc}") from None
    return pem


def _write(path: Path, text: str) -> None:
    path.write_text(text)


@dataclass(frozen=True)
class LoginResult:
    identity: Identity
    ttl: float
    home: Path


async def login(
    address: str,
    user: str,
    password: str,
    *,
    totp: str | None = None,
    ttl: float | None = None,
    ca_file: str | None = None,
    ca_fingerprint: str | None = None,
    confirm: Callable[[str], bool] | None = None,
    home: Path | None = None,
) -> LoginResult:
    """Log in at the auth service and keep the identity under ``home``."""
    home = home or fleetgate_home()
    url = normalize_auth(address)
    trust = await resolve_trust(
        url, home, ca_file=ca_file, ca_fingerprint=ca_fingerprint, confirm=confirm
    )
    key = new_key()
    body: dict[str, Any] = {"user": user, "password": password, "csr": make_csr(key, user)}
    if totp:
        body["totp"] = totp
    if ttl:
        body["ttl"] = ttl
    status, data = await _post(url, "/v1/login", body, trust)
    if status != 200:
        message = str(data.get("error") or f"HTTP {status}")
        if data.get("need") == "totp":
            message += " (pass --otp CODE)"
        raise LoginError(f"login failed: {message}")
    return _keep(home, url, key, data)


async def _post(url: str, path: str, body: dict[str, Any], trust: str) -> tuple[int, Any]:
    """POST ``body`` as JSON to the auth service: its status and JSON answer."""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
            http.post(f"{url}{path}", json=body, ssl=trusting(trust)) as resp,
        ):
            try:
                data = await resp.json()
            except (aiohttp.ContentTypeError, ValueError):
                data = None
            if not isinstance(data, dict):
                data = {"error": f"unexpected answer (HTTP {resp.status})"}
            return resp.status, data
    except aiohttp.ClientConnectorCertificateError as exc:
        raise LoginError(
            f"the auth service at {url} is not trusted by the pinned CA ({exc.certificate_error}); "
            f"if its CA changed, check with your admin and pass --ca-file or --ca-fingerprint"
        ) from None
    except (aiohttp.ClientError, TimeoutError, ssl.SSLError) as exc:
        raise LoginError(
            f"cannot reach the auth service at {url}: {http_reason(exc)}; "
            "check the address (--auth HOST:PORT) with your admin"
        ) from None


def _keep(home: Path, url: str, key: PrivateKey, data: dict[str, Any]) -> LoginResult:
    cert = load_certs(data["certificate"])[0]
    if cert.public_key() != key.public_key():
        raise LoginError("the auth service returned a certificate for another key")
    identity = save_identity(home, url, key_pem(key), cert, data["certificate"], data["ca"])
    return LoginResult(identity, float(data.get("ttl", 0)), home)


async def login_aws(
    address: str,
    *,
    role: str | None = None,
    ttl: float | None = None,
    region: str | None = None,
    ca_file: str | None = None,
    ca_fingerprint: str | None = None,
    confirm: Callable[[str], bool] | None = None,
    home: Path | None = None,
) -> LoginResult:
    """Log in with this machine's AWS identity: sign ``sts:GetCallerIdentity`` for the
    auth service (its id comes from ``GET /v1/login/aws``, over the verified connection)
    and send the signed request, never the credentials (:mod:`dbservice.access.awsid`)."""
    home = home or fleetgate_home()
    url = normalize_auth(address)
    trust = await resolve_trust(
        url, home, ca_file=ca_file, ca_fingerprint=ca_fingerprint, confirm=confirm
    )
    server_id = await _aws_server_id(url, trust)
    try:
        proof = await asyncio.to_thread(_sign, server_id, region)
    except IdentityRefused as exc:
        raise LoginError(f"cannot sign with an AWS identity: {exc}") from None
    key = new_key()
    body: dict[str, Any] = {"proof": proof, "csr": make_csr(key, "aws")}
    if role:
        body["role"] = role
    if ttl:
        body["ttl"] = ttl
    status, data = await _post(url, "/v1/login/aws", body, trust)
    if status != 200:
        raise LoginError(f"login failed: {data.get('error') or f'HTTP {status}'}")
    return _keep(home, url, key, data)


def _sign(server_id: str, region: str | None) -> dict[str, Any]:
    import botocore.session

    return sign_identity_request(botocore.session.Session(), server_id, region=region)


async def _aws_server_id(url: str, trust: str) -> str:
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http,
            http.get(f"{url}/v1/login/aws", ssl=trusting(trust)) as resp,
        ):
            try:
                data = await resp.json()
            except (aiohttp.ContentTypeError, ValueError):
                data = None
            status = resp.status
    except (aiohttp.ClientError, TimeoutError, ssl.SSLError) as exc:
        raise LoginError(
            f"cannot reach the auth service at {url}: {http_reason(exc)}; "
            "check the address (--auth HOST:PORT) with your admin"
        ) from None
    if not isinstance(data, dict):
        raise LoginError(f"login failed: unexpected answer (HTTP {status})")
    if status != 200 or not isinstance(data.get("server_id"), str):
        raise LoginError(f"login failed: {data.get('error') or f'HTTP {status}'}")
    return str(data["server_id"])


def save_identity(
    home: Path, url: str, key: bytes, cert: x509.Certificate, cert_text: str, ca: str
) -> Identity:
    identity_dir = _ensure_dir(home / "identity")
    write_private(identity_dir / "key.pem", key)
    (identity_dir / "cert.pem").write_text(cert_text)
    (identity_dir / "ca.pem").write_text(ca)
    identity = decode_identity(cert)
    profile = {
        "auth": url,
        "user": identity.user,
        "expires": cert.not_valid_after_utc.isoformat(),
        "fleet_ca": fingerprint(load_certs(ca)[0]),
    }
    (home / "profile.json").write_text(json.dumps(profile, indent=2) + "\n")
    return identity


@dataclass(frozen=True)
class Status:
    identity: Identity
    auth: str
    expired: bool
    cert_path: Path


def status(home: Path | None = None) -> Status | None:
    """Who the stored certificate says we are; None when not logged in."""
    home = home or fleetgate_home()
    cert_path = home / "identity" / "cert.pem"
    if not cert_path.exists():
        return None
    cert = load_certs(cert_path.read_text())[0]
    identity = decode_identity(cert)
    try:
        auth = json.loads((home / "profile.json").read_text()).get("auth", "")
    except (OSError, ValueError):
        auth = ""
    expired = cert.not_valid_after_utc <= datetime.now(UTC)
    return Status(identity, str(auth), expired, cert_path)


def logout(name: str | None = None, home: Path | None = None) -> list[Path]:
    """Remove credentials: everything (no ``name``) or one database's state. Returns what
    was removed. The pinned auth CA stays (it is trust, not a credential)."""
    home = home or fleetgate_home()
    if name:
        if "/" in name or "\\" in name or name in {".", ".."}:
            raise LoginError(f"{name!r} is not a database name")
        targets = [home / "db" / name]
    else:
        targets = [home / "identity", home / "db", home / "profile.json"]
    removed = []
    for target in targets:
        if target.is_dir():
            shutil.rmtree(target)
            removed.append(target)
        elif target.exists():
            target.unlink()
            removed.append(target)
    return removed
