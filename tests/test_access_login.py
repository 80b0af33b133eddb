"""The login service over real HTTPS on a loopback port, and its client."""

from __future__ import annotations

import asyncio
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from bus import Bus, subjects
from bus.access import Role, User, get_user, put_role, put_user
from bus.audit import Login, ensure_audit_stream, read_events
from bus.server import NatsServer, wait_port_free
from bus.totp import claim_step
from dbservice.audit import AuditEmitter
from dbservice.auth.admin import init_ca
from dbservice.auth.ca import CertificateAuthority, verify_client_certificate
from dbservice.auth.client import LoginError, login, logout, status
from dbservice.auth.passwords import TOTP_STEP, hash_password, new_totp_secret, totp_code, totp_step
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

    async def login(
        self, user: str, password: str = PASSWORD, *, at: int | None = None, **kwargs: object
    ) -> object:
        """Log in at the service (or at another instance's port ``at``)."""
        kwargs.setdefault("ca_file", str(self.ca_file))
        kwargs.setdefault("home", self.tmp / "home")
        address = self.address if at is None else f"127.0.0.1:{at}"
        return await asyncio.wait_for(login(address, user, password, **kwargs), 10)  # type: ignore[arg-type]

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


async def _second_instance(env: AuthEnv, bus: Bus, host_id: str) -> RunningService:
    config = AuthConfig.model_validate(
        {"listen": "127.0.0.1:0", "ca_dir": str(env.tmp / "ca"), "host_id": host_id}
    )
    return await start_service(config, bus=bus, ca=env.ca, audit=env.audit)


async def _totp_user(env: AuthEnv, name: str) -> str:
    secret = new_totp_secret()
    await put_user(env.bus, User(name=name, roles=("dev",), password_hash=hash_password(PASSWORD),
                                 totp_secret=secret))  # fmt: skip
    return secret


async def test_a_one_time_code_works_once_across_instances(
    env: AuthEnv, nats_server: NatsServer
) -> None:
    secret = await _totp_user(env, "erin.o@example")  # dots and @: escaped in the KV key
    async with await Bus.connect(nats_server.url, name="auth-2") as bus_b:
        service_b = await _second_instance(env, bus_b, "auth-2")
        try:
            code = totp_code(secret)
            step = totp_step(secret, code)
            assert step is not None
            assert (await env.login("erin.o@example", totp=code)).identity.user  # type: ignore[attr-defined]
            with pytest.raises(LoginError, match="already used: wait for the next one"):
                await env.login("erin.o@example", totp=code, at=service_b.port)
            assert (await env.logins())[-1].reason == "one-time code used again"
            following = totp_code(secret, (step + 1) * TOTP_STEP)
            assert (
                await env.login("erin.o@example", totp=following, at=service_b.port)
            ).identity.user  # type: ignore[attr-defined]
            # and, accepted by B, it is refused by A
            with pytest.raises(LoginError, match="already used"):
                await env.login("erin.o@example", totp=following)
        finally:
            await service_b.close()


async def test_the_same_code_at_two_instances_at_once_works_once(
    env: AuthEnv, nats_server: NatsServer
) -> None:
    secret = await _totp_user(env, "frank")
    async with await Bus.connect(nats_server.url, name="auth-2") as bus_b:
        service_b = await _second_instance(env, bus_b, "auth-2")
        try:
            now = int(time.time() // TOTP_STEP)
            for round_ in range(2):
                step = now + round_  # this step and the next: both valid for 30 s at least
                code = totp_code(secret, step * TOTP_STEP)
                results = await asyncio.gather(
                    env.login("frank", totp=code, home=env.tmp / f"a{round_}"),
                    env.login("frank", totp=code, home=env.tmp / f"b{round_}", at=service_b.port),
                    return_exceptions=True,
                )
                refused = [r for r in results if isinstance(r, BaseException)]
                assert len(refused) == 1, results
                assert "already used" in str(refused[0])
        finally:
            await service_b.close()


async def _until_read(bus: Bus, user: str) -> None:
    """Wait until ``bus`` reads again after NATS came back."""
    deadline = time.monotonic() + 15
    while True:
        try:
            if await get_user(bus, user) is not None:
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.2)


class Gate:
    """Stands in for the service's verification semaphore: holds a login there."""

    def __init__(self) -> None:
        self.entered = asyncio.Event()
        self.opened = asyncio.Event()

    async def __aenter__(self) -> None:
        self.entered.set()
        await self.opened.wait()

    async def __aexit__(self, *exc: object) -> None:
        return None


async def test_no_nats_no_second_factor(env: AuthEnv, nats_server: NatsServer) -> None:
    secret = await _totp_user(env, "gina")
    async with await Bus.connect(nats_server.url, name="auth-3", request_timeout=2) as bus_c:
        service_c = await _second_instance(env, bus_c, "auth-3")
        try:
            # NATS goes away after the user was read: the code cannot be checked
            gate = Gate()
            service_c.service.verifications = gate  # type: ignore[assignment]
            code = totp_code(secret)
            attempt = asyncio.ensure_future(env.login("gina", totp=code, at=service_c.port))
            await asyncio.wait_for(gate.entered.wait(), 10)
            await asyncio.to_thread(nats_server.stop)
            gate.opened.set()
            with pytest.raises(LoginError, match="cannot reach NATS to check the one-time code"):
                await attempt
            # without NATS nothing is read at all: the same clear refusal
            with pytest.raises(LoginError, match="cannot reach NATS to check the user"):
                await env.login("gina", totp=code, at=service_c.port)
            await asyncio.to_thread(wait_port_free, "127.0.0.1", nats_server.port)
            await asyncio.to_thread(nats_server.start)
            await _until_read(bus_c, "gina")
            await _until_read(env.bus, "gina")
            # back: the code was never accepted, so it works now, once
            assert (await env.login("gina", totp=code, at=service_c.port)).identity.user  # type: ignore[attr-defined]
            with pytest.raises(LoginError, match="already used"):
                await env.login("gina", totp=code)
        finally:
            await service_c.close()
    reasons = [(e.user, e.success, e.reason) for e in await env.logins()]
    assert reasons == [
        ("gina", False, "one-time code not checked: NATS unavailable"),
        ("gina", False, "user not checked: NATS unavailable"),
        ("gina", True, ""),
        ("gina", False, "one-time code used again"),
    ]


async def test_racing_claims_of_one_step_exactly_one_wins(
    bus: Bus, nats_server: NatsServer
) -> None:
    async with await Bus.connect(nats_server.url, name="auth-2") as other:
        for step in (100, 101, 103):
            won = await asyncio.gather(
                *(claim_step(b, "hank", step) for b in (bus, other, bus, other))
            )
            assert sorted(won) == [False, False, False, True]
        assert not await claim_step(other, "hank", 102)  # earlier than the last accepted
        assert await claim_step(other, "hank.other", 102)  # another user: its own record
