"""The login service over real HTTPS on a loopback port, and its client."""

from __future__ import annotations

import asyncio
import stat
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bus import Bus, subjects
from bus.access import Role, User, put_role, put_user
from bus.audit import Login, ensure_audit_stream, read_events
from dbservice.audit import AuditEmitter
from dbservice.auth.admin import init_ca
from dbservice.auth.ca import CertificateAuthority, verify_client_certificate
from dbservice.auth.client import LoginError, login, logout, status
from dbservice.auth.passwords import hash_password, new_totp_secret, totp_code
from dbservice.auth.service import AuthConfig, RunningService, start_service

PASSWORD = "correct horse battery"


@dataclass
class AuthEnv:
    bus: Bus
    ca: CertificateAuthority
    ca_file: Path
    service: RunningService
    audit: AuditEmitter
    tmp: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.service.port}"

    async def login(self, user: str, password: str = PASSWORD, **kwargs: object) -> object:
        kwargs.setdefault("ca_file", str(self.ca_file))
        kwargs.setdefault("home", self.tmp / "home")
        return await asyncio.wait_for(login(self.address, user, password, **kwargs), 10)  # type: ignore[arg-type]

    async def logins(self) -> list[Login]:
        await self.audit.flush(5)

        async def read() -> list[Login]:
            subject = subjects.audit_filter("auth.login")
            return [e async for e in read_events(self.bus, subject=subject)]  # type: ignore[misc]

        return await asyncio.wait_for(read(), 10)


@pytest.fixture
async def env(bus: Bus, tmp_path: Path) -> AsyncIterator[AuthEnv]:
    result = await init_ca(bus, tmp_path / "ca")
    await ensure_audit_stream(bus)
    await put_role(bus, Role.model_validate({
        "name": "dev", "allow": {"db_labels": {"env": "dev"}, "db_users": ["app"]},
        "options": {"max_session_ttl": "2h"},
    }))  # fmt: skip
    await put_role(bus, Role(name="short", options={"max_session_ttl": "10m"}))  # type: ignore[arg-type]
    await put_user(bus, User(name="alice", roles=("dev",), db_users=("alice-rw",),
                             password_hash=hash_password(PASSWORD)))  # fmt: skip
    await put_user(bus, User(name="carol", roles=("dev", "short", "gone"),
                             password_hash=hash_password(PASSWORD)))  # fmt: skip
    config = AuthConfig.model_validate({
        "listen": "127.0.0.1:0", "ca_dir": str(tmp_path / "ca"), "host_id": "auth-1",
        "rate_limit": {"per_user": 3, "per_address": 6, "window": "1m"},
    })  # fmt: skip
    emitter = AuditEmitter.for_bus(bus, host_id="auth-1")
    emitter.start()
    service = await start_service(config, bus=bus, ca=result.ca, audit=emitter)
    try:
        yield AuthEnv(bus, result.ca, result.cert_path, service, emitter, tmp_path)
    finally:
        await service.close()
        await emitter.aclose()


async def test_login_issues_a_capped_certificate_for_a_local_key(env: AuthEnv) -> None:
    result = await env.login("alice", ttl=10 * 3600)
    home = env.tmp / "home"
    key = home / "identity" / "key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert result.ttl == 7200  # type: ignore[attr-defined]
    st = status(home)
    assert st is not None and not st.expired
    assert (st.identity.user, st.identity.roles, st.identity.db_users) == (
        "alice", ("dev",), ("alice-rw",),
    )  # fmt: skip
    from dbservice.auth.ca import load_certs

    cert = load_certs((home / "identity" / "cert.pem").read_text())[0]
    assert verify_client_certificate(cert, [env.ca.cert]).user == "alice"
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 7200 <= lifetime.total_seconds() <= 7200 + 61
    assert (home / "identity" / "ca.pem").read_text() == env.ca.pem
    (event,) = await env.logins()
    assert event.success and event.user == "alice" and event.client_addr == "127.0.0.1"
    assert event.host_id == "auth-1" and event.roles == ("dev",)

    removed = logout(home=home)
    assert home / "identity" in removed and status(home) is None


async def test_ttl_is_the_shortest_of_the_roles_and_the_request(env: AuthEnv) -> None:
    assert (await env.login("carol")).ttl == 600  # type: ignore[attr-defined]
    assert (await env.login("carol", ttl=120)).ttl == 120  # type: ignore[attr-defined]
    assert (await env.login("alice")).ttl == 7200  # type: ignore[attr-defined]


async def test_failed_logins_are_rate_limited_per_user_and_audited(env: AuthEnv) -> None:
    with pytest.raises(LoginError, match="invalid user name or password"):
        await env.login("nobody")
    for _ in range(3):
        with pytest.raises(LoginError, match="invalid user name or password"):
            await env.login("alice", "wrong password!")
    with pytest.raises(LoginError, match="too many failed logins"):
        await env.login("alice")  # even the right password, for now
    assert (await env.login("carol")).identity.user == "carol"  # type: ignore[attr-defined]
    reasons = [(e.user, e.success, e.reason) for e in await env.logins()]
    assert reasons == [
        ("nobody", False, "unknown user"),
        ("alice", False, "wrong password"),
        ("alice", False, "wrong password"),
        ("alice", False, "wrong password"),
        ("alice", False, "rate limited"),
        ("carol", True, ""),
    ]


async def test_failed_logins_are_rate_limited_per_address(env: AuthEnv) -> None:
    for i in range(6):
        with pytest.raises(LoginError, match="invalid"):
            await env.login(f"guess-{i}")
    with pytest.raises(LoginError, match="too many failed logins"):
        await env.login("alice")


async def test_second_factor(env: AuthEnv) -> None:
    secret = new_totp_secret()
    await put_user(env.bus, User(name="dave", roles=("dev",), password_hash=hash_password(PASSWORD),
                                 totp_secret=secret))  # fmt: skip
    with pytest.raises(LoginError, match="one-time code is required"):
        await env.login("dave")
    with pytest.raises(LoginError, match="invalid one-time code"):
        await env.login("dave", totp="000000" if totp_code(secret) != "000000" else "111111")
    code = totp_code(secret)
    assert (await env.login("dave", totp=code)).identity.user == "dave"  # type: ignore[attr-defined]
    assert [e.reason for e in await env.logins()][-1] == ""
    assert (await env.logins())[-1].method == "password+totp"
    # a code works once (RFC 6238 5.2): replayed, even within its 30 s, it is refused
    with pytest.raises(LoginError, match="already used: wait for the next one"):
        await env.login("dave", totp=code)
    assert (await env.logins())[-1].reason == "one-time code used again"


async def test_trusting_the_auth_service(env: AuthEnv) -> None:
    home = env.tmp / "fresh"
    with pytest.raises(LoginError, match=f"presents {env.ca.fingerprint}"):
        await env.login("alice", ca_file=None, home=home)
    with pytest.raises(LoginError, match="do not log in"):
        await env.login("alice", ca_file=None, ca_fingerprint="SHA256:00", home=home)
    asked: list[str] = []
    await env.login("alice", ca_file=None, home=home, confirm=lambda fp: asked.append(fp) or True)
    assert asked == [env.ca.fingerprint]
    assert (home / "auth-ca.pem").read_text() == env.ca.pem
    await env.login("alice", ca_file=None, home=home)  # pinned now, no question
    other = env.tmp / "pinned-by-fingerprint"
    await env.login("alice", ca_file=None, ca_fingerprint=env.ca.fingerprint, home=other)
    # A pinned CA that does not match the service is refused.
    (other / "auth-ca.pem").write_text(CertificateAuthority.create().pem)
    with pytest.raises(LoginError, match="not trusted"):
        await env.login("alice", ca_file=None, home=other)


async def test_unreachable_service_is_one_clear_error(env: AuthEnv, tmp_path: Path) -> None:
    with pytest.raises(LoginError, match="cannot"):
        await asyncio.wait_for(
            login("127.0.0.1:1", "alice", PASSWORD, ca_file=str(env.ca_file), home=tmp_path / "h"),
            10,
        )
